"""The stability contract: the experimental warning and the deprecation helpers.

honelm's top level and its stable submodules follow semantic versioning (STABILITY.md):
nothing there is renamed or removed without a deprecation that names the version it goes
away in, and a shim that keeps old code running until then. The helpers below write
those shims:

- :func:`deprecated_fields`: renamed or dropped fields of a config dataclass;
- :func:`deprecated_params`: renamed or dropped keyword arguments of a function;
- :func:`deprecated_values`: renamed values of an argument (``loss_type="old"``);
- :func:`deprecated_names`: renamed module attributes, served by a module ``__getattr__``;
- :func:`deprecated`: a function, method or class that is going away.

The old spelling keeps working and warns with ``FutureWarning`` (shown to users by
default), naming the replacement and the version it is removed in. Every deprecation is
registered when it is declared, so :func:`check_removals` can fail our own CI as soon as
the version reaches a ``removed_in``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import os
import sys
import warnings
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import KW_ONLY, dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

if TYPE_CHECKING:  # pragma: no cover
    from packaging.version import Version

__all__ = [
    "DeprecatedField",
    "DeprecatedName",
    "DeprecatedNames",
    "DeprecatedValue",
    "DeprecatedValues",
    "Deprecation",
    "ExperimentalWarning",
    "check_removals",
    "deprecated",
    "deprecated_fields",
    "deprecated_names",
    "deprecated_params",
    "deprecated_values",
    "registered_deprecations",
]

F = TypeVar("F", bound=Callable[..., Any])
C = TypeVar("C", bound=type)

_SILENCE_ENV = "HONELM_SILENCE_EXPERIMENTAL"
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class ExperimentalWarning(UserWarning):
    """Emitted once when ``honelm.experimental`` is imported: its API may change in any release."""


# --------------------------------------------------------------------------- warnings


def _is_bootstrap(filename: str) -> bool:
    """Frames of the import machinery, which ``warnings`` leaves out when it counts ``stacklevel``."""
    return "importlib" in filename and "_bootstrap" in filename


def _stacklevel_outside(*prefixes: str) -> int:
    """The ``stacklevel`` that points a warning raised by our caller at user code.

    Frames of this file, of the import machinery and of files starting with one of
    ``prefixes`` are skipped; 1 is the caller itself. Import-machinery frames are not
    counted, as ``warnings.warn`` does not count them either.
    """
    skip = (__file__, importlib.__file__, *prefixes)
    frame = sys._getframe(1)
    level = 1
    while frame is not None:
        filename = frame.f_code.co_filename
        if not (_is_bootstrap(filename) or filename.startswith(skip)):
            break
        frame = frame.f_back
        if frame is not None and not _is_bootstrap(frame.f_code.co_filename):
            level += 1
    return level


_experimental_warned = False


def _warn_experimental_import() -> None:
    """Warn, once per process, that ``honelm.experimental`` was imported."""
    global _experimental_warned
    if _experimental_warned:
        return
    _experimental_warned = True
    if os.environ.get(_SILENCE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}:
        return
    message = (
        "honelm.experimental is imported: its methods are still proving their value and "
        "their API may change in any release, without a deprecation period. "
        f"Set the environment variable {_SILENCE_ENV}=1 to silence this warning."
    )
    level = _stacklevel_outside(os.path.join(_PACKAGE_DIR, "experimental"))
    warnings.warn(message, ExperimentalWarning, stacklevel=level)


# --------------------------------------------------------------------------- versions


def _parse_version(text: str, what: str, role: str) -> Version:
    """Parse a version number, or raise an error that names the declaration."""
    from packaging.version import InvalidVersion, Version

    try:
        return Version(str(text))
    except InvalidVersion:
        raise ValueError(
            f"{what}: {role}={text!r} is not a version number; write it like '0.4'."
        ) from None


def _check_versions(what: str, since: str, removed_in: str) -> None:
    """Enforce the policy: removal only in a minor/major release, two minors after ``since``."""
    start = _parse_version(since, what, "since")
    end = _parse_version(removed_in, what, "removed_in")
    if any(end.release[2:]) or end.pre or end.dev is not None or end.post is not None or end.local:
        raise ValueError(
            f"{what}: removed_in={removed_in!r} is not a minor or major release; nothing is "
            f"removed in a patch or pre-release. Use e.g. removed_in='{end.major}.{end.minor + 1}'."
        )
    if end.major < start.major or (end.major == start.major and end.minor < start.minor + 2):
        raise ValueError(
            f"{what}: removed_in={removed_in!r} is less than two minor releases after "
            f"since={since!r}; a deprecation lasts at least two minor releases. "
            f"Use removed_in='{start.major}.{start.minor + 2}' or later."
        )


def _release_of(version: str) -> Version:
    """The release a version belongs to: ``0.4.0.dev1`` and ``0.4.0rc1`` count as ``0.4.0``."""
    from packaging.version import Version

    return Version(_parse_version(version, "current version", "version").base_version)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Deprecation:
    """One registered deprecation: what is deprecated, its replacement, and when it goes.

    ``kind`` is ``"field"``, ``"param"``, ``"value"``, ``"name"`` or ``"callable"``;
    ``name`` is what users wrote (``"SFTConfig.max_seq_length"``); ``module`` is the
    module that declared it.
    """

    kind: str
    name: str
    replacement: str | None
    since: str
    removed_in: str
    module: str = ""
    note: str | None = None

    def __post_init__(self) -> None:
        _check_versions(self.name, self.since, self.removed_in)

    def message(self) -> str:
        """The warning text: what, since when, until when, and what to use instead."""
        text = (
            f"{self.name} is deprecated since honelm {self.since} and will be removed in "
            f"honelm {self.removed_in}"
        )
        text += f": use {self.replacement} instead." if self.replacement else "."
        return f"{text} {self.note}" if self.note else text

    def warn(self, stacklevel: int = 1) -> None:
        """Emit the ``FutureWarning``; ``stacklevel=1`` points at the function calling this."""
        warnings.warn(self.message(), FutureWarning, stacklevel=stacklevel + 1)

    def is_due(self, current_version: str) -> bool:
        """Whether ``current_version`` (dev and pre-releases included) has reached ``removed_in``."""
        return _release_of(current_version) >= _parse_version(self.removed_in, self.name, "removed_in")

    def __str__(self) -> str:
        where = f" (declared in {self.module})" if self.module else ""
        return f"{self.name}{where}: since {self.since}, removed in {self.removed_in}"


_REGISTRY: dict[tuple[str, str, str], Deprecation] = {}


def _register(deprecation: Deprecation) -> Deprecation:
    """Record a deprecation; declaring it again (a module reload) replaces the old record."""
    _REGISTRY[(deprecation.kind, deprecation.module, deprecation.name)] = deprecation
    return deprecation


def registered_deprecations() -> list[Deprecation]:
    """Every deprecation declared by the modules imported so far, sorted by module and name."""
    return sorted(_REGISTRY.values(), key=lambda d: (d.module, d.name, d.kind))


def check_removals(current_version: str | None = None) -> list[Deprecation]:
    """The registered deprecations whose ``removed_in`` is reached by ``current_version``.

    ``current_version`` defaults to ``honelm.__version__``. Development and
    pre-releases count as their release, so removals are due as soon as the version is
    bumped to ``0.4.0.dev0``. Our test suite fails when this list is not empty: remove
    the shim (and the old spelling) listed.
    """
    if current_version is None:
        from .version import __version__ as current_version
    return [d for d in registered_deprecations() if d.is_due(current_version)]


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class _Spec:
    new: Any
    _: KW_ONLY
    since: str
    removed_in: str
    note: str | None = None

    def __post_init__(self) -> None:
        _check_versions(f"{type(self).__name__}({self.new!r})", self.since, self.removed_in)


class DeprecatedField(_Spec):
    """A renamed (``new="name"``) or dropped (``new=None``) field or keyword argument.

    ``DeprecatedField("max_length", since="0.2", removed_in="0.4")``
    """


class DeprecatedValue(_Spec):
    """The replacement of a deprecated argument value: ``DeprecatedValue("sigmoid", since=..., removed_in=...)``."""


class DeprecatedName(_Spec):
    """The new name of a module attribute: ``"NewName"`` (same module), ``"pkg.mod.Name"`` or ``"pkg.mod:Name"``."""


def _qualname(obj: Any) -> str:
    """The qualified name as users read it: ``Config``, not ``make.<locals>.Config``."""
    return obj.__qualname__.rsplit("<locals>.", 1)[-1]


class _Rename(NamedTuple):
    old: str
    new: str | None
    deprecation: Deprecation


def _apply_renames(
    owner: str, kwargs: dict[str, Any], table: Mapping[str, _Rename], stacklevel: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Move deprecated keyword arguments to their new names, warning for each.

    Returns the new kwargs and the values of dropped names (``new=None``).
    ``stacklevel`` counts from this function's caller (1 = the caller).
    """
    dropped: dict[str, Any] = {}
    for old in [name for name in kwargs if name in table]:
        rename = table[old]
        value = kwargs.pop(old)
        rename.deprecation.warn(stacklevel=stacklevel + 1)
        if rename.new is None:
            dropped[old] = value
        elif rename.new in kwargs:
            raise TypeError(
                f"{owner}() got both {old!r} (deprecated) and {rename.new!r}, its replacement; "
                f"pass only {rename.new!r}."
            )
        else:
            kwargs[rename.new] = value
    return kwargs, dropped


