"""The stable API surface: collect it, snapshot it, and check changes against the contract.

The stable surface is every name in the ``__all__`` of the modules in
:data:`STABLE_MODULES`: for each, its kind, its signature, the fields and defaults of
dataclasses (configs), the public methods of classes, and the deprecations in force.
Two committed files hold it (see STABILITY.md):

- ``tests/api_snapshot.json``: the surface of the current code. Regenerate it with
  ``python -m honelm._surface --update`` after a deliberate API change;
- ``tests/api_released.json``: the surface at the last release, written at release time
  with ``python -m honelm._surface --release``. Changes against it must be mentioned in
  CHANGELOG.md's ``## [Unreleased]`` section, and removals need a deprecation.

``python -m honelm._surface --check`` runs every check and explains what to do.
Collecting imports the stable modules (and so torch); importing this module does not.
"""

from __future__ import annotations

import __future__
import argparse
import dataclasses
import functools
import hashlib
import importlib
import inspect
import json
import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

# The modules whose __all__ is the stable API, beside the top level.
STABLE_MODULES: tuple[str, ...] = (
    "honelm",
    "honelm.data",
    "honelm.diagnostics",
    "honelm.ops",
    "honelm.stability",
    "honelm.testing",
)
FORMAT_VERSION = 1
SNAPSHOT_FILE = "tests/api_snapshot.json"
RELEASED_FILE = "tests/api_released.json"
CHANGELOG_FILE = "CHANGELOG.md"
UPDATE_COMMAND = "python -m honelm._surface --update"
RELEASE_COMMAND = "python -m honelm._surface --release"

Surface = dict[str, Any]

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_PACKAGE_DIR = str(Path(__file__).resolve().parent)


# --------------------------------------------------------------------------- rendering


def _clean(text: str) -> str:
    """Drop what changes from run to run or machine to machine: addresses, install paths."""
    return _ADDRESS.sub("", text).replace(_PACKAGE_DIR, "<honelm>")


def stable_repr(value: Any) -> str:
    """``repr`` that is the same in every process: sets sorted, addresses dropped."""
    if isinstance(value, (set, frozenset)):
        body = ", ".join(sorted(stable_repr(item) for item in value))
        if type(value) is set:
            return "{" + body + "}" if body else "set()"
        return f"{type(value).__name__}({{{body}}})" if body else f"{type(value).__name__}()"
    if type(value) is list:
        return "[" + ", ".join(stable_repr(item) for item in value) + "]"
    if type(value) is tuple:
        items = [stable_repr(item) for item in value]
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    if type(value) is dict:
        return "{" + ", ".join(f"{stable_repr(k)}: {stable_repr(v)}" for k, v in value.items()) + "}"
    return _clean(repr(value))


class _Text:
    """An object whose ``repr`` is the given text (to render defaults and annotations)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def annotation_text(annotation: Any) -> str:
    """An annotation as written: strings (``from __future__ import annotations``) verbatim."""
    if isinstance(annotation, str):
        return annotation
    return _clean(inspect.formatannotation(annotation))


def _parameter_name(parameter: inspect.Parameter) -> str:
    if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
        return f"*{parameter.name}"
    if parameter.kind is inspect.Parameter.VAR_KEYWORD:
        return f"**{parameter.name}"
    return parameter.name


def signature_of(func: Any, drop_first: bool = False) -> tuple[str, list[str]] | None:
    """``(text, parameter names)`` of a callable's signature, or None if it has none."""
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return None
    parameters = list(signature.parameters.values())[1 if drop_first else 0 :]
    rendered = []
    for parameter in parameters:
        if parameter.default is not parameter.empty:
            parameter = parameter.replace(default=_Text(stable_repr(parameter.default)))
        if parameter.annotation is not parameter.empty:
            parameter = parameter.replace(annotation=_Text(annotation_text(parameter.annotation)))
        rendered.append(parameter)
    returns = signature.return_annotation
    if returns is not signature.empty:
        returns = _Text(annotation_text(returns))
    text = str(signature.replace(parameters=rendered, return_annotation=returns))
    return _clean(text), [_parameter_name(p) for p in parameters]


# --------------------------------------------------------------------------- describing


def _type_name(cls: type) -> str:
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_ours(obj: Any, root: str) -> bool:
    """Whether ``obj`` is defined in the package ``root`` (``honelm``), not in a dependency."""
    return (getattr(obj, "__module__", None) or "").split(".")[0] == root


