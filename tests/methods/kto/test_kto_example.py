"""examples/kto.py runs offline as documented and its model learns the held-out preference."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_kto_example_trains_saves_and_improves_held_out_rewards(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "kto.py"), "--max_steps", "30", "--output_dir", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT),
             "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_DATASETS_CACHE": str(tmp_path / "cache")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = dict(re.findall(r"held-out (before|after) training: reward margin (-?[\d.]+)", result.stdout))
    accuracy = dict(re.findall(r"held-out (before|after) training: .* reward accuracy (\d+)%", result.stdout))
    assert float(found["before"]) == 0.0 and float(found["after"]) > 0.5, result.stdout[-2000:]
    assert int(accuracy["after"]) >= 80 and int(accuracy["after"]) > int(accuracy["before"])
    assert (out / "model.safetensors").exists() and "KTO" in (out / "README.md").read_text()
