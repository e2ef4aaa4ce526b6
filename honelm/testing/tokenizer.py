"""A real byte-level BPE tokenizer, trained locally on text shipped with honelm."""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

# Byte-level BPE covers every string, so there is no unknown token.
BOS = "<|bos|>"
EOS = "<|im_end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS: dict[str, str] = {
    "bos_token": BOS,
    "eos_token": EOS,
    "pad_token": PAD,
    "im_start": "<|im_start|>",
    "endoftext": "<|endoftext|>",
}
# Atomic tokens that decode as text (like Qwen's tool and reasoning tags).
_ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<think>", "</think>"]

# ChatML-style template. Assistant turns sit inside {% generation %} blocks so that
# `return_assistant_tokens_mask=True` marks exactly the tokens the model should learn,
# including the closing <|im_end|> (the model must learn to stop). Accepts `tools`.
CHAT_TEMPLATE = (
    "{%- if bos_token is defined and bos_token and add_bos_in_template is defined"
    " and add_bos_in_template %}{{- bos_token }}{%- endif %}"
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more of these functions:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nTo call a function, answer with <tool_call>{\"name\": NAME,"
    " \"arguments\": ARGS}</tool_call>.<|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}"
    "{%- if not loop.first %}{{- raise_exception('A system message may only come first.') }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}"
    "{%- if message['content'] is defined and message['content'] %}{{- message['content'] }}{%- endif %}"
    "{%- if message['tool_calls'] is defined and message['tool_calls'] %}"
    "{%- for call in message['tool_calls'] %}"
    "{%- if call['function'] is defined %}{%- set fn = call['function'] %}{%- else %}{%- set fn = call %}{%- endif %}"
    "{%- if fn['arguments'] is string %}{%- set args = fn['arguments'] %}"
    "{%- else %}{%- set args = fn['arguments'] | tojson %}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' + fn['name'] + '\", \"arguments\": ' + args + '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>' }}"
    "{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|im_start|>tool\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _corpus_lines() -> list[str]:
    text = resources.files("honelm.testing").joinpath("corpus.txt").read_text(encoding="utf-8")
    return text.splitlines()


@functools.lru_cache(maxsize=8)
def _trained_tokenizer_json(vocab_size: int) -> str:
    """Train byte-level BPE on the shipped corpus once per process and vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [PAD, EOS, SPECIAL_TOKENS["im_start"], SPECIAL_TOKENS["endoftext"], BOS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(_ADDED_TOKENS),
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(
    *,
    vocab_size: int = 3000,
    add_bos: bool = False,
    chat_template: bool | str = True,
    model_max_length: int = 4096,
) -> Any:
    """Build a real fast tokenizer (``transformers`` BPE backend), trained locally.

    Args:
        vocab_size: Size of the trained vocabulary, special tokens included. The shipped
            corpus supports up to about 3100.
        add_bos: Whether plain ``tokenizer(text)`` prepends ``<|bos|>`` (Llama style) and the
            chat template starts with it. Off by default (Qwen style, no BOS).
        chat_template: ``True`` for the built-in ChatML template with ``{% generation %}``
            markers and tool support, ``False`` for none, or a template string.
        model_max_length: Recorded on the tokenizer like a hub model's.

    Special tokens: ``<|im_end|>`` is EOS (as in chat models: it ends every turn),
    ``<|pad|>`` is a distinct pad token, ``<|bos|>`` is BOS, ``<|im_start|>`` opens a turn.
    """
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_trained_tokenizer_json(vocab_size))
    if add_bos:
        bos_id = backend.token_to_id(BOS)
        backend.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
                ),
            ]
        )
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)

    if chat_template is True:
        template: str | None = CHAT_TEMPLATE
    elif chat_template is False:
        template = None
    else:
        template = chat_template
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[SPECIAL_TOKENS["im_start"], SPECIAL_TOKENS["endoftext"]],
        model_max_length=model_max_length,
        padding_side="right",
        chat_template=template,
    )
    tokenizer.add_tokens(_ADDED_TOKENS)
    # The template only emits BOS when asked; wire it to the tokenizer's own behaviour.
    tokenizer.init_kwargs["add_bos_token"] = add_bos
    if template is not None and add_bos:
        tokenizer.chat_template = "{%- set add_bos_in_template = true %}" + template
    return tokenizer
