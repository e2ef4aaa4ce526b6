"""SFT losses: pure functions of hidden states, the LM head and labels.

Both take the final hidden states ``(B, T, H)`` and labels ``(B, T)`` aligned with the
input ids (the causal shift happens here: position ``t`` predicts ``labels[t + 1]``), and
go through :func:`honelm.ops.chunked_cross_entropy`, so the ``(tokens, vocab)`` logits are
never materialized and masked positions never reach the LM head.

The sum over tokens is divided by ``num_items_in_batch`` when given (the number of scored
tokens in the whole optimizer step, across gradient-accumulation micro-batches and
processes), so the loss is the same however the step is split.
"""

from __future__ import annotations

import torch

from honelm.ops import chunked_cross_entropy

IGNORE_INDEX = -100


def _shift(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return hidden[:, :-1, :], labels[:, 1:]  # (B, T-1, H), (B, T-1)


def _denominator(num_items_in_batch: int | float | torch.Tensor | None, num_tokens: torch.Tensor) -> torch.Tensor:
    if num_items_in_batch is None:
        return num_tokens.clamp(min=1).float()
    if torch.is_tensor(num_items_in_batch):
        return num_items_in_batch.to(num_tokens.device).float().clamp(min=1)
    return torch.tensor(max(float(num_items_in_batch), 1.0), device=num_tokens.device)


def _metrics(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        "num_tokens": stats["num_tokens"],
        "num_correct": stats["num_correct"],
        "entropy_sum": stats["entropy_sum"],
    }


def nll_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Negative log-likelihood of the labelled tokens: ``-sum_t log p(y_t | y_<t) / N``.

    Returns the loss and detached counts (``num_tokens``, ``num_correct``, ``entropy_sum``).
    """
    hidden, labels = _shift(hidden, labels)
    token_loss, stats = chunked_cross_entropy(
        hidden, weight, labels, bias, ignore_index=IGNORE_INDEX, reduction="sum", return_stats=True
    )
    loss = token_loss / _denominator(num_items_in_batch, stats["num_tokens"])
    return loss, _metrics(stats)


def dft_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Dynamic Fine-Tuning (Wu et al., 2025, "On the Generalization of SFT", eq. 9):
    ``-sum_t sg(p(y_t)) * log p(y_t) / N``, each token's NLL weighted by its own detached
    probability, which rescales the SFT gradient to that of an on-policy objective.
    """
    hidden, labels = _shift(hidden, labels)
    token_nll, stats = chunked_cross_entropy(
        hidden, weight, labels, bias, ignore_index=IGNORE_INDEX, reduction="none", return_stats=True
    )  # (B, T-1), 0 where ignored
    weights = torch.exp(-token_nll.detach())  # p(y_t), (B, T-1)
    mask = labels != IGNORE_INDEX
    loss = (weights * token_nll * mask).sum() / _denominator(num_items_in_batch, stats["num_tokens"])
    return loss, _metrics(stats)


LOSSES = {"nll": nll_loss, "dft": dft_loss}
