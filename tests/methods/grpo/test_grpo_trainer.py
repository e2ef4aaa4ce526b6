"""GRPOTrainer: reward rises on a learnable task with every loss type; the chunked log-probs,
the loss normalization and the reuse of old log-probs are checked against plain computations."""

from __future__ import annotations

import pytest
import torch
from grpo_helpers import (
    digit_reward_for,
    logged,
    naive_completion_logps,
    prompts,
    scripted_rollout,
    trainer_for,
)

from honelm.generation import SamplingParams, TransformersBackend, rollout
from honelm.methods.grpo import trainer as grpo_trainer_module
from honelm.rewards import RewardFunctionError


def _rows(dataset, num_prompts: int, generations: int) -> list[dict]:
    """A generation batch as the sampler yields it: each prompt ``generations`` times in a row."""
    return [dataset[i] for i in range(num_prompts) for _ in range(generations)]


def _sampled_reward(model, tokenizer, reward, dataset, n: int = 4) -> float:
    """Mean reward of ``n`` sampled completions (temperature 1) per held-out prompt."""
    torch.manual_seed(123)
    backend = TransformersBackend(model, tokenizer, SamplingParams(temperature=1.0), max_completion_length=8)
    out = rollout(backend, list(dataset["prompt"]), tokenizer, num_generations=n)
    values = reward(completions=out.completions, completion_ids=out.completion_ids)
    return sum(values) / len(values)


# ---- learning -----------------------------------------------------------------------------------


@pytest.mark.diagnostics_expected  # a toy task learned to one answer: entropy collapses and updates clip, as diagnosed
def test_reward_rises_and_the_policy_generalizes_to_held_out_prompts(tmp_path):
    trainer = trainer_for(tmp_path, max_steps=25)
    reward = digit_reward_for(trainer.processing_class)
    held_out = prompts(16, start=1000)
    before = _sampled_reward(trainer.model, trainer.processing_class, reward, held_out)
    trainer.train()
    rewards = logged(trainer, "reward")
    assert len(rewards) == 25
    assert sum(rewards[:3]) / 3 < 0.3 and sum(rewards[-3:]) / 3 > 0.8, rewards
    after = _sampled_reward(trainer.model, trainer.processing_class, reward, held_out)
    assert before < 0.3 and after > 0.8, (before, after)
    entropy = logged(trainer, "entropy")
    assert entropy[-1] < entropy[0] - 2.0  # the policy concentrated on the rewarded tokens


@pytest.mark.parametrize(
    "options",
    [
        {"loss_type": "grpo"},
        {"loss_type": "bnpo"},
        {"loss_type": "dr_grpo"},
        {"loss_type": "dapo", "epsilon_high": 0.28, "delta": 1.5},
        {"loss_type": "cispo", "epsilon_high": 5.0},
        {"loss_type": "sapo"},
        {"loss_type": "grpo", "importance_sampling_level": "sequence"},
    ],
    ids=lambda o: "-".join(f"{v}" for v in o.values()),
)
def test_every_loss_type_trains_end_to_end(tmp_path, options):
    trainer = trainer_for(tmp_path, max_steps=14, **options)
    trainer.train()
    rewards = logged(trainer, "reward")
    losses = logged(trainer, "loss")
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.08, rewards


# ---- the loss against plain computations ----------------------------------------------------


def test_chunked_logps_match_full_logits_with_gradients(tmp_path):
    trainer = trainer_for(tmp_path, temperature=0.7, rollout_func=scripted_rollout_for_tests())
    chunk = trainer._generate_and_score(_rows(trainer.train_dataset, 2, 8), "train")[0]
    model = trainer.model
    model.zero_grad()
    fast, _ = trainer._completion_logps(model, chunk)
    weights = torch.randn(fast.shape, generator=torch.Generator().manual_seed(0))
    (fast * weights).sum().backward()
    fast_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    plain = naive_completion_logps(model, chunk, temperature=0.7)
    (plain * weights).sum().backward()
    assert chunk["loss_mask"].sum() > 20 and (chunk["loss_mask"] == 0).any()  # ragged: padding is skipped
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(fast_grads[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)


def scripted_rollout_for_tests():
    from honelm.testing import tiny_tokenizer

    return scripted_rollout(tiny_tokenizer())


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_loss_value_matches_hand_aggregation(tmp_path, loss_type):
    """On-policy every ratio is 1, so each token's loss is -A of its completion; the loss types
    differ only in how those terms are averaged (completions here have 3 to 7 tokens)."""
    trainer = trainer_for(tmp_path, loss_type=loss_type, per_device_train_batch_size=8, num_generations=4,
                          rollout_func=scripted_rollout_for_tests(), max_completion_length=16)
    chunk = trainer._generate_and_score(_rows(trainer.train_dataset, 2, 4), "train")[0]
    mask, adv = chunk["loss_mask"].float(), chunk["advantages"]
    lengths = mask.sum(1)
    ids = [row[: int(n)] for row, n in zip(chunk["completion_ids"].tolist(), lengths.tolist())]
    rewards = torch.tensor(digit_reward_for(trainer.processing_class)(None, ids))
    grouped = rewards.view(2, 4)
    expected_adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).reshape(-1)
    torch.testing.assert_close(adv, expected_adv, atol=1e-5, rtol=1e-5)
    assert len(set(lengths.tolist())) > 2
    per_token = -adv.unsqueeze(1) * mask  # (B, T)
    expected = {
        "grpo": (per_token.sum(1) / lengths).mean(),
        "bnpo": per_token.sum() / mask.sum(),
        "dr_grpo": per_token.sum() / (8 * 16),
        "dapo": per_token.sum() / mask.sum(),
    }[loss_type]
    loss = trainer.compute_loss(trainer.model, chunk)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)


