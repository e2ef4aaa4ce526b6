"""The Bradley-Terry reward loss against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from honelm.methods.reward.loss import bradley_terry_loss


def _neg_log_sigmoid(x: float) -> float:
    return -math.log(1.0 / (1.0 + math.exp(-x)))


def test_plain_loss_matches_hand_computation() -> None:
    chosen, rejected = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 1.0, -1.0])
    loss, metrics = bradley_terry_loss(chosen, rejected)
    expected = (_neg_log_sigmoid(2.0) + _neg_log_sigmoid(-1.0) + _neg_log_sigmoid(0.0)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["accuracy"].item() == pytest.approx(1 / 3)  # the tie counts as wrong
    assert metrics["margin"].item() == pytest.approx((2.0 - 1.0 + 0.0) / 3)


def test_margin_is_subtracted_from_the_reward_difference() -> None:
    chosen, rejected = torch.tensor([2.0, 0.5]), torch.tensor([0.0, 1.0])
    margin = torch.tensor([1.5, -0.25])
    loss, metrics = bradley_terry_loss(chosen, rejected, margin)
    expected = (_neg_log_sigmoid(2.0 - 1.5) + _neg_log_sigmoid(-0.5 + 0.25)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["margin"].item() == pytest.approx((2.0 - 0.5) / 2)  # the reward gap, not the margin column


def test_centering_term_adds_eta_times_mean_squared_sum() -> None:
    chosen, rejected = torch.tensor([2.0, -1.0]), torch.tensor([1.0, -3.0])
    plain, _ = bradley_terry_loss(chosen, rejected)
    centered, _ = bradley_terry_loss(chosen, rejected, center_rewards_coefficient=0.1)
    assert (centered - plain).item() == pytest.approx(0.1 * ((2 + 1) ** 2 + (-1 - 3) ** 2) / 2, rel=1e-6)
    zero, _ = bradley_terry_loss(chosen, rejected, center_rewards_coefficient=0.0)
    assert zero.item() == plain.item()


def test_gradients_match_a_naive_reference() -> None:
    torch.manual_seed(0)
    chosen = torch.randn(6, dtype=torch.float64, requires_grad=True)
    rejected = torch.randn(6, dtype=torch.float64, requires_grad=True)
    margin = torch.rand(6, dtype=torch.float64)
    loss, _ = bradley_terry_loss(chosen, rejected, margin, center_rewards_coefficient=0.05)
    grads = torch.autograd.grad(loss, (chosen, rejected))
    c, r = chosen.detach().clone().requires_grad_(), rejected.detach().clone().requires_grad_()
    naive = -torch.log(torch.sigmoid(c - r - margin)).mean() + 0.05 * ((c + r) ** 2).mean()
    naive_grads = torch.autograd.grad(naive, (c, r))
    assert loss.item() == pytest.approx(naive.item(), rel=1e-12)
    for got, want in zip(grads, naive_grads):
        torch.testing.assert_close(got, want)


def test_extreme_rewards_stay_finite() -> None:
    loss, _ = bradley_terry_loss(torch.tensor([-200.0, 200.0]), torch.tensor([200.0, -200.0]))
    assert loss.item() == pytest.approx(400.0 / 2, rel=1e-6)  # -log sigma(-400) = 400, -log sigma(400) = 0


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"must both have shape \(B,\)"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(2))
