"""Reward modeling.

A sequence-classification model with one output learns a scalar reward ``r(x, y)`` from
preference pairs: for each prompt ``x``, a chosen completion ``y_c`` and a rejected one ``y_r``,
it minimizes the Bradley-Terry loss ``-log sigma(r(x, y_c) - r(x, y_r) - margin)`` (plus an
optional centering term). Prompt + chosen and prompt + rejected are tokenized by
:mod:`honelm.data`, run through the model in one forward pass (padded or padding-free), and
each is scored at its last real token (:mod:`honelm.models.reward_scoring`). Diagnostics
(:mod:`honelm.diagnostics`) check the pairs and the model before training (length bias,
padding, the model's ``pad_token_id``) and watch accuracy, margin and the reward scale
during it.

    honelm reward --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name trl-lib/ultrafeedback_binarized
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import numbers
import os
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoTokenizer, Trainer

from honelm.data import DatasetFormatError, detect_format, tokenize_dataset, tokenize_row
from honelm.diagnostics.callback import attach_diagnostics
from honelm.models import resolve_dtype

from .config import RewardConfig
from .loss import bradley_terry_loss
from .scoring import find_score_head, sequence_rewards

logger = logging.getLogger(__name__)

_PROCESSED = ("chosen_ids", "rejected_ids")  # full sequences (prompt + completion), TRL's tokenized columns
_LEGACY = ("chosen_input_ids", "rejected_input_ids")  # the same, under TRL's older names


# ---- collation ------------------------------------------------------------------------------


@dataclass
class DataCollatorForPreference:
    """Batch preference pairs for a reward model: all chosen sequences first, then all rejected.

    Each example has ``chosen_ids`` and ``rejected_ids`` (prompt + completion token ids) and
    optionally ``margin``.

    Returns:
        Padded (default): ``input_ids`` and ``attention_mask`` ``(2B, T)``, right-padded; row
        ``i`` is pair ``i``'s chosen sequence and row ``B + i`` its rejected one.
        ``padding_free=True``: ``input_ids`` and ``position_ids`` ``(1, N)`` (positions restart
        at every sequence, same order) and ``seq_lengths`` ``(2B,)``; padding added by
        ``pad_to_multiple_of`` forms one more sequence at the end, not listed in ``seq_lengths``.
        Plus ``margin`` ``(B,)`` when the examples have one.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    padding_free: bool = False
    return_tensors: str = "pt"

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("DataCollatorForPreference: got an empty list of examples.")
        for index, example in enumerate(examples):
            missing = [c for c in _PROCESSED if c not in example]
            if missing:
                raise ValueError(
                    f"Example {index} has no {missing} (found keys {sorted(example)}). Pass the dataset through "
                    "RewardTrainer, which tokenizes preference data into 'chosen_ids' and 'rejected_ids'."
                )
        sequences = [list(ex["chosen_ids"]) for ex in examples] + [list(ex["rejected_ids"]) for ex in examples]
        batch = self._flat(sequences) if self.padding_free else self._padded(sequences)
        margins = [ex.get("margin") for ex in examples]
        if any(m is not None for m in margins):
            if any(m is None for m in margins):
                raise ValueError("DataCollatorForPreference: some examples have a 'margin' and others do not.")
            batch["margin"] = torch.tensor([float(m) for m in margins], dtype=torch.float)  # (B,)
        return batch

    def _padded(self, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
        width = _round_up(max(len(s) for s in sequences), self.pad_to_multiple_of)
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)  # (2B, T)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)  # (2B, T)
        for row, ids in enumerate(sequences):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def _flat(self, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
        lengths = [len(s) for s in sequences]
        ids = [t for s in sequences for t in s]
        positions = [p for n in lengths for p in range(n)]
        n_pad = _round_up(len(ids), self.pad_to_multiple_of) - len(ids)
        ids += [self.pad_token_id] * n_pad
        positions += list(range(n_pad))  # its own sequence: no real token attends to it
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),  # (1, N)
            "position_ids": torch.tensor([positions], dtype=torch.long),  # (1, N)
            "seq_lengths": torch.tensor(lengths, dtype=torch.long),  # (2B,)
        }


