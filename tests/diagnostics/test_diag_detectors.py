"""Every runtime detector fires on a stream showing its failure and stays silent on healthy ones."""

from __future__ import annotations

import dataclasses
import math

import pytest
from diag_streams import (
    HEALTHY,
    dpo_healthy,
    grpo_healthy,
    reward_healthy,
    sft_healthy,
    train_entries,
    with_evals,
    with_values,
)

from honelm.diagnostics import CODES, Diagnostician
from honelm.diagnostics.detectors import RUNTIME_DETECTORS
from honelm.diagnostics.history import ConfigView

# Configs as TRL users have them (only the fields the detectors read or suggest).
SFT = {"learning_rate": 2e-5, "max_grad_norm": 1.0, "warmup_steps": 0, "max_steps": 200, "num_train_epochs": 3.0,
       "per_device_train_batch_size": 4, "gradient_accumulation_steps": 8, "fp16": False, "bf16": True,
       "load_best_model_at_end": False, "dataloader_num_workers": 0, "dataloader_persistent_workers": False,
       "gradient_checkpointing": False}
DPO = {**SFT, "learning_rate": 5e-7, "beta": 0.1, "rpo_alpha": None, "label_smoothing": 0.0, "max_steps": 100}
REWARD = {**SFT, "center_rewards_coefficient": None}
GRPO = {**SFT, "learning_rate": 1e-6, "beta": 0.04, "num_generations": 8, "temperature": 1.0,
        "max_completion_length": 256, "mask_truncated_completions": False, "loss_type": "dapo", "num_iterations": 1,
        "use_vllm": False, "generation_batch_size": 32, "vllm_importance_sampling_correction": False}


def run(history, config=None, model=None, **kwargs):
    engine = Diagnostician({} if config is None else config, model=model, **kwargs)
    return engine.observe_all(history)


def first(events, code):
    found = [e for e in events if e.code == code and e.status == "new"]
    assert found, f"{code} did not fire; got {[(e.code, e.status, e.step) for e in events]}"
    return found[0]


def proposals(event):
    return {s.param: (s.current, s.proposed) for s in event.suggestions}


def _entropy_ramp(start, end, n=20):
    return [start + (end - start) * i / (n - 1) for i in range(n)]


EVALS = {60 + 10 * i: v for i, v in enumerate([2.0, 1.5, 1.2, 1.3, 1.4, 1.5])}  # best at step 80, then rising

