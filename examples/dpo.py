"""Direct Preference Optimization with honelm.

Offline by default: a tiny randomly initialized model learns to prefer the correct sum of two
digits over a wrong one, and the preference is measured on pairs it never saw (each question
paired with wrong answers held out from training). Point it at a real model and a preference
dataset to align those instead:

    python examples/dpo.py                                    # tiny model, built-in task
    python examples/dpo.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --dataset_name trl-lib/ultrafeedback_binarized --max_steps 500 --learning_rate 5e-7
"""

from __future__ import annotations

import argparse
import random

from honelm import DPOConfig, DPOTrainer


def addition_preferences(split: str, max_operand: int = 3):
    """Conversational pairs "What is a + b?": the correct sum chosen, a wrong sum rejected.

    The wrong answers of each question are split in two halves, one for training and one for
    testing, so the test pairs can only be ranked by knowing which answer fits which question.
    """
    from datasets import Dataset

    rows: dict[str, list] = {"prompt": [], "chosen": [], "rejected": []}
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=None, help="Hub id or local path (default: a tiny model).")
    parser.add_argument("--dataset_name", default=None, help="Hub id or local data file (default: built-in task).")
    parser.add_argument("--output_dir", default="dpo-output")
    parser.add_argument("--max_steps", type=int, default=60)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--loss_type", nargs="+", default=["sigmoid"], help="One or more DPO loss variants.")
    parser.add_argument("--per_device_train_batch_size", type=int, default=16)
    args = parser.parse_args()

    if args.model_name_or_path is None:
        from honelm.testing import tiny_model

        model, tokenizer = tiny_model()
    else:
        model, tokenizer = args.model_name_or_path, None  # the trainer loads both
    if args.dataset_name is None:
        train_dataset, eval_dataset = addition_preferences("train"), addition_preferences("test")
    else:
        from datasets import load_dataset

        splits = load_dataset(args.dataset_name)
        train_dataset, eval_dataset = splits["train"], splits["test"] if "test" in splits else None

    config = DPOConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        beta=args.beta,
        loss_type=args.loss_type,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=64,
        lr_scheduler_type="constant",
        logging_steps=10,
        save_strategy="no",
        report_to="none",
    )
    trainer = DPOTrainer(
        model, args=config, train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=tokenizer
    )
    if eval_dataset is not None:
        before = trainer.evaluate()
        print(f"held-out pairs before training: reward accuracy {before['eval_rewards/accuracies']:.0%}, "
              f"margin {before['eval_rewards/margins']:.3f}")
    trainer.train()
    trainer.save_model()
    if eval_dataset is not None:
        after = trainer.evaluate()
        print(f"held-out pairs after training:  reward accuracy {after['eval_rewards/accuracies']:.0%}, "
              f"margin {after['eval_rewards/margins']:.3f}")
    print(f"saved to {args.output_dir}")


if __name__ == "__main__":
    main()
