"""Options as dataclass fields with metadata: one declaration gives the default, the type check, the
range check, the valid names and the ``--help`` line of every setting (run configs and methods alike).

    beta: float = option(6.0, "weight of the KL term", low=0)
    norm: str = option("linf", "threat model", choices=attacks.NORMS)

``choices`` is a registry (any iterable of names, or a function returning one, for registries that
fill up at import time); ``low``/``high`` bound numbers, ``low_open``/``high_open`` exclude the bound.
:func:`check_fields` checks an instance and raises a ConfigError naming the first bad field.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Callable, Iterable

from .errors import ConfigError, unknown_name


def option(default: Any = dataclasses.MISSING, help: str = "", *, choices: Iterable[str] | Callable | None = None,
           kind: str | None = None, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False, factory: Callable | None = None) -> Any:
    """A dataclass field carrying its help text and constraints (``kind``: the word for an unknown
    name in errors, e.g. "method"; defaults to the field's name with spaces)."""
    meta = {"help": help, "choices": choices, "kind": kind, "low": low, "high": high, "low_open": low_open,
            "high_open": high_open}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def choices_of(f: dataclasses.Field) -> list[str] | None:
    c = f.metadata.get("choices")
    if c is None:
        return None
    return sorted(c() if callable(c) else c)


def base_type(tp: Any) -> tuple[Any, bool]:
    """(the type inside Optional[...], whether None is allowed)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return tp, False


def type_name(tp: Any) -> str:
    inner, optional = base_type(tp)
    if optional:
        return f"{type_name(inner)} or none"
    if typing.get_origin(inner) is tuple:
        return f"a comma-separated list of {type_name(typing.get_args(inner)[0])}s"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(inner, str(inner))


def coerce(value: Any, tp: Any, name: str) -> Any:
    """``value`` checked against the annotation ``tp`` (ints pass as floats, lists as tuples); a
    ConfigError naming the field otherwise, so a bad type never surfaces later as a traceback."""
    inner, optional = base_type(tp)
    if value is None and optional:
        return None
    if typing.get_origin(inner) is tuple and isinstance(value, (tuple, list)):
        return tuple(coerce(v, typing.get_args(inner)[0], name) for v in value)
    if inner is bool and isinstance(value, bool):
        return value
    if inner is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if inner is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if inner is str and isinstance(value, str):
        return value
    if inner not in (bool, int, float, str) and typing.get_origin(inner) is not tuple:
        return value
    raise ConfigError(f"{name} must be {type_name(tp)}, got {value!r}.")


def _bound_text(lo, hi, lo_open, hi_open) -> str:
    show = lambda v: "2**63" if v == 2**63 else f"{v:g}"  # noqa: E731
    if hi is None:
        return f"{'>' if lo_open else '>='} {show(lo)}"
    return f"{'(' if lo_open else '['}{show(lo)}, {show(hi)}{')' if hi_open else ']'}"


def check_range(value: float, f_meta: dict, name: str, is_int: bool) -> None:
    lo, hi, lo_open, hi_open = (f_meta.get(k) for k in ("low", "high", "low_open", "high_open"))
    if lo is None and hi is None:
        return
    ok = math.isfinite(value) and (lo is None or (value > lo if lo_open else value >= lo)) \
        and (hi is None or (value < hi if hi_open else value <= hi))
    if ok:
        return
    text = _bound_text(lo, hi, lo_open, hi_open)
    if hi is None:
        what = f"an integer {text}" if is_int else f"a finite number {text}"
        raise ConfigError(f"{name} must be {what}, got {value!r}.")
    raise ConfigError(f"{name} must be an integer in {text}, got {value!r}." if is_int
                      else f"{name} must lie in {text}, got {value!r}.")


def check_fields(obj: Any, prefix: str = "") -> None:
    """Coerce and check every field of the dataclass ``obj`` in place: type, valid names, ranges.
    Nested dataclasses are checked by their own ``validate``."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            continue
        name = prefix + f.name
        value = coerce(value, hints[f.name], name)
        setattr(obj, f.name, value)
        if value is None:
            continue
        valid = choices_of(f)
        for v in (value if isinstance(value, tuple) else (value,)):
            if valid is not None and v not in valid:
                raise unknown_name(f.metadata.get("kind") or f.name.replace("_", " "), v, valid)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                check_range(v, f.metadata, name, isinstance(v, int))


def help_text(f: dataclasses.Field, default: Any = dataclasses.MISSING) -> str:
    """One line for ``--help``: the description, the valid names and the default (``default``: where
    the field's own is not the one that applies, e.g. the training attack's)."""
    parts = [f.metadata.get("help", "")]
    valid = choices_of(f)
    if valid is not None:
        parts.append(f"one of {', '.join(valid)}")
    default = f.default if default is dataclasses.MISSING else default
    default = default if default is not dataclasses.MISSING else "(see description)"
    if isinstance(default, tuple):
        default = ",".join(str(v) for v in default) or "(empty)"
    parts.append(f"default: {'none' if default is None else default}")
    return "; ".join(p for p in parts if p).replace("%", "%%")