# --------------------------------------------------------------------------- fields


class _DeprecatedAttribute:
    """Class attribute under a deprecated field name: reads and writes go to the new field."""

    def __init__(self, rename: _Rename) -> None:
        self.rename = rename

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        self.rename.deprecation.warn(stacklevel=2)
        if self.rename.new is None:
            return obj.__dict__.get(self.rename.old)
        return getattr(obj, self.rename.new)

    def __set__(self, obj: Any, value: Any) -> None:
        self.rename.deprecation.warn(stacklevel=2)
        if self.rename.new is None:
            obj.__dict__[self.rename.old] = value
        else:
            setattr(obj, self.rename.new, value)


class _InitSignature:
    """``inspect.signature(cls)`` from ``cls.__init__``, which the ``__new__`` hook would hide."""

    def __get__(self, obj: Any, owner: type) -> inspect.Signature:
        if obj is not None:
            raise AttributeError("__signature__")
        signature = inspect.signature(owner.__init__)
        return signature.replace(parameters=list(signature.parameters.values())[1:])


def _wrap_init(cls: type) -> None:
    """Make ``cls.__init__`` accept the deprecated field names of ``cls._deprecated_fields``."""
    init = cls.__dict__["__init__"]
    init = getattr(init, "_honelm_unwrapped", init)

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        table = type(self)._deprecated_fields
        kwargs, dropped = _apply_renames(type(self).__name__, kwargs, table, stacklevel=2)
        init(self, *args, **kwargs)
        for old, value in dropped.items():
            self.__dict__[old] = value

    __init__._honelm_unwrapped = init  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[misc]


