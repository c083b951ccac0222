"""The error types every fastrobust package raises, and the checks that build them.

They live here, in the lowest package that raises them, so imports point one way:
``fastrobust`` imports ``loaders`` and ``kernels``, never the reverse (``fastrobust.errors``
re-exports these). Every message names the problem and the fix.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class FastRobustError(Exception):
    """A user-facing error whose message says what went wrong and how to fix it."""


class ConfigError(FastRobustError, ValueError):
    """A bad option: unknown name, out-of-range value, inconsistent combination."""


class DataError(FastRobustError):
    """Missing, truncated or malformed data."""


def unknown_name(kind: str, name: object, valid: Iterable[str]) -> ConfigError:
    """The error for a name not in a registry, with close matches as suggestions."""
    valid = sorted(valid)
    close = difflib.get_close_matches(str(name), valid, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"unknown {kind} {name!r}.{hint} Valid {kind}s: {', '.join(valid)}.")


def check_positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or int(value) < 1:
        raise ConfigError(f"{what} must be an integer >= 1, got {value!r}.")
    return int(value)