def _field_text(field: dataclasses.Field) -> str:
    """``"int | None = 1024"``: a dataclass field's type and default."""
    text = annotation_text(field.type)
    if field.default is not dataclasses.MISSING:
        text += f" = {stable_repr(field.default)}"
    elif field.default_factory is not dataclasses.MISSING:
        try:
            text += f" = {stable_repr(field.default_factory())}"
        except Exception:  # a factory that needs a context: record that it has one
            text += " = <factory>"
    if not field.init:
        text += " [init=False]"
    if field.kw_only is True:
        text += " [keyword-only]"
    return text


def _fields(cls: type, root: str) -> dict[str, str]:
    """The dataclass fields that ``root`` declares (not those inherited from dependencies)."""
    out = {}
    for field in dataclasses.fields(cls):
        definer = next(
            (k for k in cls.__mro__ if field.name in inspect.get_annotations(k)), cls
        )
        if _is_ours(definer, root):
            out[field.name] = _field_text(field)
    return out


def _own_members(cls: type, root: str) -> list[tuple[str, Any]]:
    """Public class attributes whose first definition in the MRO is in ``root``."""
    seen: set[str] = set()
    out = []
    for klass in cls.__mro__:
        for name, value in vars(klass).items():
            if name in seen:
                continue
            seen.add(name)
            public = not name.startswith("_") or name == "__call__"
            if public and _is_ours(klass, root):
                out.append((name, value))
    return out


def _member_text(value: Any) -> str | None:
    """How a class attribute is recorded; None for the shims of deprecated field names."""
    from honelm.stability import _DeprecatedAttribute

    if isinstance(value, _DeprecatedAttribute):
        return None
    if isinstance(value, (staticmethod, classmethod)):
        signature = signature_of(value.__func__)
        return f"{type(value).__name__} {signature[0] if signature else '(?)'}"
    if isinstance(value, property):
        return "property" if value.fset is not None else "property (read-only)"
    if isinstance(value, functools.cached_property):
        return "cached_property"
    if inspect.isfunction(value):
        signature = signature_of(value)
        return f"method {signature[0] if signature else '(?)'}"
    if isinstance(value, type):
        return f"class {_type_name(value)}"
    return f"attribute = {stable_repr(value)}"


def _describe_class(cls: type, root: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"kind": "class", "bases": [_type_name(b) for b in cls.__bases__]}
    field_names: set[str] = set()
    if dataclasses.is_dataclass(cls):
        entry["fields"] = _fields(cls, root)
        field_names = {field.name for field in dataclasses.fields(cls)}
    else:
        definer = next((k for k in cls.__mro__ if "__init__" in vars(k)), None)
        if definer is not None and _is_ours(definer, root):
            signature = signature_of(vars(definer)["__init__"], drop_first=True)
            if signature is not None:
                entry["signature"], entry["parameters"] = signature
    members = {}
    for name, value in _own_members(cls, root):
        text = None if name in field_names else _member_text(value)
        if text is not None:
            members[name] = text
    if members:
        entry["members"] = members
    return entry


def describe(obj: Any, name: str, root: str = "honelm") -> dict[str, Any]:
    """The snapshot entry of one exported object."""
    if isinstance(obj, types.ModuleType):
        return {"kind": "module"}
    if isinstance(obj, type):
        return _describe_class(obj, root)
    if inspect.isroutine(obj) or isinstance(obj, functools.partial):
        entry: dict[str, Any] = {"kind": "function"}
        signature = signature_of(obj)
        if signature is not None:
            entry["signature"], entry["parameters"] = signature
        return entry
    if typing.get_origin(obj) is not None or type(obj).__module__ == "typing":
        return {"kind": "alias", "value": stable_repr(obj)}
    entry = {"kind": "constant", "type": _type_name(type(obj))}
    if not (name.startswith("__") and name.endswith("__")):  # __version__ changes every release
        entry["value"] = _short(stable_repr(obj))
    return entry


def _short(text: str, limit: int = 200) -> str:
    """Long values (a chat template) as their start, length and hash: still diffable."""
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    return f"{text[:80]}... <{len(text)} characters, sha256 {digest}>"


def _deprecation_info(kind: str, deprecation: Any) -> dict[str, Any]:
    return {
        "kind": kind,
        "replacement": deprecation.replacement,
        "since": deprecation.since,
        "removed_in": deprecation.removed_in,
    }