def test_dapo_normalizes_over_the_whole_accumulated_step(tmp_path):
    """One micro-batch of 16 completions and two accumulated micro-batches of 8 take the same
    optimizer step (SGD: the update is the gradient)."""
    params = []
    for batch, accumulation in ((16, 1), (8, 2)):
        trainer = trainer_for(tmp_path, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                              rollout_func=scripted_rollout_for_tests(), max_steps=1, optim="sgd",
                              learning_rate=1.0, max_grad_norm=0.0, shuffle_dataset=False)
        trainer.train()
        params.append({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    changed = sum(float((params[0][n] - p.detach()).abs().sum()) for n, p in trainer_for(tmp_path).model.named_parameters())
    assert changed > 1e-3  # the step did something
    for name in params[0]:
        torch.testing.assert_close(params[0][name], params[1][name], atol=1e-6, rtol=1e-5, msg=name)


# ---- generation rounds and old log-probs -----------------------------------------------------


def test_num_iterations_reuses_the_old_logps_computed_once_per_round(tmp_path, monkeypatch):
    seen = []
    original = grpo_trainer_module.grpo_loss

    def spy(logps, old_logps, *args, **kwargs):
        seen.append((logps.detach().clone(), None if old_logps is None else old_logps.clone()))
        return original(logps, old_logps, *args, **kwargs)

    monkeypatch.setattr(grpo_trainer_module, "grpo_loss", spy)
    trainer = trainer_for(tmp_path, num_iterations=2, max_steps=4, optim="sgd", learning_rate=0.5,
                          rollout_func=scripted_rollout_for_tests())
    rounds = []
    original_round = trainer._generate_and_score
    trainer._generate_and_score = lambda rows, mode: rounds.append(mode) or original_round(rows, mode)
    trainer.train()
    assert rounds == ["train", "train"]  # 4 steps, 2 iterations per round
    assert len(seen) == 4 and all(old is not None for _, old in seen)
    for first, second in ((0, 1), (2, 3)):
        (logps_1, old_1), (logps_2, old_2) = seen[first], seen[second]
        torch.testing.assert_close(old_1, logps_1, atol=1e-6, rtol=1e-6)  # computed before any update
        assert torch.equal(old_2, old_1)  # the second iteration reuses them, not recomputed
        assert (logps_2 - old_2).abs().max() > 1e-3  # while the policy has moved: ratios != 1


@pytest.mark.diagnostics_expected  # a toy task learned to one answer: entropy collapses and updates clip, as diagnosed
def test_one_round_feeds_steps_per_generation_steps(tmp_path):
    trainer = trainer_for(tmp_path, per_device_train_batch_size=8, steps_per_generation=4, max_steps=8)
    assert trainer.args.generation_batch_size == 32
    calls = []
    original = trainer.backend.generate
    trainer.backend.generate = lambda ids, **kw: calls.append(len(ids)) or original(ids, **kw)
    trainer.train()
    assert calls == [32, 32]  # two rounds of 32 completions (4 prompts x 8) for 8 steps of 8
    assert trainer.state.global_step == 8


def test_on_policy_single_iteration_computes_no_old_logps(tmp_path):
    trainer = trainer_for(tmp_path)
    chunk = trainer._generate_and_score(_rows(trainer.train_dataset, 2, 8), "train")[0]
    assert "old_logps" not in chunk and "ref_logps" not in chunk


# ---- rewards ----------------------------------------------------------------------------------


def test_dataset_columns_reach_the_reward_functions(tmp_path):
    received = {}

    def uses_columns(prompts, completions, completion_ids, target, trainer_state, **kwargs):
        received.update(prompts=list(prompts), target=list(target), step=trainer_state.global_step, keys=set(kwargs))
        return [1.0 if c.startswith(t) else 0.0 for c, t in zip(completions, target)]

    data = prompts(16, target=[str(i % 10) for i in range(16)], completion=["x"] * 16)
    trainer = trainer_for(tmp_path, reward_funcs=[uses_columns], train_dataset=data, max_steps=1,
                          shuffle_dataset=False)
    trainer.train()
    assert received["prompts"] == [p for p in data["prompt"][:2] for _ in range(8)]
    assert received["target"] == [t for t in data["target"][:2] for _ in range(8)]
    assert received["step"] == 0 and "completion" not in received["keys"]  # a `completion` column is not passed


def test_several_reward_functions_with_weights_and_none(tmp_path):
    def half(completions, **kwargs):
        return [0.5] * len(completions)

    def sometimes(completions, **kwargs):
        return [None if i % 2 else 1.0 for i in range(len(completions))]

    trainer = trainer_for(tmp_path, reward_funcs=[half, sometimes], reward_weights=[2.0, 3.0], max_steps=1)
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["rewards/half/mean"] == 0.5 and log["rewards/sometimes/mean"] == 1.0
    assert log["reward"] == pytest.approx(1.0 + 3.0 * 0.5)  # None counts as absent in the weighted sum


def test_a_raising_reward_function_stops_training_naming_it_and_the_sample(tmp_path):
    def fragile(prompts, completions, **kwargs):
        return [1.0 / (0 if p.endswith(" 3") else 1) for p in prompts]

    trainer = trainer_for(tmp_path, reward_funcs=[fragile], max_steps=2, shuffle_dataset=False,
                          per_device_train_batch_size=32)
    with pytest.raises(RewardFunctionError, match=r"'fragile' raised ZeroDivisionError.*sample 24.*Say something 3"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_a_reward_function_is_required(tmp_path):
    with pytest.raises(ValueError, match="needs `reward_funcs`"):
        trainer_for(tmp_path, reward_funcs=[])