def _round_up(length: int, multiple: int | None) -> int:
    return length if not multiple else -(-length // multiple) * multiple


# ---- trainer --------------------------------------------------------------------------------


class RewardTrainer(Trainer):
    """Trainer for outcome reward models (see the module docstring and ``docs/reward.md``).

    Args:
        model: A model name or local path (loaded with ``AutoModelForSequenceClassification``,
            ``num_labels=1`` and ``args.model_init_kwargs``), or an instantiated
            sequence-classification model with one output (``config.num_labels == 1``).
        args: A :class:`RewardConfig`; defaults to one with ``output_dir="<model>-Reward"``.
        data_collator: Defaults to :class:`DataCollatorForPreference`.
        train_dataset, eval_dataset: Preference data (``prompt``/``chosen``/``rejected``, or
            ``chosen``/``rejected`` with an implicit prompt; standard or conversational;
            optional ``margin`` column), or tokenized (``chosen_ids``/``rejected_ids``, or
            ``prompt_input_ids``/``chosen_input_ids``/``rejected_input_ids``).
        processing_class: The tokenizer; loaded from ``model`` when omitted.
        compute_metrics: Receives ``EvalPrediction(predictions=(N, 2) [chosen, rejected] rewards)``.
        callbacks, optimizers, optimizer_cls_and_kwargs, preprocess_logits_for_metrics: As in
            ``transformers.Trainer``.
        quantization_config: Merged into ``model_init_kwargs`` when ``model`` is a name (QLoRA).
        peft_config: A ``peft`` config (e.g. ``LoraConfig``). ``task_type`` must be ``"SEQ_CLS"``
            (set when left empty), so that the score head trains along with the adapters.

    Attributes:
        filter_stats: Per split, ``{"num_rows", "num_dropped"}``: the pairs dropped for being
            longer than ``max_length`` (empty for streaming datasets and ``max_length=None``).
    """

    _tag_names = ["honelm", "reward-trainer"]
    # The loss is a mean over the pairs of each micro-batch: Trainer divides it by the
    # gradient-accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: Any,
        args: RewardConfig | None = None,
        data_collator: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_metrics: Callable[..., dict[str, float]] | None = None,
        callbacks: list[Any] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        optimizer_cls_and_kwargs: tuple[type, dict[str, Any]] | None = None,
        preprocess_logits_for_metrics: Callable[..., torch.Tensor] | None = None,
        quantization_config: Any = None,
        peft_config: Any = None,
    ) -> None:
        model_id = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", None)
        if args is None:
            name = (model_id or "model").rstrip("/").split("/")[-1]
            args = RewardConfig(output_dir=f"{name}-Reward")
        elif not isinstance(args, RewardConfig):
            raise TypeError(f"RewardTrainer: `args` must be a RewardConfig, got {type(args).__name__}.")
        model, processing_class = _setup_model(model, model_id, args, processing_class, quantization_config, peft_config)
        tokenizer = getattr(processing_class, "tokenizer", processing_class)

        self._output_dir_existed = os.path.isdir(args.output_dir)
        self._dataset_name = _dataset_name(train_dataset)
        self.filter_stats: dict[str, dict[str, int]] = {}
        self._metric_prefix = "eval"
        if train_dataset is not None:
            if _is_iterable(train_dataset):
                args.accelerator_config.dispatch_batches = False  # batches cannot be concatenated across processes
            train_dataset = self._prepare_dataset(train_dataset, tokenizer, args, "train")
        if eval_dataset is not None:
            eval_dataset = self._prepare_eval(eval_dataset, tokenizer, args)
        if data_collator is None:
            data_collator = DataCollatorForPreference(
                pad_token_id=tokenizer.pad_token_id,
                pad_to_multiple_of=args.pad_to_multiple_of,
                padding_free=args.padding_free,
            )

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        if self.args.n_gpu > 1:
            raise ValueError(
                "RewardTrainer does not support torch.nn.DataParallel (several GPUs visible to one process). "
                "Launch with `accelerate launch` / `honelm reward --num_processes N`, or make one GPU visible "
                "with CUDA_VISIBLE_DEVICES."
            )
        # Evaluation calls compute_loss (there are no label columns).
        self.can_return_loss = True
        self.label_names = []
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._total_tokens = {"train": 0, "eval": 0}
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)
        self.diagnostics = attach_diagnostics(
            self, "reward", output_dir_existed=self._output_dir_existed, dataset=self.train_dataset,
            tokenizer=tokenizer, collator=self.data_collator, model=self.model,
        )

    # ---- data -----------------------------------------------------------------------------

    def _prepare_eval(self, eval_dataset: Any, tokenizer: Any, args: RewardConfig) -> Any:
        if isinstance(eval_dataset, Mapping):
            return {k: self._prepare_dataset(v, tokenizer, args, f"eval/{k}") for k, v in eval_dataset.items()}
        return self._prepare_dataset(eval_dataset, tokenizer, args, "eval")

    def _prepare_dataset(self, dataset: Any, tokenizer: Any, args: RewardConfig, split: str) -> Any:
        """Validate and tokenize preference data into ``chosen_ids``/``rejected_ids`` (+ ``margin``),
        then drop pairs longer than ``max_length``. Already tokenized data is checked, not re-tokenized."""
        columns = _column_names(dataset)
        with args.main_process_first(desc=f"tokenizing the {split} dataset"):
            if _is_iterable(dataset):
                dataset = _prepare_stream(dataset, tokenizer, args, columns)
            else:
                dataset = _prepare_table(dataset, tokenizer, args, columns)
            dataset = self._filter_long(dataset, args, split)
        return dataset

    def _filter_long(self, dataset: Any, args: RewardConfig, split: str) -> Any:
        if args.max_length is None:
            self.filter_stats[split] = {}
            return dataset
        max_length = args.max_length

        def fits(batch: dict[str, list[Any]]) -> list[bool]:
            pairs = zip(batch["chosen_ids"], batch["rejected_ids"])
            return [len(c) <= max_length and len(r) <= max_length for c, r in pairs]

        if _is_iterable(dataset):
            self.filter_stats[split] = {}
            return dataset.filter(fits, batched=True)
        before = len(dataset)
        kept = dataset.filter(fits, batched=True, num_proc=args.dataset_num_proc, desc=f"Dropping long {split} pairs")
        dropped = before - len(kept)
        self.filter_stats[split] = {"num_rows": before, "num_dropped": dropped}
        longest = _longest_sequence(dataset) if dropped else 0
        if dropped == before:
            raise ValueError(
                f"{split} dataset: all {before} pairs are longer than max_length={max_length} tokens (prompt + "
                f"completion; the longest has {longest}), so nothing is left to train on. Raise max_length "
                "(or set it to None)."
            )
        if dropped:
            logger.warning(
                "%s dataset: dropped %d of %d pairs (%.1f%%) whose prompt + chosen or prompt + rejected is longer "
                "than max_length=%d tokens (the longest has %d). Raise max_length to keep them.",
                split, dropped, before, 100 * dropped / before, max_length, longest,
            )
        return kept

    def _remove_unused_columns(self, dataset: Any, description: str | None = None) -> Any:
        return dataset  # prepared datasets hold exactly what the collator needs

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = [*_PROCESSED, "margin"]

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """As ``Trainer.evaluate``; a raw preference dataset passed here is prepared like ``eval_dataset``.

        The reward metrics carry ``metric_key_prefix`` (``eval_accuracy``, ``eval_<name>_accuracy``
        for a dict of eval datasets) and are in the returned dict.
        """
        if eval_dataset is not None and not isinstance(eval_dataset, (str, Mapping)):  # Trainer recurses into dicts
            tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
            eval_dataset = self._prepare_dataset(eval_dataset, tokenizer, self.args, "eval")
        self._metric_prefix = metric_key_prefix  # a dict of datasets sets it again per dataset, recursively
        return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    # ---- loss -----------------------------------------------------------------------------

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        mode = "train" if model.training else "eval"
        inputs = dict(inputs)
        margin = inputs.pop("margin", None)  # (B,)
        inputs.pop("use_cache", None)
        head = find_score_head(self.accelerator.unwrap_model(model))
        rewards = sequence_rewards(model, head=head, **inputs).float()  # (2B,): chosen first
        if rewards.shape[0] % 2:
            raise ValueError(
                f"The batch holds {rewards.shape[0]} sequences; expected an even number (all chosen, then all "
                "rejected). A custom data_collator must put the B chosen sequences first and the B rejected after."
            )
        chosen, rejected = rewards.chunk(2)  # (B,), (B,)
        loss, _ = bradley_terry_loss(chosen, rejected, margin, self.args.center_rewards_coefficient)
        self._record(mode, inputs, chosen.detach(), rejected.detach())
        if return_outputs:
            return loss, {"logits": torch.stack([chosen, rejected], dim=1).detach()}  # (B, 2)
        return loss

    def _record(self, mode: str, inputs: dict[str, torch.Tensor], chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        if "attention_mask" in inputs:
            tokens = inputs["attention_mask"].sum()
        elif "seq_lengths" in inputs:
            tokens = inputs["seq_lengths"].sum()
        else:
            tokens = torch.tensor(inputs["input_ids"].numel(), device=inputs["input_ids"].device)
        tokens = self.accelerator.gather(tokens.reshape(1).to(chosen.device)).sum()
        self._total_tokens[mode] += int(tokens.item())
        chosen = self.accelerator.gather_for_metrics(chosen)  # (B_total,)
        rejected = self.accelerator.gather_for_metrics(rejected)  # (B_total,)
        both = torch.cat([chosen, rejected])
        diff = chosen - rejected
        values = torch.stack([(diff > 0).float().mean(), diff.mean(), both.min(), both.mean(), both.max()]).tolist()
        for key, value in zip(("accuracy", "margin", "min_reward", "mean_reward", "max_reward"), values):
            self._metrics[mode][key].append(value)

    def compute_loss_context_manager(self) -> contextlib.ExitStack:
        stack = super().compute_loss_context_manager()
        if self.args.activation_offloading:
            stack.enter_context(torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()))
        return stack

    # ---- logging and saving ---------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        prefix = self._metric_prefix
        mode = "eval" if any(k.startswith(f"{prefix}_") for k in logs) else "train"
        metrics = {k: sum(v) / len(v) for k, v in self._metrics[mode].items() if v}
        metrics["num_tokens"] = float(self._total_tokens[mode])
        if mode == "eval":
            metrics = {f"{prefix}_{k}": v for k, v in metrics.items()}
        logs.update(metrics)  # in place: `evaluate()` returns this dict
        super().log(logs, start_time)
        self._metrics[mode].clear()

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save:  # only the process that writes files
            _write_model_card(output_dir or self.args.output_dir, self.model, self._dataset_name, self.args)