def _deprecations_of(key: str, obj: Any, root: str) -> dict[str, dict[str, Any]]:
    """Deprecations attached to an exported object, keyed like the snapshot's items."""
    out = {}
    own = vars(obj).get("_honelm_deprecation") if isinstance(obj, type) else None
    own = own or (None if isinstance(obj, type) else getattr(obj, "_honelm_deprecation", None))
    if own is not None:
        out[key] = _deprecation_info("callable", own)
    callable_ = obj.__init__ if isinstance(obj, type) else obj
    for old, rename in getattr(callable_, "_honelm_deprecated_params", {}).items():
        out[f"{key}({old})"] = _deprecation_info("param", rename.deprecation)
    if not isinstance(obj, type):
        return out
    for old, rename in getattr(obj, "_deprecated_fields", {}).items():
        out[f"{key}.{old}"] = _deprecation_info("field", rename.deprecation)
    for name, value in _own_members(obj, root):
        func = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
        deprecation = getattr(func, "_honelm_deprecation", None)
        if deprecation is not None:
            out[f"{key}.{name}"] = _deprecation_info("method", deprecation)
    return out


# --------------------------------------------------------------------------- collecting


def empty_surface(version: str | None = None) -> Surface:
    """A surface with nothing in it: the baseline before the first release."""
    return {
        "format": FORMAT_VERSION,
        "version": version,
        "modules": [],
        "entries": {},
        "deprecations": {},
    }


def _import_or_note(module_name: str, notes: list[str]) -> types.ModuleType | None:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise  # the module exists but something it imports is missing: a real error
        notes.append(f"{module_name} does not exist: none of its names are covered.")
        return None


def _collect_module(module: types.ModuleType, surface: Surface) -> None:
    root = module.__name__.split(".")[0]
    for name in module.__all__:
        try:
            obj = getattr(module, name)
        except AttributeError:
            raise AttributeError(
                f"{module.__name__}.__all__ lists {name!r}, but {module.__name__} has no "
                f"attribute {name!r}: define it, or take it out of __all__."
            ) from None
        key = f"{module.__name__}.{name}"
        surface["entries"][key] = describe(obj, name, root)
        surface["deprecations"].update(_deprecations_of(key, obj, root))


def collect_surface(modules: tuple[str, ...] = STABLE_MODULES) -> tuple[Surface, list[str]]:
    """The live stable surface, and notes on modules that are missing or have no ``__all__``."""
    from honelm.stability import registered_deprecations
    from honelm.version import __version__

    surface = empty_surface(__version__)
    notes: list[str] = []
    for module_name in modules:
        module = _import_or_note(module_name, notes)
        if module is None:
            continue
        if not hasattr(module, "__all__"):
            notes.append(f"{module_name} has no __all__: none of its names are covered.")
            continue
        surface["modules"].append(module_name)
        _collect_module(module, surface)
    for deprecation in registered_deprecations():
        if deprecation.kind == "name" and deprecation.module in surface["modules"]:
            surface["deprecations"][deprecation.name] = _deprecation_info("name", deprecation)
    return surface, notes


def modules_without_all(modules: tuple[str, ...] = STABLE_MODULES) -> list[str]:
    """Stable modules that define public names but no ``__all__`` (so nothing is covered)."""
    out = []
    for module_name in modules:
        module = sys.modules.get(module_name) or _import_or_note(module_name, [])
        if module is None or hasattr(module, "__all__"):
            continue
        public = [
            name
            for name, value in vars(module).items()
            if not name.startswith("_")
            and not isinstance(value, (types.ModuleType, __future__._Feature))
        ]
        if public:
            out.append(f"{module_name} (defines {', '.join(sorted(public))})")
    return out


# --------------------------------------------------------------------------- comparing


class _Item(NamedTuple):
    what: str  # "entry", "member", "parameter" or "deprecation"
    value: str
    subject: str  # the entry it belongs to; for a deprecation, the deprecated key
    mentions: tuple[str, ...]  # spellings that count as a CHANGELOG mention


@dataclass(frozen=True)
class Change:
    """One difference between two surfaces."""

    action: str  # "added", "removed" or "changed"
    key: str
    what: str
    before: str | None
    after: str | None
    subject: str
    mentions: tuple[str, ...]

    def line(self) -> str:
        """One line of a readable diff."""
        if self.action == "added":
            return f"  + {self.key}: {self.after}"
        if self.action == "removed":
            return f"  - {self.key}: {self.before}"
        return f"  ~ {self.key}: {self.before}  ->  {self.after}"


