"""KTOTrainer: it learns a preference that holds on held-out prompts, its numbers match a naive
computation from full logits, its fast paths agree, and bad input stops it before training."""

from __future__ import annotations

import copy
import logging
import os
import random

import pytest
import torch
from datasets import Dataset
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from honelm.data import DatasetFormatError
from honelm.methods.kto import DataCollatorForUnpairedPreference, KTOConfig, KTOTrainer
from honelm.testing import arithmetic_dataset, tiny_model


def _config(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no",
        logging_steps=1, per_device_train_batch_size=4, per_device_eval_batch_size=4, learning_rate=1e-3, seed=0,
        data_seed=0, beta=0.1,
    )
    defaults.update(kwargs)
    return KTOConfig(**defaults)


def _arithmetic_rows(split="train", seed=0, max_operand=9, held_out_fraction=0.25, n=None):
    """Unpaired rows: the correct sum is desirable, a wildly wrong one undesirable (alternating)."""
    data = arithmetic_dataset(n, max_operand=max_operand, held_out_fraction=held_out_fraction, split=split, seed=seed)
    rng = random.Random(seed)
    rows = {"prompt": [], "completion": [], "label": []}
    for prompt, answer in zip(data["prompt"], data["answer"]):
        wrong = str(int(answer) + rng.randint(10, 40))
        for text, label in ((answer, True), (wrong, False)):
            rows["prompt"].append(prompt)
            rows["completion"].append([{"role": "assistant", "content": text}])
            rows["label"].append(label)
    return rows


def _perturb(model, scale=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def _naive_logps(model, prompt, completion):
    """Summed log-prob of ``completion`` after ``prompt`` from the model's full logits, one sequence."""
    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()  # (T-1, V)
    token_logps = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
    return token_logps[len(prompt) - 1 :].sum().item()


def _naive_mean_logits(model, prompt, completion):
    """Sum over the completion's scored positions of the vocabulary-mean logit, and their count."""
    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    return logits[len(prompt) - 1 :].mean(-1).sum().item(), len(completion)


def _naive_step(policy, ref, rows, beta, desirable_weight=1.0, undesirable_weight=1.0):
    """The KTO loss, rewards and KL of one batch, from full logits, one sequence at a time."""
    prompts = [r["prompt_input_ids"] for r in rows]
    completions = [r["completion_input_ids"] for r in rows]
    labels = [bool(r["label"]) for r in rows]
    pol = [_naive_logps(policy, p, c) for p, c in zip(prompts, completions)]
    ref_l = [_naive_logps(ref, p, c) for p, c in zip(prompts, completions)]
    shifted = completions[-1:] + completions[:-1]  # row j: prompt j, completion j - 1
    kl = sum(_naive_logps(policy, p, c) - _naive_logps(ref, p, c) for p, c in zip(prompts, shifted)) / len(rows)
    z0 = max(kl, 0.0)
    total = 0.0
    for lp, rl, y in zip(pol, ref_l, labels):
        r = lp - rl
        total += (desirable_weight * torch.sigmoid(torch.tensor(-beta * (r - z0))) if y
                  else undesirable_weight * torch.sigmoid(torch.tensor(-beta * (z0 - r)))).item()
    return {"loss": total / len(rows), "kl": kl, "policy": pol, "ref": ref_l, "labels": labels}


# ---- learning -----------------------------------------------------------------------------------


def test_learns_a_preference_that_holds_on_held_out_prompts(tmp_path):
    model, tok = tiny_model(hidden_size=96, intermediate_size=192)
    reference = copy.deepcopy(model).eval()
    train, held_out = Dataset.from_dict(_arithmetic_rows()), Dataset.from_dict(_arithmetic_rows("test", seed=1))
    args = _config(
        tmp_path, max_steps=30, per_device_train_batch_size=16, per_device_eval_batch_size=20, learning_rate=3e-3,
        lr_scheduler_type="constant", logging_steps=10, train_sampling_strategy="random", dataloader_drop_last=True,
        eval_strategy="steps", eval_steps=15,
    )
    trainer = KTOTrainer(model, args=args, train_dataset=train, eval_dataset=held_out, processing_class=tok)
    before = trainer.evaluate()
    assert before["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_rewards/margins" in h]
    assert [h["step"] for h in evals] == [15, 30]
    assert evals[-1]["eval_rewards/margins"] > evals[0]["eval_rewards/margins"] > 0.5, evals
    train_logs = [h for h in trainer.state.log_history if "rewards/margins" in h]
    assert train_logs[-1]["rewards/margins"] > train_logs[0]["rewards/margins"] + 0.5
    for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "logits/chosen",
                "logits/rejected", "kl", "num_tokens", "entropy"):
        assert key in train_logs[-1], key
    # Implicit-reward accuracy on held-out pairs, from full logits: the correct answer gets the higher reward.
    rows = trainer.eval_dataset
    rewards = [_naive_logps(trainer.model, r["prompt_input_ids"], r["completion_input_ids"])
               - _naive_logps(reference, r["prompt_input_ids"], r["completion_input_ids"]) for r in rows]
    pairs = list(zip(rewards[0::2], rewards[1::2]))  # (correct, wrong) for each held-out question
    assert all(label for label in rows["label"][0::2]) and not any(rows["label"][1::2])
    accuracy = sum(good > bad for good, bad in pairs) / len(pairs)
    assert accuracy >= 0.9, accuracy


