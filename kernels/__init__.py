"""fastrobust.kernels: fused Triton kernels for the adversarial-training loss heads and PGD step.

Public API (every op takes a keyword ``backend`` in {"auto", "triton", "reference"}; ``None`` means the
process default, see :func:`set_backend` / ``$FASTROBUST_KERNELS``):

* ``trades_loss(z, z_adv, y, kl_weight, sample_weight=None, *, backend=None) -> Tensor`` (scalar)
* ``dtrades_loss(z, z_adv, y, sensitivity, alpha, beta, normalize="minmax", lambda_scale=1.0,
  entropy_eps=1e-12, sample_weight=None, *, backend=None) -> (loss, lam, ce_nat, kl, entropy)``
* ``mart_loss(z, z_adv, y, beta, sample_weight=None, *, backend=None) -> Tensor`` (scalar)
* ``loss_head(z, z_adv, y, entropy_eps=1e-12, *, backend=None) -> LossHead``
* ``pgd_step(x_adv, grad, x_nat, step_size, eps, norm="linf", *, backend=None) -> (x_new, grad_norm)``
* ``set_backend(name)``, ``get_backend()``, ``resolve_backend(tensor, backend=None) -> "triton" | "reference"``

``auto`` runs Triton on CUDA tensors and the plain PyTorch reference ops (:mod:`kernels.reference`)
on everything else; ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1``.
"""
from . import reference
from .dispatch import (BACKENDS, dtrades_loss, get_backend, loss_head, mart_loss, pgd_step, resolve_backend,
                       set_backend, trades_loss)
from .reference import LossHead

__all__ = ["BACKENDS", "LossHead", "dtrades_loss", "get_backend", "loss_head", "mart_loss", "pgd_step",
           "reference", "resolve_backend", "set_backend", "trades_loss"]
