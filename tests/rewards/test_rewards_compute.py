"""compute_rewards / aggregate_rewards: calling conventions, None handling, errors that name the
function and sample, async concurrency, and both multi-objective aggregations by hand."""

from __future__ import annotations

import asyncio
import functools
import math
import statistics
import time

import pytest
import torch

from honelm.rewards import (
    RewardFunctionError,
    accuracy_reward,
    aggregate_rewards,
    compute_rewards,
    get_soft_overlong_punishment,
    reward_func_name,
)

PROMPTS = ["What is 1 + 1?", "What is 2 + 2?", "What is 3 + 3?", "Name a city."]
COMPLETIONS = ["2", "5", "6", "Paris"]
SOLUTIONS = ["2", "4", "6", "paris"]
IDS = [[1], [2, 3], [4, 5, 6], [7, 8, 9, 10]]


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def math_only(completions, solution, **kwargs):
    """Applies to arithmetic only: None for the rest."""
    return [None if s.isalpha() else float(c == s) for c, s in zip(completions, solution)]


# ------------------------------------------------------------------------------- calling


def test_functions_receive_prompts_completions_ids_and_columns():
    seen = {}

    def spy(prompts, completions, completion_ids, solution, difficulty, **kwargs):
        seen.update(
            prompts=prompts,
            completions=completions,
            ids=completion_ids,
            solution=solution,
            difficulty=difficulty,
            rest=kwargs,
        )
        return [0.0] * len(prompts)

    compute_rewards(spy, PROMPTS, COMPLETIONS, IDS, {"solution": SOLUTIONS, "difficulty": [1, 2, 3, 4]})
    assert seen["prompts"] == PROMPTS and seen["completions"] == COMPLETIONS and seen["ids"] == IDS
    assert seen["solution"] == SOLUTIONS and seen["difficulty"] == [1, 2, 3, 4] and seen["rest"] == {}
    compute_rewards(
        spy, PROMPTS, COMPLETIONS, IDS, {"solution": SOLUTIONS, "difficulty": [1] * 4}, trainer_state="state"
    )
    assert seen["rest"] == {"trainer_state": "state"}


def test_rewards_per_func_weights_and_metrics():
    punish = get_soft_overlong_punishment(max_completion_len=3, soft_punish_cache=2)
    out = compute_rewards(
        [accuracy_reward, math_only, punish],
        PROMPTS,
        COMPLETIONS,
        IDS,
        {"solution": SOLUTIONS},
        reward_weights=[1.0, 0.5, 2.0],
    )
    nan = math.nan
    expected = torch.tensor([[1, 1, 0], [0, 0, -0.5], [1, 1, -1], [1, nan, -1]])
    torch.testing.assert_close(out.rewards_per_func, expected, equal_nan=True)
    assert out.names == ["accuracy_reward", "math_only", "soft_overlong_punishment"]
    # sum_then_normalize: the weighted sum, a None left out of it.
    torch.testing.assert_close(out.rewards, torch.tensor([1.5, -1.0, -0.5, -1.0]))
    m = out.metrics()
    assert m["rewards/math_only/mean"] == pytest.approx(2 / 3)  # the None sample is excluded
    assert m["rewards/math_only/std"] == pytest.approx(statistics.stdev([1, 0, 1]))
    assert m["rewards/accuracy_reward/mean"] == pytest.approx(0.75)
    assert m["reward"] == pytest.approx((1.5 - 1.0 - 0.5 - 1.0) / 4)
    assert m["reward_std"] == pytest.approx(statistics.stdev([1.5, -1.0, -0.5, -1.0]))


def test_names_of_partials_objects_and_duplicates():
    class Scorer:
        def __call__(self, completions, **kwargs):
            return [1.0] * len(completions)

    part = functools.partial(length_reward)
    assert reward_func_name(part) == "length_reward" and reward_func_name(Scorer()) == "Scorer"
    out = compute_rewards([length_reward, length_reward, Scorer()], PROMPTS, COMPLETIONS)
    assert out.names == ["length_reward", "length_reward_2", "Scorer"]


def test_tensors_bools_and_ints_are_accepted():
    def as_tensor(completions, **kwargs):
        return torch.tensor([1, 2, 3, 4])

    def as_bools(completions, **kwargs):
        return [True, False, 1, torch.tensor(0.5)]

    out = compute_rewards([as_tensor, as_bools], PROMPTS, COMPLETIONS)
    assert out.rewards_per_func.tolist() == [[1.0, 1.0], [2.0, 0.0], [3.0, 1.0], [4.0, 0.5]]