# ---- numbers against a naive computation --------------------------------------------------------


def _trainer_with_moved_policy(tmp_path, train_steps=6, **kwargs):
    """A trainer whose policy has trained a few steps away from the reference: rewards and KL are nonzero."""
    model, tok = tiny_model(seed=1)
    data = Dataset.from_dict(_arithmetic_rows(n=4, held_out_fraction=0.0))
    args = _config(tmp_path, max_steps=train_steps, learning_rate=5e-3, **kwargs)
    trainer = KTOTrainer(model, args=args, train_dataset=data, processing_class=tok)
    trainer.train()
    return trainer


@pytest.mark.parametrize("weights", [
    (1.0, 1.0),
    pytest.param((1.6, 0.4), marks=pytest.mark.diagnostics_expected),  # unbalanced on purpose: KTO_WEIGHT_IMBALANCE
])
def test_loss_kl_and_rewards_match_a_naive_computation(tmp_path, weights):
    trainer = _trainer_with_moved_policy(tmp_path, desirable_weight=weights[0], undesirable_weight=weights[1], beta=0.5)
    rows = [trainer.train_dataset[i] for i in range(5)]
    naive = _naive_step(trainer.model, trainer.ref_model, rows, 0.5, *weights)
    assert naive["kl"] > 0.05  # the policy gives the dataset's answers more mass, mismatched ones included
    batch = trainer.data_collator(rows)
    loss = trainer.compute_loss(trainer.model, batch)
    assert loss.item() == pytest.approx(naive["loss"], rel=1e-4)
    assert trainer._kl_values["train"][-1] == pytest.approx(naive["kl"], rel=1e-4)
    expected = [0.5 * (p - r) for p, r in zip(naive["policy"], naive["ref"])]
    torch.testing.assert_close(trainer._last_rewards, torch.tensor(expected), rtol=1e-4, atol=1e-5)


