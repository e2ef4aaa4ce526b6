"""honelm.rewards."""
