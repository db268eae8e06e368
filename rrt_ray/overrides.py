"""Typed dataclass configs from plain dicts, YAML and dotted `section.key=value` overrides.

One home for the rules every config of the project follows (training `TrainConfig`, the Serve app's
`ServeAppConfig`, and the configs built on them):

- `build(cls, data)`: a (nested) dataclass from a dict; an unknown key is refused with the list of the
  valid dotted keys; each value is coerced to its field's annotated type (`coerce`), then the
  dataclasses' own `__post_init__` checks run.
- `apply_override(data, "a.b=value")`: one command-line override into a nested dict; the value is parsed
  as YAML (`null`, `true`, `[1, 2]`, `3e-4`).
- `coerce(value, kind, key)`: a YAML or command-line value to `int`, `float`, `bool`, `str` or a union of
  them. Strings are accepted for every type, because command lines and `serve run` arguments deliver
  strings. Booleans follow one rule everywhere: `BOOL_WORDS`, any case; anything else is an error,
  never a silent False.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import yaml

# The one boolean rule (YAML 1.1's words, which `apply_override`'s YAML parsing also applies).
BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
NULL_WORDS = ("null", "none", "~")


def field_types(cls: type) -> dict[str, Any]:
    """{field name: resolved annotation} of a dataclass (string annotations resolved)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def valid_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key a dataclass config accepts (`optim.lr`, `zero.stage`, ...)."""
    keys = []
    for name, kind in field_types(cls).items():
        if dataclasses.is_dataclass(kind):
            keys += valid_keys(kind, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one `a.b=value` override to a nested dict in place; the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ValueError(f"override {item!r} is not of the form section.key=value")
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {item!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""


def build(cls: type, data: Any, prefix: str = "") -> Any:
    """A dataclass (nested ones included) from a dict: unknown keys refused, values coerced."""
    if not isinstance(data, dict):
        raise ValueError(f"config section {prefix.rstrip('.') or '<root>'!r} must be a mapping, got {data!r}")
    kinds = field_types(cls)
    unknown = sorted(set(data) - set(kinds))
    if unknown:
        raise ValueError(f"unknown config key {prefix + unknown[0]!r}; valid keys: {', '.join(valid_keys(cls, prefix))}")
    kwargs = {}
    for name, value in data.items():
        kind = kinds[name]
        if dataclasses.is_dataclass(kind):
            kwargs[name] = build(kind, value if value is not None else {}, f"{prefix}{name}.")
        else:
            kwargs[name] = coerce(value, kind, prefix + name)
    return cls(**kwargs)


def _options(kind: Any) -> tuple[Any, ...]:
    union = isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union
    return typing.get_args(kind) if union else (kind,)


def coerce(value: Any, kind: Any, key: str) -> Any:
    """Coerce a YAML or command-line value to the annotated type `kind`, or say what was expected."""
    options = _options(kind)
    if value is None or (isinstance(value, str) and value.lower() in NULL_WORDS and type(None) in options):
        if type(None) in options:
            return None
        raise ValueError(f"{key} must not be null")
    for option in options:
        converted = _convert(value, option)
        if converted is not _NO:
            return converted
    names = " or ".join("null" if o is type(None) else getattr(o, "__name__", str(o)) for o in options)
    raise ValueError(f"{key} must be {names}, got {value!r}")


_NO = object()


def _convert(value: Any, option: Any) -> Any:
    """value as `option`, or _NO when it is not one."""
    if option is bool:
        if isinstance(value, bool):
            return value
        return BOOL_WORDS.get(value.lower(), _NO) if isinstance(value, str) else _NO
    if option in (int, float):
        if isinstance(value, bool):
            return _NO
        if isinstance(value, int) or (option is float and isinstance(value, float)):
            return option(value)
        if isinstance(value, str):
            try:  # PyYAML reads "3e-4" as a string
                return option(value)
            except ValueError:
                return _NO
        return _NO
    if option is str:
        return value if isinstance(value, str) else _NO
    origin = typing.get_origin(option) or option
    if origin in (list, tuple, dict) and isinstance(value, origin):
        return value
    if option is Any:
        return value
    return _NO
