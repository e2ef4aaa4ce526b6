"""Pre-flight checks: problems visible before the first step, from the data, tokenizer,
model and config.

Each check is a pure function ``(PreflightInput, thresholds) -> list[Finding]``.
:func:`honelm.diagnostics.run_preflight` builds the :class:`PreflightInput` from live
objects (a sample of the tokenized dataset, the tokenizer, the collator, the model).

Tokenized rows are those of :mod:`honelm.data`: ``input_ids`` with ``completion_mask`` /
``assistant_masks`` / ``seq_lengths`` (language modeling, prompt-completion), or
``prompt_input_ids`` with ``chosen_input_ids`` / ``rejected_input_ids`` (preference) or
``completion_input_ids`` and ``label`` (unpaired preference); reward models' rows hold
whole sequences, ``chosen_ids`` / ``rejected_ids`` (prompt + completion).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..events import Finding
from ._common import Thresholds, nice, pct, suggest, suggestions


@dataclass(frozen=True)
class PreflightInput:
    """What the pre-flight checks read (all plain data; ``decode`` only turns ids into text).

    Attributes:
        config: The run's config as a mapping.
        method: ``"sft"``, ``"dpo"``, ``"kto"``, ``"reward"``, ``"grpo"``, ``"distill"``...
        rows: A sample of tokenized training rows; ``row_indices`` are their dataset indices.
        num_rows: Rows in the whole dataset (None when unknown, e.g. streaming).
        completion_only_loss, assistant_only_loss: Which tokens the collator trains on.
        stop_token_ids: Ids that end a generation (EOS and end-of-turn tokens).
        eos_token_id, pad_token_id: The tokenizer's.
        chat_template: The tokenizer's chat template; ``has_generation_markers`` whether it
            marks assistant turns with ``{% generation %}``.
        truncation: Truncation statistics of the whole dataset (``num_rows``,
            ``num_truncated``, ``tokens_dropped``, ``max_length``, ``complete``), if known.
        collator_eos: ``{"expected": n, "in_labels": m}``: trained EOS tokens in a collated
            sample batch, and how many of them the collator kept as labels.
        model: Model facts: ``pad_token_id``, ``sequence_classification``, ``num_experts``,
            ``num_experts_per_tok``, ``output_router_logits``.
        tokenizer: Facts of the (student) tokenizer: ``vocab_size``, ``vocab_hash``.
        teacher: The same facts for a distillation teacher, plus ``chat_template``.
        world_size: Number of training processes.
        spare_pad_token: A token that could pad instead of EOS, when the tokenizer has one.
    """

    config: Mapping[str, Any] = field(default_factory=dict)
    method: str = ""
    rows: Sequence[Mapping[str, Any]] = ()
    row_indices: Sequence[int] = ()
    num_rows: int | None = None
    completion_only_loss: bool = True
    assistant_only_loss: bool = False
    stop_token_ids: frozenset[int] = frozenset()
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    chat_template: str | None = None
    has_generation_markers: bool = False
    truncation: Mapping[str, Any] | None = None
    collator_eos: Mapping[str, int] | None = None
    model: Mapping[str, Any] = field(default_factory=dict)
    tokenizer: Mapping[str, Any] = field(default_factory=dict)
    teacher: Mapping[str, Any] | None = None
    world_size: int = 1
    spare_pad_token: str | None = None
    decode: Callable[[Sequence[int]], str] | None = None

    def index(self, i: int) -> int:
        """The dataset index of sampled row ``i``."""
        return self.row_indices[i] if i < len(self.row_indices) else i


# ---- token masks ---------------------------------------------------------------------------


def sequence_spans(row: Mapping[str, Any]) -> list[tuple[int, int]]:
    """``(start, end)`` of each sequence of a tokenized row (several when it is packed)."""
    n = len(row["input_ids"])
    lengths = row.get("seq_lengths") or [n]
    spans, start = [], 0
    for length in lengths:
        spans.append((start, start + int(length)))
        start += int(length)
    return spans


def trained_positions(row: Mapping[str, Any], completion_only: bool, assistant_only: bool) -> list[list[int]]:
    """Per sequence, the positions whose token is a training target.

    Mirrors :class:`honelm.data.DataCollatorForLanguageModeling`: the completion and assistant
    masks apply when enabled, and the first token of a sequence is never a target.
    """
    ids = row["input_ids"]
    keep = [True] * len(ids)
    completion = row.get("completion_mask")
    if completion_only and completion is not None:
        keep = [k and bool(m) for k, m in zip(keep, completion)]
    if assistant_only:
        assistant = row.get("assistant_masks")
        keep = [k and bool(m) for k, m in zip(keep, assistant)] if assistant is not None else [False] * len(ids)
    return [[i for i in range(start + 1, end) if keep[i]] for start, end in sequence_spans(row)]


def _lm_rows(data: PreflightInput) -> list[tuple[int, Mapping[str, Any]]]:
    return [(i, r) for i, r in enumerate(data.rows) if "input_ids" in r]


def _tail_text(data: PreflightInput, ids: Sequence[int]) -> str | None:
    if data.decode is None or not ids:
        return None
    try:
        text = data.decode(list(ids[-12:]))
    except Exception:  # noqa: BLE001 - a decoding problem must not hide the finding
        return None
    return "..." + text[-60:]


def _max_length(data: PreflightInput) -> int | None:
    value = data.config.get("max_length")
    return value if isinstance(value, int) and value > 0 else None


# ---- checks --------------------------------------------------------------------------------


def check_no_trainable_tokens(data: PreflightInput, th: Thresholds) -> list[Finding]:
    rows = _lm_rows(data)
    if not rows:
        return []
    empty: list[int] = []
    at_limit = 0
    total = 0
    max_length = _max_length(data)
    for i, row in rows:
        for span, positions in zip(sequence_spans(row), trained_positions(
                row, data.completion_only_loss, data.assistant_only_loss)):
            total += 1
            if not positions:
                empty.append(data.index(i))
                at_limit += bool(max_length and span[1] - span[0] >= max_length)
    fraction = len(empty) / total if total else 0.0
    if not empty or fraction <= th["DATA_NO_TRAINABLE_TOKENS"]["max_fraction"]:
        return []
    everything = len(empty) == total
    truncated = at_limit >= len(empty) / 2
    cause = (" Most of them are at max_length: truncation cut away the part that is trained; keep the end of "
             "long rows or raise max_length." if truncated else
             " Check for empty completions or conversations without an assistant turn.")
    return [Finding(
        "DATA_NO_TRAINABLE_TOKENS",
        f"{len(empty)} of {total} rows checked ({pct(fraction)}) have no token the loss is computed on (e.g. row "
        f"{empty[0]}): they cost compute and teach nothing.{cause}"
        + (" No row has a trained token: training would learn nothing." if everything else ""),
        evidence={"rows_without_targets": len(empty), "rows_checked": total, "fraction": fraction,
                  "example_rows": empty[:5], "threshold": th["DATA_NO_TRAINABLE_TOKENS"]["max_fraction"]},
        suggestions=suggestions(
            suggest(data.config, "truncation_mode", "keep_end", "keep the trained end of long rows") if truncated
            else None,
        ),
        severity="error" if everything else None,
    )]


def _completion_lists(data: PreflightInput) -> list[tuple[int, str, Sequence[int], int]]:
    """(row, column, trained ids, total length) of the completions of preference rows."""
    out = []
    for i, row in enumerate(data.rows):
        prompt = len(row.get("prompt_input_ids") or ())
        for column in ("chosen_input_ids", "rejected_input_ids", "completion_input_ids"):
            ids = row.get(column)
            if ids:
                out.append((i, column, ids, prompt + len(ids)))
    return out


def check_missing_eos(data: PreflightInput, th: Thresholds) -> list[Finding]:
    if not data.stop_token_ids:
        return []
    stops = data.stop_token_ids
    max_length = _max_length(data)
    max_completion = data.config.get("max_completion_length")
    keep_end = data.config.get("truncation_mode") == "keep_end"
    checked, missing = 0, []  # (dataset row, trained ids)
    for i, row in _lm_rows(data):
        spans = sequence_spans(row)
        for (start, end), positions in zip(spans, trained_positions(
                row, data.completion_only_loss, data.assistant_only_loss)):
            if not positions or (max_length and end - start >= max_length and not keep_end):
                continue  # nothing trained, or cut at max_length (see DATA_TRUNCATION)
            checked += 1
            trained = [row["input_ids"][p] for p in positions]
            if not stops.intersection(trained):
                missing.append((data.index(i), trained))
    for i, _column, ids, total in _completion_lists(data):
        if (max_length and total >= max_length) or (isinstance(max_completion, int) and len(ids) >= max_completion):
            continue
        checked += 1
        if not stops.intersection(ids):
            missing.append((data.index(i), list(ids)))
    fraction = len(missing) / checked if checked else 0.0
    if not missing or fraction <= th["DATA_MISSING_EOS"]["max_fraction"]:
        return []
    example_row, example_ids = missing[0]
    tail = _tail_text(data, example_ids)
    names = [data.decode([t]) for t in sorted(stops)] if data.decode else sorted(stops)
    return [Finding(
        "DATA_MISSING_EOS",
        f"{len(missing)} of {checked} rows checked ({pct(fraction)}) train on text that never contains an "
        f"end-of-turn/EOS token ({', '.join(str(n) for n in names)}); e.g. row {example_row}"
        + (f" ends with {tail!r}" if tail else "")
        + ". The model will never learn to stop and will generate until max_new_tokens. Make the chat template "
        "close every assistant turn with the EOS/end-of-turn token (inside the trained part), or append EOS to "
        "pre-tokenized rows.",
        evidence={"rows_missing_eos": len(missing), "rows_checked": checked, "fraction": fraction,
                  "example_rows": [m[0] for m in missing[:5]], "stop_token_ids": sorted(stops),
                  "threshold": th["DATA_MISSING_EOS"]["max_fraction"]},
    )]


def check_eos_masked_by_pad(data: PreflightInput, th: Thresholds) -> list[Finding]:
    counts = data.collator_eos
    if not counts or data.pad_token_id is None or data.pad_token_id != data.eos_token_id:
        return []
    expected, kept = int(counts.get("expected", 0)), int(counts.get("in_labels", 0))
    if expected == 0 or kept >= expected:
        return []
    return [Finding(
        "DATA_EOS_MASKED_BY_PAD",
        f"The pad token is the EOS token (id {data.pad_token_id}) and the data collator drops every label equal "
        f"to it: {expected - kept} of {expected} trained EOS tokens in a sample batch were masked, so the model "
        "never learns to stop. Use a distinct pad token, or a collator that masks padding by position "
        "(honelm's does).",
        evidence={"pad_token_id": data.pad_token_id, "eos_token_id": data.eos_token_id,
                  "trained_eos_in_batch": expected, "kept_as_labels": kept},
        suggestions=suggestions(
            suggest(data.config, "pad_token", data.spare_pad_token, "a pad token that is not EOS")
            if data.spare_pad_token else None
        ),
    )]


def check_chat_template(data: PreflightInput, th: Thresholds) -> list[Finding]:
    if not data.assistant_only_loss or data.has_generation_markers:
        return []
    what = "has no chat template" if not data.chat_template else "has a chat template without {% generation %} markers"
    return [Finding(
        "TEMPLATE_NO_GENERATION_MARKERS",
        f"assistant_only_loss is on, but the tokenizer {what}: the assistant tokens cannot be found, so no token "
        "(or every token) would be trained. Wrap the assistant content and its end-of-turn token in "
        "{% generation %} ... {% endgeneration %}, or turn assistant_only_loss off.",
        evidence={"assistant_only_loss": True, "has_chat_template": bool(data.chat_template),
                  "has_generation_markers": False},
        suggestions=suggestions(suggest(data.config, "assistant_only_loss", False,
                                        "or set a chat template with generation markers")),
    )]


def _next_power_of_two(n: float) -> int:
    power = 1
    while power < n:
        power *= 2
    return power


def check_truncation(data: PreflightInput, th: Thresholds) -> list[Finding]:
    max_length = _max_length(data)
    stats = data.truncation
    if stats and stats.get("num_rows") and stats.get("max_length"):
        rows, cut = int(stats["num_rows"]), int(stats.get("num_truncated", 0))
        dropped = int(stats.get("tokens_dropped", 0))
        max_length = int(stats["max_length"])
        source = "dataset"
    elif max_length:
        lengths = [len(r["input_ids"]) for _, r in _lm_rows(data)]
        rows, cut, dropped = len(lengths), sum(n >= max_length for n in lengths), 0
        source = "sample"
    else:
        return []
    fraction = cut / rows if rows else 0.0
    if not fraction > th["DATA_TRUNCATION"]["max_fraction"]:
        return []
    proposed = _next_power_of_two(max_length + dropped / cut) if dropped else 2 * max_length
    mode = data.config.get("truncation_mode", "keep_start")
    return [Finding(
        "DATA_TRUNCATION",
        f"{cut} of {rows} rows ({pct(fraction)}) are longer than max_length={max_length} and get truncated"
        + (f", losing {dropped} tokens" if dropped else "")
        + f" ({mode}: the {'end' if mode == 'keep_start' else 'beginning'} of each long row is cut, often with its "
        "EOS). Raise max_length, or filter out the long rows.",
        evidence={"rows_truncated": cut, "rows": rows, "fraction": fraction, "max_length": max_length,
                  "tokens_dropped": dropped, "counted_on": source, "threshold": th["DATA_TRUNCATION"]["max_fraction"]},
        suggestions=suggestions(suggest(data.config, "max_length", proposed, "fits more rows whole")),
    )]


def padding_fraction(lengths: Sequence[int | Sequence[int]], batch_size: int, *, group_by_length: bool = False,
                     multiple: int | None = None, seed: int = 0, shuffle: bool = True) -> float:
    """Share of padding tokens in right-padded batches of rows drawn in random order (in the
    given order with ``shuffle=False``).

    A row is a sequence length, or the lengths of the several sequences it adds to the batch
    (a preference pair's chosen and rejected sequences): every sequence of a batch is padded
    to the batch's longest.
    """
    order = [(n,) if isinstance(n, int) else tuple(n) for n in lengths]
    if shuffle:
        random.Random(seed).shuffle(order)
    if group_by_length:  # transformers' LengthGroupedSampler: sort mega-batches of 50 batches
        mega = 50 * batch_size
        order = [r for i in range(0, len(order), mega) for r in sorted(order[i : i + mega], key=max, reverse=True)]
    real = padded = 0
    for i in range(0, len(order), batch_size):
        batch = order[i : i + batch_size]
        width = max(max(r) for r in batch)
        if multiple:
            width = -(-width // multiple) * multiple
        real += sum(sum(r) for r in batch)
        padded += width * sum(len(r) for r in batch)
    return 1 - real / padded if padded else 0.0


def _padded_sequences(data: PreflightInput) -> list[tuple[int, ...]]:
    """Per sampled row, the lengths of the sequences it adds to a padded batch: one for language
    modeling and KTO (prompt + completion), two for DPO and reward models (chosen and rejected)."""
    out = []
    for row in data.rows:
        if "input_ids" in row:
            if not row.get("seq_lengths"):
                out.append((len(row["input_ids"]),))
        elif row.get("chosen_ids") is not None and row.get("rejected_ids") is not None:
            out.append((len(row["chosen_ids"]), len(row["rejected_ids"])))
        elif row.get("prompt_input_ids") is not None:
            prompt = len(row["prompt_input_ids"])
            sides = [row[c] for c in ("chosen_input_ids", "rejected_input_ids", "completion_input_ids")
                     if row.get(c) is not None]
            if sides:
                out.append(tuple(prompt + len(c) for c in sides))
    return out


def check_padding_waste(data: PreflightInput, th: Thresholds) -> list[Finding]:
    config = data.config
    batch = config.get("per_device_train_batch_size")
    if config.get("packing") or config.get("padding_free") or not isinstance(batch, int) or batch < 2:
        return []
    rows = _padded_sequences(data)
    if len(rows) < 2 * batch:
        return []
    strategy = config.get("train_sampling_strategy")
    waste = padding_fraction(rows, batch, multiple=config.get("pad_to_multiple_of"), shuffle=strategy != "sequential",
                             group_by_length=bool(config.get("group_by_length")) or strategy == "group_by_length")
    if not waste > th["DATA_PADDING_WASTE"]["max_fraction"]:
        return []
    lengths = [n for row in rows for n in row]
    per_row = len(lengths) // len(rows)
    what = f"{batch} rows" if per_row == 1 else f"{batch} pairs ({per_row * batch} sequences)"
    packing = " Padding-free batches remove it; packing also fills each row." if "packing" in config or not config \
        else " Padding-free batches remove it."
    return [Finding(
        "DATA_PADDING_WASTE",
        f"About {pct(waste)} of the tokens in each padded batch of {what} would be padding (sequence lengths vary "
        f"from {min(lengths)} to {max(lengths)}): compute spent on nothing.{packing}",
        evidence={"padding_fraction": waste, "batch_size": batch, "sequences_per_row": per_row,
                  "min_length": min(lengths), "max_length": max(lengths),
                  "mean_length": nice(sum(lengths) / len(lengths)),
                  "threshold": th["DATA_PADDING_WASTE"]["max_fraction"]},
        suggestions=suggestions(
            suggest(config, "padding_free", True, "no padding tokens, same loss"),
            suggest(config, "packing", True, "also fills rows to max_length"),
        ),
    )]


def check_length_bias(data: PreflightInput, th: Thresholds) -> list[Finding]:
    t = th["PREF_LENGTH_BIAS"]
    longer = shorter = same = 0
    for row in data.rows:
        chosen, rejected = row.get("chosen_input_ids"), row.get("rejected_input_ids")
        if chosen is None and rejected is None:  # a reward model's whole sequences (the same prompt in both)
            chosen, rejected = row.get("chosen_ids"), row.get("rejected_ids")
        if chosen is None or rejected is None:
            continue
        longer += len(chosen) > len(rejected)
        shorter += len(chosen) < len(rejected)
        same += len(chosen) == len(rejected)
    pairs = longer + shorter + same
    if pairs < t["min_pairs"]:
        return []
    # Over all pairs: where chosen and rejected are equally long, length predicts nothing.
    share = max(longer, shorter) / pairs
    if not share > t["max_fraction"]:
        return []
    side = "longer" if longer >= shorter else "shorter"
    return [Finding(
        "PREF_LENGTH_BIAS",
        f"The chosen answer is the {side} one in {pct(share)} of {pairs} pairs: length alone predicts the "
        f"preference, and the model will learn to write {side} answers rather than better ones. Balance the "
        "lengths of chosen and rejected answers, or regularize length.",
        evidence={"pairs": pairs, "chosen_longer": longer, "chosen_shorter": shorter, "same_length": same,
                  "share": share, "threshold": t["max_fraction"]},
        suggestions=suggestions(suggest(data.config, "ld_alpha", lambda cur: 0.5 if cur is None else None,
                                        "down-weights the log-probability of the extra length (LD-DPO)")),
    )]


def _is_kto(data: PreflightInput) -> bool:
    return data.method == "kto" or "desirable_weight" in data.config


def check_kto_weights(data: PreflightInput, th: Thresholds) -> list[Finding]:
    if not _is_kto(data):
        return []
    labels = [bool(r["label"]) for r in data.rows if "label" in r]
    if not labels:
        return []
    t = th["KTO_WEIGHT_IMBALANCE"]
    good, bad = sum(labels), len(labels) - sum(labels)
    dw = float(data.config.get("desirable_weight", 1.0))
    uw = float(data.config.get("undesirable_weight", 1.0))
    if not good or not bad:  # no weight can balance a side that is absent
        have, missing = ("desirable", "undesirable") if good else ("undesirable", "desirable")
        return [Finding(
            "KTO_WEIGHT_IMBALANCE",
            f"All {len(labels)} rows checked are {have}: no {missing} example is ever seen, so KTO learns from one "
            f"side only and no weight can balance it. Add {missing} rows (label={not good}).",
            evidence={"desirable": good, "undesirable": bad, "ratio": float("inf") if good else 0.0,
                      "min_ratio": t["min_ratio"], "max_ratio": t["max_ratio"]},
        )]
    ratio = (dw * good) / (uw * bad) if bad and uw else float("inf")
    if t["min_ratio"] <= ratio <= t["max_ratio"]:
        return []
    target = min(max(1.0, t["min_ratio"]), t["max_ratio"])
    proposed = nice(target * uw * bad / good) if good and bad else None
    return [Finding(
        "KTO_WEIGHT_IMBALANCE",
        f"The rows are {good} desirable and {bad} undesirable; with desirable_weight={dw:g} and "
        f"undesirable_weight={uw:g} the weighted ratio is {ratio:.3g}, outside [{t['min_ratio']:g}, "
        f"{t['max_ratio']:g}]: one side dominates the loss. Reweight so the ratio is about 1.",
        evidence={"desirable": good, "undesirable": bad, "ratio": ratio, "min_ratio": t["min_ratio"],
                  "max_ratio": t["max_ratio"]},
        suggestions=suggestions(suggest(data.config, "desirable_weight", proposed,
                                        "balances desirable and undesirable examples")),
    )]


def check_kto_batch(data: PreflightInput, th: Thresholds) -> list[Finding]:
    if not _is_kto(data) or data.config.get("loss_type") == "apo_zero_unpaired":
        return []
    batch = data.config.get("per_device_train_batch_size")
    if not isinstance(batch, int):
        return []
    total = batch * max(1, data.world_size)
    needed = int(th["KTO_BATCH_TOO_SMALL"]["min_batch_size"])
    if total >= needed:
        return []
    accumulation = data.config.get("gradient_accumulation_steps")
    return [Finding(
        "KTO_BATCH_TOO_SMALL",
        f"KTO estimates its KL reference point from the other examples of each batch, but a batch holds only {total} "
        "row(s)" + (": with 1 the KL term equals the example's own reward and the loss is wrong." if total < 2
                    else ": the estimate is too noisy.") + f" Use at least {needed} rows per device batch.",
        evidence={"per_device_train_batch_size": batch, "world_size": data.world_size, "min_batch_size": needed},
        suggestions=suggestions(
            suggest(data.config, "per_device_train_batch_size", needed, "a usable in-batch KL estimate"),
            suggest(data.config, "gradient_accumulation_steps",
                    max(1, accumulation * batch // needed) if isinstance(accumulation, int) else None,
                    "keeps the effective batch size"),
        ),
        severity="error" if total < 2 else None,
    )]


def check_reward_pad(data: PreflightInput, th: Thresholds) -> list[Finding]:
    if not data.model.get("sequence_classification") or data.model.get("pad_token_id") is not None:
        return []
    return [Finding(
        "REWARD_MODEL_NO_PAD_TOKEN",
        "The reward model's config has no pad_token_id: a sequence-classification model finds each sequence's "
        "last token by looking for padding, so padded batches are scored at the wrong token (or fail). Set "
        "model.config.pad_token_id = tokenizer.pad_token_id before training.",
        evidence={"model.config.pad_token_id": None, "tokenizer.pad_token_id": data.pad_token_id},
    )]


def check_distillation(data: PreflightInput, th: Thresholds) -> list[Finding]:
    teacher = data.teacher
    if not teacher:
        return []
    findings = []
    student_hash, teacher_hash = data.tokenizer.get("vocab_hash"), teacher.get("vocab_hash")
    if student_hash and teacher_hash and student_hash != teacher_hash:
        findings.append(Finding(
            "DISTILL_VOCAB_MISMATCH",
            f"The teacher's tokenizer ({teacher.get('vocab_size')} tokens) and the student's "
            f"({data.tokenizer.get('vocab_size')} tokens) have different vocabularies: token i of one is not token i "
            "of the other, so matching their distributions trains nonsense. Use a teacher from the same model family.",
            evidence={"student_vocab_size": data.tokenizer.get("vocab_size"),
                      "teacher_vocab_size": teacher.get("vocab_size")},
        ))
    if teacher.get("chat_template") and data.chat_template and teacher["chat_template"] != data.chat_template:
        findings.append(Finding(
            "DISTILL_TEMPLATE_MISMATCH",
            "The teacher and the student format conversations with different chat templates: the teacher scores "
            "text laid out as the student's template, which it may not know. Use the same template for both.",
            evidence={"student_template_chars": len(data.chat_template),
                      "teacher_template_chars": len(teacher["chat_template"])},
        ))
    return findings


def check_moe_aux_loss(data: PreflightInput, th: Thresholds) -> list[Finding]:
    experts = data.model.get("num_experts")
    if not isinstance(experts, int) or experts < 2 or data.model.get("output_router_logits") is not False:
        return []
    return [Finding(
        "MOE_AUX_LOSS_OFF",
        f"The model is a mixture of {experts} experts but output_router_logits is off, so the router's "
        "load-balancing loss is not trained: routing can collapse onto a few experts. Load the model with "
        "output_router_logits=True (or set model.config.output_router_logits = True).",
        evidence={"num_experts": experts, "output_router_logits": False},
        suggestions=suggestions(suggest(
            data.config, "model_init_kwargs",
            lambda cur: {**(cur or {}), "output_router_logits": True}, "adds the load-balancing loss",
        )),
    )]


CHECKS = (
    check_chat_template,
    check_no_trainable_tokens,
    check_missing_eos,
    check_eos_masked_by_pad,
    check_truncation,
    check_padding_waste,
    check_length_bias,
    check_kto_weights,
    check_kto_batch,
    check_reward_pad,
    check_distillation,
    check_moe_aux_loss,
)


def preflight_findings(data: PreflightInput, thresholds: Thresholds) -> list[Finding]:
    """Every pre-flight finding for ``data`` (pure)."""
    return [finding for check in CHECKS for finding in check(data, thresholds)]
