"""honelm.models."""
