"""RewardTrainer: it learns a preference that carries to held-out pairs, pools the right token in
every batch layout, applies margins and centering, trains LoRA adapters only, saves a usable
reward model and rejects bad input with errors that say what to fix."""

from __future__ import annotations

import logging
import math
import random

import pytest
import torch
from datasets import Dataset, IterableDataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from honelm.data import DatasetFormatError
from honelm.methods.reward import DataCollatorForPreference, RewardConfig, RewardModelScorer, RewardTrainer
from honelm.methods.reward.scoring import sequence_rewards
from honelm.testing import tiny_model

_POSITIVE = ["good", "great", "happy"]
_NEGATIVE = ["bad", "sad", "poor"]
_FILLER = ["the", "day", "was", "and", "it", "today", "weather", "food", "so", "very", "we", "they"]
_UNSEEN_FILLER = ["movie", "service", "felt", "is", "of", "to", "in", "a"]  # only in held-out pairs


def _config(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no",
        logging_steps=1, per_device_train_batch_size=8, learning_rate=1e-3, seed=0, data_seed=0, bf16=False,
    )
    defaults.update(kwargs)
    return RewardConfig(**defaults)


def _pairs(n, seed, conversational=False, margin=False, filler=_FILLER):
    """Reviews that differ in one sentiment word, placed anywhere: the positive one is preferred."""
    rng = random.Random(seed)
    rows = {"prompt": [], "chosen": [], "rejected": []}
    if margin:
        rows["margin"] = []
    for i in range(n):
        words = [rng.choice(filler) for _ in range(rng.randint(2, 5))]
        at = rng.randint(0, len(words))
        good = " " + " ".join(words[:at] + [rng.choice(_POSITIVE)] + words[at:])
        bad = " " + " ".join(words[:at] + [rng.choice(_NEGATIVE)] + words[at:])
        prompt = rng.choice(["Review:", "Opinion:", "Comment:", "Feedback:"])
        if conversational:
            prompt = [{"role": "user", "content": prompt}]
            good, bad = [{"role": "assistant", "content": good.strip()}], [{"role": "assistant", "content": bad.strip()}]
        rows["prompt"].append(prompt)
        rows["chosen"].append(good)
        rows["rejected"].append(bad)
        if margin:
            rows["margin"].append(rng.uniform(0.0, 2.0))
    return Dataset.from_dict(rows)


def _rewards_alone(model, sequences):
    """Reward of each sequence run on its own: a batch of one, no padding."""
    return torch.stack([sequence_rewards(model, torch.tensor([s]))[0] for s in sequences])


# ---- learning -----------------------------------------------------------------------------------


def test_learns_a_preference_that_holds_on_held_out_pairs(tmp_path):
    model, tok = tiny_model(task="sequence-classification")
    train, held_out = _pairs(96, seed=1), _pairs(48, seed=2, filler=_FILLER[:4] + _UNSEEN_FILLER)
    assert not set(train["chosen"]) & set(held_out["chosen"])
    args = _config(tmp_path, max_steps=40, per_device_train_batch_size=16, logging_steps=10)
    trainer = RewardTrainer(model, args, train_dataset=train, eval_dataset=held_out, processing_class=tok)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert before["eval_accuracy"] <= 0.7 and abs(before["eval_margin"]) < 0.2, before
    assert after["eval_accuracy"] >= 0.95 and after["eval_margin"] > 2.0, after
    assert after["eval_loss"] < 0.3 * before["eval_loss"]
    logged = [h for h in trainer.state.log_history if "loss" in h]
    for key in ("loss", "accuracy", "margin", "min_reward", "mean_reward", "max_reward", "num_tokens"):
        assert key in logged[-1], key
    assert logged[-1]["min_reward"] < logged[-1]["mean_reward"] < logged[-1]["max_reward"]
    for key in ("eval_min_reward", "eval_mean_reward", "eval_max_reward", "eval_num_tokens"):
        assert key in after, key


# ---- pooling ------------------------------------------------------------------------------------


def _pad_is_eos_model(seed=0):
    """A model and tokenizer whose pad token is EOS, and sequences that end with EOS."""
    model, tok = tiny_model(task="sequence-classification", seed=seed)
    tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.eos_token_id
    eos = tok.eos_token_id
    sequences = [tok("Review 7: the day was good")["input_ids"] + [eos],
                 tok("Review 8: bad")["input_ids"] + [eos],
                 tok("so")["input_ids"] + [eos],
                 tok("Review 9: the weather today was so very good and we felt happy")["input_ids"] + [eos]]
    return model, tok, sequences


