"""DPO loss variants: values by hand, a naive per-pair loop, gradcheck, properties and errors.

Hand-computed values use ``math`` on log-ratios picked to give clean numbers (mostly
``log 3``, so that ``sigma(log 3) = 3/4``); they never reuse the torch expression under test.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from honelm.methods.dpo import loss as dpo
from honelm.methods.dpo.loss import (
    F_DIVERGENCE_LOSS_TYPES,
    LOSS_TYPES,
    dpo_loss,
    ld_sequence_logps,
    reward_metrics,
    wpo_log_weights,
    wpo_pair_weights,
)

LN3 = math.log(3.0)
REF_CHOSEN = [-2.0, -5.0, -1.5, -7.0]
REF_REJECTED = [-3.0, -1.0, -4.0, -2.5]


def _pairs(r_w: list[float], r_l: list[float], dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Log-probs with the given chosen/rejected log-ratios on top of arbitrary reference values."""
    n = len(r_w)
    ref_w = torch.tensor(REF_CHOSEN[:n], dtype=dtype)
    ref_l = torch.tensor(REF_REJECTED[:n], dtype=dtype)
    return {
        "chosen_logps": ref_w + torch.tensor(r_w, dtype=dtype),
        "rejected_logps": ref_l + torch.tensor(r_l, dtype=dtype),
        "ref_chosen_logps": ref_w,
        "ref_rejected_logps": ref_l,
    }


def _close(got: torch.Tensor, want: list[float], tol: float = 1e-6) -> None:
    torch.testing.assert_close(got, torch.tensor(want, dtype=got.dtype), rtol=tol, atol=tol)


def _run(name: str, inputs: dict[str, torch.Tensor], **params) -> torch.Tensor:
    losses, _ = dpo_loss(name, **inputs, **params)
    return losses


# --------------------------------------------------------------------------- by hand


def test_sigmoid_by_hand():
    # h = [log 3, -log 3], beta = 1: sigma(h) = [3/4, 1/4]
    inputs = _pairs([LN3, 0.0], [0.0, LN3])
    _close(_run("sigmoid", inputs, beta=1.0), [math.log(4 / 3), math.log(4)])
    # cDPO, eps = 0.1: -(0.9) log sigma(h) - 0.1 log sigma(-h)
    want = [0.9 * math.log(4 / 3) + 0.1 * math.log(4), 0.9 * math.log(4) + 0.1 * math.log(4 / 3)]
    _close(_run("sigmoid", inputs, beta=1.0, label_smoothing=0.1), want)


def test_sigmoid_beta_scales_the_margin():
    # beta = 0.5, h = 2 log 3 -> beta h = log 3
    _close(_run("sigmoid", _pairs([2 * LN3], [0.0]), beta=0.5), [math.log(4 / 3)])


def test_hinge_by_hand():
    # beta = 0.5: relu(1 - h/2) for h = [1, 4, -2] -> [0.5, 0, 2]
    _close(_run("hinge", _pairs([1.5, 3.0, -1.0], [0.5, -1.0, 1.0]), beta=0.5), [0.5, 0.0, 2.0])


def test_ipo_by_hand_uses_per_token_average():
    # beta = 0.5 -> target 1/(2 beta) = 1
    # pair 0: 4/2 - 1/1 = 1 -> 0 ; pair 1: 2/4 - 4/2 = -1.5 -> (-2.5)^2 = 6.25
    inputs = _pairs([4.0, 2.0], [1.0, 4.0])
    lengths = {"chosen_lengths": torch.tensor([2, 4]), "rejected_lengths": torch.tensor([1, 2])}
    _close(_run("ipo", inputs, beta=0.5, **lengths), [0.0, 6.25])


def test_exo_pair_by_hand():
    # beta = 1, eps = 1/4. pair 0: p = sigma(log 3) = 3/4 = 1 - eps -> KL = 0
    # pair 1: p = 1/4: 1/4 (log 1/4 - log 3/4) + 3/4 (log 3/4 - log 1/4) = (3/4 - 1/4) log 3
    inputs = _pairs([LN3, 0.0], [0.0, LN3])
    _close(_run("exo_pair", inputs, beta=1.0, label_smoothing=0.25), [0.0, 0.5 * LN3])


def test_exo_pair_default_epsilon_when_label_smoothing_is_zero():
    # eps = 1e-3, h = 0: p = 1/2 -> 1/2 (log 1/2 - log 0.999) + 1/2 (log 1/2 - log 0.001)
    want = 0.5 * (math.log(0.5) - math.log(0.999)) + 0.5 * (math.log(0.5) - math.log(0.001))
    _close(_run("exo_pair", _pairs([0.3], [0.3]), beta=1.0), [want])


def test_nca_pair_by_hand():
    # beta = 1, r_w = log 3, r_l = -log 3:
    # -log(3/4) - 1/2 log sigma(-log 3) - 1/2 log sigma(log 3) = log(4/3) + 1/2 log 4 + 1/2 log(4/3)
    want = 1.5 * math.log(4 / 3) + 0.5 * math.log(4)
    _close(_run("nca_pair", _pairs([LN3], [-LN3]), beta=1.0), [want])


