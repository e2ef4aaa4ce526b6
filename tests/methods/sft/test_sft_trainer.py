"""SFTTrainer: it learns, it masks the right tokens, its fast paths agree, it saves and resumes."""

from __future__ import annotations

import json
import os

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from honelm.data import DatasetFormatError
from honelm.methods.sft import SFTConfig, SFTTrainer
from honelm.testing import answer_accuracy, arithmetic_dataset, tiny_model


def _config(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=1,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        seed=0,
        data_seed=0,
    )
    defaults.update(kwargs)
    return SFTConfig(**defaults)


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _conversations():
    return Dataset.from_dict(
        {
            "messages": [
                [
                    {"role": "system", "content": "You add numbers."},
                    {"role": "user", "content": f"What is {a} + {b}?"},
                    {"role": "assistant", "content": str(a + b)},
                    {"role": "user", "content": "And doubled?"},
                    {"role": "assistant", "content": str(2 * (a + b))},
                ]
                for a, b in [(1, 2), (3, 4), (2, 5), (6, 1)]
            ]
        }
    )


def _hidden_grad_by_position(trainer, batch):
    """Gradient of the loss w.r.t. the final hidden state at each position, (B, T).

    The final hidden state at position t feeds only the prediction made at t, so this is
    nonzero exactly where the loss scores the token at t + 1.
    """
    model = trainer.model
    captured = {}

    def keep(module, args, output):
        output.retain_grad()
        captured["h"] = output

    handle = model.get_decoder().norm.register_forward_hook(keep)
    try:
        model.zero_grad()
        trainer.compute_loss(model, dict(batch)).backward()
    finally:
        handle.remove()
    return captured["h"].grad.abs().sum(-1)  # (B, T)


def test_learns_the_task_and_then_generates_the_answers(tmp_path):
    model, tok = tiny_model(hidden_size=96, intermediate_size=192)
    train = arithmetic_dataset(max_operand=4)  # 25 facts
    before = answer_accuracy(model, tok, train)
    args = _config(
        tmp_path, max_steps=150, per_device_train_batch_size=25, learning_rate=3e-3,
        lr_scheduler_type="constant", logging_steps=10,
    )
    trainer = SFTTrainer(model, args, train_dataset=train, processing_class=tok)
    trainer.train()
    losses = _losses(trainer)
    assert losses[-1] < 0.25 * losses[0], losses
    after = answer_accuracy(trainer.model, tok, train)
    assert before <= 0.2 and after >= 0.9, (before, after)
    logged = trainer.state.log_history[-2]
    for key in ("loss", "mean_token_accuracy", "num_tokens", "entropy", "learning_rate", "grad_norm"):
        assert key in logged, key
    assert logged["mean_token_accuracy"] > 0.9


def test_completion_only_loss_trains_only_completion_tokens(tmp_path):
    model, tok = tiny_model()
    trainer = SFTTrainer(model, _config(tmp_path), train_dataset=arithmetic_dataset(n=4), processing_class=tok)
    examples = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator(examples)
    grad = _hidden_grad_by_position(trainer, batch)
    for row, example in enumerate(examples):
        mask = torch.tensor(example["completion_mask"])
        scored_next = torch.zeros_like(grad[row], dtype=torch.bool)
        scored_next[: len(mask) - 1] = mask[1:].bool()  # position t predicts token t + 1
        assert (grad[row][~scored_next] == 0).all()
        assert (grad[row][scored_next] > 0).all()
        completion = tok.decode([i for i, m in zip(example["input_ids"], example["completion_mask"]) if m])
        assert completion == example_answer(examples, row, tok) + "<|im_end|>"


def example_answer(examples, row, tok):
    text = tok.decode(examples[row]["input_ids"])
    return text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]


