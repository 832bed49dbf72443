"""Config dataclasses as command-line options: the one mechanism behind every `pyvf`
command's keys and its --help.

A field declared with `option(default, "explanation")` is a key: `add_options` turns a
dataclass into argparse options (--key-with-dashes, each printed with its explanation and
default), and `coerce` reads a value given as text (the command line) or parsed from a
YAML/TOML file into the field's type, so both sources are read the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing


class ConfigError(ValueError):
    """A configuration problem, reported as one line and exit code 2 by the CLI."""


def option(default, help: str, *, choices: tuple | None = None, minimum: float | None = None,
           maximum: float | None = None):
    """A dataclass field that is a config key, with its explanation and the values it
    allows (`check` enforces them)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "minimum": minimum,
                                                        "maximum": maximum})


def keys(cls) -> dict[str, dataclasses.Field]:
    """The config keys of a dataclass (its `option` fields), in declaration order."""
    return {f.name: f for f in dataclasses.fields(cls) if "help" in f.metadata}


def _is_optional(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def is_optional(cls, name: str) -> bool:
    return _is_optional(typing.get_type_hints(cls)[name])


def coerce(cls, name: str, value):
    """`value` (text, or what YAML/TOML/JSON parsed) as field `name` of `cls`."""
    hint = typing.get_type_hints(cls)[name]
    if _is_optional(hint):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "default")):
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if hint is float:
            return float(value)
        value = str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be {hint.__name__}, got {value!r}") from None
    choices = keys(cls)[name].metadata.get("choices") if name in keys(cls) else None
    if choices and value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def check(config) -> None:
    """Raises ConfigError naming the first key of `config` outside its allowed values."""
    for name, f in keys(type(config)).items():
        value, meta = getattr(config, name), f.metadata
        if value is None:
            continue
        if meta["choices"] and value not in meta["choices"]:
            raise ConfigError(f"{name} must be one of {', '.join(meta['choices'])}, got {value!r}")
        lo, hi = meta["minimum"], meta["maximum"]
        if lo is None and hi is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value}")
        if lo is not None and hi is not None and not lo <= value <= hi:
            raise ConfigError(f"{name} must be in [{lo}, {hi}], got {value}")
        if lo is not None and value < lo:
            raise ConfigError(f"{name} must be >= {lo}, got {value}")
        if hi is not None and value > hi:
            raise ConfigError(f"{name} must be <= {hi}, got {value}")


def describe(f: dataclasses.Field) -> str:
    """A key's explanation and default, as --help prints it."""
    shown = "none" if f.default is None else ('""' if f.default == "" else f.default)
    return f"{f.metadata['help']} (default: {shown})"


def add_option(parser, cls, name: str, *, given_only: bool = False, default_text: str | None = None) -> None:
    """The --key option of field `name` of `cls` (see `add_options`); `default_text`
    replaces the default shown in the help."""
    f = keys(cls)[name]
    text = describe(f) if default_text is None else f"{f.metadata['help']} (default: {default_text})"
    parser.add_argument("--" + name.replace("_", "-"), dest=name, metavar=name.upper(),
                        type=lambda value: _parse(cls, name, value),
                        default=argparse.SUPPRESS if given_only else f.default, help=text)


def add_options(parser, cls, *, given_only: bool = False) -> None:
    """One --key option per key of `cls` on `parser` (or an argument group). Values are
    coerced to the field's type (`coerce`). `given_only`: keys not on the command line
    are left out of the parsed namespace (for configs merged from a file and an earlier
    run)."""
    for name in keys(cls):
        add_option(parser, cls, name, given_only=given_only)


def _parse(cls, name: str, text: str):
    try:
        return coerce(cls, name, text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def from_args(cls, args: argparse.Namespace, **extra):
    """An instance of `cls` from the parsed options of `add_options`, its values checked
    against their allowed ranges (`check`)."""
    config = cls(**{name: getattr(args, name) for name in keys(cls) if hasattr(args, name)}, **extra)
    check(config)
    return config


__all__ = ["ConfigError", "add_option", "add_options", "check", "coerce", "describe", "from_args", "is_optional",
           "keys", "option"]
