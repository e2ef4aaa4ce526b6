"""honelm.diagnostics."""
