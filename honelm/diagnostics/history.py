"""What detectors read: the run's metric history, its config and the machine.

A run's log history is a list of dicts, as in ``trainer_state.json``'s ``log_history``: each
``Trainer.log`` call appends one entry holding ``step`` and the logged metrics. Entries
whose keys start with ``eval_`` are evaluation logs; the final summary (``train_runtime``)
is neither. :class:`LogHistory` keeps each metric as a :class:`Series` of
``(step, value)``, appended entry by entry, so that a detector reading the tail of a long
run does not rescan it.

Metric names are those TRL users see (``loss``, ``grad_norm``, ``rewards/accuracies``,
``reward_std``, ...). Keys under ``diagnostics/`` (the counters diagnostics log themselves)
are ignored.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

SUMMARY_KEYS = ("train_runtime", "train_loss")
IGNORED_PREFIXES = ("diagnostics/",)


class Series:
    """One metric over the run: parallel lists of steps and values (values may be NaN/inf)."""

    __slots__ = ("steps", "values", "_finite_min")

    def __init__(self, steps: Iterable[int] = (), values: Iterable[float] = ()) -> None:
        self.steps: list[int] = []
        self.values: list[float] = []
        self._finite_min: list[float] = []  # running minimum of the finite values so far
        for s, v in zip(steps, values):
            self.append(s, v)

    def append(self, step: int, value: float) -> None:
        self.steps.append(step)
        self.values.append(value)
        previous = self._finite_min[-1] if self._finite_min else math.inf
        self._finite_min.append(min(previous, value) if math.isfinite(value) else previous)

    def __len__(self) -> int:
        return len(self.values)

    def __bool__(self) -> bool:
        return bool(self.values)

    @property
    def last(self) -> float:
        return self.values[-1]

    @property
    def last_step(self) -> int:
        return self.steps[-1]

    def tail(self, n: int) -> list[float]:
        """The last ``n`` values (fewer when the series is shorter)."""
        return self.values[-n:] if n > 0 else []

    def tail_steps(self, n: int) -> list[int]:
        return self.steps[-n:] if n > 0 else []

    def min_before(self, n: int) -> float:
        """The lowest finite value before the last ``n`` (``inf`` when there is none)."""
        index = len(self.values) - n - 1
        return self._finite_min[index] if index >= 0 else math.inf

    def __repr__(self) -> str:
        return f"Series({len(self)} values, last={self.values[-1] if self.values else None})"


_EMPTY = Series()


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return float(value)
    return None


def entry_kind(entry: Mapping[str, Any]) -> str:
    """``"summary"``, ``"eval"`` or ``"train"``."""
    if any(k in entry for k in SUMMARY_KEYS):
        return "summary"
    if any(str(k).startswith("eval_") for k in entry):
        return "eval"
    return "train"


class LogHistory:
    """The metric series of a log history (see the module docstring).

    ``train(key)`` and ``eval(key)`` return a :class:`Series` (empty when the metric was never
    logged); eval keys keep their ``eval_`` prefix (``eval("eval_loss")``).
    """

    def __init__(self, entries: Iterable[Mapping[str, Any]] = ()) -> None:
        self._train: dict[str, Series] = {}
        self._eval: dict[str, Series] = {}
        self.num_train_logs = 0
        self.num_eval_logs = 0
        self.last_step = 0
        self.last_kind: str | None = None
        for entry in entries:
            self.append(entry)

    def append(self, entry: Mapping[str, Any]) -> str:
        """Add one log entry; returns its kind (``"train"``, ``"eval"`` or ``"summary"``)."""
        kind = entry_kind(entry)
        step = entry.get("step")
        step = int(step) if isinstance(step, (int, float)) and not isinstance(step, bool) else self.last_step
        self.last_step = max(self.last_step, step)
        self.last_kind = kind
        if kind == "summary":
            return kind
        store = self._eval if kind == "eval" else self._train
        if kind == "eval":
            self.num_eval_logs += 1
        else:
            self.num_train_logs += 1
        for key, raw in entry.items():
            if key == "step" or str(key).startswith(IGNORED_PREFIXES):
                continue
            value = _number(raw)
            if value is None:
                continue
            series = store.get(key)
            if series is None:
                series = store[key] = Series()
            series.append(step, value)
        return kind

    def train(self, key: str) -> Series:
        return self._train.get(key, _EMPTY)

    def eval(self, key: str) -> Series:
        return self._eval.get(key, _EMPTY)

    def has(self, key: str) -> bool:
        return key in self._train or key in self._eval

    def train_keys(self) -> list[str]:
        return list(self._train)

    def eval_keys(self) -> list[str]:
        return list(self._eval)


@dataclass(frozen=True)
class RunContext:
    """Everything a runtime detector may read.

    Attributes:
        config: The run's config as a mapping (a :class:`ConfigView` of the live config, or a
            plain dict read back from a run directory). Empty when unknown.
        history: The metric series so far.
        machine: Machine facts: ``accelerator``, ``device_name``, ``memory_total_gib``,
            ``num_processes``. Empty when unknown.
        model: Facts about the model's config that detectors use (``num_experts``,
            ``num_experts_per_tok``, ``output_router_logits``). Empty when unknown.
        method: ``"sft"``, ``"dpo"``, ``"grpo"``... or ``""`` when unknown.
    """

    config: Mapping[str, Any] = field(default_factory=dict)
    history: LogHistory = field(default_factory=LogHistory)
    machine: Mapping[str, Any] = field(default_factory=dict)
    model: Mapping[str, Any] = field(default_factory=dict)
    method: str = ""


class ConfigView(Mapping[str, Any]):
    """A read-only, live mapping over a config dataclass's fields (enum values as their value).

    Detectors read ``current`` values through it, so suggestions name what the config says
    now.
    """

    def __init__(self, config: Any) -> None:
        self._config = config
        self._names = tuple(f.name for f in dataclasses.fields(config)) if dataclasses.is_dataclass(config) else ()

    def __getitem__(self, key: str) -> Any:
        if key not in self._names:
            raise KeyError(key)
        value = getattr(self._config, key)
        return value.value if isinstance(value, enum.Enum) else value

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-friendly dict of a config (``TrainingArguments.to_dict`` when available)."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        return dict(to_dict())
    return dict(ConfigView(config))
