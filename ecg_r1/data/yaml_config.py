"""Reading a YAML configuration file a user hands the command line: safely, and failing in one line.

Every YAML file the ``ecg-r1`` commands read (label rules, profiles, launch configurations) goes
through :func:`load_yaml_mapping`: YAML's safe loader (a tag such as ``!!python/object`` is
refused, never constructed), a mapping at the top level, and every failure (a missing file, a
parse error, a refused tag, text that is not UTF-8, a list where a mapping belongs) raised as a
:class:`ConfigFileError` whose message is one line naming the file and the place.

:func:`typed_settings` turns such a mapping into a dataclass whose fields are the one definition of
each setting (type, default, bounds as ``Annotated`` constraints, and where it sits in the file);
pydantic validates the values against them, and a failure is one line naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

# A dataclass field's metadata key naming where the field sits in its file: a dotted place
# (``image.width`` for a flat class read from sections), or None for a field the caller sets; a
# field without it is read from its own name.
YAML_KEY = "yaml"
# A settings dataclass's pydantic configuration (its ``__pydantic_config__``): an unknown key is
# an error, not ignored, so a misspelt setting never silently keeps its default.
FORBID_UNKNOWN_KEYS = {"extra": "forbid"}

# libyaml's safe loader where it is built in (several times faster), else the pure-Python one.
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ConfigFileError(ValueError):
    """A configuration file cannot be read; the message (one line) names the file and why."""


def load_yaml_mapping(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping a YAML file holds (an empty file gives ``{}``).

    Args:
        path: the file.

    Returns:
        The top-level mapping.

    Raises:
        ConfigFileError: the file cannot be read, is not UTF-8 or not YAML, uses a tag the safe
            loader refuses, or holds something other than a mapping at the top level.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigFileError(f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc
    except OSError as exc:
        raise ConfigFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.load(text, Loader=_SAFE_LOADER)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = " ".join(part for part in (exc.context, exc.problem) if part)
        raise ConfigFileError(f"{path} is not valid YAML{where}: {_one_line(what)}") from exc
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"{path} is not valid YAML: {_one_line(str(exc))}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(
            f"{path} must hold a mapping (key: value lines) at the top level, not a {_kind(data)}"
        )
    return data


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _kind(value: object) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(
        type(value), type(value).__name__
    )


def typed_settings(
    cls: type[T],
    raw: Mapping[str, Any],
    where: str,
    *,
    prefix: str = "",
    given: Mapping[str, Any] | None = None,
) -> T:
    """The dataclass ``cls`` with its settings read from ``raw``, a mapping of a YAML file.

    Each field is read from its place in the file (:data:`YAML_KEY`), and its type, default and
    bounds are the dataclass's own: pydantic validates the values against the annotations (a
    nested dataclass field takes a mapping, and refuses unknown keys where the class sets
    :data:`FORBID_UNKNOWN_KEYS`), then the class's ``__post_init__`` checks what spans fields. A
    key left empty (null) takes the field's default unless its type admits None.

    Args:
        cls: the settings dataclass.
        raw: the file's mapping (or the part of it that ``prefix`` names).
        where: the file, as the messages name it.
        prefix: the dotted place of ``raw`` in the file (``stages.sft``), for the messages.
        given: field name -> value, for fields the caller sets (a value from the file is not read
            for them).

    Returns:
        The validated ``cls`` instance.

    Raises:
        ConfigFileError: one line naming ``where`` and the key: an unknown key, a section that is
            not a mapping, a value of the wrong type or out of bounds, or a failed check of the
            class (its ``__post_init__``'s ValueError).
    """
    from pydantic import ValidationError

    places = _places(cls)
    values = dict(given or {})
    _read_section(raw, _tree(places), prefix, values, where)
    try:
        return _adapter(cls).validate_python(_without_empty_keys(cls, values))
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = [str(part) for part in error["loc"]]
        key = ".".join(
            part for part in (prefix, *([places.get(loc[0], loc[0])] if loc else []), *loc[1:]) if part
        )
        raise ConfigFileError(f"{where}: {_problem(cls, error, loc, key)}") from None


@functools.cache
def _adapter(cls: type) -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(cls)


def _places(cls: type) -> dict[str, str | None]:
    """Field name -> its dotted place in the file (None: set by the caller)."""
    return {f.name: f.metadata.get(YAML_KEY, f.name) for f in dataclasses.fields(cls)}


def _tree(places: Mapping[str, str | None]) -> dict[str, Any]:
    """The file's shape: key -> field name, or -> the keys of a section."""
    tree: dict[str, Any] = {}
    for name, place in places.items():
        if place is None:
            continue
        *sections, leaf = place.split(".")
        node = tree
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = name
    return tree


def _read_section(node: Any, tree: Mapping[str, Any], place: str, values: dict[str, Any], where: str) -> None:
    if not isinstance(node, Mapping):
        raise ConfigFileError(f"{where}: {place} {_shown(node)} is not a mapping")
    if unknown := sorted(str(key) for key in node if key not in tree):
        raise ConfigFileError(f"{where}: {_unknown(_join(place, unknown[0]), list(tree))}")
    for key, sub in tree.items():
        if key not in node:
            continue
        if isinstance(sub, dict):  # a section of several fields; left empty, they keep their defaults
            if node[key] is not None:
                _read_section(node[key], sub, _join(place, key), values, where)
        else:
            values.setdefault(sub, node[key])  # a value the caller gives wins


def _shown(value: Any) -> str:
    """A value as a message quotes it: its repr, cut short (a whole section would not fit a line)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _join(*parts: str) -> str:
    return ".".join(part for part in parts if part)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _bare(hint: Any) -> Any:
    """The type under ``Annotated`` constraints."""
    return typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint


def _without_empty_keys(hint: Any, value: Any) -> Any:
    """``value`` for the type ``hint`` without its keys left empty (null) where the field's type
    has no None, at every depth of nested dataclasses: those take their defaults."""
    owner = _dataclass_in(hint)
    if owner is None or not isinstance(value, Mapping):
        return value
    hints = _hints(owner)
    return {
        key: _without_empty_keys(hints.get(key), item)
        for key, item in value.items()
        if item is not None or key not in hints or _admits_none(hints[key])
    }


def _admits_none(hint: Any) -> bool:
    hint = _bare(hint)
    return hint is type(None) or (
        typing.get_origin(hint) in (typing.Union, types.UnionType)
        and any(_admits_none(arg) for arg in typing.get_args(hint))
    )


def _dataclass_in(hint: Any) -> Any:
    """The dataclass a type is, or is one of (``Settings | None``), or None."""
    hint = _bare(hint)
    return next((arg for arg in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(arg)), None)


def _hint_at(cls: type, loc: list[str]) -> Any:
    """The type of the value at ``loc`` (field names through nested dataclasses), or None."""
    hint: Any = cls
    for part in loc:
        owner = _dataclass_in(hint)
        hint = None if owner is None else _hints(owner).get(part)
    return hint


def _unknown(key: str, allowed: list[str]) -> str:
    parent = key.rpartition(".")[0]
    return f"unknown key {key}; allowed{' in ' + parent if parent else ''}: {', '.join(sorted(allowed))}"


# What a value must be, by pydantic's error type.
_EXPECTED = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "string": "a string",
    "dict": "a mapping",
    "dataclass": "a mapping",
    "mapping": "a mapping",
    "list": "a list",
    "tuple": "a list",
}
_BOUNDS = {
    "greater_than": "greater than",
    "greater_than_equal": "at least",
    "less_than": "below",
    "less_than_equal": "at most",
}


def _problem(cls: type, error: Mapping[str, Any], loc: list[str], key: str) -> str:
    """One line on a pydantic error at ``key``: what the value must be."""
    kind, value = error["type"], error.get("input")
    ctx = error.get("ctx") or {}
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        owner = _dataclass_in(_hint_at(cls, loc[:-1]))
        return _unknown(key, [f.name for f in dataclasses.fields(owner)] if owner else [])
    if kind == "missing":
        return f"{key} is required"
    if kind == "value_error":  # a check of the class itself (__post_init__)
        return f"{key + ': ' if key else ''}{ctx.get('error', error['msg'])}"
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        optional = " or null" if _admits_none(_hint_at(cls, loc)) else ""
        return f"{key} {_shown(value)} is not one of {', '.join(choices)}{optional}"
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        return f"{key} {_shown(value)} is not {_BOUNDS[kind]} {bound:g}"
    if kind in ("too_short", "string_too_short"):
        return f"{key} must not be empty"
    expected = _EXPECTED.get(kind.split("_")[0])
    return f"{key} {_shown(value)} is not {expected}" if expected else f"{key}: {error['msg']}"
