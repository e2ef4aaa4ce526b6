"""Two CPU processes (gloo) train exactly as one: a prompt's group split between the processes
gets the same advantages, and the loss, metrics and parameter updates are the same."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

_WORKER = Path(__file__).with_name("grpo_distributed_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    sys.path.insert(0, str(_WORKER.parent))
    from grpo_distributed_worker import run

    run(str(tmp_path / "one.json"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(_WORKER), str(tmp_path / "two.json")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert (one["world"], two["world"]) == (1, 2)

    assert len(one["advantages"]) == len(two["advantages"]) == 2  # two generation rounds of 6 completions
    for a, b in zip(one["advantages"], two["advantages"]):
        assert len(a) == 6 and a == pytest.approx(b, abs=1e-6)
        assert abs(a[2]) > 0.5 and a[2] == pytest.approx(-a[3], abs=1e-4)  # the group split across ranks 0 and 1
    assert len(one["logs"]) == 2
    for a, b in zip(one["logs"], two["logs"]):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    assert one["logs"][1]["kl"] > 0.01  # the second step is trained after an update: the check is not vacuous
    for name, (total, squares) in one["params"].items():
        assert two["params"][name][0] == pytest.approx(total, rel=1e-5, abs=1e-4), name
        assert two["params"][name][1] == pytest.approx(squares, rel=1e-5, abs=1e-4), name
