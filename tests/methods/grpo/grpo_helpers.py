"""Helpers shared by the GRPO trainer tests: configs, a learnable toy task, scripted rollouts and
the plain full-logits log-probs that the trainer's chunked path is checked against."""

from __future__ import annotations

import re
from typing import Any

import torch
from datasets import Dataset

from honelm.generation import GenerationOutput
from honelm.methods.grpo import GRPOConfig, GRPOTrainer
from honelm.testing import tiny_model

_DIGIT = re.compile(r"\d")


def config(tmp_path, **kwargs: Any) -> GRPOConfig:
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=1,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=16,
        num_generations=8,
        max_completion_length=8,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        seed=0,
        # toy completions run to the 8-token limit by design; the diagnostic is right to say so
        diagnostics_silence=["GRPO_COMPLETIONS_TRUNCATED"],
    )
    defaults.update(kwargs)
    return GRPOConfig(**defaults)


def prompts(n: int = 64, start: int = 0, **columns: list[Any]) -> Dataset:
    return Dataset.from_dict({"prompt": [f"Say something {i}" for i in range(start, start + n)], **columns})


def digit_ids(tokenizer) -> list[int]:
    """Ids of the vocabulary's tokens that contain a digit (about a quarter of the tiny vocabulary)."""
    return sorted(i for t, i in tokenizer.get_vocab().items() if _DIGIT.search(t) and i not in tokenizer.all_special_ids)


def word_ids(tokenizer) -> list[int]:
    return sorted(
        i for t, i in tokenizer.get_vocab().items()
        if re.fullmatch(r"Ġ?[a-z]+", t) and i not in tokenizer.all_special_ids
    )


def digit_reward_for(tokenizer):
    """The toy task: the reward is the share of a completion's tokens that contain a digit.

    A random tiny model samples such tokens about a quarter of the time, so every group has
    spread, and a policy that learns to prefer them reaches 1.0."""
    digits = set(digit_ids(tokenizer))

    def digit_reward(completions: list[Any], completion_ids: list[list[int]], **kwargs: Any) -> list[float]:
        return [sum(t in digits for t in ids) / max(len(ids), 1) for ids in completion_ids]

    return digit_reward


def trainer_for(tmp_path, reward_funcs=None, train_dataset=None, model=None, tokenizer=None, **kwargs: Any):
    """A GRPOTrainer on a fresh tiny model (seed 0) with the digit reward; kwargs go to the config,
    except the trainer's own arguments."""
    own = {k: kwargs.pop(k) for k in ("tools", "rollout_func", "peft_config", "eval_dataset", "callbacks",
                                             "reward_processing_classes") if k in kwargs}
    if model is None:
        torch.manual_seed(0)
        model, tokenizer = tiny_model()
    trainer = GRPOTrainer(
        model,
        reward_funcs if reward_funcs is not None else digit_reward_for(tokenizer),
        config(tmp_path, **kwargs),
        train_dataset=train_dataset if train_dataset is not None else prompts(),
        processing_class=tokenizer,
        **own,
    )
    import transformers

    trainer.remove_callback(transformers.PrinterCallback)
    return trainer


def logged(trainer, key: str) -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h]


def scripted_rollout(tokenizer, logp: float = -1.0):
    """A deterministic ``rollout_func``: the completion of global row ``g`` (row ``g`` of the
    generation batch of all processes, in process order) depends on ``g`` only, so runs with
    different process counts or micro-batch splits see the same data. Lengths vary (2 to 6
    tokens plus EOS) and so does the share of digit tokens."""
    digits, words = digit_ids(tokenizer), word_ids(tokenizer)

    def rollout_func(prompts: list[Any], trainer: Any) -> dict[str, list[Any]]:
        offset = trainer.accelerator.process_index * len(prompts)
        prompt_ids, completion_ids = [], []
        for i, prompt in enumerate(prompts):
            g = offset + i
            length = 2 + (7 * g) % 5
            ids = [digits[(3 * g + j) % len(digits)] if (g + j) % 3 else words[(5 * g + j) % len(words)]
                   for j in range(length)]
            completion_ids.append(ids + [tokenizer.eos_token_id])
            prompt_ids.append(tokenizer(prompt)["input_ids"])
        return {
            "prompt_ids": prompt_ids,
            "completion_ids": completion_ids,
            "logprobs": [[logp] * len(c) for c in completion_ids],
        }

    return rollout_func


class ScriptedBackend:
    """A generation backend whose next assistant turn is ``turns[k](row)`` where ``k`` is the
    number of tool results already in the row's context; every row gets the same text."""

    def __init__(self, tokenizer, turns: list[str], max_completion_length: int = 200, logp: float = -0.5):
        self.tok, self.turns, self.max_completion_length, self.logp = tokenizer, turns, max_completion_length, logp
        self.calls = 0

    def generate(self, prompt_ids, *, max_new_tokens=None, sampling=None) -> GenerationOutput:
        self.calls += 1
        limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompt_ids)
        out = GenerationOutput([], [], [])
        for ids, limit in zip(prompt_ids, limits):
            seen = self.tok.decode(ids).count("<|im_start|>tool")
            text = self.turns[min(seen, len(self.turns) - 1)]
            new = self.tok(text, add_special_tokens=False)["input_ids"][: limit or self.max_completion_length]
            out.completion_ids.append(new)
            out.logps.append([self.logp] * len(new))
            out.truncated.append(new[-1] != self.tok.eos_token_id)
        return out


def naive_completion_logps(model, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """``log_softmax(logits / T)`` of the completion tokens from the model's full logits, (B, T),
    zero outside ``loss_mask``: the plain computation the chunked path must reproduce."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    start, width = batch["prompt_ids"].shape[1] - 1, batch["completion_ids"].shape[1]
    logps = torch.log_softmax(logits[:, start : start + width].float() / temperature, dim=-1)
    logps = logps.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    return logps * batch["loss_mask"]
