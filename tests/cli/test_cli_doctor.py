"""`honelm doctor`: replays the diagnostics over saved runs, from honelm or from other libraries."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from honelm.cli import doctor


def _doctor(argv: list[str]) -> int:
    from honelm.cli.main import COMMANDS, main

    if "doctor" in COMMANDS:
        return main(["doctor", *argv])
    parser = argparse.ArgumentParser(prog="honelm doctor")
    doctor.add_arguments(parser)
    return doctor.run(parser.parse_args(argv))


def _trl_dpo_run(folder: Path, *, swapped: bool, steps: int = 30) -> Path:
    """A trainer_state.json as TRL's DPOTrainer writes it (no honelm files)."""
    history = []
    for step in range(1, steps + 1):
        accuracy = 0.2 if swapped else min(0.5 + step / 40, 0.9)
        history.append({"loss": 0.69 - 0.01 * step, "grad_norm": 5.0, "learning_rate": 5e-7, "rewards/chosen": 0.01,
                        "rewards/rejected": 0.02, "rewards/accuracies": accuracy,
                        "rewards/margins": -0.1 if swapped else 0.2, "logps/chosen": -100.0,
                        "logps/rejected": -110.0, "epoch": step / steps, "step": step})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": steps, "max_steps": steps,
                                                           "log_history": history}))
    return folder


def test_report_on_a_run_made_with_another_library(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _trl_dpo_run(tmp_path / "trl-run", swapped=True)
    assert _doctor([str(run)]) == 0
    out = capsys.readouterr().out
    assert "method: dpo" in out and "config: unknown" in out and "Active problems (1):" in out
    assert "[ERROR] PREF_ACCURACY_BELOW_CHANCE since step 10" in out and "columns are likely swapped" in out
    assert "docs: docs/diagnostics.md#pref_accuracy_below_chance" in out


def test_json_report_and_exit_status_for_programs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _trl_dpo_run(tmp_path / "trl-run", swapped=True)
    assert _doctor([str(run), "--json", "--fail_on", "error"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["schema_version"] == 1 and report["method"] == "dpo" and report["config_known"] is False
    assert [e["code"] for e in report["active"]] == ["PREF_ACCURACY_BELOW_CHANCE"]
    assert report["events"][0]["status"] == "new" and report["events"][0]["step"] == 10
    assert _doctor([str(run), "--json", "--fail_on", "critical"]) == 0
    capsys.readouterr()
    assert _doctor([str(run), "--silence", "PREF_ACCURACY_BELOW_CHANCE", "--fail_on", "warning"]) == 0
    assert "No problems found." in capsys.readouterr().out


def test_healthy_run_reports_no_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _doctor([str(_trl_dpo_run(tmp_path / "ok", swapped=False)), "--fail_on", "warning"]) == 0
    assert "No problems found." in capsys.readouterr().out


def test_thresholds_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _trl_dpo_run(tmp_path / "trl-run", swapped=True)
    assert _doctor([str(run), "--thresholds", '{"PREF_ACCURACY_BELOW_CHANCE": 0.1}', "--fail_on", "error"]) == 0
    assert _doctor([str(run), "--thresholds", '{"PREF_ACCURACY": 0.1}']) == 2
    assert "unknown diagnostic code 'PREF_ACCURACY'" in capsys.readouterr().err


def test_the_newest_checkpoint_of_a_running_run_is_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "running"
    _trl_dpo_run(run / "checkpoint-5", swapped=True, steps=5)  # too early to tell
    assert _doctor([str(run)]) == 0
    assert "No problems found." in capsys.readouterr().out
    _trl_dpo_run(run / "checkpoint-30", swapped=True, steps=30)
    assert _doctor([str(run)]) == 0
    out = capsys.readouterr().out
    assert "checkpoint-30/trainer_state.json" in out and "PREF_ACCURACY_BELOW_CHANCE" in out
    assert _doctor([str(run / "checkpoint-30")]) == 0  # a checkpoint folder works too
    assert "PREF_ACCURACY_BELOW_CHANCE" in capsys.readouterr().out


def test_errors_name_what_was_looked_for(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _doctor([str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert _doctor([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "holds no trainer_state.json" in err and "checkpoint-*" in err
