"""Pre-flight checks: each fires on data showing its problem and stays silent on good data."""

from __future__ import annotations

import random

import pytest
from datasets import Dataset

from honelm.data import DataCollatorForLanguageModeling, tokenize_dataset
from honelm.diagnostics import CODES, PreflightInput, resolve_thresholds
from honelm.diagnostics.detectors import PREFLIGHT_CHECKS, preflight_findings
from honelm.diagnostics.detectors.preflight import padding_fraction, trained_positions
from honelm.diagnostics.preflight import model_facts, preflight_input, sample_rows, stop_token_ids
from honelm.testing import arithmetic_dataset, tiny_config, tiny_tokenizer

TH = resolve_thresholds()
EOS, PAD = 1, 0


def findings(**kwargs):
    return preflight_findings(PreflightInput(**kwargs), TH)


def codes(**kwargs):
    return [f.code for f in findings(**kwargs)]


def one(code, **kwargs):
    found = [f for f in findings(**kwargs) if f.code == code]
    assert len(found) == 1, f"{code}: {findings(**kwargs)}"
    return found[0]


def lm_row(n, *, eos=True, prompt=0):
    ids = list(range(10, 10 + n - 1)) + [EOS if eos else 9]
    return {"input_ids": ids, "completion_mask": [0] * prompt + [1] * (n - prompt)}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_every_preflight_code_has_a_check():
    raised = {
        "DATA_NO_TRAINABLE_TOKENS", "DATA_MISSING_EOS", "DATA_EOS_MASKED_BY_PAD", "TEMPLATE_NO_GENERATION_MARKERS",
        "DATA_TRUNCATION", "DATA_PADDING_WASTE", "PREF_LENGTH_BIAS", "KTO_WEIGHT_IMBALANCE", "KTO_BATCH_TOO_SMALL",
        "REWARD_MODEL_NO_PAD_TOKEN", "DISTILL_VOCAB_MISMATCH", "DISTILL_TEMPLATE_MISMATCH", "MOE_AUX_LOSS_OFF",
    }
    assert raised == {c for c, info in CODES.items() if info.area == "preflight"}
    assert len(PREFLIGHT_CHECKS) == 12  # the two distillation codes share one check


def test_good_sft_data_raises_nothing():
    rows = [lm_row(8, prompt=4) for _ in range(50)]
    config = {"max_length": 64, "per_device_train_batch_size": 8, "truncation_mode": "keep_start"}
    assert findings(config=config, rows=rows, stop_token_ids=frozenset({EOS}), eos_token_id=EOS, pad_token_id=PAD) == []


def test_trained_positions_match_the_collator_labels():
    rng = random.Random(0)
    collator = DataCollatorForLanguageModeling(pad_token_id=PAD, assistant_only_loss=True)
    for _ in range(20):
        n = rng.randint(2, 12)
        row = {"input_ids": [rng.randint(5, 50) for _ in range(n)],
               "completion_mask": [rng.randint(0, 1) for _ in range(n)],
               "assistant_masks": [rng.randint(0, 1) for _ in range(n)]}
        labels = collator([row])["labels"][0]
        expected = [i for i in range(n) if labels[i] != -100]
        assert trained_positions(row, True, True) == [expected]
    packed = {"input_ids": [5, 6, 7, 8, 9], "seq_lengths": [2, 3]}
    flat = DataCollatorForLanguageModeling(pad_token_id=PAD)([packed])["labels"][0]
    assert [p for span in trained_positions(packed, True, False) for p in span] == [1, 3, 4]
    assert (flat[[0, 2]] == -100).all()


def test_missing_eos_is_an_error_naming_rows():
    rows = [lm_row(6, prompt=3)] * 5 + [lm_row(6, eos=False, prompt=3)] * 5
    finding = one("DATA_MISSING_EOS", rows=rows, row_indices=list(range(100, 110)), stop_token_ids=frozenset({EOS}),
                  decode=lambda ids: " ".join(f"t{i}" for i in ids))
    assert finding.evidence["fraction"] == 0.5 and finding.evidence["example_rows"][:2] == [105, 106]
    assert "row 105" in finding.message and "never learn to stop" in finding.message and "t9" in finding.message
    assert (finding.severity or CODES[finding.code].severity) == "error"