# ------------------------------------------------------------------------------ None rows


def test_a_row_where_nothing_applies_warns_and_counts_as_zero():
    def never(completions, **kwargs):
        return [None, 1.0, None, 0.5]

    with pytest.warns(RuntimeWarning, match=r"2 sample\(s\): 0 \('What is 1 \+ 1\?'\), 2"):
        out = compute_rewards(never, PROMPTS, COMPLETIONS)
    assert out.rewards.tolist() == [0.0, 1.0, 0.0, 0.5]
    assert torch.isnan(out.rewards_per_func[[0, 2], 0]).all()


# --------------------------------------------------------------------------------- errors


def test_a_raising_function_is_named_with_the_failing_sample():
    def picky(prompts, completions, **kwargs):
        return [1.0 / int(c) for c in completions]  # "Paris" -> ValueError

    with pytest.raises(
        RewardFunctionError,
        match=r"reward function 'picky' raised ValueError: .* on sample 3 \(prompt: 'Name a city.', completion: 'Paris'\)",
    ) as info:
        compute_rewards(picky, PROMPTS, COMPLETIONS)
    assert isinstance(info.value.__cause__, ValueError)


def test_a_batch_only_failure_is_reported_as_such():
    def needs_batch(completions, **kwargs):
        if len(completions) > 1:
            raise RuntimeError("batch too big")
        return [0.0]

    with pytest.raises(RewardFunctionError, match="no single sample fails alone"):
        compute_rewards(needs_batch, PROMPTS, COMPLETIONS)


@pytest.mark.parametrize(
    "result, message",
    [
        ([1.0, 2.0], r"'bad' returned 2 rewards for 4 completions"),
        ({"a": 1}, r"'bad' returned dict"),
        ([1.0, "high", 0.0, 0.0], r"'bad' returned 'high' \(str\) for sample 1 \(prompt: 'What is 2 \+ 2\?'\)"),
        ([1.0, 0.0, math.nan, 0.0], r"'bad' returned NaN for sample 2 .* return None, not NaN"),
    ],
)
def test_unusable_results_are_named(result, message):
    def bad(completions, **kwargs):
        return result

    with pytest.raises(RewardFunctionError, match=message):
        compute_rewards(bad, PROMPTS, COMPLETIONS)


def test_a_function_that_cannot_take_the_batch_is_explained():
    def needs_column(completions, difficulty, **kwargs):
        return [0.0] * len(completions)

    def no_kwargs(completions):
        return [0.0] * len(completions)

    with pytest.raises(
        RewardFunctionError, match=r"'needs_column' cannot be called .* 'difficulty'.* add the missing column"
    ):
        compute_rewards(needs_column, PROMPTS, COMPLETIONS)
    with pytest.raises(RewardFunctionError, match=r"'no_kwargs' cannot be called .*take \*\*kwargs"):
        compute_rewards(no_kwargs, PROMPTS, COMPLETIONS)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="`solution` has 2 entries for 4 completions"):
        compute_rewards(length_reward, PROMPTS, COMPLETIONS, columns={"solution": ["a", "b"]})
    with pytest.raises(ValueError, match="column 'completions' clashes"):
        compute_rewards(length_reward, PROMPTS, COMPLETIONS, columns={"completions": COMPLETIONS})
    with pytest.raises(ValueError, match="reward_weights has 1 values for 2 reward functions"):
        compute_rewards([length_reward, length_reward], PROMPTS, COMPLETIONS, reward_weights=[1.0])
    with pytest.raises(TypeError, match="load_reward_funcs"):
        compute_rewards(["my/reward-model"], PROMPTS, COMPLETIONS)
    with pytest.raises(TypeError, match="load_reward_funcs"):
        compute_rewards([torch.nn.Linear(1, 1)], PROMPTS, COMPLETIONS)


# ---------------------------------------------------------------------------------- async


async def slow_length(completions, **kwargs):
    await asyncio.sleep(0.4)
    return [float(len(c)) for c in completions]


async def slow_one(completions, **kwargs):
    await asyncio.sleep(0.4)
    return [1.0] * len(completions)


def test_async_functions_run_concurrently_with_each_other_and_with_sync_ones():
    def slow_sync(completions, **kwargs):
        time.sleep(0.4)
        return [2.0] * len(completions)

    start = time.monotonic()
    out = compute_rewards([slow_length, slow_sync, slow_one], PROMPTS, COMPLETIONS)
    elapsed = time.monotonic() - start
    assert elapsed < 0.75, elapsed  # ~0.4 s, not 1.2 s
    assert out.rewards_per_func.tolist() == [[1, 2, 1], [1, 2, 1], [1, 2, 1], [5, 2, 1]]


