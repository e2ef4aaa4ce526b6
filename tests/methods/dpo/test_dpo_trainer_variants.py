"""Every DPO loss variant and every preference format through the trainer: one training step
each, with the logged loss equal to the plain full-logits computation of that variant."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from dpo_helpers import ANSWER, QUESTION, WRONG, config, full_batch, logs, make_trainer, naive_sequence_logps

from honelm.methods.dpo import DPOTrainer
from honelm.methods.dpo.loss import LOSS_TYPES, dpo_loss
from honelm.testing import tiny_model


def _naive_dpo_loss(trainer, batch, loss_type):
    """The trainer's loss for `loss_type`, computed the plain way: full logits, explicit masks."""
    args = trainer.args
    with torch.no_grad():
        policy, logps, mask, logits = naive_sequence_logps(trainer.model, batch)
        reference, ref_token_logps, *_ = naive_sequence_logps(trainer.ref_model, batch)
        b = policy.shape[0] // 2
        lengths = mask.sum(-1)
        if args.ld_alpha is not None:
            rank = mask.cumsum(-1)
            public = torch.minimum(lengths[:b], lengths[b:]).repeat(2).unsqueeze(1)
            weight = torch.where(rank <= public, 1.0, args.ld_alpha) * mask
            policy, reference = (logps * weight).sum(-1), (ref_token_logps * weight).sum(-1)
        if args.reference_free:
            reference = torch.zeros_like(reference)
        pair_weights = None
        if args.use_weighting:
            log_sum_sq = torch.logsumexp(2 * torch.log_softmax(logits, -1), -1)
            log_w = ((logps - log_sum_sq) * mask).sum(-1) / lengths
            pair_weights = torch.exp(log_w[:b] + log_w[b:])
        losses, _ = dpo_loss(
            loss_type, args.loss_weights, chosen_logps=policy[:b], rejected_logps=policy[b:],
            ref_chosen_logps=reference[:b], ref_rejected_logps=reference[b:], beta=args.beta,
            label_smoothing=args.label_smoothing, f_divergence_type=args.f_divergence_type,
            f_alpha_divergence_coef=args.f_alpha_divergence_coef, chosen_lengths=lengths[:b],
            rejected_lengths=lengths[b:], bco_delta=0.0, rpo_alpha=args.rpo_alpha, pair_weights=pair_weights,
        )
    return losses.mean()


_VARIANTS = [{"loss_type": name} for name in LOSS_TYPES] + [
    {"loss_type": "sigmoid", "label_smoothing": 0.1, "f_divergence_type": "forward_kl"},
    {"loss_type": "robust", "label_smoothing": 0.2, "f_divergence_type": "js_divergence"},
    {"loss_type": "ipo", "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
    {"loss_type": "sigmoid", "ld_alpha": 0.3, "use_weighting": True},
    {"loss_type": "apo_zero", "rpo_alpha": 1.0, "ld_alpha": 0.0},
    {"loss_type": "sigmoid", "reference_free": True},
]


@pytest.mark.parametrize("variant", _VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
def test_every_loss_variant_trains_one_step_with_the_plain_loss_value(tmp_path, variant):
    trainer = make_trainer(tmp_path, ref_seed=None if variant.get("reference_free") else 1, max_steps=1,
                       per_device_train_batch_size=8, **variant)
    if trainer.ref_model is None:  # reference_free: the naive helper wants some reference to call
        trainer.ref_model = trainer.model
    expected = _naive_dpo_loss(trainer, full_batch(trainer), variant["loss_type"])
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    logged = logs(trainer)[0]
    assert logged["loss"] == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))


