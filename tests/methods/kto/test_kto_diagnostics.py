"""KTOTrainer with diagnostics: a batch too small for the KL estimate, unbalanced labels and
weights, rows without EOS and a collator that masks them, all caught before training; a healthy
run that stays silent."""

from __future__ import annotations

import json
import os
import random

import pytest
from datasets import Dataset

from honelm.diagnostics import DiagnosticError, DiagnosticsCallback
from honelm.methods.kto import DataCollatorForUnpairedPreference, KTOConfig, KTOTrainer
from honelm.testing import arithmetic_dataset, tiny_model


def _config(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no",
        logging_steps=1, per_device_train_batch_size=4, per_device_eval_batch_size=4, learning_rate=1e-3, seed=0,
        data_seed=0,
    )
    defaults.update(kwargs)
    return KTOConfig(**defaults)


def _rows(split="train", seed=0, n=None, desirable_per_undesirable=1):
    """The correct sum is desirable; wrong sums are undesirable, one in ``desirable_per_undesirable`` questions."""
    data = arithmetic_dataset(n, max_operand=9, held_out_fraction=0.25, split=split, seed=seed)
    rng = random.Random(seed)
    rows = {"prompt": [], "completion": [], "label": []}
    for i, (prompt, answer) in enumerate(zip(data["prompt"], data["answer"])):
        wrong = str(int(answer) + rng.randint(10, 40))
        pairs = [(answer, True)] + ([(wrong, False)] if i % desirable_per_undesirable == 0 else [])
        for text, label in pairs:
            rows["prompt"].append(prompt)
            rows["completion"].append([{"role": "assistant", "content": text}])
            rows["label"].append(label)
    return Dataset.from_dict(rows)


def _serious(events):
    return [e for e in events if e.severity != "info" and e.status != "resolved"]


def test_healthy_run_raises_no_warning(tmp_path):
    model, tok = tiny_model()
    seen = []
    args = _config(tmp_path, max_steps=30, per_device_train_batch_size=16, per_device_eval_batch_size=20,
                   learning_rate=3e-3, lr_scheduler_type="constant", train_sampling_strategy="random",
                   dataloader_drop_last=True, eval_strategy="steps", eval_steps=10)
    trainer = KTOTrainer(model, args=args, train_dataset=_rows(), eval_dataset=_rows("test", seed=1),
                         processing_class=tok, callbacks=[DiagnosticsCallback(on_diagnostic=seen.append)])
    trainer.train()
    history = [h for h in trainer.state.log_history if "rewards/margins" in h]
    assert history[-1]["loss"] < 0.7 * history[0]["loss"] and history[-1]["rewards/margins"] > 1.0  # it learned
    evals = [h["eval_rewards/margins"] for h in trainer.state.log_history if "eval_rewards/margins" in h]
    assert evals == sorted(evals) and evals[-1] > 1.0, evals
    assert _serious(seen) == []
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h["diagnostics/warning"] == h["diagnostics/error"] == h["diagnostics/critical"] == 0 for h in logged)


def test_batch_too_small_for_the_kl_estimate(tmp_path):
    model, tok = tiny_model()
    args = _config(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=8, max_steps=1)
    trainer = KTOTrainer(model, args=args, train_dataset=_rows(n=16), processing_class=tok)
    [event] = trainer.diagnostics.events
    assert (event.code, event.severity, event.step) == ("KTO_BATCH_TOO_SMALL", "warning", 0)
    assert "holds only 2 row(s)" in event.message
    assert {s.param: s.proposed for s in event.suggestions} == {"per_device_train_batch_size": 4,
                                                                "gradient_accumulation_steps": 4}  # same 16 rows
    trainer.train()  # a warning does not stop training; the pre-flight event is written when it starts
    recorded = [json.loads(line) for line in (tmp_path / "out" / "diagnostics.jsonl").read_text().splitlines()]
    assert [(e["code"], e["status"], e["step"]) for e in recorded] == [("KTO_BATCH_TOO_SMALL", "new", 0)]
    # apo_zero_unpaired has no KL reference point, so the batch size does not matter to it.
    args = _config(tmp_path, per_device_train_batch_size=2, loss_type="apo_zero_unpaired")
    assert KTOTrainer(model, args=args, train_dataset=_rows(n=16), processing_class=tok).diagnostics.events == []


