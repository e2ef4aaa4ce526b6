"""honelm.methods."""
