"""Shared fixtures for the data pipeline tests: tiny offline tokenizers and small helpers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest

from honelm.testing import tiny_tokenizer


@pytest.fixture(scope="session")
def tok() -> Any:
    """ChatML tokenizer, EOS ``<|im_end|>``, no BOS."""
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tok_bos() -> Any:
    """Same, but plain encoding and the chat template both start with ``<|bos|>``."""
    return tiny_tokenizer(add_bos=True)


@pytest.fixture(scope="session")
def tok_plain() -> Any:
    """A tokenizer without any chat template."""
    return tiny_tokenizer(chat_template=False)


@pytest.fixture(scope="session")
def masked_text() -> Callable[[Any, Sequence[int], Sequence[int]], str]:
    """Decode only the tokens whose mask value is 1 (special tokens kept)."""

    def decode(tokenizer: Any, ids: Sequence[int], mask: Sequence[int]) -> str:
        assert len(ids) == len(mask), "mask and ids must be aligned"
        return tokenizer.decode([i for i, m in zip(ids, mask) if m])

    return decode