def test_missing_eos_ignores_truncated_rows_and_a_few_odd_rows():
    stops = frozenset({EOS})
    cut = [lm_row(64, eos=False)] * 10 + [lm_row(8)] * 10  # the cut ones are DATA_TRUNCATION's business
    assert "DATA_MISSING_EOS" not in codes(config={"max_length": 64}, rows=cut, stop_token_ids=stops)
    assert "DATA_MISSING_EOS" in codes(config={"max_length": 64, "truncation_mode": "keep_end"}, rows=cut,
                                       stop_token_ids=stops)  # keep_end keeps the EOS: its absence is real
    few = [lm_row(8)] * 97 + [lm_row(8, eos=False)] * 3  # 3% <= 5%
    assert "DATA_MISSING_EOS" not in codes(rows=few, stop_token_ids=stops)


def test_eos_outside_the_completion_mask_counts_as_missing():
    row = lm_row(6, prompt=3)
    row["completion_mask"] = [0, 0, 0, 1, 1, 0]  # the EOS is not trained
    assert "DATA_MISSING_EOS" in codes(rows=[row] * 10, stop_token_ids=frozenset({EOS}))
    assert "DATA_MISSING_EOS" not in codes(rows=[row] * 10, stop_token_ids=frozenset({EOS}),
                                           completion_only_loss=False)


def test_missing_eos_in_preference_completions():
    rows = [{"prompt_input_ids": [5, 6], "chosen_input_ids": [7, 8], "rejected_input_ids": [9, EOS]}] * 10
    finding = one("DATA_MISSING_EOS", rows=rows, stop_token_ids=frozenset({EOS}))
    assert finding.evidence["rows_checked"] == 20 and finding.evidence["rows_missing_eos"] == 10


def test_rows_without_trainable_tokens_warn_and_all_of_them_is_an_error():
    rows = [lm_row(8, prompt=8)] * 2 + [lm_row(8, prompt=4)] * 8
    finding = one("DATA_NO_TRAINABLE_TOKENS", rows=rows, stop_token_ids=frozenset({EOS}))
    assert finding.severity is None and finding.evidence["rows_without_targets"] == 2
    everything = one("DATA_NO_TRAINABLE_TOKENS", rows=[lm_row(8, prompt=8)] * 3)
    assert everything.severity == "error" and "learn nothing" in everything.message
    only_first = {"input_ids": [5, 6, EOS], "completion_mask": [1, 0, 0]}  # the first token is never a target
    assert one("DATA_NO_TRAINABLE_TOKENS", rows=[only_first]).severity == "error"
    cut = one("DATA_NO_TRAINABLE_TOKENS", config={"max_length": 8, "truncation_mode": "keep_start"},
              rows=[lm_row(8, prompt=8)] * 3)
    assert [(s.param, s.proposed) for s in cut.suggestions] == [("truncation_mode", "keep_end")]


def test_collator_that_masks_pad_eos_is_caught():
    from transformers import DataCollatorForLanguageModeling as HFCollator

    tok = tiny_tokenizer()
    tok.pad_token = tok.eos_token
    data, _ = tokenize_dataset(arithmetic_dataset(n=8), tok)
    config = {"pad_token": tok.pad_token, "completion_only_loss": None}
    masked = preflight_input(config, dataset=data, tokenizer=tok, collator=HFCollator(tok, mlm=False))
    finding = [f for f in preflight_findings(masked, TH) if f.code == "DATA_EOS_MASKED_BY_PAD"]
    assert finding and finding[0].evidence["kept_as_labels"] == 0
    assert finding[0].evidence["trained_eos_in_batch"] == 4
    suggested = [(s.param, s.current, s.proposed) for s in finding[0].suggestions]
    assert suggested == [("pad_token", "<|im_end|>", "<|pad|>")]
    collator = DataCollatorForLanguageModeling(tok.pad_token_id)
    ours = preflight_input(config, dataset=data, tokenizer=tok, collator=collator)
    assert ours.collator_eos == {"expected": 4, "in_labels": 4}
    assert preflight_findings(ours, TH) == []