# ---- data helpers ---------------------------------------------------------------------------


def _is_iterable(dataset: Any) -> bool:
    from datasets import IterableDataset

    return isinstance(dataset, IterableDataset)


def _column_names(dataset: Any) -> list[str]:
    if getattr(dataset, "column_names", None) is not None:
        return list(dataset.column_names)
    return list(next(iter(dataset), {}))


def _margin_value(value: Any, index: int) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise DatasetFormatError(
            f"Row {index}, column 'margin': found {value!r:.60} of type {type(value).__name__}. Expected a finite "
            "number: how far the chosen reward should exceed the rejected one. Fix: fill in or drop rows without "
            "a margin (e.g. dataset.filter(lambda row: row['margin'] is not None)), or remove the column.",
            row=index,
            column="margin",
        )
    return float(value)


def _check_ids(value: Any, index: int, column: str) -> list[int]:
    ok = isinstance(value, (list, tuple)) and len(value) > 0
    if ok:
        ok = all(isinstance(t, numbers.Integral) and not isinstance(t, bool) and t >= 0 for t in value)
    if not ok:
        raise DatasetFormatError(
            f"Row {index}, column {column!r}: found {value!r:.80}. Expected a non-empty list of token ids "
            "(the prompt followed by the completion). Fix: tokenize the column again, or drop it and give the "
            "text columns 'prompt', 'chosen', 'rejected' so that RewardTrainer tokenizes them.",
            row=index,
            column=column,
        )
    return list(value)