# code -> (failing history, config, model facts, expected suggestions {param: (current, proposed)})
FAILURES = {
    "LOSS_NOT_FINITE": (with_values(sft_healthy(30), "loss", [math.nan], start=29), SFT, None,
                        {"learning_rate": (2e-5, 2e-6)}),
    "GRAD_NORM_NOT_FINITE": (with_values(sft_healthy(30), "grad_norm", [math.inf], start=29),
                             {**SFT, "max_grad_norm": 0.0}, None,
                             {"learning_rate": (2e-5, 2e-6), "max_grad_norm": (0.0, 1.0)}),
    "GRAD_NORM_SPIKE": (with_values(sft_healthy(30, eval_every=0), "grad_norm", [50.0], start=29),
                        {**SFT, "max_grad_norm": 0.0}, None,
                        {"max_grad_norm": (0.0, 1.0), "learning_rate": (2e-5, 1e-5)}),
    "LOSS_DIVERGING": (with_values(sft_healthy(10, eval_every=0), "loss", [8, 7, 6, 5, 5, 20, 40, 80]),
                       {**SFT, "learning_rate": 1.0}, None, {"learning_rate": (1.0, 0.1), "warmup_steps": (0, 0.05)}),
    "LOSS_FLAT": (with_values(sft_healthy(30, eval_every=0), "loss", [2.5 + 0.01 * (i % 3) for i in range(30)]),
                  SFT, None, {"learning_rate": (2e-5, 2e-4)}),
    "EVAL_LOSS_RISING": (with_evals(sft_healthy(110, eval_every=0), EVALS), SFT, None,
                         {"load_best_model_at_end": (False, True), "max_steps": (200, 80)}),
    "MOE_ROUTER_IMBALANCE": (with_values(sft_healthy(10, eval_every=0), "aux_loss", [4.0] * 10),
                             {**SFT, "router_aux_loss_coef": 0.001}, {"num_experts_per_tok": 2},
                             {"router_aux_loss_coef": (0.001, 0.002)}),
    "PREF_LIKELIHOOD_DISPLACEMENT": (
        with_values(with_values(dpo_healthy(20), "logps/chosen", [-120 - 2 * i for i in range(20)]),
                    "logps/rejected", [-130 - 4 * i for i in range(20)]),
        DPO, None, {"rpo_alpha": (None, 1.0), "beta": (0.1, 0.2)}),
    "PREF_ACCURACY_SATURATED": (
        with_values(with_values(dpo_healthy(10), "rewards/accuracies", [1.0] * 10), "loss", [0.001] * 10),
        DPO, None, {"label_smoothing": (0.0, 0.1), "learning_rate": (5e-7, 2.5e-7)}),
    "PREF_NO_SIGNAL": (with_values(dpo_healthy(20), "rewards/accuracies", [0.5 + 0.02 * (-1) ** i for i in range(20)]),
                       DPO, None, {"learning_rate": (5e-7, 2.5e-6)}),
    "PREF_ACCURACY_BELOW_CHANCE": (
        with_values(with_values(reward_healthy(20), "accuracy", [0.25] * 20), "margin", [-0.5] * 20),
        REWARD, None, {}),
    "REWARD_SCALE_DRIFT": (with_values(reward_healthy(10), "mean_reward", [8.0] * 10), REWARD, None,
                           {"center_rewards_coefficient": (None, 0.01)}),
    "GRPO_ZERO_REWARD_STD": (with_values(grpo_healthy(5), "frac_reward_zero_std", [1.0] * 5), GRPO, None,
                             {"num_generations": (8, 16), "temperature": (1.0, 1.3)}),
    "GRPO_REWARD_FN_CONSTANT": (
        with_values(with_values(grpo_healthy(5), "rewards/format_reward/std", [0.0] * 5),
                    "rewards/format_reward/mean", [0.0] * 5), GRPO, None, {}),
    "GRPO_COMPLETIONS_TRUNCATED": (with_values(grpo_healthy(5), "completions/clipped_ratio", [0.4] * 5), GRPO, None,
                                   {"max_completion_length": (256, 512), "mask_truncated_completions": (False, True)}),
    "GRPO_LENGTH_HACKING": (
        with_values(with_values(grpo_healthy(20), "completions/mean_length", [100 + 10 * i for i in range(20)]),
                    "reward", [0.2 + 0.03 * i for i in range(20)]), GRPO, None, {"loss_type": ("dapo", "dr_grpo")}),
    "GRPO_ENTROPY_COLLAPSE": (with_values(grpo_healthy(20), "entropy", _entropy_ramp(0.7, 0.02)), GRPO, None,
                              {"temperature": (1.0, 1.3), "learning_rate": (1e-6, 5e-7)}),
    "GRPO_ENTROPY_BLOWUP": (with_values(grpo_healthy(20), "entropy", _entropy_ramp(0.7, 3.0)), GRPO, None,
                            {"learning_rate": (1e-6, 5e-7), "beta": (0.04, 0.08)}),
    "GRPO_KL_EXPLOSION": (with_values(grpo_healthy(10), "kl", [2.0] * 3, start=7), GRPO, None,
                          {"learning_rate": (1e-6, 5e-7), "beta": (0.04, 0.08)}),
    "GRPO_CLIP_RATIO_HIGH": (with_values(grpo_healthy(20), "clip_ratio/region_mean", [0.2, 0.01] * 10), GRPO, None,
                             {"learning_rate": (1e-6, 5e-7)}),
    "GRPO_LOGPS_MISMATCH": (with_values(grpo_healthy(5), "sampling/sampling_logp_difference/mean", [0.3] * 5),
                            GRPO, None, {"vllm_importance_sampling_correction": (False, True)}),
    "SYS_LOW_MEMORY_USE": (
        with_values(with_values(sft_healthy(5, eval_every=0, cuda=True), "memory/peak_gib", [20.0] * 5),
                    "memory/static_gib", [10.0] * 5),
        SFT, None, {"per_device_train_batch_size": (4, 16), "gradient_accumulation_steps": (8, 2)}),
    "SYS_OOM_RISK": (with_values(sft_healthy(5, eval_every=0, cuda=True), "memory/peak_gib", [78.0] * 5), SFT, None,
                     {"gradient_checkpointing": (False, True), "per_device_train_batch_size": (4, 2),
                      "gradient_accumulation_steps": (8, 16)}),
    "SYS_DATALOADER_BOUND": (with_values(sft_healthy(6, eval_every=0), "timing/data", [0.2] * 6), SFT, None,
                             {"dataloader_num_workers": (0, 4)}),
    "SYS_GENERATION_BOUND": (with_values(grpo_healthy(5), "timing/generation", [9.0] * 5), GRPO, None,
                             {"use_vllm": (False, True), "generation_batch_size": (32, 64)}),
    "SYS_SLOW_REWARD": (with_values(grpo_healthy(5), "timing/reward", [4.0] * 5), GRPO, None, {}),
}


