"""Machine statistics: what the accelerator is, and per optimizer step, how long the step
computed, how long it waited for data, and how much accelerator memory it used.

The :class:`StepMeter` turns these into metrics that are logged with the training metrics
(so a replay of the log history sees them too; see :mod:`honelm.diagnostics.detectors.system`):
``timing/step``, ``timing/data``, and on CUDA ``memory/peak_gib``, ``memory/reserved_gib``,
``memory/static_gib``, ``memory/total_gib``.
"""

from __future__ import annotations

import time
from typing import Any

_GIB = 2**30


def machine_info(device: Any = None) -> dict[str, Any]:
    """``accelerator`` (cuda, mps, xpu, cpu), ``device_name`` and ``memory_total_gib``."""
    import torch

    kind = getattr(device, "type", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    info: dict[str, Any] = {"accelerator": kind}
    if kind == "cuda" and torch.cuda.is_available():
        index = device.index if getattr(device, "index", None) is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info.update(device_name=props.name, memory_total_gib=round(props.total_memory / _GIB, 2))
    return info


class StepMeter:
    """Accumulates step timings and memory over a logging window (see the module docstring).

    Call :meth:`mark` whenever the training loop is about to fetch data (at the start, after
    logging, evaluating or saving), :meth:`step_begin` / :meth:`step_end` around each optimizer
    step, and :meth:`window` at each log to read and reset the window.
    """

    def __init__(self, device: Any = None) -> None:
        import torch

        self._cuda = getattr(device, "type", None) == "cuda" and torch.cuda.is_available()
        self._device = device
        self._mark: float | None = None
        self._begin: float | None = None
        self._data = self._compute = 0.0
        self._steps = 0
        self._static: float | None = None
        self._total = None
        if self._cuda:
            index = device.index if device.index is not None else torch.cuda.current_device()
            self._total = torch.cuda.get_device_properties(index).total_memory / _GIB
            torch.cuda.reset_peak_memory_stats(device)

    def mark(self) -> None:
        self._mark = time.perf_counter()

    def step_begin(self) -> None:
        now = time.perf_counter()
        if self._mark is not None:
            self._data += now - self._mark
            self._mark = None
        self._begin = now

    def step_end(self) -> None:
        if self._begin is None:
            return
        if self._cuda:
            import torch

            torch.cuda.synchronize(self._device)  # count the step's queued kernels as its compute
            self._static = torch.cuda.memory_allocated(self._device) / _GIB
        now = time.perf_counter()
        self._compute += now - self._begin
        self._steps += 1
        self._begin = None
        self._mark = now

    def window(self) -> dict[str, float]:
        """The metrics of the steps since the last call, then a fresh window ({} if no step ran)."""
        if not self._steps:
            return {}
        metrics = {"timing/step": self._compute / self._steps, "timing/data": self._data / self._steps}
        if self._cuda:
            import torch

            metrics["memory/peak_gib"] = torch.cuda.max_memory_allocated(self._device) / _GIB
            metrics["memory/reserved_gib"] = torch.cuda.max_memory_reserved(self._device) / _GIB
            if self._static is not None:
                metrics["memory/static_gib"] = self._static
            metrics["memory/total_gib"] = self._total
            torch.cuda.reset_peak_memory_stats(self._device)
        self._data = self._compute = 0.0
        self._steps = 0
        return {k: round(v, 6) for k, v in metrics.items()}
