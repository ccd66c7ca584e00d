"""Settings from files and from the command line, read the same way by every program.

- :func:`read_yaml_mapping`: the mapping a YAML file holds (JSON is YAML), for training
  configs, service settings and run folders.
- :func:`add_overrides_argument` and :func:`apply_overrides`: ``--set key=value`` overrides,
  the value read as YAML (``8``, ``0.5``, ``[8, 11]``, ``null``) and a dotted key naming a
  nested field (``optim.lr=0.002``), for ``psearch-train``, ``psearch-serve`` and the
  benchmark scripts.

Errors are :class:`ConfigFileError` with a one-line message that names the file or the override.
"""

import argparse
from collections.abc import Iterable
from os import PathLike
from pathlib import Path
from typing import Any

import yaml


class ConfigFileError(ValueError):
    """A settings file or an override that cannot be read; the message is one line."""


def read_yaml_mapping(path: str | PathLike, what: str = "file") -> dict[str, Any]:
    """The mapping in a YAML file; an empty file is an empty mapping. ``what`` names the file
    in messages (``config file``, ``settings file``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigFileError(f"{what} not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigFileError(f"{path}: invalid YAML: {_one_line(error)}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigFileError(f"{path}: cannot be read: {_one_line(error)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}: expected a mapping of keys, got {type(data).__name__}")
    return data


def add_overrides_argument(parser: argparse.ArgumentParser, what: str, example: str) -> None:
    """The repeatable ``--set KEY=VALUE`` option, collected in ``overrides`` for
    :func:`apply_overrides`; ``what`` it overrides and an ``example`` go into its help."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override {what}, e.g. --set {example} (the value is read as YAML; repeatable)",
    )


def parse_override(override: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` as (``["a", "b", "c"]``, the value parsed as YAML)."""
    key, separator, text = override.partition("=")
    parts = [part.strip() for part in key.split(".")]
    if not separator or not all(parts):
        raise ConfigFileError(f"override {override!r} is not of the form KEY=VALUE (a.b=VALUE)")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigFileError(f"override {override!r}: the value is not valid YAML") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Set each ``a.b.c=value`` of ``overrides`` in the nested dicts of ``data`` (in place, the
    sections made where missing); returns ``data``."""
    for override in overrides:
        (*parents, leaf), value = parse_override(override)
        node = data
        for depth, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                section = ".".join(parents[: depth + 1])
                raise ConfigFileError(f"override {override!r}: {section} is a value, not a section")
            node = child
        node[leaf] = value
    return data


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())
