"""The ``--dataset_name`` argument: a Hub id, a saved dataset, a directory or data files.

``load_dataset_arg`` tells the kinds apart in this order:

1. comma-separated entries or a glob pattern (``*``, ``?``, ``[``): local data files;
2. an existing directory: a dataset saved with ``save_to_disk`` (it holds ``dataset_dict.json``,
   ``state.json`` or ``dataset_info.json`` next to ``.arrow`` files), else a directory of data files;
3. an existing file: one data file (``.jsonl``, ``.json``, ``.parquet``, ``.csv``);
4. something that looks like a path (a data-file extension, or starting with ``.``, ``/`` or
   ``~``) but does not exist: an error saying where it was looked for;
5. anything else: a Hugging Face Hub id, loaded with ``datasets.load_dataset``.

Data files (and a single saved ``Dataset``) form one split named ``train``; a directory of
data files gets its splits from the file names (``train.jsonl``, ``test.jsonl``, ...).
"""

from __future__ import annotations

import glob
import os
from typing import Any

# Extension -> the `datasets` builder that reads it.
DATA_EXTENSIONS: dict[str, str] = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_GLOB_CHARS = ("*", "?", "[")


class DatasetArgError(ValueError):
    """The dataset argument names nothing that can be loaded; the message says what was looked for."""


def load_dataset_arg(name_or_path: str, config: str | None = None, split: str | None = "train") -> Any:
    """Load the dataset named by a ``--dataset_name`` value.

    Args:
        name_or_path: A Hub id, a local directory or one or more local data files
            (comma-separated, globs allowed).
        config: The configuration (subset) of a Hub dataset, or of a local directory whose
            README declares configurations. Not accepted for data files or saved datasets.
        split: The split to return; ``None`` returns the whole ``DatasetDict``.

    Returns:
        A ``datasets.Dataset`` (``split`` given) or ``datasets.DatasetDict`` (``split=None``).
    """
    if not name_or_path or not str(name_or_path).strip():
        raise DatasetArgError("The dataset name is empty: pass a Hub id, a directory or data files.")
    name_or_path = str(name_or_path).strip()
    local = os.path.expanduser(name_or_path)
    if "," in name_or_path or any(c in name_or_path for c in _GLOB_CHARS):
        dataset = _load_files(_expand_files(name_or_path), config, name_or_path)
    elif os.path.isdir(local):
        dataset = _load_directory(local, config)
    elif os.path.isfile(local):
        dataset = _load_files([local], config, name_or_path)
    elif _looks_like_path(name_or_path):
        raise DatasetArgError(
            f"Dataset {name_or_path!r}: no such file or directory (looked for {os.path.abspath(local)})."
        )
    else:
        return _load_hub(name_or_path, config, split)
    return dataset if split is None else select_split(dataset, split, name_or_path)


def select_split(dataset_dict: Any, split: str, source: str) -> Any:
    """``dataset_dict[split]``, or an error listing the splits there are."""
    if split in dataset_dict:
        return dataset_dict[split]
    available = ", ".join(repr(s) for s in dataset_dict) or "none"
    raise DatasetArgError(
        f"Dataset {source!r} has no split {split!r}; its splits are: {available}. "
        "Choose one with --dataset_train_split / --dataset_test_split."
    )


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~"))
        or os.path.isabs(name)
        or os.path.splitext(name)[1].lower() in DATA_EXTENSIONS
        or name.count("/") > 1
    )


def _expand_files(spec: str) -> list[str]:
    """The files named by comma-separated paths and glob patterns, each entry checked."""
    files: list[str] = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        path = os.path.expanduser(entry)
        if any(c in entry for c in _GLOB_CHARS):
            matches = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DatasetArgError(f"Dataset files {entry!r}: no file matches this pattern "
                                      f"(looked in {os.path.abspath(os.path.dirname(path) or '.')}).")
            files.extend(matches)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise DatasetArgError(f"Dataset file {entry!r} not found (looked for {os.path.abspath(path)}).")
    if not files:
        raise DatasetArgError(f"Dataset {spec!r} names no file.")
    return files


def _builder_for(files: list[str]) -> str:
    builders = set()
    for path in files:
        ext = os.path.splitext(path)[1].lower()
        if ext not in DATA_EXTENSIONS:
            raise DatasetArgError(f"Dataset file {path!r} has the extension {ext or '(none)'!r}, which cannot be "
                                  f"read; supported: {', '.join(DATA_EXTENSIONS)}.")
        builders.add(DATA_EXTENSIONS[ext])
    if len(builders) > 1:
        raise DatasetArgError(f"Dataset files mix formats ({', '.join(sorted(builders))}): "
                              "give files of one format.")
    return builders.pop()


def _load_files(files: list[str], config: str | None, source: str) -> Any:
    import datasets

    if config is not None:
        raise DatasetArgError(f"--dataset_config {config!r} applies to Hub datasets; {source!r} is local data files.")
    return datasets.load_dataset(_builder_for(files), data_files={"train": files})


def _is_saved_dataset(path: str) -> bool:
    names = set(os.listdir(path))
    if "dataset_dict.json" in names or "state.json" in names:
        return True
    return "dataset_info.json" in names and any(n.endswith(".arrow") for n in names)


def _load_directory(path: str, config: str | None) -> Any:
    import datasets

    if _is_saved_dataset(path):
        if config is not None:
            raise DatasetArgError(f"--dataset_config {config!r} does not apply to {path!r}, a dataset saved "
                                  "with `save_to_disk`.")
        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.Dataset):
            return datasets.DatasetDict({"train": loaded})  # one saved Dataset: the train split
        return loaded
    found = [p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True)
             if os.path.splitext(p)[1].lower() in DATA_EXTENSIONS]
    if not found:
        raise DatasetArgError(
            f"Directory {path!r} holds neither a dataset saved with `save_to_disk` (dataset_dict.json, "
            f"state.json or dataset_info.json) nor data files ({', '.join(DATA_EXTENSIONS)})."
        )
    return datasets.load_dataset(path, name=config)


def _load_hub(name: str, config: str | None, split: str | None) -> Any:
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as e:  # the Hub's errors, with what we tried first
        raise DatasetArgError(
            f"Dataset {name!r} is not a local file or directory (looked for {os.path.abspath(name)}), so it was "
            f"loaded as a Hugging Face Hub id, which failed: {type(e).__name__}: {e}"
        ) from e
