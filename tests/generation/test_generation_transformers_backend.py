"""TransformersBackend: greedy equals model.generate, sampled log-probs equal a teacher-forced
recomputation, EOS/truncation bookkeeping, batching and seeding."""

from __future__ import annotations

import pytest
import torch

from honelm.generation import SamplingParams, TransformersBackend
from honelm.generation.outputs import RolloutOutput
from honelm.generation.sampling import process_logits
from honelm.models import last_hidden_states
from honelm.ops import lm_head_weight_and_bias, selective_logps
from honelm.testing import tiny_model

PROMPTS = ["What is 3 + 4?", "Hello there, how are you today", "x", "The cat sat on the"]


@pytest.fixture(scope="module")
def qwen():
    return tiny_model("qwen2", seed=0)


def _ids(tok, prompts=PROMPTS):
    return [tok(p)["input_ids"] for p in prompts]


def _hf_generate(model, tok, prompts, **kwargs):
    side = tok.padding_side
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    tok.padding_side = side
    model.eval()
    with torch.no_grad():
        out = model.generate(**enc, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kwargs)
    model.train()
    return out[:, enc["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_greedy_equals_transformers_generate(arch):
    model, tok = tiny_model(arch, seed=1)
    backend = TransformersBackend(model, tok, SamplingParams(temperature=0.0), max_completion_length=10)
    out = backend.generate(_ids(tok))
    expected = _hf_generate(model, tok, PROMPTS, max_new_tokens=10, do_sample=False)
    assert out.completion_ids == expected
    assert out.truncated == [True] * len(PROMPTS)  # random weights never say EOS in 10 greedy steps
    assert all(v == 0.0 for row in out.logps for v in row)  # greedy samples a point mass


def test_sampling_equals_transformers_generate_with_the_same_seed(qwen):
    model, tok = qwen
    params = dict(temperature=0.8, top_k=20, top_p=0.9)
    backend = TransformersBackend(model, tok, SamplingParams(**params), max_completion_length=8)
    torch.manual_seed(123)
    ours = backend.generate(_ids(tok)).completion_ids
    torch.manual_seed(123)
    theirs = _hf_generate(model, tok, PROMPTS, max_new_tokens=8, do_sample=True, **params)
    assert ours == theirs


def _teacher_forced_logits(model, tok, prompt_ids, completion_ids):
    """Logits predicting each completion token, from one full forward pass per row."""
    model.eval()
    rows = []
    with torch.no_grad():
        for p, c in zip(prompt_ids, completion_ids):
            ids = torch.tensor([p + c])
            logits = model(input_ids=ids).logits[0]  # (L, V)
            rows.append(logits[len(p) - 1 : len(p) - 1 + len(c)])
    model.train()
    return rows


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=15),
        SamplingParams(temperature=1.3, top_p=0.8, min_p=0.02),
        SamplingParams(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.3),
    ],
    ids=["plain", "top_k", "top_p+min_p", "all+penalty"],
)
def test_logps_equal_teacher_forced_recomputation(qwen, params):
    model, tok = qwen
    prompt_ids = _ids(tok)
    backend = TransformersBackend(model, tok, params, max_completion_length=12, return_raw_logps=True, seed=0)
    out = backend.generate(prompt_ids)
    forced = _teacher_forced_logits(model, tok, prompt_ids, out.completion_ids)
    for p, c, logits, logps, raw in zip(prompt_ids, out.completion_ids, forced, out.logps, out.raw_logps):
        for t, token in enumerate(c):
            row = logits[t : t + 1]
            seen = torch.zeros_like(row, dtype=torch.bool)
            seen[0, p + c[:t]] = True
            processed = process_logits(row, params, seen)
            expected = torch.log_softmax(processed, -1)[0, token].item()
            assert logps[t] == pytest.approx(expected, abs=2e-5)
            expected_raw = torch.log_softmax(row / params.temperature, -1)[0, token].item()
            assert raw[t] == pytest.approx(expected_raw, abs=2e-5)