def _padded(sequences, pad_id, left):
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, s in enumerate(sequences):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[row, cols], mask[row, cols] = torch.tensor(s), 1
    return ids, mask


def _grads(model, rewards_fn, weights):
    model.zero_grad()
    (rewards_fn() * weights).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("layout", ["right", "left", "padding_free"])
def test_pooling_reads_the_last_real_token_in_every_layout(layout):
    model, tok, sequences = _pad_is_eos_model()
    model.eval()  # same computation as training, without dropout randomness
    pad = tok.pad_token_id
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])
    if layout == "padding_free":
        batch = DataCollatorForPreference(pad, padding_free=True, pad_to_multiple_of=16)(
            [{"chosen_ids": sequences[0], "rejected_ids": sequences[2]},
             {"chosen_ids": sequences[1], "rejected_ids": sequences[3]}])
        # The collator lays out chosen (0, 1) then rejected (2, 3): the order of `sequences`.
        assert "attention_mask" not in batch and batch["input_ids"].shape[1] % 16 == 0
        batched = lambda: sequence_rewards(model, **batch)  # noqa: E731
    else:
        ids, mask = _padded(sequences, pad, left=layout == "left")
        batched = lambda: sequence_rewards(model, ids, mask)  # noqa: E731
        # The model's own pooling searches for the pad id (= EOS here) and reads the wrong token.
        with torch.no_grad():
            own = model(input_ids=ids, attention_mask=mask).logits[:, 0]
        alone = _rewards_alone(model, sequences)
        assert not torch.allclose(own, alone, atol=1e-3)
    with torch.no_grad():
        torch.testing.assert_close(batched(), _rewards_alone(model, sequences), atol=1e-5, rtol=1e-4)
    got = _grads(model, batched, weights)
    want = _grads(model, lambda: _rewards_alone(model, sequences), weights)
    assert got.keys() == want.keys() and len(got) > 10
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


def test_padding_free_training_step_equals_padded(tmp_path):
    data = _pairs(8, seed=3, margin=True)
    results = []
    for padding_free in (False, True):
        model, tok = tiny_model(task="sequence-classification", seed=4)
        args = _config(tmp_path, padding_free=padding_free, center_rewards_coefficient=0.1)
        trainer = RewardTrainer(model, args, train_dataset=data, processing_class=tok)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
        assert ("attention_mask" in batch) is not padding_free
        model.zero_grad()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=1e-5)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-4, msg=name)


