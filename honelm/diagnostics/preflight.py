"""Pre-flight: gather what the pre-flight checks read from live objects, and run them.

:func:`preflight_input` samples the tokenized training dataset (up to ``max_rows`` rows,
spread over the whole dataset; the first rows of a stream), reads the tokenizer's EOS,
end-of-turn and pad tokens and chat template, collates a few rows with the trainer's
collator to see which EOS tokens survive as labels, and reads a few facts of the model's
config. The checks themselves (:mod:`honelm.diagnostics.detectors.preflight`) are pure.

The columns read are those of each method's prepared dataset: ``input_ids`` and its masks
(SFT), ``prompt_input_ids`` + ``chosen_input_ids`` / ``rejected_input_ids`` (DPO),
``prompt_input_ids`` + ``completion_input_ids`` + ``label`` (KTO), ``chosen_ids`` /
``rejected_ids``, each a whole prompt + completion sequence (reward modeling).
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Mapping
from typing import Any

from .detectors.preflight import PreflightInput, preflight_findings, trained_positions
from .events import Finding

TOKEN_COLUMNS = (
    "input_ids", "completion_mask", "assistant_masks", "seq_lengths",
    "prompt_input_ids", "chosen_input_ids", "rejected_input_ids", "completion_input_ids", "label",
    "chosen_ids", "rejected_ids",
)
# The completion columns of preference rows, and the label key each trainer's collator returns.
_COMPLETION_COLUMNS = ("chosen_input_ids", "rejected_input_ids", "completion_input_ids")
_LABEL_KEYS = ("labels", "completion_labels")
_END_TOKEN = re.compile(r"end|eot|eos|^</s>$", re.IGNORECASE)
_PAD_TOKEN = re.compile(r"pad", re.IGNORECASE)


def _is_end_token(token: str) -> bool:
    """``<|im_end|>``, ``<|eot_id|>``, ``<|endoftext|>``, ``</s>``... (not ``<|end_header_id|>``)."""
    lowered = token.lower()
    return bool(_END_TOKEN.search(token)) and "header" not in lowered and "start" not in lowered


def sample_rows(dataset: Any, max_rows: int = 1000) -> tuple[list[dict[str, Any]], list[int], int | None]:
    """``(rows, dataset indices, dataset length)``: up to ``max_rows`` rows spread evenly."""
    if dataset is None:
        return [], [], None
    try:
        length = len(dataset)
    except TypeError:  # an IterableDataset or a generator: its first rows
        rows = [dict(r) for r in itertools.islice(iter(dataset), min(max_rows, 256))]
        return [{k: v for k, v in r.items() if k in TOKEN_COLUMNS} for r in rows], list(range(len(rows))), None
    count = min(max_rows, length)
    indices = sorted({int(i * length / count) for i in range(count)}) if count else []
    columns = getattr(dataset, "column_names", None)
    if columns is not None and hasattr(dataset, "select"):
        keep = [c for c in columns if c in TOKEN_COLUMNS]
        subset = dataset.select_columns(keep) if keep and hasattr(dataset, "select_columns") else dataset
        subset = subset.select(indices)
        subset = subset.with_format(None) if hasattr(subset, "with_format") else subset
        rows = subset.to_list() if hasattr(subset, "to_list") else [subset[i] for i in range(len(indices))]
    else:
        rows = [{k: v for k, v in dict(dataset[i]).items() if k in TOKEN_COLUMNS} for i in indices]
    return rows, indices, length


def stop_token_ids(tokenizer: Any, config: Mapping[str, Any] | None = None, model: Any = None) -> frozenset[int]:
    """Ids that end a generation: EOS, the config's ``eos_token``, end-of-turn special tokens,
    and the model's ``generation_config.eos_token_id``."""
    ids: set[int] = set()
    if tokenizer is not None:
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        named = [(config or {}).get("eos_token")]
        named += [t for t in getattr(tokenizer, "all_special_tokens", []) if _is_end_token(str(t))]
        for token in named:
            if token:
                token_id = tokenizer.convert_tokens_to_ids(token)
                if isinstance(token_id, int) and token_id != getattr(tokenizer, "unk_token_id", None):
                    ids.add(token_id)
    generation = getattr(model, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None)
    for token_id in eos if isinstance(eos, (list, tuple)) else [eos]:
        if isinstance(token_id, int):
            ids.add(token_id)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is not None and pad_id != tokenizer.eos_token_id:
        ids.discard(int(pad_id))
    return frozenset(ids)


def tokenizer_facts(tokenizer: Any) -> dict[str, Any]:
    """``vocab_size``, ``vocab_hash`` (same vocabulary <=> same hash) and ``chat_template``."""
    if tokenizer is None:
        return {}
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha1()
    for token, index in sorted(vocab.items(), key=lambda item: item[1]):
        digest.update(f"{index}\t{token}\n".encode())
    return {"vocab_size": len(vocab), "vocab_hash": digest.hexdigest(),
            "chat_template": getattr(tokenizer, "chat_template", None)}


