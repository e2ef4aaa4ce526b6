"""The engine: runs the detectors over a growing log history and decides what to report.

:class:`Diagnostician` is fed one log entry at a time (``observe``), exactly as a training
run produces them, so a live run and a replay of its saved history (``honelm doctor``)
emit the same events. It keeps one track per problem (``code`` and ``subject``):

- a problem found for the first time is reported (status ``"new"``);
- while it persists it is reported again after 2, 4, 8, 16... checks that found it (and at
  once if its severity rises), so a persisting problem does not flood the console; an
  ``info`` problem is not repeated;
- after ``resolve_after`` consecutive checks that no longer find it, its resolution is
  reported (status ``"resolved"``).

Pre-flight problems are reported once and stay active (the data does not change).
No I/O happens here: sinks (console, JSONL, metrics, hooks) consume the returned events.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .codes import CODES, parse_silence, resolve_thresholds
from .detectors import RUNTIME_DETECTORS
from .events import SEVERITIES, DiagnosticEvent, Finding, severity_rank, times
from .history import LogHistory, RunContext

RESOLVE_AFTER = 3


@dataclass
class _Track:
    first_step: int
    last_seen: int
    severity: str
    count: int = 1
    next_report: int = 2
    clean: int = 0
    static: bool = False
    last: DiagnosticEvent | None = None  # the latest event reported
    finding: Finding | None = None  # the latest detection (reported or not)


class Diagnostician:
    """Runs detectors over a run's logs (see the module docstring).

    Args:
        config: The run's config as a mapping (e.g. :class:`~honelm.diagnostics.history.ConfigView`).
        thresholds: Per-code overrides (``{"GRAD_NORM_SPIKE": 20}``); see :mod:`~honelm.diagnostics.codes`.
        silence: Codes never reported.
        machine, model, method: Facts passed to the detectors (see :class:`RunContext`).
        detectors: The runtime detectors to run (default: all of them).
        resolve_after: Clean checks after which a problem is reported resolved.
    """

    def __init__(
        self,
        config: Mapping[str, Any] | None = None,
        *,
        thresholds: Mapping[str, Any] | str | None = None,
        silence: Iterable[str] | str | None = None,
        machine: Mapping[str, Any] | None = None,
        model: Mapping[str, Any] | None = None,
        method: str = "",
        detectors: Sequence[Any] = RUNTIME_DETECTORS,
        resolve_after: int = RESOLVE_AFTER,
    ) -> None:
        self.config: Mapping[str, Any] = config if config is not None else {}
        self.thresholds = resolve_thresholds(thresholds)
        self.silence = frozenset(parse_silence(silence))
        self.machine = dict(machine or {})
        self.model = dict(model or {})
        self.method = method
        self.resolve_after = resolve_after
        self.history = LogHistory()
        self._detectors = {
            on: [d for d in detectors if d.on == on and not set(d.codes) <= self.silence] for on in ("train", "eval")
        }
        self.active: dict[tuple[str, str | None], _Track] = {}
        self.events: list[DiagnosticEvent] = []

    # ---- feeding ------------------------------------------------------------------------------

    def observe(self, entry: Mapping[str, Any]) -> list[DiagnosticEvent]:
        """Add one log entry and run the detectors it triggers; returns the events to report."""
        kind = self.history.append(entry)
        if kind == "summary":
            return []
        context = RunContext(self.config, self.history, self.machine, self.model, self.method)
        findings: list[Finding] = []
        checked: set[str] = set()
        for detect in self._detectors[kind]:
            findings.extend(detect(context, self.thresholds))
            checked.update(detect.codes)
        return self._update(findings, self.history.last_step, checked)

    def observe_all(self, entries: Iterable[Mapping[str, Any]]) -> list[DiagnosticEvent]:
        """``observe`` each entry in order; returns all the events."""
        return [event for entry in entries for event in self.observe(entry)]

    def add_preflight(self, findings: Iterable[Finding], step: int = 0) -> list[DiagnosticEvent]:
        """Report pre-flight findings (once each; they never resolve)."""
        emitted = []
        for finding in findings:
            if finding.code in self.silence or (finding.code, finding.subject) in self.active:
                continue
            severity = finding.severity or CODES[finding.code].severity
            event = self._event(finding, "new", step, step, 1, severity)
            self.active[event.key] = _Track(step, step, severity, static=True, last=event)
            emitted.append(event)
        self.events.extend(emitted)
        return emitted

    def add_recorded(self, events: Iterable[DiagnosticEvent]) -> list[DiagnosticEvent]:
        """Re-add pre-flight events read back from a run's ``diagnostics.jsonl`` (for replays)."""
        kept = []
        for event in events:
            if event.code in self.silence or event.key in self.active:
                continue
            self.active[event.key] = _Track(event.first_step, event.step, event.severity, static=True, last=event)
            kept.append(event)
        self.events.extend(kept)
        return kept

    def reset(self) -> None:
        """Forget the log history and the runtime problems (a new training run); pre-flight stays."""
        self.history = LogHistory()
        self.active = {k: t for k, t in self.active.items() if t.static}
        self.events = [t.last for t in self.active.values() if t.last is not None]

    # ---- state --------------------------------------------------------------------------------

    def active_counts(self) -> dict[str, int]:
        """Problems active now, by severity."""
        counts = dict.fromkeys(SEVERITIES, 0)
        for track in self.active.values():
            counts[track.severity] += 1
        return counts

    def active_events(self) -> list[DiagnosticEvent]:
        """Each problem still active, as of its latest detection (``step`` is when it was last seen)."""
        out = []
        for track in self.active.values():
            if track.finding is None:
                out.append(track.last)  # pre-flight
                continue
            status = "new" if track.count == 1 else "ongoing"
            out.append(self._event(track.finding, status, track.last_seen, track.first_step, track.count,
                                   track.severity))
        return [e for e in out if e is not None]

    # ---- internals ----------------------------------------------------------------------------

    def _event(self, finding: Finding, status: str, step: int, first_step: int, count: int,
               severity: str) -> DiagnosticEvent:
        info = CODES[finding.code]
        return DiagnosticEvent(
            code=finding.code, severity=severity, status=status, step=step, first_step=first_step,
            message=finding.message, evidence=dict(finding.evidence), suggestions=tuple(finding.suggestions),
            docs=info.docs, area=info.area, subject=finding.subject, count=count,
        )

    def _update(self, findings: list[Finding], step: int, checked: set[str]) -> list[DiagnosticEvent]:
        emitted: list[DiagnosticEvent] = []
        seen: set[tuple[str, str | None]] = set()
        for finding in findings:
            key = (finding.code, finding.subject)
            if finding.code in self.silence or key in seen:
                continue
            seen.add(key)
            severity = finding.severity or CODES[finding.code].severity
            track = self.active.get(key)
            if track is None:
                event = self._event(finding, "new", step, step, 1, severity)
                self.active[key] = _Track(step, step, severity, last=event, finding=finding)
                emitted.append(event)
                continue
            track.count += 1
            track.clean = 0
            track.last_seen = step
            track.finding = finding
            escalated = severity_rank(severity) > severity_rank(track.severity)
            track.severity = severity if escalated else track.severity
            if escalated or (track.count >= track.next_report and track.severity != "info"):
                while track.next_report <= track.count:
                    track.next_report *= 2
                track.last = self._event(finding, "ongoing", step, track.first_step, track.count, track.severity)
                emitted.append(track.last)
        for key, track in list(self.active.items()):
            if key in seen or track.static or key[0] not in checked:
                continue
            track.clean += 1
            if track.clean >= self.resolve_after:
                del self.active[key]
                emitted.append(self._resolved(key, track, step))
        self.events.extend(emitted)
        return emitted

    def _resolved(self, key: tuple[str, str | None], track: _Track, step: int) -> DiagnosticEvent:
        code, subject = key
        info = CODES[code]
        return DiagnosticEvent(
            code=code, severity=track.severity, status="resolved", step=step, first_step=track.first_step,
            message=f"No longer detected after step {track.last_seen} (seen {times(track.count)}). The problem was: "
                    f"{info.meaning}",
            evidence={"last_seen_step": track.last_seen, "times_seen": track.count,
                      "clean_checks": self.resolve_after},
            docs=info.docs, area=info.area, subject=subject, count=track.count,
        )


def stops(event: DiagnosticEvent, stop_on: str | None) -> bool:
    """Whether ``event`` should stop training under ``diagnostics_stop_on=stop_on``."""
    if stop_on is None or event.status == "resolved":
        return False
    return severity_rank(event.severity) >= severity_rank(stop_on)
