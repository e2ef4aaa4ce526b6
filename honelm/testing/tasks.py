"""Small built-in learnable tasks with verifiable answers, for tests, examples and the demo."""

from __future__ import annotations

import random
import re
from typing import Any

_NUMBER = re.compile(r"-?\d+")


def arithmetic_dataset(
    n: int | None = None,
    *,
    max_operand: int = 9,
    seed: int = 0,
    conversational: bool = True,
    held_out_fraction: float = 0.0,
    split: str = "train",
) -> Any:
    """Single-step addition questions as a prompt-completion ``datasets.Dataset``.

    Each row has ``prompt``, ``completion`` and ``answer`` (the correct number as a string,
    for reward functions and accuracy checks). Conversational rows look like::

        {"prompt": [{"role": "user", "content": "What is 3 + 4?"}],
         "completion": [{"role": "assistant", "content": "7"}], "answer": "7"}

    Args:
        n: Number of rows, sampled with replacement from all ``(a, b)`` pairs with
            ``0 <= a, b <= max_operand`` of the split. ``None`` gives every pair of the split once.
        max_operand: Largest operand.
        seed: Order and sampling are a deterministic function of the seed.
        conversational: Messages (default) or plain strings (``"What is 3 + 4? "`` / ``"7"``).
        held_out_fraction: Fraction of the pairs reserved for ``split="test"``; the split
            is a fixed function of the pairs, independent of ``seed``.
        split: ``"train"`` or ``"test"``.
    """
    from datasets import Dataset

    if split not in ("train", "test"):
        raise ValueError(f"arithmetic_dataset: split must be 'train' or 'test', got {split!r}.")
    pairs = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    random.Random(1234).shuffle(pairs)
    n_test = int(round(held_out_fraction * len(pairs)))
    pairs = pairs[:n_test] if split == "test" else pairs[n_test:]
    if not pairs:
        raise ValueError(f"arithmetic_dataset: the {split!r} split is empty; adjust held_out_fraction.")
    rng = random.Random(seed)
    chosen = [rng.choice(pairs) for _ in range(n)] if n is not None else rng.sample(pairs, len(pairs))
    rows: dict[str, list[Any]] = {"prompt": [], "completion": [], "answer": []}
    for a, b in chosen:
        question, answer = f"What is {a} + {b}?", str(a + b)
        if conversational:
            rows["prompt"].append([{"role": "user", "content": question}])
            rows["completion"].append([{"role": "assistant", "content": answer}])
        else:
            rows["prompt"].append(question + " ")
            rows["completion"].append(answer)
        rows["answer"].append(answer)
    return Dataset.from_dict(rows)


def first_number(text: str) -> str | None:
    """The first integer in ``text`` (how toy-task answers are read), or ``None``."""
    match = _NUMBER.search(text)
    return match.group(0) if match else None


def generate_answers(
    model: Any, tokenizer: Any, prompts: list[Any], *, max_new_tokens: int = 8, batch_size: int = 32
) -> list[str]:
    """Greedy completions of ``prompts`` (message lists or strings), decoded without specials."""
    import torch

    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    completions: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            if chunk and not isinstance(chunk[0], str):
                texts = [
                    tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in chunk
                ]
                enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            else:
                enc = tokenizer(chunk, return_tensors="pt", padding=True)
            with torch.no_grad():
                out = model.generate(
                    **enc.to(model.device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            new = out[:, enc["input_ids"].shape[1] :]
            completions.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return completions


def answer_accuracy(model: Any, tokenizer: Any, dataset: Any, *, max_new_tokens: int = 8) -> float:
    """Fraction of ``dataset`` rows whose greedy completion's first number equals ``answer``."""
    completions = generate_answers(model, tokenizer, list(dataset["prompt"]), max_new_tokens=max_new_tokens)
    correct = sum(first_number(c) == a for c, a in zip(completions, dataset["answer"]))
    return correct / max(len(completions), 1)
