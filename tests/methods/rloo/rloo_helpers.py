"""Shared pieces of the RLOO trainer tests: a learnable toy task and deterministic rollouts."""

from __future__ import annotations

import functools
from typing import Any

import torch


@functools.lru_cache(maxsize=1)
def vowel_tokens() -> torch.Tensor:
    """``(V,)`` bool: tokens of the tiny tokenizer whose text starts with a vowel (about 19%)."""
    from honelm.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return torch.tensor([p.lstrip("\u0120")[:1].lower() in "aeiou" for p in pieces])


def vowel_share(completion_ids: list[list[int]], **kwargs: Any) -> list[float]:
    """The toy task's reward: the share of a completion's tokens that start with a vowel.

    A random tiny model scores about 0.19; RLOO can push it to 1 in a few dozen steps, because
    every completion earns partial credit and the completions of a prompt differ.
    """
    good = vowel_tokens()
    return [float(good[torch.tensor(ids)].float().mean()) for ids in completion_ids]


def prompts(n: int, start: int = 0) -> Any:
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [f"Say something about topic {i}." for i in range(start, start + n)]})


def scripted_rollout(tokenizer: Any, num_generations: int) -> Any:
    """A deterministic ``rollout_func``: the completion of global row ``r`` is the number
    ``r % num_generations`` (its place in its group) followed by EOS, whichever process holds it."""

    def rollout_func(batch_prompts: list[Any], trainer: Any) -> dict[str, Any]:
        offset = trainer.accelerator.process_index * len(batch_prompts)
        prompt_ids, completion_ids, logprobs, place = [], [], [], []
        for i, prompt in enumerate(batch_prompts):
            k = (offset + i) % num_generations
            ids = tokenizer(f" {k} {k}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            prompt_ids.append(tokenizer(prompt)["input_ids"])
            completion_ids.append(ids)
            logprobs.append([0.0] * len(ids))
            place.append(k)
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs, "place": place}

    return rollout_func
