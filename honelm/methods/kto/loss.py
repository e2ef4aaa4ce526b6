r"""KTO losses: pure functions of per-row summed completion log-probs.

Convention
----------
One row per unpaired example ``(x, y, label)``. Inputs are ``(B,)`` float tensors of the
*summed* log-probs of the completion tokens, ``policy_logps = log pi(y|x)`` and
``ref_logps = log pi_ref(y|x)``, and ``labels`` ``(B,)`` bool (``True``: desirable). With

    r(x, y) = policy_logps - ref_logps        the log-ratio; beta * r is the implicit reward
    sigma(z) = 1 / (1 + exp(-z))

each variant returns ``(loss, metrics)``: ``loss`` is the mean over the ``B`` rows of the
weighted per-row losses (a 0-dim differentiable tensor; weighting rows by
``desirable_weight`` / ``undesirable_weight`` but dividing by ``B``), and ``metrics`` a
dict of detached 0-dim tensors: the sums and counts the trainer needs for running means
that stay correct when a batch holds only desirable or only undesirable rows
(``chosen_rewards_sum``, ``rejected_rewards_sum``, ``chosen_logps_sum``,
``rejected_logps_sum``, ``num_chosen``, ``num_rejected``) and the reference point ``kl``
actually used.
"""

from __future__ import annotations

import torch

Metrics = dict[str, torch.Tensor]
LossOutput = tuple[torch.Tensor, Metrics]


def _check_inputs(policy_logps: torch.Tensor, ref_logps: torch.Tensor, labels: torch.Tensor) -> None:
    for name, value in (("policy_logps", policy_logps), ("ref_logps", ref_logps)):
        if not torch.is_tensor(value) or value.dim() != 1 or not value.is_floating_point():
            found = type(value).__name__
            if torch.is_tensor(value):
                found = f"shape {tuple(value.shape)}, dtype {value.dtype}"
            raise ValueError(
                f"`{name}` must be a 1-D float tensor (B,) holding one summed completion log-prob per row; found "
                f"{found}. Sum the per-token log-probs over each completion first."
            )
    if not torch.is_tensor(labels) or labels.shape != policy_logps.shape or ref_logps.shape != policy_logps.shape:
        got = tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__
        raise ValueError(
            f"`policy_logps` {tuple(policy_logps.shape)}, `ref_logps` {tuple(ref_logps.shape)} and `labels` {got} "
            "must all have shape (B,): row i of each describes the same example."
        )


def _metrics(policy_logps: torch.Tensor, rewards: torch.Tensor, labels: torch.Tensor, kl: torch.Tensor) -> Metrics:
    labels = labels.bool()
    policy_logps, rewards = policy_logps.detach(), rewards.detach()
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    return {
        "chosen_rewards_sum": torch.where(labels, rewards, zero).sum(),
        "rejected_rewards_sum": torch.where(labels, zero, rewards).sum(),
        "chosen_logps_sum": torch.where(labels, policy_logps, zero).sum(),
        "rejected_logps_sum": torch.where(labels, zero, policy_logps).sum(),
        "num_chosen": labels.sum(),
        "num_rejected": (~labels).sum(),
        "kl": kl.detach(),
    }


def _weights(
    labels: torch.Tensor, desirable_weight: float, undesirable_weight: float, like: torch.Tensor
) -> torch.Tensor:
    desirable = torch.full_like(like, float(desirable_weight))
    undesirable = torch.full_like(like, float(undesirable_weight))
    return torch.where(labels.bool(), desirable, undesirable)  # (B,)


def kl_estimate(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """The batch estimate of ``KL(pi || pi_ref)`` from mismatched pairs, detached: the mean of
    ``log pi(y'|x) - log pi_ref(y'|x)`` over rows whose completion ``y'`` belongs to another
    row's prompt (KTO, Ethayarajh et al., 2024, Sec. 4.1: "z_ref").

    Not clamped: average it across processes first, then :func:`kto_loss` clamps it at 0.
    """
    if kl_logps.shape != ref_kl_logps.shape or kl_logps.dim() != 1 or kl_logps.numel() == 0:
        raise ValueError(
            f"`kl_logps` {tuple(kl_logps.shape)} and `ref_kl_logps` {tuple(ref_kl_logps.shape)} must both be "
            "non-empty (B,) tensors: one summed log-prob per mismatched prompt-completion pair."
        )
    return (kl_logps.detach().float() - ref_kl_logps.detach().float()).mean()


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl: torch.Tensor | float | None = None,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    r"""Kahneman-Tversky Optimization (Ethayarajh et al., 2024, "KTO: Model Alignment as
    Prospect Theoretic Optimization", eq. 7-8)::

        z0 = max(0, kl)                                    reference point, no gradient
        v(x, y) = lambda_D * sigma(beta * (r(x, y) - z0))  if y is desirable
                  lambda_U * sigma(beta * (z0 - r(x, y)))  if y is undesirable
        loss    = mean over rows of (lambda_y - v(x, y))  = lambda_y * sigma(-beta * (+-(r - z0)))

    Args:
        kl: The estimate of ``KL(pi || pi_ref)`` from mismatched pairs (see :func:`kl_estimate`),
            already averaged across processes; clamped at 0 here and never differentiated.
        beta, desirable_weight, undesirable_weight: ``beta``, ``lambda_D`` and ``lambda_U``.
    """
    _check_inputs(policy_logps, ref_logps, labels)
    if kl is None:
        raise ValueError(
            "kto_loss needs `kl`, the KL reference point estimated from mismatched prompt-completion pairs "
            "(see kl_estimate); use apo_zero_unpaired_loss for a loss without one."
        )
    z0 = torch.as_tensor(kl, dtype=policy_logps.dtype, device=policy_logps.device).detach().clamp(min=0)
    logratios = policy_logps - ref_logps  # (B,)
    sign = torch.where(labels.bool(), 1.0, -1.0).to(logratios.dtype)  # (B,)
    losses = torch.sigmoid(-beta * sign * (logratios - z0))  # (B,), 1 - v / lambda
    losses = losses * _weights(labels, desirable_weight, undesirable_weight, losses)
    return losses.mean(), _metrics(policy_logps, beta * logratios, labels, z0)


def apo_zero_unpaired_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl: torch.Tensor | float | None = None,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    r"""Unpaired APO-zero (D'Oosterlinck et al., 2024, "Anchored Preference Optimization and
    Contrastive Revisions", eq. 7 with each side scored on its own rows)::

        loss = mean over rows of   lambda_D * (1 - sigma(beta * r))   if y is desirable
                                   lambda_U * sigma(beta * r)          if y is undesirable

    Desirable likelihoods are pushed above the reference, undesirable ones below it, with no
    reference point; ``kl`` is ignored (the metric reports 0).
    """
    _check_inputs(policy_logps, ref_logps, labels)
    logratios = policy_logps - ref_logps  # (B,)
    sign = torch.where(labels.bool(), 1.0, -1.0).to(logratios.dtype)  # (B,)
    losses = torch.sigmoid(-beta * sign * logratios)  # (B,)
    losses = losses * _weights(labels, desirable_weight, undesirable_weight, losses)
    zero = torch.zeros((), dtype=logratios.dtype, device=logratios.device)
    return losses.mean(), _metrics(policy_logps, beta * logratios, labels, zero)


LOSSES = {"kto": kto_loss, "apo_zero_unpaired": apo_zero_unpaired_loss}
