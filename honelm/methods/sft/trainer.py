"""Supervised fine-tuning.

The model learns to reproduce the target tokens of each example: it minimizes the negative
log-likelihood of the completion (prompt-completion data), of the assistant turns
(``assistant_only_loss``) or of the whole text. Rows are validated and tokenized by
:mod:`honelm.data`, optionally packed, collated with or without padding, and the loss is
computed from the final hidden states chunk by chunk (:mod:`honelm.ops`), never holding the
full ``(tokens, vocab)`` logits. Diagnostics (:mod:`honelm.diagnostics`) check the prepared
data before training and watch the metrics during it.

    honelm sft --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name trl-lib/Capybara
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from transformers import AutoTokenizer, Trainer

from honelm.data import (
    DataCollatorForLanguageModeling,
    detect_format,
    pack_dataset,
    tokenize_dataset,
)
from honelm.diagnostics.callback import attach_diagnostics
from honelm.models import last_hidden_states, load_causal_lm
from honelm.ops import lm_head_weight_and_bias

from .config import SFTConfig
from .loss import LOSSES

logger = logging.getLogger(__name__)

_SFT_KINDS = ("language_modeling", "prompt_completion")


class SFTTrainer(Trainer):
    """Trainer for supervised fine-tuning (see the module docstring and ``docs/sft.md``).

    Args:
        model: A model name or local path (loaded with ``args.model_init_kwargs``, dtype
            ``"auto"``) or an instantiated causal LM.
        args: An :class:`SFTConfig`; defaults to one with ``output_dir="<model>-SFT"``.
        data_collator: Defaults to :class:`honelm.data.DataCollatorForLanguageModeling`.
        train_dataset, eval_dataset: Datasets in any format of :mod:`honelm.data` (language
            modeling or prompt-completion, standard or conversational) or already tokenized.
        processing_class: The tokenizer; loaded from ``model`` when omitted.
        peft_config: A ``peft`` config (e.g. ``LoraConfig``): the model is wrapped and only the
            adapters train.
        formatting_func: ``row -> str`` or ``row -> messages`` for datasets in other shapes.
        compute_loss_func, compute_metrics, callbacks, optimizers, optimizer_cls_and_kwargs,
        preprocess_logits_for_metrics: As in ``transformers.Trainer``.
    """

    _tag_names = ["honelm", "sft"]

    def __init__(
        self,
        model: Any,
        args: SFTConfig | None = None,
        data_collator: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_loss_func: Callable[..., torch.Tensor] | None = None,
        compute_metrics: Callable[..., dict[str, float]] | None = None,
        callbacks: list[Any] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        optimizer_cls_and_kwargs: tuple[type, dict[str, Any]] | None = None,
        preprocess_logits_for_metrics: Callable[..., torch.Tensor] | None = None,
        peft_config: Any = None,
        formatting_func: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        model_id = model if isinstance(model, str) else getattr(model.config, "_name_or_path", None)
        if args is None:
            name = (model_id or "model").rstrip("/").split("/")[-1]
            args = SFTConfig(output_dir=f"{name}-SFT")
        elif not isinstance(args, SFTConfig):
            raise TypeError(f"SFTTrainer: `args` must be an SFTConfig, got {type(args).__name__}.")
        if isinstance(model, str):
            model = load_causal_lm(model, args.model_init_kwargs)
        elif args.model_init_kwargs:
            logger.warning("SFTConfig.model_init_kwargs is ignored: the model is already instantiated.")
        if processing_class is None:
            if model_id is None:
                raise ValueError("SFTTrainer: pass `processing_class` (the tokenizer); the model has no name to load it from.")
            processing_class = AutoTokenizer.from_pretrained(model_id)
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        _configure_tokenizer(tokenizer, args)
        if peft_config is not None:
            model = _wrap_peft(model, peft_config, args)
        if args.use_liger_kernel and not _liger_available():
            logger.info("liger-kernel is not installed: using honelm's chunked loss kernels (same memory savings).")
            args.use_liger_kernel = False

        self._output_dir_existed = os.path.isdir(args.output_dir)
        self._dataset_name = _dataset_name(train_dataset)
        self.truncation_stats: dict[str, Any] = {}
        self._unpacked_train = train_dataset  # what the pre-flight checks read (before packing)
        skip = bool((args.dataset_kwargs or {}).get("skip_prepare_dataset", False))
        completion_only = args.completion_only_loss
        if train_dataset is not None and not skip:
            if completion_only is None:
                completion_only = _has_completions(train_dataset, formatting_func, args)
            train_dataset = self._prepare(train_dataset, tokenizer, args, formatting_func, args.packing, "train")
        if eval_dataset is not None and not skip:
            packing = args.packing if args.eval_packing is None else args.eval_packing
            if isinstance(eval_dataset, dict):
                eval_dataset = {
                    k: self._prepare(v, tokenizer, args, formatting_func, packing, f"eval/{k}")
                    for k, v in eval_dataset.items()
                }
            else:
                eval_dataset = self._prepare(eval_dataset, tokenizer, args, formatting_func, packing, "eval")
        if data_collator is None:
            data_collator = DataCollatorForLanguageModeling(
                pad_token_id=tokenizer.pad_token_id,
                completion_only_loss=completion_only is not False,
                assistant_only_loss=args.assistant_only_loss,
                padding_free=args.padding_free or args.packing,
                pad_to_multiple_of=args.pad_to_multiple_of,
            )

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        # compute_loss normalizes by `num_items_in_batch` itself, for every model.
        self.model_accepts_loss_kwargs = True
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._total_tokens = {"train": 0, "eval": 0}
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)
        self.diagnostics = self._attach_diagnostics(tokenizer)

    # ---- data -----------------------------------------------------------------------------

    def _prepare(
        self, dataset: Any, tokenizer: Any, args: SFTConfig, formatting_func: Any, packing: bool, split: str
    ) -> Any:
        """Validate, tokenize, truncate (and pack) one dataset; records truncation statistics."""
        if args.shuffle_dataset and split == "train" and hasattr(dataset, "shuffle"):
            dataset = dataset.shuffle(seed=args.seed)
        # bfd truncates overlong sequences itself; the other strategies keep every token.
        truncate_to = args.max_length if not packing or args.packing_strategy == "bfd" else None
        with args.main_process_first(desc=f"tokenizing the {split} dataset"):
            dataset, stats = tokenize_dataset(
                dataset,
                tokenizer,
                max_length=truncate_to,
                truncation_mode=args.truncation_mode,
                eos_token=args.eos_token,
                dataset_text_field=args.dataset_text_field,
                formatting_func=formatting_func,
                assistant_only_loss=args.assistant_only_loss,
                expected_kinds=_SFT_KINDS,
                num_proc=args.dataset_num_proc,
            )
            self.truncation_stats[split] = stats
            if getattr(stats, "complete", False) and stats.num_truncated:
                logger.warning("%s dataset: %s", split, stats.summary())
            if split == "train":
                self._unpacked_train = dataset
            if packing:
                map_kwargs = {"num_proc": args.dataset_num_proc} if args.dataset_num_proc else None
                dataset = pack_dataset(dataset, args.max_length, args.packing_strategy, map_kwargs)
        return dataset

    def _attach_diagnostics(self, tokenizer: Any) -> Any:
        """Register the diagnostics callback and run the pre-flight checks on the train data."""
        stats = self.truncation_stats.get("train")
        counts = dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else None
        try:
            return attach_diagnostics(
                self, "sft", output_dir_existed=self._output_dir_existed, dataset=self._unpacked_train,
                tokenizer=tokenizer, collator=self.data_collator, truncation_stats=stats,
            )
        finally:
            if counts is not None:  # reading a stream's first rows must not count them twice
                for name, value in counts.items():
                    setattr(stats, name, value)

    def _remove_unused_columns(self, dataset: Any, description: str | None = None) -> Any:
        # Prepared datasets hold exactly what the collator needs (masks, seq_lengths).
        return dataset

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = ["input_ids", "completion_mask", "assistant_masks", "seq_lengths"]

    # ---- loss -----------------------------------------------------------------------------

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        mode = "train" if model.training else "eval"
        if self.compute_loss_func is not None or (return_outputs and self.compute_metrics is not None):
            # Custom losses and metrics need the full logits: use the standard path.
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels")  # (B, T)
        model_inputs = {k: v for k, v in inputs.items() if k not in ("completion_mask", "assistant_masks", "seq_lengths")}
        hidden, outputs = last_hidden_states(model, **model_inputs)  # (B, T, H)
        weight, bias = lm_head_weight_and_bias(self.accelerator.unwrap_model(model))
        # The LM head runs under the same autocast as the model's forward (accelerate wraps only
        # the forward), so that with bf16=True its matmuls are bf16 as in an autocast nn.Linear.
        with self.accelerator.autocast():
            loss, stats = LOSSES[self.args.loss_type](hidden, weight, labels, bias, num_items_in_batch)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # The gradient all-reduce averages over processes; the divisor is already global.
            loss = loss * self.accelerator.num_processes
        loss = loss + self._aux_loss(model, outputs, mode)
        self._record(mode, inputs, stats)
        return (loss, {"loss": loss.detach()}) if return_outputs else loss

    def _aux_loss(self, model: Any, outputs: Any, mode: str = "train") -> torch.Tensor | float:
        """Mixture-of-experts load-balancing loss, as the model's own forward would add it."""
        aux = getattr(outputs, "aux_loss", None)
        config = self.accelerator.unwrap_model(model).config
        if aux is None or not getattr(config, "output_router_logits", False):
            return 0.0
        gathered = self.accelerator.gather_for_metrics(aux.detach().reshape(1))  # (processes,)
        self._metrics[mode]["aux_loss"].append(gathered.mean().item())
        # Added once per optimizer step's worth of micro-batches, not once per micro-batch.
        ga_steps = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
        return getattr(config, "router_aux_loss_coef", 0.0) * aux / ga_steps

    def _record(self, mode: str, inputs: dict[str, torch.Tensor], stats: dict[str, torch.Tensor]) -> None:
        tokens = inputs["attention_mask"].sum() if "attention_mask" in inputs else torch.tensor(
            inputs["input_ids"].numel(), device=inputs["input_ids"].device
        )
        counts = torch.stack(
            [tokens.float(), stats["num_tokens"].float(), stats["num_correct"].float(), stats["entropy_sum"].float()]
        )
        counts = self.accelerator.gather_for_metrics(counts.unsqueeze(0)).sum(0)  # sum over processes
        self._total_tokens[mode] += int(counts[0].item())
        scored = max(counts[1].item(), 1.0)
        self._metrics[mode]["mean_token_accuracy"].append(counts[2].item() / scored)
        self._metrics[mode]["entropy"].append(counts[3].item() / scored)

    def compute_loss_context_manager(self) -> contextlib.ExitStack:
        stack = super().compute_loss_context_manager()
        if self.args.activation_offloading:
            stack.enter_context(torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()))
        return stack

    # ---- logging and saving ---------------------------------------------------------------

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """As ``Trainer.evaluate``; the SFT metrics carry ``metric_key_prefix`` (``eval_entropy``,
        ``eval_<name>_entropy`` for a dict of eval datasets) and are in the returned dict."""
        self._metric_prefix = metric_key_prefix  # a dict of datasets sets it again per dataset, recursively
        return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        prefix = getattr(self, "_metric_prefix", "eval")
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
        if self.args.should_save:  # only the process that writes files; others may run ahead
            _write_model_card(output_dir or self.args.output_dir, self.model, self._dataset_name, self.args)


