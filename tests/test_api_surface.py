"""The stable API contract (STABILITY.md).

The first tests hold the real package to the committed files: the live surface equals
``tests/api_snapshot.json``; nothing released was removed without a deprecation; every
change since the release is named in CHANGELOG.md; no removal is overdue. The rest plant
changes in small throwaway packages and check that the checker catches them.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import honelm
from honelm import _surface, stability
from honelm._surface import (
    CHANGELOG_FILE,
    RELEASED_FILE,
    SNAPSHOT_FILE,
    UPDATE_COMMAND,
    Surface,
    changelog_message,
    collect_surface,
    diff_surfaces,
    empty_surface,
    load,
    modules_without_all,
    overdue_in_source,
    removal_problems,
    render,
    snapshot_message,
    unmentioned_changes,
    unreleased_notes,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def live() -> Surface:
    surface, _notes = collect_surface()
    return surface


# --------------------------------------------------------------------------- the real package


def test_snapshot_matches_live_surface(live: Surface) -> None:
    changes = diff_surfaces(load(ROOT / SNAPSHOT_FILE), live)
    assert not changes, snapshot_message(changes)


def test_snapshot_file_is_written_by_the_update_command() -> None:
    text = (ROOT / SNAPSHOT_FILE).read_text(encoding="utf-8")
    assert text == render(json.loads(text)), f"{SNAPSHOT_FILE} was edited by hand; run `{UPDATE_COMMAND}`."


def test_no_removal_without_deprecation(live: Surface) -> None:
    problems = removal_problems(load(ROOT / RELEASED_FILE), live, live["version"])
    assert not problems, "\n".join(problems)


def test_changelog_names_every_change_since_the_release(live: Surface) -> None:
    path = ROOT / CHANGELOG_FILE
    assert path.is_file(), f"{CHANGELOG_FILE} is missing; create it with a '## [Unreleased]' section."
    missing = unmentioned_changes(load(ROOT / RELEASED_FILE), live, path.read_text(encoding="utf-8"))
    assert not missing, changelog_message(missing)


def test_stable_modules_declare_all() -> None:
    missing = modules_without_all()
    assert not missing, (
        "These stable modules define public names but no __all__, so the snapshot does not "
        f"cover them: {'; '.join(missing)}. Add __all__ listing their stable names."
    )


def test_no_overdue_deprecations(live: Surface) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        experimental = importlib.import_module("honelm.experimental")
        for module in pkgutil.iter_modules(experimental.__path__, "honelm.experimental."):
            importlib.import_module(module.name)  # promotion shims live there
    overdue = [str(d) for d in stability.check_removals(honelm.__version__)]
    overdue += overdue_in_source(ROOT, honelm.__version__)
    assert not overdue, (
        f"honelm {honelm.__version__} has reached the removal version of:\n  "
        + "\n  ".join(overdue)
        + f"\nRemove the old spelling and its shim, run `{UPDATE_COMMAND}` and note the "
        "removal in CHANGELOG.md."
    )


# --------------------------------------------------------------------------- planted packages


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> dict:
    """A private deprecation registry: what a test declares does not leak into others."""
    fresh: dict = {}
    monkeypatch.setattr(stability, "_REGISTRY", fresh)
    return fresh


@pytest.fixture
def fake_api(tmp_path: Path, registry: dict) -> Iterator[Callable[..., Surface]]:
    """Collect the surface of a throwaway package ``fakeapi`` written from a template.

    Each call writes a new version in its own directory, so the module name (and the
    snapshot keys) stay the same from one version to the next.
    """
    versions = iter(range(1000))

    def collect(source: str, **fill: Any) -> Surface:
        directory = tmp_path / f"v{next(versions)}"
        directory.mkdir()
        (directory / "fakeapi.py").write_text(textwrap.dedent(source).format(**fill))
        sys.modules.pop("fakeapi", None)
        registry.clear()  # a fresh process: only this version's declarations
        sys.path.insert(0, str(directory))
        try:
            surface, notes = collect_surface(("fakeapi",))
        finally:
            sys.path.remove(str(directory))
        assert notes == []
        return surface

    yield collect
    sys.modules.pop("fakeapi", None)


FAKE_API = """
from __future__ import annotations