def test_robust_by_hand():
    # beta = 1, eps = 1/4, 1 - 2 eps = 1/2
    # h = log 3:  (3/4 log(4/3) - 1/4 log 4) / (1/2);  h = -log 3: (3/4 log 4 - 1/4 log(4/3)) / (1/2)
    inputs = _pairs([LN3, 0.0], [0.0, LN3])
    want = [1.5 * math.log(4 / 3) - 0.5 * math.log(4), 1.5 * math.log(4) - 0.5 * math.log(4 / 3)]
    _close(_run("robust", inputs, beta=1.0, label_smoothing=0.25), want)


def test_bco_pair_by_hand():
    # beta = 1, delta = log 2. pair 0: r_w - delta = log 3, r_l - delta = -log 3 -> 2 log(4/3)
    # pair 1: r_w = r_l = delta -> 2 log 2. Mean reward: (log 6 + log(2/3) + 2 log 2) / 4 = log 2
    inputs = _pairs([math.log(6), math.log(2)], [math.log(2 / 3), math.log(2)])
    losses, metrics = dpo_loss("bco_pair", **inputs, beta=1.0, bco_delta=math.log(2))
    _close(losses, [2 * math.log(4 / 3), 2 * math.log(2)])
    assert metrics["bco_pair/rewards_mean"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert not metrics["bco_pair/rewards_mean"].requires_grad


def test_sppo_hard_by_hand():
    # beta = 1/4 -> targets +2 / -2: (2 - 2)^2 + (-2 + 2)^2 = 0 ; (0 - 2)^2 + (1 + 2)^2 = 13
    _close(_run("sppo_hard", _pairs([2.0, 0.0], [-2.0, 1.0]), beta=0.25), [0.0, 13.0])


def test_aot_by_hand_sorts_margins():
    # policy margins chosen - rejected: [-1 - -3, -4 - -2] = [2, -2] -> sorted [-2, 2]
    # reference margins: [-2 - -2, -2 - -3] = [0, 1] -> sorted [0, 1]; d = [-2, 1]
    inputs = {
        "chosen_logps": torch.tensor([-1.0, -4.0]),
        "rejected_logps": torch.tensor([-3.0, -2.0]),
        "ref_chosen_logps": torch.tensor([-2.0, -2.0]),
        "ref_rejected_logps": torch.tensor([-2.0, -3.0]),
    }
    _close(_run("aot", inputs, beta=1.0), [math.log(1 + math.exp(2)), math.log(1 + math.exp(-1))])


def test_aot_unpaired_by_hand_sorts_log_ratios():
    # sorted r_w = [0, log 3], sorted r_l = [-log 3, log 3] -> d = [log 3, 0]
    inputs = _pairs([LN3, 0.0], [LN3, -LN3])
    _close(_run("aot_unpaired", inputs, beta=1.0), [math.log(4 / 3), math.log(2)])


def test_apo_by_hand():
    # apo_zero: 1 - sigma(r_w) + sigma(r_l); r = (log 3, -log 3) -> 1 - 3/4 + 1/4 ; (0, 0) -> 1
    _close(_run("apo_zero", _pairs([LN3, 0.0], [-LN3, 0.0]), beta=1.0), [0.5, 1.0])
    # apo_down: sigma(r_w) + 1 - sigma(r_w - r_l); (log 3, 0) -> 3/4 + 1/4 ; (0, log 3) -> 1/2 + 3/4
    _close(_run("apo_down", _pairs([LN3, 0.0], [0.0, LN3]), beta=1.0), [1.0, 1.25])


def test_discopop_by_hand():
    # tau = 1 makes the gate sigma(h): h = log 3 -> m = 3/4: 1/4 log(4/3) + 3/4 * 1/3
    # h = -log 3 -> m = 1/4: 3/4 log 4 + 1/4 * 3
    inputs = _pairs([LN3, 0.0], [0.0, LN3])
    want = [0.25 * math.log(4 / 3) + 0.25, 0.75 * math.log(4) + 0.75]
    _close(_run("discopop", inputs, beta=1.0, discopop_tau=1.0), want)


def test_discopop_default_tau_is_a_sharp_switch():
    # tau = 0.05, h = log 3: m = 1 / (1 + 3^-20), essentially the exponential loss 1/3
    m = 1 / (1 + 3.0**-20)
    want = (1 - m) * math.log(4 / 3) + m / 3
    _close(_run("discopop", _pairs([LN3], [0.0], dtype=torch.float64), beta=1.0), [want], tol=1e-12)


def test_sft_by_hand():
    inputs = _pairs([0.0, 0.0], [0.0, 0.0])
    inputs["chosen_logps"] = torch.tensor([-6.0, -3.0])
    _close(_run("sft", inputs, chosen_lengths=torch.tensor([3, 2])), [2.0, 1.5])


def test_sigmoid_norm_by_hand():
    # (2 log 3)/2 - 0/4 = log 3 ; 0/5 - (3 log 3)/3 = -log 3
    inputs = _pairs([2 * LN3, 0.0], [0.0, 3 * LN3])
    lengths = {"chosen_lengths": torch.tensor([2, 5]), "rejected_lengths": torch.tensor([4, 3])}
    _close(_run("sigmoid_norm", inputs, beta=1.0, **lengths), [math.log(4 / 3), math.log(4)])


def test_f_divergences_by_hand():
    # forward KL: r_w = log 2, r_l = 0 -> margin e^0 - e^-log2 = 1/2
    got = _run("sigmoid", _pairs([math.log(2)], [0.0]), beta=1.0, f_divergence_type="forward_kl")
    _close(got, [math.log(1 + math.exp(-0.5))])
    # JS: r_w = log 3 (sigma = 3/4), r_l = 0 (1/2) -> margin log(3/2), sigma = 3/5 -> log(5/3)
    got = _run("sigmoid", _pairs([LN3], [0.0]), beta=1.0, f_divergence_type="js_divergence")
    _close(got, [math.log(5 / 3)])
    # alpha = 1/2: r_w = 2 log 2 -> e^{-1/2 * 2 log 2} = 1/2 ; r_l = 0 -> 1 ; margin (1 - 1/2) / (1/2) = 1
    got = _run(
        "sigmoid",
        _pairs([2 * math.log(2)], [0.0]),
        beta=1.0,
        f_divergence_type="alpha_divergence",
        f_alpha_divergence_coef=0.5,
    )
    _close(got, [math.log(1 + math.exp(-1))])
    # alpha = 1 is forward KL
    fwd = _run("hinge", _pairs([0.7, -0.2], [0.1, 0.4]), f_divergence_type="forward_kl")
    alpha1 = _run("hinge", _pairs([0.7, -0.2], [0.1, 0.4]), f_divergence_type="alpha_divergence")
    torch.testing.assert_close(fwd, alpha1)


def test_alpha_divergence_saturates_instead_of_overflowing():
    inputs = _pairs([-500.0], [0.0])
    losses = _run("sigmoid", inputs, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0)
    assert torch.isfinite(losses).all()


def test_reward_metrics_by_hand():
    # beta = 1/2: rewards chosen [log 3 / 2, 0, 1/4], rejected [0, log 3 / 2, 1/4]; the tie is not accurate
    m = reward_metrics(**_pairs([LN3, 0.0, 0.5], [0.0, LN3, 0.5]), beta=0.5)
    assert m["rewards/chosen"].item() == pytest.approx((LN3 / 2 + 0.25) / 3)
    assert m["rewards/rejected"].item() == pytest.approx((LN3 / 2 + 0.25) / 3)
    assert m["rewards/margins"].item() == pytest.approx(0.0, abs=1e-7)
    assert m["rewards/accuracies"].item() == pytest.approx(1 / 3)
    assert m["logps/chosen"].item() == pytest.approx((-2 + LN3 - 5 - 1.0) / 3)
    assert m["logps/rejected"].item() == pytest.approx((-3 - 1 + LN3 - 3.5) / 3)
    assert all(not v.requires_grad and v.dim() == 0 for v in m.values())


# --------------------------------------------------------------------------- naive loop


def _sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _logsig(z: float) -> float:
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


PARAMS = {"beta": 0.3, "eps": 0.15, "tau": 0.4, "delta": 0.05}


def _naive_pair(name: str, w: float, lw: float, rw: float, rl: float, nw: int, nl: int) -> float:
    """One pair's loss from its log-probs (w, lw = policy chosen/rejected, rw, rl = reference)."""
    b, eps, tau, delta = PARAMS["beta"], PARAMS["eps"], PARAMS["tau"], PARAMS["delta"]
    cw, cl = w - rw, lw - rl  # chosen / rejected log-ratios
    h = cw - cl
    if name == "sigmoid":
        return -(1 - eps) * _logsig(b * h) - eps * _logsig(-b * h)
    if name == "sigmoid_norm":
        hn = cw / nw - cl / nl
        return -(1 - eps) * _logsig(b * hn) - eps * _logsig(-b * hn)
    if name == "hinge":
        return max(0.0, 1 - b * h)
    if name == "ipo":
        return (cw / nw - cl / nl - 1 / (2 * b)) ** 2
    if name == "exo_pair":
        p = _sig(b * h)
        return p * (math.log(p) - math.log(1 - eps)) + (1 - p) * (math.log(1 - p) - math.log(eps))
    if name == "robust":
        return ((1 - eps) * -_logsig(b * h) - eps * -_logsig(-b * h)) / (1 - 2 * eps)
    if name == "discopop":
        m = _sig(b * h / tau)
        return (1 - m) * -_logsig(b * h) + m * math.exp(-b * h)
    if name == "nca_pair":
        return -_logsig(b * cw) - 0.5 * _logsig(-b * cw) - 0.5 * _logsig(-b * cl)
    if name == "bco_pair":
        return -_logsig(b * cw - delta) - _logsig(-(b * cl - delta))
    if name == "sppo_hard":
        return (cw - 1 / (2 * b)) ** 2 + (cl + 1 / (2 * b)) ** 2
    if name == "apo_zero":
        return 1 - _sig(b * cw) + _sig(b * cl)
    if name == "apo_down":
        return _sig(b * cw) + 1 - _sig(b * h)
    if name == "sft":
        return -w / nw
    raise KeyError(name)


def _naive_aot(name: str, rows: list[tuple]) -> list[float]:
    b, eps = PARAMS["beta"], PARAMS["eps"]
    if name == "aot":
        left = sorted(w - lw for w, lw, _, _, _, _ in rows)
        right = sorted(rw - rl for _, _, rw, rl, _, _ in rows)
    else:
        left = sorted(w - rw for w, _, rw, _, _, _ in rows)
        right = sorted(lw - rl for _, lw, _, rl, _, _ in rows)
    return [-(1 - eps) * _logsig(b * (x - y)) - eps * _logsig(-b * (x - y)) for x, y in zip(left, right)]


def _random_batch(seed: int, batch: int = 6, dtype=torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {
        name: (-8 * torch.rand(batch, generator=g, dtype=dtype) - 1)
        for name in ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    }
    out["chosen_lengths"] = torch.randint(1, 9, (batch,), generator=g)
    out["rejected_lengths"] = torch.randint(1, 9, (batch,), generator=g)
    return out


def _params_for(name: str) -> dict:
    params: dict = {"beta": PARAMS["beta"], "bco_delta": PARAMS["delta"], "discopop_tau": PARAMS["tau"]}
    if name in dpo.LABEL_SMOOTHING_LOSS_TYPES:
        params["label_smoothing"] = PARAMS["eps"]
    return params


@pytest.mark.parametrize("name", LOSS_TYPES)
def test_matches_naive_per_pair_loop(name):
    inputs = _random_batch(seed=LOSS_TYPES.index(name))
    rows = list(
        zip(
            *(inputs[k].tolist() for k in ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")),
            inputs["chosen_lengths"].tolist(),
            inputs["rejected_lengths"].tolist(),
        )
    )
    if name in ("aot", "aot_unpaired"):
        want = _naive_aot(name, rows)
    else:
        want = [_naive_pair(name, *row) for row in rows]
    losses, _ = dpo_loss(name, **inputs, **_params_for(name))
    torch.testing.assert_close(losses, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", LOSS_TYPES)
def test_gradcheck(name):
    inputs = _random_batch(seed=100 + LOSS_TYPES.index(name), batch=4)
    if name == "hinge":  # h = [0.5, 2, -1, 9]: every pair off the kink at beta h = 1
        inputs["chosen_logps"] = inputs["ref_chosen_logps"] + torch.tensor([0.5, 2.0, -1.0, 9.0], dtype=torch.float64)
        inputs["rejected_logps"] = inputs["ref_rejected_logps"].clone()
    keys = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    tensors = tuple(inputs[k].clone().requires_grad_(True) for k in keys)
    extra = {"chosen_lengths": inputs["chosen_lengths"], "rejected_lengths": inputs["rejected_lengths"]}

    def fn(*logps):
        return dpo_loss(name, **dict(zip(keys, logps)), **extra, **_params_for(name))[0]

    assert torch.autograd.gradcheck(fn, tensors)


@pytest.mark.parametrize("f_divergence_type", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("name", sorted(F_DIVERGENCE_LOSS_TYPES - {"sft", "hinge"}))
def test_gradcheck_f_divergences(name, f_divergence_type):
    inputs = _random_batch(seed=7, batch=3)
    keys = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    tensors = tuple(inputs[k].clone().requires_grad_(True) for k in keys)
    extra = {"chosen_lengths": inputs["chosen_lengths"], "rejected_lengths": inputs["rejected_lengths"]}

    def fn(*logps):
        return dpo_loss(
            name,
            **dict(zip(keys, logps)),
            **extra,
            **_params_for(name),
            f_divergence_type=f_divergence_type,
            f_alpha_divergence_coef=0.6,
        )[0]

    assert torch.autograd.gradcheck(fn, tensors)


def test_f_divergence_margins_match_their_f_prime():
    # f'(u_w) - f'(u_l) computed from u = exp(r) with the f' of each divergence, in Python
    r_w, r_l, a = 0.4, -0.9, 0.3
    u_w, u_l = math.exp(r_w), math.exp(r_l)
    f_prime = {
        "reverse_kl": lambda u: math.log(u) + 1,
        "forward_kl": lambda u: -1 / u,
        "js_divergence": lambda u: math.log(2 * u / (1 + u)),
        "alpha_divergence": lambda u: (1 - u**-a) / a,
    }
    chosen, rejected = torch.tensor([r_w], dtype=torch.float64), torch.tensor([r_l], dtype=torch.float64)
    for kind, fp in f_prime.items():
        got = dpo.f_divergence_logits(chosen, rejected, kind, a)
        assert got.item() == pytest.approx(fp(u_w) - fp(u_l), rel=1e-12), kind


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("name", ["sigmoid", "sigmoid_norm", "aot", "aot_unpaired"])
def test_log2_when_policy_equals_reference(name):
    inputs = _random_batch(seed=3)
    inputs["chosen_logps"] = inputs["ref_chosen_logps"].clone()
    inputs["rejected_logps"] = inputs["ref_rejected_logps"].clone()
    losses, _ = dpo_loss(name, **inputs, beta=0.7)
    torch.testing.assert_close(losses, torch.full_like(losses, math.log(2)))


MONOTONE = ["sigmoid", "sigmoid_norm", "hinge", "robust", "bco_pair", "aot", "aot_unpaired", "apo_zero"]


@pytest.mark.parametrize("name", MONOTONE)
def test_loss_falls_as_chosen_rises_and_rejected_falls(name):
    inputs = _random_batch(seed=11)
    w = inputs["chosen_logps"].clone().requires_grad_(True)
    lw = inputs["rejected_logps"].clone().requires_grad_(True)
    params = _params_for(name) | {"label_smoothing": 0.1 if name in dpo.LABEL_SMOOTHING_LOSS_TYPES else 0.0}
    losses, _ = dpo_loss(name, **(inputs | {"chosen_logps": w, "rejected_logps": lw}), **params)
    grad_w, grad_l = torch.autograd.grad(losses.sum(), [w, lw])
    assert (grad_w <= 0).all() and (grad_l >= 0).all()
    assert (grad_w < 0).any() and (grad_l > 0).any()


@pytest.mark.parametrize("f_divergence_type", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergence_sigmoid_is_monotone_too(f_divergence_type):
    inputs = _random_batch(seed=12)
    w = inputs["chosen_logps"].clone().requires_grad_(True)
    losses, _ = dpo_loss("sigmoid", **(inputs | {"chosen_logps": w}), f_divergence_type=f_divergence_type)
    (grad_w,) = torch.autograd.grad(losses.sum(), [w])
    assert (grad_w < 0).all()


def test_sft_falls_as_chosen_rises():
    inputs = _random_batch(seed=13)
    w = inputs["chosen_logps"].clone().requires_grad_(True)
    losses, _ = dpo_loss("sft", **(inputs | {"chosen_logps": w}))
    (grad_w,) = torch.autograd.grad(losses.sum(), [w])
    torch.testing.assert_close(grad_w, -1.0 / inputs["chosen_lengths"].double())


def test_label_smoothing_zero_reduces_robust_and_cdpo_to_dpo():
    inputs = _random_batch(seed=5)
    logps = [inputs[k] for k in ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")]
    h = (logps[0] - logps[2]) - (logps[1] - logps[3])
    plain_dpo = -torch.nn.functional.logsigmoid(0.1 * h)
    for name in ("robust", "sigmoid"):
        torch.testing.assert_close(dpo_loss(name, **inputs, label_smoothing=0.0)[0], plain_dpo)
        assert not torch.allclose(dpo_loss(name, **inputs, label_smoothing=0.2)[0], plain_dpo)


def test_ipo_minimum_at_half_inverse_beta():
    beta = 0.25  # target h_avg = 2
    scan = torch.linspace(-1, 5, 601, dtype=torch.float64)  # h_avg values, step 0.01, one pair each
    zeros = torch.zeros_like(scan)
    ones = torch.ones_like(scan, dtype=torch.long)
    losses, _ = dpo_loss(
        "ipo",
        chosen_logps=scan - 1.0,
        rejected_logps=zeros - 2.0,
        ref_chosen_logps=zeros - 1.0,
        ref_rejected_logps=zeros - 2.0,
        beta=beta,
        chosen_lengths=ones,
        rejected_lengths=ones,
    )
    assert scan[losses.argmin()].item() == pytest.approx(2.0)
    assert losses.min().item() == pytest.approx(0.0, abs=1e-20)


def test_sppo_hard_and_exo_minima():
    beta = 0.5
    # SPPO: zero loss and zero gradient at r_w = 1/(2 beta) = 1, r_l = -1
    inputs = _pairs([1.0], [-1.0], dtype=torch.float64)
    w = inputs["chosen_logps"].clone().requires_grad_(True)
    losses, _ = dpo_loss("sppo_hard", **(inputs | {"chosen_logps": w}), beta=beta)
    assert losses.item() == 0.0
    assert torch.autograd.grad(losses.sum(), w)[0].item() == 0.0
    # EXO: zero loss and zero gradient where sigma(beta h) = 1 - eps, i.e. beta h = log((1 - eps)/eps)
    eps = 0.1
    h = math.log((1 - eps) / eps) / beta
    inputs = _pairs([h], [0.0], dtype=torch.float64)
    w = inputs["chosen_logps"].clone().requires_grad_(True)
    losses, _ = dpo_loss("exo_pair", **(inputs | {"chosen_logps": w}), beta=beta, label_smoothing=eps)
    assert losses.item() == pytest.approx(0.0, abs=1e-12)
    assert torch.autograd.grad(losses.sum(), w)[0].item() == pytest.approx(0.0, abs=1e-12)


def test_nca_always_pushes_rejected_down_and_apo_down_pushes_chosen_down():
    inputs = _random_batch(seed=21)
    lw = inputs["rejected_logps"].clone().requires_grad_(True)
    losses, _ = dpo_loss("nca_pair", **(inputs | {"rejected_logps": lw}))
    assert (torch.autograd.grad(losses.sum(), lw)[0] > 0).all()
    # apo_down with an established margin (r_w = 0, r_l = -10): the chosen likelihood is lowered too
    inputs = _pairs([0.0], [-10.0], dtype=torch.float64)
    w = inputs["chosen_logps"].clone().requires_grad_(True)
    losses, _ = dpo_loss("apo_down", **(inputs | {"chosen_logps": w}), beta=1.0)
    assert torch.autograd.grad(losses.sum(), w)[0].item() > 0


def test_discopop_prefers_positive_margins_outside_its_bump():
    inputs = _pairs([-3.0, 0.0, 3.0], [0.0, 0.0, 0.0], dtype=torch.float64)
    losses, _ = dpo_loss("discopop", **inputs, beta=1.0)
    assert losses[0] > losses[1] > losses[2]


def test_discopop_is_finite_for_very_negative_margins():
    losses, _ = dpo_loss("discopop", **_pairs([-400.0], [0.0]), beta=1.0)
    assert torch.isfinite(losses).all()


def test_aot_single_pair_equals_sigmoid_and_is_permutation_invariant():
    inputs = _random_batch(seed=8)
    one = {k: v[:1] for k, v in inputs.items()}
    for name in ("aot", "aot_unpaired"):
        torch.testing.assert_close(dpo_loss(name, **one)[0], dpo_loss("sigmoid", **one)[0])
        perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
        shuffled = {k: v[perm] for k, v in inputs.items()}
        torch.testing.assert_close(dpo_loss(name, **inputs)[0], dpo_loss(name, **shuffled)[0])


def test_float32_stays_float32():
    inputs = _random_batch(seed=4, dtype=torch.float32)
    for name in LOSS_TYPES:
        losses, _ = dpo_loss(name, **inputs, **_params_for(name))
        assert losses.dtype == torch.float32 and losses.shape == (6,), name


# --------------------------------------------------------------------------- combination


def test_mpo_combination_is_the_weighted_sum():
    inputs = _random_batch(seed=31)
    weights = [0.8, 0.2, 1.0]
    losses, metrics = dpo_loss(["sigmoid", "bco_pair", "sft"], weights, **inputs, bco_delta=0.1)
    parts = [dpo_loss(n, **inputs, bco_delta=0.1)[0] for n in ("sigmoid", "bco_pair", "sft")]
    torch.testing.assert_close(losses, sum(w * p for w, p in zip(weights, parts)))
    for name, part in zip(("sigmoid", "bco_pair", "sft"), parts):
        torch.testing.assert_close(metrics[f"loss/{name}"], part.mean())
    assert "bco_pair/rewards_mean" in metrics and "rewards/margins" in metrics


def test_single_loss_type_default_weight_and_metrics():
    inputs = _random_batch(seed=32)
    losses, metrics = dpo_loss(["hinge"], None, **inputs)
    torch.testing.assert_close(losses, dpo.hinge_loss(*[inputs[k] for k in list(inputs)[:4]])[0])
    assert not any(k.startswith("loss/") for k in metrics)
    assert set(reward_metrics(*[inputs[k] for k in list(inputs)[:4]])) <= set(metrics)


def test_rpo_alpha_adds_chosen_nll_per_token():
    inputs = _pairs([LN3, 0.0], [0.0, LN3])
    inputs["chosen_lengths"] = torch.tensor([2, 5])
    losses, metrics = dpo_loss("sigmoid", **inputs, beta=1.0, rpo_alpha=0.5)
    nll = [-(REF_CHOSEN[0] + LN3) / 2, -REF_CHOSEN[1] / 5]
    want = [math.log(4 / 3) + 0.5 * nll[0], math.log(4) + 0.5 * nll[1]]
    _close(losses, want)
    assert metrics["nll_loss"].item() == pytest.approx(sum(nll) / 2)


def test_pair_weights_multiply_and_carry_no_gradient():
    inputs = _random_batch(seed=33)
    weights = torch.tensor([0.5, 1.0, 0.0, 0.2, 1.0, 0.3], dtype=torch.float64, requires_grad=True)
    plain, _ = dpo_loss("sigmoid", **inputs, rpo_alpha=1.0)
    weighted, _ = dpo_loss("sigmoid", **inputs, rpo_alpha=1.0, pair_weights=weights)
    torch.testing.assert_close(weighted, plain * weights.detach())
    assert not weighted.requires_grad


# --------------------------------------------------------------------------- LD-DPO and WPO


def test_ld_sequence_logps_by_hand():
    # row 0: prompt (2 tokens) then 4 completion tokens; public length 2
    #        -> (-1) + (-2) + 0.5 * ((-3) + (-4)) = -6.5
    # row 1: 2 completion tokens then padding (garbage -inf); public length 2 -> -0.5 + -0.25, no rear
    token_logps = torch.tensor(
        [[-9.0, -9.0, -1.0, -2.0, -3.0, -4.0], [-0.5, -0.25, -math.inf, -math.inf, -math.inf, -math.inf]],
        requires_grad=True,
    )
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    out = ld_sequence_logps(token_logps, mask, torch.tensor([2, 2]), ld_alpha=0.5)
    _close(out, [-6.5, -0.75])
    out.sum().backward()
    want_grad = torch.tensor([[0, 0, 1, 1, 0.5, 0.5], [1, 1, 0, 0, 0, 0]], dtype=torch.float32)
    torch.testing.assert_close(token_logps.grad, want_grad)


def test_ld_alpha_one_is_the_plain_sum_and_zero_truncates():
    g = torch.Generator().manual_seed(0)
    token_logps = -torch.rand(3, 7, generator=g)
    mask = torch.tensor([[1] * 7, [0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1]])
    public = torch.tensor([3, 1, 2])
    plain = (token_logps * mask).sum(-1)
    torch.testing.assert_close(ld_sequence_logps(token_logps, mask, public, 1.0), plain)
    truncated = torch.stack([token_logps[0, :3].sum(), token_logps[1, 1], token_logps[2, 3:5].sum()])
    torch.testing.assert_close(ld_sequence_logps(token_logps, mask, public, 0.0), truncated)


def test_ld_gradcheck():
    g = torch.Generator().manual_seed(1)
    token_logps = (-torch.rand(2, 5, generator=g, dtype=torch.float64)).requires_grad_(True)
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert torch.autograd.gradcheck(lambda t: ld_sequence_logps(t, mask, torch.tensor([2, 3]), 0.3), (token_logps,))


def test_wpo_weights_by_hand():
    # Two tokens over a 2-word vocabulary: p = [1/2, 1/2] picking either (sum p^2 = 1/2, ratio 1),
    # then p = [1/4, 3/4] picking the first (sum p^2 = 10/16, ratio 0.4). log w = (log 1 + log 0.4) / 2
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.25, 0.75]]]))  # (1, 2, V=2)
    logps_full = torch.log_softmax(logits, -1)
    token_logps = logps_full[..., 0]  # (1, 2)
    log_sum_sq = torch.logsumexp(2 * logps_full, -1)  # (1, 2)
    mask = torch.ones(1, 2, dtype=torch.bool)
    log_w = wpo_log_weights(token_logps, log_sum_sq, mask)
    assert log_w.item() == pytest.approx(math.log(0.4) / 2, rel=1e-6)
    # the pair weight multiplies the two sequence weights and is capped at 1
    pair = wpo_pair_weights(log_w, torch.tensor([math.log(1.5)]))
    assert pair.item() == pytest.approx(math.sqrt(0.4) * 1.5, rel=1e-6)
    assert wpo_pair_weights(torch.tensor([0.5]), torch.tensor([0.5])).item() == 1.0
    assert wpo_pair_weights(torch.tensor([0.5]), torch.tensor([0.5]), max_weight=None).item() == pytest.approx(math.e)


def test_wpo_matches_naive_full_vocabulary_loop_and_is_detached():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 5, 11, generator=g, requires_grad=True)  # (B, T, V)
    targets = torch.randint(0, 11, (3, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 0], [0, 1, 0, 1, 1]], dtype=torch.bool)
    logps_full = torch.log_softmax(logits, -1)
    token_logps = logps_full.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    out = wpo_log_weights(token_logps, torch.logsumexp(2 * logps_full, -1), mask)
    assert not out.requires_grad
    probs = logps_full.detach().exp().tolist()
    for b in range(3):
        terms = [
            math.log(probs[b][t][targets[b, t]] / sum(p * p for p in probs[b][t]))
            for t in range(5)
            if mask[b, t]
        ]
        assert out[b].item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_wpo_weight_of_own_samples_is_one_on_average():
    # E_{y ~ p}[p(y) / sum_v p_v^2] = 1: the "sampled alignment" normalization
    p = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    expectation = sum(p[v] * p[v] / (p * p).sum() for v in range(3))
    assert expectation.item() == pytest.approx(1.0)


