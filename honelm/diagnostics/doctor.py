"""Replaying the diagnostics over a saved run: what ``honelm doctor`` and ``honelm plot`` use.

A run directory is the ``output_dir`` of any ``transformers.Trainer`` run (honelm, TRL or
plain transformers): its ``trainer_state.json`` (written at each checkpoint, and by honelm
at the end of training) holds the log history. The newest one is used, from the directory
itself or its ``checkpoint-*`` folders, so a running run can be examined too.

honelm runs also leave ``diagnostics_context.json`` (config, thresholds, silenced codes,
machine and model facts) and ``diagnostics.jsonl`` (the events as they were reported). The
replay feeds the log history to the same engine the run used, entry by entry, so it
reproduces the events of the run; pre-flight events (which come from the dataset, not the
logs) are read back from ``diagnostics.jsonl``. For runs made elsewhere the config is
unknown: suggestions then show no current value.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .engine import Diagnostician
from .events import SCHEMA_VERSION, DiagnosticEvent, format_evidence, severity_rank, times

JSONL_FILE = "diagnostics.jsonl"
CONTEXT_FILE = "diagnostics_context.json"
STATE_FILE = "trainer_state.json"


class RunDirError(ValueError):
    """The path does not hold a run that can be read; the message says what was looked for."""


@dataclass
class Run:
    """A saved run, read back (see :func:`load_run`)."""

    path: str
    state_file: str
    log_history: list[dict[str, Any]]
    global_step: int = 0
    max_steps: int = 0
    context: dict[str, Any] = field(default_factory=dict)
    recorded: list[DiagnosticEvent] = field(default_factory=list)

    @property
    def method(self) -> str:
        return str(self.context.get("method") or guess_method(self.log_history))


def guess_method(log_history: Iterable[Mapping[str, Any]]) -> str:
    """The training method whose metric names a log history holds ('' when unclear)."""
    keys = {k for entry in log_history for k in entry}
    if {"reward", "reward_std"} & keys or "frac_reward_zero_std" in keys:
        return "grpo"
    if "kl" in keys and "rewards/chosen" in keys:
        return "kto"
    if "rewards/accuracies" in keys or "rewards/chosen" in keys:
        return "dpo"
    if "mean_reward" in keys or ("accuracy" in keys and "margin" in keys):
        return "reward"
    if "mean_token_accuracy" in keys:
        return "sft"
    return ""


def _step_of(path: str) -> int:
    try:
        with open(path, encoding="utf-8") as f:
            return int(json.load(f).get("global_step", 0))
    except (OSError, ValueError, json.JSONDecodeError):
        return -1


def find_state_file(path: str) -> tuple[str, str]:
    """``(run directory, newest trainer_state.json)`` for a run directory, checkpoint or file."""
    if os.path.isfile(path):
        if not path.endswith(".json"):
            raise RunDirError(f"{path} is not a trainer_state.json file; give the run's output directory instead.")
        folder = os.path.dirname(os.path.abspath(path))
        parent = os.path.dirname(folder)
        run_dir = parent if os.path.basename(folder).startswith("checkpoint-") else folder
        return run_dir, path
    if not os.path.isdir(path):
        raise RunDirError(f"{path}: no such directory. Give the output_dir of a training run.")
    folder = os.path.abspath(path)
    candidates = [os.path.join(folder, STATE_FILE)]
    candidates += glob.glob(os.path.join(folder, "checkpoint-*", STATE_FILE))
    found = [(c, _step_of(c)) for c in candidates if os.path.isfile(c)]
    if not found:
        raise RunDirError(
            f"{path} holds no {STATE_FILE} (looked in it and in its checkpoint-* folders). Point at the output_dir "
            f"of a transformers.Trainer run: {STATE_FILE} is written with every checkpoint (and by honelm at the "
            "end of training; with other libraries call trainer.save_state())."
        )
    newest = max(found, key=lambda item: (item[1], item[0] == candidates[0]))[0]
    run_dir = os.path.dirname(folder) if os.path.basename(folder).startswith("checkpoint-") else folder
    return run_dir, newest


def read_events(path: str) -> list[DiagnosticEvent]:
    """The events of a ``diagnostics.jsonl`` file (skipping lines of a newer schema)."""
    events = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as e:
                raise RunDirError(f"{path}, line {number}: not valid JSON ({e.msg}).") from e
            if int(data.get("schema_version", 1)) <= SCHEMA_VERSION:
                events.append(DiagnosticEvent.from_dict(data))
    return events


def load_run(path: str) -> Run:
    """Read a run directory (see the module docstring)."""
    run_dir, state_file = find_state_file(path)
    try:
        with open(state_file, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise RunDirError(f"{state_file} could not be read as JSON: {e}") from e
    history = state.get("log_history")
    if not isinstance(history, list):
        raise RunDirError(f"{state_file} has no log_history list; is it a transformers trainer_state.json?")
    context: dict[str, Any] = {}
    context_file = os.path.join(run_dir, CONTEXT_FILE)
    if os.path.isfile(context_file):
        with open(context_file, encoding="utf-8") as f:
            context = json.load(f)
    jsonl = os.path.join(run_dir, JSONL_FILE)
    recorded = read_events(jsonl) if os.path.isfile(jsonl) else []
    return Run(path=run_dir, state_file=state_file, log_history=history,
               global_step=int(state.get("global_step", 0) or 0), max_steps=int(state.get("max_steps", 0) or 0),
               context=context, recorded=recorded)


def replay(
    run: Run, *, thresholds: Mapping[str, Any] | str | None = None, silence: Iterable[str] | None = None
) -> Diagnostician:
    """Run the engine over ``run``'s log history as the run did; returns the engine.

    ``thresholds`` and ``silence`` replace the run's own settings when given.
    """
    context = run.context
    engine = Diagnostician(
        context.get("config") or {},
        thresholds=context.get("thresholds") if thresholds is None else thresholds,
        silence=context.get("silence") if silence is None else silence,
        machine=context.get("machine"),
        model=context.get("model"),
        method=run.method,
    )
    engine.add_recorded(e for e in run.recorded if e.area == "preflight" and e.status == "new")
    engine.observe_all(run.log_history)
    return engine


# ---- the report ---------------------------------------------------------------------------------


def report_dict(run: Run, engine: Diagnostician) -> dict[str, Any]:
    """The JSON report: every event in order, and the problems still active at the end."""
    return {
        "schema_version": SCHEMA_VERSION,
        "run_dir": run.path,
        "trainer_state": run.state_file,
        "method": run.method,
        "global_step": run.global_step,
        "max_steps": run.max_steps,
        "config_known": bool(run.context.get("config")),
        "events": [e.to_dict() for e in engine.events],
        "active": [e.to_dict() for e in engine.active_events()],  # as of each problem's latest detection
    }


def _problem_lines(event: DiagnosticEvent, indent: str = "  ") -> list[str]:
    name = event.code + (f"[{event.subject}]" if event.subject else "")
    when = f"at step {event.first_step}" if event.count == 1 else (
        f"since step {event.first_step} (seen {times(event.count)}, last at step {event.step})")
    lines = [f"{indent}[{event.severity.upper()}] {name} {when}", f"{indent}    {event.message}"]
    evidence = format_evidence(event.evidence)
    if evidence:
        lines.append(f"{indent}    evidence: {evidence}")
    for suggestion in event.suggestions:
        lines.append(f"{indent}    try: {suggestion}")
    lines.append(f"{indent}    docs: {event.docs}")
    return lines


def report_text(run: Run, engine: Diagnostician, *, show_info: bool = True) -> str:
    """The readable report ``honelm doctor`` prints."""
    steps = f"step {run.global_step}" + (f" of {run.max_steps}" if run.max_steps else "")
    lines = [
        f"honelm doctor: {run.path}",
        f"  method: {run.method or 'unknown'} | {len(run.log_history)} log entries up to {steps} | "
        f"from {os.path.relpath(run.state_file, run.path)}",
    ]
    if not run.context.get("config"):
        lines.append(f"  config: unknown (no {CONTEXT_FILE}): suggestions show no current values")
    active = sorted(engine.active_events(), key=lambda e: (-severity_rank(e.severity), e.first_step))
    if not show_info:
        active = [e for e in active if e.severity != "info"]
    resolved = [e for e in engine.events if e.status == "resolved"]
    if not active and not resolved:
        lines += ["", "No problems found."]
        return "\n".join(lines)
    if active:
        lines += ["", f"Active problems ({len(active)}):"]
        for event in active:
            lines += _problem_lines(event)
    if resolved:
        lines += ["", f"Resolved during the run ({len(resolved)}):"]
        for event in resolved:
            name = event.code + (f"[{event.subject}]" if event.subject else "")
            lines.append(f"  [{event.severity.upper()}] {name}: steps {event.first_step}-"
                         f"{event.evidence.get('last_seen_step', event.step)} (seen {times(event.count)})")
    return "\n".join(lines)