def _check_id_column(dataset: Any, column: str) -> None:
    """Every row of ``column`` is a non-empty list of token ids: checked in Arrow, rows read only to name a bad one."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = dataset.with_format("arrow")[column]  # (rows,) list array, without copying into Python
    kind = values.type
    if (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and pa.types.is_integer(kind.value_type):
        flat = pc.list_flatten(values)
        empty = pc.any(pc.fill_null(pc.equal(pc.list_value_length(values), 0), True)).as_py()
        negative = len(flat) > 0 and (pc.min(flat).as_py() < 0 or flat.null_count > 0)
        if not empty and not negative and values.null_count == 0:
            return
    for start in range(0, len(dataset), 1000):  # find and name the first bad row
        for offset, ids in enumerate(dataset[start : start + 1000][column]):
            _check_ids(ids, start + offset, column)


def _longest_sequence(dataset: Any) -> int:
    import pyarrow.compute as pc

    table = dataset.with_format("arrow")[:]
    lengths = [pc.max(pc.list_value_length(table[c])).as_py() or 0 for c in _PROCESSED]
    return int(max(lengths))


def _processed_columns(columns: Sequence[str]) -> tuple[str, str] | None:
    """The columns holding full chosen/rejected token ids, if the dataset is already tokenized so."""
    if set(_PROCESSED) <= set(columns):
        return _PROCESSED
    if set(_LEGACY) <= set(columns) and "prompt_input_ids" not in columns:
        return _LEGACY
    return None


def _prepare_table(dataset: Any, tokenizer: Any, args: RewardConfig, columns: list[str]) -> Any:
    """A ``datasets.Dataset``: every row is checked before anything is tokenized."""
    plain = dataset.with_format(None)
    margins = None
    if "margin" in columns:
        margins = [_margin_value(v, i) for i, v in enumerate(plain["margin"])]
    processed = _processed_columns(columns)
    if processed is not None:
        for column in processed:
            _check_id_column(plain, column)
        out = plain.select_columns(list(processed))
        if processed != _PROCESSED:
            out = out.rename_columns(dict(zip(processed, _PROCESSED)))
    else:
        tokenized, _ = tokenize_dataset(
            plain,
            tokenizer,
            max_length=None,
            eos_token=args.eos_token,
            expected_kinds=("preference",),
            num_proc=args.dataset_num_proc,
        )
        out = tokenized.map(
            _join_prompt,
            batched=True,
            remove_columns=tokenized.column_names,
            num_proc=args.dataset_num_proc,
            desc="Joining prompts and completions",
        )
    if margins is not None:
        out = out.add_column("margin", margins)
    return out


def _join_prompt(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
    prompts = batch["prompt_input_ids"]
    return {
        "chosen_ids": [list(p) + list(c) for p, c in zip(prompts, batch["chosen_input_ids"])],
        "rejected_ids": [list(p) + list(r) for p, r in zip(prompts, batch["rejected_input_ids"])],
    }


def _prepare_stream(dataset: Any, tokenizer: Any, args: RewardConfig, columns: list[str]) -> Any:
    """A ``datasets.IterableDataset``: each row is checked and tokenized as it streams."""
    processed = _processed_columns(columns)
    fmt = None if processed is not None else detect_format(dataset, expected_kinds=("preference",))
    has_margin = "margin" in columns

    def convert(row: dict[str, Any], index: int) -> dict[str, Any]:
        if processed is not None:
            out = {new: _check_ids(row[old], index, old) for old, new in zip(processed, _PROCESSED)}
        else:
            tokens = tokenize_row(row, tokenizer, fmt, index=index, eos_token=args.eos_token)
            out = _join_prompt({k: [v] for k, v in tokens.items()})
            out = {k: v[0] for k, v in out.items()}
        if has_margin:
            out["margin"] = _margin_value(row["margin"], index)
        return out

    return dataset.map(convert, with_indices=True, remove_columns=columns)


def _dataset_name(dataset: Any) -> str | None:
    info = getattr(dataset, "info", None)
    return (getattr(info, "dataset_name", None) or getattr(info, "builder_name", None)) if info else None


# ---- model helpers --------------------------------------------------------------------------


def _setup_model(
    model: Any, model_id: str | None, args: RewardConfig, processing_class: Any, quantization_config: Any,
    peft_config: Any,
) -> tuple[Any, Any]:
    """Load or check the model, load and configure the tokenizer, sync the pad id, wrap PEFT."""
    if isinstance(model, str):
        model = _load_reward_model(model, args, quantization_config)
    else:
        if args.model_init_kwargs or quantization_config is not None:
            logger.warning("model_init_kwargs / quantization_config are ignored: the model is already instantiated.")
        _check_reward_model(model)
    if processing_class is None:
        if not model_id:
            raise ValueError(
                "RewardTrainer: pass `processing_class` (the tokenizer); the model has no name to load it from."
            )
        processing_class = AutoTokenizer.from_pretrained(model_id, trust_remote_code=args.trust_remote_code)
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    _configure_tokenizer(tokenizer, args, model)
    _sync_pad_token_id(model, tokenizer)
    if peft_config is not None:
        model = _wrap_peft(model, peft_config, args)
    if args.disable_dropout:
        _disable_dropout(model)
    if find_score_head(model) is None and args.padding_free:
        raise ValueError(
            f"{type(model).__name__} has no per-token `score` head, so its rewards cannot be read from "
            "padding-free batches. Set padding_free=False."
        )
    return model, processing_class


def _load_reward_model(name: str, args: RewardConfig, quantization_config: Any) -> Any:
    """``AutoModelForSequenceClassification.from_pretrained(name, num_labels=1, ...)``."""
    from transformers import AutoModelForSequenceClassification, set_seed

    kwargs = dict(args.model_init_kwargs or {})
    if "torch_dtype" in kwargs:
        if "dtype" in kwargs:
            raise ValueError("model_init_kwargs: give either `dtype` or `torch_dtype`, not both.")
        kwargs["dtype"] = kwargs.pop("torch_dtype")
    kwargs["dtype"] = resolve_dtype(kwargs.get("dtype", torch.float32))
    if kwargs.get("num_labels", 1) != 1:
        raise ValueError(
            f"model_init_kwargs: num_labels={kwargs['num_labels']}, but a reward model has one output. Remove it."
        )
    kwargs["num_labels"] = 1
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    if quantization_config is not None:
        if "quantization_config" in kwargs:
            raise ValueError(
                "quantization_config is given both to RewardTrainer and in model_init_kwargs; give it once."
            )
        kwargs["quantization_config"] = quantization_config
    set_seed(args.seed)  # the new score head is randomly initialized: make it reproducible
    with _expected_head_keys():
        model = AutoModelForSequenceClassification.from_pretrained(name, **kwargs)
    return model


@contextlib.contextmanager
def _expected_head_keys() -> Any:
    """Loading a causal-LM checkpoint as a classifier leaves `lm_head` unused and `score` new:
    expected here, so transformers' load report does not flag them."""
    try:
        from transformers.modeling_layers import GenericForSequenceClassification as cls
    except ImportError:  # pragma: no cover - older transformers
        yield
        return
    saved = {k: cls.__dict__.get(k) for k in ("_keys_to_ignore_on_load_missing", "_keys_to_ignore_on_load_unexpected")}
    cls._keys_to_ignore_on_load_missing = [*(saved["_keys_to_ignore_on_load_missing"] or []), r"^score\.weight$"]
    cls._keys_to_ignore_on_load_unexpected = [*(saved["_keys_to_ignore_on_load_unexpected"] or []), r"^lm_head\."]
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(cls, key, value)


