"""Command-line flags and YAML files for a method's config dataclass.

Every field of a config dataclass (a ``transformers.TrainingArguments`` subclass) becomes a
flag ``--field_name`` (``--field-name`` works too), typed from its annotation, documented by
its ``metadata["help"]``. A few script arguments common to every method (model, dataset,
YAML file, LoRA, multi-process launch) come on top. Values are resolved as

    dataclass defaults  <  the YAML file given with ``--config``  <  command-line flags

A command uses it in three steps::

    add_config_arguments(parser, SFTConfig, method="SFT")     # in add_arguments(parser)
    values = resolve_values(args, SFTConfig)                  # in run(args): YAML + flags
    script, config = build_configs(values, SFTConfig)         # the two dataclasses

Flags are parsed into the namespace only when given (their argparse default is
``SUPPRESS``), which is how flags win over the YAML file. The tokens typed on the command line
are kept in ``args._cli_argv`` so a command can be re-launched under ``accelerate launch``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import functools
import inspect
import json
import os
import re
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """A value, flag or YAML key that cannot be used; the message says which and how to fix it."""


class _Mismatch(Exception):
    """A value does not fit a type (internal: turned into a ConfigError or an argparse error)."""


# ---- Script arguments ------------------------------------------------------------------------

_DATA_GROUP = "Model, data and config file"
_PEFT_GROUP = "LoRA adapters (needs peft)"
_LAUNCH_GROUP = "Launching several processes (command line only)"
_INHERITED_GROUP = "Training options (transformers.TrainingArguments)"


@dataclasses.dataclass
class ScriptArguments:
    """Arguments of a training command that are not part of the method's config."""

    model_name_or_path: str | None = dataclasses.field(
        default=None,
        metadata={"help": "Model to train: a Hub id or a local directory (required).", "group": _DATA_GROUP},
    )
    dataset_name: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Dataset: a Hub id, a directory saved with `save_to_disk`, a directory of data files, "
            "or .jsonl/.json/.parquet/.csv files (comma-separated or a glob) (required).",
            "group": _DATA_GROUP,
        },
    )
    dataset_config: str | None = dataclasses.field(
        default=None, metadata={"help": "Configuration (subset) name of a Hub dataset.", "group": _DATA_GROUP}
    )
    dataset_train_split: str = dataclasses.field(
        default="train", metadata={"help": "Split to train on.", "group": _DATA_GROUP}
    )
    dataset_test_split: str = dataclasses.field(
        default="test",
        metadata={"help": "Split to evaluate on (used when `eval_strategy` is not `no`).", "group": _DATA_GROUP},
    )
    use_peft: bool = dataclasses.field(
        default=False, metadata={"help": "Train LoRA adapters instead of the full model.", "group": _PEFT_GROUP}
    )
    lora_r: int = dataclasses.field(default=16, metadata={"help": "LoRA rank.", "group": _PEFT_GROUP})
    lora_alpha: int = dataclasses.field(
        default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r).", "group": _PEFT_GROUP}
    )
    lora_dropout: float = dataclasses.field(
        default=0.05, metadata={"help": "Dropout on the LoRA input.", "group": _PEFT_GROUP}
    )
    lora_target_modules: list[str] | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Module names to adapt (e.g. `q_proj v_proj`), or `all-linear`. Default: peft's "
            "choice for the architecture.",
            "group": _PEFT_GROUP,
        },
    )


# Flags that only make sense on the command line (they start processes); never in a YAML file.
LAUNCH_FLAGS = ("accelerate_config", "num_processes", "main_process_port")


# ---- Types -----------------------------------------------------------------------------------

_TRUE = ("true", "yes", "1", "on")
_FALSE = ("false", "no", "0", "off")
_NONE_WORDS = ("none", "null")


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _members(tp: Any) -> tuple[Any, ...]:
    """The alternatives of a Union, or ``(tp,)``."""
    return typing.get_args(tp) if _is_union(tp) else (tp,)


def _is_enum(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, enum.Enum)


def _is_list(tp: Any) -> bool:
    return tp in (list, tuple) or typing.get_origin(tp) in (list, tuple, Sequence)


def _is_dict(tp: Any) -> bool:
    return tp is dict or typing.get_origin(tp) is dict


