"""Kernel benchmarks: the Triton kernels against the eager and the ``torch.compile``d reference ops.

``run()`` times, per shape, the forward+backward of the TRADES / D-TRADES / MART losses (gradients
w.r.t. both logit tensors), the forward ``loss_head`` statistics, and ``pgd_step`` (L-inf and L2) on a
128x3x32x32 batch, and reports microseconds per call (median over repeats, CUDA events, after a
warm-up) and the achieved bandwidth in GB/s. Bytes are the algorithmic traffic, the same for every
implementation: the inputs read once plus the outputs written once (e.g. for a loss forward+backward:
both logit tensors, the labels and per-sample vectors, the two gradient tensors and the loss), so the
GB/s columns compare implementations on one scale.

On a machine without CUDA ``run`` prints a one-line notice and returns []. ``deadline`` (a
``time.monotonic()`` value) bounds the whole run: cases that would start after it are reported with
``status`` "skipped: time budget" and no timings (``fastrobust.gpu_suite`` runs it under a budget).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Iterable, Optional

import torch

from . import reference as R

CPU_NOTICE = ("kernel benchmarks need a CUDA GPU; the CPU runs the reference ops, use TRITON_INTERPRET=1 "
              "tests for correctness")
PGD_SHAPE = (128, 3, 32, 32)


# ----------------------------------------------------------------------------- timing
def _cuda_timer(fn: Callable[[], object], iters: int, repeats: int, warmup: int) -> float:
    """Median microseconds per call over ``repeats`` runs of ``iters`` back-to-back calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / iters)   # ms -> us
    return statistics.median(samples)