def _strip_root(key: str) -> str:
    return key[len("honelm.") :] if key.startswith("honelm.") else key


def _entry_mentions(key: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys((key, _strip_root(key), key.rsplit(".", 1)[-1])))


def _member_mentions(key: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys((key, _strip_root(key), ".".join(key.split(".")[-2:]))))


def _entry_summary(entry: dict[str, Any]) -> str:
    """Everything about an entry except its members, on one line."""
    kind = entry.get("kind", "?")
    rest = {k: v for k, v in entry.items() if k not in ("kind", "fields", "members", "parameters")}
    if kind == "class":
        text = f"class({', '.join(rest.pop('bases', []))})"
        text += " dataclass" if "fields" in entry else ""
    elif kind in ("constant", "alias"):
        text = f"{kind} {rest.pop('type', '')}".rstrip()
    else:
        text = kind
    if "signature" in rest:
        text += f" {rest.pop('signature')}"
    if "value" in rest:
        text += f" = {rest.pop('value')}"
    for k in sorted(rest):  # anything a later format adds still shows up in the diff
        text += f" {k}={rest[k]!r}"
    return text


def _deprecation_mentions(key: str, info: dict[str, Any]) -> tuple[str, ...]:
    if info.get("kind") in ("field", "method"):
        return _member_mentions(key)
    return _entry_mentions(key.split("(", 1)[0])


def _flatten(surface: Surface) -> dict[str, _Item]:
    """Every comparable item of a surface, keyed ``K``, ``K.member``, ``K(param)``."""
    items: dict[str, _Item] = {}
    for key, entry in surface.get("entries", {}).items():
        items[key] = _Item("entry", _entry_summary(entry), key, _entry_mentions(key))
        for name, text in {**entry.get("fields", {}), **entry.get("members", {})}.items():
            member = f"{key}.{name}"
            items[member] = _Item("member", text, key, _member_mentions(member))
        for parameter in entry.get("parameters", []):
            items[f"{key}({parameter})"] = _Item("parameter", "parameter", key, _entry_mentions(key))
    for key, info in surface.get("deprecations", {}).items():
        summary = (
            f"{info.get('kind')} deprecated since {info.get('since')}, removed in "
            f"{info.get('removed_in')}, replacement {info.get('replacement')}"
        )
        mentions = _deprecation_mentions(key, info)
        items[f"deprecation of {key}"] = _Item("deprecation", summary, key, mentions)
    return items


def diff_surfaces(before: Surface, after: Surface) -> list[Change]:
    """Added, removed and changed items; members of added/removed entries are folded in."""
    old, new = _flatten(before), _flatten(after)
    changes = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if a is not None and b is not None:
            if a.value != b.value:
                changes.append(Change("changed", key, b.what, a.value, b.value, b.subject, b.mentions))
        elif b is not None:
            if b.what in ("member", "parameter") and b.subject not in old:
                continue
            changes.append(Change("added", key, b.what, None, b.value, b.subject, b.mentions))
        elif a is not None:
            if a.what in ("member", "parameter") and a.subject not in new:
                continue
            changes.append(Change("removed", key, a.what, a.value, None, a.subject, a.mentions))
    return changes


def format_changes(changes: list[Change]) -> str:
    """A readable diff: ``+`` added, ``-`` removed, ``~`` changed."""
    return "\n".join(change.line() for change in changes)


# --------------------------------------------------------------------------- the contract


def _is_due(removed_in: str, current_version: str) -> bool:
    from packaging.version import Version

    from honelm.stability import _release_of

    return _release_of(current_version) >= Version(removed_in)