def test_gradient_accumulation_gives_the_same_updates(tmp_path):
    data = _pairs(32, seed=5)
    runs = []
    for batch_size, steps in ((8, 1), (4, 2)):
        model, tok = tiny_model(task="sequence-classification", seed=6)
        args = _config(tmp_path, max_steps=3, per_device_train_batch_size=batch_size,
                       gradient_accumulation_steps=steps, learning_rate=0.1, optim="sgd")  # updates linear in grads
        trainer = RewardTrainer(model, args, train_dataset=data, processing_class=tok)
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        runs.append((losses, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (losses_a, params_a), (losses_b, params_b) = runs
    assert losses_a == pytest.approx(losses_b, rel=1e-5)
    for name in params_a:
        torch.testing.assert_close(params_a[name], params_b[name], atol=1e-6, rtol=1e-5, msg=name)


def test_margin_column_and_centering_enter_the_loss(tmp_path):
    model, tok = tiny_model(task="sequence-classification", seed=5)
    data = _pairs(6, seed=4, margin=True)
    args = _config(tmp_path, center_rewards_coefficient=0.25)
    trainer = RewardTrainer(model, args, train_dataset=data, processing_class=tok)
    rows = [trainer.train_dataset[i] for i in range(6)]
    assert [r["margin"] for r in rows] == pytest.approx(list(data["margin"]))
    with torch.no_grad():
        loss = trainer.compute_loss(model, trainer.data_collator(rows)).item()
        chosen = _rewards_alone(model, [r["chosen_ids"] for r in rows]).tolist()
        rejected = _rewards_alone(model, [r["rejected_ids"] for r in rows]).tolist()
    expected = sum(
        math.log1p(math.exp(-(c - r - m))) + 0.25 * (c + r) ** 2
        for c, r, m in zip(chosen, rejected, data["margin"])
    ) / 6
    assert loss == pytest.approx(expected, rel=1e-5)


# ---- data -----------------------------------------------------------------------------------------


def test_conversational_implicit_and_explicit_prompts_tokenize_alike(tmp_path):
    model, tok = tiny_model(task="sequence-classification")
    explicit = _pairs(4, seed=5, conversational=True)
    implicit = Dataset.from_dict({
        "chosen": [p + c for p, c in zip(explicit["prompt"], explicit["chosen"])],
        "rejected": [p + r for p, r in zip(explicit["prompt"], explicit["rejected"])],
    })
    a = RewardTrainer(model, _config(tmp_path), train_dataset=explicit, processing_class=tok).train_dataset
    b = RewardTrainer(model, _config(tmp_path), train_dataset=implicit, processing_class=tok).train_dataset
    assert list(a["chosen_ids"]) == list(b["chosen_ids"]) and list(a["rejected_ids"]) == list(b["rejected_ids"])
    prompt = tok.apply_chat_template(explicit["prompt"][0], tokenize=False, add_generation_prompt=True)
    assert tok.decode(a["chosen_ids"][0]) == prompt + explicit["chosen"][0][0]["content"] + "<|im_end|>"


def test_standard_completions_end_with_eos_and_tokenized_data_passes_through(tmp_path):
    model, tok = tiny_model(task="sequence-classification")
    data = _pairs(4, seed=6)
    trainer = RewardTrainer(model, _config(tmp_path), train_dataset=data, processing_class=tok)
    row = trainer.train_dataset[0]
    assert tok.decode(row["chosen_ids"]) == data["prompt"][0] + data["chosen"][0] + tok.eos_token
    assert sorted(trainer.train_dataset.column_names) == ["chosen_ids", "rejected_ids"]
    for names in (("chosen_ids", "rejected_ids"), ("chosen_input_ids", "rejected_input_ids")):
        tokenized = Dataset.from_dict({names[0]: list(trainer.train_dataset["chosen_ids"]),
                                       names[1]: list(trainer.train_dataset["rejected_ids"]), "extra": [1, 2, 3, 4]})
        again = RewardTrainer(model, _config(tmp_path), train_dataset=tokenized, processing_class=tok)
        assert list(again.train_dataset["chosen_ids"]) == list(trainer.train_dataset["chosen_ids"])


def test_streaming_dataset_keeps_margins_and_trains(tmp_path):
    model, tok = tiny_model(task="sequence-classification")
    data = _pairs(16, seed=7, margin=True)
    stream = IterableDataset.from_generator(lambda: iter(data))
    args = _config(tmp_path, max_steps=2, per_device_train_batch_size=4)
    trainer = RewardTrainer(model, args, train_dataset=stream, processing_class=tok)
    first = next(iter(trainer.train_dataset))
    assert first["margin"] == pytest.approx(data["margin"][0])
    assert tok.decode(first["chosen_ids"]) == data["prompt"][0] + data["chosen"][0] + tok.eos_token
    trainer.train()
    assert trainer.state.global_step == 2


def test_pairs_longer_than_max_length_are_dropped(tmp_path, caplog):
    model, tok = tiny_model(task="sequence-classification")
    data = _pairs(8, seed=8)
    lengths = [max(len(tok(p + c)["input_ids"]), len(tok(p + r)["input_ids"])) + 1
               for p, c, r in zip(data["prompt"], data["chosen"], data["rejected"])]
    limit = sorted(lengths)[4]
    with caplog.at_level(logging.WARNING):
        trainer = RewardTrainer(model, _config(tmp_path, max_length=limit), train_dataset=data, processing_class=tok)
    kept = sum(n <= limit for n in lengths)
    assert len(trainer.train_dataset) == kept < 8
    assert f"dropped {8 - kept} of 8 pairs" in caplog.text and f"max_length={limit}" in caplog.text
    assert trainer.filter_stats["train"] == {"num_rows": 8, "num_dropped": 8 - kept}
    assert all(len(ids) <= limit for ids in list(trainer.train_dataset["chosen_ids"]) + list(trainer.train_dataset["rejected_ids"]))
    with pytest.raises(ValueError, match="all 8 pairs are longer than max_length=3"):
        RewardTrainer(model, _config(tmp_path, max_length=3), train_dataset=data, processing_class=tok)


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ({"prompt": ["a b"], "completion": [" c"]}, "fit no preference format"),
        ({"prompt": ["Q:", "Q:"], "chosen": [" yes", " same"], "rejected": [" no", " same"]},
         r"Row 1, column 'rejected': chosen and rejected are identical"),
        ({"prompt": ["Q:", "Q:"], "chosen": [" yes", " ok"], "rejected": [" no", " nah"], "margin": [0.5, None]},
         r"Row 1, column 'margin': found None .* Expected a finite number"),
        ({"chosen_ids": [[1, 2], []], "rejected_ids": [[1, 3], [4]]},
         r"Row 1, column 'chosen_ids': found \[\]\. Expected a non-empty list of token ids"),
    ],
)
def test_bad_data_is_rejected_before_training(tmp_path, rows, match):
    model, tok = tiny_model(task="sequence-classification")
    with pytest.raises(DatasetFormatError, match=match):
        RewardTrainer(model, _config(tmp_path), train_dataset=Dataset.from_dict(rows), processing_class=tok)


