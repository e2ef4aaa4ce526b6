"""The train-and-save command shared by ``honelm sft``, ``dpo``, ``kto`` and ``reward``.

Each of those modules declares one :class:`TrainCommand` (its name, config class, trainer
class and the few ways it differs) and exposes its methods as the module's
``add_arguments``/``run``, which is what :mod:`honelm.cli.main` calls.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from .args import ConfigError, add_config_arguments, build_configs, launch_command, lora_config, require, resolve_values
from .datasets import DatasetArgError, load_dataset_arg, select_split


def _load(path: str) -> Any:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _eval_requested(config: Any) -> bool:
    strategy = getattr(config.eval_strategy, "value", config.eval_strategy)
    return str(strategy) != "no"


@dataclass(frozen=True)
class TrainCommand:
    """``honelm <name>``: build the config from flags and YAML, load the data, train, save."""

    name: str  # the subcommand, e.g. "sft"
    method: str  # label in help texts and output directory names, e.g. "SFT"
    config: str  # "module:Class" of the config, imported only when the command runs
    trainer: str  # "module:Class" of the trainer
    lora_task_type: str = "CAUSAL_LM"  # peft task type of --use_peft
    saved: str = "model"  # what the final message says was saved
    data_errors_exit: bool = False  # a DatasetFormatError from the trainer exits 2 instead of raising

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_config_arguments(parser, _load(self.config), method=self.method)

    def default_output_dir(self, model_name_or_path: str) -> str:
        """``<model name>-<METHOD>`` in the working directory, as the trainer names it."""
        return f"{model_name_or_path.rstrip('/').split('/')[-1]}-{self.method}"

    def load_datasets(self, script: Any, config: Any) -> tuple[Any, Any]:
        """The train split, and the test split when ``eval_strategy`` is not ``no``."""
        splits = load_dataset_arg(script.dataset_name, script.dataset_config, split=None)
        train = select_split(splits, script.dataset_train_split, script.dataset_name)
        if not _eval_requested(config):
            return train, None
        if script.dataset_test_split not in splits:
            raise DatasetArgError(
                f"eval_strategy={getattr(config.eval_strategy, 'value', config.eval_strategy)!r} needs an "
                f"evaluation split, but dataset {script.dataset_name!r} has no split {script.dataset_test_split!r} "
                f"(its splits: {', '.join(repr(s) for s in splits)}). Pass --dataset_test_split, or "
                "--eval_strategy no."
            )
        return train, splits[script.dataset_test_split]

    def configure(self, args: argparse.Namespace) -> tuple[Any, Any] | list[str]:
        """The ``(script, config)`` to train with, or the ``accelerate launch`` command to run instead."""
        config_class = _load(self.config)
        values = resolve_values(args, config_class, self.method)
        require(values, "model_name_or_path", "dataset_name")
        relaunch = launch_command(args, self.name, values)
        if relaunch is not None:
            return relaunch
        values.setdefault("output_dir", self.default_output_dir(values["model_name_or_path"]))
        return build_configs(values, config_class)

    def run(self, args: argparse.Namespace) -> int:
        try:
            configured = self.configure(args)
            if isinstance(configured, list):
                return subprocess.run(configured, check=False).returncode
            script, config = configured
            train_dataset, eval_dataset = self.load_datasets(script, config)
            peft_config = lora_config(script, task_type=self.lora_task_type)
        except (ConfigError, DatasetArgError) as e:
            return self._error(e)
        from honelm.diagnostics import DiagnosticError

        try:
            return self.train(script, config, train_dataset, eval_dataset, peft_config)
        except DiagnosticError as e:  # a problem found before or during training, reported as an error
            return self._error(e)

    def train(self, script: Any, config: Any, train_dataset: Any, eval_dataset: Any, peft_config: Any) -> int:
        """Train, then save the model (or adapter), tokenizer and model card to ``config.output_dir``."""
        from honelm.data import DatasetFormatError

        try:
            trainer = _load(self.trainer)(
                model=script.model_name_or_path,
                args=config,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                peft_config=peft_config,
            )
        except DatasetFormatError as e:
            if not self.data_errors_exit:
                raise
            return self._error(e)  # the data, not the program: say what to fix, no traceback
        resume = config.resume_from_checkpoint
        if isinstance(resume, str) and resume.strip().lower() in ("true", "last"):
            resume = True  # the latest checkpoint in output_dir
        trainer.train(resume_from_checkpoint=resume)
        trainer.save_model(config.output_dir)
        if trainer.is_world_process_zero():
            print(f"honelm {self.name}: saved the {self.saved} to {os.path.abspath(config.output_dir)}")
        return 0

    def _error(self, error: Exception) -> int:
        print(f"honelm {self.name}: error: {error}", file=sys.stderr)
        return 2