def test_assistant_only_loss_without_generation_markers():
    finding = one("TEMPLATE_NO_GENERATION_MARKERS", config={"assistant_only_loss": True}, assistant_only_loss=True,
                  chat_template="{{ messages }}")
    assert [(s.param, s.current, s.proposed) for s in finding.suggestions] == [("assistant_only_loss", True, False)]
    assert "has no chat template" in one("TEMPLATE_NO_GENERATION_MARKERS", assistant_only_loss=True).message
    assert "TEMPLATE_NO_GENERATION_MARKERS" not in codes(assistant_only_loss=True, has_generation_markers=True)


def test_truncation_from_dataset_statistics_and_from_the_sample():
    stats = {"num_rows": 1000, "num_truncated": 200, "tokens_dropped": 60000, "max_length": 1024}
    finding = one("DATA_TRUNCATION", config={"max_length": 1024, "truncation_mode": "keep_start"}, truncation=stats)
    assert "200 of 1000 rows (20%)" in finding.message and "60000 tokens" in finding.message
    assert [(s.param, s.current, s.proposed) for s in finding.suggestions] == [("max_length", 1024, 2048)]
    rows = [lm_row(32)] * 3 + [lm_row(10)] * 7
    sampled = one("DATA_TRUNCATION", config={"max_length": 32}, rows=rows, stop_token_ids=frozenset({EOS}))
    assert sampled.evidence["counted_on"] == "sample" and sampled.evidence["fraction"] == 0.3
    assert "DATA_TRUNCATION" not in codes(truncation={**stats, "num_truncated": 50})


def test_padding_fraction_by_hand_and_the_waste_check():
    assert padding_fraction([1, 3], 2) == pytest.approx(1 - 4 / 6)
    assert padding_fraction([4, 4, 4, 4], 2) == 0.0
    assert padding_fraction([3, 5], 2, multiple=8) == pytest.approx(1 - 8 / 16)
    rows = [lm_row(n) for n in [4, 60] * 20]
    finding = one("DATA_PADDING_WASTE", config={"per_device_train_batch_size": 8, "padding_free": False,
                                                "packing": False}, rows=rows, stop_token_ids=frozenset({EOS}))
    assert {s.param: s.proposed for s in finding.suggestions} == {"padding_free": True, "packing": True}
    assert (finding.severity or CODES[finding.code].severity) == "info"
    for off in ({"padding_free": True}, {"packing": True}, {"per_device_train_batch_size": 1}):
        config = {"per_device_train_batch_size": 8, **off}
        assert "DATA_PADDING_WASTE" not in codes(config=config, rows=rows, stop_token_ids=frozenset({EOS}))


def _pair(chosen, rejected):
    return {"prompt_input_ids": [5], "chosen_input_ids": [7] * (chosen - 1) + [EOS],
            "rejected_input_ids": [8] * (rejected - 1) + [EOS]}


def test_length_bias_in_preference_pairs():
    biased = [_pair(20, 5)] * 18 + [_pair(5, 20)] * 2
    finding = one("PREF_LENGTH_BIAS", config={"ld_alpha": None}, rows=biased, stop_token_ids=frozenset({EOS}))
    assert "longer one in 90% of 20 pairs" in finding.message
    assert [(s.param, s.proposed) for s in finding.suggestions] == [("ld_alpha", 0.5)]
    balanced = [_pair(20, 5)] * 10 + [_pair(5, 20)] * 10
    assert codes(rows=balanced, stop_token_ids=frozenset({EOS})) == []
    assert codes(rows=biased[:10], stop_token_ids=frozenset({EOS})) == []  # too few pairs to say


def _unpaired(label):
    return {"prompt_input_ids": [5], "completion_input_ids": [7, EOS], "label": label}