def _check_reward_model(model: Any) -> None:
    config = getattr(model, "config", None)
    num_labels = getattr(config, "num_labels", None)
    architecture = type(model).__name__
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        architecture = type(model.get_base_model()).__name__
    if "ForSequenceClassification" not in architecture and find_score_head(model) is None:
        raise ValueError(
            f"RewardTrainer needs a sequence-classification model with one output; got {architecture}. Pass the "
            "model's name or path instead (it is loaded with AutoModelForSequenceClassification, num_labels=1, "
            "and a new score head), or load it so yourself: "
            "AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)."
        )
    if num_labels != 1:
        raise ValueError(
            f"The model has num_labels={num_labels}, but a reward model outputs one scalar per sequence. Load it "
            "with num_labels=1 (AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)), or pass "
            "its name or path to RewardTrainer, which does so."
        )


def _configure_tokenizer(tokenizer: Any, args: RewardConfig, model: Any) -> None:
    """Apply ``chat_template_path``, ``eos_token`` and ``pad_token`` with clear errors."""
    if args.chat_template_path is not None:
        tokenizer.chat_template = _load_chat_template(args.chat_template_path)
    vocab = tokenizer.get_vocab()
    if args.eos_token is not None:
        if args.eos_token not in vocab:
            raise ValueError(
                f"RewardConfig.eos_token={args.eos_token!r} is not a token of the tokenizer's vocabulary. "
                f"Use one of its special tokens (EOS is {tokenizer.eos_token!r})."
            )
        tokenizer.eos_token = args.eos_token
        model.config.get_text_config().eos_token_id = tokenizer.eos_token_id
    pad = args.pad_token or tokenizer.pad_token or tokenizer.eos_token
    if pad is None or pad not in vocab:
        raise ValueError(
            f"RewardConfig.pad_token={pad!r} is not a token of the tokenizer's vocabulary. Set `pad_token` "
            "to a token the tokenizer has (its EOS works when nothing else fits)."
        )
    tokenizer.pad_token = pad


