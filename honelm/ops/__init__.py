"""honelm.ops."""
