"""In-process generation with the transformers model being trained (the default backend).

Prompts are left-padded into batches and decoded token by token with a KV cache. Tokens are
drawn by :func:`honelm.generation.sampling.sample_next_token`, so the returned log-probs are
exactly those of the distribution sampled from.

    backend = TransformersBackend(model, tokenizer, SamplingParams(temperature=0.9, top_p=0.95),
                                  max_completion_length=256)
    out = backend.generate([[12, 7, 99], [5, 8]])     # token ids in, GenerationOutput out
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .outputs import GenerationOutput
from .sampling import SamplingParams, sample_next_token


class TransformersBackend:
    """Batched, KV-cached sampling with a transformers causal LM.

    Args:
        model: The causal LM (the policy). The attribute ``backend.model`` may be replaced,
            e.g. by the unwrapped model of a distributed wrapper.
        tokenizer: Gives the pad and EOS ids when ``pad_token_id`` / ``eos_token_id`` are not set.
        sampling: Default :class:`SamplingParams` (``SamplingParams()`` when omitted).
        max_completion_length: Default maximum number of generated tokens per completion.
        max_batch_size: At most this many prompts per forward pass (``None``: all at once).
        return_raw_logps: Also return the temperature-scaled raw log-probs (``raw_logps``).
        eos_token_id: Token id(s) that end a completion. Defaults to the tokenizer's EOS plus
            the model's ``generation_config.eos_token_id``.
        pad_token_id: Id put after a finished completion inside a batch. Defaults to the
            tokenizer's pad (or EOS) token.
        seed: Seeds a private ``torch.Generator``: the sampled tokens are then a function of
            the seed and the calls made, and the global RNG is untouched. ``None`` uses the
            global RNG.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        sampling: SamplingParams | None = None,
        *,
        max_completion_length: int = 256,
        max_batch_size: int | None = None,
        return_raw_logps: bool = False,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        seed: int | None = None,
    ) -> None:
        if max_completion_length < 1:
            raise ValueError(f"TransformersBackend: max_completion_length must be >= 1, got {max_completion_length}.")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"TransformersBackend: max_batch_size must be >= 1 or None, got {max_batch_size}.")
        self.model = model
        self.sampling = sampling if sampling is not None else SamplingParams()
        self.max_completion_length = max_completion_length
        self.max_batch_size = max_batch_size
        self.return_raw_logps = return_raw_logps
        self.eos_token_ids = _eos_ids(model, tokenizer, eos_token_id)
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_token_id is None:
            raise ValueError("TransformersBackend: pass `pad_token_id` or a `tokenizer` that has a pad or EOS token.")
        self.pad_token_id = int(pad_token_id)
        self.seed = seed
        self._generator: torch.Generator | None = None

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        max_new_tokens: int | Sequence[int] | None = None,
        sampling: SamplingParams | None = None,
    ) -> GenerationOutput:
        """Complete each prompt once.

        Args:
            prompt_ids: One list of token ids per prompt (no padding).
            max_new_tokens: Token limit, one for all prompts or one per prompt; defaults to
                ``max_completion_length``.
            sampling: Overrides the backend's sampling parameters for this call.
        """
        sampling = sampling if sampling is not None else self.sampling
        limits = _limits(max_new_tokens, self.max_completion_length, len(prompt_ids))
        for i, ids in enumerate(prompt_ids):
            if len(ids) == 0:
                raise ValueError(
                    f"TransformersBackend.generate: prompt {i} has no tokens; every prompt needs at least one."
                )
        model = self.model
        was_training = model.training
        model.eval()
        result = GenerationOutput([], [], [], [] if self.return_raw_logps else None)
        step = self.max_batch_size or max(len(prompt_ids), 1)
        try:
            for start in range(0, len(prompt_ids), step):
                chunk = [list(map(int, p)) for p in prompt_ids[start : start + step]]
                self._generate_chunk(model, chunk, limits[start : start + step], sampling, result)
        finally:
            model.train(was_training)
        return result

    # ---- internals --------------------------------------------------------------------------

    def _rng(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        return self._generator

    @torch.no_grad()
    def _generate_chunk(
        self,
        model: Any,
        prompts: list[list[int]],
        limits: list[int],
        sampling: SamplingParams,
        result: GenerationOutput,
    ) -> None:
        device = next(model.parameters()).device
        batch, width = len(prompts), max(len(p) for p in prompts)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long, device=device)  # (B, P)
        attention_mask = torch.zeros((batch, width), dtype=torch.long, device=device)  # (B, P)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p) :] = torch.tensor(p, device=device)
            attention_mask[i, width - len(p) :] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P)
        limit = torch.tensor(limits, device=device)  # (B,)
        eos = torch.tensor(sorted(self.eos_token_ids), device=device)

        outputs = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
        )
        logits = outputs.logits[:, -1, :]  # (B, V)
        cache_name = _cache_name(outputs)
        seen = _seen_tokens(input_ids, attention_mask, logits.shape[-1]) if sampling.repetition_penalty != 1.0 else None
        generator = self._rng(device)

        tokens, logps, raws = [], [], []
        finished = torch.zeros(batch, dtype=torch.bool, device=device)  # (B,)
        rows = torch.arange(batch, device=device)
        for step in range(max(limits)):
            token, logp, raw = sample_next_token(logits, sampling, seen, generator)
            token = token.masked_fill(finished, self.pad_token_id)
            tokens.append(token)
            logps.append(logp)
            raws.append(raw)
            if seen is not None:
                seen[rows, token] = seen[rows, token] | ~finished
            finished = finished | torch.isin(token, eos) | (limit <= step + 1)
            if bool(finished.all()):
                break
            attention_mask = torch.cat([attention_mask, torch.ones((batch, 1), dtype=torch.long, device=device)], dim=1)
            position_ids = position_ids[:, -1:] + 1
            outputs = model(
                input_ids=token[:, None],
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                **{cache_name: outputs[cache_name]},
            )
            logits = outputs.logits[:, -1, :]

        token_rows = torch.stack(tokens, dim=1).tolist()  # (B, T)
        logp_rows = torch.stack(logps, dim=1).tolist()
        raw_rows = torch.stack(raws, dim=1).tolist() if result.raw_logps is not None else None
        for i in range(batch):
            length, stopped = _completion_length(token_rows[i], self.eos_token_ids, limits[i])
            result.completion_ids.append(token_rows[i][:length])
            result.logps.append(logp_rows[i][:length])
            result.truncated.append(not stopped)
            if raw_rows is not None:
                result.raw_logps.append(raw_rows[i][:length])  # type: ignore[union-attr]


