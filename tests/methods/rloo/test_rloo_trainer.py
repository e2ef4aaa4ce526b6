"""RLOOTrainer on tiny offline models: it learns, and every part of a step does what it should."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from rloo_helpers import prompts, scripted_rollout, vowel_share

from honelm.generation import GenerationOutput
from honelm.methods.rloo import RLOOConfig, RLOOTrainer, RoundSampler
from honelm.methods.rloo import trainer as trainer_module
from honelm.rewards import RewardFunctionError
from honelm.testing import tiny_model


def _config(tmp_path: Any, **overrides: Any) -> RLOOConfig:
    options: dict[str, Any] = {
        "output_dir": str(tmp_path / "out"), "use_cpu": True, "report_to": "none", "save_strategy": "no",
        "disable_tqdm": True, "logging_steps": 1, "per_device_train_batch_size": 8, "num_generations": 4,
        "max_completion_length": 6, "learning_rate": 1e-2, "beta": 0.0, "seed": 0, "max_steps": 1,
        # A tiny random model never reaches EOS within a few tokens: every toy completion is cut at the
        # length limit by design, which diagnostics would (rightly) report.
        "diagnostics_silence": ["GRPO_COMPLETIONS_TRUNCATED"],
    }
    options.update(overrides)
    return RLOOConfig(**options)


def _logs(trainer: RLOOTrainer, key: str) -> list[float]:
    return [log[key] for log in trainer.state.log_history if key in log and "train_runtime" not in log]


def _capture_rounds(trainer: RLOOTrainer) -> list[dict[str, torch.Tensor]]:
    """Record every generation round the trainer produces (full width, before splitting)."""
    rounds: list[dict[str, torch.Tensor]] = []
    original = trainer._generate_and_score

    def wrapped(rows: Any, mode: str) -> dict[str, torch.Tensor]:
        batch = original(rows, mode)
        rounds.append({k: v.clone() for k, v in batch.items()})
        return batch

    trainer._generate_and_score = wrapped  # type: ignore[method-assign]
    return rounds


# ---- learning -----------------------------------------------------------------------------------


def test_reward_rises_on_a_learnable_task_and_on_held_out_prompts(tmp_path: Any) -> None:
    model, tokenizer = tiny_model()
    config = _config(tmp_path, max_steps=24, per_device_train_batch_size=32, num_generations=8,
                     learning_rate=3e-2, per_device_eval_batch_size=32,
                     # success: once every completion scores 1, the groups' rewards are all equal
                     diagnostics_silence=["GRPO_COMPLETIONS_TRUNCATED", "GRPO_ZERO_REWARD_STD"])
    trainer = RLOOTrainer(model, vowel_share, args=config, train_dataset=prompts(64),
                          eval_dataset=prompts(8, start=1000), processing_class=tokenizer)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()

    rewards = _logs(trainer, "reward")
    assert len(rewards) == 24
    assert sum(rewards[:3]) / 3 < 0.3 and sum(rewards[-3:]) / 3 > 0.8, rewards
    assert before["eval_reward"] < 0.3 and after["eval_reward"] > 0.8, (before, after)  # prompts never trained on
    log = trainer.state.log_history[0]
    for key in ("reward", "reward_std", "rewards/vowel_share/mean", "rewards/vowel_share/std", "frac_reward_zero_std",
                "completions/mean_length", "completions/min_length", "completions/max_length",
                "completions/clipped_ratio", "completions/mean_terminated_length", "entropy",
                "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "num_tokens",
                "timing/generation", "timing/reward", "timing/training"):
        assert key in log, key
    assert log["completions/max_length"] <= 6 and log["timing/generation"] > 0 and log["timing/training"] > 0


def test_round_sampler_repeats_groups_and_rounds() -> None:
    sampler = RoundSampler(5, num_generations=2, prompts_per_round=2, repeats=2, shuffle=False)
    assert list(sampler) == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]  # prompt 4 does not fill a round
    assert len(sampler) == 16
    shuffled = RoundSampler(50, 4, 5, shuffle=True, seed=3)
    first = list(shuffled)
    assert first == list(RoundSampler(50, 4, 5, shuffle=True, seed=3))  # every process builds the same order
    shuffled.set_epoch(1)
    assert list(shuffled) != first and sorted(set(first)) == list(range(50))


# ---- configuration and input errors ---------------------------------------------------------------


def test_configuration_errors_name_the_field_and_the_fix(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match=r"num_generations=1: RLOO needs at least 2 completions per prompt"):
        _config(tmp_path, num_generations=1)
    with pytest.raises(ValueError, match=r"does not split into groups of num_generations=3"):
        _config(tmp_path, num_generations=3)
    with pytest.raises(ValueError, match="give `generation_batch_size` or `steps_per_generation`, not both"):
        _config(tmp_path, generation_batch_size=16, steps_per_generation=2)
    with pytest.raises(ValueError, match="temperature > 0"):
        _config(tmp_path, temperature=0.0)
    config = _config(tmp_path, generation_batch_size=32)
    assert config.steps_per_generation == 4
    assert _config(tmp_path, gradient_accumulation_steps=3).generation_batch_size == 24


def test_bad_inputs_are_refused_before_training(tmp_path: Any) -> None:
    from datasets import Dataset

    from honelm.data import DatasetFormatError

    model, tokenizer = tiny_model()
    config = _config(tmp_path)
    with pytest.raises(DatasetFormatError, match="prompt"):
        RLOOTrainer(model, vowel_share, args=config, train_dataset=Dataset.from_dict({"question": ["a", "b"]}),
                    processing_class=tokenizer)
    with pytest.raises(ValueError, match=r"has 1 prompts, but one generation round takes 2"):
        RLOOTrainer(model, vowel_share, args=config, train_dataset=prompts(1), processing_class=tokenizer)
    with pytest.raises(ValueError, match="reward_weights has 2 values for 1 reward functions"):
        RLOOTrainer(model, vowel_share, args=_config(tmp_path, reward_weights=[1.0, 2.0]), train_dataset=prompts(4),
                    processing_class=tokenizer)
    with pytest.raises(ValueError, match="at least one reward function"):
        RLOOTrainer(model, [], args=config, train_dataset=prompts(4), processing_class=tokenizer)


def test_a_raising_reward_function_fails_loudly_naming_it_and_the_sample(tmp_path: Any) -> None:
    def picky(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        return [1.0 / ("topic 2." not in p) for p in prompts]

    model, tokenizer = tiny_model()
    trainer = RLOOTrainer(model, picky, args=_config(tmp_path, shuffle_dataset=False, max_steps=2), train_dataset=prompts(4),
                          processing_class=tokenizer)
    with pytest.raises(RewardFunctionError, match=r"reward function 'picky' raised ZeroDivisionError.* on sample \d+ "
                                                  r"\(prompt: 'Say something about topic 2\.'"):
        trainer.train()


# ---- reference model --------------------------------------------------------------------------------


def test_beta_zero_loads_no_reference_model(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny_model(save_to=tmp_path / "model")
    loads: list[str] = []
    real = trainer_module.load_causal_lm
    monkeypatch.setattr(trainer_module, "load_causal_lm", lambda path, kwargs=None: loads.append(path) or real(path, kwargs))
    no_kl = RLOOTrainer(str(tmp_path / "model"), vowel_share, args=_config(tmp_path, beta=0.0), train_dataset=prompts(4))
    assert no_kl.ref_model is None and len(loads) == 1  # the policy only
    no_kl.train()
    assert "kl" not in no_kl.state.log_history[0]

    with_kl = RLOOTrainer(str(tmp_path / "model"), vowel_share, args=_config(tmp_path, beta=0.1), train_dataset=prompts(4))
    assert len(loads) == 3 and with_kl.ref_model is not None  # the policy, then its reference
    assert not any(p.requires_grad for p in with_kl.ref_model.parameters())
    model, tokenizer = tiny_model()
    copied = RLOOTrainer(model, vowel_share, args=_config(tmp_path, beta=0.1), train_dataset=prompts(4),
                         processing_class=tokenizer)
    assert copied.ref_model is not None and copied.ref_model is not copied.model


@pytest.fixture(scope="module")
def vowel_teacher(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The weights of a tiny model trained to favour vowel tokens (about 0.6 of its tokens)."""
    model, tokenizer = tiny_model()
    config = _config(tmp_path_factory.mktemp("teacher"), max_steps=12, per_device_train_batch_size=32,
                     num_generations=8, learning_rate=3e-2)
    RLOOTrainer(model, vowel_share, args=config, train_dataset=prompts(64), processing_class=tokenizer).train()
    return copy.deepcopy(model.state_dict())