from dataclasses import dataclass, field

from honelm.stability import (
    DeprecatedField, DeprecatedName, deprecated, deprecated_fields, deprecated_names,
    deprecated_params,
)

__all__ = ["TinyConfig", "TinyTrainer", "score", "LIMITS", "__version__"]
__version__ = "9.9"


@deprecated_fields({field_renames})
@dataclass
class TinyConfig:
    max_length: int | None = {max_length}
    {beta_field}
    tags: list[str] = field(default_factory=lambda: ["a"])


class TinyTrainer:
    @deprecated_params(tokenizer=DeprecatedField("processing_class", since="0.2", removed_in="0.4"))
    def __init__(self, model, processing_class=None, *, args: TinyConfig | None = None):
        self.model = model

    def train(self, resume: bool = False) -> None:
        pass

    @property
    def state(self) -> dict:
        return {{}}

    @deprecated(since="0.2", removed_in="0.4", replacement="TinyTrainer.train")
    def fit(self) -> None:
        pass


def score(x, *, sentinel=object(), scale: float = 1.0) -> float:
    return x * scale


LIMITS = frozenset({{"b", "a", "c"}})

_DEPRECATED = deprecated_names(__name__, {{
    "OldTrainer": DeprecatedName("TinyTrainer", since="0.2", removed_in="0.4"),
}})


def __getattr__(name):
    return _DEPRECATED.resolve(name)
