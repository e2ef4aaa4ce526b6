"""`honelm rloo`, run on a tiny local model, local prompts and reward functions named on the command line.

The command is driven through its own module (``add_arguments`` + ``run``) with a parser built
here, exactly as ``honelm.cli.main`` drives it once ``rloo`` is listed in its COMMANDS.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from honelm.cli import rloo
from honelm.cli.args import ConfigError

REWARDS_PY = '''
seen_columns = []


def mentions_topic(completions, topic, **kwargs):
    seen_columns.append(sorted(kwargs))
    return [float(str(t) in c) + 0.01 * len(c) for c, t in zip(completions, topic)]
'''


def _rloo(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="honelm rloo")
    rloo.add_arguments(parser)
    return rloo.run(parser.parse_args(argv))


def _yaml(path: Path, options: dict[str, Any]) -> Path:
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in options.items()))
    return path


def _rows(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"prompt": f"Tell me about topic {i}. ", "topic": i} for i in range(start, start + n)]


def _options(model_dir: Path, data: Path, output_dir: Path, rewards: Path) -> dict[str, Any]:
    return {
        "model_name_or_path": str(model_dir), "dataset_name": str(data), "output_dir": str(output_dir),
        "reward_funcs": [f"{rewards}:mentions_topic", "think_format_reward"], "reward_weights": [1.0, 0.5],
        "max_steps": 20, "per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 6,
        "learning_rate": 1e-3, "lr_scheduler_type": "constant", "logging_steps": 1, "save_strategy": "steps", "save_steps": 2, "report_to": "none",
        "use_cpu": True, "seed": 0,
        # The tiny model never stops or thinks within 6 tokens: truncation and a constant
        # think_format_reward are the toy setup, not problems to report.
        "diagnostics_silence": ["GRPO_COMPLETIONS_TRUNCATED", "GRPO_REWARD_FN_CONSTANT"],
    }


def _state(output_dir: Path, step: int) -> dict[str, Any]:
    return json.loads((output_dir / f"checkpoint-{step}" / "trainer_state.json").read_text())


@pytest.fixture
def train_file(tmp_path: Path, write_jsonl: Callable[..., Path]) -> Path:
    return write_jsonl(tmp_path / "data" / "train.jsonl", _rows(16))


@pytest.fixture
def rewards_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS_PY)
    return path


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def test_help_lists_the_rloo_options_by_section(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _rloo(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--config", "--model_name_or_path", "--dataset_name", "--reward_funcs", "--use_peft",
                   "--num_processes", "--num_generations", "--beta", "--kl_in_reward", "--num_iterations",
                   "--epsilon", "--max_completion_length", "--use_vllm", "--learning_rate", "--output_dir"):
        assert f"  {option} " in out, option
    assert out.index("RLOO: Generation") < out.index("RLOO: Training") < out.index("Training options")
    assert rloo.default_output_dir("Qwen/Qwen2.5-0.5B") == "Qwen2.5-0.5B-RLOO"


def test_reward_funcs_are_resolved_or_explained(tmp_path: Path, rewards_file: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from honelm.rewards import accuracy_reward

    funcs = rloo.resolve_reward_funcs(["accuracy_reward", f"{rewards_file}:mentions_topic", "org/reward-model"])
    assert funcs[0] is accuracy_reward and funcs[1].__name__ == "mentions_topic" and funcs[2] == "org/reward-model"
    monkeypatch.chdir(tmp_path)  # `module:function` and `module.function` import from the working directory
    assert rloo.resolve_reward_funcs(["my_rewards:mentions_topic"])[0].__name__ == "mentions_topic"
    assert rloo.resolve_reward_funcs(["my_rewards.mentions_topic"])[0].__name__ == "mentions_topic"
    with pytest.raises(ConfigError, match="not a built-in reward .* Did you mean 'accuracy_reward'"):
        rloo.resolve_reward_funcs(["acuracy_reward"])
    with pytest.raises(ConfigError, match="has no function 'mention_topic'. Did you mean 'mentions_topic'"):
        rloo.resolve_reward_funcs([f"{rewards_file}:mention_topic"])
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module'"):
        rloo.resolve_reward_funcs(["no_such_module:f"])
    sys.modules.pop("my_rewards", None)


def test_errors_are_reported_without_a_traceback(tmp_path: Path, tiny_model_dir: Path, train_file: Path,
                                                 rewards_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(train_file), "--use_cpu",
            "--output_dir", str(tmp_path / "out")]
    assert _rloo(base) == 2
    assert "--reward_funcs is required" in capsys.readouterr().err
    assert _rloo([*base, "--reward_funcs", "acuracy_reward"]) == 2
    assert "Did you mean 'accuracy_reward'" in capsys.readouterr().err
    assert _rloo([*base, "--reward_funcs", "think_format_reward", "--num_generations", "1"]) == 2
    assert "RLOO needs at least 2 completions per prompt" in capsys.readouterr().err
    cfg = _yaml(tmp_path / "cfg.yaml", {"reward_func": ["think_format_reward"]})
    assert _rloo([*base, "--config", str(cfg)]) == 2
    assert "unknown option `reward_func`. Did you mean `reward_funcs`?" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_rloo_from_yaml_trains_and_saves_a_reloadable_model(tmp_path: Path, tiny_model_dir: Path, train_file: Path,
                                                            rewards_file: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    cfg = _yaml(tmp_path / "rloo.yaml", _options(tiny_model_dir, train_file, out, rewards_file))
    assert _rloo(["--config", str(cfg), "--max_steps", "4"]) == 0  # the flag beats `max_steps: 20`
    assert f"saved the model to {out}" in capsys.readouterr().out

    state = _state(out, 4)
    assert state["global_step"] == 4 and state["max_steps"] == 4
    logs = [log for log in state["log_history"] if "loss" in log]
    assert [log["learning_rate"] for log in logs] == [1e-3] * 4  # from the YAML
    assert "rewards/mentions_topic/mean" in logs[0] and "rewards/think_format_reward/mean" in logs[0]
    assert sys.modules["_honelm_rewards_my_rewards"].seen_columns[0] == ["completion_ids", "prompts", "trainer_state"]
    trained = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert any((a != b).any() for a, b in zip(trained.parameters(), base.parameters()))
    card = (out / "README.md").read_text()
    assert "REINFORCE Leave-One-Out" in card and "mentions_topic, think_format_reward" in card


def test_rloo_with_lora_eval_split_and_default_output_dir(tmp_path: Path, tiny_model_dir: Path,
                                                          write_jsonl: Callable[..., Path], rewards_file: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", _rows(8))
    write_jsonl(data / "test.jsonl", _rows(4, start=100))
    monkeypatch.chdir(tmp_path)
    options = _options(tiny_model_dir, data, tmp_path / "unused", rewards_file)
    del options["output_dir"]
    options.update({"max_steps": 2, "eval_strategy": "steps", "eval_steps": 2, "use_peft": True, "lora_r": 4,
                    "lora_target_modules": ["q_proj", "v_proj"], "beta": 0.1, "per_device_eval_batch_size": 8})
    assert _rloo(["--config", str(_yaml(tmp_path / "lora.yaml", options))]) == 0

    out = tmp_path / rloo.default_output_dir(str(tiny_model_dir))
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    evals = [log for log in _state(out, 2)["log_history"] if "eval_loss" in log]
    assert evals and "eval_reward" in evals[0] and "eval_rewards/mentions_topic/mean" in evals[0]


def test_num_processes_relaunches_this_command_under_accelerate(tmp_path: Path, tiny_model_dir: Path,
                                                                train_file: Path, rewards_file: Path) -> None:
    parser = argparse.ArgumentParser(prog="honelm rloo")
    rloo.add_arguments(parser)
    options = _options(tiny_model_dir, train_file, tmp_path / "out", rewards_file)
    del options["reward_funcs"]
    cfg = _yaml(tmp_path / "rloo.yaml", options)
    args = parser.parse_args(["--config", str(cfg), "--num_processes", "2", "--main_process_port", "29999",
                              "--reward_funcs", "think_format_reward", "accuracy_reward", "--beta", "0.2"])
    command = rloo._configure(args)
    assert isinstance(command, list)
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    rest = command[command.index("honelm.cli"):]
    assert rest[:2] == ["honelm.cli", "rloo"] and rest[rest.index("--beta") + 1] == "0.2"
    at = rest.index("--reward_funcs")
    assert rest[at + 1 : at + 3] == ["think_format_reward", "accuracy_reward"]
    assert "--num_processes" not in rest


def test_honelm_rloo_through_the_main_entry_point(tmp_path: Path, tiny_model_dir: Path, train_file: Path,
                                                  rewards_file: Path) -> None:
    from honelm.cli.main import COMMANDS, main

    if "rloo" not in COMMANDS:
        pytest.skip("`rloo` is not registered in honelm.cli.main.COMMANDS yet")
    options = {**_options(tiny_model_dir, train_file, tmp_path / "out", rewards_file), "max_steps": 2}
    assert main(["rloo", "--config", str(_yaml(tmp_path / "rloo.yaml", options))]) == 0
    assert _state(tmp_path / "out", 2)["global_step"] == 2
