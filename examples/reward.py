"""Reward modeling with honelm.

Offline by default: a tiny randomly initialized model learns which of two short reviews is the
positive one, is checked on held-out pairs, and is then used as a reward function. Point it at a
real model and preference dataset to train those instead:

    python examples/reward.py                                    # tiny model, built-in toy task
    python examples/reward.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --dataset_name trl-lib/ultrafeedback_binarized --max_steps 1000 --learning_rate 1e-5
"""

from __future__ import annotations

import argparse
import random

from honelm import RewardConfig, RewardTrainer
from honelm.methods.reward import RewardModelScorer


def toy_pairs(n: int, seed: int):
    """Preference pairs: two reviews that differ in one word; the positive one is chosen."""
    from datasets import Dataset

    rng = random.Random(seed)
    filler = ["the", "day", "was", "and", "it", "today", "weather", "food", "so", "we"]
    rows: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(n):
        words = [rng.choice(filler) for _ in range(rng.randint(2, 5))]
        at = rng.randint(0, len(words))
        rows["prompt"].append(rng.choice(["Review:", "Opinion:", "Comment:"]))
        rows["chosen"].append(" " + " ".join(words[:at] + [rng.choice(["good", "great", "happy"])] + words[at:]))
        rows["rejected"].append(" " + " ".join(words[:at] + [rng.choice(["bad", "sad", "poor"])] + words[at:]))
    return Dataset.from_dict(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=None, help="Hub id or local path (default: a tiny model).")
    parser.add_argument("--dataset_name", default=None, help="Hub id or local data file (default: toy task).")
    parser.add_argument("--output_dir", default="reward-output")
    parser.add_argument("--max_steps", type=int, default=60)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--per_device_train_batch_size", type=int, default=16)
    args = parser.parse_args()

    if args.model_name_or_path is None:
        from honelm.testing import tiny_model

        model, tokenizer = tiny_model(task="sequence-classification")
    else:
        model, tokenizer = args.model_name_or_path, None  # the trainer loads both
    if args.dataset_name is None:
        train_dataset, eval_dataset = toy_pairs(256, seed=0), toy_pairs(64, seed=1)
    else:
        from datasets import load_dataset

        splits = load_dataset(args.dataset_name)
        train_dataset, eval_dataset = splits["train"], splits.get("test")

    config = RewardConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.per_device_train_batch_size,
        center_rewards_coefficient=0.01,
        logging_steps=20,
        save_strategy="no",
        report_to="none",
    )
    trainer = RewardTrainer(
        model, config, train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=tokenizer
    )
    if eval_dataset is not None:
        print(f"held-out accuracy before training: {trainer.evaluate()['eval_accuracy']:.0%}")
    trainer.train()
    if eval_dataset is not None:
        print(f"held-out accuracy after training: {trainer.evaluate()['eval_accuracy']:.0%}")
    trainer.save_model()

    # The saved model is a reward function f(prompts, completions) -> list[float].
    if args.dataset_name is None:
        scorer = RewardModelScorer(args.output_dir)
        prompts, completions = ["Review:", "Review:"], [" the food was great", " the food was bad"]
        for completion, score in zip(completions, scorer(prompts, completions)):
            print(f"reward {score:+.2f} for {completion.strip()!r}")
    print(f"saved to {args.output_dir}")


if __name__ == "__main__":
    main()
