"""fastrobust.kernels: fused Triton kernels for the adversarial-training loss heads and PGD step.

Public API (every op takes a keyword ``backend`` in :data:`BACKENDS` = {"auto", "triton", "reference"};
``None`` means the process default, see :func:`set_backend` / ``$FASTROBUST_KERNELS``):

* ``trades_loss(z, z_adv, y, kl_weight, sample_weight=None) -> LossOutput(loss, head, lam=None)``
* ``dtrades_loss(z, z_adv, y, sensitivity, alpha, beta, normalize="minmax", lambda_scale=1.0,
  entropy_eps=1e-12, sample_weight=None, *, reduce=None) -> LossOutput(loss, head, lam)``
* ``mart_loss(z, z_adv, y, beta, sample_weight=None) -> LossOutput(loss, head, lam=None)``
* ``loss_head(z, z_adv, y, entropy_eps=1e-12) -> LossHead``
* ``pgd_step(x_adv, grad, x_nat, step_size, eps, norm="linf") -> (x_new, grad_norm)``
* ``self_check(...)``, ``self_check_report()``: the first-use check of each Triton kernel against the
  float64 reference (see :mod:`kernels.dispatch`)
* ``KERNELS``, ``register_kernel(name, Kernel(reference, fused, shape_class, probe, examples))``,
  ``run(name, *args)``: the registry every fused kernel is dispatched (and self-checked) through

Each loss returns its per-sample statistics (:class:`LossHead`) computed in the same pass. ``auto`` runs
Triton on CUDA tensors and the plain PyTorch reference ops (:mod:`kernels.reference`) on everything
else; ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1``.
"""
from . import reference
from .dispatch import (BACKENDS, KERNELS, Kernel, KernelCheckError, dtrades_loss, get_backend, loss_head, mart_loss,
                       pgd_step, register_kernel, resolve_backend, run, self_check, self_check_report, set_backend,
                       trades_loss)
from .reference import NORMALIZE_MODES, PGD_NORMS, LossHead, LossOutput

__all__ = ["BACKENDS", "KERNELS", "Kernel", "KernelCheckError", "register_kernel", "run", "LossHead", "LossOutput", "NORMALIZE_MODES", "PGD_NORMS", "dtrades_loss",
           "get_backend", "loss_head", "mart_loss", "pgd_step", "reference", "resolve_backend", "self_check",
           "self_check_report", "set_backend", "trades_loss"]