@pytest.mark.diagnostics_expected  # on purpose: no reward signal at all, and a distant reference
@pytest.mark.parametrize("kl_in_reward", [True, False])
def test_kl_penalty_enters_where_configured_and_pulls_the_policy_to_the_reference(
    tmp_path: Any, kl_in_reward: bool, vowel_teacher: dict[str, torch.Tensor]
) -> None:
    model, tokenizer = tiny_model()
    beta = 0.5
    # The vowel share is logged but weighs 0: the only training signal is the KL to the reference.
    config = _config(tmp_path, max_steps=16, beta=beta, kl_in_reward=kl_in_reward, learning_rate=3e-2,
                     per_device_train_batch_size=32, num_generations=8, reward_weights=[0.0])
    trainer = RLOOTrainer(model, vowel_share, args=config, train_dataset=prompts(64), processing_class=tokenizer)
    trainer.ref_model.load_state_dict(vowel_teacher)
    initial = copy.deepcopy(trainer.model)
    rounds = _capture_rounds(trainer)
    trainer.train()

    first = rounds[0]
    mask = first["loss_mask"].float()
    if kl_in_reward:
        # the advantages are the leave-one-out advantages of -beta * sum_t (log pi_old - log pi_ref)
        penalized = -beta * ((first["old_logps"] - first["ref_logps"]) * mask).sum(1)
        grouped = penalized.view(-1, 8)
        expected = (grouped - (grouped.sum(1, keepdim=True) - grouped) / 7).reshape(-1)
        torch.testing.assert_close(first["advantages"], expected)
        assert _logs(trainer, "kl")[0] == pytest.approx(
            float(((first["old_logps"] - first["ref_logps"]) * mask).sum() / mask.sum()), rel=1e-4)
    else:
        assert "old_logps" not in first and bool((first["advantages"] == 0).all())
        # the loss is beta * the k3 KL summed over each completion, averaged over completions
        logps = trainer._completion_logps(initial, first, first["loss_mask"]).detach()
        delta = first["ref_logps"] - logps
        k3 = (torch.exp(delta) - delta - 1) * mask
        assert _logs(trainer, "loss")[0] == pytest.approx(beta * float(k3.sum(1).mean()), rel=1e-3)
        assert _logs(trainer, "kl")[0] == pytest.approx(float(k3.sum() / mask.sum()), rel=1e-3)
    vowels, kls = _logs(trainer, "rewards/vowel_share/mean"), _logs(trainer, "kl")
    assert sum(vowels[:2]) / 2 < 0.3 and sum(vowels[-5:]) / 5 > 0.5, vowels  # it took on the reference's habit
    assert sum(kls[-5:]) < 0.7 * sum(kls[:5]), kls


