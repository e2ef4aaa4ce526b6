"""SFTTrainer with diagnostics: problems caught before training, divergence stopped with a
checkpoint, doctor reproducing the run, and healthy runs that stay silent."""

from __future__ import annotations

import argparse
import json
import os

import pytest
from datasets import Dataset

from honelm.cli import doctor
from honelm.diagnostics import DiagnosticError, DiagnosticsCallback
from honelm.diagnostics.doctor import load_run, replay
from honelm.methods.sft import SFTConfig, SFTTrainer
from honelm.testing import arithmetic_dataset, tiny_model, tiny_tokenizer

# A chat template that never closes the assistant turn with an end-of-turn token.
NO_EOS_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def _config(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no",
        logging_steps=1, per_device_train_batch_size=8, learning_rate=3e-3, seed=0, data_seed=0,
    )
    defaults.update(kwargs)
    return SFTConfig(**defaults)


def _serious(events):
    return [e for e in events if e.severity != "info" and e.status != "resolved"]


def test_dataset_without_eos_is_caught_before_training(tmp_path, capsys):
    model, _ = tiny_model()
    tok = tiny_tokenizer(chat_template=NO_EOS_TEMPLATE)
    seen = []
    trainer = SFTTrainer(model, _config(tmp_path), train_dataset=arithmetic_dataset(n=16), processing_class=tok,
                         callbacks=[DiagnosticsCallback(on_diagnostic=seen.append)])
    [event] = seen  # reported when the trainer is built, before any step
    assert (event.code, event.severity, event.step) == ("DATA_MISSING_EOS", "error", 0)
    assert event.evidence["rows_missing_eos"] == 16 and event.evidence["example_rows"][0] == 0
    assert "never learn to stop" in event.message and "ends with '...assistant: " in event.message
    assert "[ERROR] DATA_MISSING_EOS at step 0" in capsys.readouterr().err
    assert trainer.diagnostics.events == seen
    args = _config(tmp_path, output_dir=str(tmp_path / "stopped"), diagnostics_stop_on="error")
    with pytest.raises(DiagnosticError, match="DATA_MISSING_EOS"):  # the same, set to stop
        SFTTrainer(model, args, train_dataset=arithmetic_dataset(n=16), processing_class=tok)
    assert not os.path.exists(tmp_path / "stopped")  # nothing written


def test_pretokenized_rows_without_eos_are_caught(tmp_path):
    model, tok = tiny_model()
    ids = tok("What is 2 + 2? 4", add_special_tokens=False)["input_ids"]
    data = Dataset.from_dict({"input_ids": [ids] * 8})
    args = _config(tmp_path, dataset_kwargs={"skip_prepare_dataset": True}, diagnostics_stop_on="error")
    with pytest.raises(DiagnosticError, match="DATA_MISSING_EOS"):
        SFTTrainer(model, args, train_dataset=data, processing_class=tok)
    fixed = Dataset.from_dict({"input_ids": [ids + [tok.eos_token_id]] * 8})
    trainer = SFTTrainer(model, args, train_dataset=fixed, processing_class=tok)
    assert trainer.diagnostics.events == []


def test_learning_rate_of_1_diverges_and_stop_on_critical_saves_a_checkpoint(tmp_path, capsys):
    model, tok = tiny_model()
    args = _config(tmp_path, learning_rate=1.0, max_steps=30, diagnostics_stop_on="critical")
    trainer = SFTTrainer(model, args, train_dataset=arithmetic_dataset(n=64), processing_class=tok)
    trainer.train()
    stopped = trainer.diagnostics.stopped_by
    assert stopped.code == "LOSS_DIVERGING" and stopped.severity == "critical"
    step = trainer.state.global_step
    assert step == stopped.step and step < 10  # stopped within a few steps, not at max_steps
    suggestion = stopped.suggestions[0]
    assert (suggestion.param, suggestion.current, suggestion.proposed) == ("learning_rate", 1.0, 0.1)
    checkpoint = tmp_path / "out" / f"checkpoint-{step}"
    assert (checkpoint / "model.safetensors").exists() and (checkpoint / "trainer_state.json").exists()
    err = capsys.readouterr().err
    assert f"stopping training at step {step} because of LOSS_DIVERGING" in err
    assert f"checkpoint saved to {checkpoint}" in err
    recorded = [json.loads(line) for line in (tmp_path / "out" / "diagnostics.jsonl").read_text().splitlines()]
    assert [(e["code"], e["status"], e["step"]) for e in recorded] == [("LOSS_DIVERGING", "new", step)]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert max(losses) > 2 * losses[0]  # it did diverge


def test_doctor_reproduces_the_events_of_the_run(tmp_path, capsys):
    model, tok = tiny_model()
    # Divergence at lr 1.0, plus a pre-flight finding: rows of very different lengths padded together.
    data = Dataset.from_dict({"text": [f"Row {i} says" + " hello" * (1 + 7 * (i % 5)) for i in range(40)]})
    args = _config(tmp_path, learning_rate=1.0, max_steps=20)
    trainer = SFTTrainer(model, args, train_dataset=data, processing_class=tok)
    trainer.train()
    recorded = [json.loads(line) for line in (tmp_path / "out" / "diagnostics.jsonl").read_text().splitlines()]
    codes = [(e["code"], e["status"]) for e in recorded]
    assert codes[0] == ("DATA_PADDING_WASTE", "new") and ("LOSS_DIVERGING", "new") in codes
    replayed = replay(load_run(str(tmp_path / "out")))
    assert [json.loads(e.to_json()) for e in replayed.events] == recorded
    assert [e.code for e in replayed.active_events()] == [e.code for e in trainer.diagnostics.engine.active_events()]
    # The command prints the same events for programs.
    parser = argparse.ArgumentParser()
    doctor.add_arguments(parser)
    capsys.readouterr()  # the training logs
    assert doctor.run(parser.parse_args([str(tmp_path / "out"), "--json"])) == 0
    assert json.loads(capsys.readouterr().out)["events"] == recorded