def _choices(tp: Any, metadata_choices: Sequence[Any] | None = None) -> list[Any] | None:
    """The allowed values when ``tp`` is a Literal or an Enum (``Enum | str`` counts as the enum),
    else the field's ``metadata["choices"]``, else None."""
    members = [m for m in _members(tp) if m is not type(None)]
    enums = [m for m in members if _is_enum(m)]
    literals = [m for m in members if typing.get_origin(m) is Literal]
    others = [m for m in members if m not in enums and m not in literals and not (m is str and enums)]
    if (enums or literals) and not others:
        values: list[Any] = [v for m in literals for v in typing.get_args(m)]
        return values + [item.value for m in enums for item in m]
    return list(metadata_choices) if metadata_choices else None


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    return f"{type(value).__name__} {value!r}" if not isinstance(value, str) else repr(value)


def _to_bool(value: Any, loose: bool) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in (_TRUE if loose else ("true",)):
            return True
        if word in (_FALSE if loose else ("false",)):
            return False
    raise _Mismatch(f"expected true or false, got {_describe(value)}")


def _to_int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    number = value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            try:
                number = float(value)  # "1e3" is an integer written as a float
            except ValueError:
                pass
    if isinstance(number, float) and number.is_integer():
        return int(number)
    raise _Mismatch(f"expected an integer, got {_describe(value)}")


