"""Code shared by the server and client apps."""
