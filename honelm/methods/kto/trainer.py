"""Kahneman-Tversky Optimization (KTO).

The model learns from unpaired feedback: each row is a prompt, a completion and a label
(desirable or not). With the log-ratio ``r = log pi(y|x) - log pi_ref(y|x)`` of the policy
against a frozen reference, KTO raises ``sigma(beta * (r - z0))`` for desirable rows and
``sigma(beta * (z0 - r))`` for undesirable ones, where the reference point ``z0`` estimates
``KL(pi || pi_ref)`` from mismatched pairs of the same batch (row ``i``'s completion after
row ``i + 1``'s prompt), detached, averaged over processes and clamped at 0. Paired
preference data is split into unpaired rows (chosen: desirable, rejected: undesirable).
Log-probs come from the final hidden states chunk by chunk (:mod:`honelm.ops`), over
completion tokens only, never from the full ``(tokens, vocab)`` logits. Diagnostics
(:mod:`honelm.diagnostics`) check the data and the batch size before training (label
balance against the weights, a batch too small for the KL estimate, missing EOS) and watch
the metrics during it.

    honelm kto --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name trl-lib/kto-mix-14k
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import sys
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer, Trainer, TrainerCallback

from honelm.data import TruncationStats, detect_format, tokenize_dataset, truncate_row
from honelm.diagnostics.callback import attach_diagnostics
from honelm.models import last_hidden_states, load_causal_lm
from honelm.ops import lm_head_weight_and_bias, masked_selective_logps

from .config import KL_LOSS_TYPES, KTOConfig
from .loss import LOSSES, kl_estimate

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
_KINDS = ("unpaired_preference", "preference")
_UNPAIR_BATCH = 1000  # paired rows are split a block at a time: the block's chosen rows, then its rejected ones
_DROPPED = "__honelm_kto_truncated_tokens__"
_REFERENCE_FILE = "kto_reference_model.pt"  # the synced reference model (sync_ref_model) in a checkpoint
# Running sums gathered across processes at every step; the logged metrics are ratios of them.
_SUM_KEYS = (
    "chosen_rewards_sum", "rejected_rewards_sum", "chosen_logps_sum", "rejected_logps_sum", "num_chosen",
    "num_rejected", "chosen_logits_sum", "chosen_tokens", "rejected_logits_sum", "rejected_tokens", "entropy_sum",
    "num_tokens",
)


# ---- collation -------------------------------------------------------------------------------


def _round_up(length: int, multiple: int | None) -> int:
    return -(-length // multiple) * multiple if multiple else length


def _single_row_error(where: str) -> ValueError:
    return ValueError(
        f"KTO {where} has a single row, so its KL reference point would be estimated from the row's own "
        "(matched) completion instead of a mismatched one. Fix: use per_device_train_batch_size / "
        "per_device_eval_batch_size >= 2, set dataloader_drop_last=True so that no batch is left with one row, "
        "or use loss_type='apo_zero_unpaired', which has no reference point."
    )


@dataclass
class DataCollatorForUnpairedPreference:
    """Batch unpaired-preference rows, with the mismatched sequences of the KL estimate.

    Each example has ``prompt_input_ids``, ``completion_input_ids`` and ``label`` (optional:
    ``KL_completion_input_ids``, ``ref_logps``, ``ref_KL_logps``). With ``mismatched_pairs``,
    the KL sequence of row ``i`` is its prompt followed by the completion of row ``i - 1``
    (mod ``B``): every completion of the batch is scored once after another row's prompt.
    A precomputed ``KL_completion_input_ids`` is used instead when present.

    Returns, for the matched sequences (and with a ``KL_`` prefix for the mismatched ones):
    ``input_ids``, ``position_ids``, ``completion_labels`` (the token at completion positions,
    ``-100`` elsewhere and at each sequence's first position) and either ``attention_mask``
    (padded, ``(B, T)``) or ``seq_index`` (padding-free, ``(1, N)``: the row each token belongs
    to, ``B`` for trailing padding). Plus ``label`` ``(B,)`` bool and the reference log-probs
    when the examples carry them.
    """

    pad_token_id: int
    mismatched_pairs: bool = True
    padding_free: bool = False
    pad_to_multiple_of: int | None = None
    max_length: int | None = None
    truncation_mode: str = "keep_start"

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("DataCollatorForUnpairedPreference: got an empty list of examples.")
        prompts = [list(e["prompt_input_ids"]) for e in examples]
        completions = [list(e["completion_input_ids"]) for e in examples]
        batch = self._collate(prompts, completions, "")
        if self.mismatched_pairs:
            if all(e.get("KL_completion_input_ids") is not None for e in examples):
                shifted = [list(e["KL_completion_input_ids"]) for e in examples]
            else:
                if len(examples) < 2:
                    raise _single_row_error("batch")
                shifted = completions[-1:] + completions[:-1]  # row i: prompt i, completion i - 1
            pairs = [self._truncate(p, c) for p, c in zip(prompts, shifted)]
            batch.update(self._collate([p for p, _ in pairs], [c for _, c in pairs], "KL_"))
        batch["label"] = torch.tensor([bool(e["label"]) for e in examples], dtype=torch.bool)  # (B,)
        for key in ("ref_logps", "ref_KL_logps"):
            if examples[0].get(key) is not None:
                batch[key] = torch.tensor([float(e[key]) for e in examples], dtype=torch.float32)  # (B,)
        return batch

    def _truncate(self, prompt: list[int], completion: list[int]) -> tuple[list[int], list[int]]:
        row = {"prompt_input_ids": prompt, "completion_input_ids": completion}
        row, _ = truncate_row(row, self.max_length, self.truncation_mode)
        return row["prompt_input_ids"], row["completion_input_ids"]

    def _collate(self, prompts: list[list[int]], completions: list[list[int]], prefix: str) -> dict[str, torch.Tensor]:
        if self.padding_free:
            return self._collate_flat(prompts, completions, prefix)
        lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
        rows, width = len(lengths), _round_up(max(lengths), self.pad_to_multiple_of)
        input_ids = torch.full((rows, width), self.pad_token_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((rows, width), dtype=torch.long)  # (B, T)
        labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        for i, (p, c) in enumerate(zip(prompts, completions)):
            input_ids[i, : lengths[i]] = torch.tensor(p + c, dtype=torch.long)
            attention_mask[i, : lengths[i]] = 1
            labels[i, len(p) : lengths[i]] = torch.tensor(c, dtype=torch.long)
        labels[:, 0] = IGNORE_INDEX  # nothing precedes the first token
        position_ids = torch.arange(width, dtype=torch.long).expand(rows, width).clone()  # (B, T)
        return {
            f"{prefix}input_ids": input_ids,
            f"{prefix}attention_mask": attention_mask,
            f"{prefix}position_ids": position_ids,
            f"{prefix}completion_labels": labels,
        }

    def _collate_flat(
        self, prompts: list[list[int]], completions: list[list[int]], prefix: str
    ) -> dict[str, torch.Tensor]:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        seq_index: list[int] = []
        for i, (p, c) in enumerate(zip(prompts, completions)):
            n = len(p) + len(c)
            ids += p + c
            row_labels = [IGNORE_INDEX] * len(p) + c
            row_labels[0] = IGNORE_INDEX  # nothing in this sequence precedes its first token
            labels += row_labels
            positions += range(n)
            seq_index += [i] * n
        n_pad = _round_up(len(ids), self.pad_to_multiple_of) - len(ids)
        ids += [self.pad_token_id] * n_pad  # trailing padding: one more sequence, never scored
        labels += [IGNORE_INDEX] * n_pad
        positions += range(n_pad)
        seq_index += [len(prompts)] * n_pad
        return {
            f"{prefix}input_ids": torch.tensor([ids], dtype=torch.long),  # (1, N)
            f"{prefix}position_ids": torch.tensor([positions], dtype=torch.long),  # (1, N)
            f"{prefix}completion_labels": torch.tensor([labels], dtype=torch.long),  # (1, N)
            f"{prefix}seq_index": torch.tensor([seq_index], dtype=torch.long),  # (1, N)
        }


def _sub_batch(inputs: Mapping[str, Any], prefix: str) -> dict[str, torch.Tensor]:
    keys = ("input_ids", "attention_mask", "position_ids", "completion_labels", "seq_index")
    return {k: inputs[prefix + k] for k in keys if inputs.get(prefix + k) is not None}


def _join(
    matched: dict[str, torch.Tensor], mismatched: dict[str, torch.Tensor], num_rows: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """One batch holding the matched then the mismatched sequences, for a single reference forward."""
    if "seq_index" in matched:  # padding-free: concatenate the rows; sequence ids of the second part shifted
        keys = ("input_ids", "position_ids", "completion_labels")
        out = {k: torch.cat([matched[k], mismatched[k]], dim=1) for k in keys}
        out["seq_index"] = torch.cat([matched["seq_index"], mismatched["seq_index"] + num_rows + 1], dim=1)
        return out
    width = max(matched["input_ids"].shape[1], mismatched["input_ids"].shape[1])
    fill = {"input_ids": pad_id, "attention_mask": 0, "position_ids": 0, "completion_labels": IGNORE_INDEX}

    def widen(part: dict[str, torch.Tensor], key: str) -> torch.Tensor:
        t = part[key]
        return nn.functional.pad(t, (0, width - t.shape[1]), value=fill[key])

    return {k: torch.cat([widen(matched, k), widen(mismatched, k)], dim=0) for k in fill}  # (2B, T)


# ---- reference model sync (TR-DPO) -------------------------------------------------------------


class _SyncReferenceCallback(TrainerCallback):
    """Every ``ref_model_sync_steps`` steps: ``ref = alpha * policy + (1 - alpha) * ref``."""

    def __init__(self, trainer: KTOTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step % args.ref_model_sync_steps == 0:
            self.trainer._sync_reference(args.ref_model_mixup_alpha)


# ---- trainer ---------------------------------------------------------------------------------


class KTOTrainer(Trainer):
    """Trainer for KTO (see the module docstring and ``docs/kto.md``).

    Args:
        model: A model name or local path (loaded with ``args.model_init_kwargs``, dtype
            ``"auto"``) or an instantiated causal LM.
        ref_model: The frozen reference (a model or a name/path, loaded with
            ``args.ref_model_init_kwargs``). ``None``: a frozen copy of ``model``; with PEFT
            the model with its adapter disabled (no copy); with ``precompute_ref_log_probs``
            the model itself before training (no copy).
        args: A :class:`KTOConfig`; defaults to one with ``output_dir="<model>-KTO"``.
        data_collator: Defaults to :class:`DataCollatorForUnpairedPreference`.
        train_dataset, eval_dataset: Unpaired preference data (``prompt``, ``completion``,
            ``label``) or paired preference data (``prompt``/``chosen``/``rejected``, or
            ``chosen``/``rejected`` with an implicit prompt), standard or conversational, or
            already tokenized (``prompt_input_ids``, ``completion_input_ids``, ``label``).
        processing_class: The tokenizer; loaded from ``model`` when omitted.
        compute_metrics: Called at evaluation with ``EvalPrediction(predictions=rewards,
            label_ids=labels)``: each row's implicit reward ``beta * r`` and its label.
        callbacks, optimizers: As in ``transformers.Trainer``.
        peft_config: A ``peft`` config (e.g. ``LoraConfig``): the model is wrapped and only the
            adapters train; the reference is the model with the adapters disabled.
    """

    _tag_names = ["honelm", "kto"]
    loss_is_scaled_for_ga = False  # the loss is a per-batch mean: Trainer divides it by the accumulation steps

    def __init__(
        self,
        model: Any,
        ref_model: Any = None,
        args: KTOConfig | None = None,
        data_collator: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_metrics: Callable[..., dict[str, float]] | None = None,
        callbacks: list[Any] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        peft_config: Any = None,
    ) -> None:
        model_id = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", None)
        if args is None:
            name = (model_id or "model").rstrip("/").split("/")[-1]
            args = KTOConfig(output_dir=f"{name}-KTO")
        elif not isinstance(args, KTOConfig):
            raise TypeError(f"KTOTrainer: `args` must be a KTOConfig, got {type(args).__name__}.")
        if train_dataset is None:
            raise ValueError("KTOTrainer: `train_dataset` is required.")
        if ref_model is not None and ref_model is model:
            raise ValueError(
                "KTOTrainer: `ref_model` is the model being trained, so it would not stay fixed. Pass a separate "
                "copy, or ref_model=None to let the trainer make one."
            )
        model, ref_model = _setup_models(model, ref_model, args, peft_config)
        if processing_class is None:
            if model_id is None:
                raise ValueError(
                    "KTOTrainer: pass `processing_class` (the tokenizer); the model has no name to load it from."
                )
            processing_class = AutoTokenizer.from_pretrained(model_id, trust_remote_code=args.trust_remote_code)
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        _configure_pad_token(tokenizer)

        self._calculate_kl = args.loss_type in KL_LOSS_TYPES
        self._output_dir_existed = os.path.isdir(args.output_dir)
        self._dataset_name = _dataset_name(train_dataset)
        self.truncation_stats: dict[str, TruncationStats] = {}
        train_dataset = self._prepare(train_dataset, tokenizer, args, "train")
        if eval_dataset is not None:
            if isinstance(eval_dataset, dict):
                eval_dataset = {k: self._prepare(v, tokenizer, args, f"eval/{k}") for k, v in eval_dataset.items()}
            else:
                eval_dataset = self._prepare(eval_dataset, tokenizer, args, "eval")
        self._check_batches(train_dataset, eval_dataset, args)
        if data_collator is None:
            data_collator = DataCollatorForUnpairedPreference(
                pad_token_id=tokenizer.pad_token_id,
                mismatched_pairs=self._calculate_kl,
                padding_free=args.padding_free,
                pad_to_multiple_of=args.pad_to_multiple_of,
                max_length=args.max_length,
                truncation_mode=args.truncation_mode,
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
        )
        self.ref_model = None if ref_model is None else self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        self._aux_coef = _router_aux_coef(model, args)
        self._sums: dict[str, dict[str, float]] = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._kl_values: dict[str, list[float]] = {"train": [], "eval": []}
        self._aux_values: dict[str, list[float]] = {"train": [], "eval": []}
        self._total_tokens = 0
        self._last_rewards: torch.Tensor | None = None
        if args.sync_ref_model:
            if self.ref_model is None:
                raise ValueError("KTOConfig.sync_ref_model=True needs a separate reference model.")
            self.add_callback(_SyncReferenceCallback(self))
        # Pre-flight checks on the tokenized rows, before the reference pass (which may take long).
        self.diagnostics = attach_diagnostics(
            self, "kto", output_dir_existed=self._output_dir_existed, dataset=self.train_dataset,
            tokenizer=tokenizer, collator=self.data_collator, truncation_stats=self.truncation_stats.get("train"),
        )
        if args.precompute_ref_log_probs:
            self.train_dataset = self._precompute(self.train_dataset, "train")
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {k: self._precompute(v, f"eval/{k}") for k, v in self.eval_dataset.items()}
            elif self.eval_dataset is not None:
                self.eval_dataset = self._precompute(self.eval_dataset, "eval")
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)

    # ---- data -----------------------------------------------------------------------------

    def _prepare(self, dataset: Any, tokenizer: Any, args: KTOConfig, split: str) -> Any:
        """Validate, tokenize, unpair and truncate one dataset; records truncation statistics."""
        from datasets import IterableDataset

        streaming = isinstance(dataset, IterableDataset)
        map_kwargs: dict[str, Any] = {} if streaming else {"num_proc": args.dataset_num_proc}
        with args.main_process_first(desc=f"tokenizing the {split} dataset"):
            paired = detect_format(dataset, expected_kinds=_KINDS).kind == "preference"
            dataset, _ = tokenize_dataset(dataset, tokenizer, expected_kinds=_KINDS, num_proc=args.dataset_num_proc)
            if paired:
                dataset = dataset.map(_unpair, batched=True, batch_size=_UNPAIR_BATCH,
                                      remove_columns=["prompt_input_ids", "chosen_input_ids", "rejected_input_ids"],
                                      **map_kwargs)
            truncate = _Truncate(args.max_prompt_length, args.max_completion_length, args.max_length,
                                 args.truncation_mode, record=not streaming)
            dataset = dataset.map(truncate, batched=True, **map_kwargs)
            if not streaming:
                stats = TruncationStats(max_length=args.max_length)
                for dropped in dataset[_DROPPED]:
                    stats.add(dropped)
                self.truncation_stats[split] = stats
                dataset = dataset.remove_columns(_DROPPED)
                if stats.num_truncated:
                    logger.warning("%s dataset: %s", split, stats.summary())
                before = len(dataset)
                dataset = dataset.filter(_has_completion, batched=True, **map_kwargs)
                self._check_dropped(split, before, len(dataset), args)
                if args.train_sampling_strategy in ("group_by_length", "batch_rebalance"):
                    dataset = dataset.map(_Lengths(args.length_column_name), batched=True, **map_kwargs)
                if split == "train":
                    labels = dataset["label"]
                    _warn_about_label_balance(labels, args)
                    _warn_about_sequential_batches(labels, args)
            else:
                dataset = dataset.filter(_has_completion, batched=True)
        return dataset

    @staticmethod
    def _check_dropped(split: str, before: int, after: int, args: KTOConfig) -> None:
        if before == after:
            return
        message = (
            f"{split} dataset: {before - after} of {before} rows have no completion token left, because their prompt "
            f"alone fills max_length={args.max_length} (truncation_mode='keep_start'). Fix: raise max_length, set "
            "max_prompt_length below it, or use truncation_mode='keep_end'."
        )
        if after == 0:
            raise ValueError(message.replace("rows have", "rows (all of them) have"))
        logger.warning("%s Those rows were dropped.", message)

    def _check_batches(self, train_dataset: Any, eval_dataset: Any, args: KTOConfig) -> None:
        """Fail before training when a batch would hold a single row (no mismatched pair to estimate KL)."""
        self._check_kl_batches("train", train_dataset, args.per_device_train_batch_size, args)
        evals = eval_dataset.items() if isinstance(eval_dataset, dict) else [("eval", eval_dataset)]
        for name, dataset in evals:
            if dataset is not None:
                self._check_kl_batches(name, dataset, args.per_device_eval_batch_size, args)

    def _check_kl_batches(self, name: str, dataset: Any, batch_size: int, args: KTOConfig) -> None:
        if not self._calculate_kl:
            return
        field = "per_device_train_batch_size" if name == "train" else "per_device_eval_batch_size"
        if batch_size < 2:
            raise ValueError(
                f"KTO: loss_type={args.loss_type!r} estimates its KL reference point from mismatched prompt-completion "
                f"pairs of each batch, which needs at least 2 rows per batch, but {field}={batch_size}. Fix: set "
                f"{field} >= 2, or use loss_type='apo_zero_unpaired', which has no reference point."
            )
        if args.dataloader_drop_last or not hasattr(dataset, "__len__"):
            return
        if args.world_size > 1 and args.accelerator_config.even_batches:
            return  # accelerate completes every process's last batch with rows from the start
        if len(dataset) % batch_size == 1:
            raise ValueError(
                f"KTO: the {name} dataset has {len(dataset)} rows, so with {field}={batch_size} its last batch would "
                "hold a single row, whose KL reference point cannot be estimated from a mismatched pair. Fix: set "
                f"dataloader_drop_last=True, pick a {field} that leaves no single row over, or drop or add a row."
            )

    def _remove_unused_columns(self, dataset: Any, description: str | None = None) -> Any:
        return dataset  # prepared datasets hold exactly what the collator reads

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = [
                "prompt_input_ids", "completion_input_ids", "label", "KL_completion_input_ids", "ref_logps",
                "ref_KL_logps",
            ]

    # ---- reference log-probs ----------------------------------------------------------------

    @contextlib.contextmanager
    def _reference(self) -> Any:
        """The reference model: the separate copy, or the policy with its adapters disabled."""
        if self.ref_model is not None:
            yield self.ref_model
            return
        unwrapped = self.accelerator.unwrap_model(self.model)
        peft = _is_peft_model(unwrapped)
        if not peft and self.state.global_step > 0:
            raise ValueError(
                "KTO: reference log-probs are needed for a dataset without precomputed ones, but training has "
                "started and no reference model is kept (precompute_ref_log_probs=True without `ref_model`). Pass "
                "this dataset as `eval_dataset` when creating the trainer, or pass `ref_model`."
            )
        was_training = unwrapped.training
        unwrapped.eval()  # the reference is deterministic, whatever dropout the policy trains with
        try:
            # PEFT: the adapters disabled; otherwise (precompute before training) the policy is still the reference
            with unwrapped.disable_adapter() if peft else contextlib.nullcontext():
                yield unwrapped
        finally:
            unwrapped.train(was_training)

    def _reference_logps(self, inputs: Mapping[str, Any], num_rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Reference log-probs of the matched ``(B,)`` and mismatched ``(B,)`` sequences, in one forward."""
        if inputs.get("ref_logps") is not None:
            return inputs["ref_logps"].float(), inputs.get("ref_KL_logps")
        matched = _sub_batch(inputs, "")
        with torch.no_grad(), self._reference() as ref:
            if not self._calculate_kl:
                return self._sequence_logps(ref, matched, num_rows)[0], None
            pad_id = self.data_collator.pad_token_id if hasattr(self.data_collator, "pad_token_id") else 0
            joint = _join(matched, _sub_batch(inputs, "KL_"), num_rows, pad_id)
            # padding-free: slot B collects the matched padding, the mismatched rows start at B + 1
            logps = self._sequence_logps(ref, joint, 2 * num_rows + 1 if "seq_index" in joint else 2 * num_rows)[0]
        if "seq_index" in joint:
            return logps[:num_rows], logps[num_rows + 1 : 2 * num_rows + 1]
        return logps[:num_rows], logps[num_rows:]

    def _precompute(self, dataset: Any, split: str) -> Any:
        """Add ``ref_logps`` (and the fixed KL pairs with their ``ref_KL_logps``) to a dataset."""
        from datasets import IterableDataset
        from torch.utils.data import DataLoader

        if isinstance(dataset, IterableDataset):
            raise ValueError(
                "precompute_ref_log_probs=True needs a map-style datasets.Dataset (its length and order must be "
                "known); got an IterableDataset. Set precompute_ref_log_probs=False or load the dataset without "
                "streaming."
            )
        if "ref_logps" in dataset.column_names:
            return dataset
        train = split == "train"
        if self._calculate_kl:  # fix the pairs the collator builds in dataset order, chunk by chunk
            chunk = self.args.per_device_train_batch_size if train else self.args.per_device_eval_batch_size
            dataset = dataset.map(_rotate_completions, batched=True, batch_size=chunk, desc=f"KL pairs of {split}")
        batch_size = self.args.precompute_ref_batch_size or (
            self.args.per_device_train_batch_size if train else self.args.per_device_eval_batch_size
        )
        loader = self.accelerator.prepare(
            DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False,
                       num_workers=self.args.dataloader_num_workers)
        )
        ref_logps: list[torch.Tensor] = []
        ref_kl_logps: list[torch.Tensor] = []
        for batch in loader:
            with self.compute_loss_context_manager():  # the same autocast as the training step
                matched, mismatched = self._reference_logps(batch, batch["label"].shape[0])
            if mismatched is None:
                ref_logps.append(self.accelerator.gather_for_metrics(matched).cpu())
            else:
                matched, mismatched = self.accelerator.gather_for_metrics((matched, mismatched))
                ref_logps.append(matched.cpu())
                ref_kl_logps.append(mismatched.cpu())
        dataset = dataset.add_column("ref_logps", torch.cat(ref_logps).tolist())
        if ref_kl_logps:
            dataset = dataset.add_column("ref_KL_logps", torch.cat(ref_kl_logps).tolist())
        return dataset

    def _sync_reference(self, alpha: float) -> None:
        policy = dict(self.accelerator.unwrap_model(self.model).named_parameters())
        with torch.no_grad():
            for name, ref_param in self.accelerator.unwrap_model(self.ref_model).named_parameters():
                ref_param.mul_(1.0 - alpha).add_(policy[name].detach().to(ref_param.dtype), alpha=alpha)

    # ---- loss -----------------------------------------------------------------------------

    def _sequence_logps(
        self, model: Any, batch: Mapping[str, torch.Tensor], num_seqs: int, *, stats: bool = False, **forward: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], Any]:
        """Summed completion log-probs of each sequence ``(S,)``; with ``stats`` also per-sequence
        (detached) token counts, sums of the vocabulary-mean logit and of the entropy."""
        model_inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        hidden, outputs = last_hidden_states(model, **model_inputs, **forward)  # (R, T, H)
        weight, bias = lm_head_weight_and_bias(self.accelerator.unwrap_model(model))
        hidden = hidden[:, :-1]  # (R, T-1, H): position t predicts token t + 1
        targets = batch["completion_labels"][:, 1:]  # (R, T-1)
        mask = targets != IGNORE_INDEX  # (R, T-1)
        seq_index = batch["seq_index"][:, 1:] if "seq_index" in batch else None  # (1, N-1) padding-free
        with self.accelerator.autocast():  # the LM head in the forward's precision (bf16=True: bf16)
            if stats:
                token_logps, entropy = masked_selective_logps(hidden, weight, targets, mask, bias, return_entropy=True)
            else:
                token_logps = masked_selective_logps(hidden, weight, targets, mask, bias)  # (R, T-1), 0 off the mask
        logps = _sum_by_sequence(token_logps, seq_index, num_seqs)  # (S,)
        extra: dict[str, torch.Tensor] = {}
        if stats:
            with torch.no_grad():
                mean_head = weight.detach().float().mean(0)  # (H,): mean_v(logit) = h . mean_v(W) + mean(b)
                mean_logits = hidden.detach().float() @ mean_head  # (R, T-1)
                if bias is not None:
                    mean_logits = mean_logits + bias.detach().float().mean()
                extra = {
                    "tokens": _sum_by_sequence(mask.float(), seq_index, num_seqs),
                    "logits": _sum_by_sequence(mean_logits * mask, seq_index, num_seqs),
                    "entropy": _sum_by_sequence(entropy.detach() * mask, seq_index, num_seqs),
                }
        return logps, extra, outputs

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        mode = "train" if self.model.training else "eval"
        labels = inputs["label"].bool()  # (B,)
        num_rows = labels.shape[0]
        forward = {"output_router_logits": True} if self._aux_coef else {}
        matched = _sub_batch(inputs, "")
        policy_logps, stats, outputs = self._sequence_logps(model, matched, num_rows, stats=True, **forward)
        kl = None
        if self._calculate_kl:
            with torch.no_grad():
                unwrapped = self.accelerator.unwrap_model(model)
                kl_logps = self._sequence_logps(unwrapped, _sub_batch(inputs, "KL_"), num_rows)[0]
        ref_logps, ref_kl_logps = self._reference_logps(inputs, num_rows)
        if self._calculate_kl:
            if ref_kl_logps is None:
                raise ValueError("KTO: the batch has precomputed `ref_logps` but no `ref_KL_logps`; precompute both.")
            local = kl_estimate(kl_logps, ref_kl_logps.to(kl_logps.device))
            kl = self.accelerator.gather(local.reshape(1)).mean()  # average over processes, before the clamp
        loss, metrics = LOSSES[self.args.loss_type](
            policy_logps, ref_logps.to(policy_logps.device), labels, kl, beta=self.args.beta,
            desirable_weight=self.args.desirable_weight, undesirable_weight=self.args.undesirable_weight,
        )
        aux = getattr(outputs, "aux_loss", None) if self._aux_coef else None
        if aux is not None:
            loss = loss + self._aux_coef * aux
        self._last_rewards = (self.args.beta * (policy_logps - ref_logps.to(policy_logps.device))).detach()
        self._record(mode, inputs, labels, stats, metrics, aux)
        return (loss, {"loss": loss.detach()}) if return_outputs else loss

    def _record(
        self, mode: str, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor, stats: dict[str, torch.Tensor],
        metrics: dict[str, torch.Tensor], aux: torch.Tensor | None,
    ) -> None:
        chosen = labels.float()
        if "attention_mask" in inputs:
            tokens = inputs["attention_mask"].sum().float()
        else:
            tokens = (inputs["seq_index"] < labels.shape[0]).sum().float()  # padding-free: all but the padding
        values = {
            **{k: metrics[k].float() for k in _SUM_KEYS[:6]},
            "chosen_logits_sum": (stats["logits"] * chosen).sum(),
            "chosen_tokens": (stats["tokens"] * chosen).sum(),
            "rejected_logits_sum": (stats["logits"] * (1 - chosen)).sum(),
            "rejected_tokens": (stats["tokens"] * (1 - chosen)).sum(),
            "entropy_sum": stats["entropy"].sum(),
            "num_tokens": tokens,
        }
        vector = torch.stack([values[k].to(labels.device) for k in _SUM_KEYS])  # (K,)
        totals = self.accelerator.gather(vector.unsqueeze(0)).sum(0).tolist()  # summed over processes
        for key, value in zip(_SUM_KEYS, totals):
            self._sums[mode][key] += value
        if mode == "train":
            self._total_tokens += int(totals[-1])
        if self._calculate_kl:
            self._kl_values[mode].append(float(metrics["kl"]))
        if aux is not None:
            self._aux_values[mode].append(float(self.accelerator.gather(aux.detach().reshape(1)).mean()))

    def prediction_step(
        self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: list[str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        if prediction_loss_only:
            return loss.detach(), None, None
        return loss.detach(), self._last_rewards, inputs["label"].long()

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        if eval_dataset is not None and not isinstance(eval_dataset, str):
            tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
            if isinstance(eval_dataset, dict):
                metrics: dict[str, float] = {}
                for name, dataset in eval_dataset.items():
                    metrics.update(self.evaluate(dataset, ignore_keys, f"{metric_key_prefix}_{name}"))
                return metrics
            if "ref_logps" not in _columns(eval_dataset):  # not already prepared and precomputed
                eval_dataset = self._prepare(eval_dataset, tokenizer, self.args, "eval")
            self._check_kl_batches("eval", eval_dataset, self.args.per_device_eval_batch_size, self.args)
            if self.args.precompute_ref_log_probs:
                eval_dataset = self._precompute(eval_dataset, "eval")
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    def compute_loss_context_manager(self) -> contextlib.ExitStack:
        stack = super().compute_loss_context_manager()
        if self.args.activation_offloading:
            stack.enter_context(torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()))
        return stack

    # ---- logging and saving ---------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        eval_key = next((k for k in logs if k.endswith("_loss") and k not in ("loss", "train_loss")), None)
        mode = "train" if eval_key is None else "eval"
        prefix = "" if eval_key is None else eval_key[: -len("loss")]  # "eval_", or "eval_<name>_"
        metrics = _summarize(self._sums[mode], self._kl_values[mode], self._aux_values[mode])
        # train: tokens seen since training began; eval: tokens of this evaluation
        window_tokens = self._sums[mode].get("num_tokens", 0.0)
        metrics["num_tokens"] = float(self._total_tokens if mode == "train" else window_tokens)
        logs.update({f"{prefix}{k}": v for k, v in metrics.items()})  # in place: `evaluate()` returns this dict
        super().log(logs, start_time)
        self._sums[mode].clear()
        self._kl_values[mode].clear()
        self._aux_values[mode].clear()

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            _write_model_card(output_dir or self.args.output_dir, self.model, self._dataset_name, self.args)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if not (self.args.sync_ref_model and self.ref_model is not None and self.args.should_save):
            return
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        reference = self.accelerator.unwrap_model(self.ref_model).state_dict()
        torch.save(reference, os.path.join(folder, _REFERENCE_FILE))  # the synced reference has moved: keep it

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, _REFERENCE_FILE)
        if self.args.sync_ref_model and self.ref_model is not None:
            if not os.path.isfile(path):
                raise ValueError(
                    f"KTO: sync_ref_model=True, but checkpoint {resume_from_checkpoint!r} has no {_REFERENCE_FILE} "
                    "holding the synced reference model; resuming would restart from the initial reference. Resume "
                    "from a checkpoint written with sync_ref_model=True, or set sync_ref_model=False."
                )
            state = torch.load(path, map_location="cpu", weights_only=True)
            self.accelerator.unwrap_model(self.ref_model).load_state_dict(state)


