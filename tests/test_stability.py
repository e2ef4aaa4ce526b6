"""The stability helpers: the experimental warning, deprecation shims and removal checks."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import os
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from honelm import stability
from honelm.stability import (
    DeprecatedField,
    DeprecatedValue,
    Deprecation,
    check_removals,
    deprecated,
    deprecated_fields,
    deprecated_names,
    deprecated_params,
    deprecated_values,
    registered_deprecations,
)

HERE = os.path.abspath(__file__)


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> dict:
    """A private deprecation registry: what a test declares does not leak into others."""
    fresh: dict = {}
    monkeypatch.setattr(stability, "_REGISTRY", fresh)
    return fresh


@contextmanager
def future_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Record every FutureWarning raised in the block (no de-duplication)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found: list[warnings.WarningMessage] = []
        yield found
    found.extend(w for w in caught if issubclass(w.category, FutureWarning))


def line_of(marker: str) -> int:
    """The line number of the (unique) line of this file that contains ``marker``."""
    lines = Path(HERE).read_text().splitlines()
    hits = [number for number, line in enumerate(lines, 1) if marker in line and "line_of(" not in line]
    assert len(hits) == 1, (marker, hits)
    return hits[0]


# --------------------------------------------------------------------------- experimental

_EXPERIMENTAL_SCRIPT = """\
import importlib, json, sys, warnings
import honelm
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import honelm.experimental  # FIRST IMPORT
    import honelm.experimental
    del sys.modules["honelm.experimental"]
    importlib.import_module("honelm.experimental")