def _to_float(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise _Mismatch(f"expected a number, got {_describe(value)}")


def _to_str(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (str, int, float)):
        return str(value)
    raise _Mismatch(f"expected a string, got {_describe(value)}")


def _to_dict(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as e:
            # Clearly meant as JSON: say why it is not, rather than falling back to a string.
            raise ConfigError(f"invalid JSON object {value!r}: {e.msg} at character {e.pos}") from e
        if isinstance(parsed, dict):
            return parsed
    raise _Mismatch(f"expected a JSON object such as '{{\"key\": 1}}', got {_describe(value)}")


def _to_choice(value: Any, choices: list[Any]) -> Any:
    for choice in choices:
        if value == choice and type(value) is type(choice):
            return choice
        if isinstance(value, str) and str(choice).lower() == value.strip().lower():
            return choice
    shown = ", ".join(str(c) for c in choices)
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise _Mismatch(f"expected one of {shown}; got {_describe(value)}.{hint}")


def _to_list(value: Any, item: Any, wrap_scalar: bool) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return [convert(v, item) for v in value]
    if wrap_scalar and not isinstance(value, dict):
        return [convert(value, item)]
    raise _Mismatch(f"expected a list, got {_describe(value)}")


def _accepts_free_string(members: Sequence[Any]) -> bool:
    return str in members and not any(_is_enum(m) for m in members)


def _priority(tp: Any) -> int:
    """Order in which the alternatives of a Union are tried: the most specific first."""
    if typing.get_origin(tp) is Literal or _is_enum(tp):
        return 0
    order = {bool: 1, int: 2, float: 3}
    if tp in order:
        return order[tp]
    if _is_dict(tp):
        return 4
    if _is_list(tp):
        return 5
    return 7 if tp is str else 6


def _convert_union(value: Any, members: tuple[Any, ...], choices: list[Any] | None) -> Any:
    options = [m for m in members if m is not type(None)]
    if len(options) < len(members):  # Optional
        if value is None:
            return None
        free_string = _accepts_free_string(options)
        if isinstance(value, str) and value.strip().lower() in _NONE_WORDS and not free_string:
            return None
    if any(_is_enum(m) for m in options):  # `Enum | str` means "one of the enum's values"
        options = [m for m in options if m is not str]
    errors = []
    for member in sorted(options, key=_priority):
        try:
            if member is bool:
                return _to_bool(value, loose=not _accepts_free_string(options))
            return convert(value, member, choices=choices, in_union=True)
        except _Mismatch as e:
            errors.append(str(e))
    raise _Mismatch("; or ".join(dict.fromkeys(errors)))


def convert(value: Any, tp: Any, *, choices: Sequence[Any] | None = None, in_union: bool = False) -> Any:
    """``value`` (a command-line string or a YAML value) converted to the annotation ``tp``.

    Raises ``_Mismatch`` when the value does not fit (the caller names the field).
    """
    if tp is Any or tp is object:
        return value
    if _is_union(tp):
        return _convert_union(value, typing.get_args(tp), list(choices) if choices else None)
    if typing.get_origin(tp) is Literal or _is_enum(tp):
        return _to_choice(value, _choices(tp) or [])
    if tp is bool:
        return _to_bool(value, loose=True)
    if tp is int:
        return _to_int(value)
    if tp is float:
        return _to_float(value)
    if tp is str:
        result = _to_str(value)
        return _to_choice(result, list(choices)) if choices else result
    if _is_list(tp):
        args = typing.get_args(tp)
        return _to_list(value, args[0] if args else Any, wrap_scalar=not in_union)
    if _is_dict(tp):
        return _to_dict(value)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        try:
            return tp(**_to_dict(value))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"not a valid {tp.__name__}: {e}") from e
    raise TypeError(f"honelm.cli.args: no command-line conversion for the type {tp!r}.")


def _check_supported(tp: Any, name: str) -> None:
    """Fail when the parser is built (not when a user runs it) on a type ``convert`` cannot read."""
    for member in _members(tp):
        if member in (Any, object, bool, int, float, str, type(None)) or _is_enum(member) or _is_dict(member):
            continue
        if typing.get_origin(member) is Literal or (dataclasses.is_dataclass(member) and isinstance(member, type)):
            continue
        if _is_list(member):
            args = typing.get_args(member)
            _check_supported(args[0] if args else Any, name)
            continue
        raise TypeError(f"honelm.cli.args: field {name!r} has the type {tp!r}, which has no flag conversion.")


# ---- Field specs -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One flag: where it goes, its type, default and help."""

    name: str
    annotation: Any
    default: Any
    help: str
    group: str
    owner: str  # "script" or "config"
    choices: tuple[Any, ...] | None = None

    @property
    def is_bool(self) -> bool:
        return bool in _members(self.annotation) and not any(_is_list(m) for m in _members(self.annotation))

    @property
    def takes_list(self) -> bool:
        return any(_is_list(m) for m in _members(self.annotation))


_MISSING = object()


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return _MISSING


def _sections(cls: type) -> dict[str, str]:
    """Field name -> section title, read from ``# ---- Title ----`` comments in the class body."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    own = set(cls.__dict__.get("__annotations__", {}))
    sections: dict[str, str] = {}
    current = None
    for line in source.splitlines()[1:]:
        header = re.match(r"\s+#\s*-{2,}\s*(.*?)\s*-*\s*$", line)
        if header and header.group(1):
            current = header.group(1)
            continue
        name = re.match(r"\s+(\w+)\s*:", line)
        if name and name.group(1) in own and current is not None:
            sections.setdefault(name.group(1), current)
    return sections


@functools.lru_cache(maxsize=16)
def field_specs(config_cls: type, method: str = "") -> tuple[FieldSpec, ...]:
    """Flags of the script arguments and of every init field of ``config_cls``, in help order."""
    specs: list[FieldSpec] = []
    for owner, cls in (("script", ScriptArguments), ("config", config_cls)):
        hints = typing.get_type_hints(cls)
        own = set(cls.__dict__.get("__annotations__", {}))
        sections = _sections(cls) if owner == "config" else {}
        for f in dataclasses.fields(cls):
            if not f.init or f.name.startswith("_"):
                continue
            if owner == "script":
                group = f.metadata["group"]
            elif f.name in own:
                group = f"{method}: {sections[f.name]}" if f.name in sections else f"{method} options"
            else:
                group = _INHERITED_GROUP
            _check_supported(hints[f.name], f.name)
            meta_choices = f.metadata.get("choices")
            specs.append(FieldSpec(
                name=f.name, annotation=hints[f.name], default=_default_of(f), help=f.metadata.get("help", ""),
                group=group, owner=owner, choices=tuple(meta_choices) if meta_choices else None,
            ))
    # The method's own fields first, in the order its class declares them, then the inherited ones.
    own_order = list(config_cls.__dict__.get("__annotations__", {}))
    specs.sort(key=lambda s: (s.owner == "config", s.group == _INHERITED_GROUP,
                              own_order.index(s.name) if s.owner == "config" and s.name in own_order else 0))
    names = [s.name for s in specs]
    clashes = {n for n in names if names.count(n) > 1}
    if clashes:
        raise TypeError(f"{config_cls.__name__} fields clash with script arguments: {sorted(clashes)}.")
    return tuple(specs)


def convert_field(spec: FieldSpec, value: Any) -> Any:
    """``value`` converted for ``spec``; raises ``_Mismatch`` or ``ConfigError``."""
    return convert(value, spec.annotation, choices=spec.choices)


# ---- Argparse --------------------------------------------------------------------------------


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each option once (``--name``, not also ``--name-with-dashes``) with a short metavar."""

    def __init__(self, prog: str, **kwargs: Any) -> None:
        kwargs.setdefault("max_help_position", 36)
        super().__init__(prog, **kwargs)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        strings = action.option_strings
        shown = [s for s in strings if not (s.startswith("--") and "-" in s[2:] and s.replace("-", "_")[1:] in
                                             {t[1:].replace("-", "_") for t in strings if "-" not in t[2:]})]
        if not strings or action.nargs == 0 or len(shown) == len(strings):
            return super()._format_action_invocation(action) if len(shown) == len(strings) else ", ".join(shown)
        return f"{', '.join(shown)} {self._format_args(action, self._get_default_metavar_for_optional(action))}"


def _label(tp: Any) -> str:
    if tp is bool:
        return "true|false"
    if _is_dict(tp) or (dataclasses.is_dataclass(tp) and isinstance(tp, type)):
        return "JSON"
    if _is_list(tp):
        args = typing.get_args(tp)
        return _label(args[0]) if args else "VALUE"
    if _is_enum(tp) or typing.get_origin(tp) is Literal:
        return "STR"
    names = {int: "INT", float: "FLOAT", str: "STR"}
    return names.get(tp, "VALUE")


def _metavar(spec: FieldSpec) -> str:
    choices = _choices(spec.annotation, spec.choices)
    if choices and len(choices) <= 8:
        return "{" + ",".join(str(c) for c in choices) + "}"
    members = sorted((m for m in _members(spec.annotation) if m is not type(None)), key=_priority)
    return "|".join(dict.fromkeys(_label(m) for m in members)) or "STR"


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value) if value else "[]"
    return str(value)