def _make_new(owner: type) -> Callable[..., Any]:
    """A ``__new__`` that wraps the ``__init__`` a dataclass subclass generates for itself."""

    def __new__(cls: type, *args: Any, **kwargs: Any) -> Any:
        init = cls.__dict__.get("__init__")
        if init is not None and not hasattr(init, "_honelm_unwrapped"):
            _wrap_init(cls)
        parent_new = super(owner, cls).__new__
        if parent_new is object.__new__:
            return parent_new(cls)
        return parent_new(cls, *args, **kwargs)

    return __new__


def _field_rename(cls: type, old: str, spec: DeprecatedField, names: set[str]) -> _Rename:
    """Check one field deprecation against the dataclass and register it."""
    owner = _qualname(cls)
    where = f"@deprecated_fields on {owner}"
    if not isinstance(spec, DeprecatedField):
        raise TypeError(f"{where}: {old}= must be a DeprecatedField, got {spec!r}.")
    if old in names:
        raise TypeError(
            f"{where}: {old!r} is still a field of {owner}; remove the field, or "
            "remove its deprecation."
        )
    if spec.new is not None and spec.new not in names:
        raise TypeError(
            f"{where}: {old!r} is renamed to {spec.new!r}, which is not a field of "
            f"{owner}. Fields: {', '.join(sorted(names))}."
        )
    deprecation = _register(
        Deprecation(
            kind="field",
            name=f"{owner}.{old}",
            replacement=f"{owner}.{spec.new}" if spec.new else None,
            since=spec.since,
            removed_in=spec.removed_in,
            module=cls.__module__,
            note=spec.note or (None if spec.new else "It has no effect."),
        )
    )
    return _Rename(old, spec.new, deprecation)


def deprecated_fields(**renamed: DeprecatedField) -> Callable[[C], C]:
    """Class decorator for a config dataclass whose fields were renamed or dropped.

    Put it above ``@dataclass``::

        @deprecated_fields(max_seq_length=DeprecatedField("max_length", since="0.2", removed_in="0.4"))
        @dataclass
        class SFTConfig(TrainingArguments):
            max_length: int | None = 1024

    ``SFTConfig(max_seq_length=512)`` then sets ``max_length`` and warns, and so do
    reading and writing ``config.max_seq_length``. Passing both names is an error. A
    dropped field (``DeprecatedField(None, ...)``) is accepted, ignored and warned about.
    Dataclass subclasses inherit the renames (their generated ``__init__`` is wrapped at
    the first instantiation). The renames are listed in ``cls._deprecated_fields``.
    """

    def decorate(cls: C) -> C:
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise TypeError(
                f"@deprecated_fields decorates a dataclass, got {cls!r}; put it above @dataclass."
            )
        names = {field.name for field in dataclasses.fields(cls)}
        table = dict(getattr(cls, "_deprecated_fields", {}))
        for old, spec in renamed.items():
            rename = _field_rename(cls, old, spec, names)
            table[old] = rename
            setattr(cls, old, _DeprecatedAttribute(rename))
        cls._deprecated_fields = table  # type: ignore[attr-defined]
        _wrap_init(cls)
        if "__new__" not in cls.__dict__:
            cls.__new__ = staticmethod(_make_new(cls))  # type: ignore[assignment]
            cls.__signature__ = _InitSignature()  # type: ignore[attr-defined]
        return cls

    return decorate


