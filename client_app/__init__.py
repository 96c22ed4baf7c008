"""Client side: local training and the ClientApp."""
