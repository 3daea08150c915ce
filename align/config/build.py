"""Plain mappings (merged YAML + overrides) -> typed, frozen config dataclasses.

``build(cls, mapping, key)`` checks every key and value against the dataclass's fields and type hints before the
dataclass's own ``__post_init__`` checks run, so a bad config fails with the dotted key, the value, what is
allowed and, for a misspelt key or choice, the closest valid one ("did you mean ...?"). A float field refuses nan
and inf (a NaN learning rate trains nothing and saves the result as done) unless its field says
``metadata={NONFINITE: True}``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections import abc
from collections.abc import Iterable, Mapping
from typing import Any, Literal, Union, get_args, get_origin

from .errors import ConfigError

_NONE = type(None)
NONFINITE = "allow_nonfinite"  # field metadata key: this float field accepts nan and inf


def suggest(name: str, choices: Iterable[str], cutoff: float = 0.6) -> str:
    """``"; did you mean 'beta'?"`` for the closest choice, or an empty string."""
    match = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=cutoff)
    return f"; did you mean {match[0]!r}?" if match else ""


class UnknownKeyError(ConfigError):
    """A key that the schema does not have."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        super().__init__(key, value, allowed)

    def __str__(self) -> str:
        return f"unknown config key {self.key!r}: {self.allowed}"


def unknown_key(key: str, valid: Iterable[str]) -> UnknownKeyError:
    valid = sorted(valid)
    leaf = key.rsplit(".", 1)[-1]
    hint = suggest(leaf, valid)
    return UnknownKeyError(key, None, f"valid keys here are {', '.join(valid)}{hint}")


def rekey(error: ValueError, key: str, fields: Iterable[str]) -> ConfigError:
    """Re-anchor an error raised by a nested dataclass (which names its keys from its usual place, e.g.
    ``trainer.max_steps``) at ``key`` (e.g. ``trainer.dpo.max_steps``)."""
    if isinstance(error, ConfigError):
        parts = error.key.split(".")
        names = set(fields)
        for i, part in enumerate(parts):
            if part in names:
                return ConfigError(".".join([key, *parts[i:]]), error.value, error.allowed)
        return error
    return ConfigError(key, None, str(error))


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is _NONE:
        return "null"
    if origin in (list, tuple, abc.Sequence):
        return "a list"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} settings"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _convert_union(tp: Any, value: Any, key: str, finite: bool) -> Any:
    args = get_args(tp)
    if value is None:
        if _NONE in args:
            return None
        raise ConfigError(key, value, _type_name(tp))
    if float in args and finite and isinstance(value, float) and not math.isfinite(value):
        return convert(float, value, key)  # its own message (a finite number), not the union's name
    errors = []
    for arg in args:
        if arg is _NONE:
            continue
        try:
            return convert(arg, value, key, finite)
        except ConfigError as exc:
            errors.append(exc)
    # a single informative branch (e.g. a nested mapping) explains itself better than the union's name
    detailed = [e for e in errors if e.key != key]
    if len(detailed) == 1:
        raise detailed[0]
    raise ConfigError(key, value, _type_name(tp))


def convert(tp: Any, value: Any, key: str, finite: bool = True) -> Any:
    """``value`` checked (and lightly coerced: int -> float, list -> tuple) against the type hint ``tp``.
    ``finite``: a float must not be nan or inf."""
    origin = get_origin(tp)
    if tp is Any or tp is object:
        return value
    if origin in (Union, types.UnionType):
        return _convert_union(tp, value, key, finite)
    if origin is Literal:
        choices = get_args(tp)
        if value in choices and not (isinstance(value, bool) and not any(isinstance(c, bool) for c in choices)):
            return value
        raise ConfigError(key, value, _type_name(tp) + suggest(value, [str(c) for c in choices]))
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if origin in (list, tuple, abc.Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, value, "a list")
        (item,) = get_args(tp)[:1] or (Any,)
        items = [convert(item, v, f"{key}[{i}]", finite) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, value, "a mapping")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if finite and not math.isfinite(value):
                raise ConfigError(key, value, "a finite number (nan and inf are not allowed here: give a real "
                                  "value, or drop the override to keep the default)")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(key, value, _type_name(tp))


def build(cls: type, mapping: Any, key: str) -> Any:
    """An instance of dataclass ``cls`` from ``mapping``; missing keys take the field defaults."""
    if isinstance(mapping, cls):
        return mapping
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, Mapping):
        raise ConfigError(key, mapping, f"a mapping of {cls.__name__} settings")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in mapping:
        if name not in fields:
            raise unknown_key(f"{key}.{name}" if key else str(name), fields)
    hints = typing.get_type_hints(cls)
    kwargs = {name: convert(hints[name], value, f"{key}.{name}" if key else name,
                            finite=not fields[name].metadata.get(NONFINITE, False))
              for name, value in mapping.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise rekey(exc, key, fields) from None
    except (ValueError, TypeError) as exc:  # a library's own check: find the field its message names
        message = str(exc)
        named = [n for n in kwargs if re.search(rf"\b{re.escape(n)}\b", message)]
        if named:
            raise ConfigError(f"{key}.{named[0]}" if key else named[0], kwargs[named[0]], message) from None
        raise ConfigError(key, None, message) from None


def as_dict(obj: Any) -> Any:
    """A dataclass tree as plain dicts/lists (for hashing, YAML and W&B)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: as_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [as_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: as_dict(v) for k, v in obj.items()}
    return obj