def test_healthy_toy_runs_raise_no_warning(tmp_path):
    model, tok = tiny_model(hidden_size=96, intermediate_size=192)
    seen = []
    args = _config(tmp_path, max_steps=60, per_device_train_batch_size=25, lr_scheduler_type="constant",
                   eval_strategy="steps", eval_steps=20)
    trainer = SFTTrainer(model, args, train_dataset=arithmetic_dataset(max_operand=4),
                         eval_dataset=arithmetic_dataset(max_operand=4, seed=1), processing_class=tok,
                         callbacks=[DiagnosticsCallback(on_diagnostic=seen.append)])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.5 * losses[0]  # it learned
    assert _serious(seen) == []
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h["diagnostics/warning"] == h["diagnostics/error"] == h["diagnostics/critical"] == 0 for h in logged)
    for kwargs in ({"packing": True, "max_length": 64}, {"padding_free": True}, {"loss_type": "dft"}):
        seen.clear()
        model, tok = tiny_model()
        args = _config(tmp_path / str(kwargs), max_steps=15, learning_rate=1e-2, **kwargs)
        trainer = SFTTrainer(model, args, train_dataset=arithmetic_dataset(n=64), processing_class=tok,
                             callbacks=[DiagnosticsCallback(on_diagnostic=seen.append)])
        trainer.train()
        assert _serious(seen) == [], kwargs


def test_moe_runs_log_the_router_loss(tmp_path):
    model, tok = tiny_model("qwen2_moe")
    trainer = SFTTrainer(model, _config(tmp_path, max_steps=3), train_dataset=arithmetic_dataset(n=24),
                         processing_class=tok)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h["aux_loss"] > 0 for h in logged)
    assert _serious(trainer.diagnostics.events) == []


def test_diagnostics_off(tmp_path):
    model, _ = tiny_model()
    tok_no_eos = tiny_tokenizer(chat_template=NO_EOS_TEMPLATE)
    args = _config(tmp_path, max_steps=2, diagnostics=False, diagnostics_stop_on="error")
    trainer = SFTTrainer(model, args, train_dataset=arithmetic_dataset(n=16), processing_class=tok_no_eos)
    assert trainer.diagnostics is None
    assert not any(isinstance(c, DiagnosticsCallback) for c in trainer.callback_handler.callbacks)
    trainer.train()
    assert not os.path.exists(tmp_path / "out" / "diagnostics.jsonl")
    assert all("diagnostics/warning" not in h for h in trainer.state.log_history)


def test_config_fields_are_checked(tmp_path):
    with pytest.raises(ValueError, match="diagnostics_silence: unknown diagnostic code 'LOSS_FLATT'. Did you mean"):
        _config(tmp_path, diagnostics_silence=["LOSS_FLATT"])
    with pytest.raises(ValueError, match="has no threshold 'factr'"):
        _config(tmp_path, diagnostics_thresholds={"GRAD_NORM_SPIKE": {"factr": 3}})
    with pytest.raises(ValueError, match="diagnostics_stop_on='warning' is not supported"):
        _config(tmp_path, diagnostics_stop_on="warning")
    config = _config(tmp_path, diagnostics_silence="loss_flat,DATA_PADDING_WASTE", diagnostics_stop_on="none",
                     diagnostics_thresholds='{"GRAD_NORM_SPIKE": 20}')
    assert config.diagnostics_silence == ["LOSS_FLAT", "DATA_PADDING_WASTE"]
    assert config.diagnostics_stop_on is None
    assert config.diagnostics_thresholds == {"GRAD_NORM_SPIKE": {"factor": 20.0}}
    json.loads(config.to_json_string())


def test_config_fields_are_command_line_flags(tmp_path):
    import argparse

    from honelm.cli.args import add_config_arguments, build_configs, resolve_values

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, SFTConfig, method="SFT")
    args = parser.parse_args([
        "--output_dir", str(tmp_path), "--use_cpu", "--diagnostics_stop_on", "critical",
        "--diagnostics_silence", "DATA_PADDING_WASTE", "SYS_LOW_MEMORY_USE",
        "--diagnostics_thresholds", '{"LOSS_DIVERGING": {"ratio": 3}}', "--no_diagnostics",
    ])
    _, config = build_configs(resolve_values(args, SFTConfig, "SFT"), SFTConfig)
    assert config.diagnostics is False and config.diagnostics_stop_on == "critical"
    assert config.diagnostics_silence == ["DATA_PADDING_WASTE", "SYS_LOW_MEMORY_USE"]
    assert config.diagnostics_thresholds == {"LOSS_DIVERGING": {"ratio": 3}}
    none = parser.parse_args(["--output_dir", str(tmp_path), "--diagnostics_stop_on", "none"])
    assert build_configs(resolve_values(none, SFTConfig, "SFT"), SFTConfig)[1].diagnostics_stop_on is None