def removal_problems(released: Surface, live: Surface, current_version: str) -> list[str]:
    """Removals from the released surface that break the deprecation policy.

    A removed item is allowed when a shim for it is in force now (it is among the live
    deprecations), or when it was deprecated at the release and ``current_version`` has
    reached its ``removed_in``. A deprecation shim itself may go only at ``removed_in``.
    """
    live_items = _flatten(live)
    live_deprecations = live.get("deprecations", {})
    old_deprecations = released.get("deprecations", {})
    removed = [c for c in diff_surfaces(released, live) if c.action == "removed"]
    problems: dict[str, str] = {}
    for change in (c for c in removed if c.what != "deprecation"):
        if change.key in live_deprecations:
            continue
        info = old_deprecations.get(change.key)
        if info is None:
            problems[change.key] = (
                f"{change.key}: removed without a deprecation. Restore it, or keep the old "
                "spelling working through a shim from honelm.stability (deprecated_names, "
                "deprecated_fields, deprecated_params) that names the version it goes away in."
            )
        elif not _is_due(info["removed_in"], current_version):
            problems[change.key] = (
                f"{change.key}: removed in {current_version}, but its deprecation promises it "
                f"until honelm {info['removed_in']}. Restore it until then."
            )
    for change in (c for c in removed if c.what == "deprecation"):
        key, info = change.subject, old_deprecations[change.subject]
        if key in live_items or key in problems or _is_due(info["removed_in"], current_version):
            continue
        problems[key] = (
            f"{key}: its deprecation shim was removed in {current_version}, but the warning "
            f"promised it until honelm {info['removed_in']}. Restore the shim until then."
        )
    return list(problems.values())


def unreleased_notes(changelog: str) -> str | None:
    """The text of CHANGELOG.md's ``## [Unreleased]`` section, or None if there is none."""
    heading = re.search(r"^##[ \t]+\[?unreleased\]?[^\n]*$", changelog, re.IGNORECASE | re.MULTILINE)
    if heading is None:
        return None
    rest = changelog[heading.end() :]
    following = re.search(r"^##[ \t]", rest, re.MULTILINE)
    return rest[: following.start()] if following else rest


def _mentioned(spellings: tuple[str, ...], notes: str) -> bool:
    return any(
        re.search(rf"(?<![\w.]){re.escape(spelling)}(?!\w)", notes) for spelling in spellings
    )


def _module_of(key: str, modules: list[str]) -> str | None:
    owners = [m for m in modules if key.startswith(m + ".")]
    return max(owners, key=len) if owners else None


def unmentioned_changes(released: Surface, live: Surface, changelog: str) -> list[Change]:
    """Changes since the release that CHANGELOG.md's Unreleased section does not name.

    A change counts as mentioned when one of its spellings appears as a whole name:
    ``SFTConfig`` / ``honelm.SFTConfig`` for an entry, ``SFTConfig.max_length`` for a
    field or method, ``ops.selective_logps`` for a submodule's entry. Entries of a
    submodule that is new since the release are covered by naming the module
    (``honelm.ops``); dunder names (``__version__``) need no mention. Raises
    ``ValueError`` if there is no Unreleased section.
    """
    notes = unreleased_notes(changelog)
    if notes is None:
        raise ValueError(
            f"{CHANGELOG_FILE} has no '## [Unreleased]' section; add one above the released "
            "versions and list the changes to the stable API there."
        )
    old_modules = set(released.get("modules", []))
    missing = []
    for change in diff_surfaces(released, live):
        if re.fullmatch(r"__\w+__", change.subject.rsplit(".", 1)[-1]):
            continue  # __version__ and the like: recorded, but not release notes material
        mentions = change.mentions
        module = _module_of(change.subject, live.get("modules", []))
        if change.action == "added" and module and "." in module and module not in old_modules:
            mentions = (*mentions, module)
        if not _mentioned(mentions, notes):
            missing.append(change)
    return missing


_REMOVED_IN = re.compile(r"""removed_in\s*=\s*["']([^"']+)["']""")


def overdue_in_source(root: Path, current_version: str) -> list[str]:
    """``removed_in="X"`` literals in honelm's sources that ``current_version`` has reached.

    A second net beside :func:`honelm.stability.check_removals`, for shims in modules
    nothing imports. This module and ``stability.py`` (which only document the argument)
    are skipped.
    """
    from packaging.version import InvalidVersion

    skip = {"stability.py", "_surface.py"}
    found = []
    for path in sorted((root / "honelm").rglob("*.py")):
        if path.parent == root / "honelm" and path.name in skip:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for version in _REMOVED_IN.findall(line):
                try:
                    due = _is_due(version, current_version)
                except InvalidVersion:
                    continue
                if due:
                    found.append(f"{path.relative_to(root)}:{number}: removed_in={version!r}")
    return found


# --------------------------------------------------------------------------- files and CLI


def repo_root() -> Path:
    """The checkout this package lives in (where ``tests/`` and CHANGELOG.md are)."""
    return Path(__file__).resolve().parent.parent