"""

V1 = {"field_renames": "", "max_length": 1024, "beta_field": "beta: float = 0.1"}


def test_collector_records_names_signatures_fields_and_deprecations(fake_api: Callable) -> None:
    surface = fake_api(FAKE_API, **V1)
    entries = surface["entries"]
    assert sorted(entries) == [
        "fakeapi.LIMITS", "fakeapi.TinyConfig", "fakeapi.TinyTrainer", "fakeapi.__version__", "fakeapi.score"
    ]
    assert entries["fakeapi.TinyConfig"]["fields"] == {
        "max_length": "int | None = 1024",
        "beta": "float = 0.1",
        "tags": "list[str] = ['a']",  # default_factory: the value it produces
    }
    trainer = entries["fakeapi.TinyTrainer"]
    assert trainer["signature"] == "(model, processing_class=None, *, args: TinyConfig | None = None)"
    assert trainer["parameters"] == ["model", "processing_class", "args"]
    assert trainer["members"] == {
        "fit": "method (self) -> None",
        "state": "property (read-only)",
        "train": "method (self, resume: bool = False) -> None",
    }
    # No memory address, sets in sorted order: the same text in every process.
    assert entries["fakeapi.score"]["signature"] == "(x, *, sentinel=<object object>, scale: float = 1.0) -> float"
    assert entries["fakeapi.LIMITS"] == {"kind": "constant", "type": "frozenset", "value": "frozenset({'a', 'b', 'c'})"}
    assert entries["fakeapi.__version__"] == {"kind": "constant", "type": "str"}
    assert surface["deprecations"] == {
        "fakeapi.OldTrainer": {"kind": "name", "replacement": "fakeapi.TinyTrainer", "since": "0.2", "removed_in": "0.4"},
        "fakeapi.TinyTrainer(tokenizer)": {
            "kind": "param", "replacement": "TinyTrainer(processing_class=...)", "since": "0.2", "removed_in": "0.4"
        },
        "fakeapi.TinyTrainer.fit": {
            "kind": "method", "replacement": "TinyTrainer.train", "since": "0.2", "removed_in": "0.4"
        },
    }


def test_collected_surface_is_the_same_in_every_process(tmp_path: Path) -> None:
    (tmp_path / "fakeapi.py").write_text(textwrap.dedent(FAKE_API).format(**V1))
    code = "from honelm._surface import collect_surface, render; print(render(collect_surface(('fakeapi',))[0]))"
    outputs = []
    for seed in ("1", "2"):  # string hashing, and so set order, differs between the two
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(tmp_path)}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout)
    assert outputs[0] == outputs[1]
    assert "frozenset({'a', 'b', 'c'})" in outputs[0]


def test_planted_breaking_change_is_reported(fake_api: Callable) -> None:
    released = fake_api(FAKE_API, **V1)
    live = fake_api(FAKE_API, field_renames="", max_length=2048, beta_field="kl_coef: float = 0.1")
    changes = {(c.action, c.key) for c in diff_surfaces(released, live)}
    assert changes == {
        ("changed", "fakeapi.TinyConfig.max_length"),
        ("removed", "fakeapi.TinyConfig.beta"),
        ("added", "fakeapi.TinyConfig.kl_coef"),
    }
    message = snapshot_message(diff_surfaces(released, live))
    assert "~ fakeapi.TinyConfig.max_length: int | None = 1024  ->  int | None = 2048" in message
    assert "- fakeapi.TinyConfig.beta: float = 0.1" in message
    assert "+ fakeapi.TinyConfig.kl_coef: float = 0.1" in message
    assert UPDATE_COMMAND in message and "CHANGELOG.md" in message
    problems = removal_problems(released, live, "0.3.0")
    assert len(problems) == 1 and problems[0].startswith("fakeapi.TinyConfig.beta: removed without a deprecation")


def test_planted_removal_through_a_deprecation_is_allowed(fake_api: Callable) -> None:
    released = fake_api(FAKE_API, **V1)
    renamed = 'beta=DeprecatedField("kl_coef", since="0.3", removed_in="0.5")'
    live = fake_api(FAKE_API, field_renames=renamed, max_length=1024, beta_field="kl_coef: float = 0.1")
    assert live["deprecations"]["fakeapi.TinyConfig.beta"]["removed_in"] == "0.5"
    assert removal_problems(released, live, "0.3.0.dev0") == []
    # Once released with its deprecation, the field may go at 0.5 and not before.
    gone = fake_api(FAKE_API, field_renames="", max_length=1024, beta_field="kl_coef: float = 0.1")
    assert removal_problems(live, gone, "0.5.0.dev0") == []
    (problem,) = removal_problems(live, gone, "0.4.2")
    assert problem.startswith("fakeapi.TinyConfig.beta: its deprecation shim was removed in 0.4.2")


def test_removing_a_deprecated_name_and_a_parameter(fake_api: Callable) -> None:
    released = fake_api(FAKE_API, **V1)
    no_shims = FAKE_API.replace('"OldTrainer": DeprecatedName("TinyTrainer", since="0.2", removed_in="0.4"),', "")
    no_shims = no_shims.replace("processing_class=None, *", "*").replace("@deprecated_params", "# ")
    live = fake_api(no_shims, **V1)
    removed = {c.key for c in diff_surfaces(released, live) if c.action == "removed"}
    assert removed == {
        "deprecation of fakeapi.OldTrainer",
        "deprecation of fakeapi.TinyTrainer(tokenizer)",
        "fakeapi.TinyTrainer(processing_class)",
    }
    assert removal_problems(released, live, "0.4.0.dev0") == [
        "fakeapi.TinyTrainer(processing_class): removed without a deprecation. Restore it, or keep "
        "the old spelling working through a shim from honelm.stability (deprecated_names, "
        "deprecated_fields, deprecated_params) that names the version it goes away in."
    ]
    early = removal_problems(released, live, "0.3.9")
    assert any(p.startswith("fakeapi.OldTrainer: its deprecation shim was removed in 0.3.9") for p in early)


def make_surface(entries: dict, deprecations: dict | None = None, modules: tuple = ("honelm",)) -> Surface:
    return {**empty_surface("0.3.0"), "modules": list(modules), "entries": entries, "deprecations": deprecations or {}}


def test_removed_name_that_was_deprecated_at_the_release() -> None:
    function = {"kind": "function", "signature": "(x)", "parameters": ["x"]}
    deprecation = {"kind": "callable", "replacement": None, "since": "0.2", "removed_in": "0.4"}
    released = make_surface({"honelm.old": function}, {"honelm.old": deprecation})
    live = make_surface({})
    assert removal_problems(released, live, "0.4.0.dev0") == []
    (problem,) = removal_problems(released, live, "0.3.1")
    assert problem.startswith("honelm.old: removed in 0.3.1, but its deprecation promises it until honelm 0.4")
    # Keeping the function but dropping its deprecation (it stays) breaks nothing.
    assert removal_problems(released, make_surface({"honelm.old": function}), "0.3.1") == []


# --------------------------------------------------------------------------- CHANGELOG


CHANGELOG = """# Changelog

