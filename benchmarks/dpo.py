"""Step time and peak memory of DPO training steps: honelm's DPOTrainer against TRL's.

The policy is a small Qwen2 decoder with a 151,936-token vocabulary and tied embeddings
(hidden 256, 4 layers, 4 attention heads, 2 key-value heads, intermediate 768: about 42M
parameters, 39M of them the embedding; the same model as ``benchmarks/sft.py``), so the LM head dominates the cost of a step, as it
does for real models. The reference model has the same architecture and other weights
(seed + 1), so the first loss is not just log 2 and must agree between the libraries. Both
libraries train the same policy (checked by a checksum) against the same reference on the same
preference pairs, in float32 with the same optimizer settings and no gradient checkpointing:

* ``honelm``: ``honelm.DPOTrainer``; chosen and rejected in one padded forward pass, log-probs
  from the final hidden states through the chunked LM-head kernels of ``honelm.ops``.
* ``honelm-padding-free``: the same with ``padding_free=True`` (every row is full here, so it
  only shows the cost of the flat layout).
* ``trl``: ``trl.DPOTrainer`` (when TRL is installed; it is a benchmark-only dependency), which
  also computes its log-probs through a chunked LM head of its own.

The pairs are text made of words that are single tokens of honelm's offline test tokenizer,
so every prompt is exactly ``seq_len / 2`` tokens and every completion ``seq_len / 2`` tokens
(EOS included) in both libraries: each step scores ``batch`` pairs of two ``seq_len``-token
sequences, with no padding.

Each (library, seq_len) case runs in a fresh subprocess. Step time is measured with a
``TrainerCallback`` (``on_step_begin`` to ``on_step_end``: reference forward, policy forward and
backward, gradient clipping, optimizer step) on the steps after the warm-up ones; tokens/s is
``2 * batch * seq_len / mean step time`` (chosen and rejected sequences). Peak memory is what
``trainer.train()`` adds on top of the process once models, data and trainer are built (see
``benchmarks/_common.py``): activations, LM-head temporaries, gradients and optimizer states.

Usage::

    python benchmarks/dpo.py --quick                    # smoke test: vocab 3000, T=64, 2 steps
    python benchmarks/dpo.py                            # 4 pairs x 512 tokens on CPU (quiet machine!)
    python benchmarks/dpo.py --seq-lens 512 1024 --repeats 3 --json dpo.json
    python benchmarks/dpo.py --device cuda --batch-size 8 --seq-lens 1024 2048
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

from _common import (  # noqa: E402
    GIB,
    PeakMemory,
    available_ram_bytes,
    describe_machine,
    is_oom,
    limit_address_space,
    run_worker,
)

LIBRARIES = ("honelm", "honelm-padding-free", "trl")
PACKAGES = ["honelm", "torch", "transformers", "trl", "accelerate", "datasets"]


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Tokens/s and peak memory of DPO training steps, honelm.DPOTrainer vs trl.DPOTrainer. "
        "Prints a markdown table."
    )
    p.add_argument("--seq-lens", type=int, nargs="+", default=[512], help="tokens per sequence T (prompt + completion)")
    p.add_argument("--batch-size", type=int, default=4, help="preference pairs per step B")
    p.add_argument("--warmup-steps", type=int, default=2, help="steps run before timing starts")
    p.add_argument("--steps", type=int, default=3, help="measured steps (max_steps = warm-up + measured)")
    p.add_argument("--libraries", nargs="+", choices=LIBRARIES, default=list(LIBRARIES), help="what to run")
    p.add_argument("--repeats", type=int, default=1, help="runs per case, alternating the order; medians reported")
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary size V")
    p.add_argument("--hidden", type=int, default=256, help="hidden size H")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--kv-heads", type=int, default=2, help="key-value heads")
    p.add_argument("--intermediate", type=int, default=768, help="MLP intermediate size")
    p.add_argument("--untie-embeddings", action="store_true", help="separate LM head (default: tied)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--memory-limit-gib", type=float, default=None,
        help="CPU: cap each case's virtual memory (default: 85%% of the memory available at start); a case "
        "over it is reported as OOM instead of running the machine out of memory. 0 disables the cap.",
    )
    p.add_argument("--case-timeout", type=float, default=None, help="seconds before a case is abandoned")
    p.add_argument("--json", dest="json_path", help="also write every case's raw result to this file")
    p.add_argument("--quick", action="store_true", help="tiny vocabulary and sequences, for a smoke test")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.seq_lens, args.batch_size, args.warmup_steps, args.steps = [64], 2, 1, 2
        args.vocab, args.hidden, args.intermediate = 3000, 64, 128
    for name in ("batch_size", "steps", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    if args.warmup_steps < 0:
        p.error(f"--warmup-steps must be 0 or more, got {args.warmup_steps}.")
    if any(t < 4 or t % 2 for t in args.seq_lens):
        p.error("--seq-lens must be even numbers >= 4 (half prompt, half completion).")
    return args


# ----------------------------------------------------------------------------- worker


def _build_model(spec: dict[str, Any], seed: int) -> Any:
    """The Qwen2 decoder of the spec, float32, seeded: identical weights in every process."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    m = spec["model"]
    config = Qwen2Config(
        vocab_size=m["vocab"],
        hidden_size=m["hidden"],
        num_hidden_layers=m["layers"],
        num_attention_heads=m["heads"],
        num_key_value_heads=m["kv_heads"],
        intermediate_size=m["intermediate"],
        max_position_embeddings=max(spec["seq_len"], 2048),
        tie_word_embeddings=m["tie_embeddings"],
        use_cache=False,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).to(device=spec["device"], dtype=torch.float32)


