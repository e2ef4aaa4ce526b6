"""Seconds per step and peak memory of GRPO training: honelm's GRPOTrainer against TRL's.

The model is the decoder of ``benchmarks/sft.py``: Qwen2 with a 151,936-token vocabulary
(hidden 256, 4 layers, 4 attention heads, 2 key-value heads, intermediate 768, LM head tied to
the embeddings: about 42M parameters). Each step samples ``--prompts`` prompts x
``--generations`` completions of ``--new-tokens`` tokens with the model in process (no vLLM),
scores them with a cheap reward computed from the token ids (the share of even ids), and
takes one optimizer step on all of them (``per_device_train_batch_size = prompts x
generations``, one generation round per step, ``beta=0``, ``loss_type="dapo"``, no gradient
checkpointing) with the same optimizer settings in both libraries:

* ``honelm``: ``honelm.GRPOTrainer``; KV-cached sampling with ``honelm.generation``, completion
  log-probs from the final hidden states through the chunked LM-head kernel (no full logits).
* ``trl``: ``trl.GRPOTrainer`` (when TRL is installed; it is a benchmark-only dependency) with
  its default transformers generation.

Both start from the same weights (checked by a checksum) and see the same prompts. A random
model almost never samples its EOS token, so completions run to ``--new-tokens`` (the mean
completion length is reported to confirm it).

Step time is measured with a ``TrainerCallback`` (``on_step_begin`` to ``on_step_end``) on the
steps after the warm-up ones, and split into generation (sampling the completions), reward
(calling the reward function) and training (everything else: log-prob passes, loss, backward,
optimizer step) by timing each library's generation and reward calls. Peak memory is what
``trainer.train()`` adds on top of the process once model, data and trainer are built (see
``benchmarks/_common.py``). Every case runs in a fresh subprocess.

Examples::

    python benchmarks/grpo.py --quick                   # smoke test, well under a minute
    python benchmarks/grpo.py                           # 8 prompts x 4 generations x 64 tokens on CPU
    python benchmarks/grpo.py --dtype bfloat16 --repeats 3
    python benchmarks/grpo.py --device cuda --prompts 16 --new-tokens 256
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (
    GIB,
    PeakMemory,
    available_ram_bytes,
    describe_machine,
    is_oom,
    limit_address_space,
    run_worker,
)

LIBRARIES = ("honelm", "trl")
PACKAGES = ["honelm", "torch", "transformers", "trl", "accelerate", "datasets"]
TARGET_SPEEDUP = 1.5
PARTS = ("generation", "reward", "training")


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Seconds per GRPO step (split into generation, reward and training) and peak memory, "
        "honelm.GRPOTrainer vs trl.GRPOTrainer. Prints a markdown table."
    )
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--generations", type=int, default=4, help="completions per prompt (num_generations)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens per completion (max_completion_length)")
    p.add_argument("--warmup-steps", type=int, default=1, help="steps run before timing starts")
    p.add_argument("--steps", type=int, default=3, help="measured steps")
    p.add_argument("--libraries", nargs="+", choices=LIBRARIES, default=list(LIBRARIES), help="what to run")
    p.add_argument("--repeats", type=int, default=1, help="runs per case, alternating the order; medians reported")
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary size V")
    p.add_argument("--hidden", type=int, default=256, help="hidden size H")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--kv-heads", type=int, default=2, help="key-value heads")
    p.add_argument("--intermediate", type=int, default=768, help="MLP intermediate size")
    p.add_argument("--untied-embeddings", dest="tie_embeddings", action="store_false",
                   help="a separate LM head (default: tied to the input embeddings)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="float32, or bfloat16 mixed precision (bf16=True) in both libraries")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-limit-gib", type=float, default=None,
                   help="CPU: cap each case's virtual memory (default: 85%% of the memory available at start); "
                   "0 disables the cap.")
    p.add_argument("--case-timeout", type=float, default=None, help="seconds before a case is abandoned")
    p.add_argument("--json", dest="json_path", help="also write every case's raw result to this file")
    p.add_argument("--quick", action="store_true", help="tiny vocabulary and completions, for a smoke test")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.new_tokens, args.warmup_steps, args.steps = 8, 1, 2
        args.vocab, args.hidden, args.layers, args.intermediate = 4096, 64, 2, 128
    for name in ("prompts", "steps", "repeats", "new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    if args.generations < 2:
        p.error("--generations must be at least 2 (GRPO compares the completions of a prompt).")
    return args


# ----------------------------------------------------------------------------- worker


def _build_model(spec: dict[str, Any]) -> Any:
    """The Qwen2 decoder of the spec, float32, seeded: identical weights in every process."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from honelm.testing import tiny_tokenizer

    m, tok = spec["model"], tiny_tokenizer()
    config = Qwen2Config(
        vocab_size=m["vocab"], hidden_size=m["hidden"], num_hidden_layers=m["layers"],
        num_attention_heads=m["heads"], num_key_value_heads=m["kv_heads"], intermediate_size=m["intermediate"],
        max_position_embeddings=2048, tie_word_embeddings=m["tie_embeddings"],
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(spec["seed"])
    model = Qwen2ForCausalLM(config).to(device=spec["device"], dtype=torch.float32)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def even_share(completion_ids: list[list[int]], **kwargs: Any) -> list[float]:
    """The reward: the share of a completion's token ids that are even (cheap, from the ids)."""
    return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def _dataset(spec: dict[str, Any]) -> Any:
    from datasets import Dataset

    rows = spec["prompts"] * (spec["warmup_steps"] + spec["steps"])
    return Dataset.from_dict({"prompt": [f"Write a short story about the number {i}." for i in range(rows)]})


def _config_kwargs(spec: dict[str, Any], output_dir: str) -> dict[str, Any]:
    """GRPOConfig fields shared by both libraries."""
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": spec["prompts"] * spec["generations"],
        "num_generations": spec["generations"],
        "max_completion_length": spec["new_tokens"],
        "gradient_accumulation_steps": 1,
        "steps_per_generation": 1,
        "num_iterations": 1,
        "max_steps": spec["warmup_steps"] + spec["steps"],
        "learning_rate": 1e-6,
        "lr_scheduler_type": "constant",
        "weight_decay": 0.0,
        "beta": 0.0,
        "loss_type": "dapo",
        "temperature": 1.0,
        "gradient_checkpointing": False,
        "bf16": spec["dtype"] == "bfloat16",
        "fp16": False,
        "use_cpu": spec["device"] == "cpu",
        "seed": spec["seed"],
        "shuffle_dataset": False,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


class _Timer:
    """Accumulates the seconds spent in the wrapped calls."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


def _make_trainer(spec: dict[str, Any], model: Any, tok: Any, output_dir: str, timers: dict[str, _Timer]) -> Any:
    """The library's trainer with its generation and reward calls timed."""
    if spec["library"] == "honelm":
        from honelm.methods.grpo import GRPOConfig, GRPOTrainer
        from honelm.methods.grpo import trainer as module

        trainer = GRPOTrainer(model, even_share, GRPOConfig(**_config_kwargs(spec, output_dir)),
                              train_dataset=_dataset(spec), processing_class=tok)
        trainer._rollout = timers["generation"].wrap(trainer._rollout)
        module.compute_rewards = timers["reward"].wrap(module.compute_rewards)
        return trainer
    from trl import GRPOConfig, GRPOTrainer

    trainer = GRPOTrainer(model, even_share, GRPOConfig(**_config_kwargs(spec, output_dir)),
                          train_dataset=_dataset(spec), processing_class=tok)
    trainer._generate = timers["generation"].wrap(trainer._generate)
    trainer._calculate_rewards = timers["reward"].wrap(trainer._calculate_rewards)
    return trainer


def _step_callback(timers: dict[str, _Timer]) -> Any:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step and the generation / reward seconds inside it."""

        def __init__(self) -> None:
            self.steps: list[dict[str, float]] = []
            self.lengths: list[float] = []
            self._start: dict[str, float] = {}

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            _sync(args.device)
            self._start = {"wall": time.perf_counter(), **{k: t.seconds for k, t in timers.items()}}

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            _sync(args.device)
            step = {"total": time.perf_counter() - self._start["wall"]}
            for name, timer in timers.items():
                step[name] = timer.seconds - self._start[name]
            step["training"] = step["total"] - step["generation"] - step["reward"]
            self.steps.append(step)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and "completions/mean_length" in logs:
                self.lengths.append(float(logs["completions/mean_length"]))

    return StepTimer()


def _sync(device: Any) -> None:
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize()


def _measure(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.manual_seed(spec["seed"])
    model, tok = _build_model(spec)
    n_params = sum(p.numel() for p in model.parameters())
    checksum = sum(float(p.double().sum()) for p in model.parameters())
    timers = {"generation": _Timer(), "reward": _Timer()}
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = _make_trainer(spec, model, tok, output_dir, timers)
        callback = _step_callback(timers)
        trainer.add_callback(callback)
        memory = PeakMemory(spec["device"])
        memory.start()
        trainer.train()
        memory.stop()
    measured = callback.steps[spec["warmup_steps"]:]
    mean = {k: statistics.mean(s[k] for s in measured) for k in ("total", *PARTS)}
    return {
        "library": spec["library"], "step_seconds": [s["total"] for s in measured], "mean": mean,
        "warmup_seconds": [s["total"] for s in callback.steps[: spec["warmup_steps"]]],
        "completion_lengths": callback.lengths, "peak_bytes": memory.peak_bytes,
        "baseline_bytes": memory.baseline_bytes, "memory_method": memory.method, "num_params": n_params,
        "weights_checksum": checksum, "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["device"] == "cpu":
        limit_address_space(spec["memory_limit_gib"])
    try:
        return _measure(spec)
    except (RuntimeError, MemoryError) as e:
        if is_oom(e):
            return {"error": "OOM", "detail": str(e).splitlines()[0][:300]}
        raise


# ----------------------------------------------------------------------------- driver


def _summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0]["error"] if runs else "not run"}
    best = dict(ok[0])
    best["mean"] = {k: statistics.median(r["mean"][k] for r in ok) for k in ok[0]["mean"]}
    best["peak_bytes"] = max(r["peak_bytes"] for r in ok)
    best["all_step_seconds"] = [s for r in ok for s in r["step_seconds"]]
    loads = [r["load_average"] for r in ok if r.get("load_average") is not None]
    best["load_average"] = max(loads) if loads else None
    return best


def _row(library: str, res: dict[str, Any], trl: dict[str, Any] | None) -> str:
    if "error" in res:
        return f"| {library} | {res['error']} | - | - | - | - | - | - |"
    mean, steps = res["mean"], res["all_step_seconds"]
    spread = f"{min(steps):.2f}-{max(steps):.2f}" if len(steps) > 1 else f"{steps[0]:.2f}"
    speed = mem = "-"
    if library != "trl" and trl and "error" not in trl:
        speed = f"{trl['mean']['total'] / mean['total']:.2f}x"
        mem = f"{res['peak_bytes'] / max(trl['peak_bytes'], 1):.2f}"
    return (
        f"| {library} | {mean['total']:.2f} ({spread}) | {mean['generation']:.2f} | {mean['reward']:.3f} "
        f"| {mean['training']:.2f} | {res['peak_bytes'] / GIB:.2f} | {speed} | {mem} |"
    )


def _header(args: argparse.Namespace, limit: float | None) -> list[str]:
    tie = "tied" if args.tie_embeddings else "untied"
    precision = "float32" if args.dtype == "float32" else "float32 weights, bf16 mixed precision (bf16=True)"
    lines = [
        f"Machine: {describe_machine(args.device, PACKAGES)}",
        "",
        f"Model: Qwen2, vocab {args.vocab:,}, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, "
        f"{args.kv_heads} kv heads, intermediate {args.intermediate}, {tie} embeddings; {precision} on {args.device}. "
        f"Each step: {args.prompts} prompts x {args.generations} generations x {args.new_tokens} new tokens sampled "
        f"in process (temperature 1), reward from the token ids, one optimizer step (beta=0, dapo, AdamW lr 1e-6, no "
        f"gradient checkpointing). Steps: {args.warmup_steps} warm-up + {args.steps} measured.",
        "Step time: on_step_begin -> on_step_end; generation and reward: time inside each library's generation and "
        "reward calls; training: the rest (log-prob passes, loss, backward, optimizer step). Peak memory: what "
        "trainer.train() adds on top of the built model, data and trainer, in a fresh process per case.",
    ]
    if limit:
        lines.append(f"Each case's virtual memory is capped at {limit:.1f} GiB; a case over it shows OOM.")
    return lines + [""]


def _run_all(args: argparse.Namespace, libraries: list[str], limit: float | None) -> dict[str, Any]:
    model = {"vocab": args.vocab, "hidden": args.hidden, "layers": args.layers, "heads": args.heads,
             "kv_heads": args.kv_heads, "intermediate": args.intermediate, "tie_embeddings": args.tie_embeddings}
    raw: dict[str, list[dict[str, Any]]] = {}
    for rep in range(args.repeats):
        for lib in libraries if rep % 2 == 0 else libraries[::-1]:
            spec = {"library": lib, "prompts": args.prompts, "generations": args.generations,
                    "new_tokens": args.new_tokens, "warmup_steps": args.warmup_steps, "steps": args.steps,
                    "seed": args.seed, "device": args.device, "dtype": args.dtype, "model": model,
                    "memory_limit_gib": limit}
            start = time.perf_counter()
            res = run_worker(os.path.abspath(__file__), spec, args.case_timeout)
            raw.setdefault(lib, []).append(res)
            status = res.get("error") or f"{res['mean']['total']:.2f} s/step, peak {res['peak_bytes'] / GIB:.2f} GiB"
            print(f"  [{lib} run {rep + 1}] {status} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(raw, f, indent=1)
    return {k: _summarize(v) for k, v in raw.items()}


def _report(args: argparse.Namespace, libraries: list[str], results: dict[str, Any]) -> None:
    print("| library | s/step (min-max) | generation s | reward s | training s | peak GiB | speed vs TRL "
          "| peak vs TRL |")
    print("|---|---|---|---|---|---|---|---|")
    trl = results.get("trl")
    for lib in libraries:
        print(_row(lib, results[lib], trl))
    ok = {lib: r for lib, r in results.items() if "error" not in r}
    if ok:
        n = next(iter(ok.values()))["num_params"]
        print(f"\nParameters: {n:,} ({n / 1e6:.1f}M).")
        sums = {lib: r["weights_checksum"] for lib, r in ok.items()}
        same = max(sums.values()) - min(sums.values()) <= 1e-6 * max(1.0, abs(min(sums.values())))
        lengths = {lib: round(statistics.mean(r["completion_lengths"]), 1) if r["completion_lengths"] else None
                   for lib, r in ok.items()}
        print(f"Initial weights {'identical' if same else 'DIFFERENT'} (checksum); mean completion length {lengths} "
              f"(target {args.new_tokens}).")
    honelm, trl_res = ok.get("honelm"), ok.get("trl")
    if honelm and trl_res:
        speed = trl_res["mean"]["total"] / honelm["mean"]["total"]
        print(f"\nTarget: at least {TARGET_SPEEDUP}x TRL's steps per second -> measured {speed:.2f}x "
              f"({'met' if speed >= TARGET_SPEEDUP else 'NOT met'}).")


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return
    libraries = list(dict.fromkeys(args.libraries))
    if "trl" in libraries and importlib.util.find_spec("trl") is None:
        print("TRL not installed: skipping the comparison (pip install trl to compare).\n")
        libraries.remove("trl")
    limit = args.memory_limit_gib
    if limit is None and args.device == "cpu":
        available = available_ram_bytes()
        limit = 0.85 * available / GIB if available else None
    limit = limit or None
    print("\n".join(_header(args, limit)), flush=True)
    results = _run_all(args, libraries, limit)
    _report(args, libraries, results)


if __name__ == "__main__":
    main()
