"""Helpers shared by the benchmark scripts: peak memory, worker subprocesses, machine info.

Every benchmark case runs in a fresh Python process (``run_worker``), so that one case's
allocations, caches and allocator state cannot inflate another's peak memory. Inside the
worker, :class:`PeakMemory` measures what a block of work adds on top of what was already
resident:

* CPU: the process's peak resident set (``VmHWM``) is reset through
  ``/proc/self/clear_refs`` when the measurement starts and read when it ends, minus the
  resident set at the start. Where ``/proc`` is unavailable, ``ru_maxrss`` is used instead
  (it cannot be reset, so the measurement only counts peaks above any earlier one).
* CUDA: ``torch.cuda.max_memory_allocated()`` minus the memory allocated at the start.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
from importlib import metadata
from typing import Any

GIB = 2**30

OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "memoryerror")


# ----------------------------------------------------------------------------- memory


def rss_bytes(field: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` / ``VmSize`` of this process in bytes, None where /proc is unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the peak resident set size (``VmHWM``) of this process (Linux); True on success."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class PeakMemory:
    """Peak memory added by the work between :meth:`start` and :meth:`stop`.

    ``device`` is ``"cpu"`` (resident set of the process) or a CUDA device (allocated
    tensor memory). After :meth:`stop`, ``peak_bytes`` is the peak minus the baseline,
    ``baseline_bytes`` what was resident (allocated) at the start, and ``method`` a short
    description of how it was measured.
    """

    def __init__(self, device: str = "cpu") -> None:
        self.cuda = device.startswith("cuda")
        self.baseline_bytes = 0
        self.peak_bytes = 0
        self.method = ""
        self._exact = False

    def start(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline_bytes = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated() minus the allocation at the start"
            return
        self._exact = reset_peak_rss()
        rss = rss_bytes("VmRSS") if self._exact else None
        if rss is None:
            self._exact = False
            rss = _maxrss_bytes()
        self.baseline_bytes = rss
        self.method = (
            "peak resident set (VmHWM, reset at the start) minus the resident set at the start"
            if self._exact
            else "ru_maxrss (not resettable) minus the peak resident set before the start"
        )

    def stop(self) -> int:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            hwm = rss_bytes("VmHWM") if self._exact else None
            peak = hwm if hwm is not None else _maxrss_bytes()
        self.peak_bytes = max(peak - self.baseline_bytes, 0)
        return self.peak_bytes


def limit_address_space(gib: float | None) -> None:
    """Cap this process's virtual memory at ``gib`` GiB (None: no cap).

    An allocation beyond the cap then fails with an ordinary ``RuntimeError`` /
    ``MemoryError`` that the worker reports as an out-of-memory result, instead of the
    kernel's OOM killer stopping this (or another) process once the machine is full.
    """
    if gib is None or gib <= 0:
        return
    limit = int(gib * GIB)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def is_oom(error: BaseException | str) -> bool:
    """Whether an exception (or its message) reports an out-of-memory condition."""
    if isinstance(error, MemoryError):
        return True
    text = str(error).lower() if not isinstance(error, str) else error.lower()
    return any(marker in text for marker in OOM_MARKERS)


# ----------------------------------------------------------------------------- subprocesses


def run_worker(script: str, spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run ``python script --worker JSON(spec)`` in a fresh process; return its JSON result.

    The worker prints its result as JSON on its last stdout line. A worker that fails
    returns ``{"error": ...}``: ``"OOM"`` when it ran out of memory (its own out-of-memory
    error, or killed by signal 9, which is what the kernel's OOM killer sends), else the
    exit code and the last lines of its stderr.
    """
    cmd = [sys.executable, os.path.abspath(script), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        try:
            return json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    tail = proc.stderr.strip().splitlines()[-6:]
    if proc.returncode == -9 or is_oom(" ".join(tail)):
        return {"error": "OOM", "detail": f"exit code {proc.returncode}: " + " | ".join(tail[-2:])}
    return {"error": f"exit code {proc.returncode}: " + " | ".join(tail)}


# ----------------------------------------------------------------------------- machine


def cpu_model() -> tuple[str, int]:
    """(CPU model name, number of logical CPUs) from /proc/cpuinfo, or platform fallbacks."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            return names[0], len(names)
    except OSError:
        pass
    return platform.processor() or platform.machine(), os.cpu_count() or 1


def total_ram_bytes() -> int | None:
    """Physical memory of the machine, from /proc/meminfo (None where unavailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def available_ram_bytes() -> int | None:
    """Memory available to new processes now, from /proc/meminfo (None where unavailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def package_versions(names: list[str]) -> dict[str, str]:
    """Installed version of each distribution, ``"not installed"`` where absent."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def describe_machine(device: str, packages: list[str]) -> str:
    """One paragraph: CPU (or GPU), cores, RAM, torch threads, load and package versions."""
    import torch

    if device.startswith("cuda"):
        hw = f"{torch.cuda.get_device_name(0)}"
    else:
        name, ncpu = cpu_model()
        ram = total_ram_bytes()
        ram_text = f", {ram / GIB:.1f} GiB RAM" if ram else ""
        hw = f"{name}, {ncpu} logical CPUs{ram_text}, torch using {torch.get_num_threads()} threads"
    try:
        load = ", load average {:.2f} {:.2f} {:.2f} (1/5/15 min)".format(*os.getloadavg())
    except OSError:
        load = ""
    versions = ", ".join(f"{k} {v}" for k, v in package_versions(packages).items())
    return f"{hw}{load}; {platform.system()} {platform.release()}, Python {platform.python_version()}; {versions}"
