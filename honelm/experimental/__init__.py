"""Experimental methods: still proving their value; their API may change in any release.

Importing this package emits :class:`honelm.ExperimentalWarning` once per process; set
the environment variable ``HONELM_SILENCE_EXPERIMENTAL=1`` to silence it. Nothing here
is covered by the stability contract (STABILITY.md). A method that proves itself moves
to ``honelm/methods/`` and leaves an import shim here for two minor releases.
"""

from honelm.stability import _warn_experimental_import

_warn_experimental_import()

__all__: list[str] = []
