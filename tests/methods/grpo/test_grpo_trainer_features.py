"""GRPOTrainer features: the reference model (none at beta=0, frozen copy, PEFT adapter disabled),
multi-turn tools, evaluation, metrics and timings, truncation masking, the vLLM path with a
stand-in engine, and errors for bad data."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from grpo_helpers import (
    ScriptedBackend,
    digit_reward_for,
    logged,
    naive_completion_logps,
    prompts,
    trainer_for,
)

from honelm.data import DatasetFormatError
from honelm.generation import SamplingParams, TransformersBackend
from honelm.methods.grpo import loss as grpo_loss_module
from honelm.methods.grpo import trainer as grpo_trainer_module
from honelm.rewards import tool_call_reward
from honelm.testing import tiny_model


def _rows(dataset, num_prompts: int, generations: int) -> list[dict]:
    return [dataset[i] for i in range(num_prompts) for _ in range(generations)]


# ---- reference model ----------------------------------------------------------------------------


def test_beta_zero_loads_no_reference_model(tmp_path, monkeypatch):
    loads = []
    original = grpo_trainer_module.load_causal_lm
    monkeypatch.setattr(grpo_trainer_module, "load_causal_lm", lambda *a, **k: loads.append(a[0]) or original(*a, **k))
    _, tokenizer = tiny_model(save_to=tmp_path / "model")
    path = str(tmp_path / "model")
    trainer = trainer_for(tmp_path, model=path, tokenizer=tokenizer, max_steps=2)
    assert loads == [path] and trainer.ref_model is None
    trainer.train()
    assert "kl" not in trainer.state.log_history[0]

    with_ref = trainer_for(tmp_path, model=path, tokenizer=tokenizer, beta=0.1)
    assert loads == [path, path, path]  # the policy, then the reference loaded the same way
    assert with_ref.ref_model is not None and with_ref.ref_model is not with_ref.model


def test_beta_positive_trains_against_a_frozen_copy_and_logs_kl(tmp_path):
    trainer = trainer_for(tmp_path, beta=0.1, max_steps=12)
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    reference = trainer.ref_model
    assert all(not p.requires_grad for p in reference.parameters()) and not reference.training
    trainer.train()
    for name, param in reference.named_parameters():
        assert torch.equal(param, initial[name]), name  # the reference never moves
    kl = logged(trainer, "kl")
    assert len(kl) == 12 and abs(kl[0]) < 1e-6  # the policy starts as the reference
    assert kl[-1] > 0.05 and kl[-1] > kl[1]
    rewards = logged(trainer, "reward")
    assert sum(rewards[-3:]) > sum(rewards[:3]) + 0.2


def test_the_kl_penalty_holds_the_policy_closer_to_the_reference(tmp_path):
    kls = {}
    for beta in (0.001, 1.0):
        trainer = trainer_for(tmp_path, beta=beta, max_steps=10)
        trainer.train()
        kls[beta] = logged(trainer, "kl")[-1]
    assert kls[1.0] < 0.5 * kls[0.001], kls


def test_peft_reference_is_the_model_with_its_adapter_disabled(tmp_path):
    from peft import LoraConfig

    base, tokenizer = tiny_model()  # an untouched copy of the base weights (same seed)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                      lora_dropout=0.0, task_type="CAUSAL_LM")
    trainer = trainer_for(tmp_path, beta=0.1, peft_config=lora, max_steps=15, learning_rate=3e-2)
    assert trainer.ref_model is None
    trainer.train()
    rewards = logged(trainer, "reward")
    assert sum(rewards[-3:]) > sum(rewards[:3]) + 0.1, rewards
    assert logged(trainer, "kl")[-1] > 0.01  # the adapted policy moved away from the base model
    chunk = trainer._generate_and_score(_rows(trainer.train_dataset, 2, 8), "train")[0]
    with torch.no_grad():
        expected = naive_completion_logps(base, chunk)  # the base model = adapter disabled
        adapted = naive_completion_logps(trainer.model, chunk)
    torch.testing.assert_close(chunk["ref_logps"], expected, atol=1e-5, rtol=1e-5)
    assert (adapted - expected).abs().max() > 1e-2
    merged = trainer.model.merge_and_unload()
    changed = [n for n, p in base.named_parameters() if not torch.equal(p, dict(merged.named_parameters())[n])]
    assert changed and all(any(m in n for m in ("q_proj", "v_proj", "up_proj", "down_proj")) for n in changed)


# ---- multi-turn tools ----------------------------------------------------------------------------

CALL = '<tool_call>\n{{"name": "{name}", "arguments": {{"a": 6, "b": 7}}}}\n</tool_call><|im_end|>'


def _tool_data(n: int = 8) -> Dataset:
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is 6 * 7? ({i})"}] for i in range(n)]})


@pytest.mark.parametrize("tool_name,failures", [("multiply", 0.0), ("divide", 1.0)])
def test_tool_calls_are_executed_fed_back_and_masked(tmp_path, tool_name, failures):
    executed = []

    def multiply(a: int, b: int) -> int:
        """Multiply two integers.

        Args:
            a: The first factor.
            b: The second factor.
        """
        executed.append((a, b))
        return a * b

    trainer = trainer_for(tmp_path, reward_funcs=[tool_call_reward], train_dataset=_tool_data(), tools=[multiply],
                          per_device_train_batch_size=8, num_generations=4, max_completion_length=96, max_steps=1)
    trainer.backend = ScriptedBackend(trainer.processing_class, [CALL.format(name=tool_name), "42<|im_end|>"])
    outputs, chunks = [], []
    rollout, score = trainer._rollout, trainer._generate_and_score
    trainer._rollout = lambda prompts: outputs.append(rollout(prompts)) or outputs[-1]
    trainer._generate_and_score = lambda rows, mode: chunks.extend(score(rows, mode)) or chunks
    trainer.train()

    out, chunk = outputs[0], chunks[0]
    assert executed == ([(6, 7)] * 8 if tool_name == "multiply" else [])
    result = "42" if tool_name == "multiply" else json.loads(out.completions[0][1]["content"])["error"]
    assert out.completions[0][1]["role"] == "tool" and (result == "42" or "unknown tool" in result.lower())
    assert out.completions[0][2] == {"role": "assistant", "content": "42"}
    for row in range(8):
        tool_mask = torch.tensor(out.tool_mask[row])
        n = len(tool_mask)
        assert (tool_mask == 0).sum() > 5 and tool_mask[0] == 1 and tool_mask[-1] == 1
        assert torch.equal(chunk["loss_mask"][row, :n].cpu(), tool_mask)  # tool results never reach the loss
        assert chunk["completion_mask"][row, :n].all()  # but the model attends to them
    logps, _ = trainer._completion_logps(trainer.model, chunk)
    assert (logps[chunk["loss_mask"] == 0] == 0).all() and (logps[chunk["loss_mask"] == 1] < 0).all()
    log = trainer.state.log_history[0]
    assert log["tools/call_frequency"] == 1.0 and log["tools/failure_frequency"] == failures
    assert log["rewards/tool_call_reward/mean"] == 1.0 - failures


def test_tools_need_annotated_functions(tmp_path):
    def untyped(x):
        return x

    with pytest.raises(TypeError, match="parameter 'x' of tool 'untyped' has no type annotation"):
        trainer_for(tmp_path, train_dataset=_tool_data(), tools=[untyped])


# ---- metrics, timings, evaluation ---------------------------------------------------------------

EXPECTED_METRICS = (
    "loss", "reward", "reward_std", "rewards/digit_reward/mean", "rewards/digit_reward/std", "frac_reward_zero_std",
    "completions/mean_length", "completions/min_length", "completions/max_length", "completions/clipped_ratio",
    "completions/mean_terminated_length", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
    "clip_ratio/region_mean", "num_tokens", "timing/generation", "timing/reward", "timing/training",
)


def test_metrics_timings_and_evaluation(tmp_path):
    trainer = trainer_for(tmp_path, max_steps=4, logging_steps=2, eval_strategy="steps", eval_steps=4,
                          num_generations_eval=4, per_device_eval_batch_size=8, eval_dataset=prompts(8, start=500))
    trainer.train()
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(train_logs) == 2
    for key in EXPECTED_METRICS:
        assert key in train_logs[0], key
    log = train_logs[-1]
    assert log["timing/generation"] > 0 and log["timing/training"] > 0 and log["timing/reward"] > 0
    assert log["completions/max_length"] <= 8 and 0.0 <= log["completions/clipped_ratio"] <= 1.0
    assert log["num_tokens"] == trainer.state.num_input_tokens_seen > 0
    evaluation = next(h for h in trainer.state.log_history if "eval_loss" in h)
    for key in ("eval_reward", "eval_reward_std", "eval_rewards/digit_reward/mean", "eval_completions/mean_length",
                "eval_entropy"):
        assert key in evaluation, key
    assert not any(k.startswith("eval_timing") for k in evaluation)


def test_mask_truncated_completions_drops_them_from_the_loss(tmp_path):
    def rollout_func(prompts, trainer):
        tok = trainer.processing_class
        ids = [[10, 11, 12] + ([tok.eos_token_id] if i % 2 else [13]) for i in range(len(prompts))]
        return {"prompt_ids": [tok(p)["input_ids"] for p in prompts], "completion_ids": ids,
                "logprobs": [[-1.0] * 4] * len(prompts)}

    for masked in (False, True):
        trainer = trainer_for(tmp_path, rollout_func=rollout_func, mask_truncated_completions=masked)
        chunk = trainer._generate_and_score(_rows(trainer.train_dataset, 2, 8), "train")[0]
        expected = chunk["completion_mask"].clone()
        if masked:
            expected[0::2] = 0  # even rows end without EOS: truncated
        assert torch.equal(chunk["loss_mask"], expected)
        assert trainer._metrics["train"]["completions/clipped_ratio"] == [0.5]


def test_sampling_fields_reach_the_generator(tmp_path):
    trainer = trainer_for(tmp_path, temperature=0.7, top_p=0.9, top_k=50, min_p=0.05, repetition_penalty=1.1,
                          generation_kwargs={"top_k": 20})
    assert isinstance(trainer.backend, TransformersBackend)
    assert trainer.backend.sampling == SamplingParams(0.7, 0.9, 20, 0.05, 1.1)
    assert trainer.backend.max_completion_length == 8


def test_a_reward_model_and_an_async_function_score_together(tmp_path):
    scorer, tokenizer = tiny_model(task="sequence-classification", seed=1)

    async def async_reward(completions, **kwargs):
        return [float(len(c) % 2) for c in completions]

    trainer = trainer_for(tmp_path, reward_funcs=[scorer, async_reward], reward_processing_classes=[tokenizer, None],
                          max_steps=1)
    trainer.train()
    log = trainer.state.log_history[0]
    assert trainer.reward_func_names == ["reward_model", "async_reward"]
    assert "rewards/reward_model/mean" in log and "rewards/async_reward/mean" in log
    assert log["rewards/reward_model/std"] > 0


# ---- the vLLM path, with a stand-in engine --------------------------------------------------------


class FakeColocateEngine:
    """Stands in for VLLMColocateBackend: its own copy of the weights, updated by load_weights;
    reports log-probs shifted by ``shift`` per token, like a generator with different numerics."""

    instances: list[FakeColocateEngine] = []
    shift = 0.05

    def __init__(self, model_name, *, sampling, max_completion_length, **kwargs):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(model_name)
        self.inner = TransformersBackend(self.model, AutoTokenizer.from_pretrained(model_name), sampling,
                                         max_completion_length=max_completion_length)
        self.max_completion_length = max_completion_length
        self.loads, self.events = 0, []
        FakeColocateEngine.instances.append(self)

    def generate(self, prompt_ids, *, max_new_tokens=None, sampling=None):
        out = self.inner.generate(prompt_ids, max_new_tokens=max_new_tokens, sampling=sampling)
        out.logps = [[v - self.shift for v in row] for row in out.logps]
        self.events.append("generate")
        return out

    def load_weights(self, named_tensors):
        state = dict(named_tensors)
        self.model.load_state_dict(state, strict=False)
        self.loads += 1
        self.events.append("load")

    def sleep(self, level=1):
        self.events.append("sleep")

    def wake_up(self, tags=None):
        self.events.append("wake")


def test_use_vllm_without_vllm_says_how_to_install_it(tmp_path):
    with pytest.raises(ImportError, match=r"pip install honelm\[vllm\]"):
        trainer_for(tmp_path, use_vllm=True)


def test_vllm_colocate_path_syncs_weights_and_corrects_the_sampler_mismatch(tmp_path, monkeypatch):
    from honelm.generation import vllm_backend

    monkeypatch.setattr(vllm_backend, "require_vllm", lambda: None)
    monkeypatch.setattr(vllm_backend, "VLLMColocateBackend", FakeColocateEngine)
    FakeColocateEngine.instances.clear()
    _, tokenizer = tiny_model(save_to=tmp_path / "model")
    trainer = trainer_for(tmp_path, model=str(tmp_path / "model"), tokenizer=tokenizer, use_vllm=True, max_steps=3,
                          vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=1.2)
    engine = FakeColocateEngine.instances[-1]
    assert trainer.backend is engine
    chunks = []
    score = trainer._generate_and_score
    trainer._generate_and_score = lambda rows, mode: chunks.extend(score(rows, mode)) or chunks[-1:]
    trainer.train()
    # weights are pushed before every generation round that follows an optimizer step
    assert engine.events == ["wake", "generate", "sleep"] + ["load", "wake", "generate", "sleep"] * 2
    policy = dict(trainer.model.named_parameters())
    trainer._sync_vllm_weights()
    for name, param in engine.model.named_parameters():
        assert torch.equal(param, policy[name]), name
    chunk = chunks[0]
    mask = chunk["loss_mask"].bool()
    ratio = torch.exp(chunk["old_logps"] - chunk["sampling_logps"])  # pi_trainer / pi_sampler per token
    torch.testing.assert_close(ratio[mask], torch.full_like(ratio[mask], torch.exp(torch.tensor(0.05)).item()),
                               atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(chunk["is_weights"][mask], ratio[mask].clamp(max=1.2))
    log = trainer.state.log_history[0]
    assert log["sampling/importance_sampling_ratio/mean"] == pytest.approx(1.0513, abs=1e-3)
    assert log["sampling/sampling_logp_difference/max"] == pytest.approx(0.05, abs=1e-3)


def test_vllm_sequence_mask_zeroes_sequences_far_from_the_trainer(tmp_path, monkeypatch):
    from honelm.generation import vllm_backend

    monkeypatch.setattr(vllm_backend, "require_vllm", lambda: None)
    monkeypatch.setattr(vllm_backend, "VLLMColocateBackend", FakeColocateEngine)
    monkeypatch.setattr(FakeColocateEngine, "shift", 0.2)  # 8 tokens: sequence ratio e^1.6 ~ 5 > clip_max 3
    _, tokenizer = tiny_model(save_to=tmp_path / "model")
    trainer = trainer_for(tmp_path, model=str(tmp_path / "model"), tokenizer=tokenizer, use_vllm=True)
    chunk = trainer._generate_and_score(_rows(trainer.train_dataset, 2, 8), "train")[0]
    lengths = chunk["loss_mask"].sum(1)
    expected = torch.where(torch.exp(0.2 * lengths) > 3.0, 0.0, torch.exp(0.2 * lengths)).unsqueeze(1)
    torch.testing.assert_close(chunk["is_weights"], expected, atol=1e-3, rtol=1e-3)
    loss_weights = []
    original = grpo_loss_module.grpo_loss

    def spy(*args, **kwargs):
        loss_weights.append(kwargs["token_weights"])
        return original(*args, **kwargs)

    monkeypatch.setattr(grpo_trainer_module, "grpo_loss", spy)
    trainer.compute_loss(trainer.model, chunk)
    assert loss_weights[0] is chunk["is_weights"]


# ---- data errors ---------------------------------------------------------------------------------


def test_a_dataset_without_prompts_is_refused_with_the_fix(tmp_path):
    data = Dataset.from_dict({"question": ["a", "b"], "answer": ["1", "2"]})
    with pytest.raises(ValueError, match=r"columns \['question', 'answer'\] but no 'prompt' column.*rename"):
        trainer_for(tmp_path, train_dataset=data)


def test_a_bad_prompt_row_is_named(tmp_path):
    rows = [[{"role": "user", "content": f"q{i}"}] for i in range(6)]
    rows[4] = [{"role": "wizard", "content": "q4"}]
    with pytest.raises(DatasetFormatError, match="[Rr]ow 4"):
        trainer_for(tmp_path, train_dataset=Dataset.from_dict({"prompt": rows}))


def test_streaming_datasets_are_refused(tmp_path):
    stream = prompts(16).to_iterable_dataset()
    with pytest.raises(ValueError, match="IterableDataset.*map-style"):
        trainer_for(tmp_path, train_dataset=stream)


def test_save_writes_a_reloadable_model_and_a_card(tmp_path):
    from transformers import AutoModelForCausalLM

    trainer = trainer_for(tmp_path, max_steps=1)
    trainer.train()
    trainer.save_model()
    out = tmp_path / "out"
    card = (out / "README.md").read_text()
    assert "- grpo" in card and "Group Relative Policy Optimization" in card and "loss_type=dapo" in card
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for name, param in reloaded.named_parameters():
        torch.testing.assert_close(param, dict(trainer.model.named_parameters())[name].detach())


def test_the_digit_reward_helper_counts_digit_tokens():
    _, tok = tiny_model()
    reward = digit_reward_for(tok)
    ids = tok("12 ab 7", add_special_tokens=False)["input_ids"]
    digits = [any(ch.isdigit() for ch in t) for t in tok.convert_ids_to_tokens(ids)]
    assert reward(None, [ids]) == [sum(digits) / len(ids)] and 0 < sum(digits) < len(ids)


def test_bf16_runs_the_lm_head_under_the_forwards_autocast(tmp_path, monkeypatch):
    from honelm.ops import _kernel

    seen = []
    real = _kernel._matmul_dtype

    def spy(hidden, weight):
        dtype = real(hidden, weight)
        seen.append(dtype)
        return dtype

    monkeypatch.setattr(_kernel, "_matmul_dtype", spy)
    trainer = trainer_for(tmp_path, bf16=True, max_steps=2, beta=0.1)
    trainer.train()
    assert len(seen) == 4 and set(seen) == {torch.bfloat16}  # training and reference log-probs, 2 steps
    assert all(torch.isfinite(torch.tensor(logged(trainer, "loss"))))
    assert logged(trainer, "kl")[0] < 1e-2


def test_rollout_func_fields_reach_the_reward_functions(tmp_path):
    seen = {}

    def rollout_func(prompts, trainer):
        tok = trainer.processing_class
        return {
            "prompt_ids": [tok(p)["input_ids"] for p in prompts],
            "completion_ids": [[20 + i % 3, tok.eos_token_id] for i in range(len(prompts))],
            "logprobs": [[-0.5, -0.1]] * len(prompts),
            "env_score": [float(i % 3) for i in range(len(prompts))],
        }

    def from_environment(completions, env_score, **kwargs):
        seen["env_score"], seen["completions"] = list(env_score), list(completions)
        return env_score

    trainer = trainer_for(tmp_path, reward_funcs=[from_environment], rollout_func=rollout_func, max_steps=1)
    trainer.train()
    assert seen["env_score"] == [float(i % 3) for i in range(16)]
    tok = trainer.processing_class
    assert seen["completions"][0] == tok.decode([20], skip_special_tokens=True)
    assert trainer.state.log_history[0]["reward"] == pytest.approx(sum(seen["env_score"]) / 16)