def test_kl_reference_point_uses_mismatched_pairs_and_is_clamped(tmp_path):
    model, tok = tiny_model(seed=1)
    data = Dataset.from_dict(_arithmetic_rows(n=4, held_out_fraction=0.0))
    trainer = KTOTrainer(model, args=_config(tmp_path), train_dataset=data, processing_class=tok)
    rows = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator(rows)
    # row j of the KL sequences: prompt j followed by the completion of row j - 1
    for j in range(4):
        ids = batch["KL_input_ids"][j][batch["KL_attention_mask"][j].bool()].tolist()
        assert ids == rows[j]["prompt_input_ids"] + rows[j - 1]["completion_input_ids"]
    # A random move of the policy lowers the mass of these completions: a negative estimate, clamped to 0.
    _perturb(trainer.model)
    naive = _naive_step(trainer.model, trainer.ref_model, rows, 0.1)
    assert naive["kl"] < -0.1
    loss = trainer.compute_loss(trainer.model, batch)
    assert trainer._kl_values["train"][-1] == 0.0
    assert loss.item() == pytest.approx(_naive_step_loss_with_z0(naive, 0.1, 0.0), rel=1e-4)


def _naive_step_loss_with_z0(naive, beta, z0):
    total = 0.0
    for lp, rl, y in zip(naive["policy"], naive["ref"], naive["labels"]):
        sign = 1.0 if y else -1.0
        total += torch.sigmoid(torch.tensor(-beta * sign * (lp - rl - z0))).item()
    return total / len(naive["labels"])


def test_eval_metrics_are_averaged_over_rows_even_with_single_kind_batches(tmp_path):
    trainer = _trainer_with_moved_policy(tmp_path, per_device_eval_batch_size=4)
    # 6 rows: the first batch only desirable rows, the second one of each kind
    all_rows = [trainer.train_dataset[i] for i in range(8)]
    chosen = [r for r in all_rows if r["label"]]
    rejected = [r for r in all_rows if not r["label"]]
    rows = chosen[:4] + [rejected[0], chosen[-1] if len(chosen) > 4 else chosen[0]]
    columns = ("prompt_input_ids", "completion_input_ids", "label")
    eval_data = Dataset.from_list([{k: r[k] for k in columns} for r in rows])
    metrics = trainer.evaluate(eval_data)
    naive = [_naive_step(trainer.model, trainer.ref_model, part, 0.1) for part in (rows[:4], rows[4:])]
    rewards = [0.1 * (p - r) for n in naive for p, r in zip(n["policy"], n["ref"])]
    logps = [p for n in naive for p in n["policy"]]
    labels = [y for n in naive for y in n["labels"]]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    chosen_rewards = mean([r for r, y in zip(rewards, labels) if y])
    rejected_rewards = mean([r for r, y in zip(rewards, labels) if not y])
    assert metrics["eval_rewards/chosen"] == pytest.approx(chosen_rewards, rel=1e-4, abs=1e-6)
    assert metrics["eval_rewards/rejected"] == pytest.approx(rejected_rewards, rel=1e-4, abs=1e-6)
    assert metrics["eval_rewards/margins"] == pytest.approx(chosen_rewards - rejected_rewards, rel=1e-4, abs=1e-6)
    assert metrics["eval_logps/chosen"] == pytest.approx(mean([p for p, y in zip(logps, labels) if y]), rel=1e-4)
    assert metrics["eval_kl"] == pytest.approx(mean([max(n["kl"], 0.0) for n in naive]), rel=1e-4, abs=1e-6)
    sums = [_naive_mean_logits(trainer.model, r["prompt_input_ids"], r["completion_input_ids"]) for r in rows]
    chosen_sums = [s for s, r in zip(sums, rows) if r["label"]]
    expected_logits = sum(s for s, _ in chosen_sums) / sum(n for _, n in chosen_sums)
    assert metrics["eval_logits/chosen"] == pytest.approx(expected_logits, rel=1e-3, abs=1e-5)
    assert metrics["eval_num_tokens"] == sum(len(r["prompt_input_ids"]) + len(r["completion_input_ids"]) for r in rows)


