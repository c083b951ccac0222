"""The Triton kernels as ``torch.library`` custom ops (namespace ``fastrobust``).

Each op has a fake (meta) implementation, and the loss ops have an autograd formula that calls the
fused backward op, so ``torch.compile(fullgraph=True)`` traces through forward and backward without
graph breaks: the ops are opaque nodes of the graph, the kernels run inside them.

Ops (all functional, outputs never alias inputs):

* ``loss_head(z, z_adv, y, entropy_eps) -> (stats, wrong_idx)``
* ``trades_loss(z, z_adv, y, kl_weight?, kl_weight_scalar, sample_weight?) -> (loss, stats, wrong_idx)``
* ``dtrades_loss(z, z_adv, y, sensitivity, alpha, beta, normalize, lambda_scale, entropy_eps,
  sample_weight?) -> (loss, lam, stats, wrong_idx)``
* ``mart_loss(z, z_adv, y, beta, sample_weight?) -> (loss, stats, wrong_idx)``
* ``loss_backward(...) -> (grad_z, grad_z_adv)``: the fused backward of the three losses
* ``pgd_step(x_adv, grad, x_nat, step_size, eps, norm) -> (x_new, grad_norm)``

``stats`` is the (NSTAT, B) float32 table of :mod:`kernels.fused_loss_head`; it, ``lam`` and
``wrong_idx`` are non-differentiable (logging / saved for backward). The python wrappers at the
bottom give the public return types.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .fused_loss_head import NSTAT, ROW, head_backward, head_forward
from .fused_pgd_step import out_like, pgd_step_forward
from .lambda_weights import MODE_DTRADES, MODE_MART, MODE_TRADES, weights_reduce
from .reference import LossHead, LossOutput

_NS = "fastrobust"


def _stats_like(z: Tensor) -> tuple[Tensor, Tensor]:
    B = z.shape[0]
    return z.new_empty((NSTAT, B), dtype=torch.float32), z.new_empty((B,), dtype=torch.int64)


def _loss_like(z: Tensor) -> Tensor:
    return z.new_empty((), dtype=torch.float32)


def _f32(t: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    """A per-sample constant as a contiguous float32 tensor on ``like``'s device (no gradient)."""
    return None if t is None else t.detach().to(device=like.device, dtype=torch.float32).contiguous()


# ----------------------------------------------------------------------------- loss_head
@torch.library.custom_op(f"{_NS}::loss_head", mutates_args=())
def loss_head_op(z: Tensor, z_adv: Tensor, y: Tensor, entropy_eps: float) -> tuple[Tensor, Tensor]:
    return head_forward(z, z_adv, y, entropy_eps)


@loss_head_op.register_fake
def _(z, z_adv, y, entropy_eps):
    return _stats_like(z)


# ----------------------------------------------------------------------------- backward
@torch.library.custom_op(f"{_NS}::loss_backward", mutates_args=())
def loss_backward_op(z: Tensor, z_adv: Tensor, y: Tensor, stats: Tensor, wrong_idx: Tensor,
                     kl_weight: Optional[Tensor], kl_weight_scalar: float, sample_weight: Optional[Tensor],
                     grad_loss: Tensor, mart: bool, beta: float) -> tuple[Tensor, Tensor]:
    return head_backward(z, z_adv, y, stats, wrong_idx, kl_weight, kl_weight_scalar, sample_weight,
                         grad_loss, mart, beta)


@loss_backward_op.register_fake
def _(z, z_adv, y, stats, wrong_idx, kl_weight, kl_weight_scalar, sample_weight, grad_loss, mart, beta):
    return z.new_empty(z.shape), z_adv.new_empty(z_adv.shape)   # contiguous, like the real outputs


def _logit_grads(ctx, g_loss, mart, beta):
    z, z_adv, y, stats, widx, kl_weight, sample_weight = ctx.saved_tensors
    need_z, need_za = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_z or need_za):
        return None, None
    gz, gza = loss_backward_op(z, z_adv, y, stats, widx, kl_weight, ctx.kl_weight_scalar,
                               sample_weight, g_loss, mart, beta)
    return (gz if need_z else None), (gza if need_za else None)


