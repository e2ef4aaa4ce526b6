"""Direct Preference Optimization.

For each prompt ``x`` with a chosen completion ``y_w`` and a rejected one ``y_l``, the policy
is trained so that its log-ratio to a frozen reference model, ``r = log pi(y|x) - log
pi_ref(y|x)``, is larger for ``y_w`` than for ``y_l``: the default loss is
``-log sigma(beta (r_w - r_l))`` (Rafailov et al., 2023); ``loss_type`` picks one of the
variants of ``loss.py`` or a weighted sum of several. Chosen and rejected sequences go
through the model in one forward pass (one padded batch, or one padding-free row), and
their summed completion log-probs come from the final hidden states through the chunked
LM-head kernels of :mod:`honelm.ops`, never through the full ``(tokens, vocab)`` logits.
The reference log-probs come from a frozen copy of the model, from the model with its
PEFT adapter disabled, or from one pass over the dataset before training. Diagnostics
(:mod:`honelm.diagnostics`) check the tokenized pairs before training (missing EOS,
truncation, length bias) and watch the preference metrics during it.

    honelm dpo --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name trl-lib/ultrafeedback_binarized
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
from transformers import AutoTokenizer, Trainer, TrainerCallback, set_seed

from honelm.data import DataCollatorForLanguageModeling, TruncationStats, tokenize_dataset, truncate_row
from honelm.diagnostics.callback import attach_diagnostics
from honelm.models import last_hidden_states, load_causal_lm
from honelm.ops import (
    auto_chunk_size,
    auto_vocab_chunk_size,
    chunked_cross_entropy,
    lm_head_weight_and_bias,
    selective_logps,
)

from .config import DPOConfig
from .loss import dpo_loss, ld_sequence_logps, wpo_log_weights, wpo_pair_weights

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
_REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
_NON_MODEL_KEYS = frozenset({"labels", "completion_mask", *_REF_COLUMNS})
_CUT_COLUMN, _KEEP_COLUMN = "__honelm_dpo_tokens_cut__", "__honelm_dpo_keep__"
_STATE_FILE = "dpo_trainer_state.pt"


# ---- collation ------------------------------------------------------------------------------


@dataclass
class DataCollatorForPreference:
    """Batch tokenized preference pairs for one forward pass over chosen and rejected alike.

    Each example holds ``prompt_input_ids``, ``chosen_input_ids`` and ``rejected_input_ids``
    (TRL's ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` work too) and optionally
    ``ref_chosen_logps`` / ``ref_rejected_logps``. The ``B`` pairs become ``2B`` sequences,
    first every ``prompt + chosen``, then every ``prompt + rejected``, collated by
    :class:`honelm.data.DataCollatorForLanguageModeling` with the completion as the only
    target.

    Returns:
        Padded: ``input_ids``, ``attention_mask``, ``labels``, ``position_ids``, each
        ``(2B, T)``. Padding-free: ``input_ids``, ``labels``, ``position_ids``, each
        ``(1, N)`` with position ids restarting at every sequence. ``labels`` holds the
        completion tokens and ``-100`` elsewhere (and on the first token of every sequence).
        Plus ``ref_chosen_logps`` / ``ref_rejected_logps`` ``(B,)`` when the examples have them.
    """

    pad_token_id: int
    padding_free: bool = False
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        self._collate = DataCollatorForLanguageModeling(
            pad_token_id=self.pad_token_id,
            completion_only_loss=True,
            padding_free=self.padding_free,
            pad_to_multiple_of=self.pad_to_multiple_of,
        )

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if len(examples) == 0:
            raise ValueError("DataCollatorForPreference: got an empty list of examples.")
        sequences = []
        for side in ("chosen", "rejected"):
            for index, example in enumerate(examples):
                prompt, completion = _ids(example, "prompt", index), _ids(example, side, index)
                sequences.append(
                    {"input_ids": prompt + completion, "completion_mask": [0] * len(prompt) + [1] * len(completion)}
                )
        batch = self._collate(sequences)
        for column in _REF_COLUMNS:
            if column in examples[0]:
                batch[column] = torch.tensor([float(example[column]) for example in examples])  # (B,)
        return batch


def _ids(example: Mapping[str, Any], part: str, index: int) -> list[int]:
    for column in (f"{part}_input_ids", f"{part}_ids"):
        if column in example:
            return [int(t) for t in example[column]]
    raise ValueError(
        f"Example {index} has no {part!r} token ids (columns {sorted(example)}). The preference collator needs "
        "'prompt_input_ids', 'chosen_input_ids' and 'rejected_input_ids': let DPOTrainer tokenize the dataset, or "
        "tokenize it with honelm.data.tokenize_dataset."
    )


# ---- where the scored tokens are ------------------------------------------------------------


@dataclass
class _Layout:
    """The completion tokens of a collated batch of ``2B`` sequences, in sequence order.

    ``positions`` index the flattened ``(R, T)`` grid of input positions whose *next* token is
    a completion token (the position that predicts it); ``seq`` and ``rank`` place each of
    those ``n`` tokens in its sequence and completion. Sequences ``0..B-1`` are the chosen
    ones, so the first ``lengths[:B].sum()`` tokens are the chosen tokens.
    """

    positions: torch.Tensor  # (n,) flat indices into the (R, T) grid
    target_ids: torch.Tensor  # (n,) the token each position predicts
    seq: torch.Tensor  # (n,) sequence index in [0, 2B)
    rank: torch.Tensor  # (n,) index of the token within its completion
    lengths: torch.Tensor  # (2B,) completion tokens per sequence
    num_pairs: int
    num_tokens: torch.Tensor  # () real (non-padding) tokens in the batch

    @property
    def num_chosen_tokens(self) -> int:
        return int(self.lengths[: self.num_pairs].sum())

    def dense(self, token_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(2B, L)`` values and mask of the completion tokens, left-aligned (L = longest completion)."""
        width = int(self.lengths.max())
        mask = torch.arange(width, device=self.lengths.device) < self.lengths.unsqueeze(1)  # (2B, L)
        values = token_values.new_zeros(self.lengths.shape[0], width)  # (2B, L)
        return values.index_put((self.seq, self.rank), token_values), mask


def _batch_layout(inputs: Mapping[str, Any]) -> _Layout:
    """The layout of a collated preference batch: from its ``labels`` or, for batches in TRL's
    layout, from ``completion_mask`` (1 on completion tokens)."""
    labels = inputs.get("labels")
    if labels is None:
        if "completion_mask" not in inputs:
            raise ValueError(
                f"The preference batch has neither 'labels' nor 'completion_mask' (keys {sorted(inputs)}): the trainer "
                "cannot tell which tokens are completions. Collate with DataCollatorForPreference."
            )
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)  # (R, T)
        labels[:, 0] = IGNORE_INDEX
    return _layout(labels, inputs.get("position_ids"), inputs.get("attention_mask"))


