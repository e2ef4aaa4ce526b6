"""`honelm plot`: a PNG of the run's curves with the diagnostics marked."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from honelm.cli import plot


def _plot(argv: list[str]) -> int:
    from honelm.cli.main import COMMANDS, main

    if "plot" in COMMANDS:
        return main(["plot", *argv])
    parser = argparse.ArgumentParser(prog="honelm plot")
    plot.add_arguments(parser)
    return plot.run(parser.parse_args(argv))


def _grpo_run(folder: Path, steps: int = 40) -> Path:
    """A GRPO run whose reward stops varying at step 15 (every group gets the same reward)."""
    history = []
    for step in range(1, steps + 1):
        dead = step >= 15
        history.append({
            "loss": 0.0 if dead else 0.01 * (-1) ** step, "grad_norm": 0.0 if dead else 0.3, "learning_rate": 1e-6,
            "reward": 1.0 if dead else 0.2 + 0.02 * step, "reward_std": 0.0 if dead else 0.35,
            "frac_reward_zero_std": 1.0 if dead else 0.3, "kl": 0.002 * step, "entropy": 0.8 - 0.005 * step,
            "completions/mean_length": 120 + step, "completions/clipped_ratio": 0.02,
            "clip_ratio/region_mean": 0.001, "step": step,
        })
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": steps, "max_steps": steps,
                                                           "log_history": history}))
    return folder


def test_plot_writes_a_png_with_the_diagnostics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    run = _grpo_run(tmp_path / "grpo-run")
    assert _plot([str(run)]) == 0
    image = run / "diagnostics.png"
    assert f"wrote {image}" in capsys.readouterr().out
    data = image.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 1000 and height > 500
    assert _plot([str(run), "-o", str(tmp_path / "out" / "curves.png"), "--dpi", "60"]) == 0
    assert (tmp_path / "out" / "curves.png").stat().st_size < len(data)


def test_plot_marks_where_problems_fired(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from honelm.diagnostics.doctor import load_run, replay
    from honelm.diagnostics.plotting import _spans

    run = load_run(str(_grpo_run(tmp_path / "grpo-run")))
    spans = _spans(replay(run).events, 40)
    assert [(e.code, e.first_step, end) for e, end in spans] == [("GRPO_ZERO_REWARD_STD", 16, 40)]


def test_missing_matplotlib_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    assert _plot([str(_grpo_run(tmp_path / "run"))]) == 2
    assert "pip install 'honelm[plot]'" in capsys.readouterr().err


def test_plot_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _plot([str(tmp_path / "nothing")]) == 2
    assert "no such directory" in capsys.readouterr().err
