"""The monitor: a ``transformers.TrainerCallback`` that runs the diagnostics during training.

At every log it measures the machine (:mod:`~honelm.diagnostics.machine`), feeds the new log
entries to the :class:`~honelm.diagnostics.engine.Diagnostician`, and sends the events to
its sinks:

- the console (stderr, main process): readable, rate-limited by the engine;
- ``<output_dir>/diagnostics.jsonl``: one event per line (main process), next to
  ``diagnostics_context.json`` (the config, thresholds, machine and model facts a replay
  needs); ``trainer_state.json`` is written to ``output_dir`` at the end of training;
- the logged metrics: ``diagnostics/info``, ``diagnostics/warning``, ``diagnostics/error``,
  ``diagnostics/critical`` count the problems active at each log;
- hooks: functions ``fn(event)`` given as ``on_diagnostic`` or with :meth:`add_hook`, and
  any trainer callback with a method ``on_diagnostic(args, state, control, event=...)``
  (which may set ``control.should_training_stop``).

With ``diagnostics_stop_on="critical"`` (or ``"error"``) a problem of that severity stops
training after saving a checkpoint; found before training, it raises :class:`DiagnosticError`.

A trainer wires it in with one call, after ``Trainer.__init__``::

    self.diagnostics = attach_diagnostics(self, method="sft", dataset=tokenized_train,
                                          tokenizer=tokenizer, collator=self.data_collator)
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import DefaultFlowCallback

from .codes import parse_overrides, parse_silence, parse_stop_on
from .doctor import CONTEXT_FILE, JSONL_FILE, STATE_FILE
from .engine import Diagnostician, stops
from .events import SCHEMA_VERSION, DiagnosticEvent
from .history import ConfigView, config_to_dict, entry_kind

_UNSET: Any = object()


class DiagnosticError(RuntimeError):
    """Raised before training when a pre-flight problem reaches ``diagnostics_stop_on``."""

    def __init__(self, events: list[DiagnosticEvent], stop_on: str) -> None:
        self.events = events
        details = "\n".join(e.format() for e in events)
        super().__init__(
            f"honelm diagnostics stopped the run before training (diagnostics_stop_on={stop_on!r}):\n{details}\n"
            "Fix the problem above, or set diagnostics_stop_on=None (report only) or silence the code with "
            "diagnostics_silence."
        )


class DiagnosticsCallback(TrainerCallback):
    """Watches a training run and reports recognized problems (see the module docstring).

    Settings left unset are read from the trainer's config (``diagnostics_thresholds``,
    ``diagnostics_silence``, ``diagnostics_stop_on``); any ``transformers.Trainer`` works.

    Args:
        on_diagnostic: A function called with each :class:`DiagnosticEvent`.
        thresholds, silence, stop_on: Override the config's settings.
        console: Print events to stderr (main process).
        write_files: Write ``diagnostics.jsonl``, ``diagnostics_context.json`` and the final
            ``trainer_state.json`` to ``output_dir`` (main process).
    """

    def __init__(
        self,
        on_diagnostic: Callable[[DiagnosticEvent], Any] | None = None,
        *,
        thresholds: Mapping[str, Any] | None = _UNSET,
        silence: Iterable[str] | None = _UNSET,
        stop_on: str | None = _UNSET,
        console: bool = True,
        write_files: bool = True,
    ) -> None:
        self._hooks: list[Callable[[DiagnosticEvent], Any]] = [on_diagnostic] if on_diagnostic else []
        self._explicit = {"thresholds": thresholds, "silence": silence, "stop_on": stop_on}
        self.console = console
        self.write_files = write_files
        self.engine: Diagnostician | None = None
        self.stop_on: str | None = None
        self.stopped_by: DiagnosticEvent | None = None
        self.method = ""
        self._handler: Any = None
        self._meter: Any = None
        self._seen = 0
        self._pending: list[DiagnosticEvent] = []  # pre-flight events not yet written to the JSONL
        self._jsonl: Any = None
        self._context: dict[str, Any] = {}

    # ---- setup ----------------------------------------------------------------------------

    def setup(self, args: Any, *, method: str = "", model: Any = None, handler: Any = None) -> DiagnosticsCallback:
        """Build the engine from ``args`` (the trainer's config); called by :func:`attach_diagnostics`."""
        from .preflight import model_facts

        def setting(name: str, field: str) -> Any:
            value = self._explicit[name]
            return getattr(args, field, None) if value is _UNSET else value

        thresholds = parse_overrides(setting("thresholds", "diagnostics_thresholds"))
        silence = parse_silence(setting("silence", "diagnostics_silence"))
        self.stop_on = parse_stop_on(setting("stop_on", "diagnostics_stop_on"))
        facts = model_facts(model) if model is not None else {}
        self.method = method
        self.engine = Diagnostician(ConfigView(args), thresholds=thresholds, silence=silence, model=facts,
                                    method=method)
        self._handler = handler if handler is not None else self._handler
        self._context = {"schema_version": SCHEMA_VERSION, "method": method, "thresholds": thresholds,
                         "silence": list(silence), "stop_on": self.stop_on, "model": facts}
        return self

    def add_hook(self, fn: Callable[[DiagnosticEvent], Any], *, replay: bool = False) -> None:
        """Call ``fn(event)`` for each event from now on (and for the past ones with ``replay``)."""
        self._hooks.append(fn)
        if replay and self.engine is not None:
            for event in self.engine.events:
                fn(event)

    @property
    def events(self) -> list[DiagnosticEvent]:
        """Every event emitted so far (new, ongoing and resolved), in order."""
        return list(self.engine.events) if self.engine is not None else []

    # ---- pre-flight -----------------------------------------------------------------------

    def run_preflight(self, args: Any, state: Any = None, control: Any = None, **inputs: Any) -> list[DiagnosticEvent]:
        """Run the pre-flight checks on ``inputs`` (see :func:`~honelm.diagnostics.preflight.preflight_input`).

        Events are reported at once; they are written to the JSONL when training starts.
        Raises :class:`DiagnosticError` when one reaches ``stop_on``.
        """
        from .preflight import run_preflight

        assert self.engine is not None, "call setup() first"
        inputs.setdefault("world_size", getattr(args, "world_size", 1))
        findings = run_preflight(self.engine.config, self.engine.thresholds, method=self.method, **inputs)
        events = self.engine.add_preflight(findings)
        self._pending.extend(events)
        self._emit(events, args, state, control, main=getattr(args, "process_index", 0) == 0)
        blocking = [e for e in events if stops(e, self.stop_on)]
        if blocking:
            raise DiagnosticError(blocking, self.stop_on or "")
        return events

    # ---- sinks ----------------------------------------------------------------------------

    def _emit(self, events: list[DiagnosticEvent], args: Any, state: Any, control: Any, *, main: bool) -> None:
        for event in events:
            if main and self.console:
                print(event.format(), file=sys.stderr, flush=True)
            if main and self._jsonl is not None:
                self._write(event)
            for hook in self._hooks:
                hook(event)
            for callback in getattr(self._handler, "callbacks", ()):
                method = getattr(callback, "on_diagnostic", None)
                if callback is not self and callable(method):
                    method(args, state, control, event=event)

    def _write(self, event: DiagnosticEvent) -> None:
        self._jsonl.write(event.to_json() + "\n")
        self._jsonl.flush()

    def _open_files(self, args: Any, state: Any) -> None:
        if not (self.write_files and args.should_save and args.output_dir):
            return
        os.makedirs(args.output_dir, exist_ok=True)
        path = os.path.join(args.output_dir, JSONL_FILE)
        resumed = state.global_step > 0 and os.path.exists(path)
        self._jsonl = open(path, "a" if resumed else "w", encoding="utf-8")  # noqa: SIM115 - closed at train end
        if not resumed:
            for event in self._pending:
                self._write(event)
        self._pending = []
        machine = self.engine.machine if self.engine else {}
        context = {**self._context, "config": _jsonable_config(args), "machine": machine}
        with open(os.path.join(args.output_dir, CONTEXT_FILE), "w", encoding="utf-8") as f:
            json.dump(context, f, indent=1, default=str)

    # ---- TrainerCallback events -----------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        from .machine import StepMeter, machine_info

        if self.engine is None:  # added to a plain transformers.Trainer
            self.setup(args, model=model)
        assert self.engine is not None
        self.engine.machine.update(machine_info(args.device), num_processes=getattr(args, "world_size", 1))
        self._meter = StepMeter(args.device)
        self._meter.mark()
        self._open_files(args, state)
        if state.global_step == 0 and self._seen:  # train() called again on the same trainer
            self.engine.reset()
            self._seen = 0
        # Resuming from a checkpoint: catch up with the restored history without reporting it again.
        for entry in state.log_history[self._seen :]:
            self.engine.observe(entry)
        self._seen = len(state.log_history)
        return control

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self._meter is not None:
            self._meter.step_begin()
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self._meter is not None:
            self._meter.step_end()
        return control

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        if self.engine is None or logs is None:
            return control
        latest = state.log_history[-1] if state.log_history else None
        kind = entry_kind(logs)
        if kind == "train" and self._meter is not None:
            measured = self._meter.window()
            logs.update(measured)
            if latest is not None:
                latest.update(measured)
        events = []
        for entry in state.log_history[self._seen :]:
            events.extend(self.engine.observe(entry))
        self._seen = len(state.log_history)
        self._emit(events, args, state, control, main=state.is_world_process_zero)
        self._maybe_stop(events, args, state, control)
        if kind == "train":
            counters = {f"diagnostics/{k}": v for k, v in self.engine.active_counts().items()}
            logs.update(counters)
            if latest is not None:
                latest.update(counters)
        if self._meter is not None:
            self._meter.mark()
        return control

    def _maybe_stop(self, events: list[DiagnosticEvent], args: Any, state: Any, control: Any) -> None:
        if self.stopped_by is not None:
            return
        event = next((e for e in events if stops(e, self.stop_on)), None)
        if event is None:
            return
        self.stopped_by = event
        control.should_save = True  # the Trainer saves a checkpoint right after this log
        control.should_training_stop = True
        if state.is_world_process_zero and self.console:
            print(f"honelm diagnostics: stopping training at step {state.global_step} because of {event.code} "
                  f"({event.severity}; diagnostics_stop_on={self.stop_on!r}); saving a checkpoint first.",
                  file=sys.stderr, flush=True)

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self._meter is not None:
            self._meter.mark()
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self._meter is not None:
            self._meter.mark()
        if self.stopped_by is not None and state.is_world_process_zero and self.console:
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            print(f"honelm diagnostics: checkpoint saved to {path}.", file=sys.stderr, flush=True)
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
            state.save_to_json(os.path.join(args.output_dir, STATE_FILE))
        if self.engine is not None and state.is_world_process_zero and self.console:
            serious = [e for e in self.engine.active_events() if e.severity != "info"]
            if serious:
                names = ", ".join(f"{e.code} ({e.severity})" for e in serious)
                print(f"honelm diagnostics: training ended with {len(serious)} active problem(s): {names}. "
                      f"Report: honelm doctor {args.output_dir}", file=sys.stderr, flush=True)
        return control


def _jsonable_config(args: Any) -> dict[str, Any]:
    config = config_to_dict(args)
    return json.loads(json.dumps(config, default=str))


def attach_diagnostics(
    trainer: Any, method: str = "", *, output_dir_existed: bool = True, **preflight_inputs: Any
) -> DiagnosticsCallback | None:
    """Wire diagnostics into ``trainer`` (call at the end of a trainer's ``__init__``).

    Does nothing and returns None when ``trainer.args.diagnostics`` is False. Otherwise uses
    the :class:`DiagnosticsCallback` the user passed in ``callbacks`` (or a new one), places it
    before the reporting callbacks (so the logged counters reach them), and, when
    ``preflight_inputs`` are given (``dataset``, ``tokenizer``, ``collator``,
    ``truncation_stats``, ``model``, ``teacher_tokenizer``), runs the pre-flight checks.

    When they stop the run (:class:`DiagnosticError`) and ``output_dir_existed`` is False
    (``os.path.isdir(args.output_dir)`` read before ``Trainer.__init__``, which creates it),
    the still-empty output directory is removed: nothing is left behind.
    """
    args = trainer.args
    if not getattr(args, "diagnostics", True):
        return None
    handler = trainer.callback_handler
    callback = next((c for c in handler.callbacks if isinstance(c, DiagnosticsCallback)), None)
    if callback is None:
        callback = DiagnosticsCallback()
    else:
        handler.callbacks.remove(callback)
    position = next((i for i, c in enumerate(handler.callbacks) if not isinstance(c, DefaultFlowCallback)),
                    len(handler.callbacks))
    handler.callbacks.insert(position, callback)
    model = preflight_inputs.pop("model", None) or getattr(trainer, "model", None)
    callback.setup(args, method=method, model=model, handler=handler)
    if preflight_inputs:
        try:
            callback.run_preflight(args, trainer.state, trainer.control, model=model, **preflight_inputs)
        except DiagnosticError:
            output_dir = args.output_dir
            if not output_dir_existed and output_dir and os.path.isdir(output_dir) and not os.listdir(output_dir):
                os.rmdir(output_dir)
            raise
    return callback
