"""``honelm rloo``: REINFORCE Leave-One-Out from the command line.

    honelm rloo --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name trl-lib/DeepMath-103K \\
        --reward_funcs accuracy_reward --num_generations 8 --per_device_train_batch_size 8
    honelm rloo --config rloo.yaml --reward_funcs accuracy_reward my_rewards.py:brevity --max_steps 100
    honelm rloo --config rloo.yaml --num_processes 4         # re-launched under `accelerate launch`

Every ``RLOOConfig`` field is a flag; ``honelm rloo --help`` lists them by section.
``--reward_funcs`` (also a key of the YAML file) takes one or more of:

- a built-in reward of :mod:`honelm.rewards`: ``accuracy_reward``, ``think_format_reward``,
  ``tool_call_reward``;
- your own function: ``module:function`` or ``module.function`` (the module importable from
  the working directory) or ``path/to/file.py:function``;
- a reward model: a Hub id (``org/name``) or a local directory.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import os
import subprocess
import sys
from typing import Any

from .args import (
    ConfigError,
    FieldSpec,
    add_config_arguments,
    build_configs,
    field_specs,
    launch_command,
    lora_config,
    read_yaml,
    require,
)
from .datasets import DatasetArgError, load_dataset_arg, select_split

_METHOD = "RLOO"
BUILTIN_REWARDS = ("accuracy_reward", "think_format_reward", "tool_call_reward")
_REWARD_FUNCS = FieldSpec(
    name="reward_funcs",
    annotation=list[str],
    default=None,
    help="Reward functions (required): built-in names (" + ", ".join(BUILTIN_REWARDS) + "), `module:function`, "
    "`path/to/file.py:function`, or reward model ids or directories.",
    group="Model, data and config file",
    owner="script",
)


class _RewardFuncsAction(argparse.Action):
    """Stores the values and records the tokens, so a relaunch under accelerate repeats them."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, list(values))
        namespace._cli_argv = [*getattr(namespace, "_cli_argv", []), option_string, *values]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from honelm.methods.rloo.config import RLOOConfig

    add_config_arguments(parser, RLOOConfig, method=_METHOD)
    group = next((g for g in parser._action_groups if g.title == _REWARD_FUNCS.group), parser)
    group.add_argument("--reward_funcs", "--reward-funcs", dest="reward_funcs", nargs="+", metavar="FUNC",
                       default=argparse.SUPPRESS, action=_RewardFuncsAction, help=_REWARD_FUNCS.help)


def default_output_dir(model_name_or_path: str) -> str:
    """``<model name>-RLOO`` in the working directory, as ``RLOOTrainer`` names it."""
    return f"{model_name_or_path.rstrip('/').split('/')[-1]}-RLOO"


def resolve_reward_funcs(specs: list[str]) -> list[Any]:
    """Functions for built-in names and ``module:function`` specs; other entries are reward
    model names or paths, passed on as strings (the trainer loads them once)."""
    out: list[Any] = []
    for spec in specs:
        spec = str(spec).strip()
        if spec in BUILTIN_REWARDS:
            import honelm.rewards

            out.append(getattr(honelm.rewards, spec))
        elif ":" in spec and not os.path.exists(spec):
            module_name, _, name = spec.rpartition(":")
            out.append(_function(_module(module_name, spec), name, spec))
        elif os.path.exists(os.path.expanduser(spec)) or "/" in spec:
            out.append(spec)  # a reward model: local directory or Hub id
        elif "." in spec:
            module_name, _, name = spec.rpartition(".")
            out.append(_function(_module(module_name, spec), name, spec))
        else:
            close = difflib.get_close_matches(spec, BUILTIN_REWARDS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"--reward_funcs {spec!r} is not a built-in reward ({', '.join(BUILTIN_REWARDS)}).{hint} For your "
                "own function give `module:function` or `path/to/file.py:function`; for a reward model its Hub id "
                "(`org/name`) or local directory."
            )
    return out


def _module(module_name: str, spec: str) -> Any:
    if module_name.endswith(".py"):
        path = os.path.abspath(os.path.expanduser(module_name))
        if not os.path.isfile(path):
            raise ConfigError(f"--reward_funcs {spec!r}: no such file {path}.")
        name = f"_honelm_rewards_{os.path.splitext(os.path.basename(path))[0]}"
        loader_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(loader_spec)  # type: ignore[arg-type]
        sys.modules[name] = module
        loader_spec.loader.exec_module(module)  # type: ignore[union-attr]
        return module
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            f"--reward_funcs {spec!r}: cannot import module {module_name!r} ({e}). Run from the directory that holds "
            "it, add it to PYTHONPATH, or give the file: `path/to/file.py:function`."
        ) from e


def _function(module: Any, name: str, spec: str) -> Any:
    func = getattr(module, name, None)
    if func is None or not callable(func):
        found = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        close = difflib.get_close_matches(name, found, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"--reward_funcs {spec!r}: the module has no function {name!r}.{hint}")
    return func


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


def _configure(args: argparse.Namespace) -> tuple[Any, Any, list[str]] | list[str]:
    """``(script, config, reward_funcs)`` to train with, or the ``accelerate launch`` command to run instead."""
    from honelm.methods.rloo.config import RLOOConfig

    specs = field_specs(RLOOConfig, _METHOD)
    path = getattr(args, "config", None)
    values = read_yaml(path, [*specs, _REWARD_FUNCS]) if path else {}
    values.update({s.name: getattr(args, s.name) for s in specs if hasattr(args, s.name)})
    if hasattr(args, "reward_funcs"):
        values["reward_funcs"] = args.reward_funcs
    require(values, "model_name_or_path", "dataset_name", "reward_funcs")
    reward_funcs = list(values.pop("reward_funcs"))
    relaunch = launch_command(args, "rloo", values)
    if relaunch is not None:
        return relaunch
    values.setdefault("output_dir", default_output_dir(values["model_name_or_path"]))
    script, config = build_configs(values, RLOOConfig)
    return script, config, reward_funcs


def run(args: argparse.Namespace) -> int:
    try:
        configured = _configure(args)
        if isinstance(configured, list):
            return subprocess.run(configured, check=False).returncode
        script, config, reward_specs = configured
        reward_funcs = resolve_reward_funcs(reward_specs)
        train_dataset, eval_dataset = load_datasets(script, config)
        peft_config = lora_config(script)
    except (ConfigError, DatasetArgError) as e:
        print(f"honelm rloo: error: {e}", file=sys.stderr)
        return 2
    return train(script, config, reward_funcs, train_dataset, eval_dataset, peft_config)


def train(script: Any, config: Any, reward_funcs: list[Any], train_dataset: Any, eval_dataset: Any,
          peft_config: Any) -> int:
    """Train, then save the model (or adapter) and tokenizer to ``config.output_dir``."""
    from honelm.methods.rloo.trainer import RLOOTrainer

    trainer = RLOOTrainer(
        model=script.model_name_or_path,
        reward_funcs=reward_funcs,
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
        print(f"honelm rloo: saved the model to {os.path.abspath(config.output_dir)}")
    return 0
