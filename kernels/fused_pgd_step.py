"""One fused PGD step (sign / normalised-gradient ascent, projection, [0, 1] clamp) and the
per-sample gradient norm, in one launch. Reference: :func:`kernels.reference.pgd_step`.

One program per sample. A sample of a dense tensor whose batch dimension is outermost (contiguous
or channels_last alike) is one contiguous block of N = numel / B elements, and everything here is
elementwise or a per-sample sum, so the kernel walks that block in memory order and the output keeps
``x_adv``'s memory format. When the sample fits in one tile (N <= BLOCK_N, e.g. 3x32x32) each input
is read once; otherwise L2 needs three sweeps (||g||, then ||x1 - x_nat||, then the write) and
L-inf one.
"""
from __future__ import annotations

import torch

from ._common import block_n_for, device_ctx, lazy_jit, maybe_poison_, new_empty, tl
from .reference import PGD_NORMS, PGD_TINY


@lazy_jit
def _pgd_step_kernel(
    xa_ptr, g_ptr, xn_ptr, out_ptr, gn_ptr,
    N, step_size, eps, tiny,
    L2: tl.constexpr, BLOCK: tl.constexpr, SINGLE_TILE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    base = pid * N
    offs = tl.arange(0, BLOCK)
    if SINGLE_TILE:
        m = offs < N
        g = tl.load(g_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        xa = tl.load(xa_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        xn = tl.load(xn_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        g_norm = tl.sqrt(tl.sum(g * g, 0))
        if L2:
            d = (xa + step_size * (g / (g_norm + tiny))) - xn
            d_norm = tl.sqrt(tl.sum(d * d, 0))
            x_new = xn + d * tl.minimum(eps / (d_norm + tiny), 1.0)
        else:
            sign = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))
            x_new = tl.minimum(tl.maximum(xa + step_size * sign, xn - eps), xn + eps)
        x_new = tl.minimum(tl.maximum(x_new, 0.0), 1.0)
        tl.store(out_ptr + base + offs, x_new.to(out_ptr.dtype.element_ty), mask=m)
    else:
        g_sq = tl.zeros([BLOCK], tl.float32)
        if L2:
            for n0 in range(0, N, BLOCK):
                idx = n0 + offs
                g = tl.load(g_ptr + base + idx, mask=idx < N, other=0.0).to(tl.float32)
                g_sq += g * g
            g_norm = tl.sqrt(tl.sum(g_sq, 0))
            inv = 1.0 / (g_norm + tiny)
            d_sq = tl.zeros([BLOCK], tl.float32)
            for n0 in range(0, N, BLOCK):
                idx = n0 + offs
                m = idx < N
                g = tl.load(g_ptr + base + idx, mask=m, other=0.0).to(tl.float32)
                xa = tl.load(xa_ptr + base + idx, mask=m, other=0.0).to(tl.float32)
                xn = tl.load(xn_ptr + base + idx, mask=m, other=0.0).to(tl.float32)
                d = (xa + step_size * (g * inv)) - xn
                d_sq += d * d
            factor = tl.minimum(eps / (tl.sqrt(tl.sum(d_sq, 0)) + tiny), 1.0)
            for n0 in range(0, N, BLOCK):
                idx = n0 + offs
                m = idx < N
                g = tl.load(g_ptr + base + idx, mask=m, other=0.0).to(tl.float32)
                xa = tl.load(xa_ptr + base + idx, mask=m, other=0.0).to(tl.float32)
                xn = tl.load(xn_ptr + base + idx, mask=m, other=0.0).to(tl.float32)
                d = (xa + step_size * (g * inv)) - xn
                x_new = tl.minimum(tl.maximum(xn + d * factor, 0.0), 1.0)
                tl.store(out_ptr + base + idx, x_new.to(out_ptr.dtype.element_ty), mask=m)
        else:
            for n0 in range(0, N, BLOCK):
                idx = n0 + offs
                m = idx < N
                g = tl.load(g_ptr + base + idx, mask=m, other=0.0).to(tl.float32)
                xa = tl.load(xa_ptr + base + idx, mask=m, other=0.0).to(tl.float32)
                xn = tl.load(xn_ptr + base + idx, mask=m, other=0.0).to(tl.float32)
                g_sq += g * g
                sign = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))
                x_new = tl.minimum(tl.maximum(xa + step_size * sign, xn - eps), xn + eps)
                x_new = tl.minimum(tl.maximum(x_new, 0.0), 1.0)
                tl.store(out_ptr + base + idx, x_new.to(out_ptr.dtype.element_ty), mask=m)
            g_norm = tl.sqrt(tl.sum(g_sq, 0))
    tl.store(gn_ptr + pid, g_norm)


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill ``numel`` consecutive memory slots in some order."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _sample_blocks(t: torch.Tensor) -> bool:
    """Dense, with each sample one contiguous block of numel / B elements."""
    if not _dense(t):
        return False
    return t.shape[0] == 1 or t.stride(0) == t.numel() // t.shape[0]


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same element order inside a sample (the batch stride may differ only when B == 1)."""
    return _sample_blocks(b) and a.stride()[1:] == b.stride()[1:]


def out_like(x_adv: torch.Tensor) -> torch.Tensor:
    """The output buffer: ``empty_like(x_adv)`` (same memory format), contiguous when that would not
    keep each sample in one block. Used by the real and the fake (meta) implementation alike."""
    out = torch.empty_like(x_adv)
    if not _sample_blocks(out):
        out = torch.empty(x_adv.shape, dtype=x_adv.dtype, device=x_adv.device)
    return out


def _as_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if _same_layout(like, t):
        return t
    return torch.empty_like(like, dtype=t.dtype).copy_(t)


def pgd_step_forward(x_adv: torch.Tensor, grad: torch.Tensor, x_nat: torch.Tensor, step_size: float, eps: float,
                     norm: str = "linf"):
    """Launch the kernel: ``(x_new, grad_norm)``; x_new like ``x_adv`` (dtype and memory format),
    grad_norm (B,) float32."""
    if norm not in PGD_NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(PGD_NORMS)}")
    if x_adv.shape != grad.shape or x_adv.shape != x_nat.shape:
        raise ValueError(f"x_adv, grad and x_nat must have one shape, got {tuple(x_adv.shape)}, "
                         f"{tuple(grad.shape)}, {tuple(x_nat.shape)}")
    if x_adv.dim() < 1 or x_adv.shape[0] == 0 or x_adv.numel() == 0:
        raise ValueError(f"need a non-empty batch, got {tuple(x_adv.shape)}")
    out = maybe_poison_(out_like(x_adv))
    xa = _as_layout(x_adv, out)
    g = _as_layout(grad, out)
    xn = _as_layout(x_nat, out)
    B = x_adv.shape[0]
    N = x_adv.numel() // B
    g_norm = new_empty((B,), torch.float32, x_adv.device)
    block = block_n_for(N)
    with device_ctx(x_adv):
        _pgd_step_kernel[(B,)](
            xa, g, xn, out, g_norm, N, float(step_size), float(eps), PGD_TINY,
            L2=norm == "l2", BLOCK=block, SINGLE_TILE=N <= block, num_warps=8 if block >= 2048 else 4)
    return out, g_norm
