"""honelm.generation."""
