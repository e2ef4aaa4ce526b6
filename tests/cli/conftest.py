"""Fixtures for the command-line tests: a tiny saved model and small local datasets."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2 model and tokenizer saved locally, so `--model_name_or_path DIR` works offline."""
    from honelm.testing import tiny_model

    path = tmp_path_factory.mktemp("tiny-model")
    tiny_model("qwen2", save_to=path)
    return path


@pytest.fixture
def write_jsonl() -> Callable[[Path, Iterable[dict[str, Any]]], Path]:
    """Write rows as JSON lines and return the path."""

    def write(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        return path

    return write


@pytest.fixture
def text_rows() -> Callable[..., list[dict[str, Any]]]:
    """``text_rows(n, start=0)``: ``n`` language-modeling rows whose text names their index."""

    def rows(n: int, start: int = 0) -> list[dict[str, Any]]:
        return [{"text": f"row {i} says hello world"} for i in range(start, start + n)]

    return rows
