r"""DPO losses: pure functions of per-sequence log-probs.

Convention (every loss variant below follows it)
------------------------------------------------
Inputs are per-sequence *summed* completion log-probs, one row per preference pair:
``chosen_logps``, ``rejected_logps`` (policy) and ``ref_chosen_logps``, ``ref_rejected_logps``
(reference model), all ``(B,)`` floating tensors, plus ``beta`` and the variant's own
parameters passed by keyword. Length-normalized variants also take ``chosen_lengths`` /
``rejected_lengths`` ``(B,)``: the number of completion tokens of each sequence.

Every variant returns ``(losses, metrics)``:

- ``losses``: the per-pair loss ``(B,)``, differentiable. The caller reduces it
  (``losses.mean()``, or a weighted mean with WPO weights); nothing here averages over the
  batch except where the method itself couples pairs (``aot``, ``aot_unpaired`` sort within
  the batch, so row ``i`` of their output is the ``i``-th quantile, not pair ``i``).
- ``metrics``: a dict of detached 0-dim tensors, empty for most variants. ``bco_pair``
  returns the batch mean of its rewards there, for the caller's running mean.

Notation used in the docstrings::

    r_w = chosen_logps - ref_chosen_logps        chosen log-ratio   log pi(y_w|x)/pi_ref(y_w|x)
    r_l = rejected_logps - ref_rejected_logps    rejected log-ratio
    h   = r_w - r_l                              pair margin ("logits")
    sigma(z) = 1 / (1 + exp(-z))

``dpo_loss`` combines several variants with weights (e.g. MPO), adds the RPO NLL term and
applies per-pair weights. ``reward_metrics`` gives the usual ``rewards/*`` metrics.
``ld_sequence_logps`` (LD-DPO) and ``wpo_log_weights`` / ``wpo_pair_weights`` (WPO) work on
per-token log-probs and produce inputs for the functions above.

f-divergences (``f_divergence_type``, Wang et al. 2023) replace the margin ``h`` by
``f'(u_w) - f'(u_l)`` (see :func:`f_divergence_logits`). The f-DPO reparametrization leaves a
``beta * log Z(x)`` term that cancels only in a chosen-minus-rejected difference, so it is
accepted only by the variants whose loss is a function of that difference:
``F_DIVERGENCE_LOSS_TYPES`` (``sft`` is listed because it does not use the margin at all).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

Metrics = dict[str, torch.Tensor]
LossOutput = tuple[torch.Tensor, Metrics]

LOSS_TYPES: tuple[str, ...] = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
F_DIVERGENCE_TYPES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
F_DIVERGENCE_LOSS_TYPES: frozenset[str] = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)
LABEL_SMOOTHING_LOSS_TYPES: frozenset[str] = frozenset(
    {"sigmoid", "sigmoid_norm", "robust", "exo_pair", "aot", "aot_unpaired"}
)
EXO_DEFAULT_EPSILON = 1e-3
_NORMALIZES = "loss type '{}' normalizes by completion length"


# --------------------------------------------------------------------------- checks


def _check_logps(**tensors: torch.Tensor) -> int:
    """Every per-sequence input is a 1-D float tensor of one common length B; returns B."""
    sizes: dict[str, int] = {}
    for name, value in tensors.items():
        if not torch.is_tensor(value) or value.dim() != 1 or not value.is_floating_point():
            found = type(value).__name__
            if torch.is_tensor(value):
                found = f"shape {tuple(value.shape)}, dtype {value.dtype}"
            raise ValueError(
                f"`{name}` must be a 1-D float tensor of shape (B,) with one summed log-prob per completion; "
                f"found {found}. Sum the per-token log-probs over each completion first, e.g. "
                "`(token_logps * completion_mask).sum(-1)`."
            )
        sizes[name] = value.shape[0]
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{name}: {size}" for name, size in sizes.items())
        raise ValueError(
            f"The per-pair inputs must all have the same batch size B; found {listing}. "
            "Row i of every tensor must describe the same preference pair."
        )
    return next(iter(sizes.values()))


def _check_lengths(name: str, lengths: torch.Tensor | None, batch: int, user: str) -> torch.Tensor:
    """``user`` says who needs the lengths, e.g. "loss type 'ipo' normalizes by completion length"."""
    if lengths is None:
        raise ValueError(
            f"{user} and needs `{name}`: a (B,) tensor with the number of completion tokens of each "
            "sequence, e.g. `completion_mask.sum(-1)`."
        )
    if not torch.is_tensor(lengths) or tuple(lengths.shape) != (batch,):
        found = tuple(lengths.shape) if torch.is_tensor(lengths) else type(lengths).__name__
        raise ValueError(f"`{name}` must be a tensor of shape ({batch},), one token count per pair; found {found}.")
    bad = (lengths < 1).nonzero()
    if bad.numel():
        row = int(bad[0, 0])
        raise ValueError(
            f"`{name}[{row}]` is {lengths[row].item()}: a completion needs at least one token to be "
            f"length-normalized. Check the completion mask of pair {row}, or drop empty completions."
        )
    return lengths


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"`beta` must be > 0, got {beta}. The default is 0.1.")


def _check_label_smoothing(
    loss_type: str, value: float, *, high: float, open_high: bool, positive: bool = False
) -> None:
    ok_low = value > 0 if positive else value >= 0
    ok_high = value < high if open_high else value <= high
    if not (ok_low and ok_high):
        interval = ("(" if positive else "[") + f"0, {high}" + (")" if open_high else "]")
        raise ValueError(f"`label_smoothing` for loss type '{loss_type}' must be in {interval}, got {value}.")


# --------------------------------------------------------------------------- margins


def _logsigmoid(z: torch.Tensor) -> torch.Tensor:
    # log sigma(z) = -softplus(-z): stable (softplus is linear beyond 20, an error below 3e-9), and far
    # cheaper than F.logsigmoid on some CPU builds
    return -F.softplus(-z)


def _capped_exp(x: torch.Tensor) -> torch.Tensor:
    # exp that saturates at ~dtype max / e instead of overflowing to inf (zero gradient beyond)
    return torch.exp(x.clamp(max=math.log(torch.finfo(x.dtype).max) - 1.0))


def f_divergence_logits(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 1.0,
) -> torch.Tensor:
    r"""Pair margin of f-DPO (Wang et al., 2023, "Beyond Reverse KL: Generalizing Direct Preference
    Optimization with Diverse Divergence Constraints", arXiv:2309.16240).

    The f-divergence ``D_f(pi || pi_ref) = E_pi_ref[f(pi/pi_ref)]`` replaces the reverse KL of the
    RLHF objective. Its KKT conditions give the reward ``beta * f'(u)`` with ``u = pi/pi_ref =
    exp(r)``, up to a per-prompt constant that cancels in the Bradley-Terry difference, so the
    margin ``h = r_w - r_l`` of DPO becomes ``f'(u_w) - f'(u_l)``:

    - ``reverse_kl`` (DPO): ``f(u) = u log u``, ``f'(u) = log u + 1``; margin ``r_w - r_l``.
    - ``forward_kl``: ``f(u) = -log u``, ``f'(u) = -1/u``; margin ``exp(-r_l) - exp(-r_w)``.
    - ``js_divergence``: ``f(u) = u log u - (1 + u) log((1 + u)/2)``,
      ``f'(u) = log(2u / (1 + u)) = log 2 + log sigma(r)``; margin ``log sigma(r_w) - log sigma(r_l)``.
    - ``alpha_divergence``: ``f(u) = (u^(1-a) - (1-a) u - a) / (a (a-1))``, ``f'(u) = (1 - u^-a) / a``;
      margin ``(exp(-a r_l) - exp(-a r_w)) / a``.

    ``a = f_alpha_divergence_coef > 0``; ``a -> 0`` recovers reverse KL and ``a = 1`` is forward KL.
    Exponentials saturate near the dtype's largest value instead of overflowing (their gradient is
    then zero), which only happens for log-ratios below about ``-87 / a`` in float32.

    Args:
        chosen_logratios: ``r_w``, ``(B,)``.
        rejected_logratios: ``r_l``, ``(B,)``.
    """
    if f_divergence_type == "reverse_kl":
        return chosen_logratios - rejected_logratios
    if f_divergence_type == "forward_kl":
        return _capped_exp(-rejected_logratios) - _capped_exp(-chosen_logratios)
    if f_divergence_type == "js_divergence":
        return _logsigmoid(chosen_logratios) - _logsigmoid(rejected_logratios)
    if f_divergence_type == "alpha_divergence":
        a = f_alpha_divergence_coef
        if not a > 0:
            raise ValueError(
                f"`f_alpha_divergence_coef` must be > 0, got {a} (a -> 0 is reverse KL: use "
                "f_divergence_type='reverse_kl' for that)."
            )
        return (_capped_exp(-a * rejected_logratios) - _capped_exp(-a * chosen_logratios)) / a
    raise ValueError(
        f"Unknown f_divergence_type {f_divergence_type!r}. Valid values: {', '.join(F_DIVERGENCE_TYPES)}."
    )


def _logratios(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_logps(
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    return chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps  # (B,), (B,)


def _smoothed_logistic(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``-(1 - eps) log sigma(z) - eps log sigma(-z)``: logistic loss with flipped-label rate eps."""
    return -(1.0 - label_smoothing) * _logsigmoid(z) - label_smoothing * _logsigmoid(-z)


