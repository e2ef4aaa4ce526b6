"""`honelm dpo`, run on a tiny local model and local preference data.

The command is driven through its own module (``add_arguments`` + ``run``) with a parser built
here, exactly as ``honelm.cli.main`` drives it once ``dpo`` is listed in its COMMANDS.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from honelm.cli import dpo


def _dpo(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="honelm dpo")
    dpo.add_arguments(parser)
    return dpo.run(parser.parse_args(argv))


def _yaml(path: Path, options: dict[str, Any]) -> Path:
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in options.items()))
    return path


def _rows(n: int, start: int = 0) -> list[dict[str, str]]:
    """Preference rows: the chosen answer says "yes", the rejected one "no" (learnable in a few steps)."""
    return [{"prompt": f"Question {i}: is this row number {i}?\n", "chosen": "Yes, it is.",
             "rejected": "No, absolutely not."} for i in range(start, start + n)]


def _options(model_dir: Path, data: Path, output_dir: Path) -> dict[str, Any]:
    return {
        "model_name_or_path": str(model_dir), "dataset_name": str(data), "output_dir": str(output_dir),
        "max_steps": 50, "per_device_train_batch_size": 4, "learning_rate": 5e-3, "lr_scheduler_type": "constant",
        "logging_steps": 1, "save_strategy": "steps", "save_steps": 4, "report_to": "none", "use_cpu": True,
        "max_length": 48, "seed": 0, "beta": 0.1,
    }


def _state(output_dir: Path, step: int) -> dict[str, Any]:
    return json.loads((output_dir / f"checkpoint-{step}" / "trainer_state.json").read_text())


@pytest.fixture
def train_file(tmp_path: Path, write_jsonl: Callable[..., Path]) -> Path:
    return write_jsonl(tmp_path / "data" / "train.jsonl", _rows(16))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def test_help_lists_the_dpo_options_by_section(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _dpo(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--config", "--model_name_or_path", "--dataset_name", "--use_peft", "--num_processes",
                   "--beta", "--loss_type", "--loss_weights", "--max_prompt_length", "--precompute_ref_log_probs",
                   "--sync_ref_model", "--padding_free", "--learning_rate", "--output_dir"):
        assert f"  {option} " in out, option
    assert out.index("DPO: Loss:") < out.index("DPO: Reference model:") < out.index("Training options")
    assert dpo.default_output_dir("Qwen/Qwen2.5-0.5B") == "Qwen2.5-0.5B-DPO"


def test_errors_are_reported_without_a_traceback(tmp_path: Path, tiny_model_dir: Path, train_file: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert _dpo(["--dataset_name", str(train_file)]) == 2
    assert "--model_name_or_path is required" in capsys.readouterr().err

    cfg = _yaml(tmp_path / "cfg.yaml", {"model_name_or_path": str(tiny_model_dir), "bta": 0.2})
    assert _dpo(["--config", str(cfg), "--dataset_name", str(train_file)]) == 2
    assert "unknown option `bta`. Did you mean `beta`?" in capsys.readouterr().err

    base = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(train_file), "--use_cpu",
            "--output_dir", str(tmp_path / "out")]
    assert _dpo([*base, "--loss_type", "sigmod"]) == 2
    assert "Unknown loss type 'sigmod'" in capsys.readouterr().err
    assert _dpo([*base, "--loss_type", "sigmoid", "sft", "ipo", "--loss_weights", "1.0", "0.5"]) == 2
    assert "one weight per loss type" in capsys.readouterr().err
    assert _dpo([*base, "--eval_strategy", "steps", "--eval_steps", "1"]) == 2
    assert "needs an evaluation split" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_dpo_from_yaml_trains_and_saves_a_reloadable_model(tmp_path: Path, tiny_model_dir: Path, train_file: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    options = {**_options(tiny_model_dir, train_file, out), "loss_type": ["sigmoid", "sft"],
               "loss_weights": [1.0, 0.1], "padding_free": True}
    cfg = _yaml(tmp_path / "dpo.yaml", options)
    assert _dpo(["--config", str(cfg), "--max_steps", "8"]) == 0  # the flag beats `max_steps: 50`
    assert f"saved the model to {out}" in capsys.readouterr().out

    state = _state(out, 8)
    assert state["global_step"] == 8 and state["max_steps"] == 8
    logs = [log for log in state["log_history"] if "loss" in log]
    assert [log["learning_rate"] for log in logs] == [5e-3] * 8  # from the YAML
    assert "loss/sft" in logs[0]  # the list of loss types reached the trainer
    assert logs[-1]["rewards/margins"] > 0.5 and logs[-1]["rewards/accuracies"] == 1.0
    trained = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert any((a != b).any() for a, b in zip(trained.parameters(), base.parameters()))
    assert "Direct Preference Optimization" in (out / "README.md").read_text()


def test_dpo_with_lora_eval_split_and_default_output_dir(tmp_path: Path, tiny_model_dir: Path,
                                                         write_jsonl: Callable[..., Path],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", _rows(8))
    write_jsonl(data / "test.jsonl", _rows(4, start=100))
    monkeypatch.chdir(tmp_path)
    options = _options(tiny_model_dir, data, tmp_path / "unused")
    del options["output_dir"]
    options.update({"max_steps": 4, "eval_strategy": "steps", "eval_steps": 4, "use_peft": True, "lora_r": 4,
                    "lora_target_modules": ["q_proj", "v_proj"], "precompute_ref_log_probs": True})
    assert _dpo(["--config", str(_yaml(tmp_path / "lora.yaml", options))]) == 0

    out = tmp_path / dpo.default_output_dir(str(tiny_model_dir))
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    evals = [log for log in _state(out, 4)["log_history"] if "eval_loss" in log]
    assert evals and "eval_rewards/accuracies" in evals[0]


def test_num_processes_relaunches_this_command_under_accelerate(tmp_path: Path, tiny_model_dir: Path,
                                                                train_file: Path) -> None:
    parser = argparse.ArgumentParser(prog="honelm dpo")
    dpo.add_arguments(parser)
    cfg = _yaml(tmp_path / "dpo.yaml", _options(tiny_model_dir, train_file, tmp_path / "out"))
    args = parser.parse_args(["--config", str(cfg), "--num_processes", "2", "--main_process_port", "29999",
                              "--beta", "0.2"])
    command = dpo._configure(args)
    assert isinstance(command, list)
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert command[command.index("--num_processes") + 1] == "2"
    rest = command[command.index("honelm.cli"):]
    assert rest[:2] == ["honelm.cli", "dpo"] and "--config" in rest and rest[rest.index("--beta") + 1] == "0.2"
    assert "--num_processes" not in rest  # the relaunched command does not launch again


def test_honelm_dpo_through_the_main_entry_point(tmp_path: Path, tiny_model_dir: Path, train_file: Path) -> None:
    from honelm.cli.main import COMMANDS, main

    if "dpo" not in COMMANDS:
        pytest.skip("`dpo` is not registered in honelm.cli.main.COMMANDS yet")
    cfg = _yaml(tmp_path / "dpo.yaml", {**_options(tiny_model_dir, train_file, tmp_path / "out"), "max_steps": 2})
    assert main(["dpo", "--config", str(cfg)]) == 0
    assert _state(tmp_path / "out", 2)["global_step"] == 2
