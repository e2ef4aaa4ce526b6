"""Two RLOO steps on fixed rollouts, in however many processes this runs in.

Run alone (one process) or under ``python -m torch.distributed.run --nproc_per_node 2`` (two CPU
processes, gloo) by ``test_rloo_distributed.py``: ``python rloo_distributed_worker.py OUT.json
PER_DEVICE_BATCH``. Rank 0 writes the advantages of every round (all processes'), the logged
metrics and the trained parameters to ``OUT.json``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
from rloo_helpers import prompts, scripted_rollout

from honelm.methods.rloo import RLOOConfig, RLOOTrainer
from honelm.testing import tiny_model

GLOBAL_BATCH = 12  # 3 prompts x 4 completions per round: with 2 processes, the second group spans both


def reward(prompts: list[str], completions: list[str], place: list[int], **kwargs: Any) -> list[float]:
    return [float(k * k) + 0.5 * (len(p) % 3) for p, k in zip(prompts, place)]


def main(out_path: str, per_device: int, output_dir: str) -> None:
    model, tokenizer = tiny_model()
    config = RLOOConfig(
        output_dir=output_dir, use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
        logging_steps=1, per_device_train_batch_size=per_device, num_generations=4, max_steps=2,
        optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", beta=0.2, seed=0,
    )
    trainer = RLOOTrainer(model, reward, args=config, train_dataset=prompts(GLOBAL_BATCH), processing_class=tokenizer,
                          rollout_func=scripted_rollout(tokenizer, 4))
    rounds: list[list[float]] = []
    original = trainer._generate_and_score

    def recorded(rows: Any, mode: str) -> dict[str, torch.Tensor]:
        batch = original(rows, mode)
        rounds.append(trainer.accelerator.gather(batch["advantages"]).tolist())
        return batch

    trainer._generate_and_score = recorded  # type: ignore[method-assign]
    trainer.train()
    if trainer.accelerator.is_main_process:
        params = torch.cat([p.detach().flatten() for p in trainer.accelerator.unwrap_model(trainer.model).parameters()])
        logs = [log for log in trainer.state.log_history if "loss" in log]
        with open(out_path, "w", encoding="utf-8") as f:
            json.dump({"advantages": rounds, "logs": logs, "params": params.tolist(),
                       "processes": trainer.accelerator.num_processes}, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
