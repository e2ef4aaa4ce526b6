"""bf16 mixed precision in the preference trainers: their LM-head log-probs run under the
forward's autocast, so on a CPU with native bf16 the head is multiplied in bf16."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from honelm.ops import _kernel
from honelm.testing import tiny_model

ARGS = dict(report_to="none", use_cpu=True, bf16=True, disable_tqdm=True, save_strategy="no", logging_steps=1,
            per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3, seed=0)


def _spy(monkeypatch):
    seen = []
    real = _kernel._matmul_dtype

    def spy(hidden, weight):
        dtype = real(hidden, weight)
        seen.append(dtype)
        return dtype

    monkeypatch.setattr(_kernel, "_matmul_dtype", spy)
    monkeypatch.setattr(_kernel, "cpu_has_native_bf16", lambda: True)
    return seen


def _pairs():
    q = [[{"role": "user", "content": f"What is {a} + 1?"}] for a in range(4)]
    return {
        "prompt": q,
        "chosen": [[{"role": "assistant", "content": str(a + 1)}] for a in range(4)],
        "rejected": [[{"role": "assistant", "content": str(a + 5)}] for a in range(4)],
    }


def test_dpo_bf16_runs_policy_and_reference_heads_in_bf16(tmp_path, monkeypatch):
    from honelm.methods.dpo import DPOConfig, DPOTrainer

    seen = _spy(monkeypatch)
    model, tok = tiny_model("qwen2", seed=0)
    trainer = DPOTrainer(model=model, args=DPOConfig(output_dir=str(tmp_path), **ARGS),
                         train_dataset=Dataset.from_dict(_pairs()), processing_class=tok)
    trainer.train()
    assert len(seen) >= 4 and set(seen) == {torch.bfloat16}  # policy (chosen, rejected) and reference passes
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)


def test_kto_bf16_runs_the_head_in_bf16(tmp_path, monkeypatch):
    from honelm.methods.kto import KTOConfig, KTOTrainer

    seen = _spy(monkeypatch)
    pairs = _pairs()
    rows = {"prompt": pairs["prompt"] * 2, "completion": pairs["chosen"] + pairs["rejected"],
            "label": [True] * 4 + [False] * 4}
    model, tok = tiny_model("qwen2", seed=0)
    trainer = KTOTrainer(model=model, args=KTOConfig(output_dir=str(tmp_path), **ARGS),
                         train_dataset=Dataset.from_dict(rows), processing_class=tok)
    trainer.train()
    assert seen and set(seen) == {torch.bfloat16}
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)


@pytest.mark.parametrize("bf16", [False])
def test_float32_keeps_the_head_in_float32(tmp_path, monkeypatch, bf16):
    from honelm.methods.dpo import DPOConfig, DPOTrainer

    seen = _spy(monkeypatch)
    model, tok = tiny_model("qwen2", seed=0)
    args = DPOConfig(output_dir=str(tmp_path), **{**ARGS, "bf16": bf16})
    DPOTrainer(model=model, args=args, train_dataset=Dataset.from_dict(_pairs()), processing_class=tok).train()
    assert seen and set(seen) == {torch.float32}
