"""Reward models as reward functions: a sequence-classification model scores prompt + completion."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch


class RewardModel:
    """Wrap a one-output sequence-classification model (e.g. trained with ``RewardTrainer``)
    as a reward function ``f(prompts, completions, **kwargs) -> list[float]``.

    Conversational samples (message lists) are rendered with the reward tokenizer's chat
    template, prompt messages followed by completion messages; standard samples are the
    prompt string followed by the completion string, tokenized with the tokenizer's special
    tokens. The reward is the model's single logit.

    Args:
        model: An ``AutoModelForSequenceClassification`` model with ``num_labels=1``. It is put
            in eval mode; place it on its device beforehand.
        tokenizer: The reward model's tokenizer.
        batch_size: Samples per forward pass (``None``: the whole batch at once).
        max_length: Longer inputs keep their last ``max_length`` tokens (the score is read at
            the end); ``None`` does not truncate.
        chat_template_kwargs: Extra arguments of ``apply_chat_template``.
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
        num_labels = getattr(getattr(model, "config", None), "num_labels", 1)
        if num_labels != 1:
            raise ValueError(
                f"RewardModel: the model has num_labels={num_labels}; a reward model needs exactly one output "
                "(load it with `AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)`)."
            )
        if tokenizer.pad_token_id is None:
            raise ValueError("RewardModel: the reward tokenizer has no pad token; set `tokenizer.pad_token`.")
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id  # needed to find each row's last token
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.__name__ = (
            name or str(getattr(model.config, "_name_or_path", "") or "reward_model").rstrip("/").split("/")[-1]
        )

    def texts(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[str]:
        """The texts that are scored, one per sample."""
        out = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            if isinstance(prompt, str) and isinstance(completion, str):
                out.append(prompt + completion)
            elif isinstance(prompt, (list, tuple)) and isinstance(completion, (list, tuple)):
                messages = [dict(m) for m in prompt] + [dict(m) for m in completion]
                out.append(self.tokenizer.apply_chat_template(messages, tokenize=False, **self.chat_template_kwargs))
            else:
                raise TypeError(
                    f"RewardModel {self.__name__!r}: sample {i} mixes a {type(prompt).__name__} prompt with a "
                    f"{type(completion).__name__} completion; both must be strings or both message lists."
                )
        return out

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"RewardModel: {len(prompts)} prompts for {len(completions)} completions.")
        texts = self.texts(prompts, completions)
        conversational = bool(prompts) and not isinstance(prompts[0], str)
        device = next(self.model.parameters()).device
        step = self.batch_size or max(len(texts), 1)
        scores: list[float] = []
        side = self.tokenizer.truncation_side
        self.tokenizer.truncation_side = "left"
        try:
            for start in range(0, len(texts), step):
                enc = self.tokenizer(
                    texts[start : start + step],
                    return_tensors="pt",
                    padding=True,
                    padding_side="right",  # positions then start at 0 in every row
                    truncation=self.max_length is not None,
                    max_length=self.max_length,
                    add_special_tokens=not conversational,  # the chat template already adds them
                )
                logits = self.model(**enc.to(device)).logits  # (B, 1)
                scores.extend(logits[:, 0].float().tolist())
        finally:
            self.tokenizer.truncation_side = side
        return scores


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