def test_every_runtime_code_has_a_failing_stream():
    runtime_codes = {code for detect in RUNTIME_DETECTORS for code in detect.codes}
    assert runtime_codes == set(FAILURES)
    assert runtime_codes == {c for c, info in CODES.items() if info.area != "preflight"}


@pytest.mark.parametrize("code", sorted(FAILURES))
def test_detector_fires_on_its_failure_with_applicable_suggestions(code):
    history, config, model, expected = FAILURES[code]
    event = first(run(history, config, model), code)
    assert event.severity == CODES[code].severity
    assert event.docs == f"docs/diagnostics.md#{code.lower()}" and event.area == CODES[code].area
    assert event.message and event.evidence
    assert proposals(event) == expected
    for suggestion in event.suggestions:  # suggestions only name fields the config has
        assert suggestion.param in config and suggestion.current == config[suggestion.param]


@pytest.mark.parametrize("name", sorted(HEALTHY))
@pytest.mark.parametrize("config", [None, SFT, DPO, GRPO], ids=["unknown", "sft", "dpo", "grpo"])
def test_healthy_streams_raise_nothing(name, config):
    assert run(HEALTHY[name](), config, {"num_experts_per_tok": 2}) == []


def test_healthy_streams_with_other_seeds_raise_nothing():
    for seed in range(1, 6):
        for stream in (sft_healthy, dpo_healthy, reward_healthy, grpo_healthy):
            assert run(stream(seed=seed), SFT) == [], (stream.__name__, seed)


def test_suggestions_name_real_sft_config_fields(tmp_path):
    from honelm.methods.sft import SFTConfig

    config = SFTConfig(output_dir=str(tmp_path), use_cpu=True, learning_rate=1.0, max_grad_norm=0.0,
                       per_device_train_batch_size=4, gradient_accumulation_steps=8)
    view = ConfigView(config)
    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    seen = 0
    for code, (history, _, model, _) in FAILURES.items():
        for event in run(history, view, model):
            for suggestion in event.suggestions:
                seen += 1
                assert suggestion.param in fields, (code, suggestion)
                assert suggestion.current == view[suggestion.param], (code, suggestion)
                assert suggestion.proposed != suggestion.current
    assert seen >= 10


def test_unknown_config_gives_fixed_proposals_without_current_values():
    history, _, _, _ = FAILURES["GRPO_COMPLETIONS_TRUNCATED"]
    event = first(run(history), "GRPO_COMPLETIONS_TRUNCATED")
    assert proposals(event) == {}  # "x2 of the current value" needs the current value
    history, _, _, _ = FAILURES["EVAL_LOSS_RISING"]
    event = first(run(history), "EVAL_LOSS_RISING")  # best eval at step 80 = epoch 0.8
    assert proposals(event) == {"load_best_model_at_end": (None, True), "num_train_epochs": (None, 0.8)}


def test_grad_norm_not_finite_tolerates_fp16_loss_scaling():
    history = with_values(sft_healthy(30, eval_every=0), "grad_norm", [math.inf, 1.0, math.inf, math.inf], start=26)
    fp16 = {**SFT, "fp16": True, "bf16": False}
    assert not [e for e in run(history[:28], fp16) if e.code == "GRAD_NORM_NOT_FINITE"]  # isolated overflows
    assert not [e for e in run(history, fp16) if e.code == "GRAD_NORM_NOT_FINITE"]  # 2 in a row
    history = with_values(history, "grad_norm", [math.inf], start=29)[:30]
    history[27]["grad_norm"] = math.inf
    event = first(run(history, fp16), "GRAD_NORM_NOT_FINITE")
    assert proposals(event)["bf16"] == (False, True)


def test_grad_norm_growing_steadily_is_not_a_spike():
    norms = [0.001 * 2**i for i in range(15)]  # doubles every step: 16000x overall, never 10x at once
    assert run(with_values(sft_healthy(15, eval_every=0), "grad_norm", norms)) == []


