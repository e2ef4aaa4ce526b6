"""The built-in toy task: shape of the rows, splits, and the accuracy check."""

from __future__ import annotations

import pytest
import torch

from honelm.testing import answer_accuracy, arithmetic_dataset, first_number, generate_answers, tiny_model


def test_rows_are_prompt_completion_with_correct_answers():
    ds = arithmetic_dataset(conversational=True)
    assert len(ds) == 100 and set(ds.column_names) == {"prompt", "completion", "answer"}
    for row in ds:
        a, b = (int(x) for x in row["prompt"][0]["content"][len("What is ") : -1].split(" + "))
        assert row["answer"] == str(a + b) == row["completion"][0]["content"]
        assert row["completion"][0]["role"] == "assistant"
    plain = arithmetic_dataset(n=5, conversational=False, seed=1)
    assert plain[0]["prompt"].startswith("What is ") and plain[0]["completion"] == plain[0]["answer"]


def test_splits_are_disjoint_and_fixed():
    train = arithmetic_dataset(held_out_fraction=0.2, seed=0)
    test = arithmetic_dataset(held_out_fraction=0.2, split="test", seed=5)
    train_q = {r[0]["content"] for r in train["prompt"]}
    test_q = {r[0]["content"] for r in test["prompt"]}
    assert len(test_q) == 20 and len(train_q) == 80 and not train_q & test_q
    assert test_q == {r[0]["content"] for r in arithmetic_dataset(held_out_fraction=0.2, split="test")["prompt"]}


def test_sampling_is_seeded():
    assert arithmetic_dataset(n=30, seed=3)["answer"] == arithmetic_dataset(n=30, seed=3)["answer"]
    assert arithmetic_dataset(n=30, seed=3)["answer"] != arithmetic_dataset(n=30, seed=4)["answer"]


def test_bad_split_arguments():
    with pytest.raises(ValueError, match="split must be"):
        arithmetic_dataset(split="validation")
    with pytest.raises(ValueError, match="split is empty"):
        arithmetic_dataset(held_out_fraction=0.0, split="test")


def test_first_number():
    assert first_number(" 12 apples") == "12"
    assert first_number("it is -3.") == "-3"
    assert first_number("none") is None


def test_accuracy_reads_greedy_generations():
    model, tok = tiny_model()
    ds = arithmetic_dataset(n=6, seed=2)
    completions = generate_answers(model, tok, list(ds["prompt"]))
    expected = sum(first_number(c) == a for c, a in zip(completions, ds["answer"])) / 6
    assert answer_accuracy(model, tok, ds) == expected
    assert model.training  # restored


def test_accuracy_is_one_for_a_model_that_emits_the_answer(monkeypatch):
    model, tok = tiny_model()
    ds = arithmetic_dataset(n=4, seed=0)
    answers = iter(ds["answer"])

    def fake_generate(**kwargs):
        ids = kwargs["input_ids"]
        new = [tok(" " + next(answers), add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for _ in ids]
        width = max(len(x) for x in new)
        new = [x + [tok.pad_token_id] * (width - len(x)) for x in new]
        return torch.cat([ids, torch.tensor(new)], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)
    assert answer_accuracy(model, tok, ds) == 1.0
