"""Sampling processors against naive per-row Python references, and the drawn log-probs."""

from __future__ import annotations

import math

import pytest
import torch

from honelm.generation.sampling import (
    SamplingParams,
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    process_logits,
    sample_next_token,
)

NEG = float("-inf")


def _logits(rows: int = 5, vocab: int = 37, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 2.0


def _softmax(row: list[float]) -> list[float]:
    finite = [v for v in row if v != NEG]
    m = max(finite)
    exps = [math.exp(v - m) if v != NEG else 0.0 for v in row]
    z = sum(exps)
    return [e / z for e in exps]


def naive_repetition_penalty(row: list[float], seen: set[int], p: float) -> list[float]:
    return [(v / p if v > 0 else v * p) if i in seen else v for i, v in enumerate(row)]


def naive_top_k(row: list[float], k: int) -> list[float]:
    kth = sorted(row, reverse=True)[k - 1]
    return [v if v >= kth else NEG for v in row]


def naive_top_p(row: list[float], p: float) -> list[float]:
    probs = _softmax(row)
    order = sorted(range(len(row)), key=lambda i: -row[i])
    keep, mass = set(), 0.0
    for i in order:
        if mass >= p and keep:
            break
        keep.add(i)
        mass += probs[i]
    return [v if i in keep else NEG for i, v in enumerate(row)]


def naive_min_p(row: list[float], min_p: float) -> list[float]:
    probs = _softmax(row)
    top = max(probs)
    return [v if probs[i] >= min_p * top else NEG for i, v in enumerate(row)]


def _assert_rows(actual: torch.Tensor, expected: list[list[float]]) -> None:
    exp = torch.tensor(expected)
    assert torch.equal(torch.isinf(actual), torch.isinf(exp))
    finite = ~torch.isinf(exp)
    torch.testing.assert_close(actual[finite], exp[finite], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", [1, 3, 10, 36, 37, 100])
def test_top_k_matches_naive(k):
    x = _logits()
    _assert_rows(apply_top_k(x, k), [naive_top_k(r, min(k, len(r))) for r in x.tolist()])


def test_top_k_keeps_ties_with_the_kth():
    x = torch.tensor([[1.0, 2.0, 2.0, 0.5]])
    assert torch.isinf(apply_top_k(x, 2)).tolist() == [[True, False, False, True]]
    assert torch.equal(apply_top_k(x, 0), x)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.999])
def test_top_p_matches_naive(p):
    x = _logits(seed=1)
    _assert_rows(apply_top_p(x, p), [naive_top_p(r, p) for r in x.tolist()])


def test_top_p_always_keeps_the_most_likely_token():
    x = torch.tensor([[10.0, 0.0, 0.0]])  # the top token alone holds > 0.99
    out = apply_top_p(x, 0.01)
    assert torch.isinf(out).tolist() == [[False, True, True]]


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5, 1.0])
def test_min_p_matches_naive(min_p):
    x = _logits(seed=2)
    _assert_rows(apply_min_p(x, min_p), [naive_min_p(r, min_p) for r in x.tolist()])


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_naive(penalty):
    x = _logits(seed=3)
    g = torch.Generator().manual_seed(0)
    seen = torch.rand(x.shape, generator=g) < 0.3
    expected = [
        naive_repetition_penalty(r, set(torch.nonzero(s).flatten().tolist()), penalty) for r, s in zip(x.tolist(), seen)
    ]
    _assert_rows(apply_repetition_penalty(x, seen, penalty), expected)


def test_process_logits_composes_in_transformers_order():
    x = _logits(seed=4)
    seen = torch.zeros_like(x, dtype=torch.bool)
    seen[:, :5] = True
    params = SamplingParams(temperature=0.7, top_k=12, top_p=0.8, min_p=0.05, repetition_penalty=1.2)
    expected = []
    for row in x.tolist():
        r = naive_repetition_penalty(row, set(range(5)), 1.2)
        r = [v / 0.7 for v in r]
        r = naive_top_k(r, 12)
        r = naive_top_p(r, 0.8)
        r = naive_min_p(r, 0.05)
        expected.append(r)
    _assert_rows(process_logits(x, params, seen), expected)


def test_sampled_tokens_are_never_filtered_and_logps_are_of_the_processed_distribution():
    x = _logits(rows=64, vocab=50, seed=5)
    params = SamplingParams(temperature=0.8, top_k=5, top_p=0.7)
    processed = process_logits(x, params)
    g = torch.Generator().manual_seed(1)
    tokens, logps, raw = sample_next_token(x, params, generator=g)
    assert not torch.isinf(processed.gather(1, tokens[:, None])).any()
    expected = torch.log_softmax(processed, -1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logps, expected)
    torch.testing.assert_close(raw, torch.log_softmax(x / 0.8, -1).gather(1, tokens[:, None]).squeeze(1))
    # Truncation removes mass, so the processed log-prob of a kept token is higher than the raw one.
    assert (logps >= raw - 1e-6).all() and (logps > raw + 1e-4).any()


def test_sampling_follows_the_processed_distribution():
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]]).repeat(20000, 1)
    params = SamplingParams(temperature=1.5, top_k=3)
    g = torch.Generator().manual_seed(0)
    tokens, _, _ = sample_next_token(x, params, generator=g)
    freq = torch.bincount(tokens, minlength=5).float() / tokens.numel()
    expected = torch.softmax(process_logits(x[:1], params), -1)[0]
    assert freq[3:].sum() == 0
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)


def test_greedy_takes_the_argmax_with_point_mass_logps():
    x = _logits(seed=6)
    tokens, logps, raw = sample_next_token(x, SamplingParams(temperature=0.0))
    assert torch.equal(tokens, x.argmax(-1))
    assert torch.equal(logps, torch.zeros_like(logps))
    torch.testing.assert_close(raw, torch.log_softmax(x, -1).max(-1).values)


def test_generator_makes_sampling_reproducible():
    x = _logits(rows=8, seed=7)
    params = SamplingParams(temperature=1.0, top_p=0.9)
    a = sample_next_token(x, params, generator=torch.Generator().manual_seed(3))[0]
    b = sample_next_token(x, params, generator=torch.Generator().manual_seed(3))[0]
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_repetition_penalty_needs_the_seen_tokens():
    with pytest.raises(ValueError, match="seen"):
        process_logits(_logits(), SamplingParams(repetition_penalty=1.2))