# --------------------------------------------------------------------------- params


def _display_name(func: Callable[..., Any]) -> str:
    """``SFTTrainer`` for ``SFTTrainer.__init__``, the qualified name otherwise."""
    qualname = _qualname(func)
    return qualname[: -len(".__init__")] if qualname.endswith(".__init__") else qualname


def deprecated_params(**renamed: DeprecatedField) -> Callable[[F], F]:
    """Decorator for a function or method whose keyword arguments were renamed or dropped.

    ::

        @deprecated_params(tokenizer=DeprecatedField("processing_class", since="0.2", removed_in="0.4"))
        def __init__(self, model, processing_class=None): ...

    The old keyword keeps working (its value goes to the new one) and warns; passing
    both is an error; a dropped argument (``DeprecatedField(None, ...)``) is ignored.
    """

    def decorate(func: F) -> F:
        params = inspect.signature(func).parameters
        owner = _display_name(func)
        table = dict(getattr(func, "_honelm_deprecated_params", {}))
        for old, spec in renamed.items():
            if not isinstance(spec, DeprecatedField):
                raise TypeError(f"@deprecated_params on {owner}: {old}= must be a DeprecatedField.")
            if old in params:
                raise TypeError(
                    f"@deprecated_params on {owner}: {old!r} is still a parameter; remove it "
                    "from the signature, or remove its deprecation."
                )
            if spec.new is not None and spec.new not in params:
                raise TypeError(
                    f"@deprecated_params on {owner}: {old!r} is renamed to {spec.new!r}, which "
                    f"is not a parameter. Parameters: {', '.join(params)}."
                )
            deprecation = Deprecation(
                kind="param",
                name=f"{owner}({old}=...)",
                replacement=f"{owner}({spec.new}=...)" if spec.new else None,
                since=spec.since,
                removed_in=spec.removed_in,
                module=func.__module__,
                note=spec.note or (None if spec.new else "It has no effect."),
            )
            table[old] = _Rename(old, spec.new, _register(deprecation))

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            kwargs, _ = _apply_renames(owner, kwargs, table, stacklevel=2)
            return func(*args, **kwargs)

        wrapper._honelm_deprecated_params = table  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


# --------------------------------------------------------------------------- values


class DeprecatedValues:
    """Maps deprecated values of one argument to their replacements, warning for each.

    Made by :func:`deprecated_values`; call it on the value the user passed.
    """

    def __init__(self, where: str, renames: Mapping[Hashable, DeprecatedValue], module: str) -> None:
        self.where = where
        self._table: dict[Hashable, tuple[Any, Deprecation]] = {}
        for old, spec in renames.items():
            if not isinstance(spec, DeprecatedValue):
                raise TypeError(f"deprecated_values({where!r}): {old!r} must map to a DeprecatedValue.")
            deprecation = Deprecation(
                kind="value",
                name=f"{where}={old!r}",
                replacement=f"{where}={spec.new!r}",
                since=spec.since,
                removed_in=spec.removed_in,
                module=module,
                note=spec.note,
            )
            self._table[old] = (spec.new, _register(deprecation))

    def __contains__(self, value: object) -> bool:
        try:
            return value in self._table
        except TypeError:  # unhashable values are never deprecated spellings
            return False

    def __call__(self, value: Any, *, stacklevel: int = 2) -> Any:
        """The replacement of ``value`` if it is deprecated (with a warning), else ``value``.

        ``stacklevel`` counts from the caller: 1 points the warning at the function that
        calls this, 2 (default) at its caller.
        """
        if value not in self:
            return value
        new, deprecation = self._table[value]
        deprecation.warn(stacklevel=stacklevel + 1)
        return new


def deprecated_values(where: str, renames: Mapping[Hashable, DeprecatedValue]) -> DeprecatedValues:
    """Declare renamed values of an argument; returns a callable that maps and warns.

    ::

        _LOSS_TYPES = deprecated_values(
            "DPOConfig.loss_type", {"old": DeprecatedValue("new", since="0.2", removed_in="0.4")}
        )

        def __post_init__(self):
            self.loss_type = _LOSS_TYPES(self.loss_type, stacklevel=3)
    """
    module = sys._getframe(1).f_globals.get("__name__", "")
    return DeprecatedValues(where, renames, module)


