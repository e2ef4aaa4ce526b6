"""Throughput and peak memory of SFT training steps: honelm's SFTTrainer against TRL's.

The model is a small Qwen2 decoder with a 151,936-token vocabulary (hidden 256, 4 layers,
4 attention heads, 2 key-value heads, intermediate 768, LM head tied to the embeddings:
about 42M parameters), so the LM head dominates the cost of a step, as it does for real
models at long sequence lengths. Every library trains the same model (same initial
weights, checked by a checksum) on the same synthetic rows of random token ids, all
exactly ``seq_len`` long (no padding, no packing), in the same precision (float32, or
``--dtype bfloat16``: ``bf16=True`` mixed precision, TRL's default) with the same
optimizer settings:

* ``honelm``: ``honelm.SFTTrainer``; loss, entropy and token accuracy from the final hidden
  states through the chunked LM-head kernel of ``honelm.ops`` (no full logits).
* ``trl``: ``trl.SFTTrainer`` with its default loss path (when TRL is installed; TRL is a
  benchmark-only dependency). Recent TRL versions also compute the loss, entropy and
  token accuracy through a chunked LM head of their own.
* ``transformers``: a plain ``transformers.Trainer`` with the model's own loss: the
  ``(tokens, vocab)`` float32 logits are materialized. Reference point only; it computes
  no entropy or accuracy.

Each (library, seq_len) case runs in a fresh subprocess. Step time is measured with a
``TrainerCallback`` (``on_step_begin`` to ``on_step_end``: forward, backward, gradient
clipping, optimizer step) on the steps after the warm-up ones; tokens/s is
``batch * seq_len / mean step time``. Peak memory is what ``trainer.train()`` adds on top
of the process once model, data and trainer are built (see ``benchmarks/_common.py``):
activations, LM-head temporaries, gradients and optimizer states.

Examples::

    python benchmarks/sft.py --quick                    # smoke test, well under a minute
    python benchmarks/sft.py                            # 8 x {512, 1024, 2048} on CPU
    python benchmarks/sft.py --seq-lens 2048 --batch-size 4
    python benchmarks/sft.py --dtype bfloat16 --seq-lens 512   # bf16 mixed precision everywhere
    python benchmarks/sft.py --device cuda --seq-lens 512 1024 2048 4096
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

LIBRARIES = ("honelm", "trl", "transformers")
PACKAGES = ["honelm", "torch", "transformers", "trl", "accelerate", "datasets"]
TARGET_SEQ_LEN, TARGET_SPEEDUP, TARGET_MEMORY = 512, 2.0, 0.5


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Tokens/s and peak memory of SFT training steps, honelm.SFTTrainer vs trl.SFTTrainer "
        "(and a plain transformers.Trainer with full logits). Prints a markdown table."
    )
    p.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024, 2048], help="sequence lengths T")
    p.add_argument("--batch-size", type=int, default=8, help="rows per step B (per_device_train_batch_size)")
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
    p.add_argument("--untied-embeddings", dest="tie_embeddings", action="store_false",
                   help="a separate LM head (default: tied to the input embeddings, ~42M parameters)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="float32, or bfloat16 mixed precision (bf16=True: autocast, float32 master weights) "
                        "in every library")
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
        args.vocab, args.hidden, args.layers, args.intermediate = 4096, 64, 2, 128
    for name in ("batch_size", "steps", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    if args.warmup_steps < 0:
        p.error(f"--warmup-steps must be 0 or more, got {args.warmup_steps}.")
    return args


# ----------------------------------------------------------------------------- worker


def _build_model(spec: dict[str, Any]) -> Any:
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
    torch.manual_seed(spec["seed"])
    return Qwen2ForCausalLM(config).to(device=spec["device"], dtype=torch.float32)


def _build_dataset(spec: dict[str, Any]) -> Any:
    """Pre-tokenized rows of random ids, each exactly ``seq_len`` long: one per row of each step."""
    import torch
    from datasets import Dataset

    rows = spec["batch_size"] * (spec["warmup_steps"] + spec["steps"])
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    ids = torch.randint(0, spec["model"]["vocab"], (rows, spec["seq_len"]), generator=gen)  # (rows, T)
    return Dataset.from_dict({"input_ids": ids.tolist()})


def _common_args(spec: dict[str, Any], output_dir: str) -> dict[str, Any]:
    """TrainingArguments fields shared by every library: fp32, AdamW, no checkpointing, no I/O."""
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": spec["batch_size"],
        "gradient_accumulation_steps": 1,
        "max_steps": spec["warmup_steps"] + spec["steps"],
        "learning_rate": 1e-4,
        "lr_scheduler_type": "constant",
        "weight_decay": 0.0,
        "gradient_checkpointing": False,
        "bf16": spec["dtype"] == "bfloat16",
        "fp16": False,
        "use_cpu": spec["device"] == "cpu",
        "seed": spec["seed"],
        "logging_steps": 1,  # logs run after on_step_end: outside the timed window
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


def _full_logits_collator(features: list[dict[str, Any]]) -> dict[str, Any]:
    """Equal-length rows -> input_ids, attention_mask, labels (the model shifts them itself)."""
    import torch

    ids = torch.tensor([f["input_ids"] for f in features])  # (B, T)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _make_trainer(spec: dict[str, Any], model: Any, dataset: Any, output_dir: str, callback: Any) -> Any:
    library, common = spec["library"], _common_args(spec, output_dir)
    if library == "transformers":
        from transformers import Trainer, TrainingArguments

        return Trainer(
            model=model, args=TrainingArguments(**common), train_dataset=dataset,
            data_collator=_full_logits_collator, callbacks=[callback],
        )
    from honelm.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()  # only its pad/eos ids are used: the data is already tokenized
    sft = {"max_length": spec["seq_len"], "packing": False, "padding_free": False}
    if library == "honelm":
        from honelm import SFTConfig, SFTTrainer
    else:
        from trl import SFTConfig, SFTTrainer
    return SFTTrainer(
        model=model, args=SFTConfig(**common, **sft), train_dataset=dataset,
        processing_class=tokenizer, callbacks=[callback],
    )


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
            self.cpu_times.append(time.process_time() - self._c0)  # all threads of the process

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return StepTimer()


def _sync(device: Any) -> None:
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize()


def _watch_batches(trainer: Any, spec: dict[str, Any]) -> list[dict[str, int]]:
    """Wrap the trainer's collator to record (and check) what each step really computes on."""
    collate, seen = trainer.data_collator, []

    def watching(features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(features)
        shape = tuple(batch["input_ids"].shape)
        if shape != (spec["batch_size"], spec["seq_len"]):
            raise RuntimeError(
                f"{spec['library']}: a batch has input_ids of shape {shape}, expected "
                f"{(spec['batch_size'], spec['seq_len'])}: the libraries would not do the same work."
            )
        mask = batch.get("attention_mask")
        seen.append({
            "tokens": int(batch["input_ids"].numel() if mask is None else mask.sum()),
            # scored next-token targets: position 0 is never one (honelm's collator already masks it)
            "scored": int((batch["labels"][:, 1:] != -100).sum()),
        })
        return batch

    trainer.data_collator = watching
    return seen


def _measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Build everything, then train while measuring step times and peak memory."""
    import torch

    torch.manual_seed(spec["seed"])
    model = _build_model(spec)
    n_params = sum(p.numel() for p in model.parameters())
    checksum = sum(float(p.double().sum()) for p in model.parameters())
    dataset = _build_dataset(spec)
    timer = _timer_callback()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = _make_trainer(spec, model, dataset, output_dir, timer)
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
        "mean_step_seconds": mean, "tokens_per_second": spec["batch_size"] * spec["seq_len"] / mean,
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
    """Median tokens/s and the largest peak over the repeats of one case."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0]["error"] if runs else "not run"}
    best = dict(ok[0])
    best["tokens_per_second"] = statistics.median(r["tokens_per_second"] for r in ok)
    best["mean_step_seconds"] = statistics.median(r["mean_step_seconds"] for r in ok)
    best["mean_cpu_step_seconds"] = statistics.median(r["mean_cpu_step_seconds"] for r in ok)
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
    spread = f"{min(steps):.1f}-{max(steps):.1f}" if len(steps) > 1 else f"{steps[0]:.1f}"
    speed = _ratio(res, trl, "tokens_per_second") if library != "trl" else None
    mem = _ratio(res, trl, "peak_bytes") if library != "trl" else None
    load = "-" if res.get("load_average") is None else f"{res['load_average']:.1f}"
    return (
        f"| {seq_len} | {batch} | {library} | {res['tokens_per_second']:,.0f} | {res['mean_step_seconds']:.1f} "
        f"({spread}) | {res['mean_cpu_step_seconds']:.1f} | {res['peak_bytes'] / GIB:.2f} "
        f"| {'-' if speed is None else f'{speed:.2f}x'} | {'-' if mem is None else f'{mem:.2f}'} | {load} |"
    )


def _checks(results: dict[tuple[int, str], dict[str, Any]]) -> list[str]:
    """Same weights, same scored tokens, same first-step loss across libraries: the same work."""
    notes = []
    for seq_len in sorted({k[0] for k in results}):
        ok = {lib: r for (t, lib), r in results.items() if t == seq_len and "error" not in r}
        if len(ok) < 2:
            continue
        sums = {lib: r["weights_checksum"] for lib, r in ok.items()}
        scored = {lib: sorted({b["scored"] for b in r["batches"]}) for lib, r in ok.items()}
        first = {lib: r["losses"][0] for lib, r in ok.items() if r["losses"]}
        same_w = max(sums.values()) - min(sums.values()) <= 1e-6 * max(1.0, abs(min(sums.values())))
        same_s = len({tuple(v) for v in scored.values()}) == 1
        loss_text = ", ".join(f"{lib} {v:.5f}" for lib, v in first.items())
        notes.append(
            f"- T={seq_len}: initial weights {'identical' if same_w else 'DIFFERENT'} (checksum); scored "
            f"tokens per step {'equal' if same_s else 'DIFFERENT'} ({scored}); first-step loss: {loss_text}."
        )
    return notes


def _target_lines(results: dict[tuple[int, str], dict[str, Any]], batch: int) -> list[str]:
    honelm, trl = results.get((TARGET_SEQ_LEN, "honelm")), results.get((TARGET_SEQ_LEN, "trl"))
    speed, mem = _ratio(honelm, trl, "tokens_per_second"), _ratio(honelm, trl, "peak_bytes")
    if speed is None or mem is None:
        return []
    return [
        f"Target at {batch} x {TARGET_SEQ_LEN}: tokens/s >= {TARGET_SPEEDUP:.0f}x TRL's -> measured {speed:.2f}x "
        f"({'met' if speed >= TARGET_SPEEDUP else 'NOT met'}); peak memory <= {TARGET_MEMORY}x TRL's -> measured "
        f"{mem:.2f}x ({'met' if mem <= TARGET_MEMORY else 'NOT met'})."
    ]


def _growth_lines(results: dict[tuple[int, str], dict[str, Any]], libraries: list[str]) -> list[str]:
    lines = []
    for lib in libraries:
        ok = sorted((t, r) for (t, name), r in results.items() if name == lib and "error" not in r)
        if len(ok) < 2:
            continue
        (t0, r0), (t1, r1) = ok[0], ok[-1]
        lines.append(
            f"- {lib}: from T={t0} to T={t1} ({t1 / t0:.0f}x the tokens), peak memory x"
            f"{r1['peak_bytes'] / max(r0['peak_bytes'], 1):.2f}, tokens/s x"
            f"{r1['tokens_per_second'] / r0['tokens_per_second']:.2f}."
        )
    return lines


def _header(args: argparse.Namespace, limit: float | None) -> list[str]:
    lines = [f"Machine: {describe_machine(args.device, PACKAGES)}", ""]
    tie = "tied" if args.tie_embeddings else "untied"
    lines.append(
        f"Model: Qwen2, vocab {args.vocab:,}, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, "
        f"{args.kv_heads} kv heads, intermediate {args.intermediate}, {tie} embeddings; "
        f"{'float32' if args.dtype == 'float32' else 'float32 weights, bf16 mixed precision (bf16=True)'} on {args.device}. "
        f"Data: random token ids, every row exactly T tokens (no padding, no packing), all tokens labelled. "
        f"Steps: {args.warmup_steps} warm-up + {args.steps} measured; gradient_accumulation_steps=1, "
        f"no gradient checkpointing, AdamW (lr 1e-4, constant), max_grad_norm 1.0."
    )
    lines.append(
        "Step time: TrainerCallback on_step_begin -> on_step_end (forward, backward, clipping, optimizer step), "
        "measured steps only; tokens/s = batch * T / mean step time. Peak memory: what trainer.train() adds "
        "on top of the built model, data and trainer, in a fresh process per case ("
        + ("torch.cuda.max_memory_allocated" if args.device.startswith("cuda")
           else "peak resident set VmHWM, reset before training, minus the resident set then")
        + "); it includes gradients and AdamW states. CPU s/step: process CPU time (all threads) per "
        "measured step. load: the machine's 1-minute load average when the case ended (other work on the "
        "machine slows every number down)."
    )
    lines.append(
        "Per-token metrics: honelm and TRL both compute entropy and token accuracy from the same LM-head tiles "
        "as the loss; transformers (plain Trainer, the model's own loss on full float32 logits) computes none."
    )
    if limit:
        lines.append(f"Each case's virtual memory is capped at {limit:.1f} GiB; a case over it shows OOM.")
    return lines + [""]


def _run_all(args: argparse.Namespace, libraries: list[str], limit: float | None) -> dict[tuple[int, str], Any]:
    model = {"vocab": args.vocab, "hidden": args.hidden, "layers": args.layers, "heads": args.heads,
             "kv_heads": args.kv_heads, "intermediate": args.intermediate, "tie_embeddings": args.tie_embeddings}
    script = os.path.abspath(__file__)
    raw: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for seq_len in args.seq_lens:
        for rep in range(args.repeats):
            order = libraries if rep % 2 == 0 else libraries[::-1]  # alternate to spread machine noise
            for lib in order:
                spec = {"library": lib, "seq_len": seq_len, "batch_size": args.batch_size, "seed": args.seed,
                        "warmup_steps": args.warmup_steps, "steps": args.steps, "device": args.device, "dtype": args.dtype,
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
    print("| T | batch | library | tokens/s | step s (min-max) | CPU s/step | peak GiB | tokens/s vs TRL "
          "| peak vs TRL | load |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for seq_len in args.seq_lens:
        trl = results.get((seq_len, "trl"))
        for lib in libraries:
            print(_row(seq_len, args.batch_size, lib, results[(seq_len, lib)], trl))
    ok = [r for r in results.values() if "error" not in r]
    if ok:
        n = ok[0]["num_params"]
        print(f"\nParameters: {n:,} ({n / 1e6:.1f}M). Gradients + AdamW states, part of every peak: "
              f"{3 * 4 * n / GIB:.2f} GiB. Optimizer: {ok[0]['optim']}.")
    for line in _target_lines(results, args.batch_size):
        print("\n" + line)
    growth = _growth_lines(results, libraries)
    if growth:
        print("\nGrowth with sequence length:\n" + "\n".join(growth))
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
