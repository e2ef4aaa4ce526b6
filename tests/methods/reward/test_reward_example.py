"""examples/reward.py runs offline as documented (a short version)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import honelm

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.skipif("RewardTrainer" not in honelm.__all__, reason="RewardTrainer is not exported from honelm yet")
def test_reward_example_learns_and_scores(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "reward.py"), "--max_steps", "40", "--output_dir", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT),
             "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    before = float(result.stdout.split("held-out accuracy before training: ")[1].split("%")[0])
    after = float(result.stdout.split("held-out accuracy after training: ")[1].split("%")[0])
    assert before <= 70 and after >= 95, result.stdout
    rewards = [float(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("reward ")]
    assert len(rewards) == 2 and rewards[0] > rewards[1]  # "great" beats "bad"
    assert (out / "model.safetensors").exists() and (out / "README.md").exists()
