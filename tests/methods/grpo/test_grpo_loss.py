"""GRPO losses and advantages against values worked out by hand (plain Python arithmetic)."""

from __future__ import annotations

import math

import pytest
import torch

from honelm.methods.grpo import loss as L


def t(x):
    return torch.tensor(x, dtype=torch.float32)


# --------------------------------------------------------------------------- advantages


def test_group_advantages_scaled_by_group_std():
    rewards = t([1.0, 0.0, 0.0, 1.0, 2.0, 2.0])  # groups of 2: [1,0] [0,1] [2,2]
    adv, m = L.group_advantages(rewards, 2, "group", eps=0.0 + 1e-4)
    s = math.sqrt(0.5)  # unbiased std of {1, 0}
    expected = [0.5 / (s + 1e-4), -0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0.5 / (s + 1e-4), 0.0, 0.0]
    torch.testing.assert_close(adv, t(expected))
    torch.testing.assert_close(m["reward_std"], t((s + s + 0.0) / 3))
    torch.testing.assert_close(m["frac_reward_zero_std"], t(1 / 3))


def test_group_advantages_batch_and_none_scaling():
    rewards = t([3.0, 1.0, 0.0, 0.0])
    adv_none, _ = L.group_advantages(rewards, 2, "none")
    torch.testing.assert_close(adv_none, t([1.0, -1.0, 0.0, 0.0]))
    mean = 1.0
    batch_std = math.sqrt(((3 - mean) ** 2 + (1 - mean) ** 2 + 1 + 1) / 3)
    adv_batch, _ = L.group_advantages(rewards, 2, "batch")
    torch.testing.assert_close(adv_batch, t([1.0, -1.0, 0.0, 0.0]) / (batch_std + 1e-4))


def test_group_advantages_reject_bad_groups():
    with pytest.raises(ValueError, match="num_generations=4"):
        L.group_advantages(t([1.0, 2.0, 3.0]), 4)
    with pytest.raises(ValueError, match="scale_rewards"):
        L.group_advantages(t([1.0, 2.0]), 2, "std")


def test_rloo_advantages_leave_one_out():
    rewards = t([1.0, 2.0, 6.0])  # one group of 3
    adv = L.rloo_advantages(rewards, 3)
    torch.testing.assert_close(adv, t([1 - 4.0, 2 - 3.5, 6 - 1.5]))
    norm = L.rloo_advantages(rewards, 3, normalize=True)
    raw = [-3.0, -1.5, 4.5]
    m = sum(raw) / 3
    sd = math.sqrt(sum((x - m) ** 2 for x in raw) / 2)
    torch.testing.assert_close(norm, t([(x - m) / (sd + 1e-4) for x in raw]))
    with pytest.raises(ValueError, match="num_generations >= 2"):
        L.rloo_advantages(rewards, 1)


# --------------------------------------------------------------------------- ratios and KL


def test_sequence_level_ratio_is_mean_of_counted_token_log_ratios():
    logps = t([[-1.0, -2.0, -3.0]])
    old = t([[-1.5, -1.0, -9.0]])
    mask = t([[1.0, 1.0, 0.0]])
    seq = L.importance_log_ratio(logps, old, mask, "sequence")
    torch.testing.assert_close(seq, t([[(0.5 + -1.0) / 2]]))
    tok = L.importance_log_ratio(logps, old, mask, "token")
    torch.testing.assert_close(tok, t([[0.5, -1.0, 6.0]]))


def test_k3_kl_by_hand():
    kl = L.k3_kl(t([-1.0, -2.0]), t([-1.5, -2.0]))
    torch.testing.assert_close(kl, t([math.exp(-0.5) + 0.5 - 1.0, 0.0]))


# --------------------------------------------------------------------------- objectives


def test_clipped_surrogate_by_hand():
    # ratios 1.5 (A=+1: clipped at 1.2), 0.5 (A=-1: clipped at 0.8), 1.1 (inside)
    log_ratio = t([[math.log(1.5), math.log(0.5), math.log(1.1)]])
    loss, clip = L.clipped_surrogate(log_ratio.expand(2, 3), t([1.0, -1.0]), 0.2, 0.2)
    # row A=+1: -min(r, clip(r)) ; row A=-1: -min(-r, -clip(r)) = max(r, clip(r))
    torch.testing.assert_close(loss[0], t([-1.2, -0.5, -1.1]))
    torch.testing.assert_close(loss[1], t([1.5, 0.8, 1.1]))
    assert clip["high"].tolist() == [[True, False, False], [False, False, False]]
    assert clip["low"].tolist() == [[False, False, False], [False, True, False]]