def test_raw_logps_match_the_trainers_chunked_recomputation(qwen):
    """What a trainer recomputes with honelm.ops at the sampling temperature equals raw_logps."""
    model, tok = qwen
    prompt_ids = _ids(tok)
    backend = TransformersBackend(
        model, tok, SamplingParams(temperature=0.6), max_completion_length=9, return_raw_logps=True, seed=1
    )
    out = backend.generate(prompt_ids)
    batch = RolloutOutput(prompt_ids, out.completion_ids, out.logps, out.truncated, [""] * 4, out.raw_logps)
    t = batch.to_tensors(tok.pad_token_id)
    input_ids = torch.cat([t["prompt_ids"], t["completion_ids"]], 1)
    mask = torch.cat([t["prompt_mask"], t["completion_mask"]], 1)
    model.eval()
    with torch.no_grad():
        hidden, _ = last_hidden_states(
            model, input_ids=input_ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)
        )
    model.train()
    p = t["prompt_ids"].shape[1]
    weight, bias = lm_head_weight_and_bias(model)
    recomputed = selective_logps(hidden[:, p - 1 : -1], weight, t["completion_ids"], bias, temperature=0.6)
    m = t["completion_mask"].bool()
    torch.testing.assert_close(recomputed[m], t["raw_logps"][m], atol=2e-5, rtol=0)
    # With only temperature, the sampled distribution is the temperature-scaled one.
    torch.testing.assert_close(t["logps"][m], t["raw_logps"][m], atol=2e-5, rtol=0)


def test_eos_ends_a_completion_and_is_kept(qwen):
    model, tok = qwen
    prompt_ids = _ids(tok)
    greedy = TransformersBackend(model, tok, SamplingParams(temperature=0.0), max_completion_length=10)
    first = greedy.generate(prompt_ids)
    stop = first.completion_ids[0][3]  # pretend the 4th token of row 0 is the EOS token
    backend = TransformersBackend(
        model, tok, SamplingParams(temperature=0.0), max_completion_length=10, eos_token_id=stop
    )
    out = backend.generate(prompt_ids)
    for before, after, truncated in zip(first.completion_ids, out.completion_ids, out.truncated):
        if stop in before:
            cut = before.index(stop) + 1
            assert after == before[:cut] and not truncated
        else:
            assert after == before and truncated
    assert len(out.completion_ids[0]) == 4 and not out.truncated[0]
    tensors = RolloutOutput(prompt_ids, out.completion_ids, out.logps, out.truncated, [""] * 4).to_tensors(
        tok.pad_token_id
    )
    assert tensors["completion_mask"].sum(1).tolist() == [len(c) for c in out.completion_ids]
    assert tensors["completion_ids"][0, 3].item() == stop
    assert (tensors["completion_ids"][0, 4:] == tok.pad_token_id).all()
    assert tensors["truncated"].tolist() == out.truncated


def test_per_prompt_limits_and_chunking_give_the_same_completions(qwen):
    model, tok = qwen
    prompt_ids = _ids(tok)
    full = TransformersBackend(model, tok, SamplingParams(temperature=0.0), max_completion_length=8).generate(
        prompt_ids
    )
    chunked = TransformersBackend(model, tok, SamplingParams(temperature=0.0), max_batch_size=3)
    out = chunked.generate(prompt_ids, max_new_tokens=[2, 8, 5, 1])
    assert [len(c) for c in out.completion_ids] == [2, 8, 5, 1]
    assert out.completion_ids == [c[:n] for c, n in zip(full.completion_ids, [2, 8, 5, 1])]
    assert out.truncated == [True] * 4


def test_seed_is_reproducible_and_leaves_the_global_rng_alone(qwen):
    model, tok = qwen
    params = SamplingParams(temperature=1.0)
    state = torch.random.get_rng_state()
    a = TransformersBackend(model, tok, params, max_completion_length=8, seed=7).generate(_ids(tok))
    b = TransformersBackend(model, tok, params, max_completion_length=8, seed=7).generate(_ids(tok))
    c = TransformersBackend(model, tok, params, max_completion_length=8, seed=8).generate(_ids(tok))
    assert torch.equal(state, torch.random.get_rng_state())
    assert a.completion_ids == b.completion_ids and a.logps == b.logps
    assert a.completion_ids != c.completion_ids


def test_training_mode_is_restored_and_sampling_can_be_overridden(qwen):
    model, tok = qwen
    model.train()
    backend = TransformersBackend(model, tok, SamplingParams(temperature=1.0), max_completion_length=4, seed=0)
    out = backend.generate(_ids(tok), sampling=SamplingParams(temperature=0.0))
    assert model.training
    assert all(v == 0.0 for row in out.logps for v in row)


def test_bad_inputs_are_named(qwen):
    model, tok = qwen
    backend = TransformersBackend(model, tok)
    with pytest.raises(ValueError, match="prompt 1 has no tokens"):
        backend.generate([[1, 2], []])
    with pytest.raises(ValueError, match="one per prompt"):
        backend.generate([[1, 2]], max_new_tokens=[3, 4])
    with pytest.raises(ValueError, match="max_completion_length"):
        TransformersBackend(model, tok, max_completion_length=0)