# ---- model --------------------------------------------------------------------------------------


def test_models_that_are_not_single_output_classifiers_are_rejected(tmp_path):
    data = _pairs(2, seed=9)
    lm, tok = tiny_model()
    with pytest.raises(ValueError, match="needs a sequence-classification model with one output; got Qwen2ForCausalLM"):
        RewardTrainer(lm, _config(tmp_path), train_dataset=data, processing_class=tok)
    two, tok = tiny_model(task="sequence-classification", num_labels=2)
    with pytest.raises(ValueError, match="num_labels=2, but a reward model outputs one scalar"):
        RewardTrainer(two, _config(tmp_path), train_dataset=data, processing_class=tok)


def test_missing_pad_token_id_is_set_with_a_warning_and_dropout_is_disabled(tmp_path, caplog):
    model, tok = tiny_model(task="sequence-classification", attention_dropout=0.3)
    model.config.pad_token_id = None
    with caplog.at_level(logging.WARNING):
        trainer = RewardTrainer(model, _config(tmp_path), train_dataset=_pairs(2, seed=10), processing_class=tok)
    assert "The model config has no pad_token_id; setting it to the tokenizer's pad token '<|pad|>'" in caplog.text
    assert trainer.model.config.pad_token_id == tok.pad_token_id
    assert all(m.attention_dropout == 0.0 for m in trainer.model.modules() if hasattr(m, "attention_dropout"))


def test_model_by_path_loads_a_single_output_classifier(tmp_path):
    _, tok = tiny_model(save_to=tmp_path / "lm")  # a causal-LM checkpoint
    trainers = [RewardTrainer(str(tmp_path / "lm"), _config(tmp_path, seed=3), train_dataset=_pairs(2, seed=11))
                for _ in range(2)]
    model = trainers[0].model
    assert type(model).__name__ == "Qwen2ForSequenceClassification" and model.config.num_labels == 1
    assert model.dtype == torch.float32 and trainers[0].processing_class.pad_token == tok.pad_token
    torch.testing.assert_close(model.score.weight, trainers[1].model.score.weight)  # seeded head


