"""The monitor callback: sinks (console, JSONL, metrics, hooks), stopping, and any Trainer."""

from __future__ import annotations

import json
import os

import pytest
from diag_streams import sft_healthy, train_entries, with_values
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from honelm.diagnostics import DiagnosticError, DiagnosticsCallback, attach_diagnostics
from honelm.diagnostics.doctor import load_run, replay


def _args(tmp_path, **kwargs):
    return TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to="none", **kwargs)


def _drive(callback, args, entries, state=None, control=None):
    """Feed ``entries`` to ``callback`` as transformers.Trainer does: one optimizer step then one log each."""
    state = state or TrainerState()
    control = control or TrainerControl()
    callback.on_train_begin(args, state, control)
    logged = []
    for entry in entries:
        state.global_step = entry["step"]
        callback.on_step_begin(args, state, control)
        callback.on_step_end(args, state, control)
        logs = {k: v for k, v in entry.items() if k != "step"}
        state.log_history.append({**logs, "step": state.global_step})
        callback.on_log(args, state, control, logs=logs)
        logged.append(logs)
        if control.should_training_stop:
            break
    callback.on_train_end(args, state, control)
    return state, control, logged


def _diverging(n=12):
    values = [8.0, 7.0, 6.0, 5.0] + [40.0] * (n - 4)
    return train_entries(with_values(sft_healthy(n, eval_every=0), "loss", values))[:n]


