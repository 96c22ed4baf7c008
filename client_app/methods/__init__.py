"""The client side of each method that needs one of its own (common/methods.py names them);
methods without one use `client_app.method.ClientMethod`."""
