"""Same model, data and settings give the same DPO training run in honelm and in TRL.

TRL is a benchmark/reference dependency only: the test is skipped when it is not installed.
The data is standard text whose prompts end in a newline, so that tokenizing prompt and
completion separately (honelm) and together (TRL) gives the same tokens; the reference model
differs from the policy so that the very first loss is not just log 2.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from honelm.methods.dpo import DPOConfig, DPOTrainer
from honelm.testing import tiny_model

trl = pytest.importorskip("trl")

_PAIRS = [(1, 2), (3, 4), (2, 5), (6, 1), (7, 7), (0, 9), (5, 3), (8, 8)]
_KEYS = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
         "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy",
         "num_tokens")


def _data():
    return Dataset.from_dict({
        "prompt": [f"Question: what is {a} + {b}?\n" for a, b in _PAIRS],
        "chosen": [f"Answer: {a + b}" for a, b in _PAIRS],
        "rejected": [f"Answer: {a + b + 3} or so" if i % 2 else f"Answer: {a * b}" for i, (a, b) in enumerate(_PAIRS)],
    })


def _run(config_cls, trainer_cls, path, output_dir, options):
    ref, tok = tiny_model(seed=1)
    args = config_cls(
        output_dir=str(output_dir), report_to="none", use_cpu=True, max_steps=3, per_device_train_batch_size=4,
        logging_steps=1, save_strategy="no", learning_rate=1e-3, disable_tqdm=True, bf16=False,
        gradient_checkpointing=False, seed=0, data_seed=0, **options,
    )
    trainer = trainer_cls(str(path), ref_model=ref, args=args, train_dataset=_data(), processing_class=tok)
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]


@pytest.mark.parametrize(
    "options",
    [{"loss_type": ["sigmoid"]}, {"loss_type": ["ipo", "sigmoid_norm"], "loss_weights": [0.5, 1.0]},
     {"loss_type": ["sigmoid"], "ld_alpha": 0.5, "use_weighting": True, "f_divergence_type": "js_divergence"}],
    ids=["sigmoid", "ipo+sigmoid_norm", "ld_wpo_js"],
)
def test_three_steps_match_trl(tmp_path, options):
    tiny_model(seed=0, save_to=tmp_path / "policy")
    ours = _run(DPOConfig, DPOTrainer, tmp_path / "policy", tmp_path / "honelm", options)
    theirs = _run(trl.DPOConfig, trl.DPOTrainer, tmp_path / "policy", tmp_path / "trl", options)
    assert len(ours) == len(theirs) == 3
    assert ours[0]["loss"] != pytest.approx(0.6931, abs=1e-3)  # the reference really differs
    for step, (a, b) in enumerate(zip(ours, theirs), start=1):
        for key in _KEYS:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=f"step {step}: {key}")
