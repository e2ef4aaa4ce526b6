"""Offline test kit: tiny tokenizers and models built locally, never downloaded.

Nothing here touches a model hub, so ours and users' test suites run on machines
without network access::

    from honelm.testing import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()                    # real fast BPE tokenizer, ChatML template
    model, tokenizer = tiny_model("qwen2")          # ~300k-parameter Qwen2ForCausalLM
    model, tokenizer = tiny_model("llama", save_to=tmp_path)   # from_pretrained(tmp_path) works

``arithmetic_dataset`` is a small learnable task with verifiable answers (prompt-completion
rows plus an ``answer`` column) and ``answer_accuracy`` measures a model on it by greedy decoding.

Everything is deterministic under ``seed`` and takes well under a second to build.
"""

from __future__ import annotations

from .models import SUPPORTED_ARCHS, tiny_config, tiny_model
from .tasks import answer_accuracy, arithmetic_dataset, first_number, generate_answers
from .tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, tiny_tokenizer

__all__ = [
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "SUPPORTED_ARCHS",
    "answer_accuracy",
    "arithmetic_dataset",
    "first_number",
    "generate_answers",
    "tiny_config",
    "tiny_model",
    "tiny_tokenizer",
]
