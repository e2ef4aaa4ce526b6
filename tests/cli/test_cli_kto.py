"""`honelm kto`, run through a parser built from honelm.cli.kto on a tiny local model and local data.

The parser mirrors what `honelm.cli.main` builds for a subcommand, so these tests hold before
and after `kto` is registered in its COMMANDS table.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from honelm.cli import kto


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="honelm kto")
    kto.add_arguments(parser)
    return kto.run(parser.parse_args(argv))


def _yaml(path: Path, options: dict[str, Any]) -> Path:
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in options.items()))
    return path


def _rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Unpaired rows: the correct sum is desirable, a far-off one undesirable."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        prompt = [{"role": "user", "content": f"What is {a} + {b}?"}]
        for answer, label in ((a + b, True), (a + b + rng.randint(10, 40), False)):
            completion = [{"role": "assistant", "content": str(answer)}]
            rows.append({"prompt": prompt, "completion": completion, "label": label})
    return rows


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture
def kto_file(tmp_path: Path, write_jsonl: Callable[..., Path]) -> Path:
    return write_jsonl(tmp_path / "data" / "train.jsonl", _rows(12))


def test_help_lists_the_kto_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--config", "--model_name_or_path", "--dataset_name", "--use_peft", "--num_processes", "--beta",
                   "--loss_type", "--desirable_weight", "--undesirable_weight", "--max_length", "--max_prompt_length",
                   "--precompute_ref_log_probs", "--padding_free", "--learning_rate", "--output_dir"):
        assert f"  {option} " in out, option
    assert out.index("KTO: Training:") < out.index("Training options (transformers.TrainingArguments):")


def test_default_output_dir_matches_the_trainer() -> None:
    assert kto.default_output_dir("Qwen/Qwen2.5-0.5B") == "Qwen2.5-0.5B-KTO"


def test_errors_are_reported_without_a_traceback(tmp_path: Path, tiny_model_dir: Path, kto_file: Path,
                                                 write_jsonl: Callable[..., Path],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert _main(["--dataset_name", str(kto_file)]) == 2
    assert "--model_name_or_path is required" in capsys.readouterr().err

    base = ["--model_name_or_path", str(tiny_model_dir), "--use_cpu", "--output_dir", str(tmp_path / "out")]
    assert _main([*base, "--dataset_name", str(kto_file), "--per_device_train_batch_size", "1"]) == 2
    err = capsys.readouterr().err
    assert "per_device_train_batch_size=1" in err and "per_device_train_batch_size >= 2" in err

    with pytest.raises(SystemExit) as exit_info:
        _main([*base, "--dataset_name", str(kto_file), "--loss_type", "dpo"])
    assert exit_info.value.code == 2
    assert "--loss_type: expected one of kto, apo_zero_unpaired; got 'dpo'" in capsys.readouterr().err

    bad = write_jsonl(tmp_path / "bad" / "train.jsonl", [{"prompt": "q", "completion": " a", "label": "yes"}] * 4)
    assert _main([*base, "--dataset_name", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "Row 0" in err and "label" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_kto_from_yaml_trains_and_saves_a_model_that_prefers_the_desirable_answers(
    tmp_path: Path, tiny_model_dir: Path, kto_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    options = {
        "model_name_or_path": str(tiny_model_dir), "dataset_name": str(kto_file), "output_dir": str(out),
        "max_steps": 50, "per_device_train_batch_size": 8, "learning_rate": 3e-3, "lr_scheduler_type": "constant",
        "logging_steps": 1, "save_strategy": "steps", "save_steps": 12, "report_to": "none", "use_cpu": True,
        "beta": 0.2,
        "train_sampling_strategy": "random", "seed": 0, "desirable_weight": 1.0,
    }
    cfg = _yaml(tmp_path / "kto.yaml", options)
    assert _main(["--config", str(cfg), "--max_steps", "12", "--loss_type", "apo_zero_unpaired"]) == 0  # flags win
    assert f"saved the model to {out}" in capsys.readouterr().out
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    state = json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())
    assert state["global_step"] == 12 and state["max_steps"] == 12  # the flag beats `max_steps: 50`
    assert [log["learning_rate"] for log in state["log_history"] if "loss" in log] == [3e-3] * 12  # from the YAML
    assert "loss_type=apo_zero_unpaired" in (out / "README.md").read_text()
    # the saved model is the trained one: it moved the desirable answers up relative to the base model
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    margins = []
    for row in _rows(6, seed=0)[:12]:
        prompt = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, return_dict=True)["input_ids"]
        full = tok.apply_chat_template(row["prompt"] + row["completion"], return_dict=True)["input_ids"]
        margins.append((_logp(reloaded, prompt, full) - _logp(base, prompt, full)) * (1 if row["label"] else -1))
    assert sum(margins) / len(margins) > 0.5, margins


def _logp(model: Any, prompt: list[int], full: list[int]) -> float:
    import torch

    ids = torch.tensor([full])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
    return logps[len(prompt) - 1 :].sum().item()


def test_runs_through_honelm_main_once_registered(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from honelm.cli import main as cli_main

    monkeypatch.setitem(cli_main.COMMANDS, "kto", ("honelm.cli.kto", "KTO: train on unpaired preference data."))
    with pytest.raises(SystemExit) as exit_info:
        cli_main.main(["kto", "--help"])
    assert exit_info.value.code == 0
    assert "  --desirable_weight " in capsys.readouterr().out


def test_num_processes_relaunches_the_kto_command(tiny_model_dir: Path, kto_file: Path) -> None:
    parser = argparse.ArgumentParser(prog="honelm kto")
    kto.add_arguments(parser)
    args = parser.parse_args(["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(kto_file),
                              "--num_processes", "2", "--beta", "0.3"])
    command = kto._configure(args)
    assert isinstance(command, list)
    assert command[command.index("--num_processes") + 1] == "2"
    tail = command[command.index("honelm.cli"):]
    assert tail[:2] == ["honelm.cli", "kto"] and "--beta" in tail and "0.3" in tail and "--num_processes" not in tail
