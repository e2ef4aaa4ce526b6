"""lm_head_weight_and_bias on real tiny transformers models, with and without PEFT.

Every case checks the chunked log-probs built from the resolved head against the
log-probs of the model's own logits, values and gradients of every parameter.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import transformers
from torch import nn

from honelm.ops import lm_head_weight_and_bias, selective_logps

peft = pytest.importorskip("peft")

VOCAB = 300


def _qwen2(tie: bool = True, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tie,
    )
    return transformers.Qwen2ForCausalLM(config).eval()


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))  # (B, T)


def _hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states from the decoder body alone: the LM head's forward never runs
    (PEFT's forward would unmerge merged adapters as a side effect)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model(input_ids=ids).last_hidden_state  # (B, T, H) after the final norm


def _chunked_logps(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    hidden = _hidden(model, ids)[:, :-1]  # (B, T-1, H)
    weight, bias = lm_head_weight_and_bias(model)
    return selective_logps(hidden, weight, ids[:, 1:], bias, chunk_size=5, vocab_chunk_size=64)


def _model_logps(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1].float()  # (B, T-1, V)
    return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """float32 agreement, relative to the scale of the reference tensor."""
    scale = max(1.0, ref.abs().max().item())
    torch.testing.assert_close(got, ref, atol=1e-5 * scale, rtol=1e-5)


def _assert_same_values_and_grads(model: nn.Module, ids: torch.Tensor) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    coeffs = torch.randn(ids.shape[0], ids.shape[1] - 1, generator=torch.Generator().manual_seed(1))
    got = _chunked_logps(model, ids)
    got_grads = torch.autograd.grad((got * coeffs).sum(), params, allow_unused=True)
    ref = _model_logps(model, ids)
    ref_grads = torch.autograd.grad((ref * coeffs).sum(), params, allow_unused=True)
    _close(got, ref)
    for g, r in zip(got_grads, ref_grads):
        assert (g is None) == (r is None)
        if r is not None:
            _close(g, r)


def test_tied_embeddings_share_one_parameter():
    model = _qwen2(tie=True)
    weight, bias = lm_head_weight_and_bias(model)
    assert weight is model.get_input_embeddings().weight and bias is None
    _assert_same_values_and_grads(model, _ids())


def test_tied_gradient_accumulates_into_the_shared_parameter():
    """The shared weight's .grad holds the embedding-lookup part plus the head part."""
    model = _qwen2(tie=True)
    ids = _ids(2)
    _chunked_logps(model, ids).sum().backward()
    got = model.get_input_embeddings().weight.grad.clone()
    model.zero_grad()
    _model_logps(model, ids).sum().backward()
    ref = model.get_input_embeddings().weight.grad
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    embedded_rows = torch.zeros(VOCAB, dtype=torch.bool)
    embedded_rows[ids.reshape(-1)] = True
    assert got[~embedded_rows].abs().sum() > 0  # rows only the head touches got gradient too


def test_untied_head():
    model = _qwen2(tie=False)
    weight, _ = lm_head_weight_and_bias(model)
    assert weight is model.lm_head.weight and weight is not model.get_input_embeddings().weight
    _assert_same_values_and_grads(model, _ids())


def test_plain_linear_with_bias():
    head = nn.Linear(6, 11)
    weight, bias = lm_head_weight_and_bias(head)
    assert weight is head.weight and bias is head.bias


def _lora_model(**config_kwargs) -> nn.Module:
    model = peft.get_peft_model(_qwen2(tie=False), peft.LoraConfig(target_modules=["lm_head"], r=4, lora_alpha=8,
                                                                   **config_kwargs))
    with torch.no_grad():  # lora_B starts at zero; make the adapter matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    return model.eval()


def test_lora_head_values_and_grads_reach_lora_weights():
    model = _lora_model()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    _assert_same_values_and_grads(model, _ids())


def test_lora_head_with_several_adapters():
    model = _lora_model()
    model.add_adapter("second", peft.LoraConfig(target_modules=["lm_head"], r=2, lora_alpha=2))
    layer = model.base_model.model.lm_head
    with torch.no_grad():
        layer.lora_B["second"].weight.normal_(std=0.5)
    layer.set_adapter(["default", "second"])
    for p in layer.parameters():  # set_adapter freezes what is inactive; train both
        p.requires_grad_(True)
    _assert_same_values_and_grads(model, _ids(3))