def _help_text(spec: FieldSpec) -> str:
    text = spec.help.strip()
    choices = _choices(spec.annotation, spec.choices)
    if choices and len(choices) > 8:
        text += f" Choices: {', '.join(str(c) for c in choices)}."
    if spec.default is not _MISSING:
        text += f" (default: {_show(spec.default)})"
    if spec.is_bool and spec.default is True:
        text += f" Turn off with --no_{spec.name}."
    return text.replace("%", "%%")


class _FieldAction(argparse.Action):
    """Converts the typed tokens with ``spec`` and records them in ``namespace._cli_argv``."""

    def __init__(self, option_strings: list[str], dest: str, spec: FieldSpec | None = None,
                 fixed: Any = _MISSING, **kwargs: Any) -> None:
        self.spec = spec
        self.fixed = fixed
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        raw = [] if values is None else list(values) if isinstance(values, list) else [values]
        try:
            if self.fixed is not _MISSING:
                value = self.fixed
            elif self.spec is None:
                value = raw[0]
            elif not raw:  # a bare boolean flag
                value = True
            else:
                value = _convert_tokens(self.spec, raw)
        except (_Mismatch, ConfigError) as e:
            raise argparse.ArgumentError(None, f"argument {option_string}: {e}") from None
        setattr(namespace, self.dest, value)
        setattr(namespace, "_cli_argv", [*getattr(namespace, "_cli_argv", []), option_string, *raw])


def _convert_tokens(spec: FieldSpec, raw: list[str]) -> Any:
    """One token is a scalar value where the field allows one, else a list of one."""
    if len(raw) > 1:
        return convert_field(spec, raw)
    try:
        return convert_field(spec, raw[0])
    except _Mismatch:
        if not spec.takes_list:
            raise
        return convert_field(spec, raw)


def _spellings(name: str) -> list[str]:
    dashed = name.replace("_", "-")
    return [f"--{name}"] + ([f"--{dashed}"] if dashed != name else [])