# ----------------------------------------------------------------------------- trades
@torch.library.custom_op(f"{_NS}::trades_loss", mutates_args=())
def trades_loss_op(z: Tensor, z_adv: Tensor, y: Tensor, kl_weight: Optional[Tensor], kl_weight_scalar: float,
                   sample_weight: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    stats, widx = head_forward(z, z_adv, y)
    loss, _ = weights_reduce(stats, MODE_TRADES, kl_weight=kl_weight, kl_weight_scalar=kl_weight_scalar,
                             sample_weight=sample_weight)
    return loss, stats, widx


@trades_loss_op.register_fake
def _(z, z_adv, y, kl_weight, kl_weight_scalar, sample_weight):
    return (_loss_like(z),) + _stats_like(z)


def _trades_setup(ctx, inputs, output):
    z, z_adv, y, kl_weight, kl_weight_scalar, sample_weight = inputs
    _, stats, widx = output
    ctx.mark_non_differentiable(stats, widx)
    ctx.kl_weight_scalar = kl_weight_scalar
    ctx.save_for_backward(z, z_adv, y, stats, widx, kl_weight, sample_weight)


def _trades_backward(ctx, g_loss, g_stats, g_widx):
    gz, gza = _logit_grads(ctx, g_loss, False, 0.0)
    return gz, gza, None, None, None, None


trades_loss_op.register_autograd(_trades_backward, setup_context=_trades_setup)


# ----------------------------------------------------------------------------- dtrades
@torch.library.custom_op(f"{_NS}::dtrades_loss", mutates_args=())
def dtrades_loss_op(z: Tensor, z_adv: Tensor, y: Tensor, sensitivity: Tensor, alpha: float, beta: float,
                    normalize: str, lambda_scale: float, entropy_eps: float,
                    sample_weight: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    stats, widx = head_forward(z, z_adv, y, entropy_eps)
    loss, lam = weights_reduce(stats, MODE_DTRADES, sensitivity=sensitivity, alpha=alpha, beta=beta,
                               normalize=normalize, lambda_scale=lambda_scale, sample_weight=sample_weight)
    return loss, lam, stats, widx


@dtrades_loss_op.register_fake
def _(z, z_adv, y, sensitivity, alpha, beta, normalize, lambda_scale, entropy_eps, sample_weight):
    return (_loss_like(z), z.new_empty((z.shape[0],), dtype=torch.float32)) + _stats_like(z)


def _dtrades_setup(ctx, inputs, output):
    z, z_adv, y, *_, sample_weight = inputs
    _, lam, stats, widx = output
    ctx.mark_non_differentiable(lam, stats, widx)
    ctx.kl_weight_scalar = 0.0
    ctx.save_for_backward(z, z_adv, y, stats, widx, lam, sample_weight)


def _dtrades_backward(ctx, g_loss, g_lam, g_stats, g_widx):
    gz, gza = _logit_grads(ctx, g_loss, False, 0.0)
    return gz, gza, None, None, None, None, None, None, None, None


dtrades_loss_op.register_autograd(_dtrades_backward, setup_context=_dtrades_setup)


# ----------------------------------------------------------------------------- mart
@torch.library.custom_op(f"{_NS}::mart_loss", mutates_args=())
def mart_loss_op(z: Tensor, z_adv: Tensor, y: Tensor, beta: float,
                 sample_weight: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    stats, widx = head_forward(z, z_adv, y)
    loss, _ = weights_reduce(stats, MODE_MART, beta=beta, sample_weight=sample_weight)
    return loss, stats, widx


@mart_loss_op.register_fake
def _(z, z_adv, y, beta, sample_weight):
    return (_loss_like(z),) + _stats_like(z)


def _mart_setup(ctx, inputs, output):
    z, z_adv, y, beta, sample_weight = inputs
    _, stats, widx = output
    ctx.mark_non_differentiable(stats, widx)
    ctx.kl_weight_scalar = 0.0
    ctx.beta = beta
    ctx.save_for_backward(z, z_adv, y, stats, widx, None, sample_weight)


def _mart_backward(ctx, g_loss, g_stats, g_widx):
    gz, gza = _logit_grads(ctx, g_loss, True, ctx.beta)
    return gz, gza, None, None, None


mart_loss_op.register_autograd(_mart_backward, setup_context=_mart_setup)


# ----------------------------------------------------------------------------- pgd
@torch.library.custom_op(f"{_NS}::pgd_step", mutates_args=())
def pgd_step_op(x_adv: Tensor, grad: Tensor, x_nat: Tensor, step_size: float, eps: float,
                norm: str) -> tuple[Tensor, Tensor]:
    return pgd_step_forward(x_adv, grad, x_nat, step_size, eps, norm)


@pgd_step_op.register_fake
def _(x_adv, grad, x_nat, step_size, eps, norm):
    return out_like(x_adv), x_adv.new_empty((x_adv.shape[0],), dtype=torch.float32)


# ----------------------------------------------------------------------------- python wrappers
def _split_weight(kl_weight, like: Tensor) -> tuple[Optional[Tensor], float]:
    if isinstance(kl_weight, Tensor):
        return _f32(kl_weight, like), 0.0
    return None, float(kl_weight)


def _check_per_sample(B: int, **tensors: Optional[Tensor]) -> None:
    """Each given tensor (by its argument's name) is None or of shape (B,)."""
    for name, t in tensors.items():
        if t is not None and tuple(t.shape) != (B,):
            raise ValueError(f"{name} must be a ({B},) tensor, got {tuple(t.shape)}")


def _head(stats: Tensor, widx: Tensor) -> LossHead:
    return LossHead(*(stats[ROW[name]] for name in LossHead._fields[:-1]), widx)


def trades_loss(z: Tensor, z_adv: Tensor, y: Tensor, kl_weight, sample_weight: Optional[Tensor] = None) -> LossOutput:
    B = z.shape[0]
    if isinstance(kl_weight, Tensor) and kl_weight.dim() == 0:
        kl_weight = kl_weight.detach().expand(B)
    w, w_scalar = _split_weight(kl_weight, z)
    _check_per_sample(B, kl_weight=w, sample_weight=sample_weight)
    loss, stats, widx = trades_loss_op(z, z_adv, y, w, w_scalar, _f32(sample_weight, z))
    return LossOutput(loss, _head(stats, widx))


def dtrades_loss(z: Tensor, z_adv: Tensor, y: Tensor, sensitivity: Tensor, alpha: float, beta: float,
                 normalize: str = "minmax", lambda_scale: float = 1.0, entropy_eps: float = 1e-12,
                 sample_weight: Optional[Tensor] = None) -> LossOutput:
    B = z.shape[0]
    _check_per_sample(B, sensitivity=sensitivity, sample_weight=sample_weight)
    loss, lam, stats, widx = dtrades_loss_op(z, z_adv, y, _f32(sensitivity, z), float(alpha), float(beta), normalize,
                                             float(lambda_scale), float(entropy_eps), _f32(sample_weight, z))
    return LossOutput(loss, _head(stats, widx), lam)


def mart_loss(z: Tensor, z_adv: Tensor, y: Tensor, beta: float, sample_weight: Optional[Tensor] = None) -> LossOutput:
    _check_per_sample(z.shape[0], sample_weight=sample_weight)
    loss, stats, widx = mart_loss_op(z, z_adv, y, float(beta), _f32(sample_weight, z))
    return LossOutput(loss, _head(stats, widx))


def loss_head(z: Tensor, z_adv: Tensor, y: Tensor, entropy_eps: float = 1e-12) -> LossHead:
    return _head(*loss_head_op(z.detach(), z_adv.detach(), y, float(entropy_eps)))


def pgd_step(x_adv: Tensor, grad: Tensor, x_nat: Tensor, step_size: float, eps: float, norm: str = "linf"):
    return pgd_step_op(x_adv.detach(), grad.detach(), x_nat.detach(), float(step_size), float(eps), norm)
