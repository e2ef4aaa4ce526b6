"""examples/grpo.py runs offline as documented (a shortened run): the reward rises and the sampled
answers to the training questions get better."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_grpo_example_learns_and_saves(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "grpo.py"), "--warm_start_steps", "100", "--max_steps", "40",
         "--output_dir", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT),
             "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rewards = [float(x) for x in re.search(r"reward every 10 steps: \[(.*)\]", result.stdout).group(1).split(",")]
    assert len(rewards) == 4 and rewards[-1] > rewards[0] + 0.05, rewards
    before, after = map(int, re.search(r"training questions, sampled answers correct: (\d+)% before GRPO, (\d+)% after",
                                       result.stdout).groups())
    assert after > before + 5, result.stdout
    assert (out / "model.safetensors").exists() and "- grpo" in (out / "README.md").read_text()
