"""The diagnostic event: one recognized problem, for people and for programs.

An event says what is happening (``message``), shows the evidence (the metric, its recent
values, the threshold), and proposes changes a program can apply (``suggestions``: a config
field, its current value read from the live config, and a proposed value). Events are
versioned (``schema_version``): fields are only ever added within a version.

Each problem goes through three statuses:

- ``"new"``: first detected at ``step`` (``first_step == step``);
- ``"ongoing"``: still detected; repeated at growing intervals (``count`` is the number of
  checks that found it so far);
- ``"resolved"``: no longer detected for a few consecutive checks.

This module is pure data: no I/O, no torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1

SEVERITIES: tuple[str, ...] = ("info", "warning", "error", "critical")
STATUSES: tuple[str, ...] = ("new", "ongoing", "resolved")


def severity_rank(severity: str) -> int:
    """0 for ``info`` up to 3 for ``critical``; raises on an unknown severity."""
    try:
        return SEVERITIES.index(severity)
    except ValueError:
        raise ValueError(f"Unknown severity {severity!r}; expected one of {', '.join(SEVERITIES)}.") from None


@dataclass(frozen=True)
class Suggestion:
    """A change a program can apply: set config field ``param`` from ``current`` to ``proposed``.

    ``current`` is read from the run's config (``None`` when the config is not known, e.g.
    for a run made with another library). ``reason`` is a short plain-language note.
    """

    param: str
    current: Any
    proposed: Any
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"param": self.param, "current": _jsonable(self.current), "proposed": _jsonable(self.proposed),
                "reason": self.reason}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Suggestion:
        return cls(param=data["param"], current=data.get("current"), proposed=data.get("proposed"),
                   reason=data.get("reason", ""))

    def __str__(self) -> str:
        text = f"{self.param}: {_literal(self.current)} -> {_literal(self.proposed)}"
        return f"{text} ({self.reason})" if self.reason else text


@dataclass(frozen=True)
class Finding:
    """What a detector returns: a problem seen in the data, before the engine dates it.

    ``subject`` distinguishes several instances of one code (e.g. the name of the reward
    function that never varies); ``severity`` overrides the code's default when set.
    """

    code: str
    message: str
    evidence: Mapping[str, Any] = field(default_factory=dict)
    suggestions: Sequence[Suggestion] = ()
    severity: str | None = None
    subject: str | None = None


@dataclass(frozen=True)
class DiagnosticEvent:
    """One emission of a diagnostic (see the module docstring for the statuses)."""

    code: str
    severity: str
    status: str
    step: int
    first_step: int
    message: str
    evidence: Mapping[str, Any] = field(default_factory=dict)
    suggestions: tuple[Suggestion, ...] = ()
    docs: str = ""
    area: str = ""
    subject: str | None = None
    count: int = 1
    schema_version: int = SCHEMA_VERSION

    @property
    def key(self) -> tuple[str, str | None]:
        """Identifies the problem across its emissions: ``(code, subject)``."""
        return (self.code, self.subject)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (non-finite numbers become the strings ``"nan"``, ``"inf"``)."""
        return {
            "schema_version": self.schema_version,
            "code": self.code,
            "severity": self.severity,
            "status": self.status,
            "step": self.step,
            "first_step": self.first_step,
            "count": self.count,
            "subject": self.subject,
            "area": self.area,
            "message": self.message,
            "evidence": _jsonable(dict(self.evidence)),
            "suggestions": [s.to_dict() for s in self.suggestions],
            "docs": self.docs,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, sort_keys=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DiagnosticEvent:
        version = int(data.get("schema_version", SCHEMA_VERSION))
        if version > SCHEMA_VERSION:
            raise ValueError(
                f"This diagnostic event has schema_version {version}, newer than this honelm understands "
                f"({SCHEMA_VERSION}). Upgrade honelm to read it."
            )
        return cls(
            code=data["code"],
            severity=data["severity"],
            status=data.get("status", "new"),
            step=int(data["step"]),
            first_step=int(data.get("first_step", data["step"])),
            message=data.get("message", ""),
            evidence=dict(data.get("evidence") or {}),
            suggestions=tuple(Suggestion.from_dict(s) for s in data.get("suggestions") or ()),
            docs=data.get("docs", ""),
            area=data.get("area", ""),
            subject=data.get("subject"),
            count=int(data.get("count", 1)),
            schema_version=version,
        )

    def format(self) -> str:
        """Readable text for a console: what, evidence, suggestions and docs (repeats are shorter)."""
        name = self.code + (f"[{self.subject}]" if self.subject else "")
        if self.status == "resolved":
            return (f"honelm diagnostics [resolved] {name} at step {self.step} "
                    f"(first seen at step {self.first_step}): {self.message}")
        when = f"at step {self.step}" if self.status == "new" else (
            f"still present at step {self.step} (since step {self.first_step}, seen {times(self.count)})")
        lines = [f"honelm diagnostics [{self.severity.upper()}] {name} {when}: {self.message}"]
        evidence = format_evidence(self.evidence)
        if evidence:
            lines.append(f"    evidence: {evidence}")
        if self.status == "ongoing":  # suggestions and docs were shown with the first report
            return "\n".join(lines)
        if self.suggestions:
            lines.append("    try: " + "; ".join(str(s) for s in self.suggestions))
        if self.docs:
            lines.append(f"    docs: {self.docs}")
        return "\n".join(lines)


def times(n: int) -> str:
    """``"once"``, ``"twice"``, ``"3 times"``."""
    return {1: "once", 2: "twice"}.get(n, f"{n} times")


def format_evidence(evidence: Mapping[str, Any]) -> str:
    """``key=value`` pairs, numbers rounded, lists shortened to their last values."""
    parts = []
    for key, value in evidence.items():
        parts.append(f"{key}={_show(value)}")
    return ", ".join(parts)


def _show(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3g}"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        shown = [_show(v) for v in value[-8:]]
        return "[" + (", ".join(shown) if len(value) <= 8 else "..., " + ", ".join(shown)) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    return str(value)


def _literal(value: Any) -> str:
    """A config value as one would type it (``1.0``, ``2e-05``, ``'keep_end'``, ``True``)."""
    return repr(value) if isinstance(value, (float, str)) else str(value)


def _jsonable(value: Any) -> Any:
    """``value`` with non-finite floats as strings and tuples as lists, for strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            return _jsonable(item())
        except (TypeError, ValueError):
            pass
    return str(value)
