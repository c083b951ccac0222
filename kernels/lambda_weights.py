"""The per-sample KL weights and the weighted batch reduction, in one single-program launch.

Reference: :func:`kernels.reference.normalize_batch` and the reductions of
:func:`~kernels.reference.trades_loss` / :func:`~kernels.reference.dtrades_loss` /
:func:`~kernels.reference.mart_loss`.

It reads the statistics table of :mod:`kernels.fused_loss_head` and writes the scalar loss (and, for
D-TRADES, lambda). B is at most a few thousand, so one program loops over the batch:

* D-TRADES with ``minmax`` / ``mean``: pass 1 takes min, max and sum of H (the entropy row) and s;
  pass 2 forms ``lam = lambda_scale (alpha norm(H) + beta norm(s))``, stores it and accumulates the loss.
  ``minmax`` gives 0.5 where max == min, ``mean`` gives 1 where the mean is 0 (never NaN).
* TRADES: ``lam`` is the given float or (B,) tensor; MART: the per-sample MART term.
* loss = (1/B) sum_i c_i l_i, accumulated in float32.
"""
from __future__ import annotations

import torch

from ._common import device_ctx, lazy_jit, new_empty, next_pow2, tl
from .reference import MART_EPS, NORMALIZE_MODES

MODE_TRADES, MODE_DTRADES, MODE_MART = 0, 1, 2
_NORM_CODE = {name: i for i, name in enumerate(NORMALIZE_MODES)}   # minmax 0, mean 1, none 2
_MAX_BLOCK = 1024


@lazy_jit
def _weights_reduce_kernel(
    stats_ptr, s_ptr, w_ptr, c_ptr, lam_ptr, loss_ptr,
    B, w_scalar, alpha, beta, lambda_scale, mart_eps,
    MODE: tl.constexpr, NORM: tl.constexpr, W_TENSOR: tl.constexpr, HAS_C: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.arange(0, BLOCK)
    INF = float("inf")
    if MODE == 1:
        if NORM != 2:
            h_min = tl.full([BLOCK], INF, tl.float32)
            h_max = tl.full([BLOCK], -INF, tl.float32)
            h_sum = tl.zeros([BLOCK], tl.float32)
            s_min = tl.full([BLOCK], INF, tl.float32)
            s_max = tl.full([BLOCK], -INF, tl.float32)
            s_sum = tl.zeros([BLOCK], tl.float32)
            for b0 in range(0, B, BLOCK):
                idx = b0 + offs
                m = idx < B
                h = tl.load(stats_ptr + 3 * B + idx, mask=m, other=0.0)
                s = tl.load(s_ptr + idx, mask=m, other=0.0).to(tl.float32)
                h_min = tl.minimum(h_min, tl.where(m, h, INF))
                h_max = tl.maximum(h_max, tl.where(m, h, -INF))
                h_sum += h
                s_min = tl.minimum(s_min, tl.where(m, s, INF))
                s_max = tl.maximum(s_max, tl.where(m, s, -INF))
                s_sum += s
            h_lo = tl.min(h_min, 0)
            s_lo = tl.min(s_min, 0)
            if NORM == 0:
                h_span = tl.max(h_max, 0) - h_lo
                s_span = tl.max(s_max, 0) - s_lo
                h_div = tl.where(h_span > 0, h_span, 1.0)
                s_div = tl.where(s_span > 0, s_span, 1.0)
            else:
                h_mean = tl.sum(h_sum, 0) / B
                s_mean = tl.sum(s_sum, 0) / B
                h_div = tl.where(h_mean != 0, h_mean, 1.0)
                s_div = tl.where(s_mean != 0, s_mean, 1.0)

    acc = tl.zeros([BLOCK], tl.float32)
    for b0 in range(0, B, BLOCK):
        idx = b0 + offs
        m = idx < B
        kl = tl.load(stats_ptr + 2 * B + idx, mask=m, other=0.0)
        if MODE == 2:
            ce_adv = tl.load(stats_ptr + 1 * B + idx, mask=m, other=0.0)
            omq_w = tl.load(stats_ptr + 7 * B + idx, mask=m, other=1.0)    # 1 - q_wrong
            omp_y = tl.load(stats_ptr + 14 * B + idx, mask=m, other=0.0)   # 1 - p_y
            per = ce_adv - tl.log(omq_w + mart_eps) + beta * kl * omp_y
        else:
            ce = tl.load(stats_ptr + idx, mask=m, other=0.0)
            if MODE == 1:
                h = tl.load(stats_ptr + 3 * B + idx, mask=m, other=0.0)
                s = tl.load(s_ptr + idx, mask=m, other=0.0).to(tl.float32)
                if NORM == 0:
                    h_n = tl.where(h_span > 0, (h - h_lo) / h_div, 0.5)
                    s_n = tl.where(s_span > 0, (s - s_lo) / s_div, 0.5)
                elif NORM == 1:
                    h_n = tl.where(h_mean != 0, h / h_div, 1.0)
                    s_n = tl.where(s_mean != 0, s / s_div, 1.0)
                else:
                    h_n = h
                    s_n = s
                lam = lambda_scale * (alpha * h_n + beta * s_n)
                tl.store(lam_ptr + idx, lam, mask=m)
            elif W_TENSOR:
                lam = tl.load(w_ptr + idx, mask=m, other=0.0).to(tl.float32)
            else:
                lam = w_scalar + tl.zeros([BLOCK], tl.float32)
            per = ce + lam * kl
        if HAS_C:
            per = per * tl.load(c_ptr + idx, mask=m, other=0.0).to(tl.float32)
        acc += tl.where(m, per, 0.0)
    tl.store(loss_ptr, tl.sum(acc, 0) / B)


def reduce_block(B: int) -> int:
    """The single program's block: the whole batch up to 1024 rows."""
    return min(next_pow2(max(B, 16)), _MAX_BLOCK)


def weights_reduce(stats: torch.Tensor, mode: int, *, sensitivity: torch.Tensor | None = None,
                   alpha: float = 0.0, beta: float = 0.0, normalize: str = "none", lambda_scale: float = 1.0,
                   kl_weight: torch.Tensor | None = None, kl_weight_scalar: float = 0.0,
                   sample_weight: torch.Tensor | None = None):
    """Launch the reduction: returns ``(loss, lam)``; ``lam`` is a (B,) float32 tensor for
    D-TRADES and None otherwise. ``beta`` is D-TRADES' sensitivity weight or MART's KL weight."""
    if normalize not in _NORM_CODE:
        raise ValueError(f"unknown normalisation {normalize!r}; valid: {', '.join(NORMALIZE_MODES)}")
    B = stats.shape[1]
    device = stats.device
    loss = new_empty((), torch.float32, device)
    lam = new_empty((B,), torch.float32, device) if mode == MODE_DTRADES else None
    if mode == MODE_DTRADES:
        if sensitivity is None or sensitivity.shape != (B,):
            raise ValueError(f"sensitivity must be a ({B},) tensor")
    s = sensitivity.contiguous() if sensitivity is not None else stats
    w = kl_weight.contiguous() if kl_weight is not None else stats
    c = sample_weight.contiguous() if sample_weight is not None else stats
    block = reduce_block(B)
    with device_ctx(stats):
        _weights_reduce_kernel[(1,)](
            stats, s, w, c, lam if lam is not None else stats, loss,
            B, float(kl_weight_scalar), float(alpha), float(beta), float(lambda_scale), MART_EPS,
            MODE=mode, NORM=_NORM_CODE[normalize], W_TENSOR=kl_weight is not None,
            HAS_C=sample_weight is not None, BLOCK=block)
    return loss, lam
