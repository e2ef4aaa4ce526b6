"""Suite-wide test setup.

The strict diagnostics plugin runs for every test: a test during which honelm's diagnostics
report a warning or worse fails, so every healthy toy training run must stay silent. A test
that provokes problems on purpose says so with ``@pytest.mark.diagnostics_expected``; the
diagnostics' own test files (named ``*diag*``) are exempt. See tests/diagnostics/strict_plugin.py.
"""

from __future__ import annotations

import os
import sys

# `tests.diagnostics.strict_plugin` is imported by name: make the repository root importable
# however pytest was started (`pytest` or `python -m pytest`, from any directory).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

pytest_plugins = ["tests.diagnostics.strict_plugin"]
