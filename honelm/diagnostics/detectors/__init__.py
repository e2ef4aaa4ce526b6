"""The detectors, grouped by area.

A runtime detector is a pure function ``(RunContext, thresholds) -> list[Finding]``, marked
with the codes it raises and the logs that trigger it (``on="train"`` or ``"eval"``). A
pre-flight check is a pure function ``(PreflightInput, thresholds) -> list[Finding]``.
"""

from __future__ import annotations

from . import general, online, preference, system
from .preflight import CHECKS as PREFLIGHT_CHECKS
from .preflight import PreflightInput, preflight_findings

RUNTIME_DETECTORS = (*general.DETECTORS, *preference.DETECTORS, *online.DETECTORS, *system.DETECTORS)

__all__ = ["PREFLIGHT_CHECKS", "RUNTIME_DETECTORS", "PreflightInput", "preflight_findings"]