def test_loss_diverging_ignores_a_single_spike_and_small_absolute_rises():
    spike = with_values(sft_healthy(10, eval_every=0), "loss", [3, 2.5, 2, 1.8, 1.7, 30, 1.6, 1.5, 1.5, 1.4])
    assert not [e for e in run(spike) if e.code == "LOSS_DIVERGING"]
    losses = [0.5, 0.2, 0.05, 0.04, 0.15, 0.2, 0.18, 0.2, 0.19, 0.2]
    converged = with_values(sft_healthy(10, eval_every=0), "loss", losses)
    assert not [e for e in run(converged) if e.code == "LOSS_DIVERGING"]  # 4x, but only +0.16 nats


def test_loss_flat_during_a_long_warmup_suggests_a_shorter_warmup():
    history = with_values(sft_healthy(30, eval_every=0), "loss", [2.5] * 30)
    history = with_values(history, "learning_rate", [2e-7 * (i + 1) for i in range(30)])
    event = first(run(history, {**SFT, "warmup_steps": 1000}), "LOSS_FLAT")
    assert proposals(event) == {"warmup_steps": (1000, 250)}
    event = first(run(history, {**SFT, "warmup_steps": 0.5}), "LOSS_FLAT")
    assert proposals(event) == {"warmup_steps": (0.5, 0.12)}


def test_eval_loss_rising_needs_the_train_loss_to_fall():
    history = with_evals(with_values(sft_healthy(110, eval_every=0), "loss", [2.0] * 110), EVALS)
    assert not [e for e in run(history) if e.code == "EVAL_LOSS_RISING"]


def test_preference_accuracy_checks_read_eval_metrics_too():
    history = dpo_healthy(20)
    history += [{"eval_rewards/accuracies": 0.2, "eval_rewards/margins": -1.0, "eval_loss": 0.9, "step": 20}] * 10
    event = first(run(history, DPO), "PREF_ACCURACY_BELOW_CHANCE")
    assert event.subject == "eval" and event.evidence["metric"] == "eval_rewards/accuracies"


def test_dpo_ties_at_the_start_are_not_below_chance():
    # At step 1 policy == reference: every pair ties and accuracy is 0; it then rises.
    accuracies = [0.0, 0.3] + [0.6 + 0.01 * i for i in range(18)]
    assert run(with_values(dpo_healthy(20), "rewards/accuracies", accuracies), DPO) == []


def test_zero_reward_std_warns_below_the_error_fraction_and_reads_reward_std_alone():
    warning = first(run(with_values(grpo_healthy(5), "frac_reward_zero_std", [0.85] * 5), GRPO), "GRPO_ZERO_REWARD_STD")
    assert warning.severity == "warning"
    bare = [{k: v for k, v in e.items() if k != "frac_reward_zero_std"} for e in grpo_healthy(5)]
    event = first(run(with_values(bare, "reward_std", [0.0] * 5), GRPO), "GRPO_ZERO_REWARD_STD")
    assert event.severity == "error" and event.evidence["metric"] == "reward_std"


def test_constant_reward_function_is_named():
    history, _, _, _ = FAILURES["GRPO_REWARD_FN_CONSTANT"]
    events = [e for e in run(history, GRPO) if e.code == "GRPO_REWARD_FN_CONSTANT" and e.status == "new"]
    assert [e.subject for e in events] == ["format_reward"]
    assert "'format_reward'" in events[0].message


def test_low_memory_use_reports_the_batch_that_would_fit():
    history, config, _, _ = FAILURES["SYS_LOW_MEMORY_USE"]
    event = first(run(history, config), "SYS_LOW_MEMORY_USE")
    assert "25%" in event.message and "from 4 to 16" in event.message
    # static 10 GiB + 2.5 GiB per row: 16 rows take 50 GiB <= 80% of 80 GiB, 32 rows would take 90.
    assert event.evidence["utilization"] == 0.25


def test_memory_and_timing_detectors_stay_silent_without_their_metrics():
    cpu = train_entries(sft_healthy(30, eval_every=0))
    codes = {e.code for e in run(with_values(cpu, "timing/data", [0.001] * 30), SFT)}
    assert not codes & {"SYS_LOW_MEMORY_USE", "SYS_OOM_RISK", "SYS_DATALOADER_BOUND"}


def test_online_rl_detectors_ignore_other_methods_metrics():
    # SFT logs entropy and KTO logs kl: neither is an online-RL signal.
    history = with_values(with_values(sft_healthy(20, eval_every=0), "entropy", _entropy_ramp(3.0, 0.01)), "kl",
                          [5.0] * 20)
    assert run(history, SFT) == []