# ---- helpers --------------------------------------------------------------------------------


def _sum_by_sequence(values: torch.Tensor, seq_index: torch.Tensor | None, num_seqs: int) -> torch.Tensor:
    """Per-sequence sums of per-position ``values``: over each row (padded), or by ``seq_index``
    (padding-free, where index ``num_seqs`` and beyond collect the padding)."""
    if seq_index is None:
        return values.sum(-1)  # (B,)
    out = values.new_zeros(num_seqs + 1)  # the last slot collects the trailing padding
    return out.index_add(0, seq_index.reshape(-1), values.reshape(-1))[:num_seqs]  # (S,)


def _summarize(sums: Mapping[str, float], kl_values: list[float], aux_values: list[float]) -> dict[str, float]:
    """Logged metrics from running sums: means over the rows (or tokens) of each kind seen."""
    out: dict[str, float] = {}
    for side in ("chosen", "rejected"):
        count = sums.get(f"num_{side}", 0.0)
        if count > 0:
            out[f"rewards/{side}"] = sums[f"{side}_rewards_sum"] / count
            out[f"logps/{side}"] = sums[f"{side}_logps_sum"] / count
        if sums.get(f"{side}_tokens", 0.0) > 0:
            out[f"logits/{side}"] = sums[f"{side}_logits_sum"] / sums[f"{side}_tokens"]
    if "rewards/chosen" in out and "rewards/rejected" in out:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    scored = sums.get("chosen_tokens", 0.0) + sums.get("rejected_tokens", 0.0)
    if scored > 0:
        out["entropy"] = sums["entropy_sum"] / scored
    if kl_values:
        out["kl"] = sum(kl_values) / len(kl_values)
    if aux_values:
        out["aux_loss"] = sum(aux_values) / len(aux_values)
    return out