def test_two_sided_clip_caps_negative_advantage_ratio():
    log_ratio = t([[math.log(5.0)]])
    loss, _ = L.clipped_surrogate(log_ratio, t([-1.0]), 0.2, 0.2, delta=3.0)
    torch.testing.assert_close(loss, t([[3.0]]))  # max(min(5, 3), 1.2) = 3


def test_cispo_weight_is_clipped_and_detached():
    logps = t([[-1.0, -2.0]]).requires_grad_()
    old = t([[-2.0, -2.0]])  # ratios e and 1
    log_ratio = L.importance_log_ratio(logps, old, torch.ones(1, 2), "token")
    loss, clip = L.cispo_objective(logps, log_ratio, t([2.0]), max_ratio=2.0)
    torch.testing.assert_close(loss, t([[-2.0 * 2.0 * -1.0, -1.0 * 2.0 * -2.0]]))
    loss.sum().backward()
    torch.testing.assert_close(logps.grad, t([[-2.0 * 2.0, -1.0 * 2.0]]))  # d/dlogp = -w A
    assert clip["high"].tolist() == [[True, False]]


def test_sapo_gate_by_hand_and_unit_slope_at_ratio_one():
    r = 1.3
    log_ratio = t([[math.log(r)], [math.log(r)]])
    loss, _ = L.sapo_objective(log_ratio, t([1.0, -1.0]), temperature_pos=1.0, temperature_neg=2.0)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    torch.testing.assert_close(loss, t([[-sig(0.3) * 4.0], [sig(2 * 0.3) * 2.0]]))
    # at r = 1 the gradient with respect to log pi equals the unclipped policy gradient (-A)
    logps = t([[-1.0]]).requires_grad_()
    lr = L.importance_log_ratio(logps, logps.detach(), torch.ones(1, 1), "token")
    L.sapo_objective(lr, t([1.0]), 1.0, 1.05)[0].sum().backward()
    torch.testing.assert_close(logps.grad, t([[-1.0]]))


# --------------------------------------------------------------------------- aggregation


@pytest.mark.parametrize(
    "loss_type,expected",
    [
        ("grpo", ((1 + 2) / 2 + 4 / 1) / 2),
        ("sapo", ((1 + 2) / 2 + 4 / 1) / 2),
        ("bnpo", (1 + 2 + 4) / 3),
        ("dr_grpo", (1 + 2 + 4) / (2 * 4)),
        ("dapo", (1 + 2 + 4) / 10),
        ("cispo", (1 + 2 + 4) / 10),
    ],
)
def test_aggregation_by_hand(loss_type, expected):
    per_token = t([[1.0, 2.0, 99.0, 99.0], [4.0, 99.0, 99.0, 99.0]])
    mask = t([[1, 1, 0, 0], [1, 0, 0, 0]])
    got = L.aggregate(per_token, mask, loss_type, max_completion_length=4, num_items=10)
    torch.testing.assert_close(got, t(expected))


def test_dapo_without_num_items_uses_local_count_and_dr_grpo_needs_length():
    per_token, mask = t([[1.0, 3.0]]), t([[1.0, 1.0]])
    torch.testing.assert_close(L.aggregate(per_token, mask, "dapo"), t(2.0))
    with pytest.raises(ValueError, match="max_completion_length"):
        L.aggregate(per_token, mask, "dr_grpo")


# --------------------------------------------------------------------------- full loss


def test_on_policy_grpo_loss_gradient_is_advantage_weighted_logp_gradient():
    """With old = current, every ratio is 1: the loss value is -mean(A) and its gradient with
    respect to each counted log-prob is -A / (tokens of the sequence * B) for ``grpo``."""
    logps = t([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]]).requires_grad_()
    mask = t([[1, 1, 1], [1, 1, 0]])
    adv = t([2.0, -1.0])
    loss, m = L.grpo_loss(logps, None, adv, mask, loss_type="grpo")
    torch.testing.assert_close(loss, t(-(2.0 + -1.0) / 2))
    loss.backward()
    torch.testing.assert_close(logps.grad, t([[-2 / 6] * 3, [1 / 4, 1 / 4, 0.0]]))
    assert m["clip_ratio/region_mean"].item() == 0.0


