"""GRPO losses and advantages: pure functions of tensors.

Shapes: ``B`` completions (``num_generations`` consecutive rows per prompt), ``T`` completion
tokens. ``logps`` are the current policy's log-probs of the sampled tokens (B, T),
``old_logps`` those of the policy that sampled them (equal to ``logps.detach()`` when each
generation is used for one update), ``completion_mask`` is 1 on tokens that count.

Policy objective (DeepSeekMath, Shao et al. 2024, eq. 3; PPO's clipped surrogate):

    L_t = -min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A),   r_t = pi(y_t) / pi_old(y_t)

with variants of the ratio (token or sequence level, GSPO), of the clipping (two-sided,
CISPO, SAPO's soft gate) and of how token terms are averaged (``loss_type``). A k3 estimate
of KL(pi || pi_ref) is added per token with weight ``beta``.
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
SAMPLING_CORRECTIONS = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


# --------------------------------------------------------------------------- advantages


def _groups(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (one value per completion), got shape {tuple(rewards.shape)}.")
    if num_generations < 1 or rewards.numel() % num_generations:
        raise ValueError(
            f"{rewards.numel()} rewards cannot be split into groups of num_generations={num_generations}: "
            "each prompt's completions must be consecutive and complete."
        )
    return rewards.view(-1, num_generations)  # (P, G)


def group_advantages(
    rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group", eps: float = 1e-4
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO advantages: each reward minus its group's mean, optionally divided by a standard
    deviation (DeepSeekMath, Shao et al. 2024, sec. 4.1.2).

    ``scale_rewards``: ``"group"`` divides by the group's standard deviation, ``"batch"`` by
    the whole batch's (Hu et al. 2025, REINFORCE++ / "PPO Lite"), ``"none"`` does not scale
    (Dr. GRPO, Liu et al. 2025, which removes the question-difficulty bias). Standard
    deviations are unbiased (Bessel) and ``eps`` is added to them.

    Returns ``(advantages (B,), metrics)`` with ``reward_std`` (mean of the groups' standard
    deviations) and ``frac_reward_zero_std`` (share of groups whose rewards are all equal).
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}.")
    grouped = _groups(rewards.float(), num_generations)  # (P, G)
    centered = grouped - grouped.mean(dim=1, keepdim=True)  # (P, G)
    group_std = grouped.std(dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(grouped[:, :1])
    if scale_rewards == "group":
        centered = centered / (group_std + eps)
    elif scale_rewards == "batch":
        batch_std = rewards.float().std() if rewards.numel() > 1 else rewards.new_zeros(())
        centered = centered / (batch_std + eps)
    metrics = {
        "reward_std": group_std.mean().detach(),
        "frac_reward_zero_std": (group_std.squeeze(1) < 1e-8).float().mean().detach()
        if num_generations > 1
        else rewards.new_ones(()),
    }
    return centered.reshape(-1), metrics


def rloo_advantages(
    rewards: torch.Tensor, num_generations: int, normalize: bool = False, eps: float = 1e-4
) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (Kool et al. 2019; Ahmadian et al. 2024, eq. 5):
    ``A_i = r_i - mean_{j != i} r_j`` over the ``num_generations`` samples of a prompt, which
    equals ``G / (G - 1) * (r_i - mean_j r_j)``. ``normalize`` then rescales all advantages of
    the batch to mean 0 and standard deviation 1."""
    if num_generations < 2:
        raise ValueError("RLOO needs num_generations >= 2: the baseline of a sample is the mean of the others.")
    grouped = _groups(rewards.float(), num_generations)  # (P, G)
    others_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (num_generations - 1)  # (P, G)
    adv = (grouped - others_mean).reshape(-1)  # (B,)
    if normalize:
        adv = (adv - adv.mean()) / (adv.std() + eps) if adv.numel() > 1 else adv - adv.mean()
    return adv


# --------------------------------------------------------------------------- ratios and KL


def importance_log_ratio(
    logps: torch.Tensor, old_logps: torch.Tensor, completion_mask: torch.Tensor, level: str = "token"
) -> torch.Tensor:
    """``log(pi / pi_old)`` per token (B, T), or per sequence (B, 1) as the mean of the token
    log-ratios over the sequence's counted tokens: GSPO (Zheng et al. 2025, eq. 7), whose
    sequence ratio is the geometric mean of the token ratios."""
    if level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, got {level!r}.")
    log_ratio = logps - old_logps  # (B, T)
    if level == "token":
        return log_ratio
    mask = completion_mask.to(log_ratio.dtype)
    return ((log_ratio * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).unsqueeze(1)  # (B, 1)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman 2020, "k3";
    DeepSeekMath eq. 4): ``exp(ref - logp) - (ref - logp) - 1``, non-negative."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1.0


# --------------------------------------------------------------------------- per-token objectives