def render(surface: Surface) -> str:
    """The JSON text written to the snapshot files: sorted keys, one item a line."""
    return json.dumps(surface, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def load(path: Path) -> Surface:
    """Read a snapshot file, naming the command that writes it when it is missing."""
    if not path.is_file():
        command = RELEASE_COMMAND if path.name == Path(RELEASED_FILE).name else UPDATE_COMMAND
        raise FileNotFoundError(f"{path} does not exist; write it with `{command}`.")
    return json.loads(path.read_text(encoding="utf-8"))


def snapshot_message(changes: list[Change]) -> str:
    """Why the snapshot test failed and how to fix it."""
    return (
        f"The stable API differs from {SNAPSHOT_FILE} "
        "(+ added, - removed, ~ changed):\n"
        f"{format_changes(changes)}\n\n"
        "If the change is intended:\n"
        f"  1. run `{UPDATE_COMMAND}` and commit {SNAPSHOT_FILE};\n"
        f"  2. name each changed item in {CHANGELOG_FILE} under '## [Unreleased]'.\n"
        "Renames and removals need a deprecation shim first (see STABILITY.md)."
    )


def check(root: Path, live: Surface) -> list[str]:
    """Every contract problem of ``live`` against the files under ``root``, as messages."""
    from honelm.stability import check_removals

    problems = []
    changes = diff_surfaces(load(root / SNAPSHOT_FILE), live)
    if changes:
        problems.append(snapshot_message(changes))
    released = load(root / RELEASED_FILE)
    problems += removal_problems(released, live, live["version"])
    changelog_path = root / CHANGELOG_FILE
    if not changelog_path.is_file():
        problems.append(f"{CHANGELOG_FILE} is missing; create it with a '## [Unreleased]' section.")
    else:
        try:
            missing = unmentioned_changes(released, live, changelog_path.read_text(encoding="utf-8"))
        except ValueError as error:
            missing, problems = [], [*problems, str(error)]
        if missing:
            problems.append(changelog_message(missing))
    problems += [f"{m}: a stable module without __all__" for m in modules_without_all()]
    overdue = [str(d) for d in check_removals(live["version"])]
    overdue += overdue_in_source(root, live["version"])
    problems += [f"removal due: {item}" for item in overdue]
    return problems


def changelog_message(missing: list[Change]) -> str:
    """Why the CHANGELOG test failed and how to fix it."""
    lines = [f"  {change.key}  (mention e.g. `{change.mentions[-1]}`)" for change in missing]
    return (
        f"These changes to the stable API since the last release ({RELEASED_FILE}) are not "
        f"mentioned in {CHANGELOG_FILE} under '## [Unreleased]':\n" + "\n".join(lines) + "\n"
        "Add a line for each; naming a submodule that is new since the release (e.g. "
        "`honelm.data`) covers all of its names. If these changes were released already, "
        f"run `{RELEASE_COMMAND}` at the release commit."
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m honelm._surface --update | --check | --release``."""
    parser = argparse.ArgumentParser(prog="python -m honelm._surface", description=__doc__.split("\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--update", action="store_true", help=f"rewrite {SNAPSHOT_FILE}")
    action.add_argument("--check", action="store_true", help="run every contract check")
    action.add_argument("--release", action="store_true", help=f"rewrite {RELEASED_FILE} (at a release)")
    parser.add_argument("--root", type=Path, default=None, help="repository root (default: this checkout)")
    args = parser.parse_args(argv)
    root = args.root or repo_root()
    if not (root / "tests").is_dir():
        parser.error(f"{root} has no tests/ folder: run this from a checkout, or pass --root.")
    live, notes = collect_surface()
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if args.check:
        problems = check(root, live)
        print("\n\n".join(problems) if problems else "The stable API matches the contract.")
        return 1 if problems else 0
    target = root / (SNAPSHOT_FILE if args.update else RELEASED_FILE)
    if args.release:
        from packaging.version import Version

        if Version(live["version"]).is_devrelease:
            print(f"error: version {live['version']} is a development version; bump it to the "
                  "release first.", file=sys.stderr)
            return 2
    previous = load(target) if target.is_file() else empty_surface()
    target.write_text(render(live), encoding="utf-8")
    changes = diff_surfaces(previous, live)
    print(f"wrote {target} ({len(live['entries'])} names, {len(changes)} changes)")
    if changes:
        print(format_changes(changes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