def test_peft_trains_the_adapter_and_uses_the_disabled_adapter_as_reference(tmp_path: Any) -> None:
    from peft import LoraConfig

    model, tokenizer = tiny_model()
    base = copy.deepcopy(model)
    config = _config(tmp_path, max_steps=6, beta=0.1, kl_in_reward=False, learning_rate=3e-2,
                     per_device_train_batch_size=16)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = RLOOTrainer(model, vowel_share, args=config, train_dataset=prompts(32), processing_class=tokenizer,
                          peft_config=peft_config)
    assert trainer.ref_model is None
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    rounds = _capture_rounds(trainer)
    trainer.train()

    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())  # the base model never moves
    assert any(not torch.equal(after[n], v) for n, v in lora.items())
    last = rounds[-1]  # generated after the adapter has trained: the reference is still the base model
    expected = trainer._completion_logps(base, last, last["loss_mask"])
    torch.testing.assert_close(last["ref_logps"], expected, atol=1e-5, rtol=0)
    assert _logs(trainer, "kl")[-1] > 0


# ---- rounds, iterations and log-probs ---------------------------------------------------------------


@pytest.mark.parametrize(("num_iterations", "steps_per_generation"), [(2, 1), (1, 2)])
def test_a_round_is_reused_with_its_stored_old_logps(tmp_path: Any, num_iterations: int,
                                                     steps_per_generation: int) -> None:
    model, tokenizer = tiny_model()
    config = _config(tmp_path, max_steps=4, num_iterations=num_iterations, steps_per_generation=steps_per_generation,
                     epsilon=1e-3, learning_rate=3e-2, per_device_train_batch_size=16)
    trainer = RLOOTrainer(model, vowel_share, args=config, train_dataset=prompts(64), processing_class=tokenizer)
    rounds = _capture_rounds(trainer)
    trainer.train()

    assert len(rounds) == 2 and all("old_logps" in r for r in rounds)  # one round per 2 optimizer steps
    clipped = _logs(trainer, "clip_ratio/region_mean")
    # each round's first step runs the policy that generated it (ratio 1); the second, an updated one
    assert clipped[0] == 0.0 and clipped[2] == 0.0
    assert clipped[1] > 0.0 and clipped[3] > 0.0, clipped


