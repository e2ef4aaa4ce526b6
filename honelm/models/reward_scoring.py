"""Reading one reward per sequence out of a sequence-classification model, and scoring texts.

Pooling. A reward model scores a sequence at its *last real token*. Which token that is comes
from the batch layout, never from searching for the pad id (a tokenizer whose pad token is
its EOS pads with the very token that ends each sequence):

* padded batches ``(B, T)``, left or right padded: the last position whose
  ``attention_mask`` is 1;
* padding-free batches ``(1, N)`` (sequences concatenated, ``position_ids`` restarting at 0):
  the end of each sequence, from ``seq_lengths`` or from where the position ids restart.

The model runs its whole forward (so DDP, FSDP, DeepSpeed and PEFT wrappers see a normal
call); a forward hook on its score head keeps the per-token scores ``(B, T, 1)`` that the head
computes anyway, and the rewards are read from them at the positions above. The model's own
pooled ``logits`` are not used.

:class:`RewardModelScorer` wraps a trained reward model as a reward function
``f(prompts, completions, **columns) -> list[float]``, tokenizing exactly as training did.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def last_token_indices(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` index of the last attended token of each row of a ``(B, T)`` mask (left or right padding)."""
    mask = attention_mask.bool()  # (B, T)
    empty = ~mask.any(-1)
    if bool(empty.any()):
        row = int(empty.nonzero()[0, 0])
        raise ValueError(f"Row {row} of the batch has no token (its attention_mask is all 0): nothing to score.")
    positions = torch.arange(1, mask.shape[-1] + 1, device=mask.device)  # (T,)
    return (mask * positions).argmax(-1)  # (B,): the largest attended position


def lengths_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """``(S,)`` lengths of the sequences of a ``(1, N)`` padding-free row, split where positions do not step by 1."""
    positions = position_ids.reshape(-1)  # (N,)
    step = torch.diff(positions, prepend=positions[:1] - 1)  # (N,)
    starts = torch.nonzero(step != 1).reshape(-1)  # (S,)
    bounds = torch.cat([starts, torch.tensor([positions.numel()], device=starts.device)])  # (S + 1,)
    return torch.diff(bounds)  # (S,)


def find_score_head(model: Any) -> torch.nn.Module | None:
    """The module that turns hidden states into scores (``model.score``), looking through PEFT wrappers.

    Decoder sequence-classification models in transformers (Llama, Qwen, Mistral, Gemma,
    GPT-2, ...) apply ``score`` to every position and pool afterwards. ``None`` for models
    without one (encoder classifiers pool before their head).
    """
    base = model
    if hasattr(base, "get_base_model") and hasattr(base, "peft_config"):
        base = base.get_base_model()
    head = getattr(base, "score", None)
    return head if isinstance(head, torch.nn.Module) else None


