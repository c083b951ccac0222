"""Fused logit-pair head: one forward kernel for every per-sample statistic, one backward kernel for
the gradients of the TRADES / D-TRADES / MART losses w.r.t. both logit tensors.

Reference: :func:`kernels.reference.loss_head`, :func:`~kernels.reference.trades_loss`,
:func:`~kernels.reference.dtrades_loss`, :func:`~kernels.reference.mart_loss`.

Forward (``_head_fwd_kernel``). A program owns ``BLOCK_B`` rows and reads both logit tensors in
tiles of ``BLOCK_C`` columns, accumulating in float32 whatever the input dtype:

* pass 1: online max / sum-of-exp of z and z' (``m``, ``S``, ``logsumexp = m + log S``), the
  argmax j of z (the pivot, below) and the running argmax of z' over c != y (strictly greater wins,
  so ties keep the lowest index, also across tiles);
* pass 2: ``log p = (z - m_z) - log S_z`` (``z - m_z`` is exact for nearby values, so
  log-probabilities keep their relative accuracy even for logits of size 1e4), the entropy
  ``-sum p log(p + eps)``, and three complements as sums, ``1 - p_y = sum_{c != y} p``,
  ``1 - q_y`` and ``1 - q_wrong`` (never ``1 - p_y`` by subtraction, which cancels when p_y -> 1:
  MART's ``log(1.0001 - q_wrong)`` and the y entries of the gradients use these).

KL with a pivot. ``r = log p - log q`` is a difference of log-normalisers of size |logits|: with
1e4 logits each r carries an absolute fp32 error ~1e-3 and ``r - kl`` (in the gradient) can lose all
its digits. Relative to the pivot j = argmax z, ``r_c - r_j = (z_c - m_z) - (z'_c - z'_j)`` is a
difference of exact logit differences, so the kernel accumulates ``kl_rel = sum p (r - r_j)`` and
returns ``kl = kl_rel + r_j``; the backward uses ``r - kl = (r - r_j) - kl_rel``.

When a row fits in one tile (C <= BLOCK_C, the usual case up to C = 1024) it is loaded once and both
passes run on registers: a single read of both logit tensors. The kernel writes a (NSTAT, B) float32
table (rows in ``STAT_ROWS``) and ``wrong_idx``; the backward rebuilds p and q from its m / log S rows.

Backward (``_head_bwd_kernel``), derived by hand; ``a_i = g c_i / B`` (g the upstream gradient,
c the sample weight), ``r = log p - log q``, ``e_y`` / ``e_w`` one-hot rows at y / wrong_idx:

* d kl / dz' = q - p;  d kl / dz = p (r - kl)   (target p not detached);
* TRADES / D-TRADES, loss ce_nat + w kl with w constant:
      grad_z = a (p - e_y + w p (r - kl)),   grad_z' = a w (q - p);
* MART, loss ce_adv - log(1.0001 - q_w) + beta kl (1 - p_y), with t = q_w / (1.0001 - q_w):
      grad_z  = a beta ((1 - p_y) p (r - kl) - kl p_y (e_y - p)),
      grad_z' = a (q - e_y + t (e_w - q) + beta (1 - p_y) (q - p)).
One pass over both logit tensors, both gradients written by the same program.

Labels must lie in [0, C) (they are not range-checked on the device). Logits must be finite.
"""
from __future__ import annotations

import torch

from ._common import _STATE, block_c_for, device_ctx, interpreter_enabled, lazy_jit, new_empty, next_pow2, tl
from .reference import MART_EPS

#: Rows of the float32 statistics table written by the forward kernel.
STAT_ROWS = ("ce_nat", "ce_adv", "kl", "entropy", "p_y", "q_y", "q_wrong", "one_minus_q_wrong",
             "m_z", "log_s_z", "m_q", "log_s_q", "za_pivot", "kl_rel", "one_minus_p_y", "one_minus_q_y")
NSTAT = len(STAT_ROWS)
ROW = {name: i for i, name in enumerate(STAT_ROWS)}

_TILE_ELEMS = 2048                # elements of one (BLOCK_B x BLOCK_C) tile on a GPU
_TILE_ELEMS_INTERPRETER = 16384   # the CPU interpreter pays per program instance: fewer, larger tiles
_MAX_BLOCK_B = 128


