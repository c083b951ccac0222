"""Kernel benchmark cases: each Triton kernel beside its eager and ``torch.compile``d reference.

:func:`cases` builds, per shape, the forward+backward of the TRADES / D-TRADES / MART losses (gradients
w.r.t. both logit tensors), the forward ``loss_head`` statistics, and ``pgd_step`` (L-inf and L2) on a
128x3x32x32 batch. ``fastrobust bench kernels`` times them (its shared interleaved timer) and reports
microseconds per call and the achieved bandwidth. Bytes are the algorithmic traffic, the same for
every implementation (inputs read once, outputs written once), so the GB/s columns compare
implementations on one scale.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch

from . import reference as R

CPU_NOTICE = ("kernel benchmarks need a CUDA GPU; the CPU runs the reference ops, use TRITON_INTERPRET=1 "
              "tests for correctness")
PGD_SHAPE = (128, 3, 32, 32)


@dataclass
class Case:
    op: str
    shape: str
    dtype: str
    nbytes: int
    impls: dict[str, Optional[Callable[[], object]]] = field(default_factory=dict)  # triton, eager, compiled


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _compiled(fn: Callable) -> Optional[Callable]:
    try:
        return torch.compile(fn, fullgraph=True)
    except Exception:  # noqa: BLE001 - compile unavailable: that column stays empty
        return None


def _with_backward(loss_fn: Callable, args) -> Callable[[], object]:
    return lambda: torch.autograd.grad(loss_fn(*args).loss, args)


def _loss_cases(device: torch.device, B: int, C: int, dtype: torch.dtype, compile_reference: bool) -> list[Case]:
    from . import ops

    name = str(dtype).replace("torch.", "")
    g = torch.Generator(device="cpu").manual_seed(B * 1000 + C)
    z = torch.randn(B, C, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    za = (z.detach().float() + torch.randn(B, C, generator=g).to(device)).to(dtype).requires_grad_(True)
    y = torch.randint(0, C, (B,), generator=g).to(device)
    s = torch.rand(B, generator=g).to(device)
    base = _nbytes(z, za, y) + _nbytes(z, za) + 4
    out = []
    for op, ref, fused, extra in (
            ("trades fwd+bwd", lambda a, b: R.trades_loss(a, b, y, 6.0), lambda a, b: ops.trades_loss(a, b, y, 6.0), 0),
            ("dtrades fwd+bwd", lambda a, b: R.dtrades_loss(a, b, y, s, 1.0, 1.0, "minmax", 1.0, 1e-12),
             lambda a, b: ops.dtrades_loss(a, b, y, s, 1.0, 1.0, "minmax", 1.0, 1e-12), _nbytes(s) + 4 * B),
            ("mart fwd+bwd", lambda a, b: R.mart_loss(a, b, y, 6.0), lambda a, b: ops.mart_loss(a, b, y, 6.0), 0)):
        cref = _compiled(ref) if compile_reference else None
        out.append(Case(op, f"{B}x{C}", name, base + extra, {
            "triton": _with_backward(fused, (z, za)), "eager": _with_backward(ref, (z, za)),
            "compiled": _with_backward(cref, (z, za)) if cref else None}))
    zd, zad = z.detach(), za.detach()
    chead = _compiled(lambda a, b: R.loss_head(a, b, y)) if compile_reference else None
    out.append(Case("loss_head fwd", f"{B}x{C}", name, _nbytes(zd, zad, y) + B * (7 * 4 + 8), {
        "triton": lambda: ops.loss_head(zd, zad, y), "eager": lambda: R.loss_head(zd, zad, y),
        "compiled": (lambda: chead(zd, zad)) if chead else None}))
    return out


def _pgd_case(device: torch.device, norm: str, eps: float, step: float, compile_reference: bool) -> Case:
    from . import ops

    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.rand(PGD_SHAPE, generator=g).to(device)
    xa = (x + 0.01 * torch.randn(PGD_SHAPE, generator=g).to(device)).clamp(0, 1)
    grad = torch.randn(PGD_SHAPE, generator=g).to(device)
    cpgd = _compiled(lambda a, b, c: R.pgd_step(a, b, c, step, eps, norm)) if compile_reference else None
    return Case(f"pgd_step {norm}", "x".join(map(str, PGD_SHAPE)), "float32",
                _nbytes(xa, grad, x) + _nbytes(xa) + 4 * PGD_SHAPE[0],
                {"triton": lambda: ops.pgd_step(xa, grad, x, step, eps, norm),
                 "eager": lambda: R.pgd_step(xa, grad, x, step, eps, norm),
                 "compiled": (lambda: cpgd(xa, grad, x)) if cpgd else None})


def cases(device: torch.device, batch_sizes: Iterable[int] = (128, 512), num_classes: Iterable[int] = (10, 100),
          dtype: torch.dtype = torch.float32, compile_reference: bool = True) -> list[Case]:
    """Every benchmark case on ``device`` (the loss ops per (B, C), then the PGD step)."""
    out = [c for B in batch_sizes for C in num_classes for c in _loss_cases(device, B, C, dtype, compile_reference)]
    return out + [_pgd_case(device, norm, eps, step, compile_reference)
                  for norm, eps, step in (("linf", 8 / 255, 2 / 255), ("l2", 0.5, 0.1))]