def test_sinks_console_jsonl_metrics_and_hooks(tmp_path, capsys):
    args = _args(tmp_path, learning_rate=1.0)
    seen = []

    class Watcher(TrainerCallback):
        def on_diagnostic(self, args, state, control, event=None, **kwargs):
            seen.append(("callback", event.code, event.status))

    callback = DiagnosticsCallback(on_diagnostic=lambda e: seen.append(("fn", e.code, e.status)))
    callback.setup(args, method="sft", handler=type("H", (), {"callbacks": [callback, Watcher()]})())
    state, control, logged = _drive(callback, args, _diverging(40))
    err = capsys.readouterr().err
    # Console: the first report, then at growing intervals, not at every one of the 35 detections.
    assert err.count("[CRITICAL] LOSS_DIVERGING") == 6 and "at step 6:" in err
    assert "training ended with 1 active problem(s): LOSS_DIVERGING (critical)" in err
    # JSONL: the same events, one per line.
    lines = (tmp_path / "run" / "diagnostics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [e.to_dict() for e in callback.events]
    assert json.loads(lines[0])["suggestions"][0] == {"param": "learning_rate", "current": 1.0, "proposed": 0.1,
                                                      "reason": "the loss diverges at the current rate"}
    # Hooks: the function and the callback's on_diagnostic, for every event.
    assert seen == [(kind, e.code, e.status) for e in callback.events for kind in ("fn", "callback")]
    # Metrics: counters and timing in the logs and in the log history.
    assert logged[0]["diagnostics/critical"] == 0 and logged[10]["diagnostics/critical"] == 1
    assert state.log_history[10]["diagnostics/critical"] == 1 and "timing/step" in state.log_history[10]
    assert not control.should_training_stop  # no stop_on: report only
    # Files for doctor: the context and the final trainer_state.json.
    context = json.loads((tmp_path / "run" / "diagnostics_context.json").read_text())
    assert context["config"]["learning_rate"] == 1.0 and context["machine"]["accelerator"] == "cpu"
    assert json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"] == state.log_history


def test_replay_of_the_saved_run_reproduces_its_events(tmp_path):
    args = _args(tmp_path, learning_rate=1.0)
    callback = DiagnosticsCallback(console=False).setup(args, method="sft")
    _drive(callback, args, _diverging(30) + train_entries(sft_healthy(40, eval_every=0))[30:])
    recorded = [json.loads(line) for line in (tmp_path / "run" / "diagnostics.jsonl").read_text().splitlines()]
    statuses = [e["status"] for e in recorded]
    assert statuses[0] == "new" and statuses[-1] == "resolved"
    replayed = replay(load_run(str(tmp_path / "run")))
    assert [json.loads(e.to_json()) for e in replayed.events] == recorded


@pytest.mark.parametrize("stop_on, stops", [("critical", True), ("error", True), (None, False)])
def test_stop_on_asks_for_a_checkpoint_then_stops(tmp_path, capsys, stop_on, stops):
    args = _args(tmp_path)
    callback = DiagnosticsCallback(stop_on=stop_on).setup(args)
    state, control, logged = _drive(callback, args, _diverging(20))
    assert control.should_training_stop is stops and control.should_save is stops
    assert (len(logged) == 6) is stops  # stopped at the first detection
    if stops:
        assert callback.stopped_by.code == "LOSS_DIVERGING"
        assert "stopping training at step 6 because of LOSS_DIVERGING" in capsys.readouterr().err


def test_explicit_settings_win_over_the_config(tmp_path):
    args = _args(tmp_path)
    args.diagnostics_silence = ["GRAD_NORM_SPIKE"]  # as a honelm config would carry it
    callback = DiagnosticsCallback(silence=["LOSS_DIVERGING"]).setup(args)
    assert callback.engine.silence == {"LOSS_DIVERGING"}
    assert DiagnosticsCallback().setup(args).engine.silence == {"GRAD_NORM_SPIKE"}


def test_preflight_error_stops_before_training(tmp_path):
    from datasets import Dataset

    from honelm.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    data = Dataset.from_dict({"input_ids": [[5, 6, 7]] * 8})  # no EOS anywhere
    args = _args(tmp_path)
    callback = DiagnosticsCallback(stop_on="error", console=False).setup(args, method="sft")
    with pytest.raises(DiagnosticError, match="DATA_MISSING_EOS") as caught:
        callback.run_preflight(args, dataset=data, tokenizer=tok)
    assert [e.code for e in caught.value.events] == ["DATA_MISSING_EOS"]
    assert not os.path.exists(tmp_path / "run")


def test_attach_reuses_the_users_callback_and_runs_first(tmp_path):
    from transformers import Trainer

    from honelm.testing import tiny_model

    model, _ = tiny_model()
    mine = DiagnosticsCallback()
    trainer = Trainer(model=model, args=_args(tmp_path), callbacks=[mine])
    attached = attach_diagnostics(trainer, "sft")
    assert attached is mine
    names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert names[:2] == ["DefaultFlowCallback", "DiagnosticsCallback"] and names.count("DiagnosticsCallback") == 1
    trainer.args.diagnostics = False
    assert attach_diagnostics(Trainer(model=model, args=trainer.args), "sft") is None


def test_a_plain_transformers_trainer_gets_runtime_diagnostics(tmp_path):
    from transformers import Trainer

    from honelm.data import DataCollatorForLanguageModeling, tokenize_dataset
    from honelm.testing import arithmetic_dataset, tiny_model

    model, tok = tiny_model()
    data, _ = tokenize_dataset(arithmetic_dataset(n=16), tok)
    events = []
    args = _args(tmp_path, max_steps=6, logging_steps=1, learning_rate=1.0, per_device_train_batch_size=8,
                 disable_tqdm=True, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      data_collator=DataCollatorForLanguageModeling(tok.pad_token_id),
                      callbacks=[DiagnosticsCallback(on_diagnostic=events.append, console=False)])
    trainer.train()
    assert [e.code for e in events if e.status == "new"] == ["LOSS_DIVERGING"]
    assert all("timing/step" in h for h in trainer.state.log_history if "loss" in h)


def test_step_meter_splits_waiting_for_data_from_computing():
    import time

    import torch

    from honelm.diagnostics.machine import StepMeter, machine_info

    meter = StepMeter(torch.device("cpu"))
    assert meter.window() == {}  # no step yet
    for _ in range(2):
        meter.mark()
        time.sleep(0.06)  # the data loader
        meter.step_begin()
        time.sleep(0.02)  # forward, backward, optimizer
        meter.step_end()
    window = meter.window()
    assert set(window) == {"timing/step", "timing/data"}  # memory metrics only on CUDA
    assert window["timing/data"] >= 0.05 and 0.015 <= window["timing/step"] < window["timing/data"]
    assert meter.window() == {}  # the window was reset
    assert machine_info(torch.device("cpu")) == {"accelerator": "cpu"}
