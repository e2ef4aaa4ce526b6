"""`honelm grpo`, run on a tiny local model, local prompts and reward functions named on the command line.

The command is driven through its own module (``add_arguments`` + ``run``) with a parser built
here, exactly as ``honelm.cli.main`` drives it once ``grpo`` is listed in its COMMANDS.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from honelm.cli import grpo

# A reward module as users write them: the share of completion tokens that hold a digit.
_REWARD_MODULE = textwrap.dedent(
    '''
    import re

    def digit_share(completions, **kwargs):
        """Share of the characters that are digits: a random tiny model starts low."""
        return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]

    def multiply(a: int, b: int) -> int:
        """Multiply two integers.

        Args:
            a: The first factor.
            b: The second factor.
        """
        return a * b

    NOT_A_FUNCTION = 3
    '''
)


def _grpo(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="honelm grpo")
    grpo.add_arguments(parser)
    return grpo.run(parser.parse_args(argv))


def _yaml(path: Path, options: dict[str, Any]) -> Path:
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in options.items()))
    return path


def _options(model_dir: Path, data: Path, output_dir: Path) -> dict[str, Any]:
    return {
        "model_name_or_path": str(model_dir), "dataset_name": str(data), "output_dir": str(output_dir),
        "max_steps": 50, "per_device_train_batch_size": 16, "num_generations": 8, "max_completion_length": 8,
        "learning_rate": 1e-2, "lr_scheduler_type": "constant", "logging_steps": 1, "save_strategy": "steps",
        "save_steps": 12, "report_to": "none", "use_cpu": True, "seed": 0,
    }


@pytest.fixture
def train_file(tmp_path: Path, write_jsonl: Callable[..., Path]) -> Path:
    return write_jsonl(tmp_path / "data" / "train.jsonl", [{"prompt": f"Say something {i}"} for i in range(48)])


@pytest.fixture
def reward_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_rewards.py"
    path.write_text(_REWARD_MODULE)
    return path


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def test_help_lists_the_grpo_options_by_section(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _grpo(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--config", "--model_name_or_path", "--dataset_name", "--reward_funcs", "--reward_model_name_or_path",
                   "--tools", "--num_generations", "--loss_type", "--beta", "--use_vllm", "--max_completion_length",
                   "--use_peft", "--num_processes", "--learning_rate"):
        assert f"  {option} " in out, option
    assert out.index("GRPO: Generation:") < out.index("GRPO: Loss:") < out.index("Training options")
    assert "GRPO: reward functions and tools:" in out


@pytest.mark.diagnostics_expected  # a toy task learned to one answer: entropy collapses and updates clip, as diagnosed
def test_grpo_from_yaml_learns_with_a_reward_from_a_file(tmp_path: Path, tiny_model_dir: Path, train_file: Path,
                                                         reward_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    options = {**_options(tiny_model_dir, train_file, out), "reward_funcs": [f"{reward_file}:digit_share"]}
    cfg = _yaml(tmp_path / "grpo.yaml", options)
    assert _grpo(["--config", str(cfg), "--max_steps", "12"]) == 0  # the flag beats `max_steps: 50`
    assert f"saved the model to {out}" in capsys.readouterr().out
    state = json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())
    assert state["global_step"] == 12 and state["max_steps"] == 12
    rewards = [h["rewards/digit_share/mean"] for h in state["log_history"] if "rewards/digit_share/mean" in h]
    assert len(rewards) == 12 and sum(rewards[-3:]) > sum(rewards[:3]) + 0.1, rewards
    assert (out / "model.safetensors").is_file() and "- grpo" in (out / "README.md").read_text()


def test_builtin_rewards_and_tools_are_resolved(reward_file: Path) -> None:
    from honelm.methods.grpo import GRPOConfig
    from honelm.rewards import accuracy_reward, think_format_reward

    config = GRPOConfig(output_dir="unused", max_completion_length=100, use_cpu=True, report_to="none")
    funcs = grpo.reward_functions(
        ["accuracy_reward", "think_format_reward", "soft_overlong_punishment", f"{reward_file}:digit_share",
         "json:dumps"], "some/reward-model", config
    )
    assert funcs[0] is accuracy_reward and funcs[1] is think_format_reward and funcs[-1] == "some/reward-model"
    assert funcs[2](completion_ids=[[0] * 70, [0] * 90, [0] * 101]) == [0.0, -0.5, -1.0]  # cache = 20% of 100
    assert funcs[3](completions=["12ab"]) == [0.5]
    assert funcs[4] is json.dumps
    assert grpo.resolve_function(f"{reward_file}:multiply", "--tools")(a=6, b=7) == 42


@pytest.mark.parametrize(
    "spec,message",
    [
        ("no_such_reward", "give `module:function`"),
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("json:no_such_function", "has no function 'no_such_function'"),
        ("missing_file.py:f", "no such file"),
    ],
)
def test_bad_reward_names_are_explained(spec: str, message: str) -> None:
    from honelm.methods.grpo import GRPOConfig

    config = GRPOConfig(output_dir="unused", use_cpu=True, report_to="none")
    with pytest.raises(grpo.ConfigError, match=message):
        grpo.reward_functions([spec], None, config)


def test_errors_are_reported_without_a_traceback(tmp_path: Path, tiny_model_dir: Path, train_file: Path,
                                                 reward_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(train_file), "--use_cpu",
            "--output_dir", str(tmp_path / "out")]
    assert _grpo(base) == 2
    assert "give at least one reward" in capsys.readouterr().err
    assert _grpo([*base, "--reward_funcs", f"{reward_file}:NOT_A_FUNCTION"]) == 2
    assert "has no function 'NOT_A_FUNCTION'" in capsys.readouterr().err
    assert _grpo([*base, "--reward_funcs", "accuracy_reward", "--num_generations", "3"]) == 2
    err = capsys.readouterr().err
    assert "invalid GRPOConfig" in err and "multiple of num_generations=3" in err
    cfg = _yaml(tmp_path / "bad.yaml", {"reward_func": ["accuracy_reward"]})
    assert _grpo([*base, "--config", str(cfg)]) == 2
    assert "unknown option `reward_func`. Did you mean `reward_funcs`?" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_default_output_dir_matches_the_trainer() -> None:
    assert grpo.default_output_dir("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen2.5-0.5B-Instruct-GRPO"


def test_registered_in_the_honelm_command() -> None:
    from honelm.cli.main import COMMANDS

    if "grpo" not in COMMANDS:
        pytest.skip("`grpo` is not yet listed in honelm.cli.main.COMMANDS")
    assert COMMANDS["grpo"][0] == "honelm.cli.grpo"