# --------------------------------------------------------------------------- pairwise-margin variants


def sigmoid_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 1.0,
) -> LossOutput:
    r"""DPO (Rafailov et al., 2023, arXiv:2305.18290, eq. 7), with the label smoothing of conservative
    DPO (cDPO, Mitchell, 2023, "A note on DPO with noisy preferences").

    ``loss = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)``, ``eps = label_smoothing`` in
    ``[0, 0.5]``: the probability that a preference label is flipped. ``eps = 0`` is plain DPO.
    """
    _check_beta(beta)
    _check_label_smoothing("sigmoid", label_smoothing, high=0.5, open_high=False)
    r_w, r_l = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    h = f_divergence_logits(r_w, r_l, f_divergence_type, f_alpha_divergence_coef)  # (B,)
    return _smoothed_logistic(beta * h, label_smoothing), {}


def sigmoid_norm_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 1.0,
) -> LossOutput:
    r"""Length-normalized DPO (Tulu 3, Lambert et al., 2024, arXiv:2411.15124, eq. 6; the length
    normalization of SimPO, Meng et al., 2024).

    ``loss = -log sigma(beta (r_w / |y_w| - r_l / |y_l|))``: the sigmoid loss on per-token average
    log-ratios, so a long completion does not get a larger implicit reward just for its length.
    ``label_smoothing`` applies as in :func:`sigmoid_loss`.
    """
    _check_beta(beta)
    _check_label_smoothing("sigmoid_norm", label_smoothing, high=0.5, open_high=False)
    r_w, r_l = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    n_w = _check_lengths("chosen_lengths", chosen_lengths, r_w.shape[0], _NORMALIZES.format("sigmoid_norm"))
    n_l = _check_lengths("rejected_lengths", rejected_lengths, r_w.shape[0], _NORMALIZES.format("sigmoid_norm"))
    h = f_divergence_logits(r_w / n_w, r_l / n_l, f_divergence_type, f_alpha_divergence_coef)  # (B,)
    return _smoothed_logistic(beta * h, label_smoothing), {}


