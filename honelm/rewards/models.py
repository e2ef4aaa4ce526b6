"""Reward models as reward functions: a sequence-classification model scores prompt + completion."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from honelm.models.reward_scoring import RewardModelScorer


class RewardModel(RewardModelScorer):
    """Wrap a one-output sequence-classification model (e.g. trained with ``RewardTrainer``)
    as a reward function ``f(prompts, completions, **kwargs) -> list[float]``.

    Each sample is tokenized exactly as ``RewardTrainer`` tokenizes a side of a training pair,
    and scored at its last real token, so a reward model scores the policy's samples the way
    it was trained to: standard samples are prompt + completion + EOS; conversational samples
    are the chat template's prompt (with the generation prompt) followed by the reply up to
    its end-of-turn token. Padding never decides which token is read, so tokenizers whose pad
    token is their EOS are scored correctly.

    Args:
        model: An ``AutoModelForSequenceClassification`` model with ``num_labels=1``, on its
            device. It runs in eval mode under ``torch.no_grad()``.
        tokenizer: The reward model's tokenizer.
        batch_size: Samples per forward pass (``None``: the whole batch at once).
        max_length: Longer inputs keep their last ``max_length`` tokens (the score is read at
            the end); ``None`` does not truncate.
        chat_template_kwargs: Extra arguments of the chat template.
        name: Name for metrics (``rewards/<name>/mean``); defaults to the model's name.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int | None = None,
        max_length: int | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(
            model,
            tokenizer,
            batch_size=batch_size or _WHOLE_BATCH,
            max_length=max_length,
            chat_template_kwargs=dict(chat_template_kwargs or {}),
            name=name,
        )

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            if isinstance(prompt, str) != isinstance(completion, str):
                raise TypeError(
                    f"RewardModel {self.__name__!r}: sample {i} mixes a {type(prompt).__name__} prompt with a "
                    f"{type(completion).__name__} completion; both must be strings or both message lists."
                )
        return super().__call__(prompts, completions)


_WHOLE_BATCH = 2**31 - 1


def load_reward_funcs(
    reward_funcs: Any,
    reward_processing_classes: Any = None,
    *,
    model_init_kwargs: Mapping[str, Any] | None = None,
) -> list[Callable[..., Any]]:
    """Turn what users pass as ``reward_funcs`` into callables, loading models once.

    Each entry may be a reward function (kept as is), a model name or path (loaded with
    ``AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **model_init_kwargs)``),
    or a sequence-classification model; models become :class:`RewardModel`\\ s.

    Args:
        reward_funcs: One entry or a list.
        reward_processing_classes: Tokenizers for the model entries: one, or a list aligned
            with ``reward_funcs`` (``None`` entries load the model's own tokenizer).
        model_init_kwargs: ``from_pretrained`` arguments for names (``dtype`` strings accepted).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from honelm.models import resolve_dtype

    funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if isinstance(reward_processing_classes, (list, tuple)):
        if len(reward_processing_classes) != len(funcs):
            raise ValueError(
                f"reward_processing_classes has {len(reward_processing_classes)} entries for {len(funcs)} reward "
                "functions; give one per reward function (None where it does not apply)."
            )
        tokenizers = list(reward_processing_classes)
    else:
        tokenizers = [reward_processing_classes] * len(funcs)
    out: list[Callable[..., Any]] = []
    for i, (entry, tokenizer) in enumerate(zip(funcs, tokenizers)):
        if isinstance(entry, str):
            kwargs = dict(model_init_kwargs or {})
            kwargs["dtype"] = resolve_dtype(kwargs.pop("torch_dtype", kwargs.get("dtype", "auto")))
            model = AutoModelForSequenceClassification.from_pretrained(entry, num_labels=1, **kwargs)
            out.append(RewardModel(model, tokenizer or AutoTokenizer.from_pretrained(entry)))
        elif isinstance(entry, torch.nn.Module):
            if tokenizer is None:
                source = getattr(entry.config, "_name_or_path", None)
                if not source:
                    raise ValueError(
                        f"reward_funcs[{i}] is a model without a name to load its tokenizer from; pass it in "
                        "`reward_processing_classes`."
                    )
                tokenizer = AutoTokenizer.from_pretrained(source)
            out.append(RewardModel(entry, tokenizer))
        elif callable(entry):
            out.append(entry)
        else:
            raise TypeError(
                f"reward_funcs[{i}] must be a reward function, a model name or path, or a model; got "
                f"{type(entry).__name__}."
            )
    return out
