"""The engine: rate-limited reports, resolution, escalation, silencing, thresholds, replays."""

from __future__ import annotations

import json

import pytest
from diag_streams import grpo_healthy, sft_healthy, with_values

from honelm.diagnostics import Diagnostician, Finding
from honelm.diagnostics.engine import stops

SFT = {"learning_rate": 1.0, "max_grad_norm": 1.0, "warmup_steps": 0}


def diverging(n_bad, n_good=0):
    """Loss falling for 4 logs, diverging for ``n_bad`` logs, then back down for ``n_good`` logs."""
    values = [8.0, 7.0, 6.0, 5.0] + [40.0] * n_bad + [5.0] * n_good
    return with_values(sft_healthy(len(values), eval_every=0)[: len(values)], "loss", values)


def statuses(events):
    return [(e.status, e.step, e.count) for e in events]


def test_a_persisting_problem_is_repeated_at_growing_intervals_then_resolved():
    engine = Diagnostician(SFT)
    events = engine.observe_all(diverging(n_bad=20, n_good=5))
    diverge = [e for e in events if e.code == "LOSS_DIVERGING"]
    # Detected at step 6 (2 of the last 3 losses high), then at counts 2, 4, 8, 16; resolved after 3 clean checks.
    assert statuses(diverge) == [("new", 6, 1), ("ongoing", 7, 2), ("ongoing", 9, 4), ("ongoing", 13, 8),
                                 ("ongoing", 21, 16), ("resolved", 28, 20)]
    assert all(e.first_step == 6 for e in diverge)
    assert diverge[-1].evidence["last_seen_step"] == 25
    assert engine.active == {}


def test_a_problem_flickering_off_for_fewer_checks_than_resolve_after_stays_one_problem():
    values = [8.0, 7.0, 6.0, 5.0] + [40.0] * 3 + [5.0] * 2 + [40.0] * 3
    history = with_values(sft_healthy(len(values), eval_every=0)[: len(values)], "loss", values)
    events = [e for e in Diagnostician(SFT).observe_all(history) if e.code == "LOSS_DIVERGING"]
    assert [e.status for e in events] == ["new", "ongoing", "ongoing"]


def test_rising_severity_is_reported_at_once():
    history = with_values(grpo_healthy(8), "frac_reward_zero_std", [0.85, 0.85, 0.85, 1.0, 1.0, 1.0, 1.0, 1.0])
    events = [e for e in Diagnostician({}).observe_all(history) if e.code == "GRPO_ZERO_REWARD_STD"]
    # warning at step 2 (count 1), repeated at count 2; the error at step 5 (count 4) comes at once.
    assert [(e.status, e.severity, e.step) for e in events] == [
        ("new", "warning", 2), ("ongoing", "warning", 3), ("ongoing", "error", 5)]


def test_silenced_codes_are_never_reported():
    engine = Diagnostician(SFT, silence=["loss_diverging"])
    assert engine.observe_all(diverging(n_bad=10)) == []
    assert not [d for d in engine._detectors["train"] if d.codes == ("LOSS_DIVERGING",)]  # not even run


def test_thresholds_change_when_a_detector_fires():
    history = with_values(sft_healthy(30, eval_every=0), "grad_norm", [15.0], start=29)
    assert [e.code for e in Diagnostician({}).observe_all(history)] == ["GRAD_NORM_SPIKE"]
    assert Diagnostician({}, thresholds={"GRAD_NORM_SPIKE": 20}).observe_all(history) == []
    assert Diagnostician({}, thresholds={"GRAD_NORM_SPIKE": {"factor": 20.0}}).observe_all(history) == []
    assert Diagnostician({}, thresholds='{"GRAD_NORM_SPIKE": 20}').observe_all(history) == []


@pytest.mark.parametrize("overrides, message", [
    ({"GRAD_SPIKE": 3}, "unknown diagnostic code 'GRAD_SPIKE'. Did you mean 'GRAD_NORM_SPIKE'?"),
    ({"GRAD_NORM_SPIKE": {"factr": 3}}, "GRAD_NORM_SPIKE has no threshold 'factr'. Did you mean 'factor'?"),
    ({"GRAD_NORM_SPIKE": "high"}, "must be a number"),
    ({"LOSS_NOT_FINITE": 1}, "has no threshold to set"),
    ("{not json", "not a valid JSON object"),
])
def test_bad_thresholds_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("?", r"\?").replace(".", r"\.")):
        Diagnostician({}, thresholds=overrides)


def test_unknown_silenced_code_is_a_clear_error():
    with pytest.raises(ValueError, match="Did you mean 'LOSS_FLAT'"):
        Diagnostician({}, silence=["LOSS_FLATT"])


def test_preflight_findings_are_reported_once_and_never_resolve():
    engine = Diagnostician({})
    found = Finding("DATA_TRUNCATION", "many rows are cut", {"fraction": 0.3})
    [event] = engine.add_preflight([found, found])
    assert (event.step, event.status, event.area, event.severity) == (0, "new", "preflight", "warning")
    assert engine.observe_all(sft_healthy(50)) == []
    assert engine.active_counts()["warning"] == 1


def test_eval_detectors_run_on_eval_logs_only():
    engine = Diagnostician({})
    train_only = [d.__name__ for d in engine._detectors["train"]]
    eval_only = [d.__name__ for d in engine._detectors["eval"]]
    assert "eval_loss_rising" in eval_only and "eval_loss_rising" not in train_only
    assert "loss_diverging" in train_only and "loss_diverging" not in eval_only


def test_summary_entry_is_not_a_check():
    engine = Diagnostician(SFT)
    events = engine.observe_all(diverging(n_bad=3))
    assert engine.observe({"train_runtime": 1.0, "train_loss": 9.0, "step": 7}) == []
    assert [e.code for e in events] == ["LOSS_DIVERGING"] * 2


def test_replays_are_deterministic_and_events_round_trip_through_json():
    history = diverging(n_bad=12, n_good=4)
    first = [e.to_dict() for e in Diagnostician(SFT).observe_all(history)]
    second = [json.loads(e.to_json()) for e in Diagnostician(SFT).observe_all(json.loads(json.dumps(history)))]
    assert first and first == second


def test_stop_levels():
    event = Diagnostician(SFT).observe_all(diverging(n_bad=3))[0]
    assert event.severity == "critical"
    assert stops(event, "critical") and stops(event, "error") and not stops(event, None)
    warning = Diagnostician({}).add_preflight([Finding("DATA_TRUNCATION", "cut")])[0]
    assert not stops(warning, "error")


def test_reset_keeps_preflight_and_forgets_the_run():
    engine = Diagnostician(SFT)
    engine.add_preflight([Finding("DATA_TRUNCATION", "cut")])
    engine.observe_all(diverging(n_bad=3))
    engine.reset()
    assert [e.code for e in engine.events] == ["DATA_TRUNCATION"] and len(engine.history.train("loss")) == 0


def test_info_problems_are_reported_once():
    history = with_values(with_values(sft_healthy(30, eval_every=0, cuda=True), "memory/peak_gib", [20.0] * 30),
                          "memory/static_gib", [10.0] * 30)
    events = Diagnostician({"per_device_train_batch_size": 4}).observe_all(history)
    assert [(e.code, e.status, e.step) for e in events] == [("SYS_LOW_MEMORY_USE", "new", 3)]