def _sync_pad_token_id(model: Any, tokenizer: Any) -> None:
    """The model config's ``pad_token_id`` is what a plain forward of the saved model pools by."""
    config = model.config.get_text_config()
    pad_id = tokenizer.pad_token_id
    if config.pad_token_id is None:
        logger.warning(
            "The model config has no pad_token_id; setting it to the tokenizer's pad token %r (id %d), which "
            "batched forward passes of a sequence-classification model need.", tokenizer.pad_token, pad_id,
        )
    elif config.pad_token_id != pad_id:
        logger.info("Setting the model config's pad_token_id from %s to %d (the tokenizer's).",
                    config.pad_token_id, pad_id)
    config.pad_token_id = pad_id
    if hasattr(model.config, "pad_token_id") and model.config is not config:
        model.config.pad_token_id = pad_id
    if pad_id is not None and pad_id == tokenizer.eos_token_id:
        logger.warning(
            "The pad token is the EOS token (%r). Training scores each sequence at its last real token, found from "
            "the attention mask; but a plain forward of the saved model (AutoModelForSequenceClassification) finds "
            "the last token by searching for the pad id, and would score the token before a final EOS. Score with "
            "honelm.methods.reward.RewardModelScorer, or set a pad token distinct from EOS (pad_token=...).",
            tokenizer.pad_token,
        )


