"""``honelm demo``: SFT then GRPO on a tiny model and a built-in task, entirely offline.

A randomly initialized model from :mod:`honelm.testing` learns single-digit addition
("What is 3 + 4?" -> "7") in two steps:

1. :class:`honelm.SFTTrainer` on imperfect demonstrations: every training question is answered
   twice, once correctly and once with "I don't know.", so the model learns the task and also
   learns to refuse about half of the time, on any question;
2. :class:`honelm.GRPOTrainer` with a verifiable reward (1 for the exact answer, 0 otherwise) on
   the same training questions: answering pays, refusing does not.

The demo prints the SFT loss curve, the GRPO reward curve, and the greedy accuracy on held-out
questions (never trained on) before and after GRPO.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

REFUSAL = "I don't know."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", default="demo_output", help="Where the trained model is saved.")
    parser.add_argument("--max_steps", type=int, default=300, help="SFT optimizer steps (default: 300).")
    parser.add_argument("--learning_rate", type=float, default=3e-3, help="SFT learning rate (default: 3e-3).")
    parser.add_argument("--grpo_steps", type=int, default=100, help="GRPO optimizer steps; 0 skips GRPO (default: 100).")
    parser.add_argument("--grpo_learning_rate", type=float, default=3e-4, help="GRPO learning rate (default: 3e-4).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the model, the data order and the sampling.")
    parser.add_argument("--log_every", type=int, default=50, help="Print the SFT loss every N steps.")


def imperfect_demonstrations(dataset: Any) -> Any:
    """Every row twice: with its correct answer, and with the answer "I don't know."."""
    from datasets import concatenate_datasets

    conversational = not isinstance(dataset[0]["prompt"], str)
    refusal = [{"role": "assistant", "content": REFUSAL}] if conversational else REFUSAL
    return concatenate_datasets([dataset, dataset.map(lambda _: {"completion": refusal})])


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    from honelm import SFTConfig, SFTTrainer
    from honelm.testing import (
        answer_accuracy,
        arithmetic_dataset,
        generate_answers,
        tiny_model,
    )

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    model, tokenizer = tiny_model("qwen2", seed=args.seed, hidden_size=128, intermediate_size=256)
    train = arithmetic_dataset(max_operand=9, seed=args.seed, held_out_fraction=0.2, split="train")
    held_out = arithmetic_dataset(max_operand=9, seed=args.seed, held_out_fraction=0.2, split="test")
    data = imperfect_demonstrations(train)
    print("honelm demo: SFT, then GRPO with a verifiable reward, on a tiny model, offline\n")
    print(f"  model    Qwen2 architecture, {model.num_parameters():,} parameters, random initialization")
    print(f"  task     single-digit addition, e.g. {train[0]['prompt'][0]['content']!r} -> {train[0]['answer']!r}: "
          f"{len(train)} training questions, {len(held_out)} held out (never trained on)")
    print(f"  step 1   {args.max_steps} steps of SFTTrainer on imperfect demonstrations: each training question "
          f"answered twice, once right and once {REFUSAL!r}")
    if args.grpo_steps:
        print(f"  step 2   {args.grpo_steps} steps of GRPOTrainer on the training questions, reward 1 for the exact "
              "answer, 0 otherwise\n")

    config = SFTConfig(
        output_dir=os.path.join(args.output_dir, "sft"),
        max_steps=args.max_steps,
        per_device_train_batch_size=len(data),
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        logging_steps=args.log_every,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
        bf16=False,
    )
    trainer = SFTTrainer(model, config, train_dataset=data, processing_class=tokenizer, callbacks=[_PrintLoss()])
    _quiet(trainer)
    loss_before = trainer.evaluate(trainer.train_dataset)["eval_loss"]
    accuracy_before = answer_accuracy(model, tokenizer, train)
    print(f"before training: loss {loss_before:.3f}, answers correct {accuracy_before:.0%}\n")
    trainer.train()
    loss_after = trainer.evaluate(trainer.train_dataset)["eval_loss"]
    accuracy_after = answer_accuracy(trainer.model, tokenizer, train)
    print(f"\nafter training:  loss {loss_after:.3f}, answers correct {accuracy_after:.0%} (training questions)\n")
    _print_samples(trainer.model, tokenizer, held_out, generate_answers)
    if args.grpo_steps:
        _grpo(args, trainer.model, tokenizer, train, held_out, answer_accuracy)
    model = trainer.model
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    print(f"\nmodel saved to {os.path.abspath(args.output_dir)} ({time.perf_counter() - started:.0f} s in all)")
    return 0


def _grpo(args: argparse.Namespace, model: Any, tokenizer: Any, train: Any, held_out: Any, accuracy: Any) -> None:
    """Step 2: GRPO on the training questions; the held-out accuracy before and after."""
    import torch

    from honelm.methods.grpo import GRPOConfig, GRPOTrainer
    from honelm.rewards import accuracy_reward

    before = {"held": accuracy(model, tokenizer, held_out), "train": accuracy(model, tokenizer, train)}
    refusals_before = _refusal_share(model, tokenizer, held_out)
    config = GRPOConfig(
        output_dir=os.path.join(args.output_dir, "grpo"),
        max_steps=args.grpo_steps,
        per_device_train_batch_size=64,
        num_generations=8,
        max_completion_length=6,
        temperature=1.0,
        learning_rate=args.grpo_learning_rate,
        lr_scheduler_type="constant",
        logging_steps=max(args.grpo_steps // 10, 1),
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
        bf16=False,
    )
    print(f"\nGRPO: {config.num_generations} sampled answers per question, {config.per_device_train_batch_size // 8} "
          "questions per step; reward = exact answer")
    trainer = GRPOTrainer(model, accuracy_reward, config, train_dataset=train, processing_class=tokenizer)
    _quiet(trainer)
    trainer.train()
    print("\nreward curve (mean reward of the sampled answers):")
    for log in trainer.state.log_history:
        if "reward" in log:
            print(f"  step {log['step']:>4}  reward {log['reward']:.2f}  |{'#' * round(40 * log['reward'])}")
    after = {"held": accuracy(model, tokenizer, held_out), "train": accuracy(model, tokenizer, train)}
    refusals_after = _refusal_share(model, tokenizer, held_out)
    print(f"\nheld-out questions (never trained on), greedy answers correct: {before['held']:.0%} before GRPO -> "
          f"{after['held']:.0%} after GRPO")
    print(f"held-out questions answered {REFUSAL!r}: {refusals_before:.0%} -> {refusals_after:.0%}")
    print(f"training questions, greedy answers correct: {before['train']:.0%} -> {after['train']:.0%}")


def _refusal_share(model: Any, tokenizer: Any, dataset: Any) -> float:
    from honelm.testing import generate_answers

    answers = generate_answers(model, tokenizer, list(dataset["prompt"]))
    return sum("know" in a for a in answers) / max(len(answers), 1)


def _print_samples(model: Any, tokenizer: Any, dataset: Any, generate_answers: Any) -> None:
    print("sample answers on held-out questions (greedy decoding):")
    samples = dataset.select(range(min(6, len(dataset))))
    for row, answer in zip(samples, generate_answers(model, tokenizer, list(samples["prompt"]))):
        mark = "ok" if answer.strip() == row["answer"] else f"expected {row['answer']}"
        print(f"  {row['prompt'][0]['content']:<16} -> {answer.strip():<14} {mark}")


def _quiet(trainer: Any) -> None:
    printer = next((c for c in trainer.callback_handler.callbacks if type(c).__name__ == "PrinterCallback"), None)
    if printer is not None:
        trainer.remove_callback(printer)


class _PrintLoss:
    """Prints the SFT loss at every log (a TrainerCallback, built lazily to keep imports cheap)."""

    def __new__(cls) -> Any:
        from transformers import TrainerCallback

        class PrintLoss(TrainerCallback):
            def on_log(self, _args: Any, state: Any, _control: Any, logs: dict[str, float] | None = None,
                       **_: Any) -> None:
                if logs and "loss" in logs:
                    print(f"  step {state.global_step:>5}  loss {logs['loss']:.4f}  "
                          f"token accuracy {logs.get('mean_token_accuracy', float('nan')):.2f}")

        return PrintLoss()