# --------------------------------------------------------------------------- errors


def test_unknown_loss_type_lists_the_valid_ones():
    with pytest.raises(ValueError, match="Unknown loss type 'dpo'.*sigmoid, hinge, ipo"):
        dpo_loss(["sigmoid", "dpo"], **_random_batch(0))


def test_loss_weights_length_mismatch():
    with pytest.raises(ValueError, match=r"loss_weights has 2 entries.*loss_types has 3"):
        dpo_loss(["sigmoid", "bco_pair", "sft"], [0.8, 0.2], **_random_batch(0), bco_delta=0.0)


def test_empty_and_duplicate_loss_types():
    with pytest.raises(ValueError, match="empty"):
        dpo_loss([], **_random_batch(0))
    with pytest.raises(ValueError, match="more than once"):
        dpo_loss(["sigmoid", "sigmoid"], **_random_batch(0))


@pytest.mark.parametrize("name", ["ipo", "sigmoid_norm", "sft"])
def test_length_normalized_variants_need_lengths(name):
    inputs = {k: v for k, v in _random_batch(0).items() if not k.endswith("lengths")}
    with pytest.raises(ValueError, match=f"'{name}' normalizes by completion length.*chosen_lengths"):
        dpo_loss(name, **inputs)


def test_rpo_needs_lengths_and_zero_length_row_is_named():
    inputs = {k: v for k, v in _random_batch(0).items() if not k.endswith("lengths")}
    with pytest.raises(ValueError, match="rpo_alpha adds.*chosen_lengths"):
        dpo_loss("sigmoid", **inputs, rpo_alpha=1.0)
    lengths = torch.tensor([3, 1, 0, 2, 2, 2])
    with pytest.raises(ValueError, match=r"`chosen_lengths\[2\]` is 0"):
        dpo_loss("sft", **inputs, chosen_lengths=lengths)


