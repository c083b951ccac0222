"""Error types. Every error names the problem and the fix, so nothing fails silently or obscurely.
The ones the data loaders raise too are defined in :mod:`loaders.errors` and re-exported here."""
from __future__ import annotations

import math

from loaders.errors import ConfigError, DataError, FastRobustError, check_positive_int, unknown_name

__all__ = ["FastRobustError", "ConfigError", "DataError", "CheckpointError", "NumericalError", "TrainingInterrupted",
           "unknown_name", "check_positive_int", "check_eps", "check_radius", "radius_bound"]


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


# Inputs are images in [0, 1] (normalisation lives inside the model): an L-inf radius of 1 already lets
# every pixel take every value, so nothing above it is a different threat model.
LINF_INPUT_RANGE = 1.0


def radius_bound(norm: str, dataset: str | None) -> float | None:
    """The largest radius that means something for ``norm`` on ``dataset``'s images: the input range (1)
    for L-inf, the diagonal of the [0, 1] box, sqrt(channels x height x width), for L2. None for L2 when
    the dataset (the image size) is not known yet."""
    if norm != "l2":
        return LINF_INPUT_RANGE
    if dataset is None:
        return None
    import loaders
    info = loaders.dataset_info(dataset)
    return math.sqrt(info.channels * info.size * info.size)


def check_radius(eps: float, norm: str, dataset: str | None, what: str = "eps") -> float:
    """A perturbation radius for a threat model: finite, >= 0 and at most :func:`radius_bound`. The one
    check training, evaluation and the recipes share (through the configs' validation). A whole number
    from 2 to 255 above the bound is most likely a radius in pixel levels, and the message says so."""
    eps = check_eps(eps, what)
    bound = radius_bound(norm, dataset)
    if bound is None or eps <= bound:
        return eps
    if norm == "l2":
        info = f"the diagonal of the [0, 1] box of {dataset} images, {bound:.4g}: no two images are further apart"
    else:
        info = "the input range: images are in [0, 1], so a radius of 1 already reaches every image"
    if eps == int(eps) and 2 <= eps <= 255:
        hint = (f"Did you mean {eps:g}/255 = {eps / 255:.4g}? Radii are in input units; the command line takes "
                f"the fraction as written ({eps:g}/255).")
    else:
        hint = "Radii are in input units: e.g. 8/255 or 0.3 for L-inf, 0.5 for L2 on CIFAR-10."
    raise ConfigError(f"{what} = {eps:g} ({norm}) is above {info}. {hint}")