def test_lora_head_disabled_adapter_gives_base_model():
    model = _lora_model()
    ids = _ids(4)
    with model.disable_adapter():
        got = _chunked_logps(model, ids)
        ref = _model_logps(model, ids)
    adapted = _chunked_logps(model, ids)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert (adapted - got).abs().max() > 1e-2  # the adapter changes the result when enabled


def test_lora_head_merged_and_disabled_while_merged():
    model = _lora_model()
    ids = _ids(5)
    with torch.no_grad():
        with model.disable_adapter():
            base_ref = _model_logps(model, ids)
        adapted_ref = _model_logps(model, ids)
        model.merge_adapter()
        layer = model.base_model.model.lm_head
        torch.testing.assert_close(_chunked_logps(model, ids), adapted_ref, atol=1e-5, rtol=1e-5)
        with model.disable_adapter():
            # resolved without touching the merged weights (PEFT's own forward unmerges them)
            torch.testing.assert_close(_chunked_logps(model, ids), base_ref, atol=1e-5, rtol=1e-5)
            assert layer.merged


class _TinyLM(nn.Module):
    """A minimal 'LM' whose head has a bias, for LoRA with lora_bias."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 6)
        self.lm_head = nn.Linear(6, 23, bias=True)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head


def test_lora_head_with_bias_and_lora_bias():
    torch.manual_seed(0)
    model = peft.get_peft_model(_TinyLM(), peft.LoraConfig(target_modules=["lm_head"], r=2, lora_bias=True))
    layer = model.base_model.model.lm_head
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        layer.lora_B["default"].bias.normal_()
    x = torch.randn(10, 6)  # (N, H)
    targets = torch.randint(0, 23, (10,))
    weight, bias = lm_head_weight_and_bias(model)
    got = selective_logps(x, weight, targets, bias, chunk_size=3)
    ref = torch.log_softmax(layer(x), -1).gather(-1, targets[:, None]).squeeze(-1)
    _close(got, ref)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_B["default"].bias]
    for g, r in zip(torch.autograd.grad(got.sum(), params), torch.autograd.grad(ref.sum(), params)):
        _close(g, r)


def test_lora_dropout_on_head_warns():
    model = _lora_model(lora_dropout=0.1).train()
    with pytest.warns(UserWarning, match="lora_dropout=0.1"):
        lm_head_weight_and_bias(model)


def test_dora_head_is_refused():
    model = peft.get_peft_model(_qwen2(tie=False), peft.LoraConfig(target_modules=["lm_head"], use_dora=True))
    with pytest.raises(NotImplementedError, match="plain LoRA only"):
        lm_head_weight_and_bias(model)


def test_modules_to_save_head_uses_the_trained_copy():
    model = peft.get_peft_model(
        _qwen2(tie=False), peft.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)  # differs from the original
    weight, _ = lm_head_weight_and_bias(model)
    assert weight is model.base_model.model.lm_head.modules_to_save["default"].weight
    _assert_same_values_and_grads(model, _ids(6))
    with model.disable_adapter():
        assert lm_head_weight_and_bias(model)[0] is model.base_model.model.lm_head.original_module.weight


def test_granite_logits_scaling_is_folded_in():
    torch.manual_seed(0)
    config = transformers.GraniteConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, logits_scaling=4.0, tie_word_embeddings=True,
    )
    _assert_same_values_and_grads(transformers.GraniteForCausalLM(config).eval(), _ids(7))


def test_cohere_logit_scale_is_folded_in():
    torch.manual_seed(0)
    config = transformers.CohereConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, logit_scale=0.25,
    )
    _assert_same_values_and_grads(transformers.CohereForCausalLM(config).eval(), _ids(8))


def test_softcapped_logits_are_refused():
    config = transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, final_logit_softcapping=30.0,
    )
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        lm_head_weight_and_bias(transformers.Gemma2ForCausalLM(config))


def test_non_linear_head_is_refused():
    with pytest.raises(TypeError, match="nn.Linear"):
        lm_head_weight_and_bias(nn.Embedding(10, 4))


def test_model_without_head_is_refused():
    model = transformers.Qwen2Model(_qwen2().config)
    with pytest.raises(ValueError, match="no\\s+LM head|returned None"):
        lm_head_weight_and_bias(model)


def test_importing_ops_does_not_import_peft():
    code = "import sys, honelm.ops; assert 'peft' not in sys.modules, 'peft was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