def _eos_ids(model: Any, tokenizer: Any, eos_token_id: int | Sequence[int] | None) -> set[int]:
    if eos_token_id is not None:
        ids = {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(i) for i in eos_token_id}
    else:
        ids = set()
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if config_eos is not None:
            ids.update([int(config_eos)] if isinstance(config_eos, int) else [int(i) for i in config_eos])
    if not ids:
        raise ValueError(
            "TransformersBackend: no EOS token id is known. Pass `eos_token_id`, or a tokenizer with an EOS token."
        )
    return ids


def _limits(max_new_tokens: int | Sequence[int] | None, default: int, n: int) -> list[int]:
    if max_new_tokens is None:
        limits = [default] * n
    elif isinstance(max_new_tokens, int):
        limits = [max_new_tokens] * n
    else:
        limits = [int(m) for m in max_new_tokens]
        if len(limits) != n:
            raise ValueError(f"generate: got {len(limits)} max_new_tokens values for {n} prompts; give one per prompt.")
    for i, m in enumerate(limits):
        if m < 1:
            raise ValueError(f"generate: max_new_tokens must be >= 1, got {m} for prompt {i}.")
    return limits


def _cache_name(outputs: Any) -> str:
    """The KV cache's name in this transformers version: ``cache`` (newer) or ``past_key_values``."""
    for name in ("cache", "past_key_values"):
        if outputs.get(name) is not None:
            return name
    raise RuntimeError(
        "TransformersBackend: the model returned no KV cache although use_cache=True was passed; "
        "KV-cached generation needs a model that supports caching."
    )


def _seen_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, vocab: int) -> torch.Tensor:
    """``(B, V)`` bool: which tokens each row's (unpadded) prompt contains."""
    ids = input_ids.masked_fill(attention_mask == 0, vocab)  # padding -> an extra column, dropped below
    seen = torch.zeros((input_ids.shape[0], vocab + 1), dtype=torch.bool, device=input_ids.device)
    seen.scatter_(1, ids, True)
    return seen[:, :vocab]


def _completion_length(tokens: list[int], eos_ids: set[int], limit: int) -> tuple[int, bool]:
    """Length of a row's completion (through its first EOS) and whether an EOS ended it."""
    for j, t in enumerate(tokens[:limit]):
        if t in eos_ids:
            return j + 1, True
    return min(limit, len(tokens)), False
