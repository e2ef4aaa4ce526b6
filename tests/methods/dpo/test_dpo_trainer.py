"""DPOTrainer: it learns a preference, its fast paths agree with the plain computation, the
reference model is what it should be (copy, disabled adapter, precomputed, synced), and bad
data stops it before training."""

from __future__ import annotations

import gc
import json
import logging
import os

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from dpo_helpers import (
    QUESTION,
    WRONG,
    addition_preferences,
    config,
    full_batch,
    logs,
    make_trainer,
    naive_sequence_logps,
    standard_pairs,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from honelm.data import DatasetFormatError
from honelm.methods.dpo import DataCollatorForPreference, DPOConfig, DPOTrainer
from honelm.methods.dpo.trainer import _layout, _log_sum_sq_probs, _mean_logits
from honelm.testing import tiny_model


# ---- it learns ---------------------------------------------------------------------------------


def test_learns_a_preference_that_holds_on_held_out_pairs(tmp_path):
    model, tok = tiny_model()
    args = config(tmp_path, max_steps=40, per_device_train_batch_size=16, per_device_eval_batch_size=64,
                   learning_rate=3e-3, logging_steps=10)
    train, held_out = addition_preferences("train"), addition_preferences("test")
    trainer = DPOTrainer(model, args=args, train_dataset=train, eval_dataset=held_out, processing_class=tok)
    before = trainer.evaluate()
    assert before["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # the policy is the reference
    assert before["eval_loss"] == pytest.approx(0.6931, abs=1e-4)
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_rewards/accuracies"] >= 0.75, after
    assert after["eval_rewards/margins"] > 0.5, after
    assert after["eval_loss"] < 0.55, after
    history = logs(trainer)
    assert history[-1]["loss"] < history[0]["loss"] and history[-1]["rewards/accuracies"] > 0.8
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy",
                "num_tokens", "grad_norm", "learning_rate"):
        assert key in history[-1], key
    assert {"eval_rewards/accuracies", "eval_logps/chosen", "eval_logits/rejected", "eval_num_tokens"} <= set(after)


# ---- the loss is the plain computation ----------------------------------------------------------


def test_loss_metrics_and_gradients_match_the_full_logits_computation(tmp_path):
    trainer = make_trainer(tmp_path, beta=0.2)
    model, ref = trainer.model, trainer.ref_model
    batch = full_batch(trainer)
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    policy, logps, mask, logits = naive_sequence_logps(model, batch)
    with torch.no_grad():
        reference, *_ = naive_sequence_logps(ref, batch)
    b = policy.shape[0] // 2
    margin = (policy[:b] - reference[:b]) - (policy[b:] - reference[b:])
    naive = -F.logsigmoid(0.2 * margin).mean()
    naive.backward()
    torch.testing.assert_close(loss, naive, rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)

    # the metrics of that batch, against their plain definitions
    trainer._metrics["train"].clear()
    trainer.compute_loss(model, dict(batch))
    got = {k: s / c for k, (s, c) in trainer._metrics["train"].items()}
    with torch.no_grad():
        chosen_rows = torch.zeros_like(mask)
        chosen_rows[:b] = True
        probs = torch.softmax(logits, -1)
        entropy = -(probs * torch.log_softmax(logits, -1)).sum(-1)
        correct = logits.argmax(-1) == batch["labels"][:, 1:]
        expected = {
            "rewards/chosen": (0.2 * (policy[:b] - reference[:b])).mean(),
            "rewards/margins": (0.2 * margin).mean(),
            "rewards/accuracies": (margin > 0).float().mean(),
            "logps/rejected": policy[b:].mean(),
            "logits/chosen": logits.mean(-1)[mask & chosen_rows].mean(),
            "logits/rejected": logits.mean(-1)[mask & ~chosen_rows].mean(),
            "entropy": entropy[mask].mean(),
            "mean_token_accuracy": correct[mask & chosen_rows].float().mean(),
        }
    for key, value in expected.items():
        assert got[key] == pytest.approx(value.item(), rel=1e-4, abs=1e-5), key


def test_batches_in_trl_layout_give_the_same_loss(tmp_path):
    trainer = make_trainer(tmp_path)
    batch = full_batch(trainer)
    trl_layout = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                  "completion_mask": (batch["labels"] != -100).long()}
    torch.testing.assert_close(trainer.compute_loss(trainer.model, trl_layout),
                               trainer.compute_loss(trainer.model, dict(batch)))
    with pytest.raises(ValueError, match="neither 'labels' nor 'completion_mask'"):
        trainer.compute_loss(trainer.model, {"input_ids": batch["input_ids"]})


