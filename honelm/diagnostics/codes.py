"""Every diagnostic code: its area, default severity, one-line meaning and default thresholds.

The codes and their meaning are part of the stable API: a code is never renamed or given a
different meaning; new codes may be added. ``docs/diagnostics.md`` explains each one (why
it happens, what to do) under a heading equal to the code, so its anchor is the code in
lower case.

Thresholds can be changed per code (``diagnostics_thresholds``): a number sets the code's
first (primary) threshold, a mapping sets thresholds by name::

    {"GRAD_NORM_SPIKE": 20, "LOSS_DIVERGING": {"ratio": 3.0, "window": 5}}

Any code can be silenced (``diagnostics_silence``). This module imports nothing heavy.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

DOCS_PAGE = "docs/diagnostics.md"
AREAS: tuple[str, ...] = ("preflight", "training", "preference", "online_rl", "system")


@dataclass(frozen=True)
class CodeInfo:
    """One diagnostic code. ``thresholds`` are the defaults; the first one is the primary."""

    code: str
    area: str
    severity: str
    meaning: str
    thresholds: Mapping[str, float] = field(default_factory=dict)

    @property
    def docs(self) -> str:
        return docs_anchor(self.code)

    @property
    def primary_threshold(self) -> str | None:
        return next(iter(self.thresholds), None)


def docs_anchor(code: str) -> str:
    """Where ``code`` is explained: ``docs/diagnostics.md#<code in lower case>``."""
    return f"{DOCS_PAGE}#{code.lower()}"


def _c(code: str, area: str, severity: str, meaning: str, **thresholds: float) -> CodeInfo:
    return CodeInfo(code, area, severity, meaning, {k: float(v) for k, v in thresholds.items()})