def test_a_raising_async_function_is_named_with_the_failing_sample():
    async def async_picky(completions, **kwargs):
        await asyncio.sleep(0)
        return [float(int(c)) for c in completions]

    with pytest.raises(RewardFunctionError, match=r"'async_picky' raised ValueError.* on sample 3"):
        compute_rewards([length_reward, async_picky], PROMPTS, COMPLETIONS)


def test_async_rewards_work_inside_a_running_event_loop():
    async def caller():
        return compute_rewards(slow_one, PROMPTS, COMPLETIONS)

    assert asyncio.run(caller()).rewards.tolist() == [1.0] * 4


# ----------------------------------------------------------------------------- aggregation


def _naive_normalize_then_sum(rows, weights, g, scale="group", eps=1e-4):
    n, k = len(rows), len(rows[0])

    def std(vals):
        return statistics.stdev(vals) if len(vals) > 1 else 0.0

    normalized = [[math.nan] * k for _ in range(n)]
    for j in range(k):
        column = [r[j] for r in rows if not math.isnan(r[j])]
        for start in range(0, n, g):
            vals = [rows[i][j] for i in range(start, start + g) if not math.isnan(rows[i][j])]
            mean = sum(vals) / len(vals) if vals else 0.0
            denominator = {"group": std(vals) + eps, "batch": std(column) + eps, "none": 1.0}[scale]
            for i in range(start, start + g):
                if not math.isnan(rows[i][j]):
                    normalized[i][j] = (rows[i][j] - mean) / denominator
    summed = [sum(w * v for w, v in zip(weights, row) if not math.isnan(v)) for row in normalized]
    mean, spread = sum(summed) / n, statistics.stdev(summed)
    return [(s - mean) / (spread + eps) for s in summed]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_normalize_then_sum_matches_a_naive_reference(scale):
    nan = math.nan
    rows = [
        [1.0, 0.2, 3.0], [0.0, 0.9, nan], [1.0, 0.1, 1.0], [0.0, 0.5, 2.0],
        [0.0, 0.3, nan], [0.0, 0.4, nan], [1.0, 0.8, 5.0], [1.0, 0.7, nan],
    ]  # fmt: skip
    weights = [1.0, 0.5, 2.0]
    got = aggregate_rewards(
        torch.tensor(rows), weights, aggregation="normalize_then_sum", num_generations=4, scale_rewards=scale
    )
    expected = torch.tensor(_naive_normalize_then_sum(rows, weights, 4, scale))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # Group 2's third function has one value: its spread counts as 0, its normalized value is 0.
    assert abs(got.mean().item()) < 1e-5 and got.std().item() == pytest.approx(1.0, abs=1e-3)


def test_normalize_then_sum_keeps_apart_what_the_sum_merges():
    """GDPO's point: with rewards of different spreads, the plain sum gives two different reward
    combinations the same value (so the same advantage); per-reward normalization does not."""
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # one group of 6
    summed = aggregate_rewards(rows, aggregation="sum_then_normalize")
    assert summed[0] == summed[1]
    separated = aggregate_rewards(rows, aggregation="normalize_then_sum", num_generations=6)
    assert separated[0] > separated[1] + 0.3  # the rarer success (reward 1) is worth more


def test_compute_rewards_passes_the_aggregation_through():
    out = compute_rewards(
        [accuracy_reward, length_reward],
        PROMPTS,
        COMPLETIONS,
        columns={"solution": SOLUTIONS},
        aggregation="normalize_then_sum",
        num_generations=2,
    )
    expected = aggregate_rewards(out.rewards_per_func, aggregation="normalize_then_sum", num_generations=2)
    torch.testing.assert_close(out.rewards, expected)
    assert out.aggregation == "normalize_then_sum"


def test_aggregation_arguments_are_checked():
    rows = torch.zeros(6, 2)
    with pytest.raises(ValueError, match="multi_objective_aggregation must be one of"):
        aggregate_rewards(rows, aggregation="mean")
    with pytest.raises(ValueError, match="scale_rewards must be one of"):
        aggregate_rewards(rows, aggregation="normalize_then_sum", num_generations=2, scale_rewards="std")
    with pytest.raises(ValueError, match="num_generations dividing the number of samples"):
        aggregate_rewards(rows, aggregation="normalize_then_sum", num_generations=4)
    with pytest.raises(ValueError, match="shape \\(num_samples, num_funcs\\)"):
        aggregate_rewards(torch.zeros(6))
