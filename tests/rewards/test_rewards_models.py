"""Reward models as reward functions, scored with a tiny sequence-classification model."""

from __future__ import annotations

import copy

import pytest
import torch

from honelm.rewards import RewardModel, compute_rewards, load_reward_funcs
from honelm.testing import tiny_model

PROMPTS = [[{"role": "user", "content": "What is 2 + 2?"}], [{"role": "user", "content": "Say hello to the world"}]]
COMPLETIONS = [
    [{"role": "assistant", "content": "4"}],
    [{"role": "assistant", "content": "Hello, world! How are you?"}],
]


@pytest.fixture(scope="module")
def rm():
    model, tok = tiny_model("qwen2", task="sequence-classification", seed=3)
    return model.eval(), tok


def _standard_ids(tok, prompt, completion):
    """What training scores for a standard pair: prompt tokens, completion tokens, EOS."""
    return tok(prompt)["input_ids"] + tok(completion)["input_ids"] + [tok.eos_token_id]


def _score_ids(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, 0].item()


def test_conversational_scores_read_the_token_training_ends_on(rm):
    """A conversational sample is scored as RewardTrainer trains on it: the prompt with the
    generation prompt, then the reply up to its end-of-turn token (not the newline after it)."""
    model, tok = rm
    reward = RewardModel(model, tok)
    scores = reward(prompts=PROMPTS, completions=COMPLETIONS)
    for prompt, completion, score in zip(PROMPTS, COMPLETIONS, scores):
        text = tok.apply_chat_template(prompt + completion, tokenize=False)
        assert text.endswith(completion[0]["content"] + "<|im_end|>\n")
        ids = tok(text.removesuffix("\n"), add_special_tokens=False)["input_ids"]
        assert ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
        assert score == pytest.approx(_score_ids(model, ids), abs=1e-5)
    assert scores[0] != pytest.approx(scores[1])  # padding did not leak into the shorter row


def test_scores_equal_the_reward_trainer_scorer(rm):
    from honelm import RewardModelScorer

    model, tok = rm
    for prompts, completions in ((PROMPTS, COMPLETIONS), (["What is 2 + 2? "], ["4"])):
        assert RewardModel(model, tok)(prompts=prompts, completions=completions) == pytest.approx(
            RewardModelScorer(model, tok)(prompts, completions), abs=1e-6
        )


def test_standard_scores_end_with_eos_and_batching_changes_nothing(rm):
    model, tok = rm
    prompts, completions = ["What is 2 + 2? ", "Say hello "], ["4", "Hello, world! How are you?"]
    full = RewardModel(model, tok)(prompts=prompts, completions=completions)
    chunked = RewardModel(model, tok, batch_size=1)(prompts=prompts, completions=completions)
    assert full == pytest.approx(chunked, abs=1e-5)
    for p, c, s in zip(prompts, completions, full):
        ids = _standard_ids(tok, p, c)
        assert s == pytest.approx(_score_ids(model, ids), abs=1e-5)


def test_pad_equal_to_eos_still_reads_the_real_last_token(rm):
    model, tok = rm
    tok = copy.deepcopy(tok)  # the fixture's tokenizer is shared
    tok.pad_token = tok.eos_token
    prompts, completions = ["Say hello ", "Hi "], ["Hello, world! How are you?", "ok"]
    scores = RewardModel(model, tok)(prompts=prompts, completions=completions)
    for p, c, s in zip(prompts, completions, scores):
        ids = _standard_ids(tok, p, c)
        assert s == pytest.approx(_score_ids(model, ids), abs=1e-5)


def test_truncation_keeps_the_end_where_the_score_is_read(rm):
    model, tok = rm
    reward = RewardModel(model, tok, max_length=6)
    (score,) = reward(prompts=["a long prompt that will not fit at all "], completions=["the end"])
    ids = _standard_ids(tok, "a long prompt that will not fit at all ", "the end")[-6:]
    assert score == pytest.approx(_score_ids(model, ids), abs=1e-5)


def test_reward_model_alongside_functions_in_compute_rewards(rm):
    model, tok = rm
    reward = RewardModel(model, tok, name="tiny-rm")

    def brevity(completions, **kwargs):
        return [-len(c[0]["content"]) / 10 for c in completions]

    out = compute_rewards([reward, brevity], PROMPTS, COMPLETIONS, reward_weights=[1.0, 0.5])
    assert out.names == ["tiny-rm", "brevity"]
    expected = torch.tensor(reward(prompts=PROMPTS, completions=COMPLETIONS)) + 0.5 * torch.tensor([-0.1, -2.6])
    torch.testing.assert_close(out.rewards, expected)


def test_load_reward_funcs_from_a_path_a_model_and_a_function(rm, tmp_path):
    model, tok = rm
    tiny_model("qwen2", task="sequence-classification", seed=3, save_to=tmp_path / "rm")

    def f(completions, **kwargs):
        return [0.0] * len(completions)

    from_path, from_model, fn = load_reward_funcs(
        [str(tmp_path / "rm"), model, f], [tok, tok, None], model_init_kwargs={"dtype": "float32"}
    )
    assert isinstance(from_path, RewardModel) and isinstance(from_model, RewardModel) and fn is f
    assert from_path.__name__ == "rm"
    assert from_path(prompts=PROMPTS, completions=COMPLETIONS) == pytest.approx(
        from_model(prompts=PROMPTS, completions=COMPLETIONS), abs=1e-5
    )
    (own_tokenizer,) = load_reward_funcs(str(tmp_path / "rm"))  # the tokenizer saved with the model
    assert own_tokenizer.tokenizer.pad_token_id == tok.pad_token_id


def test_reward_model_errors(rm):
    model, tok = rm
    two, _ = tiny_model("qwen2", task="sequence-classification", num_labels=2)
    with pytest.raises(ValueError, match="num_labels=2"):
        RewardModel(two, tok)
    with pytest.raises(TypeError, match="sample 0 mixes a str prompt with a list completion"):
        RewardModel(model, tok)(prompts=["hi"], completions=[[{"role": "assistant", "content": "x"}]])
    with pytest.raises(ValueError, match="one per reward function"):
        load_reward_funcs([model, model], [tok])
    with pytest.raises(TypeError, match=r"reward_funcs\[0\] must be a reward function"):
        load_reward_funcs([42])
