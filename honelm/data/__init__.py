"""honelm.data."""
