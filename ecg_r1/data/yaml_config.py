"""Reading a YAML configuration file a user hands the command line: safely, and failing in one line.

Every YAML file the ``ecg-r1`` commands read (label rules, profiles, launch configurations) goes
through :func:`load_yaml_mapping`: YAML's safe loader (a tag such as ``!!python/object`` is
refused, never constructed), a mapping at the top level, and every failure (a missing file, a
parse error, a refused tag, text that is not UTF-8, a list where a mapping belongs) raised as a
:class:`ConfigFileError` whose message is one line naming the file and the place.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

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