def hinge_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 1.0,
) -> LossOutput:
    r"""Hinge loss of SLiC (Zhao et al., 2023, arXiv:2305.10425) on the reference-normalized
    likelihood, as in RSO (Liu et al., 2023, arXiv:2309.06657)::

        loss = max(0, 1 - beta h)

    ``1/beta`` is the margin ``delta`` of SLiC: pairs whose margin ``h`` exceeds it get no gradient.
    """
    _check_beta(beta)
    r_w, r_l = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    h = f_divergence_logits(r_w, r_l, f_divergence_type, f_alpha_divergence_coef)  # (B,)
    return torch.relu(1.0 - beta * h), {}


def ipo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float = 0.1,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 1.0,
) -> LossOutput:
    r"""IPO (Azar et al., 2023, arXiv:2310.12036, eq. 17)::

        loss = (h_avg - 1/(2 beta))^2

    with ``beta`` the paper's regularization ``tau``; minimal (zero) at ``h_avg = 1/(2 beta)``.

    The paper's ``h`` is the margin of *sequence* log-ratios; here, as in the IPO implementations
    in common use (TRL), it is the margin of per-token *average* log-ratios
    ``h_avg = r_w / |y_w| - r_l / |y_l|``, which keeps the target ``1/(2 beta)`` meaningful whatever
    the completion lengths. Pass lengths of ones to get the paper's summed form.
    """
    _check_beta(beta)
    r_w, r_l = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    n_w = _check_lengths("chosen_lengths", chosen_lengths, r_w.shape[0], _NORMALIZES.format("ipo"))
    n_l = _check_lengths("rejected_lengths", rejected_lengths, r_w.shape[0], _NORMALIZES.format("ipo"))
    h = f_divergence_logits(r_w / n_w, r_l / n_l, f_divergence_type, f_alpha_divergence_coef)  # (B,)
    return (h - 1.0 / (2.0 * beta)) ** 2, {}


def exo_pair_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = EXO_DEFAULT_EPSILON,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 1.0,
) -> LossOutput:
    r"""Pairwise EXO (Ji et al., 2024, "Towards Efficient Exact Optimization of Language Model
    Alignment", arXiv:2402.00856, the K = 2 case of its loss, eq. 16 of v1): the reverse KL from
    the model's pairwise preference ``p = sigma(beta h)`` to the smoothed labels ``(1 - eps, eps)``::

        loss = p (log p - log(1 - eps)) + (1 - p) (log(1 - p) - log eps)

    ``eps = label_smoothing`` in ``(0, 1)``, ``1e-3`` by default. Unlike DPO, the loss is minimal at
    ``p = 1 - eps`` (mode-seeking) rather than pushing ``h`` to infinity.
    """
    _check_beta(beta)
    _check_label_smoothing("exo_pair", label_smoothing, high=1.0, open_high=True, positive=True)
    r_w, r_l = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    z = beta * f_divergence_logits(r_w, r_l, f_divergence_type, f_alpha_divergence_coef)  # (B,)
    eps = label_smoothing
    losses = torch.sigmoid(z) * (_logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        _logsigmoid(-z) - math.log(eps)
    )
    return losses, {}


