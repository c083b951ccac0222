"""Error types. Every error names the problem and the fix, so nothing fails silently or obscurely.
The ones the data loaders raise too are defined in :mod:`loaders.errors` and re-exported here."""
from __future__ import annotations

import math

from loaders.errors import ConfigError, DataError, FastRobustError, check_positive_int, unknown_name

__all__ = ["FastRobustError", "ConfigError", "DataError", "CheckpointError", "NumericalError", "TrainingInterrupted",
           "unknown_name", "check_positive_int", "check_eps"]


class CheckpointError(FastRobustError):
    """A checkpoint that is unreadable, unsafe, or for another model."""


class NumericalError(FastRobustError, FloatingPointError):
    """A non-finite loss or gradient that training cannot continue from."""


class TrainingInterrupted(FastRobustError):
    """A stop signal (SIGTERM) ended training at a step boundary, after a checkpoint was written."""
    exit_code = 143  # 128 + SIGTERM, what a shell reports for a process killed by SIGTERM


def check_eps(eps: float, what: str = "eps") -> float:
    """A perturbation radius: finite and non-negative."""
    eps = float(eps)
    if not (eps >= 0 and math.isfinite(eps)):
        raise ConfigError(f"{what} must be a finite number >= 0, got {eps}. "
                          f"Pass a radius such as 8/255 (CIFAR-10) or 0.3 (MNIST).")
    return eps
