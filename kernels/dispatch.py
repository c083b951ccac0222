"""Backend selection and the public entry points of :mod:`kernels`.

Backends: ``"reference"`` (plain PyTorch, :mod:`kernels.reference`), ``"triton"`` (the fused kernels
through the custom ops of :mod:`kernels.ops`) and ``"auto"`` (Triton for CUDA tensors, reference
for everything else). ``backend=None`` means the process default: :func:`set_backend`, else the
environment variable ``FASTROBUST_KERNELS``, else ``"auto"``. Triton on CPU tensors runs only in
Triton's interpreter (``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from . import reference
from ._common import HAS_TRITON, interpreter_enabled, interpreter_requested
from .reference import LossHead

BACKENDS = ("auto", "triton", "reference")
ENV_VAR = "FASTROBUST_KERNELS"
_default: Optional[str] = None

try:
    from . import ops as _ops
except ImportError:  # pragma: no cover - triton missing: reference only
    _ops = None


def _validate(name) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; valid backends: {', '.join(BACKENDS)}")
    return name


def set_backend(name: Optional[str]) -> None:
    """Set the process-wide default backend (``None`` restores the environment / "auto" default)."""
    global _default
    _default = None if name is None else _validate(name)


def get_backend() -> str:
    """The process default: :func:`set_backend`'s value, else ``$FASTROBUST_KERNELS``, else ``"auto"``."""
    if _default is not None:
        return _default
    env = os.environ.get(ENV_VAR, "").strip()
    if not env:
        return "auto"
    try:
        return _validate(env)
    except ValueError as e:
        raise ValueError(f"{ENV_VAR}={env!r}: {e}") from None


def triton_usable(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of ``device`` in this process."""
    if not HAS_TRITON or _ops is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreter_enabled()


def _resolve(device_type: str, name: Optional[str]) -> str:
    name = get_backend() if name is None else _validate(name)
    if name == "reference":
        return "reference"
    device = torch.device(device_type)
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_usable(device) else "reference"
    if triton_usable(device):
        return "triton"
    if not HAS_TRITON or _ops is None:
        raise ValueError("backend 'triton' needs the triton package, which is not importable; "
                         "use backend='reference'")
    if device.type == "cpu":
        if interpreter_requested():
            raise ValueError("backend 'triton' on CPU tensors needs Triton's interpreter, but triton was imported "
                             "before TRITON_INTERPRET=1 was set: set it before importing triton / kernels, or use "
                             "backend='reference'")
        raise ValueError("backend 'triton' on CPU tensors needs Triton's interpreter: set the environment "
                         "variable TRITON_INTERPRET=1 (before importing triton / kernels), or use "
                         "backend='reference'")
    raise ValueError(f"backend 'triton' does not support {device.type} tensors; use backend='reference'")


def resolve_backend(tensor: torch.Tensor, backend: Optional[str] = None) -> str:
    """The backend that will run for ``tensor``: ``"triton"`` or ``"reference"``.

    Raises ValueError for an unknown name, and for ``"triton"`` where it cannot run (CPU tensors
    without ``TRITON_INTERPRET=1``, no triton installed)."""
    return _resolve(tensor.device.type, backend)


# ----------------------------------------------------------------------------- public ops
def trades_loss(z: torch.Tensor, z_adv: torch.Tensor, y: torch.Tensor, kl_weight,
                sample_weight: Optional[torch.Tensor] = None, *, backend: Optional[str] = None) -> torch.Tensor:
    """TRADES-family loss ``(1/B) sum_i c_i (ce_nat_i + w_i kl_i)`` -> scalar float32 tensor (float64 for
    float64 logits on the reference backend), differentiable w.r.t. ``z`` and ``z_adv``.

    ``kl_weight`` w: python float or (B,) tensor (constant); ``sample_weight`` c: optional (B,) tensor
    (constant). TRADES: w = beta; D-TRADES with a fixed lambda: w = lambda; FAAL: c."""
    if resolve_backend(z, backend) == "reference":
        return reference.trades_loss(z, z_adv, y, kl_weight, sample_weight)
    return _ops.trades_loss(z, z_adv, y, kl_weight, sample_weight)


def dtrades_loss(z: torch.Tensor, z_adv: torch.Tensor, y: torch.Tensor, sensitivity: torch.Tensor,
                 alpha: float, beta: float, normalize: str = "minmax", lambda_scale: float = 1.0,
                 entropy_eps: float = 1e-12, sample_weight: Optional[torch.Tensor] = None, *,
                 backend: Optional[str] = None):
    """D-TRADES loss with ``lam = lambda_scale (alpha norm(H) + beta norm(s))`` (detached).

    Returns ``(loss, lam, ce_nat, kl, entropy)``: the scalar loss (differentiable w.r.t. ``z`` and
    ``z_adv``) and four detached (B,) tensors for logging. ``normalize`` in {"minmax", "mean", "none"}."""
    if resolve_backend(z, backend) == "reference":
        return reference.dtrades_loss(z, z_adv, y, sensitivity, alpha, beta, normalize, lambda_scale,
                                      entropy_eps, sample_weight)
    return _ops.dtrades_loss(z, z_adv, y, sensitivity, alpha, beta, normalize, lambda_scale, entropy_eps,
                             sample_weight)


def mart_loss(z: torch.Tensor, z_adv: torch.Tensor, y: torch.Tensor, beta: float,
              sample_weight: Optional[torch.Tensor] = None, *, backend: Optional[str] = None) -> torch.Tensor:
    """MART loss ``(1/B) sum_i c_i (ce_adv_i - log(1.0001 - q_wrong_i) + beta kl_i (1 - p_y_i))`` -> scalar,
    differentiable w.r.t. ``z`` and ``z_adv``."""
    if resolve_backend(z, backend) == "reference":
        return reference.mart_loss(z, z_adv, y, beta, sample_weight)
    return _ops.mart_loss(z, z_adv, y, beta, sample_weight)


def loss_head(z: torch.Tensor, z_adv: torch.Tensor, y: torch.Tensor, entropy_eps: float = 1e-12, *,
              backend: Optional[str] = None) -> LossHead:
    """Per-sample statistics (no autograd) -> :class:`kernels.LossHead` of (B,) tensors: ce_nat, ce_adv,
    kl, entropy, p_y, q_y, q_wrong (float32) and wrong_idx (int64)."""
    if resolve_backend(z, backend) == "reference":
        return reference.loss_head(z, z_adv, y, entropy_eps)
    return _ops.loss_head(z, z_adv, y, entropy_eps)


def pgd_step(x_adv: torch.Tensor, grad: torch.Tensor, x_nat: torch.Tensor, step_size: float, eps: float,
             norm: str = "linf", *, backend: Optional[str] = None):
    """One PGD step -> ``(x_new, grad_norm)``: x_new like ``x_adv`` (dtype, memory format), grad_norm (B,)
    float32 ``||grad_i||_2``. ``norm`` in {"linf", "l2"}; no autograd."""
    if resolve_backend(x_adv, backend) == "reference":
        return reference.pgd_step(x_adv, grad, x_nat, step_size, eps, norm)
    return _ops.pgd_step(x_adv, grad, x_nat, step_size, eps, norm)
