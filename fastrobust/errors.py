"""Error types. Every error names the problem and the fix, so nothing fails silently or obscurely."""
from __future__ import annotations

import difflib
from typing import Iterable


class FastRobustError(Exception):
    """Base class: a user-facing error whose message says what went wrong and how to fix it."""


class ConfigError(FastRobustError, ValueError):
    """A bad option: unknown name, out-of-range value, inconsistent combination."""


class DataError(FastRobustError):
    """Missing, truncated or malformed data."""


class CheckpointError(FastRobustError):
    """A checkpoint that is unreadable, unsafe, or for another model."""


class NumericalError(FastRobustError, FloatingPointError):
    """A non-finite loss or gradient that training cannot continue from."""


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> ConfigError:
    """Build the error for an unknown registry name, with close matches as suggestions."""
    valid = sorted(valid)
    close = difflib.get_close_matches(str(name), valid, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"unknown {kind} {name!r}.{hint} Valid {kind}s: {', '.join(valid)}.")


def check_eps(eps: float, what: str = "eps") -> float:
    """Validate a perturbation radius: finite and non-negative."""
    eps = float(eps)
    if not eps >= 0 or eps != eps or eps == float("inf"):
        raise ConfigError(f"{what} must be a finite number >= 0, got {eps}. "
                          f"Pass a radius such as 8/255 (CIFAR-10) or 0.3 (MNIST).")
    return eps


def check_positive_int(value, what: str) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < 1:
        raise ConfigError(f"{what} must be an integer >= 1, got {value!r}.")
    return int(value)