def test_loss_type_list_is_the_weighted_sum_of_its_parts(tmp_path):
    trainer = make_trainer(tmp_path, loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])
    batch = full_batch(trainer)
    combined = trainer.compute_loss(trainer.model, dict(batch))
    parts = {}
    for name in ("sigmoid", "bco_pair", "sft"):
        trainer.args.loss_type, trainer.args.loss_weights = [name], None
        parts[name] = trainer.compute_loss(trainer.model, dict(batch))
    expected = 0.8 * parts["sigmoid"] + 0.2 * parts["bco_pair"] + parts["sft"]
    torch.testing.assert_close(combined, expected, rtol=1e-5, atol=1e-6)
    trainer.args.loss_type, trainer.args.loss_weights = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]
    trainer._metrics["train"].clear()
    trainer.compute_loss(trainer.model, dict(batch))
    logged = {k: s / c for k, (s, c) in trainer._metrics["train"].items()}
    assert logged["loss/sft"] == pytest.approx(parts["sft"].item(), rel=1e-5)


def test_bco_pair_keeps_a_running_mean_of_the_rewards(tmp_path):
    trainer = make_trainer(tmp_path, loss_type="bco_pair", max_steps=2, per_device_train_batch_size=4)
    seen = []
    original = trainer._record

    def record(mode, layout, policy, metrics):
        seen.append((trainer._bco[1], metrics["bco_pair/rewards_mean"].item(), layout.num_pairs))
        original(mode, layout, policy, metrics)

    trainer._record = record
    trainer.train()
    (count0, mean0, pairs0), (count1, mean1, pairs1) = seen
    assert count0 == 0 and count1 == 2 * pairs0  # the first batch used delta = 0, the second its mean
    total = mean0 * 2 * pairs0 + mean1 * 2 * pairs1
    assert trainer._bco[0] / trainer._bco[1] == pytest.approx(total / (2 * pairs0 + 2 * pairs1), rel=1e-5)



# ---- data formats ------------------------------------------------------------------------------

_TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                            "parameters": {"type": "object", "properties": {}}}}]
_FORMATS = {
    "standard": {"prompt": ["What is 2 + 2?"], "chosen": [" 4"], "rejected": [" 5"]},
    "standard_implicit": {"chosen": ["What is 2 + 2? 4"], "rejected": ["What is 2 + 2? 5"]},
    "conversational": {"prompt": [QUESTION], "chosen": [ANSWER], "rejected": [WRONG]},
    "conversational_implicit": {"chosen": [QUESTION + ANSWER], "rejected": [QUESTION + WRONG]},
    "conversational_tools": {"prompt": [QUESTION], "chosen": [ANSWER], "rejected": [WRONG],
                             "tools": [json.dumps(_TOOLS)]},
}


@pytest.mark.parametrize("name", list(_FORMATS))
def test_every_preference_format_is_tokenized_and_trains(tmp_path, name):
    model, tok = tiny_model()
    data = Dataset.from_dict({k: v * 4 for k, v in _FORMATS[name].items()})
    trainer = DPOTrainer(model, args=config(tmp_path, max_steps=1), train_dataset=data, processing_class=tok)
    row = trainer.train_dataset[0]
    chosen, rejected = tok.decode(row["chosen_input_ids"]), tok.decode(row["rejected_input_ids"])
    prompt = tok.decode(row["prompt_input_ids"])
    assert chosen.strip() == "4<|im_end|>" and rejected.strip() == "5<|im_end|>"
    assert "What is 2 + 2?" in prompt and ("4" not in prompt)
    if name.startswith("conversational"):
        assert prompt.endswith("<|im_start|>assistant\n")
    if name == "conversational_tools":
        assert '"name": "add"' in prompt
    trainer.train()
    assert logs(trainer)[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1




def test_streaming_dataset_trains(tmp_path):
    model, tok = tiny_model()
    data = Dataset.from_dict({"prompt": [QUESTION] * 8, "chosen": [ANSWER] * 8, "rejected": [WRONG] * 8})
    trainer = DPOTrainer(model, args=config(tmp_path, max_steps=3, learning_rate=1e-2),
                         train_dataset=data.to_iterable_dataset(), processing_class=tok)
    trainer.train()
    history = logs(trainer)
    assert trainer.state.global_step == 3 and history[-1]["rewards/margins"] > history[0]["rewards/margins"]