def test_bco_pair_needs_delta():
    with pytest.raises(ValueError, match="bco_delta"):
        dpo_loss("bco_pair", **_random_batch(0))


def test_f_divergence_rejected_for_non_margin_losses():
    with pytest.raises(ValueError, match=r"only applies to.*\['nca_pair'\]"):
        dpo_loss(["sigmoid", "nca_pair"], **_random_batch(0), f_divergence_type="js_divergence")
    with pytest.raises(ValueError, match="Unknown f_divergence_type 'kl'.*reverse_kl, forward_kl"):
        dpo_loss("sigmoid", **_random_batch(0), f_divergence_type="kl")
    with pytest.raises(ValueError, match="f_alpha_divergence_coef"):
        dpo_loss("sigmoid", **_random_batch(0), f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.0)


def test_label_smoothing_errors():
    with pytest.raises(ValueError, match=r"'robust' must be in \[0, 0.5\)"):
        dpo_loss("robust", **_random_batch(0), label_smoothing=0.5)
    with pytest.raises(ValueError, match=r"'sigmoid' must be in \[0, 0.5\]"):
        dpo_loss("sigmoid", **_random_batch(0), label_smoothing=0.6)
    with pytest.raises(ValueError, match=r"'exo_pair' must be in \(0, 1.0\)"):
        dpo.exo_pair_loss(*list(_random_batch(0).values())[:4], label_smoothing=0.0)
    with pytest.raises(ValueError, match="has no effect on loss_types=\\['hinge'\\]"):
        dpo_loss("hinge", **_random_batch(0), label_smoothing=0.1)