def _load_chat_template(path: str) -> str:
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    template = AutoTokenizer.from_pretrained(path).chat_template
    if not template:
        raise ValueError(f"RewardConfig.chat_template_path={path!r}: that tokenizer has no chat template.")
    return template


def _wrap_peft(model: Any, peft_config: Any, args: RewardConfig) -> Any:
    try:
        from peft import PeftConfig, get_peft_model
    except ImportError as e:  # pragma: no cover - peft is a dev dependency
        raise ImportError("RewardTrainer(peft_config=...) needs peft: pip install 'honelm[peft]'.") from e
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"peft_config must be a peft config (e.g. peft.LoraConfig), got {type(peft_config).__name__}.")
    if hasattr(model, "peft_config"):
        raise ValueError(
            "The model already has PEFT adapters and a peft_config was given too. Merge the adapters first "
            "(model.merge_and_unload()) or pass the PeftModel without peft_config."
        )
    task_type = getattr(peft_config, "task_type", None)
    if task_type is None:
        peft_config = copy.deepcopy(peft_config)
        peft_config.task_type = "SEQ_CLS"  # so that peft trains (and saves) the score head too
    elif str(getattr(task_type, "value", task_type)) != "SEQ_CLS":
        raise ValueError(
            f"peft_config.task_type={str(getattr(task_type, 'value', task_type))!r}, but a reward model is a sequence "
            "classifier: use task_type='SEQ_CLS' (the adapters and the score head then train together)."
        )
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        from peft import prepare_model_for_kbit_training  # QLoRA

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(args.gradient_checkpointing))
    if args.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # frozen embeddings would cut the checkpointed graph
    model = get_peft_model(model, peft_config)
    head = find_score_head(model)
    if head is not None and not any(p.requires_grad for p in head.parameters()):
        logger.warning(
            "The score head is frozen under this peft_config, so the reward scale cannot be learned. Add "
            "modules_to_save=['score'] (task_type='SEQ_CLS' does so by default)."
        )
    return model


