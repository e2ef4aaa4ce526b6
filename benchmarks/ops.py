"""Peak memory and time of the chunked LM-head ops against the naive full-logits path.

For each case (tokens x vocab, hidden size fixed) and each kernel, the naive computation
(``hidden @ weight.T`` -> ``log_softmax`` / ``cross_entropy``) and the chunked op from
``honelm.ops`` run forward + backward, each in a fresh subprocess so that one cannot
inflate the other's memory. Results are printed as a markdown table.

Peak memory is what the forward + backward adds on top of the inputs:
* CPU: the process's peak resident set (``VmHWM``) is reset through
  ``/proc/self/clear_refs`` right before the measured run and read after it, minus the
  resident set at that moment (falls back to ``ru_maxrss`` where that is unavailable);
* CUDA: ``torch.cuda.max_memory_allocated()`` minus the memory allocated before the run.

Examples::

    python benchmarks/ops.py --quick
    python benchmarks/ops.py --tokens 4096 8192 --vocab 151936
    python benchmarks/ops.py --device cuda --dtype bfloat16 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

KERNELS = ("selective_logps", "selective_logps+entropy", "selective_logps:frozen_head", "cross_entropy")
# ":frozen_head": the LM head weight does not require grad (e.g. LoRA on the body); only the
# hidden states get a gradient, in both the naive and the chunked run.


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Peak memory and time of honelm.ops chunked kernels vs the naive full-logits path "
        "(forward + backward). Prints a markdown table."
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 8192], help="numbers of tokens N")
    parser.add_argument("--vocab", type=int, nargs="+", default=[151936], help="vocabulary sizes V")
    parser.add_argument("--hidden", type=int, default=896, help="hidden size H (default 896, Qwen2.5-0.5B)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--kernels", nargs="+", choices=KERNELS, default=["selective_logps", "cross_entropy"], help="kernels to run"
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs per case; the median time is reported")
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per tile (default: automatic)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test (seconds)")
    parser.add_argument("--skip-naive", action="store_true", help="only run the chunked kernels")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.vocab, args.hidden = [64, 512], [1000, 32000], 64
    return args


# ----------------------------------------------------------------------------- worker


def _rss_bytes(field: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of this process in bytes, None where /proc is unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the peak resident set size of this process (Linux); True on success."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _make_inputs(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    dev, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    n, v, h = spec["tokens"], spec["vocab"], spec["hidden"]
    hidden = torch.empty(n, h, device=dev, dtype=dtype).normal_()  # (N, H), filled in place: no temporaries
    weight = torch.empty(v, h, device=dev, dtype=dtype).normal_(std=0.02)  # (V, H)
    hidden.requires_grad_()
    weight.requires_grad_(not spec["kernel"].endswith(":frozen_head"))
    targets = torch.randint(0, v, (n,), device=dev)  # (N,)
    coeffs = torch.randn(n, device=dev)  # (N,) per-token loss weights, like advantages
    return {"hidden": hidden, "weight": weight, "targets": targets, "coeffs": coeffs}


def _loss(spec: dict[str, Any], x: dict[str, Any]) -> Any:
    import torch
    import torch.nn.functional as F

    from honelm.ops import chunked_cross_entropy, selective_logps

    hidden, weight, targets, coeffs = x["hidden"], x["weight"], x["targets"], x["coeffs"]
    kernel, chunked = spec["kernel"], spec["impl"] == "chunked"
    if kernel == "cross_entropy":
        if chunked:
            return chunked_cross_entropy(hidden, weight, targets, chunk_size=spec["chunk_size"])
        return F.cross_entropy((hidden @ weight.T).float(), targets)
    entropy_wanted = kernel.split(":")[0].endswith("+entropy")
    if chunked:
        out = selective_logps(hidden, weight, targets, chunk_size=spec["chunk_size"], return_entropy=entropy_wanted)
        logps, entropy = out if entropy_wanted else (out, None)
    else:
        logp_all = torch.log_softmax((hidden @ weight.T).float(), dim=-1)  # (N, V)
        logps = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1) if entropy_wanted else None
    loss = (logps * coeffs).sum()
    return loss if entropy is None else loss + 0.01 * entropy.sum()


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One forward + backward, measured; runs inside its own process."""
    import torch

    cuda = spec["device"].startswith("cuda")
    tiny = dict(spec, tokens=8, vocab=32, hidden=16)
    _loss(tiny, _make_inputs(tiny)).backward()  # warm-up: library initialization is not timed
    x = _make_inputs(spec)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        exact = _reset_peak_rss()
        base = _rss_bytes("VmRSS") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    _loss(spec, x).backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_seconds = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    elif exact:
        peak = _rss_bytes("VmHWM") - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_bytes": peak, "load": os.getloadavg()[0]}