def robust_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 1.0,
) -> LossOutput:
    r"""Robust DPO (Chowdhury et al., 2024, "Provably Robust DPO", arXiv:2403.00409): an unbiased estimate of the
    DPO loss under labels flipped with probability ``eps = label_smoothing`` in ``[0, 0.5)``::

        loss = ((1 - eps) * -log sigma(beta h) - eps * -log sigma(-beta h)) / (1 - 2 eps)

    ``eps = 0`` is plain DPO.
    """
    _check_beta(beta)
    _check_label_smoothing("robust", label_smoothing, high=0.5, open_high=True)
    r_w, r_l = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    z = beta * f_divergence_logits(r_w, r_l, f_divergence_type, f_alpha_divergence_coef)  # (B,)
    eps = label_smoothing
    return (-(1.0 - eps) * _logsigmoid(z) + eps * _logsigmoid(-z)) / (1.0 - 2.0 * eps), {}


def discopop_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    discopop_tau: float = 0.05,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 1.0,
) -> LossOutput:
    r"""DiscoPOP, the log-ratio modulated loss (Lu et al., 2024, "Discovering Preference Optimization
    Algorithms with and for Large Language Models", arXiv:2406.08414). With ``z = beta h`` and the
    gate ``m = sigma(z / tau)``::

        loss = (1 - m) * -log sigma(z) + m * exp(-z)

    a blend of the logistic (DPO) loss, for negative margins, and the exponential loss, for positive
    ones. ``tau = discopop_tau`` (0.05 in the paper) sets how sharp the switch is. The loss is not
    monotone in ``h`` near 0 (a small bump of width ~ ``tau``), as in the paper.
    """
    _check_beta(beta)
    if not discopop_tau > 0:
        raise ValueError(f"`discopop_tau` must be > 0, got {discopop_tau} (the paper uses 0.05).")
    r_w, r_l = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    z = beta * f_divergence_logits(r_w, r_l, f_divergence_type, f_alpha_divergence_coef)  # (B,)
    logistic = -_logsigmoid(z)
    # m * exp(-z) as exp(log m - z): finite where m underflows to 0 and exp(-z) overflows
    exponential = torch.exp(_logsigmoid(z / discopop_tau) - z)
    return torch.sigmoid(-z / discopop_tau) * logistic + exponential, {}


# --------------------------------------------------------------------------- per-completion variants


def nca_pair_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
) -> LossOutput:
    r"""Pairwise NCA (Chen et al., 2024, "Noise Contrastive Alignment of Language Models with Explicit
    Rewards", arXiv:2402.05369, its loss for pairwise preference data)::

        loss = -log sigma(beta r_w) - 1/2 log sigma(-beta r_w) - 1/2 log sigma(-beta r_l)

    It scores each completion's *absolute* likelihood against the reference, not only the
    difference, so the chosen likelihood is not pushed down together with the rejected one.
    """
    _check_beta(beta)
    r_w, r_l = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    z_w, z_l = beta * r_w, beta * r_l  # (B,), (B,)
    return -_logsigmoid(z_w) - 0.5 * _logsigmoid(-z_w) - 0.5 * _logsigmoid(-z_l), {}


def bco_pair_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    delta: float | torch.Tensor,
) -> LossOutput:
    r"""Pairwise BCO (Jung et al., 2024, "Binary Classifier Optimization for Large Language Model
    Alignment", arXiv:2404.04656, applied to both completions of a pair):
    a binary classifier whose logit is the implicit reward ``beta r``, chosen -> 1, rejected -> 0,
    shifted by the running mean of the rewards ``delta``::

        loss = -log sigma(beta r_w - delta) - log sigma(-(beta r_l - delta))

    ``delta`` is state the caller keeps (start at 0): this function returns
    ``metrics["bco_pair/rewards_mean"]``, the mean of the 2B rewards ``beta r_w``, ``beta r_l`` of
    this batch (detached), for the caller to fold into its running mean.
    """
    _check_beta(beta)
    if delta is None:
        raise ValueError("bco_pair needs `delta`, the running mean of the implicit rewards (0.0 at the first step).")
    r_w, r_l = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    rewards_w, rewards_l = beta * r_w, beta * r_l  # (B,), (B,)
    delta_t = torch.as_tensor(delta, dtype=rewards_w.dtype, device=rewards_w.device).detach()
    losses = -_logsigmoid(rewards_w - delta_t) - _logsigmoid(-(rewards_l - delta_t))
    rewards_mean = torch.cat([rewards_w, rewards_l]).mean().detach()
    return losses, {"bco_pair/rewards_mean": rewards_mean}


