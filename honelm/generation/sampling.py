"""Sampling parameters and the logit processors applied before each token is drawn.

Every rollout backend draws tokens from the same *processed* distribution, built from the
model's next-token logits in this order (the order transformers uses):

1. ``repetition_penalty`` (CTRL, Keskar et al. 2019, arXiv:1909.05858): the logit ``x`` of
   every token already present in the prompt or the completion so far becomes ``x / p`` when
   ``x > 0`` and ``x * p`` otherwise;
2. ``temperature``: logits are divided by it (``0`` means greedy decoding);
3. ``top_k``: only the ``k`` largest logits are kept (ties with the ``k``-th are kept too);
4. ``top_p`` (nucleus sampling, Holtzman et al. 2019): the smallest set of most likely tokens
   whose probability reaches ``top_p`` is kept;
5. ``min_p``: tokens whose probability is below ``min_p`` times the most likely token's are
   dropped.

Dropped tokens get a logit of ``-inf``. :func:`sample_next_token` draws from the softmax of
the result and returns two log-probs of each drawn token:

- ``logps``: under the processed distribution actually sampled from (steps 1-5). This is
  the behaviour policy's log-prob, the right one for importance sampling against the
  sampler. Greedy decoding samples from a point mass, so its ``logps`` are ``0``.
- ``raw_logps``: ``log_softmax(logits / temperature)`` of the model's own logits, without
  penalty or truncation (temperature ``1`` for greedy). This is what a trainer recomputes
  with :func:`honelm.ops.selective_logps` at the same temperature, so it matches a
  teacher-forced recomputation exactly when no penalty or truncation is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    """How tokens are drawn. Field names and meanings follow transformers, vLLM and TRL.

    Args:
        temperature: Logits are divided by it; ``0`` selects greedy decoding.
        top_p: Nucleus sampling mass in ``(0, 1]``; ``1`` keeps every token.
        top_k: Keep only the ``k`` most likely tokens; ``None`` or ``0`` keeps every token.
        min_p: Drop tokens less likely than ``min_p`` times the most likely one, in
            ``[0, 1]``; ``None`` or ``0`` keeps every token.
        repetition_penalty: Values above ``1`` discourage tokens already in the prompt or
            completion, below ``1`` encourage them; ``1`` is off.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"SamplingParams: temperature must be >= 0 (0 for greedy), got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams: top_p must be in (0, 1], got {self.top_p}. Use 1.0 to disable it.")
        if self.top_k is not None and (
            isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0
        ):
            raise ValueError(
                f"SamplingParams: top_k must be a non-negative int (0 or None disables it), got {self.top_k!r}."
            )
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"SamplingParams: min_p must be in [0, 1] (0 or None disables it), got {self.min_p}.")
        if not self.repetition_penalty > 0:
            raise ValueError(
                f"SamplingParams: repetition_penalty must be > 0 (1.0 disables it), got {self.repetition_penalty}."
            )

    @property
    def greedy(self) -> bool:
        """Whether decoding is greedy (``temperature == 0``)."""
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalize the logits of tokens already seen (CTRL's rule). ``logits``, ``seen``: ``(B, V)``."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_top_k(logits: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Keep the ``top_k`` largest logits of each row (and ties with the ``k``-th); others -> -inf."""
    if not top_k or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``top_p``.

    A token is dropped when the tokens ranked strictly above it already hold ``top_p`` of the
    probability; the most likely token is always kept.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= top_p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float | None) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p`` times the row's largest probability."""
    if not min_p:
        return logits
    probs = torch.softmax(logits, dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values  # (B, 1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """The processed float32 logits that tokens are drawn from (see the module docstring).

    Args:
        logits: next-token logits ``(B, V)``.
        params: the sampling parameters.
        seen: ``(B, V)`` bool, tokens present in each row's prompt and completion so far;
            needed only when ``params.repetition_penalty != 1``.

    For greedy decoding only the repetition penalty applies (the argmax is unchanged by
    temperature and truncation).
    """
    x = logits.float()
    if params.repetition_penalty != 1.0:
        if seen is None:
            raise ValueError("process_logits: repetition_penalty != 1 needs `seen` (the tokens of each row so far).")
        x = apply_repetition_penalty(x, seen, params.repetition_penalty)
    if params.greedy:
        return x
    if params.temperature != 1.0:
        x = x / params.temperature
    x = apply_top_k(x, params.top_k)
    x = apply_top_p(x, params.top_p)
    return apply_min_p(x, params.min_p)


def sample_next_token(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw one token per row and return ``(tokens, logps, raw_logps)``, each ``(B,)``.

    ``logps`` are log-probs under the processed distribution sampled from (``0`` for greedy),
    ``raw_logps`` under ``softmax(logits / temperature)`` (temperature ``1`` for greedy); see
    the module docstring.
    """
    processed = process_logits(logits, params, seen)  # (B, V) float32
    if params.greedy:
        tokens = processed.argmax(dim=-1)  # (B,)
        logps = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
    else:
        probs = torch.softmax(processed, dim=-1)
        tokens = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)  # (B,)
        logps = torch.log_softmax(processed, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    scale = 1.0 if params.greedy else params.temperature
    raw = torch.log_softmax(logits.float() / scale, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, logps, raw
