"""`honelm demo` tells the whole story: SFT on imperfect demonstrations, then GRPO with a
verifiable reward raises the accuracy on held-out questions (shortened run, in process)."""

from __future__ import annotations

import argparse
import re

import pytest

from honelm.cli import demo


def _percent(text: str, pattern: str) -> tuple[float, float]:
    match = re.search(pattern + r"\D*(\d+)% (?:before GRPO )?-> (\d+)%", text)
    assert match, (pattern, text)
    return int(match.group(1)) / 100, int(match.group(2)) / 100


def test_demo_grpo_raises_held_out_accuracy(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--output_dir", str(tmp_path / "demo"), "--max_steps", "150", "--grpo_steps", "100"])
    assert demo.run(args) == 0
    out = capsys.readouterr().out
    rewards = [float(r) for r in re.findall(r"step +\d+  reward (\d\.\d\d)", out)]
    assert len(rewards) == 10 and sum(rewards[-3:]) / 3 > rewards[0] + 0.15, rewards
    held_before, held_after = _percent(out, "held-out questions \\(never trained on\\), greedy answers correct")
    refused_before, refused_after = _percent(out, "held-out questions answered \"I don't know.\"")
    train_before, train_after = _percent(out, "training questions, greedy answers correct")
    assert refused_before > 0.6 and refused_after < 0.1  # GRPO unlearned the refusals, on unseen questions too
    assert held_after >= held_before + 0.15 and held_after >= 0.25, out
    assert train_after >= train_before + 0.5, out
    assert (tmp_path / "demo" / "model.safetensors").is_file()
