"""Training that explains itself: detectors, events, sinks, pre-flight checks, ``doctor``.

Every trainer watches its own metrics and the machine, recognizes common failure modes, and
reports them as :class:`DiagnosticEvent` objects: a stable ``code`` (listed in :data:`CODES`
and explained in ``docs/diagnostics.md``), a severity, the evidence, and suggestions that
name real config fields. Pieces:

- :mod:`~honelm.diagnostics.events` and :mod:`~honelm.diagnostics.codes`: the schema and
  the code table (with default thresholds);
- :mod:`~honelm.diagnostics.detectors`: pure functions of the config, the log history and
  the machine (runtime), or of a dataset sample and the tokenizer (pre-flight);
- :mod:`~honelm.diagnostics.engine`: runs them and rate-limits what is reported;
- :mod:`~honelm.diagnostics.callback`: :class:`DiagnosticsCallback`, the
  ``transformers.TrainerCallback`` with the console, JSONL, metric and hook sinks, and
  :func:`attach_diagnostics`, which wires it into a trainer;
- :mod:`~honelm.diagnostics.doctor` and :mod:`~honelm.diagnostics.plotting`: replay a saved
  run (``honelm doctor``, ``honelm plot``).

Names are imported on first use, so ``import honelm.diagnostics`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    # schema and codes
    "SCHEMA_VERSION": "honelm.diagnostics.events",
    "SEVERITIES": "honelm.diagnostics.events",
    "DiagnosticEvent": "honelm.diagnostics.events",
    "Finding": "honelm.diagnostics.events",
    "Suggestion": "honelm.diagnostics.events",
    "CODES": "honelm.diagnostics.codes",
    "CodeInfo": "honelm.diagnostics.codes",
    "normalize_settings": "honelm.diagnostics.codes",
    "resolve_thresholds": "honelm.diagnostics.codes",
    # detectors and engine
    "LogHistory": "honelm.diagnostics.history",
    "RunContext": "honelm.diagnostics.history",
    "PreflightInput": "honelm.diagnostics.detectors",
    "RUNTIME_DETECTORS": "honelm.diagnostics.detectors",
    "PREFLIGHT_CHECKS": "honelm.diagnostics.detectors",
    "Diagnostician": "honelm.diagnostics.engine",
    "preflight_input": "honelm.diagnostics.preflight",
    "run_preflight": "honelm.diagnostics.preflight",
    # training integration
    "DiagnosticError": "honelm.diagnostics.callback",
    "DiagnosticsCallback": "honelm.diagnostics.callback",
    "attach_diagnostics": "honelm.diagnostics.callback",
    # replays
    "load_run": "honelm.diagnostics.doctor",
    "replay": "honelm.diagnostics.doctor",
    "plot_run": "honelm.diagnostics.plotting",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'honelm.diagnostics' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover - for static analysers only
    from .callback import DiagnosticError, DiagnosticsCallback, attach_diagnostics
    from .codes import CODES, CodeInfo, normalize_settings, resolve_thresholds
    from .detectors import PREFLIGHT_CHECKS, RUNTIME_DETECTORS, PreflightInput
    from .doctor import load_run, replay
    from .engine import Diagnostician
    from .events import SCHEMA_VERSION, SEVERITIES, DiagnosticEvent, Finding, Suggestion
    from .history import LogHistory, RunContext
    from .plotting import plot_run
    from .preflight import preflight_input, run_preflight
