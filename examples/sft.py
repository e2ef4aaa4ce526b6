"""Supervised fine-tuning with honelm.

Offline by default: a tiny randomly initialized model learns single-digit addition, then
answers questions. Point it at a real model and dataset to fine-tune those instead:

    python examples/sft.py                                   # tiny model, built-in task
    python examples/sft.py --model_name_or_path Qwen/Qwen2.5-0.5B \\
        --dataset_name trl-lib/Capybara --max_steps 500 --learning_rate 2e-5
"""

from __future__ import annotations

import argparse

from honelm import SFTConfig, SFTTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=None, help="Hub id or local path (default: a tiny model).")
    parser.add_argument("--dataset_name", default=None, help="Hub id or local data file (default: built-in task).")
    parser.add_argument("--output_dir", default="sft-output")
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--per_device_train_batch_size", type=int, default=50)
    args = parser.parse_args()

    if args.model_name_or_path is None:
        from honelm.testing import tiny_model

        model, tokenizer = tiny_model(hidden_size=128, intermediate_size=256)
    else:
        model, tokenizer = args.model_name_or_path, None  # the trainer loads both
    if args.dataset_name is None:
        from honelm.testing import arithmetic_dataset

        train_dataset = arithmetic_dataset(max_operand=9)
    else:
        from datasets import load_dataset

        train_dataset = load_dataset(args.dataset_name, split="train")

    config = SFTConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.per_device_train_batch_size,
        lr_scheduler_type="constant",
        logging_steps=25,
        save_strategy="no",
        report_to="none",
    )
    trainer = SFTTrainer(model, config, train_dataset=train_dataset, processing_class=tokenizer)
    trainer.train()
    trainer.save_model()

    if args.dataset_name is None:
        from honelm.testing import answer_accuracy

        accuracy = answer_accuracy(trainer.model, trainer.processing_class, train_dataset)
        print(f"answers correct after training: {accuracy:.0%}")
    print(f"saved to {args.output_dir}")


if __name__ == "__main__":
    main()
