"""``honelm demo``: supervised fine-tuning of a tiny model on a built-in task, entirely offline.

A randomly initialized model from :mod:`honelm.testing` learns the single-digit addition
table ("What is 3 + 4?" -> "7") with :class:`honelm.SFTTrainer`. The demo prints the loss
and the answer accuracy before and after training, the loss curve, and sample answers.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", default="demo_output", help="Where the trained model is saved.")
    parser.add_argument("--max_steps", type=int, default=600, help="Optimizer steps (default: 600).")
    parser.add_argument("--learning_rate", type=float, default=3e-3, help="Learning rate (default: 3e-3).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the model and the data order.")
    parser.add_argument("--log_every", type=int, default=50, help="Print the loss every N steps.")


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import TrainerCallback
    from transformers.utils import logging as hf_logging

    from honelm import SFTConfig, SFTTrainer
    from honelm.testing import answer_accuracy, arithmetic_dataset, generate_answers, tiny_model

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    model, tokenizer = tiny_model("qwen2", seed=args.seed, hidden_size=128, intermediate_size=256)
    data = arithmetic_dataset(max_operand=9, seed=args.seed)  # the 100 facts a + b, 0 <= a, b <= 9
    print("honelm demo: supervised fine-tuning of a tiny model, offline\n")
    print(f"  model    Qwen2 architecture, {model.num_parameters():,} parameters, random initialization")
    print(f"  task     single-digit addition, {len(data)} questions, e.g. "
          f"{data[0]['prompt'][0]['content']!r} -> {data[0]['answer']!r}")
    print(f"  training {args.max_steps} steps of SFTTrainer (completion-only loss, chunked log-probs)\n")

    config = SFTConfig(
        output_dir=args.output_dir,
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

    class _PrintLoss(TrainerCallback):
        def on_log(self, _args: Any, state: Any, _control: Any, logs: dict[str, float] | None = None, **_: Any) -> None:
            if logs and "loss" in logs:
                print(f"  step {state.global_step:>5}  loss {logs['loss']:.4f}  "
                      f"token accuracy {logs.get('mean_token_accuracy', float('nan')):.2f}")

    trainer = SFTTrainer(model, config, train_dataset=data, processing_class=tokenizer, callbacks=[_PrintLoss()])
    trainer.remove_callback(next(c for c in trainer.callback_handler.callbacks if type(c).__name__ == "PrinterCallback"))
    loss_before = trainer.evaluate(trainer.train_dataset)["eval_loss"]
    accuracy_before = answer_accuracy(model, tokenizer, data)
    print(f"before training: loss {loss_before:.3f}, answers correct {accuracy_before:.0%}\n")

    trainer.train()
    trainer.save_model()

    loss_after = trainer.evaluate(trainer.train_dataset)["eval_loss"]
    accuracy_after = answer_accuracy(trainer.model, tokenizer, data)
    print(f"\nafter training:  loss {loss_after:.3f}, answers correct {accuracy_after:.0%}\n")
    print("sample answers (greedy decoding):")
    samples = data.select(range(6))
    for row, answer in zip(samples, generate_answers(trainer.model, tokenizer, list(samples["prompt"]))):
        mark = "ok" if answer.strip() == row["answer"] else f"expected {row['answer']}"
        print(f"  {row['prompt'][0]['content']:<16} -> {answer.strip():<4} {mark}")
    print(f"\nmodel saved to {os.path.abspath(args.output_dir)} ({time.perf_counter() - started:.0f} s in all)")
    return 0
