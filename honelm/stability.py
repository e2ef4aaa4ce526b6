"""Stability contract helpers: ExperimentalWarning and deprecations (being written)."""


class ExperimentalWarning(UserWarning):
    """Emitted once when ``honelm.experimental`` is imported: its API may change in any release."""
