"""RLOO advantages, KL estimates and loss against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from honelm.methods.rloo.loss import (
    k3_kl,
    kl_penalized_rewards,
    leave_one_out_advantages,
    normalize_advantages,
    rloo_loss,
    sampling_correction,
    sequence_kl,
)

NAN = float("nan")


def _close(actual: torch.Tensor, expected: list[float], atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected), atol=atol, rtol=0, equal_nan=True)


# ---- advantages -------------------------------------------------------------------------------


def test_leave_one_out_baseline_is_the_mean_of_the_other_completions() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 1.0, 1.0])  # two prompts, 4 completions each
    # group 1: 1 - (2+3+6)/3, 2 - (1+3+6)/3, 3 - (1+2+6)/3, 6 - (1+2+3)/3
    # group 2: 0 - 2/3, 0 - 2/3, 1 - 1/3, 1 - 1/3
    _close(leave_one_out_advantages(rewards, 4), [-8 / 3, -4 / 3, 0.0, 4.0, -2 / 3, -2 / 3, 2 / 3, 2 / 3])
    # the identity A_i = G / (G - 1) * (r_i - mean r)
    grouped = rewards.view(2, 4)
    expected = (4 / 3 * (grouped - grouped.mean(1, keepdim=True))).reshape(-1)
    torch.testing.assert_close(leave_one_out_advantages(rewards, 4), expected)


def test_unscored_completions_are_left_out_of_the_baselines() -> None:
    rewards = torch.tensor([1.0, NAN, 3.0, 5.0, NAN, 2.0, NAN, NAN])
    # group 1: baselines over the scored others only: 1 - (3+5)/2, NaN, 3 - (1+5)/2, 5 - (1+3)/2
    # group 2: the only scored completion has no sibling to compare with
    _close(leave_one_out_advantages(rewards, 4), [-3.0, NAN, 0.0, 3.0, NAN, NAN, NAN, NAN])


def test_leave_one_out_rejects_bad_groups() -> None:
    with pytest.raises(ValueError, match="at least 2 completions"):
        leave_one_out_advantages(torch.ones(4), 1)
    with pytest.raises(ValueError, match="do not split into groups of num_generations=4"):
        leave_one_out_advantages(torch.ones(6), 4)


def test_normalize_advantages_standardizes_over_the_batch_and_keeps_nan() -> None:
    eps = 1e-4
    # mean 2, unbiased std 1
    _close(normalize_advantages(torch.tensor([1.0, 2.0, 3.0, NAN]), eps), [-1 / (1 + eps), 0.0, 1 / (1 + eps), NAN])


# ---- KL ---------------------------------------------------------------------------------------


def test_sequence_kl_sums_the_log_ratio_over_counted_tokens() -> None:
    logps = torch.tensor([[-1.0, -2.0, -3.0]])
    ref = torch.tensor([[-1.5, -1.0, -9.0]])
    mask = torch.tensor([[1, 1, 0]])
    _close(sequence_kl(logps, ref, mask), [0.5 - 1.0])  # the third token is not counted
    _close(kl_penalized_rewards(torch.tensor([2.0]), torch.tensor([-0.5]), 0.1), [2.05])


def test_k3_matches_its_formula_and_is_never_negative() -> None:
    logps = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-2.0, -1.0, -0.5])
    # d = ref - logp: -1, 1, 0 -> e^d - d - 1
    _close(k3_kl(logps, ref), [math.exp(-1) + 1 - 1, math.e - 1 - 1, 0.0])
    assert (k3_kl(torch.randn(100), torch.randn(100)) >= 0).all()


# ---- loss -------------------------------------------------------------------------------------

LOGPS = [[-1.0, -2.0], [-0.5, -0.5]]
OLD = [[-1.1, -2.0], [-0.5, -0.3]]
MASK = [[1, 1], [1, 0]]
ADV = [2.0, -1.0]


def test_loss_with_unclipped_ratio() -> None:
    logps = torch.tensor(LOGPS, requires_grad=True)
    loss, metrics = rloo_loss(logps, torch.tensor(OLD), torch.tensor(ADV), torch.tensor(MASK), epsilon=0.2)
    # sequence log-ratios: 0.1 + 0 = 0.1 (row 0), 0 (row 1: its second token is masked)
    r0 = math.exp(0.1)
    expected = (-(r0 * 2.0) + 1.0) / 2  # -min(r A, clip(r) A) averaged over the 2 completions
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics["clip_ratio/region_mean"].item() == 0.0
    loss.backward()
    # d/dlogp of -r A / B = -A r / B on counted tokens; nothing on the masked one
    _close(logps.grad, [[-r0, -r0], [0.5, 0.0]])


def test_loss_clips_the_sequence_ratio_and_stops_its_gradient() -> None:
    logps = torch.tensor(LOGPS, requires_grad=True)
    loss, metrics = rloo_loss(logps, torch.tensor(OLD), torch.tensor(ADV), torch.tensor(MASK), epsilon=0.05)
    # row 0: ratio e^0.1 = 1.105 > 1.05 with A > 0: clipped to 1.05
    assert loss.item() == pytest.approx((-1.05 * 2.0 + 1.0) / 2, abs=1e-6)
    assert metrics["clip_ratio/high_mean"].item() == 0.5
    assert metrics["clip_ratio/low_mean"].item() == 0.0
    assert metrics["clip_ratio/region_mean"].item() == 0.5
    loss.backward()
    _close(logps.grad, [[0.0, 0.0], [0.5, 0.0]])
    # an asymmetric range: epsilon_high lets the same ratio through
    loss_high, _ = rloo_loss(torch.tensor(LOGPS), torch.tensor(OLD), torch.tensor(ADV), torch.tensor(MASK),
                             epsilon=0.05, epsilon_high=0.2)
    assert loss_high.item() == pytest.approx((-math.exp(0.1) * 2.0 + 1.0) / 2, abs=1e-6)


def test_low_clip_counts_negative_advantages_only() -> None:
    logps = torch.tensor([[-2.0], [-2.0]])
    old = torch.tensor([[-1.0], [-1.0]])  # ratio e^-1 = 0.37 < 0.8
    loss, metrics = rloo_loss(logps, old, torch.tensor([1.0, -1.0]), torch.ones(2, 1), epsilon=0.2)
    # A > 0: -min(0.37, 0.8) = -0.37; A < 0: -min(-0.37, -0.8) = 0.8 (the pessimistic bound)
    assert loss.item() == pytest.approx((-math.exp(-1) + 0.8) / 2, abs=1e-6)
    assert metrics["clip_ratio/low_mean"].item() == 0.5 and metrics["clip_ratio/high_mean"].item() == 0.0


def test_first_update_is_reinforce_with_the_leave_one_out_baseline() -> None:
    torch.manual_seed(0)
    logps = (-torch.rand(4, 3)).requires_grad_()
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0])
    advantages = leave_one_out_advantages(rewards, 4)
    loss, _ = rloo_loss(logps, None, advantages, mask)  # old_logps=None: ratio 1
    loss.backward()
    # grad of -(1/B) sum_i A_i log pi(y_i): -A_i / B on each counted token of completion i
    torch.testing.assert_close(logps.grad, -advantages.unsqueeze(1) / 4 * mask)
    assert loss.item() == pytest.approx(-advantages.mean().item(), abs=1e-6)


def test_kl_in_the_loss_adds_beta_times_the_summed_k3() -> None:
    ref = torch.tensor([[-1.0, -1.0], [-1.0, 0.0]])
    loss, metrics = rloo_loss(torch.tensor(LOGPS), torch.tensor(OLD), torch.tensor(ADV), torch.tensor(MASK),
                              beta=0.1, ref_logps=ref)
    k3_row0 = 0.0 + (math.e - 1 - 1)  # d = 0, then d = 1
    k3_row1 = math.exp(-0.5) + 0.5 - 1  # d = -0.5; the masked token does not count
    policy = (-(math.exp(0.1) * 2.0) + 1.0) / 2
    assert loss.item() == pytest.approx(policy + 0.1 * (k3_row0 + k3_row1) / 2, abs=1e-6)
    assert metrics["kl"].item() == pytest.approx((k3_row0 + k3_row1) / 3, abs=1e-6)  # per counted token
    with pytest.raises(ValueError, match="needs ref_logps"):
        rloo_loss(torch.tensor(LOGPS), None, torch.tensor(ADV), torch.tensor(MASK), beta=0.1)


def test_a_completion_without_counted_tokens_adds_nothing() -> None:
    loss, _ = rloo_loss(torch.tensor(LOGPS), torch.tensor(OLD), torch.tensor(ADV), torch.tensor([[1, 1], [0, 0]]))
    assert loss.item() == pytest.approx(-math.exp(0.1) * 2.0 / 2, abs=1e-6)  # row 1's -A * 1 is dropped


def test_sequence_weights_scale_the_policy_term() -> None:
    base, _ = rloo_loss(torch.tensor(LOGPS), torch.tensor(OLD), torch.tensor(ADV), torch.tensor(MASK))
    weighted, _ = rloo_loss(torch.tensor(LOGPS), torch.tensor(OLD), torch.tensor(ADV), torch.tensor(MASK),
                            sequence_weights=torch.tensor([0.0, 1.0]))
    assert weighted.item() == pytest.approx(1.0 / 2)  # only row 1's term (-(-1) * 1) remains
    assert base.item() != weighted.item()


def test_sampling_correction_truncates_or_masks_sequence_weights() -> None:
    old = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]])
    sampler = torch.tensor([[-1.5, -1.0], [-1.1, -7.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    ratios = [math.exp(0.5), math.exp(0.1)]  # row 1's second token is not counted
    weights, info = sampling_correction(old, sampler, mask, "sequence_truncate", 0.0, 1.5)
    _close(weights, [1.5, ratios[1]])
    _close(info["ratio"], ratios)
    weights, info = sampling_correction(old, sampler, mask, "sequence_mask", 0.0, 1.5)
    _close(weights, [0.0, ratios[1]])
    assert info["outside"].tolist() == [True, False]
    with pytest.raises(ValueError, match="must be one of"):
        sampling_correction(old, sampler, mask, "token_mask")