def sppo_hard_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
) -> LossOutput:
    r"""SPPO with hard labels (Wu et al., 2024, "Self-Play Preference Optimization for Language Model
    Alignment", arXiv:2405.00675). SPPO regresses ``log(pi(y)/pi_ref(y))`` to
    ``eta (P(y > pi_ref) - 1/2)``; with hard win probabilities (1 for the chosen, 0 for the
    rejected completion) and ``eta = 1/beta``::

        loss = (r_w - 1/(2 beta))^2 + (r_l + 1/(2 beta))^2

    Each log-ratio is regressed to its own target, so the loss is zero at
    ``r_w = 1/(2 beta)``, ``r_l = -1/(2 beta)``.
    """
    _check_beta(beta)
    r_w, r_l = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    target = 1.0 / (2.0 * beta)
    return (r_w - target) ** 2 + (r_l + target) ** 2, {}


def aot_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> LossOutput:
    r"""AOT, paired (Melnyk et al., 2024, "Distributional Preference Alignment of LLMs via Optimal
    Transport", arXiv:2406.05882): first-order stochastic dominance of the policy's chosen-minus-rejected log-likelihood
    margins over the reference's, enforced quantile by quantile after sorting within the batch::

        d = sort(chosen_logps - rejected_logps) - sort(ref_chosen_logps - ref_rejected_logps)
        loss_i = -(1 - eps) log sigma(beta d_i) - eps log sigma(-beta d_i)

    Row ``i`` is the ``i``-th quantile, not pair ``i``. With B = 1 it equals :func:`sigmoid_loss`;
    larger per-device batches give finer quantiles.
    """
    _check_beta(beta)
    _check_label_smoothing("aot", label_smoothing, high=0.5, open_high=False)
    _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)  # shape checks
    policy_margins, _ = torch.sort(chosen_logps - rejected_logps)  # (B,)
    ref_margins, _ = torch.sort(ref_chosen_logps - ref_rejected_logps)  # (B,)
    return _smoothed_logistic(beta * (policy_margins - ref_margins), label_smoothing), {}


def aot_unpaired_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> LossOutput:
    r"""AOT, unpaired (Melnyk et al., 2024): the distribution of chosen log-ratios must dominate the
    distribution of rejected log-ratios, compared quantile by quantile::

        d = sort(r_w) - sort(r_l)
        loss_i = -(1 - eps) log sigma(beta d_i) - eps log sigma(-beta d_i)

    Chosen and rejected completions need not come from the same prompt. Row ``i`` is the ``i``-th
    quantile.
    """
    _check_beta(beta)
    _check_label_smoothing("aot_unpaired", label_smoothing, high=0.5, open_high=False)
    r_w, r_l = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    d = torch.sort(r_w)[0] - torch.sort(r_l)[0]  # (B,)
    return _smoothed_logistic(beta * d, label_smoothing), {}


def apo_zero_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
) -> LossOutput:
    r"""APO-zero (D'Oosterlinck et al., 2024, "Anchored Preference Optimization and Contrastive
    Revisions", arXiv:2408.06266; the paper's loss shifted by +1 so it is non-negative)::

        loss = (1 - sigma(beta r_w)) + sigma(beta r_l)

    Pushes the chosen likelihood up and the rejected one down, each anchored to the reference.
    Use it when the model is worse than the chosen answers.
    """
    _check_beta(beta)
    r_w, r_l = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (1.0 - torch.sigmoid(beta * r_w)) + torch.sigmoid(beta * r_l), {}


def apo_down_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
) -> LossOutput:
    r"""APO-down (D'Oosterlinck et al., 2024, arXiv:2408.06266; shifted by +1 so it is non-negative)::

        loss = sigma(beta r_w) + (1 - sigma(beta (r_w - r_l)))

    Pushes both likelihoods down, the rejected one more. Use it when the model already does better
    than the chosen answers.
    """
    _check_beta(beta)
    r_w, r_l = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return torch.sigmoid(beta * r_w) + (1.0 - torch.sigmoid(beta * (r_w - r_l))), {}


def sft_loss(chosen_logps: torch.Tensor, *, chosen_lengths: torch.Tensor) -> LossOutput:
    r"""Negative log-likelihood of the chosen completion, averaged over its tokens:
    ``loss = -chosen_logps / |y_w|``. Each pair counts equally, whatever its length.
    """
    batch = _check_logps(chosen_logps=chosen_logps)
    n_w = _check_lengths("chosen_lengths", chosen_lengths, batch, _NORMALIZES.format("sft"))
    return -chosen_logps / n_w, {}


# --------------------------------------------------------------------------- combination


