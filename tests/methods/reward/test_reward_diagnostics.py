"""RewardTrainer with diagnostics: swapped chosen/rejected columns caught on held-out pairs and
training stopped, reward-scale drift, pre-flight checks reading the reward model's columns and
config, and a healthy run that stays silent."""

from __future__ import annotations

import json
import random

import pytest
from datasets import Dataset

from honelm.diagnostics import DiagnosticsCallback
from honelm.methods.reward import RewardConfig, RewardTrainer
from honelm.testing import tiny_model

# Sentiment words of one token each: chosen and rejected sequences are equally long.
_POSITIVE = ["good", "great", "happy"]
_NEGATIVE = ["bad", "sad"]
_FILLER = ["the", "day", "was", "and", "it", "today", "weather", "food", "so", "very", "we", "they"]


def _config(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no",
        logging_steps=1, per_device_train_batch_size=16, per_device_eval_batch_size=48, learning_rate=1e-3,
        lr_scheduler_type="constant", seed=0, data_seed=0, bf16=False,
    )
    defaults.update(kwargs)
    return RewardConfig(**defaults)


def _pairs(n, seed, swap=False, margin=None):
    """Reviews that differ in one sentiment word: the positive one is preferred (the negative one with ``swap``)."""
    rng = random.Random(seed)
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(n):
        words = [rng.choice(_FILLER) for _ in range(rng.randint(2, 5))]
        at = rng.randint(0, len(words))
        good = " " + " ".join(words[:at] + [rng.choice(_POSITIVE)] + words[at:])
        bad = " " + " ".join(words[:at] + [rng.choice(_NEGATIVE)] + words[at:])
        rows["prompt"].append(rng.choice(["Review:", "Opinion:", "Comment:"]))
        rows["chosen"].append(bad if swap else good)
        rows["rejected"].append(good if swap else bad)
    if margin is not None:
        rows["margin"] = [margin] * n
    return Dataset.from_dict(rows)


def _serious(events):
    return [e for e in events if e.severity != "info" and e.status != "resolved"]


def test_healthy_run_raises_no_warning(tmp_path):
    model, tok = tiny_model(task="sequence-classification")
    seen = []
    args = _config(tmp_path, max_steps=30, eval_strategy="steps", eval_steps=10)
    trainer = RewardTrainer(model, args=args, train_dataset=_pairs(96, seed=1), eval_dataset=_pairs(48, seed=2),
                            processing_class=tok, callbacks=[DiagnosticsCallback(on_diagnostic=seen.append)])
    trainer.train()
    history = [h for h in trainer.state.log_history if "accuracy" in h]
    assert history[0]["accuracy"] < 0.8 and history[-1]["accuracy"] == 1.0 and history[-1]["margin"] > 2.0
    assert [h["eval_accuracy"] for h in trainer.state.log_history if "eval_accuracy" in h][-1] >= 0.95
    assert _serious(seen) == []
    assert all(h["diagnostics/warning"] == h["diagnostics/error"] == h["diagnostics/critical"] == 0 for h in history)


def test_swapped_columns_are_caught_on_held_out_pairs_and_stop_training(tmp_path):
    model, tok = tiny_model(task="sequence-classification")
    args = _config(tmp_path, max_steps=60, eval_strategy="steps", eval_steps=2, diagnostics_stop_on="error")
    trainer = RewardTrainer(model, args=args, train_dataset=_pairs(96, seed=1, swap=True),
                            eval_dataset=_pairs(48, seed=2), processing_class=tok)
    trainer.train()
    stopped = trainer.diagnostics.stopped_by
    assert (stopped.code, stopped.severity, stopped.subject) == ("PREF_ACCURACY_BELOW_CHANCE", "error", "eval")
    assert stopped.evidence["metric"] == "eval_accuracy" and stopped.evidence["mean_margin"] < 0
    assert trainer.state.global_step == stopped.step == 20  # the 10th evaluation: the first the check can judge
    train_accuracy = [h["accuracy"] for h in trainer.state.log_history if "accuracy" in h]
    assert train_accuracy[-1] == 1.0  # it learned the swapped preference: the training metrics look fine
    recorded = [json.loads(line) for line in (tmp_path / "out" / "diagnostics.jsonl").read_text().splitlines()]
    assert recorded == [json.loads(e.to_json()) for e in trainer.diagnostics.events]
    assert (tmp_path / "out" / "checkpoint-20").is_dir()


