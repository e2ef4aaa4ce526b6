"""GRPOConfig: TRL's field names and defaults, the generation-batch arithmetic, errors that name
the field; the trainer's advantages under each reward scaling and aggregation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from grpo_helpers import config, prompts, trainer_for

from honelm.methods.grpo import GRPOConfig, RepeatSampler
from honelm.rewards import aggregate_rewards

# Fields whose default deliberately differs from TRL 1.x's GRPOConfig (see docs/grpo.md).
_DIFFERENT = {"gradient_checkpointing"}


def test_field_names_and_defaults_match_trl():
    trl = pytest.importorskip("trl")
    ours = {f.name: f for f in dataclasses.fields(GRPOConfig)}
    theirs = {f.name: f for f in dataclasses.fields(trl.GRPOConfig)}
    own = set(GRPOConfig.__annotations__)  # the fields GRPOConfig declares (or re-declares)
    shared = sorted(own & set(theirs))
    assert len(shared) >= 50, shared
    for name in shared:
        if name in _DIFFERENT:
            continue
        assert ours[name].default == theirs[name].default, (name, ours[name].default, theirs[name].default)
    assert sorted(own - set(theirs)) == [
        "diagnostics", "diagnostics_silence", "diagnostics_stop_on", "diagnostics_thresholds",
        "max_prompt_length", "tool_timeout",
    ]
    for name in ("loss_type", "beta", "num_generations", "epsilon_high", "vllm_importance_sampling_mode", "entropy_coef"):
        assert name in shared


def test_defaults_that_matter():
    args = GRPOConfig(output_dir="unused", use_cpu=True, report_to="none")
    assert (args.loss_type, args.beta, args.num_iterations, args.scale_rewards) == ("dapo", 0.0, 1, "group")
    assert args.gradient_checkpointing is False and args.bf16 is False  # no bf16 accelerator here
    assert args.remove_unused_columns is False and args.learning_rate == 1e-6
    assert args.steps_per_generation == 1 and args.generation_batch_size == 8  # 8 completions, one micro-batch


def test_generation_batch_and_steps_per_generation_determine_each_other(tmp_path):
    args = config(tmp_path, per_device_train_batch_size=8, gradient_accumulation_steps=2)
    assert (args.steps_per_generation, args.generation_batch_size) == (2, 16)
    args = config(tmp_path, per_device_train_batch_size=8, generation_batch_size=32)
    assert args.steps_per_generation == 4
    args = config(tmp_path, per_device_train_batch_size=8, steps_per_generation=3, num_generations=4)
    assert args.generation_batch_size == 24


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"generation_batch_size": 32, "steps_per_generation": 2}, "not both"),
        ({"per_device_train_batch_size": 8, "generation_batch_size": 20}, "multiple of per_device_train_batch_size"),
        ({"per_device_train_batch_size": 6}, "multiple of num_generations=8"),
        ({"num_generations": 1, "per_device_train_batch_size": 4}, "num_generations=1 must be >= 2"),
        ({"loss_type": "ppo"}, "loss_type='ppo' is not supported. Choose one of: grpo, bnpo"),
        ({"scale_rewards": "group_std"}, "scale_rewards='group_std'"),
        ({"delta": 1.1}, "delta=1.1 must be > 1 \\+ epsilon_high"),
        ({"top_entropy_quantile": 1.5}, "top_entropy_quantile=1.5 must be in \\[0, 1\\]"),
        ({"generation_kwargs": {"num_beams": 4}}, "\\['num_beams'\\] cannot be applied"),
        ({"vllm_importance_sampling_mode": "sequence"}, "vllm_importance_sampling_mode='sequence'"),
        ({"eval_strategy": "steps", "per_device_eval_batch_size": 6}, "evaluation batch of 6"),
    ],
)
def test_bad_values_name_the_field(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **kwargs)


def test_trl_boolean_scale_rewards(tmp_path):
    assert config(tmp_path, scale_rewards=True).scale_rewards == "group"
    assert config(tmp_path, scale_rewards=False).scale_rewards == "none"


def test_reward_weights_must_match_the_functions(tmp_path):
    with pytest.raises(ValueError, match="reward_weights has 2 values for 1 reward functions"):
        trainer_for(tmp_path, reward_weights=[1.0, 2.0])


def test_repeat_sampler_order():
    sampler = RepeatSampler(5, num_generations=2, prompts_per_round=2, repeats=3, shuffle=False)
    assert list(sampler) == [0, 0, 1, 1] * 3 + [2, 2, 3, 3] * 3  # prompt 4 is an incomplete round: dropped
    assert len(sampler) == len(list(sampler))
    shuffled = RepeatSampler(6, num_generations=2, prompts_per_round=3, shuffle=True, seed=1)
    first, second = list(shuffled), list(shuffled)
    assert first != second and sorted(first) == sorted(second) == sorted(list(range(6)) * 2)  # a new order per epoch
    shuffled.set_epoch(0)
    assert list(shuffled) == first
    with pytest.raises(ValueError, match="fewer than the 4 prompts of one generation round"):
        RepeatSampler(3, num_generations=2, prompts_per_round=4)


# ---- advantages as the trainer computes them --------------------------------------------------


def _scripted(tmp_path, **kwargs):
    def fixed(completions, **kw):
        return [float(i % 4) ** 2 for i in range(len(completions))]  # 0, 1, 4, 9 in each group of 4

    def other(completions, **kw):
        return [1.0 if i % 2 else None for i in range(len(completions))]

    return trainer_for(tmp_path, reward_funcs=[fixed, other], num_generations=4, per_device_train_batch_size=8,
                       reward_weights=[1.0, 2.0], **kwargs)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_under_each_reward_scaling(tmp_path, scale):
    trainer = _scripted(tmp_path, scale_rewards=scale)
    chunk = trainer._generate_and_score([prompts(2)[i] for i in range(2) for _ in range(4)], "train")[0]
    total = torch.tensor([0.0, 1 + 2, 4.0, 9 + 2] * 2)  # weighted sum; None left out
    centered = total - total.view(2, 4).mean(1).repeat_interleave(4)
    expected = {
        "group": centered / (total.view(2, 4).std(1).repeat_interleave(4) + 1e-4),
        "batch": centered / (total.std() + 1e-4),
        "none": centered,
    }[scale]
    torch.testing.assert_close(chunk["advantages"], expected)
    assert trainer._metrics["train"]["reward"] == [pytest.approx(total.mean().item())]


def test_normalize_then_sum_uses_the_aggregated_rewards_as_advantages(tmp_path):
    trainer = _scripted(tmp_path, multi_objective_aggregation="normalize_then_sum")
    chunk = trainer._generate_and_score([prompts(2)[i] for i in range(2) for _ in range(4)], "train")[0]
    per_func = torch.tensor([[0.0, float("nan")], [1.0, 1.0], [4.0, float("nan")], [9.0, 1.0]] * 2)
    expected = aggregate_rewards(per_func, [1.0, 2.0], aggregation="normalize_then_sum", num_generations=4)
    torch.testing.assert_close(chunk["advantages"], expected)