def clipped_surrogate(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    delta: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO/GRPO per-token loss ``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)``
    (Schulman et al. 2017, eq. 7; asymmetric bounds: DAPO's clip-higher, Yu et al. 2025).

    ``delta``: two-sided clipping (INTELLECT-2, 2025): the unclipped ratio is also capped at
    ``delta``, so a negative-advantage token whose ratio exploded cannot dominate.

    ``log_ratio`` is (B, T) or (B, 1); ``advantages`` (B,). Returns the loss with the
    broadcast shape and boolean masks of where the low / high bound was active.
    """
    ratio = torch.exp(log_ratio)
    adv = advantages.unsqueeze(1)  # (B, 1)
    clipped = ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
    unclipped = ratio if delta is None else ratio.clamp(max=delta)
    loss = -torch.minimum(unclipped * adv, clipped * adv)
    low = (ratio < 1.0 - epsilon_low) & (adv < 0)
    high = (ratio > 1.0 + epsilon_high) & (adv > 0)
    return loss, {"low": low, "high": high}


def cispo_objective(
    logps: torch.Tensor, log_ratio: torch.Tensor, advantages: torch.Tensor, max_ratio: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CISPO (MiniMax-M1, 2025, eq. 4): the importance weight is clipped and detached, and
    every token keeps a gradient: ``-sg(min(r, max_ratio)) * A * log pi``. ``max_ratio`` is
    the upper bound on the weight itself (``1 + eps_high``; the paper's ScaleRL setting uses
    a cap of about 5)."""
    ratio = torch.exp(log_ratio)
    weight = ratio.clamp(max=max_ratio).detach()
    adv = advantages.unsqueeze(1)
    loss = -weight * adv * logps
    high = (ratio > max_ratio) & (adv > 0)
    return loss, {"low": torch.zeros_like(high), "high": high}


def sapo_objective(
    log_ratio: torch.Tensor, advantages: torch.Tensor, temperature_pos: float, temperature_neg: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SAPO (Soft Adaptive Policy Optimization, Gao et al. 2025): the hard clip is replaced by
    a smooth gate ``f(r) = sigmoid(tau (r - 1)) * 4 / tau``, whose gradient at ``r = 1`` equals
    the unclipped one and fades as ``r`` leaves 1; ``tau`` is ``temperature_pos`` for tokens
    of positive-advantage samples and ``temperature_neg`` otherwise. Loss ``-f(r) A``."""
    ratio = torch.exp(log_ratio)
    adv = advantages.unsqueeze(1)
    tau = torch.where(adv > 0, torch.full_like(adv, temperature_pos), torch.full_like(adv, temperature_neg))
    loss = -torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau) * adv
    none = torch.zeros(loss.shape, dtype=torch.bool, device=loss.device)
    return loss, {"low": none, "high": none}


# --------------------------------------------------------------------------- masks and weights


def top_entropy_mask(entropy: torch.Tensor, completion_mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """Keep only the tokens whose entropy is in the top ``quantile`` share of the counted
    tokens ("Beyond the 80/20 rule", Wang et al. 2025): 1.0 keeps all, 0.0 keeps only the
    highest-entropy token(s). Returns a float mask (B, T)."""
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile must be in [0, 1], got {quantile}.")
    mask = completion_mask.bool()
    if quantile >= 1.0 or not mask.any():
        return mask.float()
    threshold = torch.quantile(entropy.detach().float()[mask], 1.0 - quantile)
    return (mask & (entropy.detach() >= threshold)).float()


def sampling_correction(
    old_logps: torch.Tensor,
    sampling_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    mode: str = "sequence_mask",
    clip_min: float = 0.0,
    clip_max: float = 3.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Importance weights ``pi_old / pi_sampler`` that correct for a generator whose log-probs
    differ from the trainer's (e.g. vLLM's kernels and precision; Yao et al. 2025, "Your
    efficient RL framework secretly brings you off-policy RL training").

    ``token_*`` weights each token by its own ratio, ``sequence_*`` by the product over the
    sequence; ``*_truncate`` clamps the weight into ``[clip_min, clip_max]`` (TIS), ``*_mask``
    zeroes weights outside it (MIS). Detached, (B, T) or (B, 1)."""
    if mode not in SAMPLING_CORRECTIONS:
        raise ValueError(f"sampling correction mode must be one of {SAMPLING_CORRECTIONS}, got {mode!r}.")
    mask = completion_mask.to(old_logps.dtype)
    log_w = (old_logps - sampling_logps).detach() * mask  # (B, T)
    if mode.startswith("sequence"):
        log_w = log_w.sum(dim=1, keepdim=True)  # (B, 1)
    weight = torch.exp(log_w)
    outside = (weight < clip_min) | (weight > clip_max)
    weight = weight.clamp(clip_min, clip_max) if mode.endswith("truncate") else weight * (~outside)
    return weight, {"ratio": torch.exp(log_w), "outside": outside}


# --------------------------------------------------------------------------- aggregation


def aggregate(
    per_token_loss: torch.Tensor,
    completion_mask: torch.Tensor,
    loss_type: str,
    max_completion_length: int | None = None,
    num_items: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Average the per-token loss (B, T) into a scalar as ``loss_type`` prescribes:

    * ``grpo``, ``sapo``: mean over each sequence's tokens, then over sequences (DeepSeekMath
      eq. 3) — long sequences' tokens weigh less (the length bias Dr. GRPO points out);
    * ``bnpo``: mean over all counted tokens of this batch;
    * ``dr_grpo``: sum divided by ``B * max_completion_length``, a constant (Dr. GRPO);
    * ``dapo``, ``cispo``: sum divided by ``num_items``, the number of counted tokens of the
      whole accumulated (and multi-process) batch (DAPO's token-level loss); without it the
      local count is used.
    """
    mask = completion_mask.to(per_token_loss.dtype)
    masked = per_token_loss * mask
    if loss_type in ("grpo", "sapo"):
        return (masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length (its constant normalizer).")
        return masked.sum() / (per_token_loss.shape[0] * max_completion_length)
    if loss_type in ("dapo", "cispo"):
        denom = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=masked.dtype)
        return masked.sum() / denom.clamp(min=1.0)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}.")


# --------------------------------------------------------------------------- the loss


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    loss_type: str = "dapo",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    importance_sampling_level: str = "token",
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
    max_completion_length: int | None = None,
    num_items: torch.Tensor | float | None = None,
    token_weights: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO family's loss for one batch.

    Args:
        logps: (B, T) current policy log-probs of the sampled tokens (with gradient).
        old_logps: (B, T) log-probs of the policy that sampled, or ``None`` for
            ``logps.detach()`` (one update per generation: every ratio is 1).
        advantages: (B,) one advantage per completion.
        completion_mask: (B, T) 1 on counted tokens (0 on padding, tool results, masked
            truncated completions, tokens outside the top-entropy quantile).
        loss_type: one of ``LOSS_TYPES`` (see :func:`aggregate` and the objectives).
        epsilon, epsilon_high: clip range ``[1 - epsilon, 1 + epsilon_high]``
            (``epsilon_high`` defaults to ``epsilon``); for ``cispo`` the weight cap is
            ``epsilon_high`` when given (e.g. 5.0), else ``1 + epsilon``.
        delta: optional upper cap of the unclipped ratio (two-sided clipping).
        importance_sampling_level: ``token`` or ``sequence`` (GSPO).
        beta, ref_logps: weight of the per-token k3 KL to the reference policy.
        max_completion_length: the constant of ``dr_grpo``.
        num_items: counted tokens of the whole accumulated batch, for ``dapo``/``cispo``.
        token_weights: optional detached (B, T) or (B, 1) weights on the policy term, e.g. the
            generator-mismatch correction of :func:`sampling_correction`.
        entropy, entropy_coef: optional per-token entropy (B, T) with gradient; the loss gets
            ``-entropy_coef * entropy`` per token (an exploration bonus).

    Returns:
        ``(loss, metrics)``: the scalar loss and detached metrics ``kl`` (mean per counted
        token, if ``beta``), ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
        ``clip_ratio/region_mean`` and ``policy_loss``.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}.")
    if logps.shape != completion_mask.shape:
        raise ValueError(f"logps {tuple(logps.shape)} and completion_mask {tuple(completion_mask.shape)} differ.")
    old = logps.detach() if old_logps is None else old_logps
    eps_high = epsilon if epsilon_high is None else epsilon_high
    log_ratio = importance_log_ratio(logps, old, completion_mask, importance_sampling_level)
    if loss_type == "cispo":
        cap = 1.0 + epsilon if epsilon_high is None else epsilon_high
        per_token, clipped = cispo_objective(logps, log_ratio, advantages, cap)
    elif loss_type == "sapo":
        per_token, clipped = sapo_objective(log_ratio, advantages, sapo_temperature_pos, sapo_temperature_neg)
    else:
        per_token, clipped = clipped_surrogate(log_ratio, advantages, epsilon, eps_high, delta)
    per_token = per_token.expand_as(logps)
    if token_weights is not None:
        per_token = per_token * token_weights.detach()
    mask = completion_mask.to(per_token.dtype)
    metrics: dict[str, torch.Tensor] = {}
    count = mask.sum().clamp(min=1.0)
    metrics["policy_loss"] = aggregate(per_token, completion_mask, loss_type, max_completion_length, num_items).detach()
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs ref_logps (the reference policy's log-probs).")
        kl = k3_kl(logps, ref_logps)  # (B, T)
        per_token = per_token + beta * kl
        metrics["kl"] = ((kl * mask).sum() / count).detach()
    if entropy is not None and entropy_coef:
        per_token = per_token - entropy_coef * entropy
    loss = aggregate(per_token, completion_mask, loss_type, max_completion_length, num_items)
    low = clipped["low"].expand_as(logps).to(mask.dtype)
    high = clipped["high"].expand_as(logps).to(mask.dtype)
    metrics["clip_ratio/low_mean"] = ((low * mask).sum() / count).detach()
    metrics["clip_ratio/high_mean"] = ((high * mask).sum() / count).detach()
    metrics["clip_ratio/region_mean"] = (((low + high).clamp(max=1.0) * mask).sum() / count).detach()
    return loss, metrics