class _Truncate:
    """``Dataset.map`` function: prompt/completion limits, then ``max_length``; counts the tokens cut."""

    def __init__(self, max_prompt: int | None, max_completion: int | None, max_length: int | None, mode: str,
                 record: bool) -> None:
        self.max_prompt, self.max_completion, self.max_length, self.mode, self.record = (
            max_prompt, max_completion, max_length, mode, record
        )

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        prompts, completions, dropped = [], [], []
        for prompt, completion in zip(batch["prompt_input_ids"], batch["completion_input_ids"]):
            n = len(prompt) + len(completion)
            if self.max_prompt is not None and len(prompt) > self.max_prompt:
                prompt = prompt[: self.max_prompt] if self.mode == "keep_start" else prompt[-self.max_prompt :]
            if self.max_completion is not None:
                completion = completion[: self.max_completion]
            row, _ = truncate_row(
                {"prompt_input_ids": list(prompt), "completion_input_ids": list(completion)}, self.max_length, self.mode
            )
            prompts.append(row["prompt_input_ids"])
            completions.append(row["completion_input_ids"])
            dropped.append(n - len(prompts[-1]) - len(completions[-1]))
        out = {"prompt_input_ids": prompts, "completion_input_ids": completions}
        if self.record:
            out[_DROPPED] = dropped
        return out