def _wall_timer(fn: Callable[[], object], iters: int, repeats: int, warmup: int) -> float:
    """Host wall-clock variant (used only to exercise the benchmark code without a GPU)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        samples.append((time.perf_counter() - t0) * 1e6 / iters)
    return statistics.median(samples)


# ----------------------------------------------------------------------------- cases
def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _loss_cases(device, B: int, C: int, dtype: torch.dtype):
    """(name, reference_fn, kernel_fn, args, bytes) for the loss ops, forward + backward."""
    from . import ops

    g = torch.Generator(device="cpu").manual_seed(B * 1000 + C)
    z = torch.randn(B, C, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    za = (z.detach().float() + torch.randn(B, C, generator=g).to(device)).to(dtype).requires_grad_(True)
    y = torch.randint(0, C, (B,), generator=g).to(device)
    s = torch.rand(B, generator=g).to(device)
    grads_and_loss = _nbytes(z, za) + 4
    base = _nbytes(z, za, y) + grads_and_loss
    return [
        ("trades fwd+bwd", lambda a, b: R.trades_loss(a, b, y, 6.0), lambda a, b: ops.trades_loss(a, b, y, 6.0),
         (z, za), base),
        ("dtrades fwd+bwd",
         lambda a, b: R.dtrades_loss(a, b, y, s, 1.0, 1.0, "minmax", 1.0, 1e-12)[0],
         lambda a, b: ops.dtrades_loss(a, b, y, s, 1.0, 1.0, "minmax", 1.0, 1e-12)[0],
         (z, za), base + _nbytes(s) + 4 * B),                     # + sensitivity in, lambda out
        ("mart fwd+bwd", lambda a, b: R.mart_loss(a, b, y, 6.0), lambda a, b: ops.mart_loss(a, b, y, 6.0),
         (z, za), base),
    ], (z, za, y)


def _with_backward(loss_fn: Callable, args) -> Callable[[], object]:
    def step():
        loss = loss_fn(*args)
        return torch.autograd.grad(loss, args)
    return step


def _compiled(fn: Callable) -> Optional[Callable]:
    try:
        return torch.compile(fn, fullgraph=True)
    except Exception:  # pragma: no cover - compile unavailable
        return None


BUDGET_SKIP = "skipped: time budget"


def _out_of_time(deadline: Optional[float]) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _skipped_row(label: str, shape: str, dtype, nbytes: int) -> dict:
    row = {"op": label, "shape": shape, "dtype": str(dtype).replace("torch.", ""), "bytes": nbytes,
           "status": BUDGET_SKIP, "speedup_vs_eager": None, "speedup_vs_compiled": None}
    for name in ("triton", "eager", "compiled"):
        row[f"{name}_us"] = row[f"{name}_gbps"] = None
    return row


def _measure(timer, label: str, shape: str, dtype, nbytes: int, impls: dict, iters: int, repeats: int,
             warmup: int, deadline: Optional[float] = None) -> dict:
    if _out_of_time(deadline):
        return _skipped_row(label, shape, dtype, nbytes)
    row = {"op": label, "shape": shape, "dtype": str(dtype).replace("torch.", ""), "bytes": nbytes, "status": "ok"}
    for name, fn in impls.items():
        us = None
        if fn is not None:
            try:
                us = timer(fn, iters, repeats, warmup)
            except Exception as e:  # e.g. torch.compile failing on this machine: report, keep going
                row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:200]
        row[f"{name}_us"] = us
        row[f"{name}_gbps"] = (nbytes / (us * 1e-6) / 1e9) if us else None
    t, e, c = row.get("triton_us"), row.get("eager_us"), row.get("compiled_us")
    row["speedup_vs_eager"] = (e / t) if (t and e) else None
    row["speedup_vs_compiled"] = (c / t) if (t and c) else None
    return row


def _run(device: str, batch_sizes: Iterable[int], num_classes: Iterable[int], iters: int, repeats: int,
         warmup: int, dtype: torch.dtype, timer, compile_reference: bool,
         deadline: Optional[float] = None) -> list[dict]:
    from . import ops

    rows = []
    for B in batch_sizes:
        for C in num_classes:
            cases, (z, za, y) = _loss_cases(device, B, C, dtype)
            for label, ref_fn, kernel_fn, args, nbytes in cases:
                impls = {"triton": _with_backward(kernel_fn, args), "eager": _with_backward(ref_fn, args),
                         "compiled": None}
                if compile_reference and not _out_of_time(deadline):
                    cfn = _compiled(ref_fn)
                    impls["compiled"] = _with_backward(cfn, args) if cfn is not None else None
                rows.append(_measure(timer, label, f"{B}x{C}", dtype, nbytes, impls, iters, repeats, warmup,
                                     deadline))
            zd, zad = z.detach(), za.detach()
            head_bytes = _nbytes(zd, zad, y) + B * (7 * 4 + 8)
            impls = {"triton": lambda: ops.loss_head(zd, zad, y), "eager": lambda: R.loss_head(zd, zad, y),
                     "compiled": None}
            if compile_reference and not _out_of_time(deadline):
                cfn = _compiled(lambda a, b: R.loss_head(a, b, y))
                impls["compiled"] = (lambda: cfn(zd, zad)) if cfn is not None else None
            rows.append(_measure(timer, "loss_head fwd", f"{B}x{C}", dtype, head_bytes, impls, iters, repeats,
                                 warmup, deadline))
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.rand(PGD_SHAPE, generator=g).to(device)
    xa = (x + 0.01 * torch.randn(PGD_SHAPE, generator=g).to(device)).clamp(0, 1)
    grad = torch.randn(PGD_SHAPE, generator=g).to(device)
    pgd_bytes = _nbytes(xa, grad, x) + _nbytes(xa) + 4 * PGD_SHAPE[0]
    for norm, eps, step in (("linf", 8 / 255, 2 / 255), ("l2", 0.5, 0.1)):
        impls = {"triton": lambda: ops.pgd_step(xa, grad, x, step, eps, norm),
                 "eager": lambda: R.pgd_step(xa, grad, x, step, eps, norm), "compiled": None}
        if compile_reference and not _out_of_time(deadline):
            cfn = _compiled(lambda a, b, c: R.pgd_step(a, b, c, step, eps, norm))
            impls["compiled"] = (lambda: cfn(xa, grad, x)) if cfn is not None else None
        rows.append(_measure(timer, f"pgd_step {norm}", "x".join(map(str, PGD_SHAPE)), torch.float32, pgd_bytes,
                             impls, iters, repeats, warmup, deadline))
    return rows


def run(device: str = "cuda", batch_sizes=(128, 512), num_classes=(10, 100), iters: int = 50,
        repeats: int = 7, warmup: int = 10, dtype: torch.dtype = torch.float32, *,
        compile_reference: bool = True, deadline: Optional[float] = None) -> list[dict]:
    """Benchmark the kernels on ``device``; one dict per (op, shape) with ``{impl}_us`` / ``{impl}_gbps``
    for impl in triton / eager / compiled, the speedups and ``status`` ("ok", or "skipped: time budget"
    for cases past ``deadline``, a ``time.monotonic()`` value). ``compile_reference=False`` leaves out
    the ``torch.compile``d references (their compilation takes most of the run's time).
    Without CUDA: prints a notice, returns []."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        print(CPU_NOTICE)
        return []
    with torch.cuda.device(dev):
        return _run(device, batch_sizes, num_classes, iters, repeats, warmup, dtype, _cuda_timer,
                    compile_reference=compile_reference, deadline=deadline)


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_markdown(rows: list[dict]) -> str:
    """The rows of :func:`run` as a markdown table."""
    header = ("| op | shape | dtype | triton us | eager us | compiled us | triton GB/s | eager GB/s | "
              "compiled GB/s | x eager | x compiled |")
    lines = [header, "|" + "---|" * 11]
    skipped = sum(1 for r in rows if r.get("status", "ok") != "ok")
    for r in rows:
        lines.append("| " + " | ".join([
            r["op"], r["shape"], r["dtype"],
            _fmt(r.get("triton_us"), ".1f"), _fmt(r.get("eager_us"), ".1f"), _fmt(r.get("compiled_us"), ".1f"),
            _fmt(r.get("triton_gbps"), ".1f"), _fmt(r.get("eager_gbps"), ".1f"), _fmt(r.get("compiled_gbps"), ".1f"),
            _fmt(r.get("speedup_vs_eager"), ".2f"), _fmt(r.get("speedup_vs_compiled"), ".2f")]) + " |")
    if skipped:
        lines.append(f"\n{skipped} case(s) not measured: {BUDGET_SKIP}.")
    return "\n".join(lines)


if __name__ == "__main__":
    out = run()
    if out:
        print(format_markdown(out))
