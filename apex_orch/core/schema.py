"""The schema of a YAML config is its dataclasses: keys, types and bounds read from the fields.

`check_keys` is the one unknown-key check of every config apex-orch reads (profiles, corpus
specs, release configs): `file:line: unknown key 'bands.nearr'`, the allowed keys and the closest
one in the hint. `read_section(cls, data, ...)` reads a mapping into the dataclass `cls`: its keys
are the fields (a field's `key` metadata renames it; `yaml=False` leaves it out), each value is
checked against the field's annotation (int, float, bool, str, optionally None) and its `bounds`
metadata (minimum, maximum, choices, pattern), and every error names the file:line and the key.
Fields of other types (nested mappings, lists) are read by the caller and are only key-checked.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from difflib import get_close_matches
from typing import Any, Callable, Iterable, Mapping

from apex_orch.core.errors import ApexError, ProfileError

Where = Callable[[tuple[Any, ...]], str | None]      # key path -> "file:line" (None: not known)


@dataclass(frozen=True)
class Bounds:
    minimum: int | float | None = None
    maximum: int | float | None = None
    why_maximum: str | None = None          # said after "at most N" (why the bound exists)
    hint_maximum: str | None = None
    choices: tuple[str, ...] | None = None
    pattern: re.Pattern[str] | None = None
    what: str | None = None                 # what a value matching `pattern` is ("a corpus name")


def bounds(**kw: Any) -> dict[str, Any]:
    """Field metadata: `field(default=5, metadata=bounds(minimum=0))`."""
    return {"bounds": Bounds(**kw)}


def key_name(key_path: Iterable[Any]) -> str:
    """('overrides', 0, 'type') -> 'overrides[0].type'."""
    out = ""
    for k in key_path:
        out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else str(k))
    return out


def yaml_keys(cls: type) -> list[str]:
    """The YAML keys a dataclass reads, in field order."""
    return [f.metadata.get("key", f.name) for f in dataclasses.fields(cls) if f.metadata.get("yaml", True)]


def check_keys(mapping: Mapping[str, Any], allowed: Iterable[str], where: Where, key_path: tuple[Any, ...] = (),
               error: type[ApexError] = ProfileError) -> None:
    """The one unknown-key check: `error` at the unknown key's line, naming its whole path."""
    allowed = sorted(allowed)
    for key in mapping:
        if key not in allowed:
            close = get_close_matches(str(key), allowed, n=1)
            raise error(f"unknown key {key_name(key_path + (key,))!r}", where=where(key_path + (key,)),
                        hint="allowed here: " + ", ".join(allowed) + (f"; did you mean {close[0]!r}?" if close else ""))


def _plain_type(annotation: Any) -> tuple[type | None, bool]:
    """(int / float / bool / str, or None for anything else; whether None is allowed)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        inner, _ = _plain_type(rest[0]) if len(rest) == 1 else (None, False)
        return inner, type(None) in args
    return (annotation if annotation in (int, float, bool, str) else None), False


def read_section(cls: type, data: Mapping[str, Any], where: Where, key_path: tuple[Any, ...] = (),
                 error: type[ApexError] = ProfileError, **given: Any) -> Any:
    """`data` as a `cls` (keys, types and bounds from its fields); fields in `given` are set by the
    caller, who has read them itself."""
    check_keys(data, yaml_keys(cls), where, key_path, error)
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = dict(given)
    for f in dataclasses.fields(cls):
        key = f.metadata.get("key", f.name)
        if f.name in given or not f.metadata.get("yaml", True) or key not in data:
            continue
        kind, optional = _plain_type(hints[f.name])
        value = data[key]
        if kind is not None and not (value is None and optional):
            value = _check(value, kind, f.metadata.get("bounds", Bounds()), key_path + (key,), where, error)
        values[f.name] = value
    return cls(**values)


def _check(value: Any, kind: type, b: Bounds, kp: tuple[Any, ...], where: Where, error: type[ApexError]) -> Any:
    name, at = key_name(kp), where(kp)
    if kind is bool:
        if not isinstance(value, bool):
            raise error(f"{name} must be true or false", where=at)
        return value
    if kind in (int, float):
        ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
        if not ok or (b.minimum is not None and value < b.minimum):
            word = "an integer" if kind is int else "a number"
            if b.minimum == 0:
                word = "a non-negative integer" if kind is int else "a non-negative number"
            elif b.minimum is not None:
                word += f" of at least {b.minimum}"
            raise error(f"{name} must be {word}", where=at)
        if b.maximum is not None and value > b.maximum:
            raise error(f"{name} is {value:,}; at most {b.maximum}" + (f" ({b.why_maximum})" if b.why_maximum else ""),
                        where=at, hint=b.hint_maximum)
        return float(value) if kind is float else value
    if b.choices is not None and value not in b.choices:
        raise error(f"{name} must be one of {', '.join(b.choices)}", where=at)
    if not isinstance(value, str):
        raise error(f"{name} must be {b.what or 'a string'}, got {value!r}", where=at)
    if b.pattern is not None and not b.pattern.match(value):
        raise error(f"{name}: {value!r} is not {b.what or 'valid here'}", where=at)
    return value