class _Lengths:
    """``Dataset.map`` function: the length column the length-grouping samplers read."""

    def __init__(self, column: str) -> None:
        self.column = column

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[int]]:
        pairs = zip(batch["prompt_input_ids"], batch["completion_input_ids"])
        return {self.column: [len(p) + len(c) for p, c in pairs]}


def _unpair(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Split a block of preference rows: its chosen completions (desirable), then its rejected ones."""
    n = len(batch["prompt_input_ids"])
    return {
        "prompt_input_ids": batch["prompt_input_ids"] + batch["prompt_input_ids"],
        "completion_input_ids": batch["chosen_input_ids"] + batch["rejected_input_ids"],
        "label": [True] * n + [False] * n,
    }


def _rotate_completions(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
    completions = batch["completion_input_ids"]
    return {"KL_completion_input_ids": completions[-1:] + completions[:-1]}


def _has_completion(batch: dict[str, list[Any]]) -> list[bool]:
    return [len(c) > 0 for c in batch["completion_input_ids"]]


def _columns(dataset: Any) -> list[str]:
    return list(dataset.column_names or [])


def _warn_about_label_balance(labels: Sequence[bool], args: KTOConfig) -> None:
    """KTO paper, eq. 8: ``desirable_weight * n_D / (undesirable_weight * n_U)`` should lie in ``[1, 4/3]``."""
    n_d = sum(bool(x) for x in labels)
    n_u = len(labels) - n_d
    if n_d == 0 or n_u == 0:
        logger.warning("KTO: the train dataset has only %s rows; the loss still works, but the rewards of the other "
                       "kind are never seen.", "desirable" if n_u == 0 else "undesirable")
        return
    ratio = args.desirable_weight * n_d / (args.undesirable_weight * n_u)
    if not 1.0 <= ratio <= 4 / 3 + 1e-9:
        lo_d, hi_d = n_u * args.undesirable_weight / n_d, 4 / 3 * n_u * args.undesirable_weight / n_d
        lo_u, hi_u = 0.75 * n_d * args.desirable_weight / n_u, n_d * args.desirable_weight / n_u
        logger.warning(
            "KTO: %d desirable and %d undesirable rows give desirable_weight * n_desirable / (undesirable_weight * "
            "n_undesirable) = %.2f, outside the range [1, 4/3] the KTO paper recommends (eq. 8). Set EITHER "
            "desirable_weight in [%.2f, %.2f] OR undesirable_weight in [%.2f, %.2f].",
            n_d, n_u, ratio, lo_d, hi_d, lo_u, hi_u,
        )


def _warn_about_sequential_batches(labels: Sequence[bool], args: KTOConfig) -> None:
    """With dataset-order sampling, say so when most batches hold one kind of row only."""
    size = args.per_device_train_batch_size
    if args.train_sampling_strategy != "sequential" or len(set(labels)) < 2 or len(labels) <= size:
        return
    chunks = [set(labels[i : i + size]) for i in range(0, len(labels), size)]
    mixed = sum(len(c) == 2 for c in chunks) / len(chunks)
    if mixed < 0.5:
        logger.warning(
            "KTO: train_sampling_strategy='sequential' keeps the dataset order, and only %.0f%% of the batches hold "
            "both desirable and undesirable rows (paired data is split a block of %d pairs at a time: its chosen "
            "rows, then its rejected ones). Shuffle the dataset first (dataset.shuffle(seed=...)) or set "
            "train_sampling_strategy='random'; the KL pairs are built inside each batch, so any order works.",
            100 * mixed, _UNPAIR_BATCH,
        )


def _setup_models(model: Any, ref_model: Any, args: KTOConfig, peft_config: Any) -> tuple[Any, Any]:
    """The policy (loaded, PEFT-wrapped) and the frozen reference (``None`` when PEFT or the
    precomputed log-probs stand in for it)."""
    init_kwargs = {"trust_remote_code": args.trust_remote_code, **(args.model_init_kwargs or {})}
    ref_init_kwargs = {
        "trust_remote_code": args.trust_remote_code,
        **(args.ref_model_init_kwargs if args.ref_model_init_kwargs is not None else args.model_init_kwargs or {}),
    }
    loaded_from = model if isinstance(model, str) else None
    if loaded_from:
        model = load_causal_lm(loaded_from, init_kwargs)
    elif args.model_init_kwargs:
        logger.warning("KTOConfig.model_init_kwargs is ignored: the model is already instantiated.")
    if isinstance(ref_model, str):
        ref_model = load_causal_lm(ref_model, ref_init_kwargs)
    uses_peft = peft_config is not None or _is_peft_model(model)
    if peft_config is not None:
        model = _wrap_peft(model, peft_config, args)
    if uses_peft and ref_model is None and args.sync_ref_model:
        raise ValueError(
            "KTOConfig.sync_ref_model=True needs a separate reference model to move, but with PEFT the reference "
            "is the model with its adapters disabled. Set sync_ref_model=False, or pass `ref_model`."
        )
    if ref_model is None and not uses_peft and not args.precompute_ref_log_probs:
        # A model given by name is loaded again (as TRL does: quantized models do not deep-copy); an instance is copied.
        ref_model = load_causal_lm(loaded_from, ref_init_kwargs) if loaded_from else copy.deepcopy(model)
    if ref_model is not None:
        ref_model.eval()
        ref_model.requires_grad_(False)
    if args.disable_dropout:
        _disable_dropout(model)
        if ref_model is not None:
            _disable_dropout(ref_model)
    return model, ref_model


def _configure_pad_token(tokenizer: Any) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                "KTOTrainer: the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token."
            )
        tokenizer.pad_token = tokenizer.eos_token


def _disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def _is_peft_model(model: Any) -> bool:
    if "peft" not in sys.modules:
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _wrap_peft(model: Any, peft_config: Any, args: KTOConfig) -> Any:
    try:
        from peft import get_peft_model
    except ImportError as e:  # pragma: no cover - peft is a dev dependency
        raise ImportError("KTOTrainer(peft_config=...) needs peft: pip install 'honelm[peft]'.") from e
    if _is_peft_model(model):
        raise ValueError("KTOTrainer: the model already has PEFT adapters; pass it without `peft_config`.")
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        from peft import prepare_model_for_kbit_training  # QLoRA

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(args.gradient_checkpointing))
    if args.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # frozen embeddings would cut the checkpointed graph
    return get_peft_model(model, peft_config)


def _router_aux_coef(model: Any, args: KTOConfig) -> float:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    is_moe = hasattr(config, "output_router_logits")
    if args.router_aux_loss_coef is not None:
        if args.router_aux_loss_coef and not is_moe:
            raise ValueError(
                f"KTOConfig.router_aux_loss_coef={args.router_aux_loss_coef}, but {type(model).__name__} is not a "
                "mixture-of-experts model with a router loss. Leave router_aux_loss_coef unset."
            )
        return float(args.router_aux_loss_coef)
    return float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0) if is_moe else 0.0


def _dataset_name(dataset: Any) -> str | None:
    info = getattr(dataset, "info", None)
    return getattr(info, "dataset_name", None) or getattr(info, "builder_name", None) if info else None


def _write_model_card(output_dir: str, model: Any, dataset_name: str | None, args: KTOConfig) -> None:
    from honelm.version import __version__

    base = getattr(getattr(model, "config", None), "_name_or_path", None) or "unknown"
    peft = " (LoRA adapter)" if hasattr(model, "peft_config") else ""
    card = (
        f"---\nlibrary_name: honelm\ntags:\n- honelm\n- kto\nbase_model: {base}\n---\n\n"
        f"# {os.path.basename(os.path.abspath(output_dir))}\n\n"
        f"This model{peft} was trained with Kahneman-Tversky Optimization (KTO) using honelm {__version__}.\n\n"
        f"- Method: KTO (`loss_type={args.loss_type}`, `beta={args.beta}`, desirable_weight={args.desirable_weight}, "
        f"undesirable_weight={args.undesirable_weight})\n"
        f"- Base model: {base}\n"
        f"- Dataset: {dataset_name or 'not recorded'}\n"
        f"- Max length: {args.max_length}, learning rate: {args.learning_rate}\n\n"
        "KTO: Ethayarajh et al., 2024, \"KTO: Model Alignment as Prospect Theoretic Optimization\" "
        "(arXiv:2402.01306).\n"
    )
    with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(card)
