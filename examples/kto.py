"""Kahneman-Tversky Optimization (KTO) with honelm.

Offline by default: a tiny randomly initialized model sees single-digit additions whose
correct answer is labelled desirable and a far-off answer undesirable, and learns to prefer
the plausible answers on questions it never saw. Point it at a real model and dataset to
align those instead:

    python examples/kto.py                                   # tiny model, built-in task
    python examples/kto.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --dataset_name trl-lib/kto-mix-14k --max_steps 500 --learning_rate 5e-7 --per_device_train_batch_size 8
"""

from __future__ import annotations

import argparse
import random

from honelm.methods.kto import KTOConfig, KTOTrainer


def arithmetic_feedback(split: str, seed: int):
    """Unpaired rows: the correct sum is desirable, a sum off by 10 or more undesirable."""
    from datasets import Dataset

    from honelm.testing import arithmetic_dataset

    questions = arithmetic_dataset(max_operand=9, held_out_fraction=0.25, split=split, seed=seed)
    rng = random.Random(seed)
    rows = []
    for prompt, answer in zip(questions["prompt"], questions["answer"]):
        wrong = str(int(answer) + rng.randint(10, 40))
        for text, label in ((answer, True), (wrong, False)):
            rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": text}], "label": label})
    return Dataset.from_list(rows)


def reward_accuracy(prediction) -> dict[str, float]:
    """Share of rows whose implicit reward has the sign of their label (positive: desirable)."""
    rewards, labels = prediction.predictions, prediction.label_ids
    return {"reward_accuracy": float(((rewards > 0) == (labels == 1)).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=None, help="Hub id or local path (default: a tiny model).")
    parser.add_argument("--dataset_name", default=None, help="Hub id or local data file (default: built-in task).")
    parser.add_argument("--output_dir", default="kto-output")
    parser.add_argument("--max_steps", type=int, default=40)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--per_device_train_batch_size", type=int, default=16)
    parser.add_argument("--beta", type=float, default=0.1)
    args = parser.parse_args()

    if args.model_name_or_path is None:
        from honelm.testing import tiny_model

        model, tokenizer = tiny_model(hidden_size=96, intermediate_size=192)
    else:
        model, tokenizer = args.model_name_or_path, None  # the trainer loads both
    if args.dataset_name is None:
        train_dataset, eval_dataset = arithmetic_feedback("train", seed=0), arithmetic_feedback("test", seed=1)
    else:
        from datasets import load_dataset

        data = load_dataset(args.dataset_name)
        train_dataset, eval_dataset = data["train"], data["test"] if "test" in data else None

    config = KTOConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=16,
        beta=args.beta,
        train_sampling_strategy="random",  # reshuffle every epoch; the KL pairs are built inside each batch
        dataloader_drop_last=True,
        lr_scheduler_type="constant",
        logging_steps=10,
        save_strategy="no",
        report_to="none",
    )
    trainer = KTOTrainer(
        model,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        compute_metrics=reward_accuracy,
    )
    if eval_dataset is not None:
        before = trainer.evaluate()
    trainer.train()
    trainer.save_model()

    if eval_dataset is not None:
        after = trainer.evaluate()
        for name, metrics in (("before", before), ("after", after)):
            print(
                f"held-out {name} training: reward margin {metrics['eval_rewards/margins']:.3f}, "
                f"reward accuracy {metrics['eval_reward_accuracy']:.0%}"
            )
    print(f"saved to {args.output_dir}")


if __name__ == "__main__":
    main()
