"""Two CPU processes (gloo) compute the same advantages, metrics and update as one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import rloo_distributed_worker as worker

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path: Path) -> None:
    one = tmp_path / "one.json"
    worker.main(str(one), worker.GLOBAL_BATCH, str(tmp_path / "out1"))
    two = tmp_path / "two.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)])}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()),
         str(HERE / "rloo_distributed_worker.py"), str(two), str(worker.GLOBAL_BATCH // 2), str(tmp_path / "out2")],
        check=False, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    single, double = json.loads(one.read_text()), json.loads(two.read_text())
    assert single["processes"] == 1 and double["processes"] == 2

    assert len(single["advantages"]) == len(double["advantages"]) == 2
    for a, b in zip(single["advantages"], double["advantages"]):
        assert a == pytest.approx(b, abs=1e-5)
    assert any(abs(x) > 0.1 for x in single["advantages"][1])  # not a trivial all-zero round
    for log_one, log_two in zip(single["logs"], double["logs"], strict=True):
        for key in ("loss", "reward", "reward_std", "kl", "entropy", "completions/mean_length", "num_tokens"):
            assert log_one[key] == pytest.approx(log_two[key], rel=1e-4, abs=1e-6), key
    assert single["logs"][1]["kl"] != 0.0  # the second round's KL (gathered) entered the advantages
    assert single["params"] == pytest.approx(double["params"], abs=1e-5)
