"""DPOTrainer with diagnostics: swapped chosen/rejected columns caught and training stopped,
pre-flight checks reading the preference columns, doctor reproducing the run, and a healthy
run that stays silent."""

from __future__ import annotations

import argparse
import json
import os

import pytest
from datasets import Dataset
from dpo_helpers import addition_preferences, config, logs

from honelm.cli import doctor
from honelm.diagnostics import DiagnosticError, DiagnosticsCallback
from honelm.diagnostics.doctor import load_run, replay
from honelm.methods.dpo import DataCollatorForPreference, DPOConfig, DPOTrainer
from honelm.testing import tiny_model


def _serious(events):
    return [e for e in events if e.severity != "info" and e.status != "resolved"]


def _codes(events):
    return [(e.code, e.severity) for e in events]


def test_healthy_run_raises_no_warning(tmp_path):
    model, tok = tiny_model()
    seen = []
    # beta=0.5 keeps the policy near the reference: the chosen answers keep their likelihood.
    args = config(tmp_path, max_steps=40, per_device_train_batch_size=16, per_device_eval_batch_size=48,
                  learning_rate=2e-3, beta=0.5, eval_strategy="steps", eval_steps=10)
    trainer = DPOTrainer(model, args=args, train_dataset=addition_preferences("train"),
                         eval_dataset=addition_preferences("test"), processing_class=tok,
                         callbacks=[DiagnosticsCallback(on_diagnostic=seen.append)])
    trainer.train()
    history = logs(trainer)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"] and history[-1]["rewards/accuracies"] > 0.8  # it learned
    assert history[-1]["logps/chosen"] > history[0]["logps/chosen"] - 1.0
    evals = [h["eval_rewards/accuracies"] for h in logs(trainer, "eval_rewards/accuracies")]
    assert evals[-1] >= 0.75 and max(evals) >= 0.9, evals
    assert _serious(seen) == []
    assert all(h["diagnostics/warning"] == h["diagnostics/error"] == h["diagnostics/critical"] == 0 for h in history)
    assert os.path.exists(tmp_path / "out" / "diagnostics.jsonl")


def test_likelihood_displacement_is_reported_with_its_fixes(tmp_path):
    """At beta=0.1 and a high learning rate the margin grows by pushing the chosen answers down as well."""
    model, tok = tiny_model()
    args = config(tmp_path, max_steps=30, per_device_train_batch_size=16, learning_rate=3e-3)
    trainer = DPOTrainer(model, args=args, train_dataset=addition_preferences("train"), processing_class=tok)
    trainer.train()
    [event] = [e for e in trainer.diagnostics.events if e.code == "PREF_LIKELIHOOD_DISPLACEMENT"]
    first, last = logs(trainer)[:3], logs(trainer)[-3:]

    def mean(entries, key):
        return sum(h[key] for h in entries) / len(entries)

    assert mean(last, "rewards/margins") > mean(first, "rewards/margins") + 0.2  # the margin grows...
    assert mean(last, "logps/chosen") < mean(first, "logps/chosen") - 2.0  # ...while the chosen answers fall
    assert event.severity == "warning" and event.evidence["chosen_now"] < event.evidence["chosen_start"] - 2.0
    assert [(s.param, s.current, s.proposed) for s in event.suggestions] == [("rpo_alpha", None, 1.0),
                                                                             ("beta", 0.1, 0.2)]


def test_swapped_columns_are_caught_on_held_out_pairs_and_stop_training(tmp_path, capsys):
    """Trained on pairs whose chosen and rejected columns are swapped, the policy learns to prefer the wrong
    sums: on correctly labeled held-out pairs its accuracy falls below chance, which stops the run."""
    model, tok = tiny_model()
    swapped = addition_preferences("train").rename_columns({"chosen": "rejected", "rejected": "chosen"})
    args = config(tmp_path, max_steps=60, per_device_train_batch_size=16, per_device_eval_batch_size=48,
                  learning_rate=3e-3, eval_strategy="steps", eval_steps=2, diagnostics_stop_on="error")
    trainer = DPOTrainer(model, args=args, train_dataset=swapped, eval_dataset=addition_preferences("test"),
                         processing_class=tok)
    trainer.train()
    stopped = trainer.diagnostics.stopped_by
    assert (stopped.code, stopped.severity, stopped.subject) == ("PREF_ACCURACY_BELOW_CHANCE", "error", "eval")
    assert "columns are likely swapped" in stopped.message
    assert stopped.evidence["metric"] == "eval_rewards/accuracies" and stopped.evidence["mean_margin"] < 0
    # The check needs 10 evaluations; it fires at the first chance and training stops there.
    assert trainer.state.global_step == stopped.step == 20
    assert (tmp_path / "out" / "checkpoint-20" / "trainer_state.json").exists()
    assert "stopping training at step 20 because of PREF_ACCURACY_BELOW_CHANCE" in capsys.readouterr().err

    # diagnostics.jsonl holds every event; `honelm doctor` replays the saved history to the same events.
    out = tmp_path / "out"
    recorded = [json.loads(line) for line in (out / "diagnostics.jsonl").read_text().splitlines()]
    assert ("PREF_ACCURACY_BELOW_CHANCE", "new", 20) in [(e["code"], e["status"], e["step"]) for e in recorded]
    assert recorded == [json.loads(e.to_json()) for e in trainer.diagnostics.events]
    run = load_run(str(out))
    assert run.method == "dpo"
    assert [json.loads(e.to_json()) for e in replay(run).events] == recorded
    parser = argparse.ArgumentParser()
    doctor.add_arguments(parser)
    assert doctor.run(parser.parse_args([str(out), "--json"])) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["events"] == recorded


