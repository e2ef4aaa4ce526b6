"""RLOO advantages and loss: pure functions of tensors.

Shapes: ``B`` completions, ``num_generations`` (``G``) consecutive rows per prompt; ``T``
completion tokens. ``logps`` are log-probs of the sampled tokens under the current policy,
``old_logps`` under the policy that generated them, ``ref_logps`` under the reference;
``completion_mask`` is 1 on the tokens that count (generated tokens, not padding or tool
results).

REINFORCE Leave-One-Out (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for
free!"; Ahmadian et al. 2024, "Back to Basics", arXiv:2402.14740) treats a whole completion
as one action. Its reward, optionally penalized by ``beta`` times a sequence-level KL estimate
(eq. 1 of Ahmadian et al.), minus the mean reward of the prompt's other ``G - 1`` completions
is its advantage (eq. 5); the policy gradient is ``A_i * grad log pi(y_i | x)``. As in PPO and
TRL's RLOO, the objective is written with the sequence probability ratio
``r_i = pi(y_i | x) / pi_old(y_i | x)`` and clipped, so that a round can be reused for several
updates (``num_iterations``):

    L = mean_i  -min(r_i A_i, clip(r_i, 1 - eps_low, 1 + eps_high) A_i)

At ``r_i = 1`` its gradient is exactly RLOO's.
"""

from __future__ import annotations

import torch

SAMPLING_CORRECTIONS = ("sequence_mask", "sequence_truncate")


# --------------------------------------------------------------------------- advantages


def leave_one_out_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """``A_i = r_i - mean_{j != i} r_j`` within each group of ``num_generations`` consecutive
    rewards (Ahmadian et al. 2024, eq. 5), i.e. ``G / (G - 1) * (r_i - mean_j r_j)``.

    ``NaN`` rewards mark completions no reward function applies to: they are left out of
    their siblings' baselines (the mean runs over the scored others) and their own advantage
    is ``NaN``, as is that of a completion without a scored sibling. Returns ``(B,)`` float32.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (one value per completion), got shape {tuple(rewards.shape)}.")
    if num_generations < 2:
        raise ValueError(
            f"num_generations={num_generations}: the leave-one-out baseline needs at least 2 completions per prompt."
        )
    if rewards.numel() % num_generations:
        raise ValueError(
            f"{rewards.numel()} rewards do not split into groups of num_generations={num_generations}: each "
            "prompt's completions must be consecutive and complete."
        )
    grouped = rewards.float().view(-1, num_generations)  # (P, G)
    scored = ~torch.isnan(grouped)
    values = torch.where(scored, grouped, torch.zeros_like(grouped))
    others_sum = values.sum(dim=1, keepdim=True) - values  # (P, G)
    others_count = scored.sum(dim=1, keepdim=True) - scored.long()  # (P, G)
    baseline = others_sum / others_count.clamp(min=1)
    advantages = torch.where(scored & (others_count > 0), grouped - baseline, torch.full_like(grouped, float("nan")))
    return advantages.reshape(-1)


def normalize_advantages(advantages: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Standardize over the whole batch: ``(A - mean) / (std + eps)`` with the unbiased
    standard deviation, ``NaN`` entries ignored (and kept ``NaN``)."""
    present = ~torch.isnan(advantages)
    kept = advantages[present]
    if kept.numel() == 0:
        return advantages
    mean = kept.mean()
    std = kept.std() if kept.numel() > 1 else torch.zeros((), dtype=kept.dtype, device=kept.device)
    return (advantages - mean) / (std + eps)


# --------------------------------------------------------------------------- KL estimates