def _add_flag(group: argparse._ArgumentGroup, spec: FieldSpec) -> None:
    common = {"dest": spec.name, "default": argparse.SUPPRESS, "action": _FieldAction, "spec": spec}
    if spec.is_bool:
        group.add_argument(*_spellings(spec.name), nargs="?", metavar=_metavar(spec), help=_help_text(spec), **common)
        negated = [s for s in _spellings(f"no_{spec.name}") if s not in group._option_string_actions]
        if negated:
            group.add_argument(*negated, nargs=0, fixed=False, help=argparse.SUPPRESS, **common)
        return
    nargs = "+" if spec.takes_list else None
    group.add_argument(*_spellings(spec.name), nargs=nargs, metavar=_metavar(spec), help=_help_text(spec), **common)


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type, *, method: str) -> None:
    """Register ``--config``, the script arguments, the launch flags and every field of ``config_cls``.

    Help groups: model/data, LoRA, launch, then the method's own fields by the section comments
    of its class (``# ---- Data ----``), then the inherited ``TrainingArguments`` fields.
    """
    parser.formatter_class = _HelpFormatter
    parser.allow_abbrev = False  # `--lora` must not silently mean `--lora_r`
    parser.usage = "%(prog)s [--config PATH] [--model_name_or_path MODEL] [--dataset_name DATA] [--OPTION VALUE ...]"
    specs = field_specs(config_cls, method)
    inherited = _INHERITED_GROUP
    titles = [_DATA_GROUP, _PEFT_GROUP, *[s.group for s in specs if s.owner == "config" and s.group != inherited],
              inherited, _LAUNCH_GROUP]
    groups = {title: parser.add_argument_group(title) for title in dict.fromkeys(titles)}
    groups[_DATA_GROUP].add_argument(
        *_spellings("config"), dest="config", default=argparse.SUPPRESS, action=_FieldAction, metavar="PATH",
        help="YAML file of options (any flag below, without the dashes). Flags given on the command line win.",
    )
    launch = groups[_LAUNCH_GROUP]
    launch.add_argument(*_spellings("accelerate_config"), metavar="PATH", default=argparse.SUPPRESS,
                        help="Re-run this command under `accelerate launch --config_file PATH`.")
    launch.add_argument(*_spellings("num_processes"), type=int, metavar="N", default=argparse.SUPPRESS,
                        help="Re-run this command in N processes with `accelerate launch` (one per GPU; "
                        "CPU processes when there is no GPU).")
    launch.add_argument(*_spellings("main_process_port"), type=int, metavar="PORT", default=argparse.SUPPRESS,
                        help="Port the processes use to find each other (accelerate's default: 29500).")
    for spec in specs:
        _add_flag(groups[spec.group], spec)


# ---- YAML ------------------------------------------------------------------------------------


