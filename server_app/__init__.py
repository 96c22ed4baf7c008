"""Server side: the hypernetwork, its state, the Strategy and the ServerApp."""
