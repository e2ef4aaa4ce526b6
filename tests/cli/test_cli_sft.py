"""`honelm sft` and the `honelm` entry point, run on a tiny local model and local data."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from honelm.cli.main import main
from honelm.cli.sft import default_output_dir

_REPO = Path(__file__).resolve().parents[2]


def _yaml(path: Path, options: dict[str, Any]) -> Path:
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in options.items()))
    return path


def _base_options(model_dir: Path, data: Path, output_dir: Path) -> dict[str, Any]:
    return {
        "model_name_or_path": str(model_dir), "dataset_name": str(data), "output_dir": str(output_dir),
        "max_steps": 50, "per_device_train_batch_size": 4, "learning_rate": 5e-3, "lr_scheduler_type": "constant",
        "logging_steps": 1, "save_strategy": "steps", "save_steps": 3, "report_to": "none", "use_cpu": True,
        "max_length": 32, "seed": 0,
    }


def _trainer_state(output_dir: Path, step: int) -> dict[str, Any]:
    return json.loads((output_dir / f"checkpoint-{step}" / "trainer_state.json").read_text())


def _text_loss(model_dir: Path, texts: list[str]) -> float:
    """Mean next-token loss of the model saved in ``model_dir`` on ``texts`` (one padded batch)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = tokenizer([t + tokenizer.eos_token for t in texts], return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)  # (B, T)
    with torch.no_grad():
        return model(**batch, labels=labels).loss.item()


@pytest.fixture
def train_file(tmp_path: Path, write_jsonl: Callable[..., Path], text_rows: Callable[..., list]) -> Path:
    return write_jsonl(tmp_path / "data" / "train.jsonl", text_rows(16))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


# ---- help and entry points ---------------------------------------------------------------------


def test_honelm_help_lists_sft(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    assert "sft" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "sft" in out and "Supervised fine-tuning" in out


def test_sft_help_lists_key_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["sft", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--config", "--model_name_or_path", "--dataset_name", "--use_peft", "--num_processes",
                   "--max_length", "--packing", "--loss_type", "--learning_rate", "--output_dir", "--eval_strategy"):
        assert f"  {option} " in out, option
    assert out.index("SFT: Data preprocessing:") < out.index("Training options (transformers.TrainingArguments):")


def test_honelm_help_does_not_import_torch() -> None:
    code = (
        "import sys, contextlib, io\n"
        "from honelm.cli.main import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
        "assert 'torch' not in sys.modules, 'honelm --help imported torch'\n"
        "assert 'transformers' not in sys.modules, 'honelm --help imported transformers'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_default_output_dir_matches_the_trainer() -> None:
    assert default_output_dir("Qwen/Qwen2.5-0.5B") == "Qwen2.5-0.5B-SFT"
    assert default_output_dir("/models/tiny/") == "tiny-SFT"


# ---- errors before any training ----------------------------------------------------------------


def test_errors_are_reported_without_a_traceback(tmp_path: Path, tiny_model_dir: Path, train_file: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sft", "--dataset_name", str(train_file)]) == 2
    assert "--model_name_or_path is required" in capsys.readouterr().err

    cfg = _yaml(tmp_path / "cfg.yaml", {"model_name_or_path": str(tiny_model_dir), "learning_rat": 1e-3})
    assert main(["sft", "--config", str(cfg), "--dataset_name", str(train_file)]) == 2
    assert "unknown option `learning_rat`. Did you mean `learning_rate`?" in capsys.readouterr().err

    argv = ["sft", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(train_file),
            "--output_dir", str(tmp_path / "out"), "--use_cpu", "--eval_strategy", "steps", "--eval_steps", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "eval_strategy='steps' needs an evaluation split" in err and "its splits: 'train'" in err
    assert not (tmp_path / "out").exists()

    assert main(argv[:5] + ["--dataset_train_split", "dev"]) == 2
    assert "has no split 'dev'; its splits are: 'train'" in capsys.readouterr().err


# ---- training ----------------------------------------------------------------------------------


def test_sft_from_yaml_trains_and_saves_a_reloadable_model(tmp_path: Path, tiny_model_dir: Path,
                                                           train_file: Path, text_rows: Callable[..., list],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    cfg = _yaml(tmp_path / "sft.yaml", _base_options(tiny_model_dir, train_file, out))
    assert main(["sft", "--config", str(cfg), "--max_steps", "3"]) == 0  # the flag beats `max_steps: 50`
    assert f"saved the model to {out}" in capsys.readouterr().out

    state = _trainer_state(out, 3)
    assert state["global_step"] == 3 and state["max_steps"] == 3
    assert [log["learning_rate"] for log in state["log_history"] if "loss" in log] == [5e-3] * 3  # from the YAML
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded) is type(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    texts = [r["text"] for r in text_rows(16)]
    assert _text_loss(out, texts) < _text_loss(tiny_model_dir, texts) - 0.5  # the saved model is the trained one


def test_sft_with_lora_and_eval_split_and_default_output_dir(tmp_path: Path, tiny_model_dir: Path,
                                                             write_jsonl: Callable[..., Path],
                                                             text_rows: Callable[..., list],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", text_rows(8))
    write_jsonl(data / "test.jsonl", text_rows(4, start=100))
    monkeypatch.chdir(tmp_path)
    options = _base_options(tiny_model_dir, data, tmp_path / "unused")
    del options["output_dir"]
    options.update({"max_steps": 3, "eval_strategy": "steps", "eval_steps": 3, "use_peft": True,
                    "lora_r": 4, "lora_target_modules": ["q_proj", "v_proj"]})
    cfg = _yaml(tmp_path / "lora.yaml", options)
    assert main(["sft", "--config", str(cfg)]) == 0

    out = tmp_path / default_output_dir(str(tiny_model_dir))
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    assert any("eval_loss" in log for log in _trainer_state(out, 3)["log_history"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sft_in_two_processes(tmp_path: Path, tiny_model_dir: Path, train_file: Path) -> None:
    """`--num_processes 2` re-runs `python -m honelm.cli sft` under accelerate (CPU, gloo)."""
    out = tmp_path / "out"
    cfg = _yaml(tmp_path / "sft.yaml", {**_base_options(tiny_model_dir, train_file, out), "max_steps": 3})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf-cache")}
    command = [sys.executable, "-m", "honelm.cli", "sft", "--config", str(cfg),
               "--num_processes", "2", "--main_process_port", str(_free_port())]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    # 16 rows, 4 per process: one process needs 4 steps per epoch, two processes need 2.
    state = _trainer_state(out, 3)
    assert state["global_step"] == 3 and state["epoch"] == pytest.approx(1.5)
    assert (out / "model.safetensors").is_file()