def _layout(labels: torch.Tensor, position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> _Layout:
    rows, width = labels.shape
    targets = torch.cat([labels[:, 1:], labels.new_full((rows, 1), IGNORE_INDEX)], dim=1)  # (R, T)
    if rows > 1:  # padded: one sequence per row
        num_seqs = rows
        seq_grid = torch.arange(rows, device=labels.device).unsqueeze(1).expand(rows, width)  # (R, T)
        num_tokens = attention_mask.sum() if attention_mask is not None else labels.new_tensor(labels.numel())
    else:  # padding-free: sequences start where the position ids restart
        if position_ids is None:
            raise ValueError(
                "A padding-free preference batch (one row) needs `position_ids` to find where each sequence starts. "
                "Use DataCollatorForPreference(padding_free=True), which returns them."
            )
        starts = position_ids[0] == 0  # (N,)
        seq_ids = starts.long().cumsum(0) - 1  # (N,)
        num_starts = int(starts.sum())
        num_seqs = num_starts - num_starts % 2  # an odd count means the last one is pad_to_multiple_of padding
        # the token at t + 1 belongs to the sequence of t (first tokens of sequences are never targets)
        seq_grid = torch.cat([seq_ids[1:], seq_ids.new_full((1,), num_seqs)]).unsqueeze(0)  # (1, N)
        num_tokens = (seq_ids < num_seqs).sum()
    if num_seqs < 2 or num_seqs % 2:
        raise ValueError(
            f"A preference batch must hold 2B sequences (B chosen, then B rejected); found {num_seqs}. "
            "Collate with DataCollatorForPreference."
        )
    scored = targets.reshape(-1) != IGNORE_INDEX  # (R*T,)
    positions = scored.nonzero().squeeze(1)  # (n,)
    seq = seq_grid.reshape(-1).index_select(0, positions)  # (n,)
    if positions.numel() == 0 or int(seq.max()) >= num_seqs:
        raise ValueError("The preference batch has no completion token to score, or labels on padding.")
    lengths = torch.bincount(seq, minlength=num_seqs)  # (2B,)
    offsets = lengths.cumsum(0) - lengths  # (2B,) first token of each sequence among the n
    rank = torch.arange(seq.numel(), device=seq.device) - offsets.index_select(0, seq)  # (n,)
    target_ids = targets.reshape(-1).index_select(0, positions)  # (n,)
    return _Layout(positions, target_ids, seq, rank, lengths, num_seqs // 2, num_tokens)


# ---- per-token quantities from the LM head, chunk by chunk ----------------------------------


@torch.no_grad()
def _mean_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``mean_v (hidden @ weight.T + bias)_v`` per row, float32 ``(n,)``, as ``hidden . mean_v(W) + mean(b)``."""
    mean_w = weight.sum(0, dtype=torch.float32) / weight.shape[0]  # (H,)
    out = hidden.float() @ mean_w  # (n,)
    return out if bias is None else out + bias.sum(dtype=torch.float32) / bias.shape[0]


@torch.no_grad()
def _log_sum_sq_probs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``log sum_v p_v^2`` of ``p = softmax(hidden @ weight.T + bias)`` per row, float32 ``(n,)``.

    Tiles of rows x vocabulary columns with running sums ``s1 = sum exp(z - m)`` and
    ``s2 = sum exp(2 (z - m))`` for the running maximum ``m``: ``log s2 - 2 log s1`` is the
    answer, and no tile holds more than the kernels' default budget of logits.
    """
    num_rows, vocab = hidden.shape[0], weight.shape[0]
    rows = auto_chunk_size(num_rows, vocab, hidden.dtype)
    cols = min(auto_vocab_chunk_size(rows, vocab, hidden.dtype), vocab)
    out = torch.empty(num_rows, dtype=torch.float32, device=hidden.device)
    for r0 in range(0, num_rows, rows):
        h = hidden[r0 : r0 + rows]  # (r, H)
        top = torch.full((h.shape[0],), float("-inf"), device=h.device)  # (r,)
        s1 = torch.zeros_like(top)
        s2 = torch.zeros_like(top)
        for v0 in range(0, vocab, cols):
            z = (h @ weight[v0 : v0 + cols].T).float()  # (r, c)
            if bias is not None:
                z = z + bias[v0 : v0 + cols].float()
            new_top = torch.maximum(top, z.max(1).values)
            scale = torch.exp(top - new_top)
            e = torch.exp(z - new_top.unsqueeze(1))  # (r, c)
            s1 = s1 * scale + e.sum(1)
            s2 = s2 * scale * scale + (e * e).sum(1)
            top = new_top
        out[r0 : r0 + rows] = torch.log(s2) - 2.0 * torch.log(s1)
    return out


@dataclass
class _PolicyPass:
    token_logps: torch.Tensor  # (n,) differentiable
    outputs: Any
    mean_logits: torch.Tensor  # (n,) detached
    log_sum_sq: torch.Tensor | None  # (n,) detached, WPO only
    chosen_correct: torch.Tensor  # () chosen tokens whose argmax is the target
    entropy_sum: torch.Tensor  # () over all completion tokens


# ---- the trainer ----------------------------------------------------------------------------


class DPOTrainer(Trainer):
    """Trainer for Direct Preference Optimization (see the module docstring and ``docs/dpo.md``).

    Args:
        model: A model name or local path (loaded with ``args.model_init_kwargs``, dtype
            ``"auto"``) or an instantiated causal LM (or ``peft.PeftModel``).
        ref_model: The frozen reference model. ``None``: a copy of ``model`` (loaded again from
            its name or path, or ``copy.deepcopy`` of the instance), or no copy at all with
            PEFT (the adapter is disabled for the reference), ``precompute_ref_log_probs`` or
            ``reference_free``.
        args: A :class:`DPOConfig`; defaults to one with ``output_dir="<model>-DPO"``.
        data_collator: Defaults to :class:`DataCollatorForPreference`.
        train_dataset, eval_dataset: Preference datasets in any format of :mod:`honelm.data`
            (explicit or implicit prompt, standard or conversational, with ``tools``, or
            already tokenized). ``eval_dataset`` may be a dict of named datasets.
        processing_class: The tokenizer; loaded from ``model`` when omitted.
        compute_metrics: Called at evaluation with ``EvalPrediction(predictions, label_ids)``
            where ``predictions`` is ``(pairs, 2)``: the chosen and rejected implicit rewards.
        callbacks, optimizers: As in ``transformers.Trainer``.
        quantization_config: Passed to ``from_pretrained`` when ``model`` is a name or path.
        peft_config: A ``peft`` config (e.g. ``LoraConfig``): the model is wrapped and only the
            adapters train; the reference is the model with the adapter disabled.
    """

    _tag_names = ["honelm", "dpo"]

    def __init__(
        self,
        model: Any,
        ref_model: Any = None,
        args: DPOConfig | None = None,
        data_collator: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_metrics: Callable[..., dict[str, float]] | None = None,
        callbacks: list[Any] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
    ) -> None:
        model_path = model if isinstance(model, str) else None
        model_id = model_path or getattr(getattr(model, "config", None), "_name_or_path", None)
        if args is None:
            name = (model_id or "model").rstrip("/").split("/")[-1]
            args = DPOConfig(output_dir=f"{name}-DPO")
        elif not isinstance(args, DPOConfig):
            raise TypeError(f"DPOTrainer: `args` must be a DPOConfig, got {type(args).__name__}.")
        if ref_model is not None and ref_model is model:
            raise ValueError(
                "DPOTrainer: `model` and `ref_model` are the same object, so the reference would train too. "
                "Leave ref_model=None to get a frozen copy, or pass a separate instance."
            )
        model = _load_model(model, args, quantization_config)
        if processing_class is None:
            if model_id is None:
                raise ValueError(
                    "DPOTrainer: pass `processing_class` (the tokenizer); the model has no name to load it from."
                )
            processing_class = AutoTokenizer.from_pretrained(model_id, trust_remote_code=args.trust_remote_code)
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        _configure_pad_token(tokenizer, args)
        model, ref_model = self._models(model, model_path, ref_model, args, peft_config, quantization_config)

        self._output_dir_existed = os.path.isdir(args.output_dir)
        self._dataset_name = _dataset_name(train_dataset)
        self.truncation_stats: dict[str, TruncationStats] = {}
        if train_dataset is not None:
            train_dataset = self._prepare(train_dataset, tokenizer, args, "train")
        if eval_dataset is not None:
            eval_dataset = self._prepare_eval(eval_dataset, tokenizer, args)
        if data_collator is None:
            data_collator = DataCollatorForPreference(
                pad_token_id=tokenizer.pad_token_id,
                padding_free=args.padding_free,
                pad_to_multiple_of=args.pad_to_multiple_of,
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
        # The loss is a mean over the pairs of each micro-batch: the Trainer divides it by the
        # number of gradient-accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(lambda: [0.0, 0.0]),
                                                            "eval": defaultdict(lambda: [0.0, 0.0])}
        self._total_tokens = {"train": 0, "eval": 0}
        self._bco = [0.0, 0.0]  # sum and count of the implicit rewards seen (bco_pair's running mean)
        self.router_aux_loss_coef = self._aux_coefficient(model, args)
        self.ref_model = None
        if ref_model is not None:
            self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        if args.sync_ref_model:
            self.add_callback(_SyncReferenceCallback(self))
        # Pre-flight checks on the tokenized pairs, before the reference pass (which may take long).
        self.diagnostics = attach_diagnostics(
            self, "dpo", output_dir_existed=self._output_dir_existed, dataset=self.train_dataset,
            tokenizer=tokenizer, collator=self.data_collator, truncation_stats=self.truncation_stats.get("train"),
        )
        if args.precompute_ref_log_probs:
            self._precompute_all()
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)

    # ---- setup ----------------------------------------------------------------------------

    def _models(
        self, model: Any, model_path: str | None, ref_model: Any, args: DPOConfig, peft_config: Any,
        quantization_config: Any,
    ) -> tuple[Any, Any]:
        """The policy (wrapped with PEFT when asked) and the separate reference model, or None."""
        peft = peft_config is not None or _is_peft_model(model)
        if peft and args.sync_ref_model:
            raise ValueError(
                "DPOConfig.sync_ref_model=True needs a separate reference model to update, but with PEFT the reference "
                "is the model with its adapter disabled. Set sync_ref_model=False, or train without PEFT."
            )
        if ref_model is None and _is_peft_model(model) and peft_config is None:
            logger.warning(
                "DPOTrainer: the model already has a PEFT adapter; the reference is the model with the adapter "
                "disabled (the base model). Pass `ref_model` if the reference should include the adapter."
            )
        kwargs = args.ref_model_init_kwargs if args.ref_model_init_kwargs is not None else args.model_init_kwargs
        if isinstance(ref_model, str):
            ref_model = load_causal_lm(ref_model, _init_kwargs(kwargs, args, quantization_config))
        elif ref_model is None and not (peft or args.precompute_ref_log_probs or args.reference_free):
            if model_path is not None:  # load it again, as the policy was loaded
                ref_model = load_causal_lm(model_path, _init_kwargs(kwargs, args, quantization_config))
            else:
                ref_model = copy.deepcopy(model)
        if peft_config is not None:
            set_seed(args.seed)  # the adapter's random initialization follows the seed
            model = _wrap_peft(model, peft_config, args)
        if args.disable_dropout:
            _disable_dropout(model)
        if ref_model is not None:
            _freeze(ref_model, args.disable_dropout)
        if args.use_liger_kernel:
            logger.info("use_liger_kernel: honelm computes DPO log-probs with its own chunked kernels.")
            args.use_liger_kernel = False
        return model, ref_model

    def _aux_coefficient(self, model: Any, args: DPOConfig) -> float:
        config = getattr(self.accelerator.unwrap_model(model), "config", None)
        moe = config is not None and hasattr(config, "output_router_logits")
        if args.router_aux_loss_coef is None:
            return float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0) if moe else 0.0
        if args.router_aux_loss_coef and not moe:
            raise ValueError(
                f"DPOConfig.router_aux_loss_coef={args.router_aux_loss_coef} is set but {type(model).__name__} is not "
                "a mixture-of-experts model: there is no load-balancing loss to weight. Leave it unset."
            )
        return float(args.router_aux_loss_coef)

    # ---- data -----------------------------------------------------------------------------

    def _prepare(self, dataset: Any, tokenizer: Any, args: DPOConfig, split: str) -> Any:
        """Validate, tokenize and truncate one preference dataset; records truncation statistics."""
        from datasets import IterableDataset

        streaming = isinstance(dataset, IterableDataset)
        with args.main_process_first(desc=f"tokenizing the {split} dataset"):
            tokenized, _ = tokenize_dataset(
                dataset, tokenizer, expected_kinds=("preference",), num_proc=args.dataset_num_proc
            )
            map_kwargs: dict[str, Any] = {} if streaming else {"num_proc": args.dataset_num_proc, "desc": "Truncating"}
            marked = tokenized.map(_Truncator(args), batched=True, **map_kwargs)
            stats = TruncationStats(max_length=args.max_length, complete=not streaming)
            if not streaming:
                _fill_stats(stats, marked)
                self._warn_dropped(marked, split, args)
            if not streaming:
                map_kwargs["desc"] = "Dropping pairs without completion tokens"
            kept = marked.filter(lambda keep: keep, input_columns=[_KEEP_COLUMN], **map_kwargs)
            kept = kept.remove_columns([_CUT_COLUMN, _KEEP_COLUMN])
        self.truncation_stats[split] = stats
        if stats.complete and stats.num_truncated:
            logger.warning("%s dataset: %s", split, stats.summary())
        return kept

    def _prepare_eval(self, eval_dataset: Any, tokenizer: Any, args: DPOConfig) -> Any:
        if isinstance(eval_dataset, dict):
            return {k: self._prepare(v, tokenizer, args, f"eval/{k}") for k, v in eval_dataset.items()}
        return self._prepare(eval_dataset, tokenizer, args, "eval")

    @staticmethod
    def _warn_dropped(marked: Any, split: str, args: DPOConfig) -> None:
        keep = marked.data.column(_KEEP_COLUMN).to_pylist()
        dropped = [i for i, k in enumerate(keep) if not k]
        if not dropped:
            return
        fix = (
            f"raise max_length (now {args.max_length})"
            + (f" or lower max_prompt_length (now {args.max_prompt_length})" if args.max_prompt_length else "")
            + ", or shorten these prompts"
        )
        if len(dropped) == len(keep):
            raise ValueError(
                f"{split} dataset: none of its {len(keep)} pairs keeps a completion token to train on after "
                f"truncation (the prompt fills max_length={args.max_length}). Fix: {fix}."
            )
        logger.warning(
            "%s dataset: dropped %d of %d pairs (rows %s) whose completion has no token left after truncation "
            "(the prompt fills the sequence). Fix: %s.",
            split, len(dropped), len(keep), ", ".join(map(str, dropped[:5])) + (", ..." if len(dropped) > 5 else ""),
            fix,
        )

    def _remove_unused_columns(self, dataset: Any, description: str | None = None) -> Any:
        # Prepared datasets hold exactly what the collator needs (and the precomputed reference log-probs).
        return dataset

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = ["prompt_input_ids", "chosen_input_ids", "rejected_input_ids", *_REF_COLUMNS]

    # ---- reference log-probs --------------------------------------------------------------

    def _precompute_all(self) -> None:
        args = self.args
        if self.train_dataset is not None:
            self.train_dataset = self._precompute(
                self.train_dataset, args.precompute_ref_batch_size or args.per_device_train_batch_size, "train"
            )
        if isinstance(self.eval_dataset, dict):
            size = args.precompute_ref_batch_size or args.per_device_eval_batch_size
            self.eval_dataset = {k: self._precompute(v, size, f"eval/{k}") for k, v in self.eval_dataset.items()}
        elif self.eval_dataset is not None:
            size = args.precompute_ref_batch_size or args.per_device_eval_batch_size
            self.eval_dataset = self._precompute(self.eval_dataset, size, "eval")

    def _precompute(self, dataset: Any, batch_size: int, split: str) -> Any:
        """Add the reference log-probs of every pair as the columns ``ref_chosen_logps`` / ``ref_rejected_logps``."""
        from datasets import IterableDataset
        from torch.utils.data import DataLoader

        if isinstance(dataset, IterableDataset):
            raise ValueError(
                f"precompute_ref_log_probs=True needs a map-style {split} dataset (it adds columns before training); "
                "this one is an IterableDataset. Load it without streaming, or set precompute_ref_log_probs=False."
            )
        if self.ref_model is None and not _is_peft_model(self.accelerator.unwrap_model(self.model)) and (
            self.state.global_step > 0
        ):
            raise ValueError(
                f"Cannot compute reference log-probs for the {split} dataset now: precompute_ref_log_probs=True keeps "
                "no reference model, and the model has already trained. Pass this dataset as eval_dataset when "
                "creating the trainer, or pass a ref_model."
            )
        dataset = dataset.remove_columns([c for c in _REF_COLUMNS if c in dataset.column_names])
        loader = self.accelerator.prepare(
            DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False,
                       num_workers=self.args.dataloader_num_workers)
        )
        chosen, rejected = [], []
        for batch in loader:
            layout = _batch_layout(batch)
            ref_chosen, ref_rejected = self._reference_logps(self.model, batch, layout)
            ref_chosen, ref_rejected = self.accelerator.gather_for_metrics((ref_chosen, ref_rejected))
            chosen.append(ref_chosen.float().cpu())
            rejected.append(ref_rejected.float().cpu())
        dataset = dataset.add_column("ref_chosen_logps", torch.cat(chosen).tolist())
        return dataset.add_column("ref_rejected_logps", torch.cat(rejected).tolist())

    def _reference_logps(
        self, model: Any, inputs: dict[str, Any], layout: _Layout
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed reference log-probs of the chosen and rejected completions, ``(B,)`` each, no gradient."""
        if all(column in inputs for column in _REF_COLUMNS):
            return inputs["ref_chosen_logps"].float(), inputs["ref_rejected_logps"].float()
        if self.args.reference_free:
            zeros = torch.zeros(layout.num_pairs, device=layout.lengths.device)
            return zeros, zeros.clone()
        model_inputs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        with torch.no_grad(), self._reference_context(model) as reference:
            hidden, _ = last_hidden_states(reference, **model_inputs)  # (R, T, H)
            weight, bias = lm_head_weight_and_bias(self.accelerator.unwrap_model(reference))
            rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, layout.positions)  # (n, H)
            with self.accelerator.autocast():  # the LM head in the forward's precision
                token_logps = selective_logps(rows, weight, layout.target_ids, bias)  # (n,)
        sums = self._sequence_logps(token_logps, layout)
        return sums[: layout.num_pairs], sums[layout.num_pairs :]

    @contextlib.contextmanager
    def _reference_context(self, model: Any) -> Any:
        """Yield the module to run as the reference: the reference model, or ``model`` with its
        adapter disabled (PEFT), or ``model`` itself before training (precomputing); in eval mode."""
        reference = self.ref_model
        unwrapped = self.accelerator.unwrap_model(model)
        if reference is not None:
            yield reference
            return
        was_training = model.training
        model.eval()  # no dropout, no gradient checkpointing in the no-grad pass
        try:
            with unwrapped.disable_adapter() if _is_peft_model(unwrapped) else contextlib.nullcontext():
                yield model
        finally:
            model.train(was_training)

    def _sequence_logps(self, token_logps: torch.Tensor, layout: _Layout) -> torch.Tensor:
        """Per-sequence summed log-probs ``(2B,)``; with ``ld_alpha``, LD-DPO's desensitized sums."""
        values, mask = layout.dense(token_logps)  # (2B, L)
        if self.args.ld_alpha is None:
            return values.sum(-1)
        b = layout.num_pairs
        public = torch.minimum(layout.lengths[:b], layout.lengths[b:]).repeat(2)  # (2B,)
        return ld_sequence_logps(values, mask, public, self.args.ld_alpha)

    # ---- loss -----------------------------------------------------------------------------

    def _policy_pass(self, model: Any, inputs: dict[str, Any], layout: _Layout) -> _PolicyPass:
        model_inputs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        if self.router_aux_loss_coef:
            model_inputs["output_router_logits"] = True
        hidden, outputs = last_hidden_states(model, **model_inputs)  # (R, T, H)
        weight, bias = lm_head_weight_and_bias(self.accelerator.unwrap_model(model))
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, layout.positions)  # (n, H)
        n_chosen = layout.num_chosen_tokens
        token_logps, correct, entropy = [], [], []
        for part in (slice(0, n_chosen), slice(n_chosen, rows.shape[0])):  # chosen tokens come first
            # The LM head runs under the forward's autocast (accelerate wraps only the forward),
            # so bf16=True multiplies it in bf16 as an autocast nn.Linear would.
            with self.accelerator.autocast():
                nll, stats = chunked_cross_entropy(
                    rows[part], weight, layout.target_ids[part], bias, reduction="none", return_stats=True
                )  # (n_part,)
            token_logps.append(-nll)
            correct.append(stats["num_correct"])
            entropy.append(stats["entropy_sum"])
        detached = rows.detach()
        return _PolicyPass(
            token_logps=torch.cat(token_logps),
            outputs=outputs,
            mean_logits=_mean_logits(detached, weight.detach(), None if bias is None else bias.detach()),
            log_sum_sq=_log_sum_sq_probs(detached, weight.detach(), None if bias is None else bias.detach())
            if self.args.use_weighting else None,
            chosen_correct=correct[0],
            entropy_sum=entropy[0] + entropy[1],
        )

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mode = "train" if model.training else "eval"
        args = self.args
        layout = _batch_layout(inputs)
        policy = self._policy_pass(model, inputs, layout)
        sums = self._sequence_logps(policy.token_logps, layout)  # (2B,)
        b = layout.num_pairs
        chosen_logps, rejected_logps = sums[:b], sums[b:]
        ref_chosen, ref_rejected = self._reference_logps(model, inputs, layout)
        losses, metrics = dpo_loss(
            args.loss_type,
            args.loss_weights,
            chosen_logps=chosen_logps,
            rejected_logps=rejected_logps,
            ref_chosen_logps=ref_chosen.to(chosen_logps.dtype),
            ref_rejected_logps=ref_rejected.to(chosen_logps.dtype),
            beta=args.beta,
            label_smoothing=args.label_smoothing,
            f_divergence_type=args.f_divergence_type,
            f_alpha_divergence_coef=args.f_alpha_divergence_coef,
            chosen_lengths=layout.lengths[:b],
            rejected_lengths=layout.lengths[b:],
            bco_delta=self._bco[0] / self._bco[1] if self._bco[1] else 0.0,
            discopop_tau=args.discopop_tau,
            rpo_alpha=args.rpo_alpha,
            pair_weights=self._wpo_weights(policy, layout) if args.use_weighting else None,
        )  # (B,)
        loss = losses.mean()
        aux = getattr(policy.outputs, "aux_loss", None)
        if self.router_aux_loss_coef and aux is not None:
            loss = loss + self.router_aux_loss_coef * aux
            metrics["aux_loss"] = aux.detach()
        self._record(mode, layout, policy, metrics)
        if not return_outputs:
            return loss
        rewards = {
            "rewards_chosen": args.beta * (chosen_logps - ref_chosen).detach(),
            "rewards_rejected": args.beta * (rejected_logps - ref_rejected).detach(),
        }
        return loss, rewards

    def _wpo_weights(self, policy: _PolicyPass, layout: _Layout) -> torch.Tensor:
        """WPO weights of the pairs ``(B,)``, uncapped (as TRL 1.x), from the detached per-token log-probs."""
        values, mask = layout.dense(policy.token_logps.detach())
        log_sum_sq, _ = layout.dense(policy.log_sum_sq)
        log_weights = wpo_log_weights(values, log_sum_sq, mask)  # (2B,)
        b = layout.num_pairs
        return wpo_pair_weights(log_weights[:b], log_weights[b:], max_weight=None)

    def compute_loss_context_manager(self) -> contextlib.ExitStack:
        stack = super().compute_loss_context_manager()
        if self.args.activation_offloading:
            stack.enter_context(torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()))
        return stack

    def prediction_step(
        self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: list[str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, rewards = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        predictions = torch.stack([rewards["rewards_chosen"], rewards["rewards_rejected"]], dim=1)  # (B, 2)
        return loss.detach(), predictions, torch.zeros(predictions.shape[0], device=predictions.device)

    # ---- metrics --------------------------------------------------------------------------

    def _record(self, mode: str, layout: _Layout, policy: _PolicyPass, metrics: dict[str, torch.Tensor]) -> None:
        """Add this micro-batch's sums and counts (over all processes) to the running metrics."""
        b = layout.num_pairs
        n_chosen = layout.num_chosen_tokens
        n_all = int(layout.lengths.sum())
        pairs = float(b)
        entries: dict[str, tuple[torch.Tensor | float, float]] = {
            key: (value.float() * pairs, pairs) for key, value in metrics.items() if key != "aux_loss"
        }
        entries["logits/chosen"] = (policy.mean_logits[:n_chosen].sum(), float(n_chosen))
        entries["logits/rejected"] = (policy.mean_logits[n_chosen:].sum(), float(n_all - n_chosen))
        entries["entropy"] = (policy.entropy_sum.float(), float(n_all))
        entries["mean_token_accuracy"] = (policy.chosen_correct.float(), float(n_chosen))
        if "aux_loss" in metrics:
            entries["aux_loss"] = (metrics["aux_loss"].float(), 1.0)
        names = list(entries)
        device = layout.lengths.device
        values = [torch.as_tensor(entries[k][0], dtype=torch.float32, device=device).reshape(()) for k in names]
        counts = [torch.tensor(entries[k][1], dtype=torch.float32, device=device) for k in names]
        packed = torch.stack([*values, *counts, layout.num_tokens.float().to(device)])
        packed = self.accelerator.reduce(packed, reduction="sum").tolist()  # sum over processes
        k = len(names)
        for i, name in enumerate(names):
            self._metrics[mode][name][0] += packed[i]
            self._metrics[mode][name][1] += packed[k + i]
        self._total_tokens[mode] += int(packed[-1])
        if mode == "train" and "bco_pair/rewards_mean" in metrics:
            mean_index = names.index("bco_pair/rewards_mean")
            self._bco[0] += packed[mean_index] * 2  # the mean is over the 2B rewards of each pair
            self._bco[1] += packed[k + mean_index] * 2

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"  # `evaluate()` logs with the model in eval mode
        metrics = {k: total / count for k, (total, count) in self._metrics[mode].items() if count}
        metrics["num_tokens"] = float(self._total_tokens[mode])
        if mode == "eval":
            loss_key = next((k for k in logs if k.endswith("_loss")), "eval_loss")
            prefix = loss_key[: -len("_loss")]  # the metric_key_prefix: "eval", "eval_<name>", ...
            metrics = {f"{prefix}_{k}": v for k, v in metrics.items()}
        logs.update(metrics)  # in place: `evaluate()` returns these metrics too
        super().log(logs, start_time)
        self._metrics[mode].clear()

    # ---- evaluation, saving, resuming -----------------------------------------------------

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        if eval_dataset is not None and not isinstance(eval_dataset, str):
            tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
            if isinstance(eval_dataset, dict):
                results: dict[str, float] = {}
                for name, dataset in eval_dataset.items():
                    results.update(self.evaluate(dataset, ignore_keys, f"{metric_key_prefix}_{name}"))
                return results
            eval_dataset = self._prepare(eval_dataset, tokenizer, self.args, metric_key_prefix)
            if self.args.precompute_ref_log_probs:
                size = self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size
                eval_dataset = self._precompute(eval_dataset, size, metric_key_prefix)
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save:  # only the process that writes files
            _write_model_card(output_dir or self.args.output_dir, self.model, self._dataset_name, self.args)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        state: dict[str, Any] = {"bco": list(self._bco)}
        if self.args.sync_ref_model and self.ref_model is not None:
            state["ref_model"] = self.accelerator.unwrap_model(self.ref_model).state_dict()
        torch.save(state, os.path.join(folder, _STATE_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, _STATE_FILE)
        if not os.path.isfile(path):
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        self._bco = [float(v) for v in state["bco"]]
        if "ref_model" in state and self.ref_model is not None:
            self.accelerator.unwrap_model(self.ref_model).load_state_dict(state["ref_model"])


# ---- TR-DPO ---------------------------------------------------------------------------------


class _SyncReferenceCallback(TrainerCallback):
    """TR-DPO (Gorbatovski et al., 2024): every ``ref_model_sync_steps`` optimizer steps,
    ``ref <- alpha * policy + (1 - alpha) * ref`` with ``alpha = ref_model_mixup_alpha``."""

    def __init__(self, trainer: DPOTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step % args.ref_model_sync_steps != 0 or self.trainer.ref_model is None:
            return
        accelerator = self.trainer.accelerator
        policy = accelerator.unwrap_model(self.trainer.model)
        reference = accelerator.unwrap_model(self.trainer.ref_model)
        sync_reference(policy, reference, args.ref_model_mixup_alpha)


@torch.no_grad()
def sync_reference(policy: torch.nn.Module, reference: torch.nn.Module, alpha: float) -> None:
    """In place: every reference parameter ``<- alpha * policy + (1 - alpha) * reference``."""
    ref_params = dict(reference.named_parameters())
    policy_params = dict(policy.named_parameters())
    if ref_params.keys() != policy_params.keys():
        missing = sorted(ref_params.keys() ^ policy_params.keys())[:3]
        raise ValueError(
            f"sync_ref_model: the policy and the reference model have different parameters (e.g. {missing}); "
            "TR-DPO mixes them one to one, so the reference must have the policy's architecture."
        )
    for name, ref in ref_params.items():
        ref.mul_(1.0 - alpha).add_(policy_params[name].to(ref.dtype), alpha=alpha)


# ---- helpers --------------------------------------------------------------------------------


class _Truncator:
    """``dataset.map`` function: apply the prompt/completion/total length limits, count the tokens
    cut, and mark pairs whose chosen or rejected completion has no scored token left."""

    def __init__(self, args: DPOConfig) -> None:
        self.max_prompt = args.max_prompt_length
        self.max_completion = args.max_completion_length
        self.max_length = args.max_length
        self.mode = args.truncation_mode

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {c: [] for c in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")}
        out[_CUT_COLUMN], out[_KEEP_COLUMN] = [], []
        for prompt, chosen, rejected in zip(batch["prompt_input_ids"], batch["chosen_input_ids"],
                                            batch["rejected_input_ids"]):
            before = len(prompt) + len(chosen) + len(rejected)
            if self.max_prompt is not None:
                prompt = prompt[len(prompt) - self.max_prompt:] if len(prompt) > self.max_prompt else prompt
            if self.max_completion is not None:
                chosen, rejected = chosen[: self.max_completion], rejected[: self.max_completion]
            row = {
                "prompt_input_ids": list(prompt), "chosen_input_ids": list(chosen), "rejected_input_ids": list(rejected)
            }
            row, _ = truncate_row(row, self.max_length, self.mode)
            for column in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"):
                out[column].append(row[column])
            out[_CUT_COLUMN].append(before - sum(len(row[c]) for c in row))
            # a completion token is scored when something precedes it: the prompt, or an earlier completion token
            first = 0 if row["prompt_input_ids"] else 1
            out[_KEEP_COLUMN].append(
                len(row["chosen_input_ids"]) > first and len(row["rejected_input_ids"]) > first
            )
        return out


def _fill_stats(stats: TruncationStats, marked: Any) -> None:
    cut = marked.data.column(_CUT_COLUMN).to_pylist()
    for n in cut:
        stats.add(n)


def _load_model(model: Any, args: DPOConfig, quantization_config: Any) -> Any:
    if isinstance(model, str):
        return load_causal_lm(model, _init_kwargs(args.model_init_kwargs, args, quantization_config))
    if args.model_init_kwargs:
        logger.warning("DPOConfig.model_init_kwargs is ignored: the model is already instantiated.")
    if quantization_config is not None:
        raise ValueError(
            "DPOTrainer: quantization_config applies when the model is loaded from a name or path; this model is "
            "already instantiated. Pass the name, or quantize the model when you load it."
        )
    return model


def _init_kwargs(kwargs: dict[str, Any] | None, args: DPOConfig, quantization_config: Any) -> dict[str, Any]:
    out = dict(kwargs or {})
    if quantization_config is not None:
        if "quantization_config" in out:
            raise ValueError(
                "DPOTrainer: quantization_config is given both as a trainer argument and in model_init_kwargs; "
                "give it once."
            )
        out["quantization_config"] = quantization_config
    if args.trust_remote_code:
        out.setdefault("trust_remote_code", True)
    return out


def _configure_pad_token(tokenizer: Any, args: DPOConfig) -> None:
    vocab = tokenizer.get_vocab()
    pad = args.pad_token or tokenizer.pad_token or tokenizer.eos_token
    if pad is None or pad not in vocab:
        raise ValueError(
            f"DPOConfig.pad_token={pad!r} is not a token of the tokenizer's vocabulary. Set `pad_token` to a token "
            "the tokenizer has (its EOS works when nothing else fits)."
        )
    tokenizer.pad_token = pad


def _is_peft_model(model: Any) -> bool:
    if "peft" not in sys.modules:
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _wrap_peft(model: Any, peft_config: Any, args: DPOConfig) -> Any:
    try:
        from peft import get_peft_model
    except ImportError as e:  # pragma: no cover - peft is a dev dependency
        raise ImportError("DPOTrainer(peft_config=...) needs peft: pip install 'honelm[peft]'.") from e
    if _is_peft_model(model):
        raise ValueError(
            "DPOTrainer: the model already has a PEFT adapter and a peft_config was given too. Merge the adapter "
            "(model.merge_and_unload()) before adding a new one, or leave peft_config out to train the existing one."
        )
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        from peft import prepare_model_for_kbit_training  # QLoRA

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(args.gradient_checkpointing))
    if args.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # frozen embeddings would cut the checkpointed graph
    return get_peft_model(model, peft_config)


def _disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def _freeze(model: torch.nn.Module, disable_dropout: bool) -> None:
    model.requires_grad_(False)
    model.eval()
    if disable_dropout:
        _disable_dropout(model)


def _dataset_name(dataset: Any) -> str | None:
    info = getattr(dataset, "info", None)
    return getattr(info, "dataset_name", None) or getattr(info, "builder_name", None) if info else None


def _write_model_card(output_dir: str, model: Any, dataset_name: str | None, args: DPOConfig) -> None:
    from honelm.version import __version__

    base = getattr(getattr(model, "config", None), "_name_or_path", None) or "unknown"
    peft = " (LoRA adapter)" if hasattr(model, "peft_config") else ""
    losses = ", ".join(args.loss_type) + (f" (weights {args.loss_weights})" if args.loss_weights else "")
    card = (
        f"---\nlibrary_name: honelm\ntags:\n- honelm\n- dpo\nbase_model: {base}\n---\n\n"
        f"# {os.path.basename(os.path.abspath(output_dir))}\n\n"
        f"This model{peft} was trained with Direct Preference Optimization (DPO) using honelm {__version__}.\n\n"
        f"- Method: DPO (`loss_type={losses}`, `beta={args.beta}`)\n"
        f"- Base model: {base}\n"
        f"- Dataset: {dataset_name or 'not recorded'}\n"
        f"- Max length: {args.max_length}, learning rate: {args.learning_rate}\n"
    )
    with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(card)