def test_kto_weights_and_batch_size():
    rows = [_unpaired(True)] * 30 + [_unpaired(False)] * 10
    config = {"desirable_weight": 1.0, "undesirable_weight": 1.0, "per_device_train_batch_size": 8,
              "gradient_accumulation_steps": 1, "loss_type": "kto"}
    finding = one("KTO_WEIGHT_IMBALANCE", config=config, rows=rows, stop_token_ids=frozenset({EOS}), method="kto")
    assert finding.evidence["ratio"] == 3.0
    assert [(s.param, s.current, s.proposed) for s in finding.suggestions] == [("desirable_weight", 1.0, 0.33)]
    balanced = {**config, "desirable_weight": 0.33}
    assert codes(config=balanced, rows=rows, stop_token_ids=frozenset({EOS}), method="kto") == []
    small = {**balanced, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 8}
    finding = one("KTO_BATCH_TOO_SMALL", config=small, method="kto")
    assert finding.severity is None
    assert {s.param: s.proposed for s in finding.suggestions} == {"per_device_train_batch_size": 4,
                                                                  "gradient_accumulation_steps": 4}
    single = one("KTO_BATCH_TOO_SMALL", config={**small, "per_device_train_batch_size": 1}, method="kto")
    assert single.severity == "error"
    assert codes(config=small, method="kto", world_size=2) == []  # the KL batch is gathered over processes
    assert codes(config={**small, "loss_type": "apo_zero_unpaired"}, method="kto") == []


def test_reward_model_without_pad_token(tok):
    from transformers import AutoModelForSequenceClassification

    config = tiny_config("qwen2", tokenizer=tok)
    config.num_labels = 1
    model = AutoModelForSequenceClassification.from_config(config)
    model.config.pad_token_id = None
    assert codes(model=model_facts(model), method="reward") == ["REWARD_MODEL_NO_PAD_TOKEN"]
    model.config.pad_token_id = tok.pad_token_id
    assert codes(model=model_facts(model), method="reward") == []


def test_distillation_vocabulary_and_template_mismatch():
    from honelm.diagnostics.preflight import tokenizer_facts

    student = tiny_tokenizer()
    same = tokenizer_facts(tiny_tokenizer())
    other = tokenizer_facts(tiny_tokenizer(vocab_size=2000, chat_template="{{ messages }}"))
    facts = tokenizer_facts(student)
    assert codes(tokenizer=facts, teacher=same, chat_template=student.chat_template) == []
    found = codes(tokenizer=facts, teacher=other, chat_template=student.chat_template)
    assert found == ["DISTILL_VOCAB_MISMATCH", "DISTILL_TEMPLATE_MISMATCH"]


def test_moe_without_router_loss(tok):
    from transformers import AutoModelForCausalLM

    config = tiny_config("qwen2_moe", tokenizer=tok)
    config.output_router_logits = False
    facts = model_facts(AutoModelForCausalLM.from_config(config))
    assert facts["num_experts"] == config.num_experts and facts["output_router_logits"] is False
    finding = one("MOE_AUX_LOSS_OFF", config={"model_init_kwargs": None}, model=facts)
    suggested = [(s.param, s.proposed) for s in finding.suggestions]
    assert suggested == [("model_init_kwargs", {"output_router_logits": True})]
    assert codes(model={**facts, "output_router_logits": True}) == []


def test_stop_tokens_of_a_real_tokenizer(tok):
    ids = stop_token_ids(tok, {"eos_token": None})
    names = {tok.convert_ids_to_tokens(i) for i in ids}
    assert names == {"<|im_end|>", "<|endoftext|>"}  # EOS and end-of-text; not pad, bos, im_start


def test_sample_rows_spreads_over_the_dataset():
    data = Dataset.from_dict({"input_ids": [[i, EOS] for i in range(5000)], "text": ["x"] * 5000})
    rows, indices, length = sample_rows(data, max_rows=100)
    assert length == 5000 and len(rows) == 100 and indices[0] == 0 and indices[-1] >= 4900
    assert rows[1] == {"input_ids": [indices[1], EOS]}  # only token columns
    stream_rows, _, unknown = sample_rows(data.to_iterable_dataset(), max_rows=10)
    assert unknown is None and len(stream_rows) == 10


def test_preflight_input_on_a_real_conversational_dataset(tok):
    data, stats = tokenize_dataset(arithmetic_dataset(n=40), tok, max_length=64)
    data_input = preflight_input({"max_length": 64, "per_device_train_batch_size": 8}, dataset=data, tokenizer=tok,
                                 truncation_stats=stats, collator=DataCollatorForLanguageModeling(tok.pad_token_id))
    assert len(data_input.rows) == 40 and data_input.truncation["num_rows"] == 40
    assert data_input.decode([tok.eos_token_id]) == "<|im_end|>"
    assert preflight_findings(data_input, TH) == []
