"""The offline test kit builds real, deterministic, loadable tokenizers and models."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from honelm.testing import CHAT_TEMPLATE, SUPPORTED_ARCHS, tiny_model, tiny_tokenizer
from honelm.testing.tokenizer import _trained_tokenizer_json

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "The answer is 4."},
]


def test_tokenizer_is_a_real_bpe_of_a_few_thousand_tokens():
    tok = tiny_tokenizer()
    assert 2900 <= len(tok) <= 3100
    assert tok.is_fast
    text = "The quick brown fox jumps over 12 lazy dogs: ÄÖÜ ✓"
    ids = tok(text)["input_ids"]
    assert len(ids) < len(text)  # merges happened
    assert tok.decode(ids) == text  # byte-level: lossless, no unknown token


def test_special_tokens_are_distinct_and_atomic():
    tok = tiny_tokenizer()
    ids = {tok.eos_token_id, tok.pad_token_id, tok.bos_token_id}
    assert len(ids) == 3 and None not in ids
    for special in ("<|im_end|>", "<|im_start|>", "<|pad|>", "<tool_call>", "</think>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1, special


def test_bos_only_when_asked_and_never_doubled_by_template():
    plain, with_bos = tiny_tokenizer(), tiny_tokenizer(add_bos=True)
    assert plain("hello")["input_ids"][0] != plain.bos_token_id
    assert with_bos("hello")["input_ids"][0] == with_bos.bos_token_id
    ids = with_bos.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert ids[0] == with_bos.bos_token_id and ids[1] != with_bos.bos_token_id


def test_chat_template_marks_assistant_tokens_including_end_of_turn():
    tok = tiny_tokenizer()
    assert tok.chat_template == CHAT_TEMPLATE
    out = tok.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    trained = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(trained) == "The answer is 4.<|im_end|>"
    prompt = tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(CONVERSATION, tokenize=False).startswith(prompt)


def test_chat_template_renders_tools_and_tool_calls():
    tok = tiny_tokenizer()
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ]
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False)
    assert '"name": "get_weather"' in text and "<tools>" in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<|im_start|>tool\nsunny<|im_end|>" in text


def test_tokenizer_without_template():
    assert tiny_tokenizer(chat_template=False).chat_template is None


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_tiny_model_every_arch_runs_forward_and_backward(arch):
    tok = tiny_tokenizer()
    model, _ = tiny_model(arch, tokenizer=tok)
    assert 100_000 < model.num_parameters() < 1_000_000
    assert model.config.vocab_size == len(tok)
    ids = torch.tensor([tok("What is 3 + 4?")["input_ids"]])
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.get_input_embeddings().weight.grad.abs().sum() > 0


def test_tiny_model_is_deterministic_under_seed_and_leaves_global_rng_alone():
    tok = tiny_tokenizer()
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a, _ = tiny_model(seed=7, tokenizer=tok)
    assert torch.equal(torch.rand(1), expected_next)
    b, _ = tiny_model(seed=7, tokenizer=tok)
    c, _ = tiny_model(seed=8, tokenizer=tok)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert not all(torch.equal(pa[n], pc[n]) for n in pa)


def test_sequence_classification_has_one_output_and_pad_id():
    model, tok = tiny_model(task="sequence-classification")
    assert isinstance(model, AutoModelForSequenceClassification._model_mapping[type(model.config)])
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    assert model(input_ids=torch.tensor([[5, 6, 7]])).logits.shape == (1, 1)


def test_saved_model_reloads_like_a_hub_model(tmp_path):
    model, tok = tiny_model("llama", save_to=tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    reloaded_tok = AutoTokenizer.from_pretrained(tmp_path)
    assert type(reloaded) is type(model)
    ids = torch.tensor([[5, 6, 7, 8]])
    model.eval()
    assert torch.allclose(model(ids).logits, reloaded(ids).logits)
    assert reloaded_tok.chat_template == tok.chat_template
    assert reloaded_tok("a test") == tok("a test")
    assert reloaded_tok.eos_token == "<|im_end|>" and reloaded_tok.pad_token == "<|pad|>"


def test_unknown_arch_or_task_is_a_clear_error():
    with pytest.raises(ValueError, match="Supported: qwen2"):
        tiny_model("not-a-model")
    with pytest.raises(ValueError, match="unknown task"):
        tiny_model(task="translation")


def test_bpe_training_is_deterministic():
    assert _trained_tokenizer_json.__wrapped__(3000) == _trained_tokenizer_json(3000)