def sequence_kl(logps: torch.Tensor, ref_logps: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Sequence-level estimate of ``KL(pi || pi_ref)`` from samples of ``pi``:
    ``sum_t (log pi(y_t) - log pi_ref(y_t))`` over the counted tokens (the "k1" estimator; the
    log-ratio of the sequence probabilities). Unbiased, but a single sample may be negative.
    Returns ``(B,)``."""
    mask = completion_mask.to(logps.dtype)
    return ((logps - ref_logps) * mask).sum(dim=1)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` from samples of ``pi`` (Schulman 2020, "k3"):
    ``exp(d) - d - 1`` with ``d = log pi_ref - log pi``; never negative, low variance."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1.0


def kl_penalized_rewards(
    rewards: torch.Tensor, sequence_kls: torch.Tensor, beta: float
) -> torch.Tensor:
    """``r_i - beta * KL_i``: the reward of RLOO with the KL in the reward (Ahmadian et al. 2024, eq. 1)."""
    return rewards.float() - beta * sequence_kls.float()


# --------------------------------------------------------------------------- generator mismatch


def sampling_correction(
    old_logps: torch.Tensor,
    sampling_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    mode: str = "sequence_mask",
    clip_min: float = 0.0,
    clip_max: float = 3.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Importance weights ``pi_old(y) / pi_sampler(y)`` of whole completions, for a generator
    (vLLM) whose log-probs differ from the trainer's (Yao et al. 2025, "Your efficient RL
    framework secretly brings you off-policy RL training"). ``sequence_truncate`` clamps the
    weight into ``[clip_min, clip_max]`` (truncated importance sampling), ``sequence_mask``
    sets weights outside it to 0 (masked importance sampling).

    Returns detached ``(B,)`` weights and ``{"ratio": raw weights, "outside": bool}``.
    """
    if mode not in SAMPLING_CORRECTIONS:
        raise ValueError(f"sampling correction mode must be one of {SAMPLING_CORRECTIONS}, got {mode!r}.")
    mask = completion_mask.to(old_logps.dtype)
    ratio = torch.exp(((old_logps - sampling_logps).detach() * mask).sum(dim=1))  # (B,)
    outside = (ratio < clip_min) | (ratio > clip_max)
    weight = ratio.clamp(clip_min, clip_max) if mode == "sequence_truncate" else ratio * (~outside)
    return weight, {"ratio": ratio, "outside": outside}


# --------------------------------------------------------------------------- the loss


def rloo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
    sequence_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped RLOO objective of one batch, averaged over its completions.

    Args:
        logps: (B, T) current log-probs of the sampled tokens, with gradient.
        old_logps: (B, T) log-probs of the generating policy, or ``None`` for
            ``logps.detach()`` (the round is used once, so every ratio is 1).
        advantages: (B,) one advantage per completion (``leave_one_out_advantages``).
        completion_mask: (B, T) 1 on the counted tokens. A completion without any (e.g. a
            truncated one with ``mask_truncated_completions``) adds 0 to the loss.
        epsilon, epsilon_high: the sequence ratio is clipped into ``[1 - epsilon, 1 + epsilon_high]``
            (``epsilon_high`` defaults to ``epsilon``).
        beta, ref_logps: KL in the loss: ``beta * sum_t k3_t`` is added to each completion's
            loss (the sum, like the sequence-level KL of the KL-in-reward variant). Leave
            ``beta=0`` when the KL is already in the reward.
        sequence_weights: optional detached (B,) weights of the policy term (the generator
            mismatch correction of :func:`sampling_correction`).

    Returns:
        ``(loss, metrics)``: the scalar loss and detached metrics ``clip_ratio/low_mean``,
        ``clip_ratio/high_mean``, ``clip_ratio/region_mean`` (shares of completions whose ratio
        was clipped), ``policy_loss`` and, with ``beta``, ``kl`` (mean k3 per counted token).
    """
    if logps.shape != completion_mask.shape:
        raise ValueError(f"logps {tuple(logps.shape)} and completion_mask {tuple(completion_mask.shape)} differ.")
    if advantages.shape != logps.shape[:1]:
        raise ValueError(f"advantages must have shape ({logps.shape[0]},), got {tuple(advantages.shape)}.")
    eps_high = epsilon if epsilon_high is None else epsilon_high
    mask = completion_mask.to(logps.dtype)
    old = logps.detach() if old_logps is None else old_logps
    log_ratio = ((logps - old) * mask).sum(dim=1)  # (B,) log pi(y)/pi_old(y)
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1.0 - epsilon, 1.0 + eps_high)
    adv = advantages.to(ratio.dtype)
    per_sequence = -torch.minimum(ratio * adv, clipped * adv)  # (B,)
    per_sequence = per_sequence * (mask.sum(dim=1) > 0).to(per_sequence.dtype)  # nothing counted, nothing to learn
    if sequence_weights is not None:
        per_sequence = per_sequence * sequence_weights.detach()
    metrics: dict[str, torch.Tensor] = {"policy_loss": per_sequence.mean().detach()}
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("rloo_loss: beta != 0 needs ref_logps (the reference policy's log-probs).")
        kl = k3_kl(logps, ref_logps) * mask  # (B, T)
        per_sequence = per_sequence + beta * kl.sum(dim=1)
        metrics["kl"] = (kl.sum() / mask.sum().clamp(min=1.0)).detach()
    low = (ratio < 1.0 - epsilon) & (adv < 0)
    high = (ratio > 1.0 + eps_high) & (adv > 0)
    metrics["clip_ratio/low_mean"] = low.float().mean().detach()
    metrics["clip_ratio/high_mean"] = high.float().mean().detach()
    metrics["clip_ratio/region_mean"] = (low | high).float().mean().detach()
    return per_sequence.mean(), metrics