def model_facts(model: Any) -> dict[str, Any]:
    """The facts of a model's config that detectors read."""
    config = getattr(model, "config", model)
    if config is None:
        return {}
    architectures = getattr(config, "architectures", None) or []
    name = type(model).__name__ if model is not config else ""
    experts = next((getattr(config, k) for k in ("num_experts", "num_local_experts", "n_routed_experts")
                    if isinstance(getattr(config, k, None), int)), None)
    pad_token_id = getattr(config, "pad_token_id", None)
    if not hasattr(config, "pad_token_id") and callable(getattr(config, "get_text_config", None)):
        pad_token_id = getattr(config.get_text_config(), "pad_token_id", None)  # a composite model's text part
    facts = {
        "pad_token_id": pad_token_id,
        "sequence_classification": name.endswith("ForSequenceClassification")
        or any(str(a).endswith("ForSequenceClassification") for a in architectures),
        "num_experts": experts,
        "num_experts_per_tok": getattr(config, "num_experts_per_tok", None) if experts else None,
        "output_router_logits": getattr(config, "output_router_logits", None) if experts else None,
        "router_aux_loss_coef": getattr(config, "router_aux_loss_coef", None) if experts else None,
    }
    return {k: v for k, v in facts.items() if v is not None}


def _spare_pad_token(tokenizer: Any) -> str | None:
    """A special token named like a pad token that is not EOS (e.g. an unused ``<|pad|>``)."""
    eos = tokenizer.eos_token
    added = [getattr(t, "content", str(t)) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()]
    for token in [*getattr(tokenizer, "all_special_tokens", []), *added]:
        if token != eos and _PAD_TOKEN.search(str(token)):
            return str(token)
    return None


def _trained_eos(row: dict[str, Any], eos_id: int, completion_only: bool, assistant_only: bool) -> int:
    """EOS tokens among the targets of one row: its trained positions (language modeling), or
    its completions (preference rows; a completion's first token is a target only after a prompt)."""
    if "input_ids" in row:
        if row.get("seq_lengths"):
            return 0
        positions = [p for span in trained_positions(row, completion_only, assistant_only) for p in span]
        return sum(row["input_ids"][p] == eos_id for p in positions)
    if "prompt_input_ids" not in row:
        return 0
    skip = 0 if row["prompt_input_ids"] else 1
    return sum(list(row[c][skip:]).count(eos_id) for c in _COMPLETION_COLUMNS if row.get(c))


def _collator_eos(collator: Any, rows: list[dict[str, Any]], eos_id: int, completion_only: bool,
                  assistant_only: bool) -> dict[str, int] | None:
    """Trained EOS tokens in up to 4 rows, and how many the collator keeps as labels.

    The labels are ``labels`` (SFT, DPO) or ``completion_labels`` (KTO's matched sequences);
    a collator returning neither (a reward model's) is not checked.
    """
    import torch

    chosen, expected = [], 0
    for row in rows:
        count = _trained_eos(row, eos_id, completion_only, assistant_only)
        if count:
            chosen.append(row)
            expected += count
        if len(chosen) == 4:
            break
    if not chosen:
        return None
    try:
        batch = collator([dict(r) for r in chosen])
    except Exception:  # noqa: BLE001 - a collator that fails here fails in training with its own error
        return None
    labels = next((batch[k] for k in _LABEL_KEYS if k in batch), None) if isinstance(batch, Mapping) else None
    if not isinstance(labels, torch.Tensor):
        return None
    return {"expected": int(expected), "in_labels": int((labels == eos_id).sum())}


def preflight_input(
    config: Mapping[str, Any],
    *,
    method: str = "",
    dataset: Any = None,
    tokenizer: Any = None,
    collator: Any = None,
    truncation_stats: Any = None,
    model: Any = None,
    teacher_tokenizer: Any = None,
    world_size: int = 1,
    max_rows: int = 1000,
) -> PreflightInput:
    """Build the :class:`PreflightInput` of a run from its live objects (see the module docstring)."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps its tokenizer
    rows, indices, length = sample_rows(dataset, max_rows)
    completion_only = getattr(collator, "completion_only_loss", config.get("completion_only_loss") is not False)
    assistant_only = bool(getattr(collator, "assistant_only_loss", config.get("assistant_only_loss", False)))
    eos_id = getattr(tokenizer, "eos_token_id", None)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    template = getattr(tokenizer, "chat_template", None)
    truncation = None
    if truncation_stats is not None:
        truncation = {k: getattr(truncation_stats, k, None) for k in
                      ("num_rows", "num_truncated", "tokens_dropped", "max_tokens_dropped", "max_length", "complete")}
        if not truncation.get("complete", True):
            truncation = None  # a stream's counts are partial
    collator_eos = None
    if collator is not None and eos_id is not None and pad_id == eos_id:
        collator_eos = _collator_eos(collator, rows, eos_id, completion_only, assistant_only)
    from honelm.data import has_generation_markers

    student = tokenizer_facts(tokenizer) if teacher_tokenizer is not None else {}
    return PreflightInput(
        config=config,
        method=method,
        rows=rows,
        row_indices=indices,
        num_rows=length,
        completion_only_loss=bool(completion_only),
        assistant_only_loss=assistant_only,
        stop_token_ids=stop_token_ids(tokenizer, config, model),
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        chat_template=template if isinstance(template, str) else None,
        has_generation_markers=bool(tokenizer is not None and has_generation_markers(tokenizer)),
        truncation=truncation,
        collator_eos=collator_eos,
        model=model_facts(model) if model is not None else {},
        tokenizer=student,
        teacher=tokenizer_facts(teacher_tokenizer) if teacher_tokenizer is not None else None,
        world_size=world_size,
        spare_pad_token=_spare_pad_token(tokenizer) if tokenizer is not None else None,
        decode=(lambda ids: tokenizer.decode(ids)) if tokenizer is not None else None,
    )


def run_preflight(
    config: Mapping[str, Any], thresholds: Mapping[str, Mapping[str, float]], **kwargs: Any
) -> list[Finding]:
    """The pre-flight findings of a run: :func:`preflight_input` then the pure checks."""
    return preflight_findings(preflight_input(config, **kwargs), thresholds)