def sequence_rewards(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    seq_lengths: torch.Tensor | None = None,
    *,
    head: torch.nn.Module | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """One reward per sequence of a padded ``(B, T)`` or padding-free ``(1, N)`` batch.

    Args:
        model: A sequence-classification model with one output (possibly wrapped by DDP/PEFT).
        input_ids: ``(B, T)`` padded, or ``(1, N)`` padding-free.
        attention_mask: ``(B, T)`` for padded batches; absent for padding-free ones.
        position_ids: Required for padding-free batches; computed from ``attention_mask`` for
            padded ones when absent (so left-padded rows get the positions they would have alone).
        seq_lengths: ``(S,)`` lengths of the sequences of a padding-free row, in order. Tokens
            after the last one (padding to a multiple) are not scored. Derived from
            ``position_ids`` when absent.
        head: The score head; defaults to :func:`find_score_head` of ``model``.
        **kwargs: Passed on to the model's forward (e.g. flash-attention ``cu_seq_lens_*``).

    Returns:
        ``(B,)`` (padded) or ``(S,)`` (padding-free) rewards, differentiable, in the head's dtype.
    """
    packed = attention_mask is None and position_ids is not None and input_ids.shape[0] == 1
    if not packed and attention_mask is None:
        attention_mask = torch.ones_like(input_ids)  # (B, T): unpadded rows
    if head is None:
        head = find_score_head(_unwrap(model))
    if head is None:
        return _pooled_by_model(model, input_ids, attention_mask, position_ids, packed, **kwargs)
    if not packed and position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)

    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **kwargs)
    finally:
        handle.remove()
    if len(captured) != 1 or captured[0].dim() != 3 or captured[0].shape[:2] != input_ids.shape:
        shapes = [tuple(c.shape) for c in captured]
        raise RuntimeError(
            f"Expected the model's score head to run once on every position, giving scores of shape "
            f"{(*input_ids.shape, 1)}; it gave {shapes}. This model pools differently from the decoder "
            "sequence-classification models in transformers; use one of those (e.g. "
            "AutoModelForSequenceClassification on a Llama/Qwen/Mistral checkpoint)."
        )
    scores = captured[0][..., 0]  # (B, T)
    if packed:
        if seq_lengths is None:
            seq_lengths = lengths_from_position_ids(position_ids)
        ends = torch.cumsum(seq_lengths.to(scores.device), 0) - 1  # (S,)
        return scores[0, ends]  # (S,)
    ends = last_token_indices(attention_mask).to(scores.device)  # (B,)
    return scores[torch.arange(scores.shape[0], device=scores.device), ends]  # (B,)


def _pooled_by_model(
    model: Any, input_ids: torch.Tensor, attention_mask: Any, position_ids: Any, packed: bool, **kwargs: Any
) -> torch.Tensor:
    """Models whose head is not applied per token (encoder classifiers): their own pooled output."""
    if packed:
        raise ValueError(
            f"{type(_unwrap(model)).__name__} has no per-token `score` head, so its rewards cannot be read from a "
            "padding-free batch. Set padding_free=False."
        )
    outputs = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    return outputs.logits[:, 0]  # (B,)


def _unwrap(model: Any) -> Any:
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP, DataParallel
        model = model.module
    return model