def _single_token_words(tokenizer: Any) -> list[str]:
    """Words ``w`` such that ``" " + w`` is exactly one token: text made of them has a known length."""
    words = []
    for token in sorted(tokenizer.get_vocab()):
        if token.startswith("\u0120") and token[1:].isalpha() and token[1:].isascii():
            word = token[1:]
            if len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1:
                words.append(word)
    if len(words) < 50:
        raise RuntimeError(f"only {len(words)} single-token words in the tokenizer; need at least 50")
    return words


def _build_dataset(spec: dict[str, Any], tokenizer: Any) -> Any:
    """Standard pairs: prompt of T/2 tokens, chosen and rejected of T/2 - 1 tokens + EOS."""
    import random

    from datasets import Dataset

    words = _single_token_words(tokenizer)
    rng = random.Random(spec["seed"] + 1)
    half = spec["seq_len"] // 2
    n = spec["batch_size"] * (spec["warmup_steps"] + spec["steps"])

    def text(k: int) -> str:
        return "".join(" " + rng.choice(words) for _ in range(k))

    return Dataset.from_dict({
        "prompt": [text(half) for _ in range(n)],
        "chosen": [text(half - 1) for _ in range(n)],
        "rejected": [text(half - 1) for _ in range(n)],
    })


def _common_args(spec: dict[str, Any], output_dir: str) -> dict[str, Any]:
    """DPOConfig fields shared by both libraries: fp32, AdamW, no checkpointing, no I/O."""
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": spec["batch_size"],
        "gradient_accumulation_steps": 1,
        "max_steps": spec["warmup_steps"] + spec["steps"],
        "learning_rate": 1e-4,
        "lr_scheduler_type": "constant",
        "weight_decay": 0.0,
        "gradient_checkpointing": False,
        "bf16": False,
        "fp16": False,
        "use_cpu": spec["device"] == "cpu",
        "seed": spec["seed"],
        "logging_steps": 1,  # logs run after on_step_end: outside the timed window
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "beta": 0.1,
        "max_length": spec["seq_len"],
    }