def _variant_losses(
    name: str,
    logps: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    beta: float,
    label_smoothing: float,
    fdiv: dict[str, str | float],
    lengths: dict[str, torch.Tensor | None],
    bco_delta: float | torch.Tensor | None,
    discopop_tau: float,
) -> LossOutput:
    ls = {"label_smoothing": label_smoothing}
    if name == "sigmoid":
        return sigmoid_loss(*logps, beta=beta, **ls, **fdiv)
    if name == "sigmoid_norm":
        return sigmoid_norm_loss(*logps, beta=beta, **ls, **fdiv, **lengths)
    if name == "hinge":
        return hinge_loss(*logps, beta=beta, **fdiv)
    if name == "ipo":
        return ipo_loss(*logps, beta=beta, **fdiv, **lengths)
    if name == "exo_pair":
        eps = label_smoothing if label_smoothing > 0 else EXO_DEFAULT_EPSILON
        return exo_pair_loss(*logps, beta=beta, label_smoothing=eps, **fdiv)
    if name == "robust":
        return robust_loss(*logps, beta=beta, **ls, **fdiv)
    if name == "discopop":
        return discopop_loss(*logps, beta=beta, discopop_tau=discopop_tau, **fdiv)
    if name == "nca_pair":
        return nca_pair_loss(*logps, beta=beta)
    if name == "bco_pair":
        if bco_delta is None:
            raise ValueError(
                "loss type 'bco_pair' needs `bco_delta`, the running mean of the implicit rewards "
                "(0.0 at the first step; update it from metrics['bco_pair/rewards_mean'])."
            )
        return bco_pair_loss(*logps, beta=beta, delta=bco_delta)
    if name == "sppo_hard":
        return sppo_hard_loss(*logps, beta=beta)
    if name == "aot":
        return aot_loss(*logps, beta=beta, **ls)
    if name == "aot_unpaired":
        return aot_unpaired_loss(*logps, beta=beta, **ls)
    if name == "apo_zero":
        return apo_zero_loss(*logps, beta=beta)
    if name == "apo_down":
        return apo_down_loss(*logps, beta=beta)
    if name == "sft":
        return sft_loss(logps[0], chosen_lengths=lengths["chosen_lengths"])
    raise AssertionError(name)  # names are validated before dispatch


def _resolve_loss_types(
    loss_types: str | Sequence[str], loss_weights: Sequence[float] | None
) -> tuple[list[str], list[float]]:
    names = [loss_types] if isinstance(loss_types, str) else list(loss_types)
    if not names:
        raise ValueError(f"`loss_types` is empty: give at least one of {', '.join(LOSS_TYPES)}.")
    for name in names:
        if name not in LOSS_TYPES:
            raise ValueError(
                f"Unknown loss type {name!r} in loss_types={names}. Valid loss types: {', '.join(LOSS_TYPES)}."
            )
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(
            f"loss_types={names} lists {duplicates} more than once: give each loss type once, with its weight."
        )
    if loss_weights is None:
        return names, [1.0] * len(names)
    weights = [float(w) for w in loss_weights]
    if len(weights) != len(names):
        raise ValueError(
            f"loss_weights has {len(weights)} entries {weights} but loss_types has {len(names)} {names}: give one "
            "weight per loss type, in the same order, or leave loss_weights unset to weight each by 1.0."
        )
    return names, weights


def _check_combination(names: list[str], f_divergence_type: str, label_smoothing: float) -> None:
    if f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(
            f"Unknown f_divergence_type {f_divergence_type!r}. Valid values: {', '.join(F_DIVERGENCE_TYPES)}."
        )
    if f_divergence_type != "reverse_kl":
        unsupported = [name for name in names if name not in F_DIVERGENCE_LOSS_TYPES]
        if unsupported:
            raise ValueError(
                f"f_divergence_type={f_divergence_type!r} only applies to losses of the chosen-minus-rejected margin "
                f"({', '.join(sorted(F_DIVERGENCE_LOSS_TYPES))}), not to {unsupported}. Use "
                "f_divergence_type='reverse_kl' with these loss types, or drop them."
            )
    if label_smoothing != 0 and not any(name in LABEL_SMOOTHING_LOSS_TYPES for name in names):
        raise ValueError(
            f"label_smoothing={label_smoothing} has no effect on loss_types={names}; it is used by "
            f"{', '.join(sorted(LABEL_SMOOTHING_LOSS_TYPES))}. Set label_smoothing=0 or pick one of those."
        )