def test_reward_scale_drift_with_large_margins(tmp_path):
    """Pairs that demand a margin of 60 push the scores far apart: the spread is reported, and no centering is
    suggested (it moves the level of the rewards, not their spread)."""
    model, tok = tiny_model(task="sequence-classification")
    args = _config(tmp_path, max_steps=30, learning_rate=3e-2)
    trainer = RewardTrainer(model, args=args, train_dataset=_pairs(96, seed=1, margin=60.0), processing_class=tok)
    trainer.train()
    events = [e for e in trainer.diagnostics.events if e.code == "REWARD_SCALE_DRIFT"]
    assert events and {e.severity for e in events} == {"warning"}
    first = events[0]
    assert first.step < 30 and first.evidence["spread"] > 50 and abs(first.evidence["mean"]) < 5
    assert "rewards spread over" in first.message and first.suggestions == ()
    last = [h for h in trainer.state.log_history if "max_reward" in h][-1]
    assert last["max_reward"] - last["min_reward"] > 50 and last["accuracy"] == 1.0


def test_length_bias_is_read_from_the_reward_models_columns(tmp_path):
    model, tok = tiny_model(task="sequence-classification")
    data = _pairs(24, seed=3)
    data = data.map(lambda row: {"chosen": row["chosen"] + ", really"})  # every chosen answer is the longer one
    trainer = RewardTrainer(model, args=_config(tmp_path, padding_free=True), train_dataset=data,
                            processing_class=tok)
    assert trainer.train_dataset.column_names == ["chosen_ids", "rejected_ids"]
    [event] = trainer.diagnostics.events
    assert (event.code, event.severity) == ("PREF_LENGTH_BIAS", "warning")
    assert (event.evidence["pairs"], event.evidence["chosen_longer"]) == (24, 24)
    assert event.suggestions == ()  # reward models have no length regularizer to propose


def test_the_reward_model_is_checked_after_the_trainer_sets_its_pad_token(tmp_path):
    model, tok = tiny_model(task="sequence-classification")
    model.config.pad_token_id = None  # the trainer sets it from the tokenizer
    trainer = RewardTrainer(model, args=_config(tmp_path), train_dataset=_pairs(16, seed=1), processing_class=tok)
    facts = trainer.diagnostics.engine.model
    assert facts["sequence_classification"] is True and facts["pad_token_id"] == tok.pad_token_id
    assert trainer.diagnostics.events == []  # no REWARD_MODEL_NO_PAD_TOKEN


def test_padding_waste_counts_both_sequences_of_each_pair(tmp_path):
    model, tok = tiny_model(task="sequence-classification")
    data = _pairs(32, seed=4).map(lambda row, i: {"prompt": row["prompt"] + " tell me more" * (8 * (i % 2))},
                                  with_indices=True)
    trainer = RewardTrainer(model, args=_config(tmp_path, per_device_train_batch_size=4), train_dataset=data,
                            processing_class=tok)
    [event] = trainer.diagnostics.events
    assert (event.code, event.severity) == ("DATA_PADDING_WASTE", "info")
    assert "batch of 4 pairs (8 sequences)" in event.message
    assert [(s.param, s.proposed) for s in event.suggestions] == [("padding_free", True)]


def test_diagnostics_off_and_config_checks(tmp_path):
    model, tok = tiny_model(task="sequence-classification")
    trainer = RewardTrainer(model, args=_config(tmp_path, diagnostics=False), train_dataset=_pairs(16, seed=1),
                            processing_class=tok)
    assert trainer.diagnostics is None
    with pytest.raises(ValueError, match="RewardConfig.diagnostics_stop_on='warning' is not supported"):
        _config(tmp_path, diagnostics_stop_on="warning")
    args = _config(tmp_path, diagnostics_thresholds='{"REWARD_SCALE_DRIFT": 10}')
    assert args.diagnostics_thresholds == {"REWARD_SCALE_DRIFT": {"max_abs_mean": 10.0}}