@pytest.mark.diagnostics_expected  # desirable rows only, on purpose: KTO_WEIGHT_IMBALANCE
def test_a_window_of_only_desirable_rows_logs_no_rejected_or_margin(tmp_path):
    model, tok = tiny_model()
    data = Dataset.from_dict({"prompt": ["What is 1 + 1?", "What is 2 + 2?"] * 2, "completion": [" 2", " 4"] * 2,
                              "label": [True] * 4})
    trainer = KTOTrainer(model, args=_config(tmp_path, max_steps=1), train_dataset=data, processing_class=tok)
    trainer.train()
    logged = next(h for h in trainer.state.log_history if "loss" in h)
    assert "rewards/chosen" in logged and "logps/chosen" in logged
    assert not any(k in logged for k in ("rewards/rejected", "logps/rejected", "rewards/margins", "logits/rejected"))


# ---- fast paths and reference variants ----------------------------------------------------------


def _loss_and_grads(tmp_path, loss_type="kto", **kwargs):
    model, tok = tiny_model(seed=3)
    data = Dataset.from_dict(_arithmetic_rows(n=3, held_out_fraction=0.0))
    args = _config(tmp_path, loss_type=loss_type, per_device_train_batch_size=6, **kwargs)
    trainer = KTOTrainer(model, args=args, train_dataset=data, processing_class=tok)
    _perturb(trainer.model, seed=2)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
    model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    return loss.detach(), grads, batch, dict(trainer._sums["train"]), trainer._kl_values["train"]


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_padding_free_gives_the_same_loss_gradients_and_metrics(tmp_path, loss_type):
    loss, grads, batch, sums, kl = _loss_and_grads(tmp_path, loss_type)
    assert "attention_mask" in batch and batch["input_ids"].shape[0] == 6
    assert ("KL_input_ids" in batch) == (loss_type == "kto")
    flat_loss, flat_grads, flat_batch, flat_sums, flat_kl = _loss_and_grads(
        tmp_path, loss_type, padding_free=True, pad_to_multiple_of=8
    )
    assert flat_batch["input_ids"].shape[0] == 1 and "attention_mask" not in flat_batch
    assert flat_batch["input_ids"].shape[1] % 8 == 0  # trailing padding: a sequence of its own
    torch.testing.assert_close(flat_loss, loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(flat_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    for key, value in sums.items():
        assert flat_sums[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    assert flat_kl == pytest.approx(kl, rel=1e-4, abs=1e-6)


def test_precomputed_reference_log_probs_give_the_same_training_as_on_the_fly(tmp_path):
    data = Dataset.from_dict(_arithmetic_rows(n=6, held_out_fraction=0.0))  # 12 rows: 3 batches of 4
    runs = {}
    for precompute in (False, True):
        model, tok = tiny_model(seed=4)
        args = _config(tmp_path / str(precompute), max_steps=3, precompute_ref_log_probs=precompute,
                       precompute_ref_batch_size=5)
        trainer = KTOTrainer(model, args=args, train_dataset=data, processing_class=tok)
        if precompute:
            assert trainer.ref_model is None  # no copy of the model is kept
            row = trainer.train_dataset[5]
            expected = _naive_logps(model, row["prompt_input_ids"], row["completion_input_ids"])
            assert row["ref_logps"] == pytest.approx(expected, rel=1e-4)
            assert row["KL_completion_input_ids"] == trainer.train_dataset[4]["completion_input_ids"]
        trainer.train()
        runs[precompute] = [h for h in trainer.state.log_history if "loss" in h]
    assert len(runs[True]) == 3
    for fly, pre in zip(runs[False], runs[True]):
        for key in ("loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "grad_norm"):
            assert pre[key] == pytest.approx(fly[key], rel=1e-4, abs=1e-6), key


def test_lora_keeps_one_copy_of_the_weights_and_uses_them_unchanged_as_reference(tmp_path):
    peft = pytest.importorskip("peft")
    model, tok = tiny_model(seed=6)
    original = copy.deepcopy(model).eval()
    storage = {p.data_ptr() for p in model.parameters()}
    data = Dataset.from_dict(_arithmetic_rows(n=8, held_out_fraction=0.0))
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    args = _config(tmp_path, max_steps=10, learning_rate=1e-2)
    trainer = KTOTrainer(model, args=args, train_dataset=data, processing_class=tok, peft_config=config)
    assert trainer.ref_model is None
    modules = [v for v in vars(trainer).values() if isinstance(v, nn.Module)]
    base = [p for m in modules for n, p in m.named_parameters() if "lora_" not in n]
    assert {p.data_ptr() for p in base} == storage  # the base weights exist once, those of `model`
    trainer.train()
    rows = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    ref_logps, _ = trainer._reference_logps(batch, 4)
    expected = [_naive_logps(original, r["prompt_input_ids"], r["completion_input_ids"]) for r in rows]
    torch.testing.assert_close(ref_logps, torch.tensor(expected), rtol=1e-4, atol=1e-4)
    logged = [h for h in trainer.state.log_history if "rewards/chosen" in h]
    assert logged[-1]["rewards/chosen"] != 0.0  # the adapters moved the policy away from the reference
    for name, param in trainer.model.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, dict(original.named_parameters())[name.replace(".base_layer", "")]), name


def test_sync_ref_model_mixes_the_policy_into_the_reference(tmp_path):
    model, tok = tiny_model(seed=7)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = Dataset.from_dict(_arithmetic_rows(n=4, held_out_fraction=0.0))
    args = _config(tmp_path, max_steps=3, sync_ref_model=True, ref_model_sync_steps=2, ref_model_mixup_alpha=0.25)
    snapshots = {}
    trainer = KTOTrainer(model, args=args, train_dataset=data, processing_class=tok)
    from transformers import TrainerCallback

    class Keep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            snapshots[state.global_step] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    trainer.callback_handler.callbacks.insert(0, Keep())  # runs before the sync callback
    trainer.train()
    ref = dict(trainer.ref_model.named_parameters())
    for name, start in initial.items():
        torch.testing.assert_close(ref[name], 0.25 * snapshots[2][name] + 0.75 * start, rtol=1e-5, atol=1e-7)
    assert not torch.equal(ref["lm_head.weight"], snapshots[3]["lm_head.weight"])


def test_moe_router_loss_is_added_with_its_coefficient(tmp_path):
    model, tok = tiny_model("qwen2_moe", seed=8)
    data = Dataset.from_dict(_arithmetic_rows(n=2, held_out_fraction=0.0))
    losses = {}
    for coef in (0.0, 0.5):
        trainer = KTOTrainer(copy.deepcopy(model), args=_config(tmp_path, router_aux_loss_coef=coef),
                             train_dataset=data, processing_class=tok)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        losses[coef] = trainer.compute_loss(trainer.model, batch)
    aux = trainer._aux_values["train"][-1]
    assert aux > 0 and (losses[0.5] - losses[0.0]).item() == pytest.approx(0.5 * aux, rel=1e-4)
    dense, _ = tiny_model()
    with pytest.raises(ValueError, match="not a mixture-of-experts"):
        KTOTrainer(dense, args=_config(tmp_path, router_aux_loss_coef=0.1), train_dataset=data, processing_class=tok)


# ---- data ----------------------------------------------------------------------------------------


@pytest.mark.diagnostics_expected  # batches of 2 rows (3 pairs) are too small for the KL estimate: KTO_BATCH_TOO_SMALL
def test_paired_data_becomes_unpaired_rows_in_blocks(tmp_path):
    model, tok = tiny_model()
    paired = Dataset.from_dict({
        "prompt": ["What is 1 + 1?", "What is 2 + 3?", "What is 4 + 4?"],
        "chosen": [" 2", " 5", " 8"],
        "rejected": [" 3", " 7", " 1"],
    })
    trainer = KTOTrainer(model, args=_config(tmp_path, per_device_train_batch_size=2), train_dataset=paired,
                         processing_class=tok)
    unpaired = Dataset.from_dict({
        "prompt": list(paired["prompt"]) * 2, "completion": list(paired["chosen"]) + list(paired["rejected"]),
        "label": [True] * 3 + [False] * 3,
    })
    reference = KTOTrainer(tiny_model()[0], args=_config(tmp_path, per_device_train_batch_size=2),
                           train_dataset=unpaired, processing_class=tok)
    assert trainer.train_dataset["label"] == [True, True, True, False, False, False]
    for column in ("prompt_input_ids", "completion_input_ids"):
        assert trainer.train_dataset[column] == reference.train_dataset[column]
    assert tok.decode(trainer.train_dataset[4]["completion_input_ids"]) == " 7<|im_end|>"
    # implicit prompt: the shared prefix of chosen and rejected
    implicit = Dataset.from_dict({"chosen": [p + c for p, c in zip(paired["prompt"], paired["chosen"])],
                                  "rejected": [p + c for p, c in zip(paired["prompt"], paired["rejected"])]})
    trainer = KTOTrainer(tiny_model()[0], args=_config(tmp_path, per_device_train_batch_size=2),
                         train_dataset=implicit, processing_class=tok)
    assert trainer.train_dataset["label"] == [True, True, True, False, False, False]
    assert [tok.decode(c) for c in trainer.train_dataset["completion_input_ids"][:3]] == [
        " 2<|im_end|>", " 5<|im_end|>", " 8<|im_end|>"
    ]


@pytest.mark.diagnostics_expected  # truncates on purpose, in batches of 2: DATA_TRUNCATION, KTO_BATCH_TOO_SMALL
def test_truncation_limits_prompt_completion_and_total(tmp_path):
    model, tok = tiny_model()
    long_prompt = "one two three four five six seven eight nine ten eleven twelve"
    data = Dataset.from_dict({"prompt": [long_prompt, "hi"], "completion": [" a b c d e f g h", " ok"],
                              "label": [True, False]})
    ids = KTOTrainer(model, args=_config(tmp_path, per_device_train_batch_size=2, max_length=None),
                     train_dataset=data, processing_class=tok).train_dataset
    full_prompt, full_completion = ids[0]["prompt_input_ids"], ids[0]["completion_input_ids"]
    args = _config(tmp_path, per_device_train_batch_size=2, max_prompt_length=5, max_completion_length=4,
                   max_length=8, truncation_mode="keep_end")
    trainer = KTOTrainer(model, args=args, train_dataset=data, processing_class=tok)
    row = trainer.train_dataset[0]
    assert row["completion_input_ids"] == full_completion[:4]
    assert row["prompt_input_ids"] == full_prompt[-4:]  # keep_end: the prompt's end survives (5, then 8 - 4)
    assert trainer.truncation_stats["train"].num_truncated == 1
    # keep_start with a prompt that fills max_length: the row has nothing left to score and is dropped
    args = _config(tmp_path, per_device_train_batch_size=2, max_length=5, dataloader_drop_last=True)
    with pytest.raises(ValueError, match="rows \\(all of them\\)|no completion token left"):
        KTOTrainer(model, args=args, train_dataset=data.select([0, 0]), processing_class=tok)


@pytest.mark.parametrize(
    "rows, message",
    [
        ({"prompt": ["a", "b"], "completion": [" x", " y"], "label": [1, 0]}, "(?s)Row 0.*label.*bool"),
        ({"prompt": ["a", "b"], "completion": [" x", " y"]}, "(?s)prompt-completion"),
        ({"prompt": ["a"], "chosen": [" x"], "rejected": [" x"]}, "(?s)Row 0.*identical"),
        ({"question": ["a"], "answer": [" x"]}, "column"),
    ],
)
def test_bad_datasets_stop_before_training(tmp_path, rows, message):
    model, tok = tiny_model()
    with pytest.raises(DatasetFormatError, match=message):
        KTOTrainer(model, args=_config(tmp_path), train_dataset=Dataset.from_dict(rows), processing_class=tok)
    assert not os.path.exists(tmp_path / "out")


def test_too_small_batches_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="(?s)per_device_train_batch_size=1.*per_device_train_batch_size >= 2"):
        _config(tmp_path, per_device_train_batch_size=1)
    _config(tmp_path, per_device_train_batch_size=1, loss_type="apo_zero_unpaired")  # no reference point: fine
    model, tok = tiny_model()
    data = Dataset.from_dict(_arithmetic_rows(n=4, held_out_fraction=0.0))  # 8 rows
    with pytest.raises(ValueError, match="(?s)9 rows.*single row.*dataloader_drop_last=True"):
        KTOTrainer(model, args=_config(tmp_path), train_dataset=data.select(range(8)).add_item(data[0]),
                   processing_class=tok)
    with pytest.raises(ValueError, match="per_device_eval_batch_size=1"):
        KTOTrainer(model, args=_config(tmp_path, per_device_eval_batch_size=1), train_dataset=data,
                   eval_dataset=data, processing_class=tok)
    collator = DataCollatorForUnpairedPreference(pad_token_id=0)
    with pytest.raises(ValueError, match="single row"):
        collator([{"prompt_input_ids": [1, 2], "completion_input_ids": [3], "label": True}])


@pytest.mark.diagnostics_expected  # 6 desirable rows for 2 undesirable, on purpose: KTO_WEIGHT_IMBALANCE
def test_label_imbalance_warning_suggests_weights(tmp_path, caplog):
    model, tok = tiny_model()
    data = Dataset.from_dict({"prompt": ["q"] * 8, "completion": [" a"] * 8, "label": [True] * 6 + [False] * 2})
    with caplog.at_level(logging.WARNING, logger="honelm.methods.kto.trainer"):
        KTOTrainer(model, args=_config(tmp_path, train_sampling_strategy="random"), train_dataset=data,
                   processing_class=tok)
    assert "EITHER desirable_weight in [0.33, 0.44] OR undesirable_weight in [2.25, 3.00]" in caplog.text


# ---- saving -------------------------------------------------------------------------------------


def test_saves_a_reloadable_model_tokenizer_and_kto_model_card(tmp_path):
    model, tok = tiny_model()
    trainer = KTOTrainer(model, args=_config(tmp_path, max_steps=2),
                         train_dataset=Dataset.from_dict(_arithmetic_rows(n=4, held_out_fraction=0.0)),
                         processing_class=tok)
    trainer.train()
    trainer.save_model()
    out = trainer.args.output_dir
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for (name, a), b in zip(trainer.model.named_parameters(), reloaded.parameters()):
        assert torch.equal(a, b), name
    assert AutoTokenizer.from_pretrained(out).chat_template == tok.chat_template
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert "Kahneman-Tversky Optimization (KTO)" in card and "- kto" in card


def test_resume_from_checkpoint_continues_the_same_run_with_the_synced_reference(tmp_path):
    data = Dataset.from_dict(_arithmetic_rows(n=8, held_out_fraction=0.0))
    options = dict(max_steps=4, save_strategy="steps", save_steps=2, sync_ref_model=True, ref_model_sync_steps=1,
                   ref_model_mixup_alpha=0.5, learning_rate=5e-3)
    model, tok = tiny_model(seed=9)
    full = KTOTrainer(model, args=_config(tmp_path, **options), train_dataset=data, processing_class=tok)
    full.train()
    expected = [(h["loss"], h["kl"]) for h in full.state.log_history if "loss" in h][2:]
    model, tok = tiny_model(seed=9)
    resumed = KTOTrainer(model, args=_config(tmp_path, **options), train_dataset=data, processing_class=tok)
    resumed.train(resume_from_checkpoint=os.path.join(resumed.args.output_dir, "checkpoint-2"))
    got = [(h["loss"], h["kl"]) for h in resumed.state.log_history if "loss" in h and h["step"] > 2]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-4, atol=1e-6)
    assert expected[-1][1] > 0  # the reference point is in play