@lazy_jit
def _head_fwd_kernel(
    z_ptr, za_ptr, y_ptr, stats_ptr, widx_ptr,
    B, C, stride_z, stride_za, entropy_eps,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE_TILE: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    # padded rows re-read the last real row (always in bounds) and are never stored
    rows_c = tl.minimum(rows, B - 1).to(tl.int64)
    y = tl.load(y_ptr + rows_c).to(tl.int32)
    z_row = z_ptr + rows_c * stride_z
    za_row = za_ptr + rows_c * stride_za
    zy = tl.load(z_row + y).to(tl.float32)
    zay = tl.load(za_row + y).to(tl.float32)
    cols0 = tl.arange(0, BLOCK_C)
    NEG = float("-inf")

    if SINGLE_TILE:
        cmask = cols0 < C
        z = tl.load(z_row[:, None] + cols0[None, :], mask=cmask[None, :], other=NEG).to(tl.float32)
        za = tl.load(za_row[:, None] + cols0[None, :], mask=cmask[None, :], other=NEG).to(tl.float32)
        m_z = tl.max(z, 1)
        s_z = tl.sum(tl.exp(z - m_z[:, None]), 1)
        j = tl.min(tl.where(z == m_z[:, None], cols0[None, :], 2147483647), 1)
        za_j = tl.sum(tl.where(cols0[None, :] == j[:, None], za, 0.0), 1)
        m_q = tl.max(za, 1)
        s_q = tl.sum(tl.exp(za - m_q[:, None]), 1)
        wmask = cmask[None, :] & (cols0[None, :] != y[:, None])
        zw = tl.where(wmask, za, NEG)
        best_v = tl.max(zw, 1)
        best_i = tl.min(tl.where(wmask & (zw == best_v[:, None]), cols0[None, :], 2147483647), 1)
    else:
        m_z = tl.full([BLOCK_B], NEG, tl.float32)
        s_z = tl.zeros([BLOCK_B], tl.float32)
        m_q = tl.full([BLOCK_B], NEG, tl.float32)
        s_q = tl.zeros([BLOCK_B], tl.float32)
        best_v = tl.full([BLOCK_B], NEG, tl.float32)
        best_i = tl.zeros([BLOCK_B], tl.int32)
        za_j = tl.zeros([BLOCK_B], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + cols0
            cmask = cols < C
            z = tl.load(z_row[:, None] + cols[None, :], mask=cmask[None, :], other=NEG).to(tl.float32)
            za = tl.load(za_row[:, None] + cols[None, :], mask=cmask[None, :], other=NEG).to(tl.float32)
            tile_mz = tl.max(z, 1)
            tile_j = tl.min(tl.where(z == tile_mz[:, None], cols[None, :], 2147483647), 1)
            tile_za_j = tl.sum(tl.where(cols[None, :] == tile_j[:, None], za, 0.0), 1)
            za_j = tl.where(tile_mz > m_z, tile_za_j, za_j)
            new_mz = tl.maximum(m_z, tile_mz)
            s_z = s_z * tl.exp(m_z - new_mz) + tl.sum(tl.exp(z - new_mz[:, None]), 1)
            m_z = new_mz
            new_mq = tl.maximum(m_q, tl.max(za, 1))
            s_q = s_q * tl.exp(m_q - new_mq) + tl.sum(tl.exp(za - new_mq[:, None]), 1)
            m_q = new_mq
            wmask = cmask[None, :] & (cols[None, :] != y[:, None])
            zw = tl.where(wmask, za, NEG)
            tile_v = tl.max(zw, 1)
            tile_i = tl.min(tl.where(wmask & (zw == tile_v[:, None]), cols[None, :], 2147483647), 1)
            better = tile_v > best_v
            best_i = tl.where(better, tile_i, best_i)
            best_v = tl.where(better, tile_v, best_v)

    ls_z = tl.log(s_z)
    ls_q = tl.log(s_q)

    if SINGLE_TILE:
        cmask2 = cmask[None, :] & (rows_c >= 0)[:, None]
        # padded columns take the row max: every intermediate stays finite
        zs = tl.where(cmask2, z, m_z[:, None])
        zas = tl.where(cmask2, za, m_q[:, None])
        lp = (zs - m_z[:, None]) - ls_z[:, None]
        lq = (zas - m_q[:, None]) - ls_q[:, None]
        p = tl.where(cmask2, tl.exp(lp), 0.0)
        q = tl.where(cmask2, tl.exp(lq), 0.0)
        kl_rel = tl.sum(p * ((zs - m_z[:, None]) - (zas - za_j[:, None])), 1)
        ent = tl.sum(tl.where(cmask2, p * tl.log(p + entropy_eps), 0.0), 1)
        omq = tl.sum(tl.where(cols0[None, :] != best_i[:, None], q, 0.0), 1)
        omp_y = tl.sum(tl.where(cols0[None, :] != y[:, None], p, 0.0), 1)
        omq_y = tl.sum(tl.where(cols0[None, :] != y[:, None], q, 0.0), 1)
    else:
        kl_rel = tl.zeros([BLOCK_B], tl.float32)
        ent = tl.zeros([BLOCK_B], tl.float32)
        omq = tl.zeros([BLOCK_B], tl.float32)
        omp_y = tl.zeros([BLOCK_B], tl.float32)
        omq_y = tl.zeros([BLOCK_B], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + cols0
            cmask = cols < C
            cmask2 = cmask[None, :] & (rows_c >= 0)[:, None]
            z = tl.load(z_row[:, None] + cols[None, :], mask=cmask[None, :], other=0.0).to(tl.float32)
            za = tl.load(za_row[:, None] + cols[None, :], mask=cmask[None, :], other=0.0).to(tl.float32)
            zs = tl.where(cmask2, z, m_z[:, None])
            zas = tl.where(cmask2, za, m_q[:, None])
            lp = (zs - m_z[:, None]) - ls_z[:, None]
            lq = (zas - m_q[:, None]) - ls_q[:, None]
            p = tl.where(cmask2, tl.exp(lp), 0.0)
            q = tl.where(cmask2, tl.exp(lq), 0.0)
            kl_rel += tl.sum(p * ((zs - m_z[:, None]) - (zas - za_j[:, None])), 1)
            ent += tl.sum(tl.where(cmask2, p * tl.log(p + entropy_eps), 0.0), 1)
            omq += tl.sum(tl.where(cols[None, :] != best_i[:, None], q, 0.0), 1)
            omp_y += tl.sum(tl.where(cols[None, :] != y[:, None], p, 0.0), 1)
            omq_y += tl.sum(tl.where(cols[None, :] != y[:, None], q, 0.0), 1)

    # kl = sum p (r - r_j) + r_j with r = log p - log q and j = argmax z (the pivot)
    kl = kl_rel + ((ls_q - ls_z) - (za_j - m_q))
    dz_y = zy - m_z
    dza_y = zay - m_q
    out = stats_ptr + rows
    tl.store(out + 0 * B, ls_z - dz_y, mask=rmask)                         # ce_nat
    tl.store(out + 1 * B, ls_q - dza_y, mask=rmask)                        # ce_adv
    tl.store(out + 2 * B, kl, mask=rmask)                                  # kl
    tl.store(out + 3 * B, -ent, mask=rmask)                                # entropy
    tl.store(out + 4 * B, tl.exp(dz_y - ls_z), mask=rmask)                 # p_y
    tl.store(out + 5 * B, tl.exp(dza_y - ls_q), mask=rmask)                # q_y
    tl.store(out + 6 * B, tl.exp((best_v - m_q) - ls_q), mask=rmask)       # q_wrong
    tl.store(out + 7 * B, omq, mask=rmask)                                 # 1 - q_wrong
    tl.store(out + 8 * B, m_z, mask=rmask)
    tl.store(out + 9 * B, ls_z, mask=rmask)
    tl.store(out + 10 * B, m_q, mask=rmask)
    tl.store(out + 11 * B, ls_q, mask=rmask)
    tl.store(out + 12 * B, za_j, mask=rmask)
    tl.store(out + 13 * B, kl_rel, mask=rmask)
    tl.store(out + 14 * B, omp_y, mask=rmask)
    tl.store(out + 15 * B, omq_y, mask=rmask)
    tl.store(widx_ptr + rows, best_i.to(tl.int64), mask=rmask)


@lazy_jit
def _head_bwd_kernel(
    z_ptr, za_ptr, y_ptr, stats_ptr, widx_ptr, w_ptr, c_ptr, gout_ptr, gz_ptr, gza_ptr,
    B, C, stride_z, stride_za, stride_gz, stride_gza, w_scalar, beta, mart_eps,
    MART: tl.constexpr, W_TENSOR: tl.constexpr, HAS_C: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    rows_c = tl.minimum(rows, B - 1).to(tl.int64)
    y = tl.load(y_ptr + rows_c).to(tl.int32)
    st = stats_ptr + rows_c
    kl = tl.load(st + 2 * B)
    za_j = tl.load(st + 12 * B)
    kl_rel = tl.load(st + 13 * B)
    m_z = tl.load(st + 8 * B)
    ls_z = tl.load(st + 9 * B)
    m_q = tl.load(st + 10 * B)
    ls_q = tl.load(st + 11 * B)
    a = tl.load(gout_ptr).to(tl.float32) / B + tl.zeros([BLOCK_B], tl.float32)
    if HAS_C:
        a = a * tl.load(c_ptr + rows_c).to(tl.float32)
    omp_y = tl.load(st + 14 * B)                # 1 - p_y, summed (no cancellation)
    if MART:
        p_y = tl.load(st + 4 * B)
        q_w = tl.load(st + 6 * B)
        omq_w = tl.load(st + 7 * B)             # 1 - q_wrong, summed
        omq_y = tl.load(st + 15 * B)            # 1 - q_y, summed
        widx = tl.load(widx_ptr + rows_c).to(tl.int32)
        t = q_w / (omq_w + mart_eps)
        k_pr = beta * omp_y         # multiplies p (r - kl) in grad_z and (q - p) in grad_z'
        k_y = -beta * kl * p_y      # multiplies (e_y - p) in grad_z
    else:
        if W_TENSOR:
            w = tl.load(w_ptr + rows_c).to(tl.float32)
        else:
            w = w_scalar + tl.zeros([BLOCK_B], tl.float32)
    z_row = z_ptr + rows_c * stride_z
    za_row = za_ptr + rows_c * stride_za
    gz_row = gz_ptr + rows_c * stride_gz
    gza_row = gza_ptr + rows_c * stride_gza
    cols0 = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cols0
        cmask = cols < C
        cmask2 = cmask[None, :] & (rows_c >= 0)[:, None]
        smask = cmask[None, :] & rmask[:, None]
        z = tl.load(z_row[:, None] + cols[None, :], mask=cmask[None, :], other=0.0).to(tl.float32)
        za = tl.load(za_row[:, None] + cols[None, :], mask=cmask[None, :], other=0.0).to(tl.float32)
        zs = tl.where(cmask2, z, m_z[:, None])
        zas = tl.where(cmask2, za, m_q[:, None])
        lp = (zs - m_z[:, None]) - ls_z[:, None]
        lq = (zas - m_q[:, None]) - ls_q[:, None]
        p = tl.exp(lp)
        q = tl.exp(lq)
        r_kl = ((zs - m_z[:, None]) - (zas - za_j[:, None])) - kl_rel[:, None]   # r - kl
        is_y = cols[None, :] == y[:, None]
        # p - e_y and q - e_y: the y entry is -(1 - p_y) / -(1 - q_y) from the summed complements
        p_m_ey = tl.where(is_y, -omp_y[:, None], p)
        if MART:
            q_m_ey = tl.where(is_y, -omq_y[:, None], q)
            ew_m_q = tl.where(cols[None, :] == widx[:, None], omq_w[:, None], -q)
            gz = a[:, None] * (k_pr[:, None] * p * r_kl - k_y[:, None] * p_m_ey)
            gza = a[:, None] * (q_m_ey + t[:, None] * ew_m_q + k_pr[:, None] * (q - p))
        else:
            gz = a[:, None] * (p_m_ey + w[:, None] * p * r_kl)
            gza = (a * w)[:, None] * (q - p)
        tl.store(gz_row[:, None] + cols[None, :], gz.to(gz_ptr.dtype.element_ty), mask=smask)
        tl.store(gza_row[:, None] + cols[None, :], gza.to(gza_ptr.dtype.element_ty), mask=smask)


# ----------------------------------------------------------------------------- launchers
def _unit_col(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(1) == 1 else t.contiguous()


def _blocks(B: int, C: int) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_C, num_warps). On a GPU the row block also shrinks until the grid has ~64
    programs (small-C batches would otherwise run on a handful of SMs); the interpreter takes the
    largest tiles, as it pays per program instance."""
    block_c = block_c_for(C)
    if _STATE["block_b"] is not None:
        block_b = int(_STATE["block_b"])
    elif interpreter_enabled():
        block_b = max(1, min(_TILE_ELEMS_INTERPRETER // block_c, next_pow2(B), _MAX_BLOCK_B))
    else:
        block_b = max(1, min(_TILE_ELEMS // block_c, next_pow2(B), _MAX_BLOCK_B, next_pow2(max(1, B // 64))))
    elems = block_b * block_c
    num_warps = 1 if elems <= 256 else 2 if elems <= 1024 else 4
    return block_b, block_c, num_warps


def _check(z: torch.Tensor, z_adv: torch.Tensor, y: torch.Tensor) -> None:
    if z.dim() != 2 or z.shape != z_adv.shape:
        raise ValueError(f"logits must both be (B, C) with the same shape, got {tuple(z.shape)} "
                         f"and {tuple(z_adv.shape)}")
    if y.shape != z.shape[:1]:
        raise ValueError(f"labels must be (B,) = {tuple(z.shape[:1])}, got {tuple(y.shape)}")
    if z.shape[0] == 0 or z.shape[1] < 2:
        raise ValueError(f"need B >= 1 and C >= 2, got {tuple(z.shape)}")
    if z.device != z_adv.device or z.device != y.device:
        raise ValueError("logits and labels must be on one device")


def head_forward(z: torch.Tensor, z_adv: torch.Tensor, y: torch.Tensor, entropy_eps: float = 1e-12):
    """Launch the forward kernel: returns ``(stats, wrong_idx)``, stats a (NSTAT, B) float32 table."""
    _check(z, z_adv, y)
    z, z_adv, y = _unit_col(z), _unit_col(z_adv), y.contiguous()
    B, C = z.shape
    stats = new_empty((NSTAT, B), torch.float32, z.device)
    widx = new_empty((B,), torch.int64, z.device)
    block_b, block_c, num_warps = _blocks(B, C)
    grid = (triton_cdiv(B, block_b),)
    with device_ctx(z):
        _head_fwd_kernel[grid](
            z, z_adv, y, stats, widx, B, C, z.stride(0), z_adv.stride(0), float(entropy_eps),
            BLOCK_B=block_b, BLOCK_C=block_c, SINGLE_TILE=C <= block_c, num_warps=num_warps)
    return stats, widx


def head_backward(z: torch.Tensor, z_adv: torch.Tensor, y: torch.Tensor, stats: torch.Tensor,
                  wrong_idx: torch.Tensor, kl_weight: torch.Tensor | None, kl_weight_scalar: float,
                  sample_weight: torch.Tensor | None, grad_loss: torch.Tensor, mart: bool, beta: float):
    """Launch the backward kernel: ``(grad_z, grad_z_adv)``, contiguous, in the logits' dtypes.

    TRADES-like losses (``mart=False``) use the KL weight ``kl_weight`` ((B,) tensor) or
    ``kl_weight_scalar``; MART uses ``beta``. ``grad_loss`` is the upstream 0-d gradient."""
    z, z_adv, y = _unit_col(z), _unit_col(z_adv), y.contiguous()
    B, C = z.shape
    gz = new_empty((B, C), z.dtype, z.device)
    gza = new_empty((B, C), z_adv.dtype, z_adv.device)
    w = kl_weight.contiguous() if kl_weight is not None else stats  # dummy pointer when unused
    c = sample_weight.contiguous() if sample_weight is not None else stats
    block_b, block_c, num_warps = _blocks(B, C)
    grid = (triton_cdiv(B, block_b),)
    with device_ctx(z):
        _head_bwd_kernel[grid](
            z, z_adv, y, stats, wrong_idx, w, c, grad_loss.reshape(()), gz, gza,
            B, C, z.stride(0), z_adv.stride(0), gz.stride(0), gza.stride(0),
            float(kl_weight_scalar), float(beta), MART_EPS,
            MART=bool(mart), W_TENSOR=kl_weight is not None, HAS_C=sample_weight is not None,
            BLOCK_B=block_b, BLOCK_C=block_c, num_warps=num_warps)
    return gz, gza


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b
