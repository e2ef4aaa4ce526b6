"""The example scripts run as documented (short versions, offline)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(args, cwd):
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
        env={
            "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        },
    )


def test_sft_example_trains_and_saves(tmp_path):
    out = tmp_path / "out"
    result = _run([str(ROOT / "examples" / "sft.py"), "--max_steps", "50", "--output_dir", str(out)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "answers correct after training" in result.stdout
    assert (out / "model.safetensors").exists() and (out / "README.md").exists()
    losses = [float(line.split("'loss': '")[1].split("'")[0]) for line in result.stdout.splitlines() if "'loss':" in line]
    assert len(losses) >= 2 and losses[-1] < losses[0]


def test_demo_command_learns(tmp_path):
    result = _run(["-m", "honelm.cli", "demo", "--max_steps", "60", "--log_every", "20",
                   "--output_dir", str(tmp_path / "demo")], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    before = float(out.split("before training: loss ")[1].split(",")[0])
    after = float(out.split("after training:  loss ")[1].split(",")[0])
    assert after < 0.5 * before, out
    assert "sample answers" in out and "model saved to" in out


def test_dpo_example_learns_the_held_out_preference(tmp_path):
    out = tmp_path / "out"
    result = _run([str(ROOT / "examples" / "dpo.py"), "--max_steps", "40", "--output_dir", str(out)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("held-out pairs after training:"))
    accuracy = float(line.split("reward accuracy")[1].split("%")[0])
    assert accuracy >= 75, result.stdout
    assert (out / "model.safetensors").exists()