def test_length_bias_of_the_pairs_is_reported_before_training(tmp_path):
    model, tok = tiny_model()
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for a in range(5):
        for b in range(5):
            rows["prompt"].append(f"What is {a} + {b}?")
            rows["chosen"].append(f" {a} + {b} makes {a + b}, counting up from {a}.")  # long, and right
            rows["rejected"].append(f" {a + b + 1}.")
    seen = []
    trainer = DPOTrainer(model, args=config(tmp_path, padding_free=True), train_dataset=Dataset.from_dict(rows),
                         processing_class=tok, callbacks=[DiagnosticsCallback(on_diagnostic=seen.append)])
    [event] = seen
    assert (event.code, event.severity, event.step) == ("PREF_LENGTH_BIAS", "warning", 0)
    assert event.evidence["chosen_longer"] == event.evidence["pairs"] == 25
    assert [(s.param, s.current, s.proposed) for s in event.suggestions] == [("ld_alpha", None, 0.5)]
    assert trainer.diagnostics.events == seen


def test_pretokenized_pairs_without_eos_stop_before_anything_is_written(tmp_path):
    model, tok = tiny_model()
    prompt = tok("What is 2 + 2?", add_special_tokens=False)["input_ids"]
    four, five = (tok(f" {n}", add_special_tokens=False)["input_ids"] for n in (4, 5))
    rows = {"prompt_input_ids": [prompt] * 8, "chosen_input_ids": [four] * 8, "rejected_input_ids": [five] * 8}
    args = config(tmp_path, output_dir=str(tmp_path / "new"), diagnostics_stop_on="error")
    with pytest.raises(DiagnosticError, match="DATA_MISSING_EOS") as error:
        DPOTrainer(model, args=args, train_dataset=Dataset.from_dict(rows), processing_class=tok)
    [event] = error.value.events
    assert event.evidence["rows_missing_eos"] == 16  # every chosen and every rejected completion
    assert not os.path.exists(tmp_path / "new")  # no empty output directory left behind
    eos = [tok.eos_token_id]
    fixed = {"prompt_input_ids": [prompt] * 8, "chosen_input_ids": [four + eos] * 8,
             "rejected_input_ids": [five + eos] * 8}
    trainer = DPOTrainer(model, args=args, train_dataset=Dataset.from_dict(fixed), processing_class=tok)
    assert trainer.diagnostics.events == []


class _MaskingPadCollator(DataCollatorForPreference):
    """A collator that masks labels by token id: with pad = EOS it masks every EOS too."""

    def __call__(self, examples):
        batch = super().__call__(examples)
        batch["labels"][batch["input_ids"] == self.pad_token_id] = -100
        return batch


def test_collator_that_masks_the_pad_eos_is_caught(tmp_path):
    model, tok = tiny_model()
    args = config(tmp_path, pad_token=tok.eos_token)  # pad with EOS
    masking = _MaskingPadCollator(pad_token_id=tok.eos_token_id)
    trainer = DPOTrainer(model, args=args, train_dataset=addition_preferences("train"), processing_class=tok,
                         data_collator=masking)
    [event] = trainer.diagnostics.events
    assert (event.code, event.severity) == ("DATA_EOS_MASKED_BY_PAD", "error")
    assert event.evidence["trained_eos_in_batch"] == 8 and event.evidence["kept_as_labels"] == 0  # 4 pairs
    # honelm's collator masks padding by position: the same pad token is fine.
    trainer = DPOTrainer(model, args=args, train_dataset=addition_preferences("train"), processing_class=tok)
    assert trainer.diagnostics.events == []


def test_padding_waste_counts_both_sequences_of_each_pair(tmp_path):
    model, tok = tiny_model()
    rows = {"prompt": [f"Q{i}:" + " tell me more" * (8 * (i % 2)) for i in range(32)],
            "chosen": [" 7"] * 32, "rejected": [" 8"] * 32}
    trainer = DPOTrainer(model, args=config(tmp_path), train_dataset=Dataset.from_dict(rows), processing_class=tok)
    [event] = trainer.diagnostics.events
    assert (event.code, event.severity) == ("DATA_PADDING_WASTE", "info")
    assert "batch of 4 pairs (8 sequences)" in event.message and "packing" not in event.message
    assert event.evidence["sequences_per_row"] == 2
    assert [(s.param, s.proposed) for s in event.suggestions] == [("padding_free", True)]
    trainer = DPOTrainer(model, args=config(tmp_path, padding_free=True), train_dataset=Dataset.from_dict(rows),
                         processing_class=tok)
    assert trainer.diagnostics.events == []


def test_diagnostics_off_and_config_checks(tmp_path):
    model, tok = tiny_model()
    trainer = DPOTrainer(model, args=config(tmp_path, diagnostics=False), train_dataset=addition_preferences("train"),
                         processing_class=tok)
    assert trainer.diagnostics is None
    assert not any(isinstance(c, DiagnosticsCallback) for c in trainer.callback_handler.callbacks)
    with pytest.raises(ValueError, match="DPOConfig.diagnostics_silence: unknown diagnostic code 'PREF_NO_SIGNL'"):
        DPOConfig(output_dir=str(tmp_path), diagnostics_silence=["PREF_NO_SIGNL"])
    args = DPOConfig(output_dir=str(tmp_path), diagnostics_stop_on="none", diagnostics_silence="pref_length_bias",
                     diagnostics_thresholds='{"PREF_NO_SIGNAL": 0.1}')
    assert args.diagnostics_stop_on is None and args.diagnostics_silence == ["PREF_LENGTH_BIAS"]
    assert args.diagnostics_thresholds == {"PREF_NO_SIGNAL": {"band": 0.1}}
