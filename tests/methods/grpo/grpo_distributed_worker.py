"""One GRPO run on a fixed scripted rollout, as one process or as each rank of several.

    python -m torch.distributed.run --nproc_per_node 2 grpo_distributed_worker.py OUT.json

The generation batch is 6 completions (3 prompts x 2 generations), so with 2 processes the
middle prompt's group is split between rank 0 and rank 1. Rank 0 writes what the run saw:
the advantages of every generation round over all processes, the logged metrics and
checksums of the trained parameters.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

GLOBAL_BATCH = 6


def run(out_path: str) -> None:
    import transformers
    from grpo_helpers import config, digit_reward_for, prompts, scripted_rollout

    from honelm.methods.grpo import GRPOTrainer
    from honelm.testing import tiny_model

    transformers.logging.set_verbosity_error()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model, tokenizer = tiny_model()
    with tempfile.TemporaryDirectory() as tmp:
        args = config(
            _Path(tmp), per_device_train_batch_size=GLOBAL_BATCH // world, num_generations=2, max_steps=2,
            beta=0.05, shuffle_dataset=False, optim="sgd", learning_rate=0.5, max_grad_norm=0.0,
            max_completion_length=16,
        )
        trainer = GRPOTrainer(model, digit_reward_for(tokenizer), args, train_dataset=prompts(12),
                              processing_class=tokenizer, rollout_func=scripted_rollout(tokenizer))
        trainer.remove_callback(transformers.PrinterCallback)
        rounds: list[list[float]] = []
        original = trainer._advantages

        def spy(rewards_per_func, mode):
            local = original(rewards_per_func, mode)
            rounds.append(trainer.accelerator.gather(local).tolist())  # every process's part, in order
            return local

        trainer._advantages = spy
        trainer.train()
        keys = ("loss", "reward", "reward_std", "kl", "entropy", "num_tokens", "completions/mean_length")
        logs = [{k: h[k] for k in keys} for h in trainer.state.log_history if "loss" in h]
        params = {n: [float(p.detach().sum()), float(p.detach().pow(2).sum())] for n, p in model.named_parameters()}
        if trainer.accelerator.is_main_process:
            with open(out_path, "w") as f:
                json.dump({"world": world, "advantages": rounds, "logs": logs, "params": params}, f)
        trainer.accelerator.wait_for_everyone()


class _Path(str):
    """``config(tmp_path)`` joins with ``/``; a plain string directory does the same here."""

    def __truediv__(self, other: str) -> str:
        return os.path.join(self, other)


if __name__ == "__main__":
    run(sys.argv[1])