# ---- helpers --------------------------------------------------------------------------------


def _configure_tokenizer(tokenizer: Any, args: SFTConfig) -> None:
    """Apply ``chat_template_path``, ``eos_token`` and ``pad_token`` with clear errors."""
    if args.chat_template_path is not None:
        tokenizer.chat_template = _load_chat_template(args.chat_template_path)
    vocab = tokenizer.get_vocab()
    if args.eos_token is not None:
        if args.eos_token not in vocab:
            raise ValueError(
                f"SFTConfig.eos_token={args.eos_token!r} is not a token of the tokenizer's vocabulary. "
                f"Use one of its special tokens (EOS is {tokenizer.eos_token!r})."
            )
        tokenizer.eos_token = args.eos_token
    pad = args.pad_token or tokenizer.pad_token or tokenizer.eos_token
    if pad is None or pad not in vocab:
        raise ValueError(
            f"SFTConfig.pad_token={pad!r} is not a token of the tokenizer's vocabulary. Set `pad_token` "
            "to a token the tokenizer has (its EOS works when nothing else fits)."
        )
    tokenizer.pad_token = pad


def _load_chat_template(path: str) -> str:
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    template = AutoTokenizer.from_pretrained(path).chat_template
    if not template:
        raise ValueError(f"SFTConfig.chat_template_path={path!r}: that tokenizer has no chat template.")
    return template


