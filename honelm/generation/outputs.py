"""What backends and rollouts return: plain per-sample lists, padded into tensors on demand."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch


@dataclass
class GenerationOutput:
    """One backend call's completions, one entry per prompt, in prompt order.

    Attributes:
        completion_ids: Generated token ids. A completion that stopped on an EOS token ends
            with it (the model must learn to stop); one that hit the length limit does not.
        logps: Log-prob of each generated token under the processed distribution it was
            sampled from (see :mod:`honelm.generation.sampling`).
        raw_logps: Log-prob under ``softmax(logits / temperature)``, when the backend was
            asked for it (``None`` otherwise).
        truncated: ``True`` where the length limit, not an EOS token, ended the completion.
    """

    completion_ids: list[list[int]]
    logps: list[list[float]]
    truncated: list[bool]
    raw_logps: list[list[float]] | None = None

    def __len__(self) -> int:
        return len(self.completion_ids)


@dataclass
class RolloutOutput:
    """A batch of rollouts: what a trainer needs to score, mask and train on.

    Row ``i`` is the ``i``-th prompt as given (prompts repeated ``num_generations`` times sit
    next to each other: ``[p0, p0, ..., p1, p1, ...]``).

    Attributes:
        prompt_ids: Prompt token ids (chat template applied, left-truncated to
            ``max_prompt_length``).
        completion_ids: Completion token ids, tool-result tokens included in multi-turn
            rollouts.
        logps: Sampling log-probs, aligned with ``completion_ids``; ``0.0`` on tool-result
            tokens.
        truncated: ``True`` where the length budget ended the completion before an EOS.
        completions: What reward functions receive: decoded text for standard prompts, a list
            of messages for conversational ones (``[{"role": "assistant", ...}]``, followed by
            ``tool`` and further ``assistant`` messages in tool-calling rollouts).
        raw_logps: Temperature-scaled raw log-probs when requested, else ``None``.
        tool_mask: ``1`` on model-generated tokens, ``0`` on tool-result tokens, ``None``
            without tools. Train on ``completion_mask * tool_mask``.
        tool_call_counts, tool_failure_counts: Tool calls made and failed per row (malformed
            calls, unknown tools, exceptions and timeouts count as failures), ``None``
            without tools.
        extra: Further per-row fields (from a ``rollout_func``), passed on to reward
            functions as keyword arguments.
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    logps: list[list[float]]
    truncated: list[bool]
    completions: list[Any]
    raw_logps: list[list[float]] | None = None
    tool_mask: list[list[int]] | None = None
    tool_call_counts: list[int] | None = None
    tool_failure_counts: list[int] | None = None
    extra: dict[str, list[Any]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.completion_ids)

    def select(self, indices: Sequence[int]) -> RolloutOutput:
        """The rows at ``indices``, in that order."""
        values: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extra":
                values["extra"] = {k: [v[i] for i in indices] for k, v in value.items()}
            elif value is None:
                values[f.name] = None
            else:
                values[f.name] = [value[i] for i in indices]
        return RolloutOutput(**values)

    def split(self, num_chunks: int) -> list[RolloutOutput]:
        """Split into ``num_chunks`` consecutive equal parts (e.g. one per optimizer step when
        one generation round feeds ``steps_per_generation`` steps)."""
        n = len(self)
        if num_chunks < 1 or n % num_chunks:
            raise ValueError(
                f"RolloutOutput.split: {n} rows do not split into {num_chunks} equal chunks; the generation "
                "batch size must be a multiple of the number of chunks (steps_per_generation)."
            )
        size = n // num_chunks
        return [self.select(range(k * size, (k + 1) * size)) for k in range(num_chunks)]

    def to_tensors(self, pad_token_id: int, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Padded tensors for a training step.

        Returns:
            ``prompt_ids`` and ``prompt_mask`` ``(B, P)``, left-padded; ``completion_ids``,
            ``completion_mask`` (1 on every real token, EOS included), ``logps`` (and
            ``raw_logps``, ``tool_mask`` when present) ``(B, T)``, right-padded; ``truncated``
            ``(B,)`` bool.
        """
        out: dict[str, torch.Tensor] = {}
        out["prompt_ids"], out["prompt_mask"] = pad_sequences(self.prompt_ids, pad_token_id, side="left")
        out["completion_ids"], out["completion_mask"] = pad_sequences(self.completion_ids, pad_token_id)
        out["logps"], _ = pad_sequences(self.logps, 0.0, dtype=torch.float32)
        if self.raw_logps is not None:
            out["raw_logps"], _ = pad_sequences(self.raw_logps, 0.0, dtype=torch.float32)
        if self.tool_mask is not None:
            out["tool_mask"], _ = pad_sequences(self.tool_mask, 0)
        out["truncated"] = torch.tensor(self.truncated, dtype=torch.bool)
        if device is not None:
            out = {k: v.to(device) for k, v in out.items()}
        return out


def pad_sequences(
    rows: Sequence[Sequence[Any]], pad_value: Any, *, side: str = "right", dtype: torch.dtype = torch.long
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad ragged rows into ``(values, mask)`` tensors of shape ``(B, max_len)``."""
    width = max((len(r) for r in rows), default=0)
    values = torch.full((len(rows), width), pad_value, dtype=dtype)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for i, row in enumerate(rows):
        if not len(row):
            continue
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        values[i, span] = torch.as_tensor(list(row), dtype=dtype)
        mask[i, span] = 1
    return values, mask