def test_completion_only_loss_off_trains_the_prompt_too(tmp_path):
    model, tok = tiny_model()
    args = _config(tmp_path, completion_only_loss=False)
    trainer = SFTTrainer(model, args, train_dataset=arithmetic_dataset(n=2), processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    grad = _hidden_grad_by_position(trainer, batch)
    lengths = batch["attention_mask"].sum(1)
    for row in range(2):
        assert (grad[row, : lengths[row] - 1] > 0).all()


def test_assistant_only_loss_trains_only_assistant_turns(tmp_path):
    model, tok = tiny_model()
    args = _config(tmp_path, assistant_only_loss=True)
    trainer = SFTTrainer(model, args, train_dataset=_conversations(), processing_class=tok)
    examples = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator(examples)
    grad = _hidden_grad_by_position(trainer, batch)
    for row, example in enumerate(examples):
        mask = torch.tensor(example["assistant_masks"])
        scored_next = torch.zeros_like(grad[row], dtype=torch.bool)
        scored_next[: len(mask) - 1] = mask[1:].bool()
        assert (grad[row][~scored_next] == 0).all() and (grad[row][scored_next] > 0).all()
        trained = tok.decode([i for i, m in zip(example["input_ids"], mask.tolist()) if m])
        assert trained.count("<|im_end|>") == 2 and "What is" not in trained and "You add" not in trained


def _full_batch_loss_and_grads(tmp_path, **kwargs):
    model, tok = tiny_model(seed=3)
    data = Dataset.from_dict({"text": [f"Sentence number {i} is " + "very " * i + "long." for i in range(6)]})
    args = _config(tmp_path, per_device_train_batch_size=6, max_length=64, **kwargs)
    trainer = SFTTrainer(model, args, train_dataset=data, processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    model.zero_grad()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, batch


def test_padded_padding_free_and_packed_give_the_same_loss_and_gradients(tmp_path):
    padded, padded_grads, batch = _full_batch_loss_and_grads(tmp_path)
    assert "attention_mask" in batch and batch["input_ids"].shape[0] == 6
    # `wrapped` is left out on purpose: it cuts sequences across rows, which changes the loss.
    for kwargs in ({"padding_free": True}, {"packing": True}, {"packing": True, "packing_strategy": "bfd_split"}):
        loss, grads, batch = _full_batch_loss_and_grads(tmp_path, **kwargs)
        assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
        torch.testing.assert_close(loss, padded, rtol=1e-5, atol=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, padded_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_accumulation_gives_the_same_loss_curve(tmp_path):
    # Rows of different lengths: a per-micro-batch mean would weight tokens differently.
    data = Dataset.from_dict({"text": [f"Item {i}: " + "word " * (1 + i % 5) for i in range(32)]})
    curves, params = [], []
    for bs, ga in ((8, 1), (1, 8), (4, 2)):
        model, tok = tiny_model(seed=1)
        args = _config(
            tmp_path / f"{bs}x{ga}", per_device_train_batch_size=bs, gradient_accumulation_steps=ga, max_steps=3
        )
        trainer = SFTTrainer(model, args, train_dataset=data, processing_class=tok)
        trainer.train()
        curves.append(_losses(trainer))
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert len(curves[0]) == 3
    for curve, p in zip(curves[1:], params[1:]):
        torch.testing.assert_close(torch.tensor(curve), torch.tensor(curves[0]), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(p, params[0], rtol=1e-4, atol=1e-5)


def test_lora_trains_adapters_only_and_base_weights_stay_bit_identical(tmp_path):
    peft = pytest.importorskip("peft")
    model, tok = tiny_model()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    args = _config(tmp_path, max_steps=15, learning_rate=1e-2)
    trainer = SFTTrainer(model, args, train_dataset=arithmetic_dataset(n=32), processing_class=tok, peft_config=config)
    trainer.train()
    losses = _losses(trainer)
    assert losses[-1] < losses[0]
    wrapped = trainer.model
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    moved = [n for n, p in wrapped.named_parameters() if "lora_B" in n and p.abs().sum() > 0]
    assert moved  # lora_B starts at zero: it moved
    for name, param in wrapped.get_base_model().named_parameters():
        if "lora_" in name:
            continue
        original = name.replace(".base_layer", "")
        assert torch.equal(param, base[original]), name


@pytest.mark.parametrize(
    "rows, message",
    [
        ({"question": ["hi"], "answer": ["yo"]}, "column"),
        ({"prompt": ["What is 1 + 1?"], "completion": [""]}, "(?i)row 0.*completion.*empty"),
        ({"messages": [[{"role": "bot", "content": "hi"}]]}, "bot"),
    ],
)
def test_bad_datasets_stop_before_training(tmp_path, rows, message):
    model, tok = tiny_model()
    with pytest.raises(DatasetFormatError, match=message):  # raised by the constructor
        SFTTrainer(model, _config(tmp_path), train_dataset=Dataset.from_dict(rows), processing_class=tok)
    assert not os.path.exists(tmp_path / "out")  # nothing written


def test_resume_from_checkpoint_continues_the_same_loss_curve(tmp_path):
    data = arithmetic_dataset(n=48)
    model, tok = tiny_model(seed=2)
    args = _config(tmp_path, max_steps=6, save_strategy="steps", save_steps=3)
    full = SFTTrainer(model, args, train_dataset=data, processing_class=tok)
    full.train()
    expected = _losses(full)[3:]
    model, tok = tiny_model(seed=2)
    resumed = SFTTrainer(model, args, train_dataset=data, processing_class=tok)
    resumed.train(resume_from_checkpoint=os.path.join(args.output_dir, "checkpoint-3"))
    got = [h["loss"] for h in resumed.state.log_history if "loss" in h and h["step"] > 3]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-4, atol=1e-5)


def test_saved_model_reloads_with_tokenizer_template_and_model_card(tmp_path):
    model, tok = tiny_model()
    args = _config(tmp_path, max_steps=2)
    trainer = SFTTrainer(model, args, train_dataset=arithmetic_dataset(n=16), processing_class=tok)
    trainer.train()
    trainer.save_model()
    out = args.output_dir
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for (name, a), b in zip(trainer.model.named_parameters(), reloaded.parameters()):
        assert torch.equal(a, b), name
    assert AutoTokenizer.from_pretrained(out).chat_template == tok.chat_template
    card = open(os.path.join(out, "README.md")).read()
    assert "SFT" in card and "honelm" in card and "Base model" in card and "Dataset" in card


def test_model_loaded_from_a_path_with_init_kwargs(tmp_path):
    tiny_model("llama", save_to=tmp_path / "base")
    args = _config(tmp_path, max_steps=1, model_init_kwargs={"dtype": "float32", "attn_implementation": "eager"})
    trainer = SFTTrainer(str(tmp_path / "base"), args, train_dataset=arithmetic_dataset(n=8))
    assert type(trainer.model).__name__ == "LlamaForCausalLM"
    assert trainer.model.config._attn_implementation == "eager"
    trainer.train()


def test_dft_loss_trains(tmp_path):
    # DFT's own loss -p*log(p) is not monotone in p (it rises from p ~ 1/V), so check what it
    # is for: the likelihood of the targets rises.
    from honelm.methods.sft.loss import nll_loss
    from honelm.models import last_hidden_states
    from honelm.ops import lm_head_weight_and_bias

    model, tok = tiny_model()
    args = _config(tmp_path, loss_type="dft", max_steps=25, learning_rate=1e-2)
    trainer = SFTTrainer(model, args, train_dataset=arithmetic_dataset(n=32), processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(32)])

    def nll():
        with torch.no_grad():
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            hidden, _ = last_hidden_states(model, **inputs)
            weight, bias = lm_head_weight_and_bias(model)
            return nll_loss(hidden, weight, batch["labels"], bias)[0].item()

    before = nll()
    trainer.train()
    assert nll() < 0.5 * before


def test_moe_router_aux_loss_is_part_of_the_loss(tmp_path):
    model, tok = tiny_model("qwen2_moe")
    trainer = SFTTrainer(model, _config(tmp_path), train_dataset=arithmetic_dataset(n=4), processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with_aux = trainer.compute_loss(model, dict(batch))
    model.config.output_router_logits = False
    without = trainer.compute_loss(model, dict(batch))
    model.config.output_router_logits = True
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    expected = model.config.router_aux_loss_coef * out.aux_loss
    torch.testing.assert_close(with_aux - without, expected, rtol=1e-4, atol=1e-6)


def test_eval_metrics_are_prefixed(tmp_path):
    model, tok = tiny_model()
    args = _config(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=2)
    trainer = SFTTrainer(
        model, args, train_dataset=arithmetic_dataset(n=16), eval_dataset=arithmetic_dataset(n=8, seed=1),
        processing_class=tok,
    )
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert evals and {"eval_mean_token_accuracy", "eval_entropy", "eval_num_tokens"} <= set(evals[0])
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(not k.startswith("eval_") for h in train_logs for k in h)


def test_config_rejects_unknown_choices(tmp_path):
    with pytest.raises(ValueError, match="packing_strategy"):
        _config(tmp_path, packing_strategy="greedy")
    with pytest.raises(ValueError, match="needs `max_length`"):
        _config(tmp_path, packing=True, max_length=None)


def test_eos_and_pad_token_must_exist(tmp_path):
    model, tok = tiny_model()
    with pytest.raises(ValueError, match="eos_token"):
        SFTTrainer(model, _config(tmp_path, eos_token="<nope>"), train_dataset=arithmetic_dataset(n=4), processing_class=tok)


def test_log_history_is_json_serializable(tmp_path):
    model, tok = tiny_model()
    trainer = SFTTrainer(model, _config(tmp_path, max_steps=2), train_dataset=arithmetic_dataset(n=16), processing_class=tok)
    trainer.train()
    json.dumps(trainer.state.log_history)


def test_activation_offloading_gives_the_same_loss_and_gradients(tmp_path):
    plain, plain_grads, _ = _full_batch_loss_and_grads(tmp_path)
    model, tok = tiny_model(seed=3)
    data = Dataset.from_dict({"text": [f"Sentence number {i} is " + "very " * i + "long." for i in range(6)]})
    args = _config(tmp_path, per_device_train_batch_size=6, max_length=64, activation_offloading=True)
    trainer = SFTTrainer(model, args, train_dataset=data, processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
    with trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(model, batch)
    loss.backward()
    torch.testing.assert_close(loss.detach(), plain)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, plain_grads[name], msg=name)


def test_skip_prepare_dataset_uses_tokenized_rows_as_given(tmp_path):
    model, tok = tiny_model()
    ids = tok("What is 2 + 2? 4", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    mask = [0] * (len(ids) - 2) + [1, 1]
    data = Dataset.from_dict({"input_ids": [ids] * 4, "completion_mask": [mask] * 4})
    args = _config(tmp_path, max_steps=10, dataset_kwargs={"skip_prepare_dataset": True})
    trainer = SFTTrainer(model, args, train_dataset=data, processing_class=tok)
    assert trainer.train_dataset is data
    batch = trainer.data_collator([data[0]])
    assert (batch["labels"][0] != -100).sum() == 2  # completion_only_loss from the mask
    trainer.train()
    assert _losses(trainer)[-1] < _losses(trainer)[0]


def test_formatting_func_builds_text_from_other_columns(tmp_path):
    model, tok = tiny_model()
    data = Dataset.from_dict({"question": ["What is 1 + 1?", "What is 2 + 3?"], "answer": ["2", "5"]})
    args = _config(tmp_path, max_steps=1)
    trainer = SFTTrainer(
        model, args, train_dataset=data, processing_class=tok,
        formatting_func=lambda row: f"Q: {row['question']} A: {row['answer']}",
    )
    assert tok.decode(trainer.train_dataset[0]["input_ids"]) == "Q: What is 1 + 1? A: 2<|im_end|>"
    trainer.train()


def test_iterable_dataset_trains(tmp_path):
    model, tok = tiny_model()
    stream = arithmetic_dataset(n=64).to_iterable_dataset()
    trainer = SFTTrainer(model, _config(tmp_path, max_steps=12), train_dataset=stream, processing_class=tok)
    trainer.train()
    assert trainer.state.global_step == 12 and _losses(trainer)[-1] < _losses(trainer)[0]


def test_chat_template_path_replaces_the_template_and_is_saved(tmp_path):
    model, _ = tiny_model()
    from honelm.testing import tiny_tokenizer

    tok = tiny_tokenizer(chat_template=False)
    template = tmp_path / "template.jinja"
    template.write_text(
        "{% for m in messages %}{{ m['role'] }}: {% if m['role'] == 'assistant' %}{% generation %}"
        "{{ m['content'] }}<|im_end|>{% endgeneration %}{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}"
    )
    args = _config(tmp_path, max_steps=1, chat_template_path=str(template), assistant_only_loss=True)
    trainer = SFTTrainer(model, args, train_dataset=_conversations(), processing_class=tok)
    row = trainer.train_dataset[0]
    trained = tok.decode([i for i, m in zip(row["input_ids"], row["assistant_masks"]) if m])
    assert trained.replace(" ", "") == "3<|im_end|>6<|im_end|>"  # " 3" is one BPE token
    trainer.train()
    trainer.save_model()
    assert AutoTokenizer.from_pretrained(args.output_dir).chat_template == template.read_text()


def test_assistant_only_loss_without_generation_markers_is_a_clear_error(tmp_path):
    from honelm.data import ChatTemplateError

    model, _ = tiny_model()
    from honelm.testing import tiny_tokenizer

    tok = tiny_tokenizer(chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ChatTemplateError, match="generation"):
        SFTTrainer(model, _config(tmp_path, assistant_only_loss=True), train_dataset=_conversations(), processing_class=tok)