def _wrap_peft(model: Any, peft_config: Any, args: SFTConfig) -> Any:
    try:
        from peft import get_peft_model
    except ImportError as e:  # pragma: no cover - peft is a dev dependency
        raise ImportError("SFTTrainer(peft_config=...) needs peft: pip install 'honelm[peft]'.") from e
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        from peft import prepare_model_for_kbit_training  # QLoRA

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(args.gradient_checkpointing))
    if args.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # frozen embeddings would cut the checkpointed graph
    return get_peft_model(model, peft_config)


def _liger_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def _has_completions(dataset: Any, formatting_func: Any, args: SFTConfig) -> bool:
    if formatting_func is not None:
        return False
    try:
        fmt = detect_format(dataset, dataset_text_field=args.dataset_text_field)
    except ValueError:
        return False  # tokenize_dataset raises the full, explained error right after
    return fmt.kind == "prompt_completion" or "completion_mask" in (fmt.columns or ())


def _dataset_name(dataset: Any) -> str | None:
    info = getattr(dataset, "info", None)
    return getattr(info, "dataset_name", None) or getattr(info, "builder_name", None) if info else None


def _write_model_card(output_dir: str, model: Any, dataset_name: str | None, args: SFTConfig) -> None:
    from honelm.version import __version__

    base = getattr(getattr(model, "config", None), "_name_or_path", None) or "unknown"
    peft = " (LoRA adapter)" if hasattr(model, "peft_config") else ""
    card = (
        f"---\nlibrary_name: honelm\ntags:\n- honelm\n- sft\nbase_model: {base}\n---\n\n"
        f"# {os.path.basename(os.path.abspath(output_dir))}\n\n"
        f"This model{peft} was trained with supervised fine-tuning (SFT) using honelm {__version__}.\n\n"
        f"- Method: SFT (`loss_type={args.loss_type}`)\n"
        f"- Base model: {base}\n"
        f"- Dataset: {dataset_name or 'not recorded'}\n"
        f"- Max length: {args.max_length}, packing: {args.packing}, learning rate: {args.learning_rate}\n"
    )
    with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(card)
