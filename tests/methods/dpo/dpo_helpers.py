"""Helpers shared by the DPO trainer tests: configs, small preference datasets, and the plain
full-logits computation of the log-probs that the trainer's fast paths are checked against."""

from __future__ import annotations

import random

import torch
from datasets import Dataset

from honelm.methods.dpo import DPOConfig, DPOTrainer
from honelm.testing import tiny_model

QUESTION = [{"role": "user", "content": "What is 2 + 2?"}]
ANSWER = [{"role": "assistant", "content": "4"}]
WRONG = [{"role": "assistant", "content": "5"}]


def config(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=1,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        seed=0,
        data_seed=0,
    )
    defaults.update(kwargs)
    return DPOConfig(**defaults)


def logs(trainer, key="loss"):
    return [h for h in trainer.state.log_history if key in h and "train_runtime" not in h]


def addition_preferences(split, max_operand=3):
    """For each question "a + b", the correct sum is chosen and a wrong sum rejected. The wrong
    answers of each question are split in two: the test pairs reject answers never seen with
    that question in training, so a model can only rank them by having learned which answer
    goes with which question (every answer is chosen for some questions, rejected for others)."""
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for a in range(max_operand + 1):
        for b in range(max_operand + 1):
            wrong = [n for n in range(2 * max_operand + 1) if n != a + b]
            random.Random(31 * a + b).shuffle(wrong)
            half = len(wrong) // 2
            for w in wrong[:half] if split == "train" else wrong[half:]:
                rows["prompt"].append([{"role": "user", "content": f"What is {a} + {b}?"}])
                rows["chosen"].append([{"role": "assistant", "content": str(a + b)}])
                rows["rejected"].append([{"role": "assistant", "content": str(w)}])
    return Dataset.from_dict(rows)


def standard_pairs(n=8):
    """Standard explicit-prompt pairs whose completions have different lengths."""
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for i in range(n):
        rows["prompt"].append(f"Question {i}: name a colour" + " please" * (i % 3) + "\n")
        rows["chosen"].append("Blue" + " and green" * (i % 2))
        rows["rejected"].append("I will not answer that question" + "!" * (i % 4))
    return Dataset.from_dict(rows)


def naive_sequence_logps(model, batch):
    """Summed completion log-probs per sequence from the model's full logits (the plain way)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = model(**inputs).logits[:, :-1].float()  # (2B, T-1, V)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    logps = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logps * mask).sum(-1), logps, mask, logits


def make_trainer(tmp_path, data=None, ref_seed=1, eval_dataset=None, **kwargs):
    model, tok = tiny_model(seed=0)
    ref = tiny_model(seed=ref_seed)[0] if ref_seed is not None else None
    args = config(tmp_path, **kwargs)
    return DPOTrainer(model, ref_model=ref, args=args, train_dataset=data or standard_pairs(),
                      eval_dataset=eval_dataset, processing_class=tok)


def full_batch(trainer, n=None):
    dataset = trainer.train_dataset
    n = len(dataset) if n is None else n
    return trainer.data_collator([dataset[i] for i in range(n)])
