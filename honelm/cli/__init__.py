"""honelm.cli."""