print(json.dumps([
    {"exact": w.category is honelm.ExperimentalWarning, "file": w.filename,
     "line": w.lineno, "message": str(w.message)}
    for w in caught
]))
"""


def _run_experimental(tmp_path: Path, env_value: str | None) -> list[dict]:
    script = tmp_path / "uses_experimental.py"
    script.write_text(_EXPERIMENTAL_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "HONELM_SILENCE_EXPERIMENTAL"}
    if env_value is not None:
        env["HONELM_SILENCE_EXPERIMENTAL"] = env_value
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("env_value", [None, "0"])
def test_experimental_import_warns_once_per_process(tmp_path: Path, env_value: str | None) -> None:
    caught = _run_experimental(tmp_path, env_value)
    assert len(caught) == 1, caught  # not again on a second import, nor after sys.modules is cleared
    (warning,) = caught
    assert warning["exact"]
    assert "HONELM_SILENCE_EXPERIMENTAL=1" in warning["message"]
    assert "may change in any release" in warning["message"]
    # It points at the user's import line, not at honelm or the import machinery.
    assert warning["file"] == str(tmp_path / "uses_experimental.py")
    assert warning["line"] == 5


def test_experimental_warning_silenced_by_environment(tmp_path: Path) -> None:
    assert _run_experimental(tmp_path, "1") == []


# --------------------------------------------------------------------------- versions


@pytest.mark.parametrize(
    ("since", "removed_in", "complaint"),
    [
        ("0.2", "0.3", "less than two minor releases"),
        ("0.3", "0.2", "less than two minor releases"),
        ("1.2", "0.9", "less than two minor releases"),
        ("0.2", "0.4.1", "patch or pre-release"),
        ("0.2", "0.4rc1", "patch or pre-release"),
        ("0.2", "0.4.0.dev0", "patch or pre-release"),
        ("0.2", "soon", "not a version number"),
        ("later", "0.4", "not a version number"),
    ],
)
def test_deprecation_windows_follow_the_policy(since: str, removed_in: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint) as error:
        DeprecatedField("max_length", since=since, removed_in=removed_in)
    assert "DeprecatedField('max_length')" in str(error.value)


@pytest.mark.parametrize(("since", "removed_in"), [("0.2", "0.4"), ("0.2", "0.4.0"), ("0.9", "1.0"), ("1.2", "2.0")])
def test_deprecation_windows_accepted(since: str, removed_in: str) -> None:
    assert DeprecatedField("x", since=since, removed_in=removed_in).removed_in == removed_in


def test_check_removals_reports_due_deprecations(registry: dict) -> None:
    due = stability._register(Deprecation("name", "pkg.Old", "pkg.New", "0.2", "0.4", module="pkg"))
    later = stability._register(Deprecation("name", "pkg.Older", None, "0.3", "0.6", module="pkg"))
    assert check_removals("0.3.7") == []
    # Development and pre-releases of 0.4 count as 0.4: the removal is due before release.
    assert check_removals("0.4.0.dev0") == [due]
    assert check_removals("0.4.0rc2") == [due]
    assert check_removals("0.5.1") == [due]
    assert check_removals("1.0") == [due, later]
    assert registered_deprecations() == [due, later]
    assert "pkg.Old (declared in pkg): since 0.2, removed in 0.4" == str(due)


def test_check_removals_defaults_to_the_package_version(registry: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    due = stability._register(Deprecation("name", "pkg.Old", None, "0.2", "0.4", module="pkg"))
    import honelm.version

    monkeypatch.setattr(honelm.version, "__version__", "0.4.0.dev0")
    assert check_removals() == [due]
    monkeypatch.setattr(honelm.version, "__version__", "0.3.0")
    assert check_removals() == []


# --------------------------------------------------------------------------- fields


def _tiny_config_class() -> type:
    @deprecated_fields(
        max_seq_length=DeprecatedField("max_length", since="0.2", removed_in="0.4"),
        use_legacy=DeprecatedField(None, since="0.2", removed_in="0.4"),
    )
    @dataclass
    class TinyConfig:
        max_length: int | None = 1024
        beta: float = 0.1
        tags: list[str] = field(default_factory=list)

    return TinyConfig


def test_deprecated_field_keyword_moves_to_the_new_field(registry: dict) -> None:
    TinyConfig = _tiny_config_class()
    with future_warnings() as caught:
        config = TinyConfig(max_seq_length=64, beta=0.5)  # OLD KEYWORD
    assert config == TinyConfig(max_length=64, beta=0.5)
    (warning,) = caught
    assert str(warning.message) == (
        "TinyConfig.max_seq_length is deprecated since honelm 0.2 and will be removed in "
        "honelm 0.4: use TinyConfig.max_length instead."
    )
    assert (warning.filename, warning.lineno) == (HERE, line_of("# OLD KEYWORD"))
    assert [f.name for f in dataclasses.fields(TinyConfig)] == ["max_length", "beta", "tags"]


def test_deprecated_field_attribute_reads_and_writes_the_new_field(registry: dict) -> None:
    config = _tiny_config_class()(max_length=8)
    with future_warnings() as caught:
        assert config.max_seq_length == 8  # READ OLD
        config.max_seq_length = 16
    assert config.max_length == 16
    assert len(caught) == 2
    assert (caught[0].filename, caught[0].lineno) == (HERE, line_of("# READ OLD"))


def test_deprecated_field_with_both_names_is_an_error(registry: dict) -> None:
    TinyConfig = _tiny_config_class()
    with pytest.raises(TypeError, match="got both 'max_seq_length' \\(deprecated\\) and 'max_length'"):
        with future_warnings():
            TinyConfig(max_seq_length=1, max_length=2)


def test_dropped_field_is_accepted_and_ignored(registry: dict) -> None:
    TinyConfig = _tiny_config_class()
    with future_warnings() as caught:
        config = TinyConfig(use_legacy=True)
    assert config == TinyConfig()
    assert "TinyConfig.use_legacy is deprecated" in str(caught[0].message)
    assert "It has no effect." in str(caught[0].message)


def test_deprecated_fields_survive_subclassing_copying_and_replace(registry: dict) -> None:
    TinyConfig = _tiny_config_class()

    @dataclass
    class UserConfig(TinyConfig):  # a user's subclass gets a fresh dataclass __init__
        extra: int = 3

    with future_warnings() as caught:
        config = UserConfig(max_seq_length=32, extra=4)
    assert (config.max_length, config.extra) == (32, 4)
    assert len(caught) == 1
    # The signature users see is the dataclass one, not the shim's (*args, **kwargs).
    assert list(inspect.signature(TinyConfig).parameters) == ["max_length", "beta", "tags"]
    assert list(inspect.signature(UserConfig).parameters) == ["max_length", "beta", "tags", "extra"]
    assert copy.deepcopy(config) == config  # the protocol pickle uses: cls.__new__(cls) + state
    assert dataclasses.replace(config, beta=0.3).beta == 0.3


def test_deprecated_fields_declaration_errors(registry: dict) -> None:
    spec = DeprecatedField("max_length", since="0.2", removed_in="0.4")

    @dataclass
    class Config:
        max_length: int = 1
        max_seq_length: int = 1

    with pytest.raises(TypeError, match="'max_seq_length' is still a field of"):
        deprecated_fields(max_seq_length=spec)(Config)
    with pytest.raises(TypeError, match="renamed to 'nope', which is not a field"):
        deprecated_fields(old=DeprecatedField("nope", since="0.2", removed_in="0.4"))(Config)
    with pytest.raises(TypeError, match="decorates a dataclass"):
        deprecated_fields(old=spec)(type("NotADataclass", (), {}))


def test_deprecated_fields_on_training_arguments(registry: dict, tmp_path: Path) -> None:
    from transformers import TrainingArguments

    @deprecated_fields(max_seq_length=DeprecatedField("max_length", since="0.2", removed_in="0.4"))
    @dataclass
    class TinySFTConfig(TrainingArguments):
        max_length: int | None = 1024

    with future_warnings() as caught:
        config = TinySFTConfig(output_dir=str(tmp_path), max_seq_length=64, learning_rate=1e-4)
    assert (config.max_length, config.learning_rate) == (64, 1e-4)
    assert len(caught) == 1 and "use TinySFTConfig.max_length" in str(caught[0].message)
    as_dict = config.to_dict()
    assert as_dict["max_length"] == 64 and "max_seq_length" not in as_dict
    assert TinySFTConfig(**{k: as_dict[k] for k in ("output_dir", "max_length")}).max_length == 64


# --------------------------------------------------------------------------- params


def test_deprecated_params_rename_keyword_arguments(registry: dict) -> None:
    class TinyTrainer:
        @deprecated_params(
            tokenizer=DeprecatedField("processing_class", since="0.2", removed_in="0.4"),
            fast=DeprecatedField(None, since="0.2", removed_in="0.4"),
        )
        def __init__(self, model: str, processing_class: Any = None) -> None:
            self.model, self.processing_class = model, processing_class

    with future_warnings() as caught:
        trainer = TinyTrainer("m", tokenizer="tok", fast=True)  # OLD PARAM
    assert (trainer.model, trainer.processing_class) == ("m", "tok")
    assert [str(w.message) for w in caught] == [
        "TinyTrainer(tokenizer=...) is deprecated since honelm 0.2 and will be removed in "
        "honelm 0.4: use TinyTrainer(processing_class=...) instead.",
        "TinyTrainer(fast=...) is deprecated since honelm 0.2 and will be removed in "
        "honelm 0.4. It has no effect.",
    ]
    assert (caught[0].filename, caught[0].lineno) == (HERE, line_of("# OLD PARAM"))
    assert list(inspect.signature(TinyTrainer).parameters) == ["model", "processing_class"]
    with pytest.raises(TypeError, match="got both 'tokenizer' \\(deprecated\\) and 'processing_class'"):
        with future_warnings():
            TinyTrainer("m", tokenizer="b", processing_class="a")
    assert {d.kind for d in registry.values()} == {"param"}


def test_deprecated_params_declaration_errors(registry: dict) -> None:
    def score(x: int, scale: float = 1.0) -> float:
        return x * scale

    with pytest.raises(TypeError, match="'scale' is still a parameter"):
        deprecated_params(scale=DeprecatedField("x", since="0.2", removed_in="0.4"))(score)
    with pytest.raises(TypeError, match="renamed to 'factor', which is not a parameter"):
        deprecated_params(weight=DeprecatedField("factor", since="0.2", removed_in="0.4"))(score)


# --------------------------------------------------------------------------- values


def test_deprecated_values_map_and_warn(registry: dict) -> None:
    loss_types = deprecated_values(
        "TinyConfig.loss_type",
        {"old_sigmoid": DeprecatedValue("sigmoid", since="0.2", removed_in="0.4")},
    )

    def configure(loss_type: Any) -> Any:
        return loss_types(loss_type)

    with future_warnings() as caught:
        assert configure("old_sigmoid") == "sigmoid"  # OLD VALUE
        assert configure("sigmoid") == "sigmoid"
        assert configure(["unhashable"]) == ["unhashable"]
    (warning,) = caught
    assert str(warning.message) == (
        "TinyConfig.loss_type='old_sigmoid' is deprecated since honelm 0.2 and will be "
        "removed in honelm 0.4: use TinyConfig.loss_type='sigmoid' instead."
    )
    assert (warning.filename, warning.lineno) == (HERE, line_of("# OLD VALUE"))
    (declared,) = registry.values()
    assert (declared.kind, declared.module) == ("value", __name__)


# --------------------------------------------------------------------------- names


@pytest.fixture
def make_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str, str], Any]]:
    """Write a module to a temporary directory and import it."""
    monkeypatch.syspath_prepend(str(tmp_path))
    made: list[str] = []

    def make(name: str, source: str) -> Any:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        made.append(name)
        import importlib

        return importlib.import_module(name)

    yield make
    for name in made:
        sys.modules.pop(name, None)


_RENAMED_MODULE = """
    from honelm.stability import DeprecatedName, deprecated_names

    class NewTrainer:
        pass

    __all__ = ["NewTrainer"]

    _DEPRECATED = deprecated_names(__name__, {
        "OldTrainer": DeprecatedName("NewTrainer", since="0.2", removed_in="0.4"),
        "old_dumps": DeprecatedName("json:dumps", since="0.2", removed_in="0.4"),
        "old_loads": DeprecatedName("json.loads", since="0.2", removed_in="0.4"),
    })

    def __getattr__(name):
        return _DEPRECATED.resolve(name)