def test_training_logps_match_the_sampling_logps_and_a_naive_forward(tmp_path: Any) -> None:
    model, tokenizer = tiny_model()
    config = _config(tmp_path, temperature=0.7, max_completion_length=8)
    trainer = RLOOTrainer(model, vowel_share, args=config, train_dataset=prompts(8), processing_class=tokenizer)
    # prompts of different lengths: left padding must not shift positions
    batch_prompts = ["Hi", "Say something about topic 12345, at length please.", "Hello there", "Why?"]
    out = trainer._rollout(batch_prompts, "train")
    batch = out.to_tensors(tokenizer.pad_token_id)
    mask = batch["completion_mask"]
    logps = trainer._completion_logps(trainer.model, batch, mask)
    # the sampler's log-probs (temperature only: no truncation) are what training recomputes
    torch.testing.assert_close(logps * mask, batch["logps"] * mask, atol=1e-4, rtol=0)

    # against plain full logits, gradients included
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention = torch.cat([batch["prompt_mask"], mask], 1)
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    width = batch["prompt_ids"].shape[1]
    logits = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits[:, width - 1 : -1]
    naive = torch.log_softmax(logits.float() / 0.7, -1).gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    naive = naive * mask
    torch.testing.assert_close(logps, naive, atol=1e-5, rtol=1e-5)
    weights = torch.randn(logps.shape)
    params = [model.lm_head.weight, model.model.layers[0].self_attn.q_proj.weight]
    fast = torch.autograd.grad((logps * weights).sum(), params)
    plain = torch.autograd.grad((naive * weights).sum(), params)
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_weights_clipping_and_normalization_reach_the_advantages(tmp_path: Any,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    model, tokenizer = tiny_model()
    seen: dict[str, Any] = {}

    def place(completions: list[str], place: list[int], **kwargs: Any) -> list[float]:
        seen["place"] = place  # the rollout_func's extra column arrives as a keyword argument
        return [float(k) for k in place]

    def only_first(completions: list[str], place: list[int], **kwargs: Any) -> list[float | None]:
        return [10.0 if k == 0 else None for k in place]

    config = _config(tmp_path, reward_weights=[1.0, 0.5], reward_clip_range=[0.0, 2.5], normalize_advantages=True,
                     log_completions=True, num_completions_to_print=2)
    trainer = RLOOTrainer(model, [place, only_first], args=config, train_dataset=prompts(4), processing_class=tokenizer,
                          rollout_func=scripted_rollout(tokenizer, 4))
    rounds = _capture_rounds(trainer)
    trainer.train()

    assert seen["place"] == [0, 1, 2, 3, 0, 1, 2, 3]
    # combined rewards per group: 0 + 0.5 * 10 = 5 -> clipped 2.5; then 1, 2, 3 -> clipped 2.5
    combined = torch.tensor([2.5, 1.0, 2.0, 2.5])
    loo = (combined - (combined.sum() - combined) / 3).repeat(2)  # both prompts' groups alike
    expected = (loo - loo.mean()) / (loo.std() + 1e-4)  # standardized over the whole round
    torch.testing.assert_close(rounds[0]["advantages"], expected, atol=1e-5, rtol=0)
    log = trainer.state.log_history[0]
    assert log["reward"] == pytest.approx((5 + 1 + 2 + 3) / 4)  # weighted, before clipping
    assert log["rewards/only_first/mean"] == pytest.approx(10.0)  # None samples are left out
    length = len(tokenizer(" 0 0", add_special_tokens=False)["input_ids"]) + 1  # every completion ends with EOS
    assert log["completions/clipped_ratio"] == 0.0 and log["completions/mean_terminated_length"] == length
    printed = capsys.readouterr().out
    assert "[step 1] 2 completions of the last round" in printed
    assert "' 0 0' | 2.500 | " in printed and "' 1 1' | 1.000 | " in printed


def test_truncated_completions_can_be_left_out_of_the_loss(tmp_path: Any) -> None:
    model, tokenizer = tiny_model()  # a random model practically never stops within 6 tokens
    config = _config(tmp_path, max_steps=2, mask_truncated_completions=True, max_prompt_length=5)
    trainer = RLOOTrainer(model, vowel_share, args=config, train_dataset=prompts(8), processing_class=tokenizer)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    rounds = _capture_rounds(trainer)
    trainer.train()

    assert rounds[0]["prompt_ids"].shape[1] == 5  # prompts keep their last 5 tokens
    assert _logs(trainer, "completions/clipped_ratio") == [1.0, 1.0]
    assert all(int(r["loss_mask"].sum()) == 0 for r in rounds)  # nothing left to train on...
    assert _logs(trainer, "loss") == [0.0, 0.0]  # ...so nothing moves (and nothing breaks)
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


class _EngineStandIn:
    """Plays vLLM's part (colocate): its own copy of the model, updated only through `load_weights`,
    asleep between rounds."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        from honelm.generation import SamplingParams, TransformersBackend

        self.engine = copy.deepcopy(model)
        self.inner = TransformersBackend(self.engine, tokenizer, SamplingParams(), max_completion_length=6, seed=0)
        self.max_completion_length = 6
        self.pushes: list[dict[str, torch.Tensor]] = []
        self.asleep = True

    def generate(self, prompt_ids: Any, *, max_new_tokens: Any = None, sampling: Any = None) -> GenerationOutput:
        assert not self.asleep, "generating while asleep"
        return self.inner.generate(prompt_ids, max_new_tokens=max_new_tokens, sampling=sampling)

    def load_weights(self, named_tensors: Any) -> None:
        weights = {name: tensor.clone() for name, tensor in named_tensors}
        self.pushes.append(weights)
        self.engine.load_state_dict(weights, strict=True)

    def wake_up(self, tags: Any = None) -> None:
        self.asleep = False

    def sleep(self, level: int = 1) -> None:
        self.asleep = True


def test_vllm_path_pushes_weights_each_round_and_corrects_for_the_sampler(tmp_path: Any) -> None:
    model, tokenizer = tiny_model()
    trainer = RLOOTrainer(model, vowel_share, args=_config(tmp_path, max_steps=3, learning_rate=3e-2),
                          train_dataset=prompts(16), processing_class=tokenizer)
    trainer.args.use_vllm = True  # no vLLM here: the stand-in engine below takes its place
    engine = _EngineStandIn(model, tokenizer)
    trainer._generation_backend = engine
    rounds = _capture_rounds(trainer)
    policy = trainer.model
    states = []
    original = trainer._rollout

    def rollout_and_record(batch_prompts: Any, mode: str) -> Any:
        states.append({n: p.detach().clone() for n, p in policy.state_dict().items()})
        return original(batch_prompts, mode)

    trainer._rollout = rollout_and_record  # type: ignore[method-assign]
    trainer.train()

    assert len(engine.pushes) == 3 and engine.asleep  # one push per round, asleep while training
    for pushed, state in zip(engine.pushes, states):  # each round sampled from the policy's current weights
        assert all(torch.equal(pushed[name], state[name]) for name in pushed)
    assert not torch.equal(engine.pushes[0]["lm_head.weight"], engine.pushes[2]["lm_head.weight"])
    for row in rounds:  # same weights in both: the importance weights pi_old / pi_sampler are 1
        torch.testing.assert_close(row["sequence_weights"], torch.ones(8), atol=1e-3, rtol=0)


def test_use_vllm_without_vllm_says_how_to_install_it(tmp_path: Any) -> None:
    from honelm.generation import is_vllm_available

    if is_vllm_available():
        pytest.skip("vLLM is installed here")
    model, tokenizer = tiny_model()
    with pytest.raises(ImportError, match=r"pip install honelm\[vllm\].*use_vllm=False"):
        RLOOTrainer(model, vowel_share, args=_config(tmp_path, use_vllm=True), train_dataset=prompts(4),
                    processing_class=tokenizer)


# ---- tools ----------------------------------------------------------------------------------------


class _ScriptedToolBackend:
    """Calls `add(2, 3)` in the first turn and answers once the tool result is in the prompt."""

    max_completion_length = 64

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def generate(self, prompt_ids: Any, *, max_new_tokens: Any = None, sampling: Any = None) -> GenerationOutput:
        completions = []
        for ids in prompt_ids:
            seen_result = "<|im_start|>tool" in self.tokenizer.decode(ids)
            text = "The answer is 5." if seen_result else '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
            completions.append(self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id])
        return GenerationOutput(completions, [[-1.0] * len(c) for c in completions], [False] * len(completions))


def test_tool_calls_are_executed_and_their_results_masked(tmp_path: Any) -> None:
    calls: list[tuple[int, int]] = []

    def add(a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: The first term.
            b: The second term.
        """
        calls.append((a, b))
        return a + b

    def used_the_tool(completions: list[list[dict[str, Any]]], **kwargs: Any) -> list[float]:
        return [float(any(m["role"] == "tool" and m["content"] == "5" for m in c)) for c in completions]

    model, tokenizer = tiny_model()
    from datasets import Dataset

    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is 2 + 3? ({i})"}] for i in range(4)]})
    config = _config(tmp_path, max_completion_length=64, max_tool_calling_iterations=2)
    trainer = RLOOTrainer(model, used_the_tool, args=config, train_dataset=data, processing_class=tokenizer,
                          tools=[add])
    trainer._generation_backend = _ScriptedToolBackend(tokenizer)
    rounds = _capture_rounds(trainer)
    trainer.train()

    assert calls == [(2, 3)] * 8  # one call per completion, all executed
    log = trainer.state.log_history[0]
    assert log["tools/call_frequency"] == 1.0 and log["tools/failure_frequency"] == 0.0
    assert log["rewards/used_the_tool/mean"] == 1.0
    row = rounds[0]
    ids, real, counted = row["completion_ids"][0], row["completion_mask"][0].bool(), row["loss_mask"][0].bool()
    masked_text = tokenizer.decode(ids[real & ~counted])
    assert "<|im_start|>tool\n5<|im_end|>" in masked_text and "answer" not in masked_text  # the tool result only
    trained_text = tokenizer.decode(ids[counted])
    assert "<tool_call>" in trained_text and "The answer is 5." in trained_text
    assert "<|im_start|>tool" not in trained_text  # the result never enters the loss
    # masked tokens get no log-prob (and so no gradient)
    logps = trainer._completion_logps(trainer.model, row, row["loss_mask"])
    assert bool((logps[0][real & ~counted] == 0).all()) and bool((logps[0][counted] < 0).all())