# ----------------------------------------------------------------------------- driver


def _run_case(spec: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-5:]
        return {"error": f"exit code {proc.returncode}: " + " | ".join(tail)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _machine(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = f"{names[0]} x {len(names)} logical CPUs" if names else cpu
    except OSError:
        pass
    return f"{cpu}, torch {torch.__version__} ({torch.get_num_threads()} threads), {platform.system()}"


def _summary(runs: list[dict]) -> dict[str, Any]:
    """Median times, largest peak, and the first error of one implementation's runs."""
    ok = [r for r in runs if "error" not in r]
    errors = [r["error"] for r in runs if "error" in r]
    if not ok:
        return {"error": errors[0] if errors else None}
    return {
        "seconds": statistics.median(r["seconds"] for r in ok),
        "cpu_seconds": statistics.median(r["cpu_seconds"] for r in ok),
        "peak_mib": max(r["peak_bytes"] for r in ok) / 2**20,
        "load": max(r["load"] for r in ok),
        "error": errors[0] if errors else None,
    }


def _fmt_row(kernel: str, n: int, v: int, args: argparse.Namespace, res: dict[str, list[dict]]) -> str:
    naive, chunked = _summary(res.get("naive", [])), _summary(res.get("chunked", []))

    def cell(d: dict, key: str, fmt: str) -> str:
        return fmt.format(d[key]) if key in d else "-"

    def ratio(key: str, fmt: str, invert: bool = False) -> str:
        if key not in naive or key not in chunked:
            return "-"
        a, b = (naive[key], chunked[key]) if invert else (chunked[key], naive[key])
        return fmt.format(a / b)

    note = "; ".join(e for e in (naive.get("error"), chunked.get("error")) if e)
    load = max(naive.get("load", 0.0), chunked.get("load", 0.0))
    row = (
        f"| {kernel} | {n} | {v} | {args.hidden} | {args.dtype} "
        f"| {cell(naive, 'seconds', '{:.1f}')} | {cell(chunked, 'seconds', '{:.1f}')} "
        f"| {ratio('seconds', '{:.2f}x', invert=True)} "
        f"| {cell(naive, 'cpu_seconds', '{:.1f}')} | {cell(chunked, 'cpu_seconds', '{:.1f}')} "
        f"| {ratio('cpu_seconds', '{:.2f}x', invert=True)} "
        f"| {cell(naive, 'peak_mib', '{:.0f}')} | {cell(chunked, 'peak_mib', '{:.0f}')} "
        f"| {ratio('peak_mib', '{:.3f}')} | {load:.1f} |"
    )
    return row + (f" {note}" if note else "")


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return
    impls = ["chunked"] if args.skip_naive else ["naive", "chunked"]
    print(f"Machine: {_machine(args.device)}\n")
    print(
        "Forward + backward. Times are medians over repeats: wall-clock seconds and CPU seconds (all threads; "
        "less sensitive to other processes on a shared machine). Speedup = naive / chunked. Peak memory is "
        "what the run adds on top of its inputs; peak ratio = chunked / naive. Load = the 1-minute load "
        "average seen by the runs (above the number of cores means the machine was shared).\n"
    )
    print("| kernel | tokens | vocab | hidden | dtype | naive s | chunked s | speedup | naive CPU s | chunked CPU s "
          "| CPU speedup | naive peak MiB | chunked peak MiB | peak ratio | load |")
    print("|" + "---|" * 15)
    for v in args.vocab:
        for n in args.tokens:
            for kernel in args.kernels:
                res: dict[str, list[dict]] = {}
                for rep in range(args.repeats):
                    order = impls if rep % 2 == 0 else impls[::-1]  # alternate to spread machine noise
                    for impl in order:
                        spec = {"kernel": kernel, "impl": impl, "tokens": n, "vocab": v, "hidden": args.hidden,
                                "dtype": args.dtype, "device": args.device, "chunk_size": args.chunk_size}
                        res.setdefault(impl, []).append(_run_case(spec))
                print(_fmt_row(kernel, n, v, args, res), flush=True)


if __name__ == "__main__":
    main()