def test_unbalanced_labels_are_caught_and_the_suggested_weight_balances_them(tmp_path):
    model, tok = tiny_model()
    data = _rows(n=24, desirable_per_undesirable=3)  # 24 desirable rows, 8 undesirable
    [event] = KTOTrainer(model, args=_config(tmp_path), train_dataset=data, processing_class=tok).diagnostics.events
    assert (event.code, event.severity) == ("KTO_WEIGHT_IMBALANCE", "warning")
    assert (event.evidence["desirable"], event.evidence["undesirable"], event.evidence["ratio"]) == (24, 8, 3.0)
    [suggestion] = event.suggestions
    assert (suggestion.param, suggestion.current, suggestion.proposed) == ("desirable_weight", 1.0, 0.33)
    args = _config(tmp_path, desirable_weight=suggestion.proposed)
    assert KTOTrainer(model, args=args, train_dataset=data, processing_class=tok).diagnostics.events == []
    # One kind of row only: no weight can balance it, so none is suggested.
    desirable = data.filter(lambda row: row["label"])
    [event] = KTOTrainer(model, args=_config(tmp_path), train_dataset=desirable,
                         processing_class=tok).diagnostics.events
    assert event.code == "KTO_WEIGHT_IMBALANCE" and event.suggestions == ()
    assert "All 24 rows checked are desirable" in event.message and "label=False" in event.message


def test_pretokenized_rows_without_eos_stop_before_anything_is_written(tmp_path):
    model, tok = tiny_model()
    prompt = tok("What is 2 + 2?", add_special_tokens=False)["input_ids"]
    answers = [tok(f" {n}", add_special_tokens=False)["input_ids"] for n in (4, 5) * 4]
    rows = {"prompt_input_ids": [prompt] * 8, "completion_input_ids": answers, "label": [True, False] * 4}
    args = _config(tmp_path, output_dir=str(tmp_path / "new"), diagnostics_stop_on="error")
    with pytest.raises(DiagnosticError, match="DATA_MISSING_EOS") as error:
        KTOTrainer(model, args=args, train_dataset=Dataset.from_dict(rows), processing_class=tok)
    [event] = error.value.events
    assert event.evidence["rows_missing_eos"] == event.evidence["rows_checked"] == 8
    assert not os.path.exists(tmp_path / "new")
    rows["completion_input_ids"] = [ids + [tok.eos_token_id] for ids in answers]
    trainer = KTOTrainer(model, args=args, train_dataset=Dataset.from_dict(rows), processing_class=tok)
    assert trainer.diagnostics.events == []


class _MaskingPadCollator(DataCollatorForUnpairedPreference):
    """A collator that masks labels by token id: with pad = EOS it masks every EOS too."""

    def __call__(self, examples):
        batch = super().__call__(examples)
        for prefix in ("", "KL_"):
            labels = batch[f"{prefix}completion_labels"]
            labels[batch[f"{prefix}input_ids"] == self.pad_token_id] = -100
        return batch


def test_collator_that_masks_the_pad_eos_is_caught(tmp_path):
    model, tok = tiny_model()
    tok.pad_token = tok.eos_token
    masking = _MaskingPadCollator(pad_token_id=tok.eos_token_id)
    trainer = KTOTrainer(model, args=_config(tmp_path), train_dataset=_rows(n=8), processing_class=tok,
                         data_collator=masking)
    [event] = trainer.diagnostics.events
    assert (event.code, event.severity) == ("DATA_EOS_MASKED_BY_PAD", "error")
    assert (event.evidence["trained_eos_in_batch"], event.evidence["kept_as_labels"]) == (4, 0)  # 4 rows, 1 EOS each
    trainer = KTOTrainer(model, args=_config(tmp_path), train_dataset=_rows(n=8), processing_class=tok)
    assert trainer.diagnostics.events == []  # honelm's collator masks padding by position


def test_diagnostics_off_and_config_checks(tmp_path):
    model, tok = tiny_model()
    trainer = KTOTrainer(model, args=_config(tmp_path, diagnostics=False, per_device_train_batch_size=2),
                         train_dataset=_rows(n=8), processing_class=tok)
    assert trainer.diagnostics is None
    with pytest.raises(ValueError, match="KTOConfig.diagnostics_thresholds: KTO_BATCH_TOO_SMALL has no threshold"):
        _config(tmp_path, diagnostics_thresholds={"KTO_BATCH_TOO_SMALL": {"min_batch": 8}})
    args = _config(tmp_path, diagnostics_thresholds={"KTO_BATCH_TOO_SMALL": 8})
    assert args.diagnostics_thresholds == {"KTO_BATCH_TOO_SMALL": 8}
    [event] = KTOTrainer(model, args=args, train_dataset=_rows(n=8), processing_class=tok).diagnostics.events
    assert event.code == "KTO_BATCH_TOO_SMALL" and event.evidence["min_batch_size"] == 8