def test_shape_and_parameter_errors():
    inputs = _random_batch(0)
    with pytest.raises(ValueError, match=r"`ref_rejected_logps` must be a 1-D float tensor.*\(6, 1\)"):
        dpo_loss("sigmoid", **(inputs | {"ref_rejected_logps": inputs["ref_rejected_logps"][:, None]}))
    with pytest.raises(ValueError, match="same batch size B.*rejected_logps: 5"):
        dpo_loss("sigmoid", **(inputs | {"rejected_logps": inputs["rejected_logps"][:5]}))
    with pytest.raises(ValueError, match="`beta` must be > 0"):
        dpo_loss("sigmoid", **inputs, beta=0.0)
    with pytest.raises(ValueError, match="discopop_tau"):
        dpo_loss("discopop", **inputs, discopop_tau=0.0)
    with pytest.raises(ValueError, match=r"`pair_weights` must be a tensor of shape \(6,\)"):
        dpo_loss("sigmoid", **inputs, pair_weights=torch.ones(3))


def test_per_token_helper_errors():
    with pytest.raises(ValueError, match=r"`ld_alpha` must be in \[0, 1\]"):
        ld_sequence_logps(torch.zeros(2, 3), torch.ones(2, 3), torch.tensor([1, 1]), 1.5)
    with pytest.raises(ValueError, match=r"same shape.*completion_mask: \(2, 4\)"):
        ld_sequence_logps(torch.zeros(2, 3), torch.ones(2, 4), torch.tensor([1, 1]), 0.5)
    with pytest.raises(ValueError, match=r"`public_lengths` must be a tensor of shape \(2,\)"):
        ld_sequence_logps(torch.zeros(2, 3), torch.ones(2, 3), torch.tensor([1]), 0.5)
    with pytest.raises(ValueError, match="Row 1 of `completion_mask` has no completion token"):
        wpo_log_weights(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([[1, 0, 0], [0, 0, 0]]))


def test_every_loss_type_is_reachable_and_documented():
    # each name dispatches, and has a section in the documentation
    doc = (Path(__file__).resolve().parents[3] / "docs" / "dpo_losses.md").read_text()
    inputs = _random_batch(0)
    for name in LOSS_TYPES:
        dpo_loss(name, **inputs, **_params_for(name))
        assert f"`{name}`" in doc, name