def dpo_loss(
    loss_types: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    *,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 1.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    bco_delta: float | torch.Tensor | None = None,
    discopop_tau: float = 0.05,
    rpo_alpha: float | None = None,
    pair_weights: torch.Tensor | None = None,
) -> LossOutput:
    r"""Weighted sum of DPO loss variants, per pair: ``(losses (B,), metrics)``.

    ``losses = (sum_k loss_weights[k] * loss_k + rpo_alpha * nll) * pair_weights``

    - ``loss_types``: one name or a list of names from ``LOSS_TYPES``; ``loss_weights`` one weight
      per name (default 1.0 each). MPO (Wang et al., 2024, arXiv:2411.10442) is
      ``loss_types=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]``.
    - ``label_smoothing``: eps of ``sigmoid`` / ``sigmoid_norm`` / ``aot`` / ``aot_unpaired`` (cDPO),
      ``robust`` (flip rate) and ``exo_pair`` (where 0 means the EXO default 1e-3).
    - ``chosen_lengths`` / ``rejected_lengths``: completion token counts, needed by ``ipo``,
      ``sigmoid_norm``, ``sft`` and ``rpo_alpha``.
    - ``bco_delta``: running mean of rewards for ``bco_pair`` (see :func:`bco_pair_loss`).
    - ``rpo_alpha``: RPO (Pang et al., 2024, "Iterative Reasoning Preference Optimization",
      arXiv:2404.19733) adds ``rpo_alpha`` times the per-token NLL of the chosen completion ``-chosen_logps / |y_w|``.
    - ``pair_weights``: per-pair weights ``(B,)``, e.g. :func:`wpo_pair_weights`; used as constants
      (detached), multiplying the whole per-pair loss, RPO term included.

    ``metrics`` holds :func:`reward_metrics`, ``loss/<name>`` (unweighted batch mean) for each
    variant when there are several, ``nll_loss`` with ``rpo_alpha``, and the variants' own metrics.
    """
    names, weights = _resolve_loss_types(loss_types, loss_weights)
    _check_combination(names, f_divergence_type, label_smoothing)
    logps = (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    batch = _check_logps(
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    fdiv = {"f_divergence_type": f_divergence_type, "f_alpha_divergence_coef": f_alpha_divergence_coef}
    lengths = {"chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}
    metrics = reward_metrics(*logps, beta=beta)
    losses = torch.zeros_like(chosen_logps)  # (B,)
    for name, weight in zip(names, weights):
        variant, variant_metrics = _variant_losses(
            name,
            logps,
            beta=beta,
            label_smoothing=label_smoothing,
            fdiv=fdiv,
            lengths=lengths,
            bco_delta=bco_delta,
            discopop_tau=discopop_tau,
        )
        losses = losses + weight * variant
        metrics.update(variant_metrics)
        if len(names) > 1:
            metrics[f"loss/{name}"] = variant.detach().mean()
    if rpo_alpha is not None:
        _check_lengths("chosen_lengths", chosen_lengths, batch, "rpo_alpha adds the chosen per-token NLL")
        nll, _ = sft_loss(chosen_logps, chosen_lengths=chosen_lengths)  # (B,)
        losses = losses + rpo_alpha * nll
        metrics["nll_loss"] = nll.detach().mean()
    if pair_weights is not None:
        if not torch.is_tensor(pair_weights) or tuple(pair_weights.shape) != (batch,):
            found = tuple(pair_weights.shape) if torch.is_tensor(pair_weights) else type(pair_weights).__name__
            raise ValueError(
                f"`pair_weights` must be a tensor of shape ({batch},), one weight per pair; found {found}."
            )
        losses = losses * pair_weights.detach().to(losses.dtype)
    return losses, metrics


def reward_metrics(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
) -> Metrics:
    r"""Detached batch means of the implicit rewards ``beta * (logps - ref_logps)``.

    Keys: ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` (chosen minus rejected),
    ``rewards/accuracies`` (fraction of pairs whose chosen reward is strictly higher),
    ``logps/chosen``, ``logps/rejected`` (mean summed log-probs of the policy).
    """
    with torch.no_grad():
        r_w, r_l = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
        rewards_w, rewards_l = beta * r_w, beta * r_l  # (B,), (B,)
        return {
            "rewards/chosen": rewards_w.mean(),
            "rewards/rejected": rewards_l.mean(),
            "rewards/margins": (rewards_w - rewards_l).mean(),
            "rewards/accuracies": (rewards_w > rewards_l).to(rewards_w.dtype).mean(),
            "logps/chosen": chosen_logps.detach().mean(),
            "logps/rejected": rejected_logps.detach().mean(),
        }


# --------------------------------------------------------------------------- per-token helpers


def _check_token_tensors(**tensors: torch.Tensor) -> tuple[int, int]:
    shapes = {name: tuple(t.shape) if torch.is_tensor(t) else type(t).__name__ for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if not isinstance(first, tuple) or len(first) != 2 or any(shape != first for shape in shapes.values()):
        listing = ", ".join(f"{name}: {shape}" for name, shape in shapes.items())
        raise ValueError(f"Per-token inputs must all be (B, T) tensors of the same shape; found {listing}.")
    return first


def ld_sequence_logps(
    token_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    public_lengths: torch.Tensor,
    ld_alpha: float,
) -> torch.Tensor:
    r"""Length-desensitized sequence log-probs of LD-DPO (Liu et al., 2024, "Length Desensitization in
    Direct Preference Optimization", arXiv:2409.06411).

    The first ``l_p`` completion tokens ("public" part, ``l_p = min(|y_w|, |y_l|)`` of the pair)
    count fully; the tokens beyond, which only the longer completion has, count with weight
    ``alpha``::

        logp_LD(y) = sum_{t <= l_p} log p(y_t) + alpha * sum_{t > l_p} log p(y_t)

    ``alpha = 1`` is the plain sum, ``alpha = 0`` truncates to the shorter length. Apply it to the
    policy's chosen and rejected log-probs before the loss (TRL's ``ld_alpha`` applies it to the
    policy only and keeps the reference sums).

    Args:
        token_logps: ``(B, T)`` per-token log-probs; values outside the mask are ignored (may be
            anything, even ``-inf``).
        completion_mask: ``(B, T)``, true on completion tokens. They need not start at column 0
            (prompt or padding may come first); the ``t``-th true entry of a row is token ``t``.
        public_lengths: ``(B,)`` the public length ``l_p`` of each row, e.g. for a chosen/rejected
            pair ``torch.minimum(chosen_mask.sum(-1), rejected_mask.sum(-1))``.
        ld_alpha: weight of the tokens beyond ``l_p``, in ``[0, 1]``.

    Returns:
        ``(B,)`` desensitized log-probs, differentiable with respect to ``token_logps``.
    """
    batch, _ = _check_token_tensors(token_logps=token_logps, completion_mask=completion_mask)
    if not 0.0 <= ld_alpha <= 1.0:
        raise ValueError(f"`ld_alpha` must be in [0, 1] (1 = plain DPO), got {ld_alpha}. The paper uses 0.2 to 0.8.")
    if not torch.is_tensor(public_lengths) or tuple(public_lengths.shape) != (batch,):
        found = tuple(public_lengths.shape) if torch.is_tensor(public_lengths) else type(public_lengths).__name__
        raise ValueError(f"`public_lengths` must be a tensor of shape ({batch},); found {found}.")
    mask = completion_mask.bool()
    position = mask.long().cumsum(-1) - 1  # (B, T) index of each token within its completion
    front = mask & (position < public_lengths.unsqueeze(-1))  # (B, T)
    rear = mask & ~front  # (B, T)
    zeros = torch.zeros_like(token_logps)
    front_sum = torch.where(front, token_logps, zeros).sum(-1)  # (B,)
    rear_sum = torch.where(rear, token_logps, zeros).sum(-1)  # (B,)
    return front_sum + ld_alpha * rear_sum


def wpo_log_weights(
    token_logps: torch.Tensor,
    token_log_sum_sq_probs: torch.Tensor,
    completion_mask: torch.Tensor,
) -> torch.Tensor:
    r"""Per-sequence log-weight of WPO (Zhou et al., 2024, "WPO: Enhancing RLHF with Weighted Preference
    Optimization", arXiv:2406.11827, with its "sampled alignment" normalization), detached::

        log w(x, y) = 1/|y| * sum_t [ log p(y_t | x, y_<t) - log sum_v p(v | x, y_<t)^2 ]

    Dividing by ``sum_v p_v^2`` (the expected probability of a token sampled from the policy itself)
    makes the weight ~1 for the policy's own samples, whatever its entropy.

    Args:
        token_logps: ``(B, T)`` log-prob of each completion token under the current policy.
        token_log_sum_sq_probs: ``(B, T)`` ``log sum_v p_v^2`` at each position, i.e.
            ``logsumexp_v(2 * logp_v)``; a chunked kernel gets it from the same tiles as the
            log-softmax (``logsumexp(2 z) - 2 logsumexp(z)`` over the logits ``z``).
        completion_mask: ``(B, T)``, true on completion tokens; every row needs at least one.

    Returns:
        ``(B,)`` log-weights; combine a pair's two with :func:`wpo_pair_weights`.
    """
    _check_token_tensors(
        token_logps=token_logps, token_log_sum_sq_probs=token_log_sum_sq_probs, completion_mask=completion_mask
    )
    mask = completion_mask.bool()
    counts = mask.sum(-1)  # (B,)
    empty = (counts == 0).nonzero()
    if empty.numel():
        row = int(empty[0, 0])
        raise ValueError(f"Row {row} of `completion_mask` has no completion token: a WPO weight needs at least one.")
    with torch.no_grad():
        per_token = torch.where(mask, token_logps - token_log_sum_sq_probs, torch.zeros_like(token_logps))  # (B, T)
        return per_token.sum(-1) / counts.to(per_token.dtype)


def wpo_pair_weights(
    chosen_log_weights: torch.Tensor,
    rejected_log_weights: torch.Tensor,
    max_weight: float | None = 1.0,
) -> torch.Tensor:
    r"""WPO weight of each pair: ``w(x, y_w) * w(x, y_l) = exp(log w_w + log w_l)``, detached, ``(B,)``.

    ``max_weight`` caps it (1.0 by default, as TRL's ``use_weighting`` does, so that no pair
    counts more than in plain DPO); ``None`` leaves it uncapped.
    """
    with torch.no_grad():
        weights = torch.exp(chosen_log_weights + rejected_log_weights)  # (B,)
        return weights if max_weight is None else weights.clamp(max=max_weight)