def test_classifier_without_a_per_token_head_uses_its_own_pooling(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    from honelm.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    trainer = RewardTrainer(model, _config(tmp_path), train_dataset=_pairs(4, seed=17), processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        chosen, rejected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].chunk(2)
        assert trainer.compute_loss(model, batch).item() == pytest.approx(
            torch.nn.functional.softplus(rejected - chosen).mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="has no per-token `score` head.*Set padding_free=False"):
        RewardTrainer(model, _config(tmp_path, padding_free=True), train_dataset=_pairs(4, seed=17),
                      processing_class=tok)


# ---- PEFT ---------------------------------------------------------------------------------------


def test_lora_trains_adapters_and_score_head_only(tmp_path):
    from peft import LoraConfig

    model, tok = tiny_model(task="sequence-classification")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    held_out = _pairs(32, seed=13)
    args = _config(tmp_path, max_steps=40, per_device_train_batch_size=16, learning_rate=5e-3)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"])  # no task_type given
    trainer = RewardTrainer(model, args, train_dataset=_pairs(96, seed=12), eval_dataset=held_out,
                            processing_class=tok, peft_config=lora)
    assert trainer.model.peft_config["default"].task_type == "SEQ_CLS" and lora.task_type is None
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_accuracy"] >= 0.9 and after["eval_margin"] > before["eval_margin"] + 1.0, (before, after)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "score.modules_to_save" in n for n in trainable), trainable
    for name, param in trainer.model.named_parameters():
        if name in trainable:
            continue
        key = name.removeprefix("base_model.model.").replace(".base_layer", "").replace(".original_module", "")
        assert torch.equal(param, base[key]), name  # frozen weights, the original score head included: bit-identical
    params = dict(trainer.model.named_parameters())
    assert all(params[n].abs().sum() > 0 for n in trainable if "lora_B" in n)  # LoRA B starts at zero
    assert not torch.equal(params["base_model.model.score.modules_to_save.default.weight"], base["score.weight"])
    with pytest.raises(ValueError, match="task_type='CAUSAL_LM', but a reward model is a sequence classifier"):
        RewardTrainer(tiny_model(task="sequence-classification")[0], args, train_dataset=held_out,
                      processing_class=tok, peft_config=LoraConfig(r=4, task_type="CAUSAL_LM"))


# ---- saving and scoring -------------------------------------------------------------------------


def test_saved_model_reloads_and_scores_like_training(tmp_path):
    model, tok = tiny_model(task="sequence-classification")
    data = _pairs(32, seed=14, conversational=True)
    args = _config(tmp_path, max_steps=5)
    trainer = RewardTrainer(model, args, train_dataset=data, processing_class=tok)
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    card = (out / "README.md").read_text()
    assert "reward modeling" in card and "- reward-model" in card
    reloaded = AutoModelForSequenceClassification.from_pretrained(out)
    assert reloaded.config.num_labels == 1 and reloaded.config.pad_token_id == tok.pad_token_id
    assert AutoTokenizer.from_pretrained(out).chat_template == tok.chat_template
    trained = trainer.model.eval()
    with torch.no_grad():
        want = _rewards_alone(trained, list(trainer.train_dataset["chosen_ids"])[:6]).tolist()
        # Right-padded batch through the reloaded model's own forward: the distinct pad token finds the last token.
        ids, mask = _padded(list(trainer.train_dataset["chosen_ids"])[:6], tok.pad_token_id, left=False)
        own = reloaded(input_ids=ids, attention_mask=mask).logits[:, 0].tolist()
    assert own == pytest.approx(want, abs=1e-5)
    scorer = RewardModelScorer(str(out), batch_size=4)
    assert scorer(data["prompt"][:6], data["chosen"][:6]) == pytest.approx(want, abs=1e-5)
    assert scorer.__name__ == "saved"


def test_scorer_on_standard_text_and_empty_completions():
    model, tok = tiny_model(task="sequence-classification", seed=2)
    model.eval()
    scorer = RewardModelScorer(model, tok, batch_size=2)
    prompts, completions = ["Review 1:", "Review 2:", "Q:"], [" the day was good", " bad food", "  "]
    expected_ids = [tok(p + c)["input_ids"] + [tok.eos_token_id] for p, c in zip(prompts[:2], completions[:2])]
    expected_ids.append(tok("Q:")["input_ids"] + [tok.eos_token_id])  # an empty completion: prompt + EOS
    with torch.no_grad():
        want = _rewards_alone(model, expected_ids).tolist()
    assert scorer(prompts, completions, answer=["x", "y", "z"]) == pytest.approx(want, abs=1e-5)
    with pytest.raises(ValueError, match="got 3 prompts but 2 completions"):
        scorer(prompts, completions[:2])


def test_evaluate_prepares_raw_data_and_feeds_compute_metrics(tmp_path):
    model, tok = tiny_model(task="sequence-classification")
    seen = {}

    def compute_metrics(prediction):
        seen["shape"] = prediction.predictions.shape
        return {"pairs": float(len(prediction.predictions))}

    trainer = RewardTrainer(model, _config(tmp_path, per_device_eval_batch_size=4), train_dataset=_pairs(4, seed=15),
                            processing_class=tok, compute_metrics=compute_metrics)
    metrics = trainer.evaluate(eval_dataset=_pairs(10, seed=16))
    assert seen["shape"] == (10, 2) and metrics["eval_pairs"] == 10.0
    for key in ("eval_loss", "eval_accuracy", "eval_margin", "eval_mean_reward"):
        assert key in metrics, key
    both = trainer.evaluate(eval_dataset={"short": _pairs(3, seed=17), "long": _pairs(5, seed=18)})
    assert both["eval_short_pairs"] == 3.0 and both["eval_long_pairs"] == 5.0
    for name, data in (("short", _pairs(3, seed=17)), ("long", _pairs(5, seed=18))):  # each set's own metrics
        assert both[f"eval_{name}_margin"] == pytest.approx(trainer.evaluate(eval_dataset=data)["eval_margin"])
