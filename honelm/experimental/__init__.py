"""honelm.experimental."""