# --------------------------------------------------------------------------- names


def _split_target(module: str, new: str) -> tuple[str, str]:
    """``(module, attribute)`` of a rename target: ``"Name"``, ``"pkg.mod.Name"`` or ``"pkg.mod:Name"``."""
    if ":" in new:
        target_module, _, attribute = new.partition(":")
        return target_module, attribute
    if "." in new:
        target_module, _, attribute = new.rpartition(".")
        return target_module, attribute
    return module, new


class DeprecatedNames:
    """Renamed attributes of one module, served from its ``__getattr__``.

    Made by :func:`deprecated_names`. ``name in table`` tells whether a name is
    deprecated; ``table.resolve(name)`` warns and returns the object under its new name,
    and raises ``AttributeError`` for any other name, so it can be the module's
    ``__getattr__`` itself.
    """

    def __init__(self, module: str, renames: Mapping[str, DeprecatedName]) -> None:
        self.module = module
        self._table: dict[str, tuple[str, str, Deprecation]] = {}
        for old, spec in renames.items():
            if not isinstance(spec, DeprecatedName) or not spec.new:
                raise TypeError(
                    f"deprecated_names({module!r}): {old!r} must map to a DeprecatedName with a new name."
                )
            target_module, attribute = _split_target(module, spec.new)
            deprecation = Deprecation(
                kind="name",
                name=f"{module}.{old}",
                replacement=f"{target_module}.{attribute}",
                since=spec.since,
                removed_in=spec.removed_in,
                module=module,
                note=spec.note,
            )
            self._table[old] = (target_module, attribute, _register(deprecation))

    def __contains__(self, name: object) -> bool:
        return name in self._table

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._table))

    def deprecation(self, name: str) -> Deprecation:
        """The registered deprecation of ``name``."""
        return self._table[name][2]

    def resolve(self, name: str) -> Any:
        """Warn and return the object now called ``new``; ``AttributeError`` for unknown names."""
        entry = self._table.get(name)
        if entry is None:
            raise AttributeError(f"module {self.module!r} has no attribute {name!r}")
        target_module, attribute, deprecation = entry
        module_file = getattr(sys.modules.get(self.module), "__file__", None)
        level = _stacklevel_outside(*([module_file] if module_file else []))
        deprecation.warn(stacklevel=level)
        return getattr(importlib.import_module(target_module), attribute)


def deprecated_names(module: str, renames: Mapping[str, DeprecatedName]) -> DeprecatedNames:
    """Declare renamed attributes of ``module`` (pass ``__name__``).

    ::

        _DEPRECATED = deprecated_names(__name__, {
            "OldTrainer": DeprecatedName("NewTrainer", since="0.2", removed_in="0.4"),
        })

        def __getattr__(name):
            if name in _DEPRECATED:
                return _DEPRECATED.resolve(name)
            ...

    Take the old names out of ``__all__``: they stay importable, with a ``FutureWarning``.
    """
    return DeprecatedNames(module, renames)


# --------------------------------------------------------------------------- callables


def _deprecate_class(cls: C, deprecation: Deprecation) -> C:
    """Warn when ``cls`` (or a subclass that does not replace ``__init__``) is instantiated."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        deprecation.warn(stacklevel=2)
        init(self, *args, **kwargs)

    cls.__init__ = __init__  # type: ignore[misc]
    cls._honelm_deprecation = deprecation  # type: ignore[attr-defined]
    return cls


def deprecated(
    *, since: str, removed_in: str, replacement: str | None = None, note: str | None = None
) -> Callable[[F], F]:
    """Decorator for a function, method or class that is going away.

    Calling it (instantiating, for a class) warns with ``FutureWarning``, naming
    ``replacement`` (free text, e.g. ``"honelm.ops.selective_logps"``) when given.
    """

    def decorate(obj: F) -> F:
        deprecation = _register(
            Deprecation(
                kind="callable",
                name=f"{obj.__module__}.{_qualname(obj)}",
                replacement=replacement,
                since=since,
                removed_in=removed_in,
                module=obj.__module__,
                note=note,
            )
        )
        if isinstance(obj, type):
            return _deprecate_class(obj, deprecation)  # type: ignore[return-value]

        @functools.wraps(obj)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            deprecation.warn(stacklevel=2)
            return obj(*args, **kwargs)

        wrapper._honelm_deprecation = deprecation  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate
