r"""Reward-model loss: a pure function of the scalar rewards of chosen and rejected sequences.

Bradley-Terry pairwise loss (Bradley & Terry 1952; as used for reward models by Ouyang et al.
2022, "Training language models to follow instructions with human feedback", Eq. 1)::

    loss = mean_i  -log sigma(r_c,i - r_r,i - m_i)

with the optional per-pair margin ``m_i`` of Touvron et al. 2023 ("Llama 2", Eq. 2): the chosen
reward must beat the rejected one by at least ``m_i`` before the loss flattens out. The
optional centering term of Eisenstein et al. 2023 ("Helping or Herding? Reward Model Ensembles
Mitigate but do not Eliminate Reward Hacking", Eq. 2) pulls the rewards towards zero mean::

    loss += eta * mean_i (r_c,i + r_r,i)^2

``-log sigma(x)`` is computed as ``softplus(-x)``: exact, stable for large ``|x|`` and faster
than ``F.logsigmoid`` on CPU builds of torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Metrics = dict[str, torch.Tensor]


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Pairwise reward-model loss, averaged over the pairs of the batch.

    Args:
        chosen_rewards: ``(B,)`` reward of each chosen sequence.
        rejected_rewards: ``(B,)`` reward of the rejected sequence of the same pair.
        margin: Optional ``(B,)`` margin per pair (the ``margin`` dataset column).
        center_rewards_coefficient: Optional ``eta`` of the centering term; ``None`` or 0 adds
            nothing.

    Returns:
        ``(loss, metrics)``: the scalar loss, and detached 0-dim metrics ``accuracy``
        (fraction of pairs with ``r_c > r_r``; ties count as wrong) and ``margin`` (mean
        ``r_c - r_r``, the names TRL logs).
    """
    if chosen_rewards.shape != rejected_rewards.shape or chosen_rewards.dim() != 1:
        raise ValueError(
            f"bradley_terry_loss: chosen_rewards {tuple(chosen_rewards.shape)} and rejected_rewards "
            f"{tuple(rejected_rewards.shape)} must both have shape (B,), one reward per pair."
        )
    diff = chosen_rewards - rejected_rewards  # (B,)
    logits = diff if margin is None else diff - margin.to(diff)
    loss = F.softplus(-logits).mean()  # -log sigma(x) == softplus(-x)
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * (chosen_rewards + rejected_rewards).pow(2).mean()
    with torch.no_grad():
        metrics = {"accuracy": (diff > 0).float().mean(), "margin": diff.mean()}
    return loss, metrics
