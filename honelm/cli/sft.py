"""``honelm sft``: supervised fine-tuning from the command line.

    honelm sft --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name trl-lib/Capybara \\
        --output_dir Qwen2.5-0.5B-SFT --learning_rate 2e-5
    honelm sft --config sft.yaml --max_steps 100           # flags override the YAML file
    honelm sft --config sft.yaml --num_processes 4         # re-launched under `accelerate launch`

Every ``SFTConfig`` field is a flag; ``honelm sft --help`` lists them by section.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Any

from .args import ConfigError, add_config_arguments, build_configs, launch_command, lora_config, require, resolve_values
from .datasets import DatasetArgError, load_dataset_arg, select_split

_METHOD = "SFT"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from honelm.methods.sft.config import SFTConfig

    add_config_arguments(parser, SFTConfig, method=_METHOD)


def default_output_dir(model_name_or_path: str) -> str:
    """``<model name>-SFT`` in the working directory, as ``SFTTrainer`` names it."""
    return f"{model_name_or_path.rstrip('/').split('/')[-1]}-SFT"


def _eval_requested(config: Any) -> bool:
    strategy = getattr(config.eval_strategy, "value", config.eval_strategy)
    return str(strategy) != "no"


def load_datasets(script: Any, config: Any) -> tuple[Any, Any]:
    """The train split, and the test split when ``eval_strategy`` is not ``no``."""
    splits = load_dataset_arg(script.dataset_name, script.dataset_config, split=None)
    train = select_split(splits, script.dataset_train_split, script.dataset_name)
    if not _eval_requested(config):
        return train, None
    if script.dataset_test_split not in splits:
        raise DatasetArgError(
            f"eval_strategy={getattr(config.eval_strategy, 'value', config.eval_strategy)!r} needs an evaluation "
            f"split, but dataset {script.dataset_name!r} has no split {script.dataset_test_split!r} (its splits: "
            f"{', '.join(repr(s) for s in splits)}). Pass --dataset_test_split, or --eval_strategy no."
        )
    return train, splits[script.dataset_test_split]


def _configure(args: argparse.Namespace) -> tuple[Any, Any] | list[str]:
    """The ``(script, config)`` to train with, or the ``accelerate launch`` command to run instead."""
    from honelm.methods.sft.config import SFTConfig

    values = resolve_values(args, SFTConfig, _METHOD)
    require(values, "model_name_or_path", "dataset_name")
    relaunch = launch_command(args, "sft", values)
    if relaunch is not None:
        return relaunch
    values.setdefault("output_dir", default_output_dir(values["model_name_or_path"]))
    return build_configs(values, SFTConfig)


def run(args: argparse.Namespace) -> int:
    try:
        configured = _configure(args)
        if isinstance(configured, list):
            return subprocess.run(configured, check=False).returncode
        script, config = configured
        train_dataset, eval_dataset = load_datasets(script, config)
        peft_config = lora_config(script)
    except (ConfigError, DatasetArgError) as e:
        print(f"honelm sft: error: {e}", file=sys.stderr)
        return 2
    from honelm.diagnostics import DiagnosticError

    try:
        return train(script, config, train_dataset, eval_dataset, peft_config)
    except DiagnosticError as e:  # a problem found before or during training, reported as an error
        print(f"honelm sft: error: {e}", file=sys.stderr)
        return 2


def train(script: Any, config: Any, train_dataset: Any, eval_dataset: Any, peft_config: Any) -> int:
    """Train, then save the model (or adapter) and tokenizer to ``config.output_dir``."""
    from honelm.methods.sft.trainer import SFTTrainer

    trainer = SFTTrainer(
        model=script.model_name_or_path,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=peft_config,
    )
    resume = config.resume_from_checkpoint
    if isinstance(resume, str) and resume.strip().lower() in ("true", "last"):
        resume = True  # the latest checkpoint in output_dir
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(config.output_dir)
    if trainer.is_world_process_zero():
        print(f"honelm sft: saved the model to {os.path.abspath(config.output_dir)}")
    return 0