def test_lm_head_statistics_match_the_full_logits():
    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(37, 16), torch.randn(1000, 16), torch.randn(1000)
    logits = hidden @ weight.T + bias
    torch.testing.assert_close(_mean_logits(hidden, weight, bias), logits.mean(-1), rtol=1e-5, atol=1e-5)
    logp = torch.log_softmax(logits, -1)
    torch.testing.assert_close(_log_sum_sq_probs(hidden, weight, bias), torch.logsumexp(2 * logp, -1),
                               rtol=1e-5, atol=1e-5)
    peaked = hidden * 40  # one token far above the rest: the running maximum must keep it exact
    logp = torch.log_softmax(peaked @ weight.T, -1)
    torch.testing.assert_close(_log_sum_sq_probs(peaked, weight, None), torch.logsumexp(2 * logp, -1),
                               rtol=1e-5, atol=1e-5)


# ---- fast paths agree with the plain one ---------------------------------------------------------


def _loss_and_grads(trainer, batch):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("options", [{}, {"ld_alpha": 0.5, "use_weighting": True, "loss_type": ["ipo", "sft"]}],
                         ids=["sigmoid", "ld_wpo_ipo_sft"])
def test_padding_free_gives_the_same_loss_and_gradients_as_padding(tmp_path, options):
    padded = make_trainer(tmp_path, **options)
    batch = full_batch(padded)
    assert batch["input_ids"].shape[0] == 16 and (batch["attention_mask"] == 0).any()
    loss, grads = _loss_and_grads(padded, batch)
    for extra in ({}, {"pad_to_multiple_of": 64}):  # with a trailing padding sequence too
        flat = make_trainer(tmp_path, padding_free=True, **options, **extra)
        flat_batch = full_batch(flat)
        assert flat_batch["input_ids"].shape[0] == 1 and "attention_mask" not in flat_batch
        assert flat_batch["input_ids"].shape[1] == (batch["attention_mask"].sum() if not extra else 64 * -(
            -int(batch["attention_mask"].sum()) // 64))
        flat_loss, flat_grads = _loss_and_grads(flat, flat_batch)
        torch.testing.assert_close(flat_loss, loss, rtol=1e-5, atol=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(flat_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_accumulation_gives_the_same_losses_metrics_and_weights(tmp_path):
    runs = []
    for bs, ga in ((8, 1), (2, 4)):
        trainer = make_trainer(tmp_path / f"{bs}x{ga}", data=standard_pairs(16), per_device_train_batch_size=bs,
                               gradient_accumulation_steps=ga, max_steps=2)
        trainer.train()
        params = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        runs.append((logs(trainer), params))
    keys = ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logits/rejected", "entropy", "num_tokens")
    for history, params in runs[1:]:
        for key in keys:
            got, want = [h[key] for h in history], [h[key] for h in runs[0][0]]
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-5, msg=key)
        torch.testing.assert_close(params, runs[0][1], rtol=1e-4, atol=1e-5)


# ---- the reference model -------------------------------------------------------------------------


def test_default_reference_is_a_frozen_copy(tmp_path):
    model, tok = tiny_model()
    trainer = DPOTrainer(model, args=config(tmp_path, max_steps=2), train_dataset=standard_pairs(),
                         processing_class=tok)
    ref = trainer.ref_model
    assert ref is not model and not ref.training
    assert all(not p.requires_grad for p in ref.parameters())
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    for (name, a), b in zip(ref.named_parameters(), model.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name
    trainer.train()
    for name, p in ref.named_parameters():
        assert torch.equal(p, initial[name]), name
    assert any(not torch.equal(p, initial[n]) for n, p in model.named_parameters())


def test_model_given_by_path_loads_the_reference_from_that_path(tmp_path):
    tiny_model("llama", save_to=tmp_path / "base")
    args = config(tmp_path, max_steps=1, model_init_kwargs={"attn_implementation": "eager"},
                   ref_model_init_kwargs={"attn_implementation": "sdpa"})
    trainer = DPOTrainer(str(tmp_path / "base"), args=args, train_dataset=standard_pairs(4))
    assert type(trainer.model).__name__ == type(trainer.ref_model).__name__ == "LlamaForCausalLM"
    assert trainer.model.config._attn_implementation == "eager"
    assert trainer.ref_model.config._attn_implementation == "sdpa"
    for a, b in zip(trainer.ref_model.parameters(), trainer.model.parameters()):
        assert torch.equal(a, b)
    trainer.train()


def test_precomputed_reference_logps_equal_the_ones_computed_on_the_fly(tmp_path):
    data = standard_pairs(8)
    live = make_trainer(tmp_path, data=data, ref_seed=None, max_steps=4, per_device_train_batch_size=4)
    batch = full_batch(live)
    on_the_fly, *_ = naive_sequence_logps(live.ref_model, batch)
    pre = make_trainer(tmp_path, data=data, ref_seed=None, max_steps=4, per_device_train_batch_size=4,
                   precompute_ref_log_probs=True, precompute_ref_batch_size=3)
    assert pre.ref_model is None  # nothing kept in memory
    columns = torch.tensor(list(pre.train_dataset["ref_chosen_logps"]) + list(pre.train_dataset["ref_rejected_logps"]))
    torch.testing.assert_close(columns, on_the_fly.detach(), rtol=1e-5, atol=1e-5)
    pre_batch = full_batch(pre)
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(pre_batch)
    torch.testing.assert_close(pre.compute_loss(pre.model, dict(pre_batch)), live.compute_loss(live.model, dict(batch)))
    live.train()
    pre.train()
    torch.testing.assert_close(torch.tensor([h["loss"] for h in logs(pre)]),
                               torch.tensor([h["loss"] for h in logs(live)]), rtol=1e-5, atol=1e-6)


def test_precompute_covers_the_eval_dataset_and_refuses_new_ones_after_training(tmp_path):
    model, tok = tiny_model()
    args = config(tmp_path, max_steps=1, precompute_ref_log_probs=True)
    trainer = DPOTrainer(model, args=args, train_dataset=standard_pairs(4),
                         eval_dataset={"a": standard_pairs(3), "b": standard_pairs(2)}, processing_class=tok)
    assert all("ref_chosen_logps" in d.column_names for d in trainer.eval_dataset.values())
    metrics = trainer.evaluate()
    assert metrics["eval_a_rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # policy == reference
    assert "eval_b_logps/chosen" in metrics
    trainer.train()
    with pytest.raises(ValueError, match="already trained"):
        trainer.evaluate(standard_pairs(2))


def test_lora_reference_is_the_disabled_adapter_with_one_copy_of_the_weights(tmp_path):
    peft = pytest.importorskip("peft")
    model, tok = tiny_model()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "lm_head"], lora_dropout=0.0)
    args = config(tmp_path, max_steps=15, learning_rate=1e-2, per_device_train_batch_size=8)
    shape = base["model.embed_tokens.weight"].shape
    before = _storages_of_shape(shape)
    trainer = DPOTrainer(model, args=args, train_dataset=standard_pairs(), processing_class=tok, peft_config=lora)
    assert trainer.ref_model is None
    # one copy of the weights in memory: building the trainer allocated no (vocab, hidden) tensor
    assert _storages_of_shape(shape) == before
    trainer.train()
    history = logs(trainer)
    assert history[-1]["rewards/margins"] > history[0]["rewards/margins"] and history[-1]["loss"] < history[0]["loss"]
    wrapped = trainer.model
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for name, param in wrapped.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, base[name.replace(".base_layer", "")]), name
    # the reference log-probs are those of the untouched base model
    trainer.model.train()
    batch = full_batch(trainer)
    layout = _layout(batch["labels"], batch["position_ids"], batch["attention_mask"])
    ref_chosen, ref_rejected = trainer._reference_logps(trainer.model, batch, layout)
    fresh, _ = tiny_model()
    expected, *_ = naive_sequence_logps(fresh, batch)
    torch.testing.assert_close(torch.cat([ref_chosen, ref_rejected]), expected.detach(), rtol=1e-5, atol=1e-5)
    assert trainer.model.training  # the reference pass restored train mode


def test_lora_with_activation_checkpointing_and_an_existing_adapter(tmp_path, caplog):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
    runs = []
    for checkpointing in (False, True):
        model, tok = tiny_model()
        args = config(tmp_path, max_steps=2, activation_checkpointing=checkpointing, padding_free=checkpointing)
        trainer = DPOTrainer(model, args=args, train_dataset=standard_pairs(), processing_class=tok, peft_config=lora)
        trainer.train()
        runs.append([(h["loss"], h["rewards/margins"]) for h in logs(trainer)])
    torch.testing.assert_close(torch.tensor(runs[1]), torch.tensor(runs[0]), rtol=1e-5, atol=1e-6)
    assert runs[0][0][1] != 0.0  # a random adapter: the policy differs from the reference from the start

    model, tok = tiny_model()
    with caplog.at_level(logging.WARNING, logger="honelm.methods.dpo.trainer"):
        trainer = DPOTrainer(peft.get_peft_model(model, lora), args=config(tmp_path), processing_class=tok,
                             train_dataset=standard_pairs(2))
    assert trainer.ref_model is None and "reference is the model with the adapter disabled" in caplog.text


def _storages_of_shape(shape):
    gc.collect()
    tensors = (t for t in gc.get_objects() if type(t) in (torch.Tensor, torch.nn.Parameter))
    return {t.untyped_storage().data_ptr() for t in tensors if t.shape == shape}


class _Snapshots(TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.policy, self.reference = trainer, {}, {}

    def on_step_end(self, args, state, control, **kwargs):
        # runs after the sync callback (added first): the reference is already updated
        self.policy[state.global_step] = [p.detach().clone() for p in self.trainer.model.parameters()]
        self.reference[state.global_step] = [p.detach().clone() for p in self.trainer.ref_model.parameters()]


def test_sync_ref_model_mixes_the_policy_into_the_reference_every_n_steps(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=5, sync_ref_model=True, ref_model_mixup_alpha=0.25,
                       ref_model_sync_steps=2, per_device_train_batch_size=2)
    ref0 = [p.detach().clone() for p in trainer.ref_model.parameters()]
    snaps = _Snapshots(trainer)
    trainer.add_callback(snaps)
    trainer.train()
    expected = ref0
    for step in range(1, 6):
        if step % 2 == 0:
            expected = [0.25 * p + 0.75 * r for p, r in zip(snaps.policy[step], expected)]
        for got, want in zip(snaps.reference[step], expected):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert not torch.equal(snaps.reference[5][0], ref0[0])


def test_sync_ref_model_and_bco_state_survive_a_resume(tmp_path):
    def run(resume=None):
        trainer = make_trainer(tmp_path, max_steps=4, sync_ref_model=True, ref_model_mixup_alpha=0.5,
                           ref_model_sync_steps=1, loss_type="bco_pair", save_strategy="steps", save_steps=2,
                           per_device_train_batch_size=2)
        trainer.train(resume_from_checkpoint=resume)
        return {h["step"]: h["loss"] for h in logs(trainer)}, trainer

    full, _ = run()
    resumed, trainer = run(str(tmp_path / "out" / "checkpoint-2"))
    for step in (3, 4):  # needs the synced reference and the running reward mean of step 2
        assert resumed[step] == pytest.approx(full[step], rel=1e-6)
    assert trainer._bco[1] == 4 * 2 * 2  # every pair of the 4 steps, both completions


def test_reference_options_that_contradict_each_other_are_refused(tmp_path):
    with pytest.raises(ValueError, match="stale"):
        config(tmp_path, sync_ref_model=True, precompute_ref_log_probs=True)
    with pytest.raises(ValueError, match="reference_free"):
        config(tmp_path, reference_free=True, precompute_ref_log_probs=True)
    peft = pytest.importorskip("peft")
    model, tok = tiny_model()
    with pytest.raises(ValueError, match="sync_ref_model"):
        DPOTrainer(model, args=config(tmp_path, sync_ref_model=True), train_dataset=standard_pairs(2),
                   processing_class=tok, peft_config=peft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="same object"):
        DPOTrainer(model, ref_model=model, args=config(tmp_path), train_dataset=standard_pairs(2),
                   processing_class=tok)


# ---- data ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "rows, message",
    [
        ({"prompt": ["What is 1 + 1?"], "completion": ["2"]}, "fit no preference format"),
        ({"prompt": ["Hi"], "chosen": ["same"], "rejected": ["same"]}, "(?i)row 0.*identical"),
        ({"prompt": ["Hi", "Hey"], "chosen": ["a", "b"], "rejected": ["c", ""]}, "(?i)row 1.*rejected.*empty"),
        ({"prompt": [QUESTION], "chosen": [[{"role": "bot", "content": "4"}]], "rejected": [WRONG]}, "bot"),
    ],
)
def test_bad_datasets_stop_before_training(tmp_path, rows, message):
    model, tok = tiny_model()
    with pytest.raises(DatasetFormatError, match=message):
        DPOTrainer(model, args=config(tmp_path), train_dataset=Dataset.from_dict(rows), processing_class=tok)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.diagnostics_expected  # truncates every pair on purpose: DATA_TRUNCATION
def test_truncation_limits_and_pairs_left_without_completion(tmp_path, caplog):
    model, tok = tiny_model()
    prompt = " ".join(f"w{i}" for i in range(30))
    data = Dataset.from_dict({"prompt": [prompt, "Short prompt"], "chosen": [" yes yes yes yes yes"] * 2,
                              "rejected": [" no"] * 2})
    full = DPOTrainer(model, args=config(tmp_path, max_length=None), train_dataset=data, processing_class=tok)
    whole = full.train_dataset[0]
    args = config(tmp_path, max_prompt_length=5, max_completion_length=3, max_length=7)
    cut = DPOTrainer(model, args=args, train_dataset=data, processing_class=tok).train_dataset[0]
    assert cut["prompt_input_ids"] == whole["prompt_input_ids"][-5:]  # the prompt keeps its end
    assert cut["chosen_input_ids"] == whole["chosen_input_ids"][:2]  # <= 3, then 7 - 5 = 2 left
    assert cut["rejected_input_ids"] == whole["rejected_input_ids"][:2]
    with caplog.at_level(logging.WARNING, logger="honelm.methods.dpo.trainer"):
        trainer = DPOTrainer(model, args=config(tmp_path, max_length=10), train_dataset=data, processing_class=tok)
    assert len(trainer.train_dataset) == 1 and "dropped 1 of 2 pairs (rows 0)" in caplog.text
    stats = trainer.truncation_stats["train"]
    rows = [full.train_dataset[i] for i in range(2)]
    lengths = [len(r["prompt_input_ids"]) + max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"])) for r in rows]
    assert stats.num_rows == 2 and stats.num_truncated == sum(n > 10 for n in lengths)
    with pytest.raises(ValueError, match="none of its 1 pairs"):
        DPOTrainer(model, args=config(tmp_path, max_length=10), train_dataset=data.select([0]), processing_class=tok)


def test_collator_accepts_trl_column_names_and_orders_chosen_first():
    collator = DataCollatorForPreference(pad_token_id=0)
    batch = collator([{"prompt_ids": [5, 6], "chosen_ids": [7, 8], "rejected_ids": [9]},
                      {"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3, 4]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [1, 2, 0, 0], [5, 6, 9, 0], [1, 3, 4, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 2, -100, -100], [-100, -100, 9, -100],
                                        [-100, 3, 4, -100]]
    with pytest.raises(ValueError, match="prompt_input_ids"):
        collator([{"input_ids": [1, 2]}])


# ---- evaluation, saving, odds and ends -----------------------------------------------------------


def test_compute_metrics_gets_the_implicit_rewards(tmp_path):
    seen = {}

    def metrics(prediction):
        seen["shape"] = prediction.predictions.shape
        return {"chosen_wins": float((prediction.predictions[:, 0] > prediction.predictions[:, 1]).mean())}

    model, tok = tiny_model()
    trainer = DPOTrainer(model, ref_model=tiny_model(seed=1)[0], args=config(tmp_path),
                         train_dataset=standard_pairs(2), eval_dataset=standard_pairs(6), processing_class=tok,
                         compute_metrics=metrics)
    result = trainer.evaluate()
    assert seen["shape"] == (6, 2)
    assert result["eval_chosen_wins"] == pytest.approx(result["eval_rewards/accuracies"])
    later = trainer.evaluate(standard_pairs(3), metric_key_prefix="held_out")  # raw text: tokenized here
    assert seen["shape"] == (3, 2) and "held_out_rewards/margins" in later


def test_saved_model_reloads_with_tokenizer_and_a_dpo_model_card(tmp_path):
    model, tok = tiny_model()
    args = config(tmp_path, max_steps=2)
    trainer = DPOTrainer(model, args=args, train_dataset=standard_pairs(), processing_class=tok)
    trainer.train()
    trainer.save_model()
    reloaded = AutoModelForCausalLM.from_pretrained(args.output_dir)
    for (name, a), b in zip(trainer.model.named_parameters(), reloaded.parameters()):
        assert torch.equal(a, b), name
    assert AutoTokenizer.from_pretrained(args.output_dir).chat_template == tok.chat_template
    card = open(os.path.join(args.output_dir, "README.md")).read()
    assert "Direct Preference Optimization" in card and "- dpo" in card and "loss_type=sigmoid" in card


def test_moe_router_aux_loss_is_part_of_the_loss(tmp_path):
    model, tok = tiny_model("qwen2_moe")
    trainer = DPOTrainer(model, args=config(tmp_path), train_dataset=standard_pairs(4), processing_class=tok)
    batch = full_batch(trainer)
    with_aux = trainer.compute_loss(model, dict(batch))
    trainer.router_aux_loss_coef = 0.0
    without = trainer.compute_loss(model, dict(batch))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    aux = model(**inputs, output_router_logits=True).aux_loss
    torch.testing.assert_close(with_aux - without, model.config.router_aux_loss_coef * aux, rtol=1e-4, atol=1e-6)


def test_config_checks_and_defaults(tmp_path):
    dpo_config = config(tmp_path, loss_type="sigmoid")
    assert dpo_config.loss_type == ["sigmoid"] and dpo_config.learning_rate == 1e-3
    assert DPOConfig(output_dir=str(tmp_path)).learning_rate == 1e-6
    with pytest.raises(ValueError, match="Unknown loss type 'sigmod'"):
        config(tmp_path, loss_type="sigmod")
    with pytest.raises(ValueError, match="one weight per loss type"):
        config(tmp_path, loss_type=["sigmoid", "sft"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="only applies to losses"):
        config(tmp_path, loss_type="nca_pair", f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match="WPO"):
        config(tmp_path, loss_type="aot", use_weighting=True)
    with pytest.raises(ValueError, match="ld_alpha"):
        config(tmp_path, ld_alpha=1.5)


def test_log_history_is_json_serializable(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=2, eval_dataset=standard_pairs(4))
    trainer.train()
    assert any("eval_rewards/margins" in h for h in trainer.state.log_history)
    json.dumps(trainer.state.log_history)
    assert all(not k.startswith("eval_") for h in logs(trainer) for k in h)