"""


def test_deprecated_names_resolve_with_a_warning(registry: dict, make_module: Callable) -> None:
    module = make_module("renamed_things", _RENAMED_MODULE)
    with future_warnings() as caught:
        from renamed_things import OldTrainer  # FROM IMPORT
    assert OldTrainer is module.NewTrainer
    (warning,) = caught
    assert str(warning.message) == (
        "renamed_things.OldTrainer is deprecated since honelm 0.2 and will be removed in "
        "honelm 0.4: use renamed_things.NewTrainer instead."
    )
    assert (warning.filename, warning.lineno) == (HERE, line_of("# FROM IMPORT"))
    with future_warnings() as caught:
        assert module.old_dumps is json.dumps  # ATTRIBUTE
        assert module.old_loads is json.loads
    assert (caught[0].filename, caught[0].lineno) == (HERE, line_of("# ATTRIBUTE"))
    assert "use json.dumps instead" in str(caught[0].message)
    with pytest.raises(AttributeError, match="module 'renamed_things' has no attribute 'Missing'"):
        module.Missing
    assert "OldTrainer" in module._DEPRECATED and "NewTrainer" not in module._DEPRECATED
    assert list(module._DEPRECATED) == ["OldTrainer", "old_dumps", "old_loads"]
    assert {d.name for d in registry.values()} == {
        "renamed_things.OldTrainer", "renamed_things.old_dumps", "renamed_things.old_loads"
    }


def test_deprecated_names_reject_a_missing_target(registry: dict) -> None:
    with pytest.raises(TypeError, match="must map to a DeprecatedName with a new name"):
        deprecated_names("pkg", {"Old": DeprecatedField("New", since="0.2", removed_in="0.4")})


# --------------------------------------------------------------------------- callables


def test_deprecated_function_method_and_class(registry: dict) -> None:
    @deprecated(since="0.2", removed_in="0.4", replacement="honelm.ops.selective_logps")
    def old_logps(x: int, scale: int = 2) -> int:
        return x * scale

    class Trainer:
        @deprecated(since="0.3", removed_in="0.5")
        def fit(self) -> str:
            return "fitted"

    @deprecated(since="0.2", removed_in="1.0", note="Write the loop yourself.")
    class Helper:
        def __init__(self, value: int) -> None:
            self.value = value

    with future_warnings() as caught:
        assert old_logps(3) == 6  # CALL OLD
        assert Trainer().fit() == "fitted"
        assert Helper(4).value == 4
    messages = [str(w.message) for w in caught]
    assert messages[0].startswith(f"{__name__}.old_logps is deprecated since honelm 0.2")
    assert messages[0].endswith("removed in honelm 0.4: use honelm.ops.selective_logps instead.")
    assert messages[1] == f"{__name__}.Trainer.fit is deprecated since honelm 0.3 and will be removed in honelm 0.5."
    assert messages[2].endswith("removed in honelm 1.0. Write the loop yourself.")
    assert (caught[0].filename, caught[0].lineno) == (HERE, line_of("# CALL OLD"))
    assert str(inspect.signature(old_logps)) == "(x: 'int', scale: 'int' = 2) -> 'int'"
    assert old_logps._honelm_deprecation.removed_in == "0.4"
    assert len(registry) == 3


def test_promotion_shim_left_in_experimental(registry: dict, make_module: Callable) -> None:
    """The shim STABILITY.md prescribes when a method moves out of experimental/."""
    shim = make_module(
        "promoted_method",
        """
        from honelm.stability import DeprecatedName, deprecated_names

        _MOVED = deprecated_names(__name__, {
            "dumps": DeprecatedName("json:dumps", since="0.3", removed_in="0.5"),
        })
        __getattr__ = _MOVED.resolve
        """,
    )
    with future_warnings() as caught:
        from promoted_method import dumps  # PROMOTED IMPORT
    assert dumps is json.dumps
    (warning,) = caught
    assert "promoted_method.dumps is deprecated since honelm 0.3" in str(warning.message)
    assert "use json.dumps instead" in str(warning.message)
    assert (warning.filename, warning.lineno) == (HERE, line_of("# PROMOTED IMPORT"))
    with pytest.raises(ImportError):
        from promoted_method import loads  # noqa: F401
    assert shim.__name__ == "promoted_method"
