"""examples/rloo.py runs offline as documented (a short version): it warms up, trains, reports, saves."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def test_rloo_example_trains_reports_and_saves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["rloo.py", "--warmup_steps", "20", "--max_steps", "10", "--output_dir", str(out)])
    runpy.run_path(str(ROOT / "examples" / "rloo.py"), run_name="__main__")
    stdout = capsys.readouterr().out
    curve = re.findall(r"step +(\d+) +([\d.]+)", stdout)
    assert [int(step) for step, _ in curve] == [10] and 0.0 <= float(curve[0][1]) <= 1.0, stdout[-2000:]
    accuracy = re.findall(r"answers correct (before|after) RLOO: training questions (\d+)%, held-out questions (\d+)%",
                          stdout)
    assert [name for name, _, _ in accuracy] == ["before", "after"]
    assert (out / "model.safetensors").exists() and "RLOO" in (out / "README.md").read_text()
