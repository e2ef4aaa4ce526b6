"""``honelm plot``: the main curves of a run, with the diagnostics marked where they fired.

Panels are chosen from the metrics the run logged (loss, gradient norm, learning rate,
accuracy, rewards, log-probabilities, KL, entropy, completion lengths, clipping, timing,
memory). Each problem is drawn as a vertical line at the step it was first detected,
colored by severity, with a light band until it resolved (or the end of the run).

Needs matplotlib (``pip install 'honelm[plot]'``); nothing here imports pyplot, so no
display or global plotting state is touched.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from .doctor import Run
from .events import DiagnosticEvent

# (title, metrics drawn in it): the first panel whose metrics were logged is drawn, in order.
PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("loss", "eval_loss")),
    ("reward", ("reward", "rewards/chosen", "rewards/rejected", "rewards/margins", "mean_reward",
                "min_reward", "max_reward")),
    ("accuracy", ("mean_token_accuracy", "eval_mean_token_accuracy", "rewards/accuracies",
                  "eval_rewards/accuracies", "accuracy", "eval_accuracy")),
    ("log-probabilities", ("logps/chosen", "logps/rejected")),
    ("KL", ("kl",)),
    ("entropy", ("entropy",)),
    ("completion length", ("completions/mean_length", "completions/min_length", "completions/max_length",
                           "completions/mean_terminated_length")),
    ("ratios", ("frac_reward_zero_std", "completions/clipped_ratio", "clip_ratio/region_mean",
                "clip_ratio/low_mean", "clip_ratio/high_mean")),
    ("gradient norm", ("grad_norm",)),
    ("learning rate", ("learning_rate",)),
    ("router aux loss", ("aux_loss",)),
    ("seconds per step", ("timing/step", "timing/data", "timing/generation", "timing/reward", "timing/training")),
    ("memory (GiB)", ("memory/peak_gib", "memory/static_gib", "memory/total_gib")),
)
SEVERITY_COLORS = {"info": "#7f7f7f", "warning": "#ff7f0e", "error": "#d62728", "critical": "#8b0000"}
MAX_PANELS = 9


def _series(history: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for entry in history:
        value = entry.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "step" in entry:
            steps.append(entry["step"])
            values.append(float(value) if math.isfinite(value) else math.nan)
    return steps, values


def _spans(events: Sequence[DiagnosticEvent], last_step: int) -> list[tuple[DiagnosticEvent, int]]:
    """Each problem's first event, with the step it resolved at (or ``last_step``)."""
    ends = {e.key: int(e.evidence.get("last_seen_step", e.step)) for e in events if e.status == "resolved"}
    firsts = [e for e in events if e.status == "new"]
    return [(e, ends.get(e.key, last_step)) for e in firsts]


def plot_run(run: Run, events: Sequence[DiagnosticEvent], output: str, *, dpi: int = 110) -> str:
    """Draw ``run``'s curves with ``events`` marked; write a PNG to ``output``; return its path."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("honelm plot needs matplotlib: pip install 'honelm[plot]' (or: pip install matplotlib)."
                          ) from e
    history = run.log_history
    panels = []
    for title, keys in PANELS:
        drawn = [(k, *_series(history, k)) for k in keys]
        drawn = [d for d in drawn if d[1]]
        if drawn:
            panels.append((title, drawn))
    panels = panels[:MAX_PANELS]
    if not panels:
        raise ValueError(f"{run.state_file}: the log history holds no metric to plot.")
    columns = 3 if len(panels) > 4 else 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(5.2 * columns, 3.3 * rows + 0.9), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    last_step = max((e.get("step", 0) for e in history), default=0)
    spans = _spans(events, last_step)
    axes = figure.subplots(rows, columns, squeeze=False)
    for index, (title, drawn) in enumerate(panels):
        ax = axes[index // columns][index % columns]
        for key, steps, values in drawn:
            style = {"marker": "o", "markersize": 3} if key.startswith("eval_") or len(steps) < 30 else {}
            ax.plot(steps, values, label=key, linewidth=1.4, **style)
        for event, end in spans:
            color = SEVERITY_COLORS.get(event.severity, "#7f7f7f")
            ax.axvline(event.first_step, color=color, linestyle="--", linewidth=1.2)
            if end > event.first_step:
                ax.axvspan(event.first_step, end, color=color, alpha=0.07, linewidth=0)
        if title == "learning rate" or (title == "gradient norm" and _wide(drawn)):
            ax.set_yscale("log")
        # A panel that can show several metrics names the one it shows.
        named = len(drawn) == 1 and len(dict(PANELS)[title]) > 1 and drawn[0][0] != title
        ax.set_title(f"{title}: {drawn[0][0]}" if named else title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if len(drawn) > 1:
            ax.legend(fontsize=7, loc="best")
    for index in range(len(panels), rows * columns):
        axes[index // columns][index % columns].set_visible(False)
    top = axes[0][0]
    for event, _ in spans:
        top.annotate(event.code, xy=(event.first_step, 1.0), xycoords=("data", "axes fraction"), rotation=90,
                     va="top", ha="right", fontsize=7, color=SEVERITY_COLORS.get(event.severity, "#7f7f7f"))
    name = os.path.basename(os.path.normpath(run.path))
    figure.suptitle(f"{name} ({run.method or 'unknown method'}), up to step {last_step}", fontsize=12)
    legend = "; ".join(f"step {e.first_step}: {e.code} ({e.severity})" for e, _ in spans[:8]) or "no problems detected"
    if len(spans) > 8:
        legend += f"; ... {len(spans) - 8} more (honelm doctor lists them)"
    figure.supxlabel("diagnostics: " + legend, fontsize=8)
    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    figure.savefig(output)
    return output


def _wide(drawn: Sequence[tuple[str, list[float], list[float]]]) -> bool:
    values = [v for _, _, vs in drawn for v in vs if math.isfinite(v) and v > 0]
    return bool(values) and max(values) / min(values) > 100