def _yaml_loader() -> type:
    """A safe loader with YAML 1.2 scalars: only true/false are booleans (``no`` stays a
    string, as `eval_strategy: no` means) and ``1e-5`` is a float."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    bool_tag, float_tag = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
    Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in (bool_tag, float_tag)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver(bool_tag, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
    Loader.add_implicit_resolver(
        float_tag,
        re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                   r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
        list("-+0123456789."),
    )
    return Loader


def read_yaml(path: str, specs: Sequence[FieldSpec]) -> dict[str, Any]:
    """The options of a YAML file, keys checked against ``specs`` and values converted."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file (looked for {os.path.abspath(path)}).")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.load(f, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping of `option: value` lines, got a {type(data).__name__}.")
    by_name = {s.name: s for s in specs}
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in LAUNCH_FLAGS:
            raise ConfigError(f"{path}: `{key}` starts processes, so it is a command-line flag only: "
                              f"remove it from the file and pass --{name} to the command.")
        if name not in by_name:
            close = difflib.get_close_matches(name, list(by_name), n=1)
            hint = f" Did you mean `{close[0]}`?" if close else ""
            raise ConfigError(f"{path}: unknown option `{key}`.{hint} "
                              "Run the command with --help to list every option.")
        if name in values:
            raise ConfigError(f"{path}: `{name}` is given twice (spelled with dashes and with underscores).")
        try:
            values[name] = convert_field(by_name[name], value)
        except (_Mismatch, ConfigError) as e:
            raise ConfigError(f"{path}: `{key}`: {e}") from None
    return values


# ---- Resolving -------------------------------------------------------------------------------


def resolve_values(args: argparse.Namespace, config_cls: type, method: str = "") -> dict[str, Any]:
    """The options set by the YAML file and the command line (flags win), converted and checked.

    Options left unset are absent: the dataclass defaults fill them in :func:`build_configs`.
    """
    specs = field_specs(config_cls, method)
    path = getattr(args, "config", None)
    values = read_yaml(path, specs) if path else {}
    values.update({s.name: getattr(args, s.name) for s in specs if hasattr(args, s.name)})
    return values


def build_configs(values: dict[str, Any], config_cls: type) -> tuple[ScriptArguments, Any]:
    """``(ScriptArguments, config_cls instance)`` from resolved values; invalid values raise ConfigError."""
    script_names = {f.name for f in dataclasses.fields(ScriptArguments)}
    lora_given = sorted(n for n in values if n.startswith("lora_"))
    if lora_given and not values.get("use_peft"):
        raise ConfigError(f"{', '.join(lora_given)} set without use_peft: add --use_peft (or `use_peft: true`) "
                          "to train LoRA adapters, or remove the LoRA options.")
    script = ScriptArguments(**{k: v for k, v in values.items() if k in script_names})
    kwargs = {k: v for k, v in values.items() if k not in script_names}
    missing = [f.name for f in dataclasses.fields(config_cls)
               if f.init and _default_of(f) is _MISSING and f.name not in kwargs]
    if missing:
        raise ConfigError(f"{config_cls.__name__} needs {', '.join(missing)}: "
                          f"pass --{missing[0]} or set it in the YAML file.")
    try:
        config = config_cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"invalid {config_cls.__name__}: {e}") from e
    return script, config


def require(values: dict[str, Any], *names: str) -> None:
    """Raise a ConfigError naming the first of ``names`` that is unset."""
    for name in names:
        if values.get(name) is None:
            raise ConfigError(f"--{name} is required: give it on the command line or as "
                              f"`{name}: ...` in the --config YAML file.")


def lora_config(script: ScriptArguments, task_type: str = "CAUSAL_LM") -> Any:
    """A ``peft.LoraConfig`` from the script arguments, or None when ``use_peft`` is off."""
    if not script.use_peft:
        return None
    try:
        from peft import LoraConfig
    except ImportError as e:
        raise ConfigError("--use_peft needs the peft package: pip install 'honelm[peft]'.") from e
    targets: Any = script.lora_target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    return LoraConfig(r=script.lora_r, lora_alpha=script.lora_alpha, lora_dropout=script.lora_dropout,
                      target_modules=targets, task_type=task_type)


# ---- Launching -------------------------------------------------------------------------------


def _has_accelerator() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def launch_command(args: argparse.Namespace, command: str, values: dict[str, Any]) -> list[str] | None:
    """The ``accelerate launch`` command that re-runs ``honelm COMMAND`` (without the launch flags),
    or None when no launch flag was given."""
    config_file = getattr(args, "accelerate_config", None)
    num_processes = getattr(args, "num_processes", None)
    port = getattr(args, "main_process_port", None)
    if config_file is None and num_processes is None:
        if port is not None:
            raise ConfigError("--main_process_port is used with --num_processes or --accelerate_config.")
        return None
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file is not None:
        if not os.path.isfile(config_file):
            raise ConfigError(f"--accelerate_config {config_file}: no such file (make one with `accelerate config`).")
        cmd += ["--config_file", config_file]
    extra: list[str] = []
    if num_processes is not None:
        if num_processes < 1:
            raise ConfigError(f"--num_processes must be at least 1, got {num_processes}.")
        cmd += ["--num_processes", str(num_processes)]
        if config_file is None and num_processes > 1:
            cmd.append("--multi_gpu")  # accelerate's one-process-per-rank launcher (torchrun)
            if not values.get("use_cpu") and not _has_accelerator():
                print(f"honelm: no GPU found: training in {num_processes} CPU processes (--use_cpu true, gloo).",
                      file=sys.stderr)
                extra = ["--use_cpu", "true"]
    if port is not None:
        cmd += ["--main_process_port", str(port)]
    return [*cmd, "-m", "honelm.cli", command, *getattr(args, "_cli_argv", []), *extra]
