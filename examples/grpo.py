"""Group Relative Policy Optimization with honelm.

Offline by default: a tiny randomly initialized model first learns the format and some of
the answers of single-digit addition with a short SFT warm start, then GRPO improves it with a
verifiable reward (the exact answer, ``honelm.rewards.accuracy_reward``) on the training
questions. The script prints the reward curve and the accuracy of sampled answers on the
training questions and on held-out ones. Point it at a real model and a prompt dataset with a
``solution`` column to train those instead:

    python examples/grpo.py                                   # tiny model, built-in task
    python examples/grpo.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --dataset_name trl-lib/DeepMath-103K --max_steps 500 --learning_rate 1e-6 \\
        --max_completion_length 1024 --num_generations 8
"""

from __future__ import annotations

import argparse
import os

from honelm import GRPOConfig, GRPOTrainer
from honelm.rewards import accuracy_reward


def warm_start(model, tokenizer, dataset, steps: int, output_dir: str):
    """A short supervised warm start on the prompt-completion rows: GRPO needs a model that
    sometimes answers right, so that its groups hold rewards to compare."""
    from honelm import SFTConfig, SFTTrainer

    config = SFTConfig(
        output_dir=os.path.join(output_dir, "warm-start"), max_steps=steps, per_device_train_batch_size=len(dataset),
        learning_rate=3e-3, lr_scheduler_type="constant", logging_steps=max(steps // 4, 1), save_strategy="no",
        report_to="none", disable_tqdm=True, seed=0,
    )
    SFTTrainer(model, config, train_dataset=dataset, processing_class=tokenizer).train()
    return model


def sampled_accuracy(model, tokenizer, dataset, samples: int = 4) -> float:
    """Share of sampled answers (temperature 1, as GRPO samples) that are exactly right."""
    from honelm.generation import SamplingParams, TransformersBackend, rollout

    backend = TransformersBackend(model, tokenizer, SamplingParams(temperature=1.0), max_completion_length=4, seed=0)
    out = rollout(backend, list(dataset["prompt"]), tokenizer, num_generations=samples)
    solutions = [answer for answer in dataset["answer"] for _ in range(samples)]
    rewards = accuracy_reward(out.completions, solution=solutions)
    return sum(rewards) / len(rewards)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=None, help="Hub id or local path (default: a tiny model).")
    parser.add_argument("--dataset_name", default=None, help="Hub id or local data file (default: built-in task).")
    parser.add_argument("--output_dir", default="grpo-output")
    parser.add_argument("--warm_start_steps", type=int, default=100, help="SFT steps before GRPO (tiny model only).")
    parser.add_argument("--max_steps", type=int, default=100)
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--num_generations", type=int, default=8)
    parser.add_argument("--per_device_train_batch_size", type=int, default=64, help="completions per step")
    parser.add_argument("--max_completion_length", type=int, default=4)
    args = parser.parse_args()

    builtin = args.dataset_name is None
    if builtin:
        from honelm.testing import arithmetic_dataset

        train_dataset = arithmetic_dataset(max_operand=9, held_out_fraction=0.2, split="train")
        test_dataset = arithmetic_dataset(max_operand=9, held_out_fraction=0.2, split="test")
    else:
        from datasets import load_dataset

        train_dataset, test_dataset = load_dataset(args.dataset_name, split="train"), None
    if args.model_name_or_path is None:
        from honelm.testing import tiny_model

        model, tokenizer = tiny_model(hidden_size=128, intermediate_size=256)
        if builtin and args.warm_start_steps:
            warm_start(model, tokenizer, train_dataset, args.warm_start_steps, args.output_dir)
    else:
        model, tokenizer = args.model_name_or_path, None  # the trainer loads both

    config = GRPOConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        per_device_train_batch_size=args.per_device_train_batch_size,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        temperature=1.0,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
    )
    trainer = GRPOTrainer(model, accuracy_reward, config, train_dataset=train_dataset, processing_class=tokenizer)
    if builtin:
        before = {name: sampled_accuracy(trainer.model, trainer.processing_class, data)
                  for name, data in (("training", train_dataset), ("held-out", test_dataset))}
    trainer.train()
    trainer.save_model()

    rewards = [round(h["reward"], 2) for h in trainer.state.log_history if "reward" in h]
    print(f"reward every {config.logging_steps} steps: {rewards}")
    if builtin:
        for name, data in (("training", train_dataset), ("held-out", test_dataset)):
            after = sampled_accuracy(trainer.model, trainer.processing_class, data)
            print(f"{name} questions, sampled answers correct: {before[name]:.0%} before GRPO, {after:.0%} after")
    print(f"saved to {args.output_dir}")


if __name__ == "__main__":
    main()