def _disable_dropout(model: Any) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def _write_model_card(output_dir: str, model: Any, dataset_name: str | None, args: RewardConfig) -> None:
    from honelm.version import __version__

    config = getattr(model, "config", None)
    base = getattr(config, "_name_or_path", None) or "unknown"
    peft = " (LoRA adapter)" if hasattr(model, "peft_config") else ""
    centering = args.center_rewards_coefficient or 0.0
    card = (
        f"---\nlibrary_name: honelm\ntags:\n- honelm\n- reward-model\n- reward-trainer\nbase_model: {base}\n"
        "pipeline_tag: text-classification\n---\n\n"
        f"# {os.path.basename(os.path.abspath(output_dir))}\n\n"
        f"This reward model{peft} was trained with reward modeling (Bradley-Terry pairwise loss on preference "
        f"pairs) using honelm {__version__}. It outputs one scalar per sequence: higher means preferred.\n\n"
        f"- Method: reward modeling (`center_rewards_coefficient={centering}`)\n"
        f"- Base model: {base}\n"
        f"- Dataset: {dataset_name or 'not recorded'}\n"
        f"- Max length: {args.max_length}, learning rate: {args.learning_rate}\n\n"
        "## Scoring\n\n"
        "```python\n"
        "from honelm.methods.reward import RewardModelScorer\n\n"
        f"scorer = RewardModelScorer({os.path.basename(os.path.abspath(output_dir))!r})\n"
        "scorer(prompts, completions)  # one reward per (prompt, completion)\n"
        "```\n"
    )
    with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(card)
