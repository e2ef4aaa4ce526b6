"""KTO losses against values computed by hand (plain Python floats, no torch in the reference)."""

from __future__ import annotations

import math

import pytest
import torch

from honelm.methods.kto.loss import LOSSES, apo_zero_unpaired_loss, kl_estimate, kto_loss


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


POLICY = [-10.0, -12.5, -8.0, -20.0]
REF = [-11.0, -12.0, -9.5, -18.0]
LABELS = [True, False, True, False]


def _tensors(policy=POLICY, ref=REF, labels=LABELS, grad=False):
    p = torch.tensor(policy, dtype=torch.float64, requires_grad=grad)
    return p, torch.tensor(ref, dtype=torch.float64), torch.tensor(labels)


def _kto_by_hand(beta, kl, wd, wu, policy=POLICY, ref=REF, labels=LABELS):
    z0 = max(kl, 0.0)
    total = 0.0
    for p, r, y in zip(policy, ref, labels):
        ratio = p - r
        total += wd * (1 - _sigmoid(beta * (ratio - z0))) if y else wu * (1 - _sigmoid(beta * (z0 - ratio)))
    return total / len(policy)


@pytest.mark.parametrize("beta, kl, wd, wu", [(0.1, 0.3, 1.0, 1.0), (0.5, 1.7, 1.33, 1.0), (2.0, 0.0, 1.0, 0.5)])
def test_kto_loss_matches_the_paper_formula_by_hand(beta, kl, wd, wu):
    p, r, y = _tensors()
    kl = torch.tensor(kl, dtype=torch.float64)
    loss, metrics = kto_loss(p, r, y, kl, beta=beta, desirable_weight=wd, undesirable_weight=wu)
    assert loss.item() == pytest.approx(_kto_by_hand(beta, kl.item(), wd, wu), rel=1e-12)
    assert metrics["kl"].item() == pytest.approx(kl.item())


def test_kto_loss_example_worked_out():
    # beta=1, z0=1: desirable row with r=1 has loss 1 - sigma(0) = 0.5; undesirable row with r=-1 has
    # loss 1 - sigma(1 - (-1)) = 1 - sigma(2); mean of the two.
    policy, ref, labels = torch.tensor([0.0, -3.0]), torch.tensor([-1.0, -2.0]), torch.tensor([True, False])
    loss, _ = kto_loss(policy, ref, labels, 1.0, beta=1.0)
    assert loss.item() == pytest.approx((0.5 + 1 - _sigmoid(2.0)) / 2, rel=1e-6)


def test_negative_kl_estimates_are_clamped_at_zero():
    p, r, y = _tensors()
    clamped, metrics = kto_loss(p, r, y, torch.tensor(-2.5), beta=0.3)
    zero, _ = kto_loss(p, r, y, torch.tensor(0.0), beta=0.3)
    assert clamped.item() == zero.item() == pytest.approx(_kto_by_hand(0.3, 0.0, 1.0, 1.0))
    assert metrics["kl"].item() == 0.0


def test_kto_gradient_matches_the_derivative_and_none_flows_into_kl():
    beta, kl = 0.4, torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    p, r, y = _tensors(grad=True)
    loss, _ = kto_loss(p, r, y, kl, beta=beta, desirable_weight=1.5, undesirable_weight=0.5)
    loss.backward()
    assert kl.grad is None  # the reference point is a constant of the loss
    for i, (pi, ri, yi) in enumerate(zip(POLICY, REF, LABELS)):
        # d/dp [w * (1 - sigma(s * beta * (p - r - z0)))] = -w * s * beta * sigma' ; sigma' = s(1 - s)
        s = 1.0 if yi else -1.0
        w = 1.5 if yi else 0.5
        sig = _sigmoid(s * beta * (pi - ri - 0.6))
        expected = -w * s * beta * sig * (1 - sig) / len(POLICY)
        assert p.grad[i].item() == pytest.approx(expected, rel=1e-10)


