"""``honelm grpo``: Group Relative Policy Optimization from the command line.

    honelm grpo --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name trl-lib/DeepMath-103K \\
        --reward_funcs accuracy_reward think_format_reward --output_dir Qwen2.5-0.5B-GRPO
    honelm grpo --config grpo.yaml --max_steps 100            # flags override the YAML file
    honelm grpo --config grpo.yaml --num_processes 4          # re-launched under `accelerate launch`

Every ``GRPOConfig`` field is a flag; ``honelm grpo --help`` lists them by section. Reward
functions are built-in names (``accuracy_reward``, ``think_format_reward``,
``tool_call_reward``, ``soft_overlong_punishment``), ``module:function`` (``module.function``
works too) or ``path/to/file.py:function``; ``--reward_model_name_or_path`` adds a reward
model. ``--tools`` takes ``module:function`` entries the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import os
import subprocess
import sys
import typing
from collections.abc import Callable
from typing import Any

from .args import (
    ConfigError,
    FieldSpec,
    _add_flag,
    add_config_arguments,
    build_configs,
    field_specs,
    launch_command,
    lora_config,
    read_yaml,
    require,
)
from .datasets import DatasetArgError, load_dataset_arg, select_split

_METHOD = "GRPO"
_GROUP = "GRPO: reward functions and tools"
BUILTIN_REWARDS = ("accuracy_reward", "think_format_reward", "tool_call_reward", "soft_overlong_punishment")


@dataclasses.dataclass
class GRPOScriptArguments:
    """Command-line options of ``honelm grpo`` that are not ``GRPOConfig`` fields."""

    reward_funcs: list[str] | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Reward functions: built-in names (" + ", ".join(BUILTIN_REWARDS) + "), `module:function` "
            "or `path/to/file.py:function`. At least one reward function or a reward model is required."
        },
    )
    reward_model_name_or_path: str | None = dataclasses.field(
        default=None,
        metadata={"help": "A reward model (sequence classification, one output) to score completions with."},
    )
    tools: list[str] | None = dataclasses.field(
        default=None,
        metadata={"help": "Tool functions the model may call (`module:function`); needs conversational prompts."},
    )


def _extra_specs() -> list[FieldSpec]:
    hints = typing.get_type_hints(GRPOScriptArguments)
    return [
        FieldSpec(name=f.name, annotation=hints[f.name], default=f.default, help=f.metadata["help"], group=_GROUP,
                  owner="script")
        for f in dataclasses.fields(GRPOScriptArguments)
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from honelm.methods.grpo.config import GRPOConfig

    add_config_arguments(parser, GRPOConfig, method=_METHOD)
    group = parser.add_argument_group(_GROUP)
    for spec in _extra_specs():
        _add_flag(group, spec)


def default_output_dir(model_name_or_path: str) -> str:
    """``<model name>-GRPO`` in the working directory, as ``GRPOTrainer`` names it."""
    return f"{model_name_or_path.rstrip('/').split('/')[-1]}-GRPO"


# ---- reward functions and tools ------------------------------------------------------------------


def resolve_function(spec: str, what: str) -> Callable[..., Any]:
    """The function named by ``module:function``, ``module.function`` or ``file.py:function``."""
    if ":" in spec:
        module_name, _, name = spec.rpartition(":")
    elif "." in spec:
        module_name, _, name = spec.rpartition(".")
    else:
        raise ConfigError(
            f"{what} {spec!r}: give `module:function` (an importable module) or `path/to/file.py:function`"
            + (f", or a built-in reward: {', '.join(BUILTIN_REWARDS)}." if what == "--reward_funcs" else ".")
        )
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise ConfigError(f"{what} {spec!r}: no such file {os.path.abspath(module_name)}.")
            module_spec = importlib.util.spec_from_file_location(os.path.basename(module_name)[:-3], module_name)
            module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
            module_spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{what} {spec!r}: cannot import module {module_name!r} ({e}).") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"{what} {spec!r}: module {module_name!r} has no function {name!r}.")
    return fn


def reward_functions(names: list[str] | None, reward_model: str | None, config: Any) -> list[Any]:
    """Reward functions from ``--reward_funcs`` entries, plus the reward model's name (loaded by the trainer)."""
    from honelm import rewards

    funcs: list[Any] = []
    for name in names or []:
        if name == "soft_overlong_punishment":
            limit = config.max_completion_length
            funcs.append(rewards.get_soft_overlong_punishment(limit, max(limit // 5, 1)))
        elif name in BUILTIN_REWARDS:
            funcs.append(getattr(rewards, name))
        else:
            funcs.append(resolve_function(name, "--reward_funcs"))
    if reward_model is not None:
        funcs.append(reward_model)
    if not funcs:
        raise ConfigError(
            "give at least one reward: --reward_funcs (built-in names such as accuracy_reward, or module:function) "
            "or --reward_model_name_or_path."
        )
    return funcs


# ---- running -------------------------------------------------------------------------------------


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


def _resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Options from the YAML file and the command line (flags win), the extra options included."""
    from honelm.methods.grpo.config import GRPOConfig

    specs = [*field_specs(GRPOConfig, _METHOD), *_extra_specs()]
    path = getattr(args, "config", None)
    values = read_yaml(path, specs) if path else {}
    values.update({s.name: getattr(args, s.name) for s in specs if hasattr(args, s.name)})
    return values


def _configure(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]] | list[str]:
    """``(script, config, extras)`` to train with, or the ``accelerate launch`` command to run instead."""
    from honelm.methods.grpo.config import GRPOConfig

    values = _resolve(args)
    require(values, "model_name_or_path", "dataset_name")
    relaunch = launch_command(args, "grpo", values)
    if relaunch is not None:
        return relaunch
    extras = {f.name: values.pop(f.name, None) for f in dataclasses.fields(GRPOScriptArguments)}
    values.setdefault("output_dir", default_output_dir(values["model_name_or_path"]))
    script, config = build_configs(values, GRPOConfig)
    return script, config, extras


def run(args: argparse.Namespace) -> int:
    try:
        configured = _configure(args)
        if isinstance(configured, list):
            return subprocess.run(configured, check=False).returncode
        script, config, extras = configured
        funcs = reward_functions(extras["reward_funcs"], extras["reward_model_name_or_path"], config)
        tools = [resolve_function(t, "--tools") for t in extras["tools"] or []] or None
        train_dataset, eval_dataset = load_datasets(script, config)
        peft_config = lora_config(script)
    except (ConfigError, DatasetArgError) as e:
        print(f"honelm grpo: error: {e}", file=sys.stderr)
        return 2
    return train(script, config, funcs, tools, train_dataset, eval_dataset, peft_config)


def train(script: Any, config: Any, reward_funcs: list[Any], tools: list[Any] | None, train_dataset: Any,
          eval_dataset: Any, peft_config: Any) -> int:
    """Train, then save the model (or adapter) and tokenizer to ``config.output_dir``."""
    from honelm.methods.grpo.trainer import GRPOTrainer

    trainer = GRPOTrainer(
        model=script.model_name_or_path,
        reward_funcs=reward_funcs,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=peft_config,
        tools=tools,
    )
    resume = config.resume_from_checkpoint
    if isinstance(resume, str) and resume.strip().lower() in ("true", "last"):
        resume = True  # the latest checkpoint in output_dir
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(config.output_dir)
    if trainer.is_world_process_zero():
        print(f"honelm grpo: saved the model to {os.path.abspath(config.output_dir)}")
    return 0