## [Unreleased]

### Changed
- `SFTConfig.max_length` now defaults to 2048.
- New module `honelm.ops` with chunked log-prob kernels.
- `DPOTrainer` accepts `ref_model=None`.

## [0.1.0] - 2025-01-01
- `SFTConfig.packing` and `honelm.data.pack_dataset` added.
"""


def test_unreleased_section_stops_at_the_next_release() -> None:
    notes = unreleased_notes(CHANGELOG)
    assert "SFTConfig.max_length" in notes and "SFTConfig.packing" not in notes
    assert unreleased_notes("# Changelog\n\n## [0.1.0]\n- x\n") is None
    with pytest.raises(ValueError, match="no '## \\[Unreleased\\]' section"):
        unmentioned_changes(make_surface({}), make_surface({}), "# Changelog\n")


def test_changelog_must_name_each_changed_item() -> None:
    config = {"kind": "class", "bases": ["object"], "fields": {"max_length": "int = 1024", "packing": "bool = False"}}
    trainer = {"kind": "class", "bases": ["object"], "signature": "(model)", "parameters": ["model"]}
    function = {"kind": "function", "signature": "(x)", "parameters": ["x"]}
    released = make_surface(
        {"honelm.SFTConfig": config, "honelm.DPOConfig": config, "honelm.DPOTrainer": trainer,
         "honelm.data.pack_dataset": function},
        modules=("honelm", "honelm.data"),
    )
    changed = json.loads(json.dumps(released))
    entries = changed["entries"]
    entries["honelm.SFTConfig"]["fields"]["max_length"] = "int = 2048"  # named: SFTConfig.max_length
    entries["honelm.DPOConfig"]["fields"]["max_length"] = "int = 2048"  # not named (SFTConfig's is)
    entries["honelm.SFTConfig"]["fields"]["packing"] = "bool = True"  # named only in a released section
    entries["honelm.DPOTrainer"]["signature"] = "(model, ref_model=None)"  # named: DPOTrainer
    entries["honelm.DPOTrainer"]["parameters"] = ["model", "ref_model"]
    entries["honelm.data.pack_dataset"]["signature"] = "(x, y=1)"  # not named
    entries["honelm.ops.selective_logps"] = function  # covered by naming the new module
    entries["honelm.NewTrainer"] = trainer  # top-level: "honelm" alone covers nothing
    changed["modules"] = ["honelm", "honelm.data", "honelm.ops"]
    missing = unmentioned_changes(released, changed, CHANGELOG)
    assert [c.key for c in missing] == [
        "honelm.DPOConfig.max_length",
        "honelm.NewTrainer",
        "honelm.SFTConfig.packing",
        "honelm.data.pack_dataset",
    ]
    message = changelog_message(missing)
    assert "honelm.DPOConfig.max_length  (mention e.g. `DPOConfig.max_length`)" in message
    assert "## [Unreleased]" in message


def test_changelog_mentions_must_be_whole_names() -> None:
    function = {"kind": "function", "signature": "(x)", "parameters": ["x"]}
    live = make_surface({"honelm.pack": function, "honelm.__version__": {"kind": "constant", "type": "str"}})
    assert [c.key for c in unmentioned_changes(make_surface({}), live, "## [Unreleased]\n- `unpack` and packing\n")] == ["honelm.pack"]
    assert unmentioned_changes(make_surface({}), live, "## [Unreleased]\n- New: `pack`.\n") == []
    # A name inside another dotted name is a different item: `ops.pack` is not `data.pack`.
    in_data = make_surface({"honelm.data.pack": function}, modules=("honelm", "honelm.data"))
    before = make_surface({}, modules=("honelm", "honelm.data"))
    assert len(unmentioned_changes(before, in_data, "## [Unreleased]\n- `ops.pack`\n")) == 1
    assert unmentioned_changes(before, in_data, "## [Unreleased]\n- `data.pack`\n") == []


# --------------------------------------------------------------------------- tools


def test_modules_without_all_are_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "stub_module.py").write_text('"""Being written."""\nfrom __future__ import annotations\nimport os\n')
    (tmp_path / "open_module.py").write_text("def helper():\n    pass\n")
    try:
        assert modules_without_all(("stub_module", "open_module")) == ["open_module (defines helper)"]
        surface, notes = collect_surface(("stub_module", "not_a_module_here"))
        assert surface["entries"] == {} and surface["modules"] == []
        assert notes == [
            "stub_module has no __all__: none of its names are covered.",
            "not_a_module_here does not exist: none of its names are covered.",
        ]
    finally:
        sys.modules.pop("stub_module", None)
        sys.modules.pop("open_module", None)


def test_all_listing_a_missing_name_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "broken_all.py").write_text('__all__ = ["ghost"]\n')
    try:
        with pytest.raises(AttributeError, match="broken_all.__all__ lists 'ghost', but broken_all has no attribute"):
            collect_surface(("broken_all",))
    finally:
        sys.modules.pop("broken_all", None)


def test_overdue_removal_versions_found_in_source(tmp_path: Path) -> None:
    (tmp_path / "honelm" / "methods").mkdir(parents=True)
    (tmp_path / "honelm" / "methods" / "shim.py").write_text(
        'X = DeprecatedName("New", since="0.2", removed_in="0.4")\nY = dict(removed_in = "0.6")\n'
    )
    (tmp_path / "honelm" / "stability.py").write_text('example(removed_in="0.1")\n')
    assert overdue_in_source(tmp_path, "0.3.9") == []
    assert overdue_in_source(tmp_path, "0.4.0.dev0") == [
        os.path.join("honelm", "methods", "shim.py") + ":1: removed_in='0.4'"
    ]
    assert len(overdue_in_source(tmp_path, "0.6.0")) == 2


def test_update_check_and_release_commands(tmp_path: Path, live: Surface, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "tests").mkdir()
    assert _surface.main(["--update", "--root", str(tmp_path)]) == 0
    written = (tmp_path / SNAPSHOT_FILE).read_bytes()
    assert _surface.main(["--update", "--root", str(tmp_path)]) == 0
    assert (tmp_path / SNAPSHOT_FILE).read_bytes() == written  # stable output, diff-friendly
    assert json.loads(written)["entries"] == live["entries"]
    # A released baseline equal to the live surface and an empty Unreleased section: all good.
    (tmp_path / RELEASED_FILE).write_bytes(written)
    (tmp_path / CHANGELOG_FILE).write_text("# Changelog\n\n## [Unreleased]\n")
    capsys.readouterr()
    assert _surface.main(["--check", "--root", str(tmp_path)]) == 0
    # A snapshot that lost a name: the check fails and shows the diff and the fix.
    snapshot = json.loads(written)
    snapshot["entries"].pop("honelm.ExperimentalWarning")
    (tmp_path / SNAPSHOT_FILE).write_text(render(snapshot))
    assert _surface.main(["--check", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "+ honelm.ExperimentalWarning: class(UserWarning)" in out and UPDATE_COMMAND in out
    # A development version is never recorded as a release.
    assert _surface.main(["--release", "--root", str(tmp_path)]) == 2