def test_apo_zero_unpaired_loss_by_hand():
    beta, wd, wu = 0.5, 2.0, 0.7
    p, r, y = _tensors()
    loss, metrics = apo_zero_unpaired_loss(p, r, y, beta=beta, desirable_weight=wd, undesirable_weight=wu)
    expected = 0.0
    for pi, ri, yi in zip(POLICY, REF, LABELS):
        expected += wd * (1 - _sigmoid(beta * (pi - ri))) if yi else wu * _sigmoid(beta * (pi - ri))
    assert loss.item() == pytest.approx(expected / 4, rel=1e-12)
    assert metrics["kl"].item() == 0.0
    # no reference point: a kl argument changes nothing
    assert apo_zero_unpaired_loss(p, r, y, torch.tensor(5.0), beta=beta, desirable_weight=wd,
                                  undesirable_weight=wu)[0].item() == loss.item()


def test_weights_scale_each_kind_of_row_and_divide_by_all_rows():
    p, r, y = _tensors()
    base, _ = kto_loss(p, r, y, 0.2, beta=0.3)
    only_desirable, _ = kto_loss(p, r, y, 0.2, beta=0.3, undesirable_weight=0.0)
    only_undesirable, _ = kto_loss(p, r, y, 0.2, beta=0.3, desirable_weight=0.0)
    doubled, _ = kto_loss(p, r, y, 0.2, beta=0.3, desirable_weight=2.0)
    assert (only_desirable + only_undesirable).item() == pytest.approx(base.item())
    assert doubled.item() == pytest.approx(base.item() + only_desirable.item())


def test_metrics_are_sums_and_counts_per_kind():
    beta = 0.25
    p, r, y = _tensors()
    _, m = kto_loss(p, r, y, 0.1, beta=beta)
    assert m["num_chosen"].item() == 2 and m["num_rejected"].item() == 2
    assert m["chosen_rewards_sum"].item() == pytest.approx(beta * ((-10 + 11) + (-8 + 9.5)))
    assert m["rejected_rewards_sum"].item() == pytest.approx(beta * ((-12.5 + 12) + (-20 + 18)))
    assert m["chosen_logps_sum"].item() == pytest.approx(-18.0)
    assert m["rejected_logps_sum"].item() == pytest.approx(-32.5)
    assert all(not v.requires_grad for v in m.values())


def test_a_batch_of_one_kind_has_zero_sums_for_the_other():
    p, r, _ = _tensors()
    _, m = kto_loss(p, r, torch.ones(4, dtype=torch.bool), 0.0, beta=1.0)
    assert m["num_rejected"].item() == 0 and m["rejected_rewards_sum"].item() == 0.0
    assert m["chosen_rewards_sum"].item() == pytest.approx(sum(a - b for a, b in zip(POLICY, REF)))


def test_kl_estimate_is_the_mean_log_ratio_and_detached():
    kl_logps = torch.tensor([-5.0, -7.0, -6.5], requires_grad=True)
    ref_kl_logps = torch.tensor([-6.0, -6.0, -8.0])
    value = kl_estimate(kl_logps, ref_kl_logps)
    assert value.item() == pytest.approx(((1.0) + (-1.0) + 1.5) / 3)
    assert not value.requires_grad
    with pytest.raises(ValueError, match="non-empty"):
        kl_estimate(torch.zeros(0), torch.zeros(0))


def test_bad_inputs_are_explained():
    p, r, y = _tensors()
    with pytest.raises(ValueError, match="needs `kl`"):
        kto_loss(p, r, y, None)
    with pytest.raises(ValueError, match="shape \\(B,\\)"):
        kto_loss(p, r[:3], y, 0.0)
    with pytest.raises(ValueError, match="1-D float tensor"):
        kto_loss(p[None], r, y, 0.0)


def test_registry_names_match_the_config():
    assert set(LOSSES) == {"kto", "apo_zero_unpaired"}