class RewardModelScorer:
    """A trained reward model as a reward function: ``scorer(prompts, completions) -> list[float]``.

    Each ``(prompt, completion)`` is tokenized exactly as :class:`~honelm.RewardTrainer` tokenized
    training pairs (standard text: prompt + completion + EOS; conversational: the chat template's
    prompt with generation prompt, then the reply up to its end-of-turn token), batched with
    right padding and scored at the last real token. Usable wherever reward functions
    ``f(prompts, completions, **columns) -> list[float]`` are (extra columns are ignored)::

        scorer = RewardModelScorer("Qwen2.5-0.5B-Reward")
        scorer(["What is 2 + 2? "], ["4"])                          # standard text
        scorer([[{"role": "user", "content": "Hi"}]],
               [[{"role": "assistant", "content": "Hello!"}]])       # conversational

    Args:
        model: A directory or Hub id (loaded with ``AutoModelForSequenceClassification``,
            ``num_labels=1``; a LoRA adapter directory works when peft is installed), or a
            loaded sequence-classification model with one output.
        tokenizer: Defaults to the one saved with the model.
        batch_size: Sequences per forward pass.
        eos_token: Token appended to standard completions; use the value training used.
        model_init_kwargs: Extra ``from_pretrained`` arguments when ``model`` is a path.
        max_length: Longer sequences keep their last ``max_length`` tokens (the reward is read
            at the end); ``None`` does not truncate.
        chat_template_kwargs: Extra arguments of the chat template for conversational samples.
        name: Name for metrics (``rewards/<name>/mean``); defaults to the model's name.

    An empty completion (a policy that generated nothing) is scored as the prompt followed by
    the EOS token. The model is run in eval mode under ``torch.no_grad()``, on its own device.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        batch_size: int = 16,
        eos_token: str | None = None,
        model_init_kwargs: dict[str, Any] | None = None,
        max_length: int | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        name: str | None = None,
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model_name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", None)
        if isinstance(model, str):
            model = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1, **(model_init_kwargs or {}))
        num_labels = getattr(getattr(model, "config", None), "num_labels", None)
        if num_labels != 1:
            raise ValueError(
                f"RewardModelScorer needs a sequence-classification model with one output (num_labels=1); "
                f"got {type(model).__name__} with num_labels={num_labels}."
            )
        if tokenizer is None:
            if not model_name:
                raise ValueError("RewardModelScorer: pass `tokenizer`; the model has no name to load it from.")
            tokenizer = AutoTokenizer.from_pretrained(model_name)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        if config.pad_token_id is None:
            config.pad_token_id = tokenizer.pad_token_id  # the model's own pooling needs one for batches
        if batch_size < 1:
            raise ValueError(f"RewardModelScorer: batch_size must be >= 1, got {batch_size}.")
        if max_length is not None and max_length < 1:
            raise ValueError(f"RewardModelScorer: max_length must be >= 1 or None, got {max_length}.")
        self.model, self.tokenizer, self.batch_size, self.eos_token = model, tokenizer, batch_size, eos_token
        self.max_length = max_length
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.__name__ = name or (str(model_name).rstrip("/").split("/")[-1] if model_name else "reward_model")

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
        """Rewards of ``completions`` (strings or message lists) to ``prompts``; extra columns are ignored."""
        if len(prompts) != len(completions):
            raise ValueError(
                f"RewardModelScorer: got {len(prompts)} prompts but {len(completions)} completions; pass one "
                "prompt per completion."
            )
        return self.score_ids([self.tokenize(p, c, index=i) for i, (p, c) in enumerate(zip(prompts, completions))])

    def tokenize(self, prompt: Any, completion: Any, *, index: int = 0) -> list[int]:
        """The token ids of one ``(prompt, completion)``, as training tokenized a preference pair's side."""
        from honelm.data import tokenize_row

        kwargs = {"chat_template_kwargs": self.chat_template_kwargs or None}
        if _is_empty(completion):
            prompt_ids = tokenize_row({"prompt": prompt}, self.tokenizer, index=index, **kwargs)["prompt_input_ids"]
            eos = self.eos_token or self.tokenizer.eos_token
            ids = list(prompt_ids) + [self.tokenizer.convert_tokens_to_ids(eos)]
        else:
            row = tokenize_row({"prompt": prompt, "completion": completion}, self.tokenizer, index=index,
                               eos_token=self.eos_token, **kwargs)
            ids = list(row["input_ids"])
        return ids if self.max_length is None else ids[-self.max_length :]

    @torch.no_grad()
    def score_ids(self, sequences: Sequence[Sequence[int]]) -> list[float]:
        """Rewards of already tokenized sequences (each the full prompt + completion)."""
        model, device = self.model, _device_of(self.model)
        was_training = model.training
        model.eval()
        rewards: list[float] = []
        try:
            for start in range(0, len(sequences), self.batch_size):
                chunk = [list(s) for s in sequences[start : start + self.batch_size]]
                width = max(len(s) for s in chunk)
                input_ids = torch.full((len(chunk), width), self.tokenizer.pad_token_id, dtype=torch.long)  # (B, T)
                attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)  # (B, T)
                for row, ids in enumerate(chunk):
                    input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                    attention_mask[row, : len(ids)] = 1
                values = sequence_rewards(model, input_ids.to(device), attention_mask.to(device))  # (B,)
                rewards.extend(float(v) for v in values.float().cpu())
        finally:
            model.train(was_training)
        return rewards


def _is_empty(completion: Any) -> bool:
    if isinstance(completion, str):
        return not completion.strip()
    if isinstance(completion, (list, tuple)):
        return all(
            isinstance(m, dict) and not (m.get("content") or "").strip() and not m.get("tool_calls")
            for m in completion
        )
    return False


def _device_of(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


__all__ = [
    "RewardModelScorer",
    "find_score_head",
    "last_token_indices",
    "lengths_from_position_ids",
    "sequence_rewards",
]