def _make_trainer(spec: dict[str, Any], model: Any, ref: Any, dataset: Any, tokenizer: Any, output_dir: str,
                  callback: Any) -> Any:
    library, common = spec["library"], _common_args(spec, output_dir)
    if library.startswith("honelm"):
        from honelm.methods.dpo import DPOConfig, DPOTrainer

        common["padding_free"] = library == "honelm-padding-free"
    else:
        from trl import DPOConfig, DPOTrainer
    return DPOTrainer(
        model=model, ref_model=ref, args=DPOConfig(**common), train_dataset=dataset, processing_class=tokenizer,
        callbacks=[callback],
    )


def _check_lengths(trainer: Any, spec: dict[str, Any]) -> None:
    """Every prompt and completion has exactly the intended number of tokens, in either library."""
    half = spec["seq_len"] // 2
    dataset = trainer.train_dataset
    names = dataset.column_names
    prefix = "_input_ids" if "prompt_input_ids" in names else "_ids"
    for part in ("prompt", "chosen", "rejected"):
        lengths = {len(ids) for ids in dataset[part + prefix]}
        if lengths != {half}:
            raise RuntimeError(f"{spec['library']}: {part} lengths {sorted(lengths)}, expected {half} tokens each.")


def _timer_callback() -> Any:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall and process CPU time of each optimizer step, and the logged training losses."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.cpu_times: list[float] = []
            self.losses: list[float] = []
            self._t0 = self._c0 = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            _sync(args.device)
            self._t0, self._c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            _sync(args.device)
            self.times.append(time.perf_counter() - self._t0)
            self.cpu_times.append(time.process_time() - self._c0)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return StepTimer()


def _sync(device: Any) -> None:
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize()


