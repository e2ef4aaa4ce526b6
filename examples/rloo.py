"""REINFORCE Leave-One-Out (RLOO) with honelm: online RL with a verifiable reward.

Offline by default: a tiny randomly initialized model first gets a short supervised warm-up
on single-digit additions (RL improves a policy that sometimes succeeds; a random one never
does), then RLOO samples several answers per question, rewards the correct ones
(``accuracy_reward``) and reinforces each answer by how much better it did than the other
answers to the same question. The script prints the answer accuracy (greedy decoding) before
and after RLOO and the reward curve. Point it at a real model and dataset instead:

    python examples/rloo.py                                  # tiny model, built-in task
    python examples/rloo.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --dataset_name trl-lib/DeepMath-103K --max_steps 500 --learning_rate 1e-6 \\
        --num_generations 8 --max_completion_length 1024
"""

from __future__ import annotations

import argparse

from honelm.methods.rloo import RLOOConfig, RLOOTrainer
from honelm.rewards import accuracy_reward


def warm_up(model, tokenizer, train_dataset, steps: int, output_dir: str) -> None:
    """A few steps of supervised fine-tuning, so that the tiny model gets some answers right."""
    from honelm import SFTConfig, SFTTrainer

    config = SFTConfig(
        output_dir=f"{output_dir}/warmup", max_steps=steps, learning_rate=3e-3, per_device_train_batch_size=len(train_dataset),
        lr_scheduler_type="constant", logging_steps=steps, save_strategy="no", report_to="none", disable_tqdm=True,
    )
    SFTTrainer(model, config, train_dataset=train_dataset, processing_class=tokenizer).train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=None, help="Hub id or local path (default: a tiny model).")
    parser.add_argument("--dataset_name", default=None, help="Hub id or local data file with a `prompt` column and "
                        "a `solution` (or `answer`) column (default: built-in task).")
    parser.add_argument("--output_dir", default="rloo-output")
    parser.add_argument("--warmup_steps", type=int, default=100, help="Supervised warm-up of the tiny model.")
    parser.add_argument("--max_steps", type=int, default=80)
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--per_device_train_batch_size", type=int, default=64, help="Completions per step.")
    parser.add_argument("--num_generations", type=int, default=8, help="Completions per prompt.")
    parser.add_argument("--max_completion_length", type=int, default=4)
    parser.add_argument("--beta", type=float, default=0.0, help="KL coefficient (0: no reference model).")
    args = parser.parse_args()

    train_dataset = test_dataset = None
    if args.dataset_name is None:
        from honelm.testing import arithmetic_dataset

        train_dataset = arithmetic_dataset(max_operand=9, held_out_fraction=0.2, split="train")
        test_dataset = arithmetic_dataset(max_operand=9, held_out_fraction=0.2, split="test")
    else:
        from datasets import load_dataset

        train_dataset = load_dataset(args.dataset_name, split="train")
    if args.model_name_or_path is None:
        from honelm.testing import tiny_model

        model, tokenizer = tiny_model(hidden_size=128, intermediate_size=256)
        if train_dataset is not None and args.warmup_steps > 0 and args.dataset_name is None:
            warm_up(model, tokenizer, train_dataset, args.warmup_steps, args.output_dir)
    else:
        model, tokenizer = args.model_name_or_path, None  # the trainer loads both

    config = RLOOConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.per_device_train_batch_size,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        beta=args.beta,
        lr_scheduler_type="constant",
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = RLOOTrainer(model, accuracy_reward, args=config, train_dataset=train_dataset, processing_class=tokenizer)

    if test_dataset is not None:
        from honelm.testing import answer_accuracy

        def accuracies() -> tuple[float, float]:
            model, tokenizer = trainer.model, trainer.processing_class
            return answer_accuracy(model, tokenizer, train_dataset), answer_accuracy(model, tokenizer, test_dataset)

        before = accuracies()
    trainer.train()
    trainer.save_model()

    curve = [(log["step"], log["reward"]) for log in trainer.state.log_history if "reward" in log]
    print("reward (share of sampled answers that are correct) by step:")
    for step, reward in curve:
        print(f"  step {step:>4}  {reward:.3f}  {'#' * round(40 * reward)}")
    if test_dataset is not None:
        after = accuracies()
        for name, (train_acc, test_acc) in (("before", before), ("after", after)):
            print(f"answers correct {name} RLOO: training questions {train_acc:.0%}, held-out questions {test_acc:.0%}")
    print(f"saved to {args.output_dir}")


if __name__ == "__main__":
    main()
