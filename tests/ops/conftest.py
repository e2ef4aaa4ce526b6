"""Naive references for the chunked ops: full logits in float32, plain autograd."""

from __future__ import annotations

from typing import Callable

import pytest
import torch


def naive_logps_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log_softmax of the full float32 logits at ``targets``, and the entropy of each row."""
    logits = hidden.float() @ weight.float().T  # (..., V)
    if bias is not None:
        logits = logits + bias.float()
    logp_all = torch.log_softmax(logits / temperature, dim=-1)  # (..., V)
    logps = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logps, entropy


def leaves(*tensors: torch.Tensor | None, dtype: torch.dtype | None = None) -> list[torch.Tensor | None]:
    """Fresh leaf copies that require grad (None stays None)."""
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        t = t.detach().clone() if dtype is None else t.detach().to(dtype)
        out.append(t.requires_grad_())
    return out


@pytest.fixture
def naive() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    return naive_logps_and_entropy


@pytest.fixture
def make_leaves() -> Callable[..., list[torch.Tensor | None]]:
    return leaves
