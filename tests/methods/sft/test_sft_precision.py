"""bf16 mixed precision: the LM-head loss runs under the same autocast as the model's forward."""

from __future__ import annotations

import pytest
import torch

from honelm.methods.sft import SFTConfig, SFTTrainer
from honelm.ops import _fused_ce, _kernel
from honelm.testing import arithmetic_dataset, tiny_model


def _train(tmp_path, monkeypatch, bf16):
    seen = []
    real = _fused_ce.operand_dtype

    def spy(hidden, weight):
        dtype = real(hidden, weight)
        seen.append((torch.is_autocast_enabled("cpu"), dtype))
        return dtype

    monkeypatch.setattr(_fused_ce, "operand_dtype", spy)
    model, tokenizer = tiny_model("qwen2", seed=0)
    args = SFTConfig(
        output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, bf16=bf16, disable_tqdm=True,
        save_strategy="no", logging_steps=1, per_device_train_batch_size=8, max_steps=3, learning_rate=3e-3,
        seed=0,
    )
    ds = arithmetic_dataset(16, seed=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return seen, losses


@pytest.mark.parametrize("native", [True, False])
def test_bf16_training_runs_the_head_in_bf16_where_the_cpu_multiplies_it_natively(tmp_path, monkeypatch, native):
    monkeypatch.setattr(_kernel, "cpu_has_native_bf16", lambda: native)
    seen, losses = _train(tmp_path, monkeypatch, bf16=True)
    assert seen and all(autocast for autocast, _ in seen)  # the head sees the forward's autocast
    assert {dtype for _, dtype in seen} == ({torch.bfloat16} if native else {torch.float32})
    assert all(torch.isfinite(torch.tensor(losses)))


def test_float32_training_keeps_the_head_in_float32(tmp_path, monkeypatch):
    monkeypatch.setattr(_kernel, "cpu_has_native_bf16", lambda: True)
    seen, _ = _train(tmp_path, monkeypatch, bf16=False)
    assert seen and {(a, d) for a, d in seen} == {(False, torch.float32)}


def test_bf16_and_float32_first_losses_agree_closely(tmp_path, monkeypatch):
    monkeypatch.setattr(_kernel, "cpu_has_native_bf16", lambda: True)
    _, bf16_losses = _train(tmp_path / "a", monkeypatch, bf16=True)
    _, f32_losses = _train(tmp_path / "b", monkeypatch, bf16=False)
    assert abs(bf16_losses[0] - f32_losses[0]) < 0.02 * abs(f32_losses[0])
