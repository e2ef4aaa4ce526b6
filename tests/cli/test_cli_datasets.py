"""The --dataset_name argument: local files, directories, saved datasets and Hub ids."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import pytest

from honelm.cli import datasets as cli_datasets
from honelm.cli.datasets import DatasetArgError, load_dataset_arg


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the `datasets` cache of these tests out of the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def _texts(dataset: Any) -> list[str]:
    return list(dataset["text"])


def test_one_jsonl_file(tmp_path: Path, write_jsonl: Callable[..., Path], text_rows: Callable[..., list]) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", text_rows(3))
    dataset = load_dataset_arg(str(path))
    assert isinstance(dataset, datasets.Dataset)
    assert _texts(dataset) == [r["text"] for r in text_rows(3)]
    assert list(load_dataset_arg(str(path), split=None)) == ["train"]


def test_several_files_comma_separated_and_glob(tmp_path: Path, write_jsonl: Callable[..., Path],
                                                text_rows: Callable[..., list]) -> None:
    a = write_jsonl(tmp_path / "data" / "a.jsonl", text_rows(2))
    b = write_jsonl(tmp_path / "data" / "b.jsonl", text_rows(3, start=2))
    expected = [r["text"] for r in text_rows(5)]
    assert _texts(load_dataset_arg(f"{a},{b}")) == expected
    assert _texts(load_dataset_arg(str(tmp_path / "data" / "*.jsonl"))) == expected


@pytest.mark.parametrize("suffix", [".json", ".parquet", ".csv"])
def test_other_file_formats(tmp_path: Path, suffix: str, text_rows: Callable[..., list]) -> None:
    table = datasets.Dataset.from_list(text_rows(4))
    path = tmp_path / f"rows{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(text_rows(4)))  # a JSON array of objects
    elif suffix == ".parquet":
        table.to_parquet(str(path))
    else:
        table.to_csv(str(path), index=False)
    assert _texts(load_dataset_arg(str(path))) == _texts(table)


def test_saved_dataset_dict_and_dataset(tmp_path: Path, text_rows: Callable[..., list]) -> None:
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(text_rows(3)),
                                   "test": datasets.Dataset.from_list(text_rows(2, start=10))})
    splits.save_to_disk(str(tmp_path / "dict"))
    assert _texts(load_dataset_arg(str(tmp_path / "dict"), split="test")) == _texts(splits["test"])
    assert set(load_dataset_arg(str(tmp_path / "dict"), split=None)) == {"train", "test"}
    splits["test"].save_to_disk(str(tmp_path / "single"))
    assert _texts(load_dataset_arg(str(tmp_path / "single"))) == _texts(splits["test"])
    with pytest.raises(DatasetArgError, match=r"no split 'test'; its splits are: 'train'"):
        load_dataset_arg(str(tmp_path / "single"), split="test")


def test_directory_of_data_files_gets_splits_from_names(tmp_path: Path, write_jsonl: Callable[..., Path],
                                                        text_rows: Callable[..., list]) -> None:
    write_jsonl(tmp_path / "d" / "train.jsonl", text_rows(3))
    write_jsonl(tmp_path / "d" / "test.jsonl", text_rows(2, start=7))
    loaded = load_dataset_arg(str(tmp_path / "d"), split=None)
    assert _texts(loaded["train"]) == [r["text"] for r in text_rows(3)]
    assert _texts(loaded["test"]) == [r["text"] for r in text_rows(2, start=7)]


def test_missing_split_lists_the_splits(tmp_path: Path, write_jsonl: Callable[..., Path],
                                        text_rows: Callable[..., list]) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", text_rows(2))
    with pytest.raises(DatasetArgError, match=r"has no split 'validation'; its splits are: 'train'"):
        load_dataset_arg(str(path), split="validation")


def test_errors_say_what_was_looked_for(tmp_path: Path, write_jsonl: Callable[..., Path],
                                        text_rows: Callable[..., list]) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DatasetArgError, match=rf"no such file or directory \(looked for {missing}\)"):
        load_dataset_arg(str(missing))
    with pytest.raises(DatasetArgError, match=r"'.*a\.jsonl' not found \(looked for"):
        load_dataset_arg(f"{tmp_path / 'a.jsonl'},{tmp_path / 'b.jsonl'}")
    with pytest.raises(DatasetArgError, match="no file matches this pattern"):
        load_dataset_arg(str(tmp_path / "*.parquet"))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(DatasetArgError, match=r"extension '\.txt'.*supported: \.jsonl, \.json, \.parquet, \.csv"):
        load_dataset_arg(str(text))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetArgError, match="holds neither a dataset saved with `save_to_disk`"):
        load_dataset_arg(str(tmp_path / "empty"))
    path = write_jsonl(tmp_path / "rows.jsonl", text_rows(1))
    with pytest.raises(DatasetArgError, match="--dataset_config 'x' applies to Hub datasets"):
        load_dataset_arg(str(path), config="x")


def test_hub_id_is_forwarded_to_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    fake = datasets.Dataset.from_list([{"text": "hub row"}])

    def load_dataset(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs))
        return fake

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert load_dataset_arg("some-org/some-data", "subset", split="train") is fake
    assert calls == [(("some-org/some-data", "subset"), {"split": "train"})]


def test_hub_failure_explains_that_no_local_path_matched(monkeypatch: pytest.MonkeyPatch) -> None:
    def load_dataset(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(DatasetArgError, match=r"is not a local file or directory .* Hub id, which failed: "
                                              r"ConnectionError: offline"):
        cli_datasets.load_dataset_arg("some-org/some-data")