_TABLE = (
    # ---- pre-flight: from the dataset, tokenizer, model and config, before the first step ----
    _c("DATA_NO_TRAINABLE_TOKENS", "preflight", "warning",
       "Some rows have no token the loss is computed on (an error when no row has one).",
       max_fraction=0.0),
    _c("DATA_MISSING_EOS", "preflight", "error",
       "The trained tokens of many rows do not include the end-of-turn/EOS token: the model will never "
       "learn to stop.", max_fraction=0.05),
    _c("DATA_EOS_MASKED_BY_PAD", "preflight", "error",
       "The pad token is the EOS token and the collator masks padding by token id, so the real EOS is "
       "never trained."),
    _c("TEMPLATE_NO_GENERATION_MARKERS", "preflight", "error",
       "assistant_only_loss is on but the chat template is missing or has no {% generation %} markers."),
    _c("DATA_TRUNCATION", "preflight", "warning",
       "Many rows are longer than max_length and get truncated.", max_fraction=0.1),
    _c("DATA_PADDING_WASTE", "preflight", "info",
       "A large share of each padded batch would be padding; padding-free batches or packing remove it.",
       max_fraction=0.3),
    _c("PREF_LENGTH_BIAS", "preflight", "warning",
       "In most preference pairs the chosen answer is the longer (or the shorter) one: length alone "
       "predicts the preference.", max_fraction=0.8, min_pairs=20),
    _c("KTO_WEIGHT_IMBALANCE", "preflight", "warning",
       "desirable_weight x desirable examples / (undesirable_weight x undesirable examples) is outside the "
       "recommended range.", min_ratio=0.9, max_ratio=1.5),
    _c("KTO_BATCH_TOO_SMALL", "preflight", "warning",
       "The per-device batch is too small for KTO's in-batch KL estimate (an error at batch size 1).",
       min_batch_size=4),
    _c("REWARD_MODEL_NO_PAD_TOKEN", "preflight", "error",
       "The reward model's config has no pad_token_id, so the score of padded sequences is read at the "
       "wrong position."),
    _c("DISTILL_VOCAB_MISMATCH", "preflight", "error",
       "Teacher and student have different vocabularies: their token distributions cannot be compared."),
    _c("DISTILL_TEMPLATE_MISMATCH", "preflight", "warning",
       "Teacher and student tokenizers have different chat templates."),
    _c("MOE_AUX_LOSS_OFF", "preflight", "warning",
       "A mixture-of-experts model trains without its router load-balancing loss."),
    # ---- training: any trainer -----------------------------------------------------------------
    _c("LOSS_NOT_FINITE", "training", "critical", "The loss is NaN or infinite."),
    _c("GRAD_NORM_NOT_FINITE", "training", "critical",
       "The gradient norm is NaN or infinite: the weights are being corrupted.", fp16_consecutive=3),
    _c("GRAD_NORM_SPIKE", "training", "warning",
       "The gradient norm jumped far above its recent median.", factor=10.0, min_history=5, window=20),
    _c("LOSS_DIVERGING", "training", "critical",
       "The loss is rising far above its lowest value: the learning rate is likely too high.",
       ratio=2.0, window=3, min_increase=1.0),
    _c("LOSS_FLAT", "training", "warning",
       "The loss has not decreased since the start: the learning rate is likely too low or the warmup "
       "too long.", min_drop=0.02, min_logs=10, min_steps=20),
    _c("EVAL_LOSS_RISING", "training", "warning",
       "The eval loss keeps rising while the train loss falls: the model is overfitting.",
       min_rise=0.02, evals=3),
    _c("MOE_ROUTER_IMBALANCE", "training", "warning",
       "The router load-balancing loss is well above its balanced value: a few experts get most tokens.",
       ratio=1.5, window=3),
    # ---- preference optimization and reward modeling ------------------------------------------
    _c("PREF_LIKELIHOOD_DISPLACEMENT", "preference", "warning",
       "The log-probabilities of both chosen and rejected answers are falling (likelihood displacement).",
       min_drop=0.2, min_abs_drop=2.0, min_share=0.3, min_logs=5, window=3),
    _c("PREF_ACCURACY_SATURATED", "preference", "warning",
       "Preference accuracy reached ~100% with a near-zero loss early in training: the pairs are trivially "
       "separable or the model overfits.", min_accuracy=0.99, max_loss=0.02, early_fraction=0.25, window=3),
    _c("PREF_NO_SIGNAL", "preference", "warning",
       "Preference accuracy is stuck at chance (0.5): the model is not learning the preference.",
       band=0.05, min_logs=10, window=5),
    _c("PREF_ACCURACY_BELOW_CHANCE", "preference", "error",
       "Preference accuracy stays below chance: the chosen and rejected columns are likely swapped.",
       max_accuracy=0.4, min_logs=10, window=5),
    _c("REWARD_SCALE_DRIFT", "preference", "warning",
       "The reward model's scores drift far from zero or spread far apart.",
       max_abs_mean=5.0, max_spread=50.0, window=3),
    # ---- online RL (GRPO, RLOO) ----------------------------------------------------------------
    _c("GRPO_ZERO_REWARD_STD", "online_rl", "error",
       "The rewards of the completions of a prompt are (nearly) all equal: the advantages and the training "
       "signal vanish.", error_fraction=0.95, warn_fraction=0.8, window=2),
    _c("GRPO_REWARD_FN_CONSTANT", "online_rl", "warning",
       "A reward function returns the same value for every completion.", min_logs=3),
    _c("GRPO_COMPLETIONS_TRUNCATED", "online_rl", "warning",
       "Many completions are cut at max_completion_length.", max_fraction=0.2, window=3),
    _c("GRPO_LENGTH_HACKING", "online_rl", "warning",
       "Completion length grows together with the reward: the policy may be exploiting length.",
       min_growth=0.5, min_correlation=0.7, min_logs=10),
    _c("GRPO_ENTROPY_COLLAPSE", "online_rl", "warning",
       "The policy's entropy collapsed: it stopped exploring.", min_ratio=0.1, min_entropy=0.05,
       window=3, min_logs=5),
    _c("GRPO_ENTROPY_BLOWUP", "online_rl", "warning",
       "The policy's entropy is exploding: its outputs are becoming random.", max_ratio=3.0, min_entropy=1.0,
       window=3, min_logs=5),
    _c("GRPO_KL_EXPLOSION", "online_rl", "error",
       "The KL divergence to the reference model is exploding.", max_kl=1.0, window=3),
    _c("GRPO_CLIP_RATIO_HIGH", "online_rl", "warning",
       "The importance-ratio clipping is active in too many steps: the updates are too large.",
       max_clip_ratio=0.1, max_fraction=0.3, window=20, min_logs=5),
    _c("GRPO_LOGPS_MISMATCH", "online_rl", "warning",
       "The generator's and the trainer's log-probabilities of the same tokens disagree.",
       max_difference=0.1, window=3),
    # ---- system -------------------------------------------------------------------------------
    _c("SYS_LOW_MEMORY_USE", "system", "info",
       "The accelerator's memory is mostly unused: a larger batch would fit.",
       max_utilization=0.5, target_utilization=0.8, min_logs=3),
    _c("SYS_OOM_RISK", "system", "warning",
       "Peak accelerator memory is close to the total: out-of-memory is likely.", max_utilization=0.95),
    _c("SYS_DATALOADER_BOUND", "system", "warning",
       "Steps spend a large share of their time waiting for data.", max_fraction=0.3, min_seconds=0.05,
       window=3),
    _c("SYS_GENERATION_BOUND", "system", "info",
       "Online-RL steps spend most of their time generating completions.", max_fraction=0.8, window=3),
    _c("SYS_SLOW_REWARD", "system", "warning",
       "Reward functions take a large share of each step.", max_fraction=0.3, min_seconds=0.5, window=3),
)

CODES: dict[str, CodeInfo] = {info.code: info for info in _TABLE}


def code_info(code: str) -> CodeInfo:
    """The :class:`CodeInfo` of ``code``; a clear error for an unknown code."""
    try:
        return CODES[code]
    except KeyError:
        raise ValueError(_unknown_code(code, "code")) from None


