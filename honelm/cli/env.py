"""``honelm env``: the versions and hardware to paste into a bug report."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform


_PACKAGES = ("honelm", "torch", "transformers", "datasets", "accelerate", "peft", "safetensors",
             "tokenizers", "vllm", "deepspeed", "flash-attn", "bitsandbytes", "liger-kernel")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="Print the report as JSON.")


def collect() -> dict[str, object]:
    """Versions of the relevant packages and a description of the machine."""
    info: dict[str, object] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    for name in _PACKAGES:
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = "not installed"
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages * page_size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        info["memory_gib"] = "unknown"
    import torch

    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["gpus"] = [
            f"{torch.cuda.get_device_name(i)} ({torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB)"
            for i in range(torch.cuda.device_count())
        ]
    info["mps_available"] = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return info


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        import json

        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    print("Copy this into your bug report:\n")
    for key, value in info.items():
        if isinstance(value, list):
            value = "; ".join(value)
        print(f"- {key.ljust(width)}  {value}")
    return 0