def _watch_batches(trainer: Any, spec: dict[str, Any]) -> list[dict[str, int]]:
    """Wrap the trainer's collator to record (and check) what each step computes on."""
    collate, seen = trainer.data_collator, []
    rows, width = 2 * spec["batch_size"], spec["seq_len"]

    def watching(features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(features)
        shape = tuple(batch["input_ids"].shape)
        if shape not in ((rows, width), (1, rows * width)):
            raise RuntimeError(
                f"{spec['library']}: a batch has input_ids of shape {shape}, expected {(rows, width)} "
                f"(or {(1, rows * width)} padding-free): the libraries would not do the same work."
            )
        mask = batch.get("completion_mask")
        scored = mask[:, 1:].sum() if mask is not None else (batch["labels"] != -100).sum()
        seen.append({"tokens": int(batch["input_ids"].numel()), "scored": int(scored)})
        return batch

    trainer.data_collator = watching
    return seen


def _measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Build everything, then train while measuring step times and peak memory."""
    import torch

    from honelm.testing import tiny_tokenizer

    torch.manual_seed(spec["seed"])
    model = _build_model(spec, spec["seed"])
    ref = _build_model(spec, spec["seed"] + 1)
    n_params = sum(p.numel() for p in model.parameters())
    checksum = sum(float(p.double().sum()) for p in model.parameters())
    tokenizer = tiny_tokenizer()
    if len(tokenizer) > spec["model"]["vocab"]:
        raise RuntimeError(f"--vocab {spec['model']['vocab']} is smaller than the tokenizer's {len(tokenizer)} ids.")
    dataset = _build_dataset(spec, tokenizer)
    timer = _timer_callback()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = _make_trainer(spec, model, ref, dataset, tokenizer, output_dir, timer)
        _check_lengths(trainer, spec)
        batches = _watch_batches(trainer, spec)
        memory = PeakMemory(spec["device"])
        memory.start()
        trainer.train()
        memory.stop()
        optim = str(getattr(trainer.args.optim, "value", trainer.args.optim))
    warm = spec["warmup_steps"]
    measured = timer.times[warm:]
    mean = statistics.mean(measured)
    return {
        "library": spec["library"], "seq_len": spec["seq_len"], "batch_size": spec["batch_size"],
        "step_seconds": measured, "warmup_seconds": timer.times[:warm],
        "mean_step_seconds": mean, "tokens_per_second": 2 * spec["batch_size"] * spec["seq_len"] / mean,
        "cpu_step_seconds": timer.cpu_times[warm:], "mean_cpu_step_seconds": statistics.mean(timer.cpu_times[warm:]),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "peak_bytes": memory.peak_bytes, "baseline_bytes": memory.baseline_bytes, "memory_method": memory.method,
        "losses": timer.losses, "batches": batches, "num_params": n_params, "weights_checksum": checksum,
        "optim": optim, "threads": torch.get_num_threads(),
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
    """Median step time and tokens/s, and the largest peak, over the repeats of one case."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0]["error"] if runs else "not run"}
    best = dict(ok[0])
    for key in ("tokens_per_second", "mean_step_seconds", "mean_cpu_step_seconds"):
        best[key] = statistics.median(r[key] for r in ok)
    loads = [r["load_average"] for r in ok if r.get("load_average") is not None]
    best["load_average"] = max(loads) if loads else None
    best["peak_bytes"] = max(r["peak_bytes"] for r in ok)
    best["all_step_seconds"] = [s for r in ok for s in r["step_seconds"]]
    return best


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> float | None:
    if not a or not b or "error" in a or "error" in b or not b[key]:
        return None
    return a[key] / b[key]


def _row(seq_len: int, batch: int, library: str, res: dict[str, Any], trl: dict[str, Any] | None) -> str:
    if "error" in res:
        return f"| {seq_len} | {batch} | {library} | {res['error']} | - | - | - | - | - | - |"
    steps = res["all_step_seconds"]
    spread = f"{min(steps):.2f}-{max(steps):.2f}" if len(steps) > 1 else f"{steps[0]:.2f}"
    speed = _ratio(res, trl, "tokens_per_second") if library != "trl" else None
    mem = _ratio(res, trl, "peak_bytes") if library != "trl" else None
    load = "-" if res.get("load_average") is None else f"{res['load_average']:.1f}"
    return (
        f"| {seq_len} | {batch} | {library} | {res['tokens_per_second']:,.0f} | {res['mean_step_seconds']:.2f} "
        f"({spread}) | {res['mean_cpu_step_seconds']:.2f} | {res['peak_bytes'] / GIB:.2f} "
        f"| {'-' if speed is None else f'{speed:.2f}x'} | {'-' if mem is None else f'{mem:.2f}'} | {load} |"
    )


def _checks(results: dict[tuple[int, str], dict[str, Any]]) -> list[str]:
    """Same weights, same scored tokens, same losses across libraries: the same work."""
    notes = []
    for seq_len in sorted({k[0] for k in results}):
        ok = {lib: r for (t, lib), r in results.items() if t == seq_len and "error" not in r}
        if len(ok) < 2:
            continue
        sums = {lib: r["weights_checksum"] for lib, r in ok.items()}
        scored = {lib: sorted({b["scored"] for b in r["batches"]}) for lib, r in ok.items()}
        same_w = max(sums.values()) - min(sums.values()) <= 1e-6 * max(1.0, abs(min(sums.values())))
        same_s = len({tuple(v) for v in scored.values()}) == 1
        losses = "; ".join(f"{lib} " + ", ".join(f"{v:.5f}" for v in r["losses"]) for lib, r in ok.items())
        notes.append(
            f"- T={seq_len}: initial weights {'identical' if same_w else 'DIFFERENT'} (checksum); scored "
            f"tokens per step {'equal' if same_s else 'DIFFERENT'} ({scored}); losses per step: {losses}."
        )
    return notes


def _header(args: argparse.Namespace, limit: float | None) -> list[str]:
    tie = "untied" if args.untie_embeddings else "tied"
    return [
        f"Machine: {describe_machine(args.device, PACKAGES)}",
        "",
        f"Model: Qwen2, vocab {args.vocab:,}, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, "
        f"{args.kv_heads} kv heads, intermediate {args.intermediate}, {tie} embeddings; float32 on {args.device}; "
        "a reference model of the same shape (other weights). Data: B pairs per step, each a T/2-token prompt "
        "with T/2-token chosen and rejected completions (2B sequences of exactly T tokens, no padding). Steps: "
        f"{args.warmup_steps} warm-up + {args.steps} measured; gradient_accumulation_steps=1, no gradient "
        "checkpointing, AdamW (lr 1e-4, constant), max_grad_norm 1.0, beta 0.1, sigmoid loss.",
        "Step time: TrainerCallback on_step_begin -> on_step_end (reference forward, policy forward + backward, "
        "clipping, optimizer step), measured steps only; tokens/s = 2 * B * T / mean step time. Peak memory: "
        "what trainer.train() adds on top of the built models, data and trainer, in a fresh process per case ("
        + ("torch.cuda.max_memory_allocated" if args.device.startswith("cuda")
           else "peak resident set VmHWM, reset before training, minus the resident set then")
        + "); it includes gradients and AdamW states. load: the machine's 1-minute load average when the case "
        "ended.",
        *([f"Each case's virtual memory is capped at {limit:.1f} GiB; a case over it shows OOM."] if limit else []),
        "",
    ]


def _run_all(args: argparse.Namespace, libraries: list[str], limit: float | None) -> dict[tuple[int, str], Any]:
    model = {"vocab": args.vocab, "hidden": args.hidden, "layers": args.layers, "heads": args.heads,
             "kv_heads": args.kv_heads, "intermediate": args.intermediate, "tie_embeddings": not args.untie_embeddings}
    script = os.path.abspath(__file__)
    raw: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for seq_len in args.seq_lens:
        for rep in range(args.repeats):
            order = libraries if rep % 2 == 0 else libraries[::-1]  # alternate to spread machine noise
            for lib in order:
                spec = {"library": lib, "seq_len": seq_len, "batch_size": args.batch_size, "seed": args.seed,
                        "warmup_steps": args.warmup_steps, "steps": args.steps, "device": args.device,
                        "model": model, "memory_limit_gib": limit}
                start = time.perf_counter()
                res = run_worker(script, spec, args.case_timeout)
                raw.setdefault((seq_len, lib), []).append(res)
                status = res.get("error") or f"{res['tokens_per_second']:,.0f} tokens/s, " \
                    f"peak {res['peak_bytes'] / GIB:.2f} GiB"
                print(f"  [{lib} T={seq_len} run {rep + 1}] {status} ({time.perf_counter() - start:.0f} s)",
                      file=sys.stderr, flush=True)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump([{"case": list(k), "runs": v} for k, v in raw.items()], f, indent=1)
    return {k: _summarize(v) for k, v in raw.items()}


def _report(args: argparse.Namespace, libraries: list[str], results: dict[tuple[int, str], Any]) -> None:
    print("| T | pairs | library | tokens/s | step s (min-max) | CPU s/step | peak GiB | tokens/s vs TRL "
          "| peak vs TRL | load |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for seq_len in args.seq_lens:
        trl = results.get((seq_len, "trl"))
        for lib in libraries:
            print(_row(seq_len, args.batch_size, lib, results[(seq_len, lib)], trl))
    ok = [r for r in results.values() if "error" not in r]
    if ok:
        n = ok[0]["num_params"]
        print(f"\nParameters of the policy: {n:,} ({n / 1e6:.1f}M); the reference has as many. Gradients + AdamW "
              f"states, part of every peak: {3 * 4 * n / GIB:.2f} GiB. Optimizer: {ok[0]['optim']}.")
    checks = _checks(results)
    if checks:
        print("\nSame work in every library:\n" + "\n".join(checks))


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