def _unknown_code(code: Any, owner: str) -> str:
    close = difflib.get_close_matches(str(code).upper(), list(CODES), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"{owner}: unknown diagnostic code {code!r}.{hint} Every code is listed in {DOCS_PAGE}."


def _normalize_code(code: Any, owner: str) -> str:
    name = str(code).strip().upper()
    if name not in CODES:
        raise ValueError(_unknown_code(code, owner))
    return name


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be a number, got {value!r}.")
    return float(value)


def resolve_thresholds(
    overrides: Mapping[str, Any] | str | None = None, *, owner: str = "diagnostics_thresholds"
) -> dict[str, dict[str, float]]:
    """Every code's thresholds: the defaults with ``overrides`` applied (checked, clear errors).

    ``overrides`` maps a code to a number (its primary threshold) or to ``{name: number}``;
    a JSON string of that mapping is accepted too (as typed on a command line).
    """
    resolved = {code: dict(info.thresholds) for code, info in CODES.items()}
    for code, value in parse_overrides(overrides, owner=owner).items():
        resolved[code].update(value)
    return resolved


def parse_overrides(
    overrides: Mapping[str, Any] | str | None, *, owner: str = "diagnostics_thresholds"
) -> dict[str, dict[str, float]]:
    """Only the overridden thresholds, validated: ``{code: {name: value}}``."""
    if overrides is None:
        return {}
    if isinstance(overrides, str):
        try:
            overrides = json.loads(overrides)
        except json.JSONDecodeError as e:
            raise ValueError(f"{owner}: not a valid JSON object ({e.msg}); write e.g. "
                             '\'{"GRAD_NORM_SPIKE": 20, "LOSS_DIVERGING": {"ratio": 3}}\'.') from e
    if not isinstance(overrides, Mapping):
        raise ValueError(f"{owner} must map diagnostic codes to thresholds, got {type(overrides).__name__}.")
    parsed: dict[str, dict[str, float]] = {}
    for raw_code, value in overrides.items():
        code = _normalize_code(raw_code, owner)
        names = CODES[code].thresholds
        if not names:
            raise ValueError(f"{owner}: {code} has no threshold to set (it fires on a definite condition); "
                             f"silence it with diagnostics_silence instead.")
        if isinstance(value, Mapping):
            items = dict(value)
        else:
            items = {next(iter(names)): value}
        checked = {}
        for name, number in items.items():
            if name not in names:
                close = difflib.get_close_matches(str(name), list(names), n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"{owner}: {code} has no threshold {name!r}.{hint} "
                                 f"Its thresholds: {', '.join(f'{k}={v:g}' for k, v in names.items())}.")
            checked[name] = _number(number, f"{owner}[{code!r}][{name!r}]")
        parsed[code] = checked
    return parsed


def parse_silence(codes: Iterable[str] | str | None, *, owner: str = "diagnostics_silence") -> tuple[str, ...]:
    """The silenced codes, checked; a comma-separated string is accepted."""
    if codes is None:
        return ()
    if isinstance(codes, str):
        codes = [c for c in codes.split(",") if c.strip()]
    return tuple(dict.fromkeys(_normalize_code(c, owner) for c in codes))


STOP_LEVELS: tuple[str, ...] = ("error", "critical")


def parse_stop_on(value: str | None, *, owner: str = "diagnostics_stop_on") -> str | None:
    """``None``, ``"error"`` or ``"critical"`` (the string ``"none"`` means ``None``)."""
    if value is None:
        return None
    name = str(value).strip().lower()
    if name in ("none", "null", ""):
        return None
    if name not in STOP_LEVELS:
        raise ValueError(f"{owner}={value!r} is not supported. Choose 'error' (stop on errors and critical "
                         "problems), 'critical' (stop on critical problems only) or None (never stop).")
    return name


def normalize_settings(config: Any, owner: str | None = None) -> None:
    """Check and normalize a trainer config's ``diagnostics_*`` fields in place (call it from
    ``__post_init__``): ``diagnostics_stop_on`` becomes None/"error"/"critical", a JSON string
    of thresholds becomes a dict, silenced codes become an upper-case list. Unknown codes,
    threshold names and levels raise a ``ValueError`` naming the field.
    """
    owner = owner or type(config).__name__
    config.diagnostics_stop_on = parse_stop_on(config.diagnostics_stop_on, owner=f"{owner}.diagnostics_stop_on")
    thresholds = getattr(config, "diagnostics_thresholds", None)
    parsed = parse_overrides(thresholds, owner=f"{owner}.diagnostics_thresholds")
    if isinstance(thresholds, str):  # JSON typed in Python
        config.diagnostics_thresholds = {code: dict(values) for code, values in parsed.items()}
    silence = getattr(config, "diagnostics_silence", None)
    if silence is not None:
        config.diagnostics_silence = list(parse_silence(silence, owner=f"{owner}.diagnostics_silence"))
