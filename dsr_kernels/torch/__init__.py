"""Backend ``"torch"``: ops written with PyTorch operations (any device), one module per op (``torch/<op>.py``)."""