def test_grpo_loss_with_kl_and_old_logps_by_hand():
    logps = t([[math.log(0.5), math.log(0.25)]])
    old = t([[math.log(0.25), math.log(0.25)]])  # ratios 2 and 1
    ref = t([[math.log(0.5), math.log(0.5)]])
    mask = torch.ones(1, 2)
    loss, m = L.grpo_loss(logps, old, t([1.0]), mask, loss_type="bnpo", epsilon=0.2, beta=0.1, ref_logps=ref)
    kl = [0.0, 2.0 - math.log(2.0) - 1.0]  # exp(d) - d - 1 with d = ref - logp
    per_token = [-1.2 + 0.1 * kl[0], -1.0 + 0.1 * kl[1]]
    torch.testing.assert_close(loss, t(sum(per_token) / 2))
    torch.testing.assert_close(m["kl"], t(sum(kl) / 2))
    torch.testing.assert_close(m["clip_ratio/high_mean"], t(0.5))
    torch.testing.assert_close(m["policy_loss"], t((-1.2 - 1.0) / 2))


def test_sequence_level_ratio_in_full_loss():
    logps = t([[math.log(0.5), math.log(0.5)]])
    old = t([[math.log(0.25), math.log(1.0)]])  # token log-ratios log2 and -log2: sequence ratio 1
    loss, m = L.grpo_loss(logps, old, t([1.0]), torch.ones(1, 2), loss_type="grpo",
                          importance_sampling_level="sequence")
    torch.testing.assert_close(loss, t(-1.0))
    assert m["clip_ratio/region_mean"].item() == 0.0


def test_token_weights_and_entropy_bonus():
    logps = t([[-1.0, -1.0]])
    entropy = t([[2.0, 4.0]])
    loss, _ = L.grpo_loss(logps, None, t([1.0]), torch.ones(1, 2), loss_type="bnpo",
                          token_weights=t([[0.5, 1.0]]), entropy=entropy, entropy_coef=0.1)
    torch.testing.assert_close(loss, t(((-0.5 - 0.2) + (-1.0 - 0.4)) / 2))


def test_grpo_loss_errors_name_the_field():
    logps = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="loss_type"):
        L.grpo_loss(logps, None, t([1.0]), torch.ones(1, 2), loss_type="ppo")
    with pytest.raises(ValueError, match="ref_logps"):
        L.grpo_loss(logps, None, t([1.0]), torch.ones(1, 2), beta=0.1)


# --------------------------------------------------------------------------- masks


def test_top_entropy_mask_keeps_the_top_share_of_counted_tokens():
    entropy = t([[0.1, 0.9, 0.5, 7.0], [0.3, 0.7, 0.2, 0.0]])
    mask = t([[1, 1, 1, 0], [1, 1, 1, 0]])  # the 7.0 is padding and must not count
    kept = L.top_entropy_mask(entropy, mask, 0.5)
    # counted entropies sorted: .1 .2 .3 .5 .7 .9; the 0.5 quantile is 0.4 -> keep .5 .7 .9
    assert kept.tolist() == [[0, 1, 1, 0], [0, 1, 0, 0]]
    assert L.top_entropy_mask(entropy, mask, 1.0).tolist() == mask.tolist()
    assert L.top_entropy_mask(entropy, mask, 0.0).sum().item() == 1.0


@pytest.mark.parametrize("mode", L.SAMPLING_CORRECTIONS)
def test_sampling_correction_modes_by_hand(mode):
    old = t([[math.log(0.5), math.log(0.5)], [math.log(0.5), math.log(0.5)]])
    sampler = t([[math.log(0.1), math.log(0.5)], [math.log(0.5), math.log(0.4)]])
    mask = torch.ones(2, 2)
    w, _ = L.sampling_correction(old, sampler, mask, mode, clip_min=0.5, clip_max=2.0)
    if mode == "token_truncate":
        expected = [[2.0, 1.0], [1.0, 1.25]]
    elif mode == "token_mask":
        expected = [[0.0, 1.0], [1.0, 1.25]]
    elif mode == "sequence_truncate":
        expected = [[2.0], [1.25]]
    else:
        expected = [[0.0], [1.25]]
    torch.testing.assert_close(w, t(expected))
