"""Backend dispatch, the custom ops under torch.compile, and D-TRADES' lambda semantics.

Triton runs on the CPU through its interpreter, or compiled on a GPU with FASTROBUST_TEST_DEVICE=cuda
(tests/test_kernels_device.py). Tests of the CPU dispatch rules use CPU tensors in every mode; tests
that run the kernels build their inputs with ``make(..., on_device=True)``.
"""
from __future__ import annotations

import zlib

from test_kernels_device import (DEVICE, cpu_tensors, interpreter_only, not_audited,  # noqa: F401
                                 to_dev)  # before triton / kernels are imported

import pytest
import torch

import kernels
from kernels import ops
from kernels import reference as R
from kernels.testing import poison_outputs, self_check

BACKENDS = ["triton", "reference"]


@pytest.fixture(autouse=True)
def _clean_default(monkeypatch):
    monkeypatch.delenv("FASTROBUST_KERNELS", raising=False)
    kernels.set_backend(None)
    # self-check off, as in test_kernels.py: these tests compare against the references themselves and
    # some trace the ops (torch.compile skips the check anyway); tests/test_kernels_selfcheck.py tests it
    with poison_outputs(), self_check(False):
        yield
    kernels.set_backend(None)


def outputs_equal(a, b) -> bool:
    """Two LossOutputs (or LossHeads) are bitwise equal, field by field (lam None on both or equal)."""
    if isinstance(a, kernels.LossOutput):
        return (torch.equal(a.loss, b.loss) and outputs_equal(a.head, b.head)
                and (a.lam is None) == (b.lam is None) and (a.lam is None or torch.equal(a.lam, b.lam)))
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def make(B=6, C=10, seed=0, requires_grad=False, on_device=False):
    """(z, z_adv, y, sensitivity): CPU tensors, or on DEVICE with ``on_device`` (the same values)."""
    g = torch.Generator().manual_seed(zlib.crc32(repr((B, C, seed)).encode()))
    t = 0.3 + 3 * torch.rand(B, 1, generator=g)
    z = torch.randn(B, C, generator=g) * t
    za = z + torch.randn(B, C, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    s = 2 * torch.rand(B, generator=g)
    if on_device:
        z, za, y, s = to_dev(z), to_dev(za), to_dev(y), to_dev(s)
    if requires_grad:
        z.requires_grad_(True)
        za.requires_grad_(True)
    return z, za, y, s


# ----------------------------------------------------------------------------- dispatch
@pytest.mark.usefixtures("cpu_tensors")
def test_auto_on_cpu_runs_the_reference(monkeypatch):
    z, za, y, s = make()
    assert kernels.resolve_backend(z, "auto") == "reference"
    assert kernels.resolve_backend(z) == "reference"          # process default is auto

    def boom(*a, **k):
        raise AssertionError("the Triton op must not run for CPU tensors under 'auto'")
    for name in ("trades_loss", "dtrades_loss", "mart_loss", "loss_head", "pgd_step"):
        monkeypatch.setattr(ops, name, boom)
    assert outputs_equal(kernels.trades_loss(z, za, y, 6.0), R.trades_loss(z, za, y, 6.0))
    assert outputs_equal(kernels.mart_loss(z, za, y, 6.0, backend="auto"), R.mart_loss(z, za, y, 6.0))
    got = kernels.dtrades_loss(z, za, y, s, 1.0, 1.0, "minmax", 1.0, 1e-12)
    want = R.dtrades_loss(z, za, y, s, 1.0, 1.0, "minmax", 1.0, 1e-12)
    assert outputs_equal(got, want)
    head = kernels.loss_head(z, za, y)
    assert outputs_equal(head, R.loss_head(z, za, y))


def test_auto_on_cuda_resolves_to_triton():
    # resolve by device type (what resolve_backend does with a CUDA tensor): no GPU needed
    assert kernels.dispatch._resolve("cuda", "auto") == "triton"
    assert kernels.dispatch._resolve("cuda", "reference") == "reference"
    if DEVICE.type == "cuda":   # and with real CUDA tensors
        z, *_ = make(on_device=True)
        assert kernels.resolve_backend(z) == kernels.resolve_backend(z, "triton") == "triton"


@interpreter_only
def test_triton_on_cpu_with_interpreter():
    z, za, y, _ = make()
    assert kernels.resolve_backend(z, "triton") == "triton"


@pytest.mark.parametrize("value", ["0", ""])
@pytest.mark.usefixtures("cpu_tensors")
def test_triton_on_cpu_without_interpreter_raises(monkeypatch, value):
    monkeypatch.setenv("TRITON_INTERPRET", value)
    z, za, y, s = make()
    with pytest.raises(ValueError, match=r"TRITON_INTERPRET=1.*reference"):
        kernels.resolve_backend(z, "triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        kernels.dtrades_loss(z, za, y, s, 1.0, 1.0, backend="triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        kernels.pgd_step(z, z, z, 0.1, 0.1, "linf", backend="triton")
    assert kernels.resolve_backend(z, "auto") == "reference"   # auto is unaffected


@pytest.mark.usefixtures("cpu_tensors")
def test_unknown_backend_lists_the_valid_names():
    z, za, y, _ = make()
    for call in (lambda: kernels.resolve_backend(z, "cuda"),
                 lambda: kernels.mart_loss(z, za, y, 6.0, backend="bogus"),
                 lambda: kernels.set_backend("fast")):
        with pytest.raises(ValueError) as info:
            call()
        msg = str(info.value)
        assert all(name in msg for name in ("auto", "triton", "reference")), msg


def test_process_default_from_set_backend_and_environment(monkeypatch):
    z, *_ = make(on_device=True)
    monkeypatch.setenv("FASTROBUST_KERNELS", "triton")
    assert kernels.get_backend() == "triton"
    assert kernels.resolve_backend(z) == "triton"
    kernels.set_backend("reference")                  # set_backend wins over the environment
    assert kernels.resolve_backend(z) == "reference"
    assert kernels.resolve_backend(z, "triton") == "triton"   # an explicit argument wins over both
    kernels.set_backend(None)
    assert kernels.resolve_backend(z) == "triton"
    monkeypatch.setenv("FASTROBUST_KERNELS", "gpu")
    with pytest.raises(ValueError, match="FASTROBUST_KERNELS"):
        kernels.resolve_backend(z)


@pytest.mark.parametrize("backend", BACKENDS)
def test_argument_validation(backend):
    z, za, y, s = make(on_device=True)
    with pytest.raises(ValueError, match="minmax"):
        kernels.dtrades_loss(z, za, y, s, 1.0, 1.0, "zscore", backend=backend)
    with pytest.raises(ValueError):
        kernels.dtrades_loss(z, za, y, s[:3], 1.0, 1.0, backend=backend)
    with pytest.raises(ValueError):
        kernels.trades_loss(z, za[:, :5], y, 6.0, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scalar_tensor_kl_weight_equals_float(backend):
    z, za, y, _ = make(on_device=True)
    a = kernels.trades_loss(z, za, y, to_dev(torch.tensor(6.0)), backend=backend)
    b = kernels.trades_loss(z, za, y, 6.0, backend=backend)
    assert outputs_equal(a, b)


# ----------------------------------------------------------------------------- custom ops
@not_audited
def test_opcheck_custom_ops():
    """torch.library.opcheck: schema, fake (meta) implementations, autograd registration."""
    z, za, y, s = make(B=5, C=7, requires_grad=True, on_device=True)
    w = to_dev(torch.rand(5) + 0.5)
    c = to_dev(torch.rand(5) + 0.5)
    x = to_dev(torch.rand(2, 3, 4, 4))
    cases = [
        (ops.loss_head_op, (z.detach(), za.detach(), y, 1e-12)),
        (ops.trades_loss_op, (z, za, y, None, 6.0, None)),
        (ops.trades_loss_op, (z, za, y, w, 0.0, c)),
        (ops.dtrades_loss_op, (z, za, y, s, 1.0, 0.5, "minmax", 2.0, 1e-12, c)),
        (ops.mart_loss_op, (z, za, y, 6.0, c)),
        (ops.pgd_step_op, (x, to_dev(torch.randn(2, 3, 4, 4)), x.clone(), 0.01, 0.03, "l2")),
        (ops.pgd_step_op, (x.contiguous(memory_format=torch.channels_last), to_dev(torch.randn(2, 3, 4, 4)), x,
                           0.01, 0.03, "linf")),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration",
                                                    "test_faketensor"))


def _dtrades_fn(y, s):
    def f(z, za):
        return kernels.dtrades_loss(z, za, y, s, 1.0, 0.5, "minmax", 2.0, 1e-12, backend="triton").loss
    return f


@not_audited
def test_compile_fullgraph_dtrades_forward_backward():
    """torch.compile(fullgraph=True) with inductor: the custom ops trace as opaque nodes in forward and
    in the AOT-compiled backward; results equal the eager run (the same kernels do the math)."""
    torch._dynamo.reset()
    z, za, y, s = make(B=8, C=10, seed=3, on_device=True)
    f = _dtrades_fn(y, s)
    explanation = torch._dynamo.explain(f)(z.clone().requires_grad_(), za.clone().requires_grad_())
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    results = []
    for fn in (compiled, f):
        zz, zza = z.clone().requires_grad_(), za.clone().requires_grad_()
        loss = fn(zz, zza)
        loss.backward()
        results.append((loss.detach(), zz.grad, zza.grad))
    (lc, gzc, gzac), (le, gze, gzae) = results
    assert torch.isfinite(gzc).all() and torch.isfinite(gzac).all()
    assert torch.allclose(lc, le, rtol=1e-6, atol=0)
    assert torch.allclose(gzc, gze, rtol=1e-6, atol=1e-9)
    assert torch.allclose(gzac, gzae, rtol=1e-6, atol=1e-9)
    # and the kernels are right: float64 reference, on the CPU
    zr, zar = z.cpu().double().requires_grad_(), za.cpu().double().requires_grad_()
    lr = R.dtrades_loss(zr, zar, y.cpu(), s.cpu().double(), 1.0, 0.5, "minmax", 2.0, 1e-12).loss
    lr.backward()
    assert torch.allclose(lc.cpu().double(), lr, rtol=1e-5)
    # atol 1e-6: a cancelling gradient element is a few float32 ulps of its O(1) terms (test_kernels' floor)
    assert torch.allclose(gzc.cpu().double(), zr.grad, rtol=1e-4, atol=1e-6)


@not_audited
def test_no_graph_breaks_in_other_ops():
    torch._dynamo.reset()
    z, za, y, _ = make(B=4, C=6, seed=4, on_device=True)
    x = to_dev(torch.rand(2, 3, 4, 4))

    def f(z, za, x):
        a = kernels.trades_loss(z, za, y, 6.0, backend="triton")
        b = kernels.mart_loss(z, za, y, 6.0, backend="triton")
        head = kernels.loss_head(z, za, y, backend="triton")
        x_new, gn = kernels.pgd_step(x, x - 0.5, x, 0.01, 0.03, "linf", backend="triton")
        return a.loss + b.loss + a.head.entropy.sum() + head.kl.sum() + x_new.sum() + gn.sum()

    explanation = torch._dynamo.explain(f)(z, za, x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


@pytest.mark.usefixtures("cpu_tensors")
def test_no_graph_breaks_in_reference_ops():
    """The reference ops (what 'auto' runs on the CPU) trace into one graph as well."""
    torch._dynamo.reset()
    z, za, y, s = make(B=4, C=6, seed=5)
    x = torch.rand(2, 3, 4, 4)

    def f(z, za, x):
        a = kernels.trades_loss(z, za, y, 6.0)
        b = kernels.mart_loss(z, za, y, 6.0)
        c = kernels.dtrades_loss(z, za, y, s, 1.0, 1.0, "minmax", 2.0)
        head = kernels.loss_head(z, za, y)
        x_new, gn = kernels.pgd_step(x, x - 0.5, x, 0.01, 0.03, "l2")
        return (a.loss + b.loss + c.loss + c.lam.sum() + b.head.q_wrong.sum() + head.kl.sum() + x_new.sum()
                + gn.sum())

    assert kernels.resolve_backend(z) == "reference"
    explanation = torch._dynamo.explain(f)(z, za, x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


# ----------------------------------------------------------------------------- D-TRADES lambda
@pytest.mark.parametrize("backend", BACKENDS)
def test_minmax_lambda_range(backend):
    z, za, y, s = make(B=32, C=10, seed=5, on_device=True)
    alpha, beta, scale = 1.5, 0.5, 3.0
    lam = kernels.dtrades_loss(z, za, y, s, alpha, beta, "minmax", scale, backend=backend).lam
    assert lam.shape == (32,) and torch.isfinite(lam).all()
    assert lam.min() >= 0 and lam.max() <= scale * (alpha + beta) * (1 + 1e-6)
    # alpha alone: lam / scale is the min-max-normalised entropy, spanning exactly [0, 1]
    out = kernels.dtrades_loss(z, za, y, s, 1.0, 0.0, "minmax", scale, backend=backend)
    lam_h, ent = out.lam, out.head.entropy
    assert lam_h.min() == 0 and lam_h.max() == scale
    assert lam_h.argmin() == ent.argmin() and lam_h.argmax() == ent.argmax()


@pytest.mark.parametrize("backend", BACKENDS)
def test_minmax_without_spread_gives_midpoint(backend):
    alpha, beta, scale = 1.5, 0.5, 3.0
    z, za, y, s = make(B=1, C=10, seed=6, on_device=True)      # B = 1: no spread at all
    lam = kernels.dtrades_loss(z, za, y, s, alpha, beta, "minmax", scale, backend=backend).lam
    assert torch.equal(lam, torch.full_like(lam, scale * (alpha * 0.5 + beta * 0.5)))
    z, za, y, _ = make(B=5, C=10, seed=7, on_device=True)      # identical rows, constant s
    z, za, y = z[:1].expand(5, -1).contiguous(), za[:1].expand(5, -1).contiguous(), y[:1].expand(5).contiguous()
    lam = kernels.dtrades_loss(z, za, y, to_dev(torch.full((5,), 0.3)), alpha, beta, "minmax", scale,
                               backend=backend).lam
    assert torch.equal(lam, torch.full_like(lam, scale * (alpha * 0.5 + beta * 0.5)))
    assert not torch.isnan(lam).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_mean_normalisation(backend):
    alpha, beta, scale = 1.5, 0.5, 3.0
    z, za, y, s = make(B=16, C=10, seed=8, on_device=True)
    lam = kernels.dtrades_loss(z, za, y, s, alpha, beta, "mean", scale, backend=backend).lam
    # rtol 1e-5 (test_kernels' RTOL): a float32 mean's summation order follows the SIMD width, a few ulps
    # (1e-6 is only ~8 ulps); a wrong normalisation is off by O(1)
    assert torch.allclose(lam.mean().cpu(), torch.tensor(scale * (alpha + beta), dtype=lam.dtype), rtol=1e-5)
    # a zero-mean (all-zero) sensitivity normalises to 1, not NaN
    out = kernels.dtrades_loss(z, za, y, to_dev(torch.zeros(16)), alpha, beta, "mean", scale, backend=backend)
    lam0, ent = out.lam, out.head.entropy
    assert torch.isfinite(lam0).all()
    assert torch.allclose(lam0, scale * (alpha * ent / ent.mean() + beta), rtol=1e-5)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_lambda_equals_trades(backend, weighted):
    """normalize="none", alpha=0, beta=1, s = c: lambda == c, so D-TRADES is TRADES with kl_weight=c,
    exactly (loss and both gradients), on one backend."""
    c_val = 4.75
    z, za, y, _ = make(B=12, C=10, seed=9, on_device=True)
    sw = to_dev(torch.rand(12) + 0.5) if weighted else None
    out = []
    for fn in (lambda a, b: kernels.dtrades_loss(a, b, y, to_dev(torch.full((12,), c_val)), 0.0, 1.0, "none", 1.0,
                                                 1e-12, sw, backend=backend),
               lambda a, b: kernels.trades_loss(a, b, y, c_val, sw, backend=backend)):
        zz, zza = z.clone().requires_grad_(), za.clone().requires_grad_()
        res = fn(zz, zza)
        if res.lam is not None:    # the D-TRADES call
            assert torch.equal(res.lam.cpu(), torch.full((12,), c_val, dtype=res.lam.dtype))
        res.loss.backward()
        out.append((res, zz.grad, zza.grad))
    (d, gzd, gzad), (t, gzt, gzat) = out
    assert d.lam is not None and t.lam is None
    assert torch.equal(d.loss, t.loss)
    assert torch.equal(gzd, gzt) and torch.equal(gzad, gzat)
    assert outputs_equal(d.head, t.head)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dtrades_logging_outputs_are_detached(backend):
    z, za, y, s = make(requires_grad=True, on_device=True)
    out = kernels.dtrades_loss(z, za, y, s, 1.0, 1.0, backend=backend)
    assert out.loss.requires_grad
    assert not out.lam.requires_grad and not any(t.requires_grad for t in out.head)
    for other in (kernels.trades_loss(z, za, y, 6.0, backend=backend),
                  kernels.mart_loss(z, za, y, 5.0, backend=backend)):
        assert other.loss.requires_grad and other.lam is None
        assert not any(t.requires_grad for t in other.head)


# ----------------------------------------------------------------------------- benchmark harness
BENCH_OPS = ["trades fwd+bwd", "dtrades fwd+bwd", "mart fwd+bwd", "loss_head fwd", "pgd_step linf", "pgd_step l2"]


def test_bench_without_cuda_prints_notice_and_returns_nothing(capsys):
    from fastrobust.bench import run_kernel_bench
    from kernels import bench

    assert run_kernel_bench(device="cpu") == []
    out = capsys.readouterr().out.strip()
    assert out == bench.CPU_NOTICE and "CUDA GPU" in out and "TRITON_INTERPRET=1" in out


def test_bench_harness_runs_every_case_and_formats():
    """Every benchmark case (kernels.bench.cases, tiny shapes, on DEVICE) runs its Triton and its eager
    column, and both compute the same thing: they agree to 1e-4 relative + 1e-6 (each is within ~1e-5 of
    float64, tests/test_kernels*.py, on any CPU; a miswired column differs by O(1)). Timings are not checked."""
    from torch.utils import _pytree as pytree

    from fastrobust.bench import kernel_markdown
    from kernels import bench

    cases = bench.cases(DEVICE, [3], [10], compile_reference=False)
    assert [c.op for c in cases] == BENCH_OPS
    for case in cases:
        assert case.nbytes > 0 and case.dtype == "float32"
        assert case.shape == ("x".join(map(str, bench.PGD_SHAPE)) if case.op.startswith("pgd") else "3x10")
        assert set(case.impls) == {"triton", "eager", "compiled"} and case.impls["compiled"] is None
        got, want = pytree.tree_leaves(case.impls["triton"]()), pytree.tree_leaves(case.impls["eager"]())
        assert len(got) == len(want) > 0, case.op
        for a, b in zip(got, want):
            assert a.shape == b.shape and a.device == DEVICE, case.op
            assert torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-6), case.op
    rows = [{"op": c.op, "shape": c.shape, "dtype": c.dtype, "bytes": c.nbytes, "triton_us": 1.0, "eager_us": 2.0,
             "compiled_us": None, "triton_gbps": c.nbytes / 1e3, "eager_gbps": c.nbytes / 2e3, "compiled_gbps": None,
             "speedup_vs_eager": 2.0, "speedup_vs_compiled": None} for c in cases]
    table = kernel_markdown(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows) and lines[0].startswith("| op | shape")
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    assert all(line.startswith(f"| {op} |") for line, op in zip(lines[2:], BENCH_OPS))


def test_bench_timer_past_its_deadline_runs_every_case_once():
    """Under a deadline (fastrobust check-gpu's time budget) the shared timer still runs every kernel
    variant once (the first round always runs) and starts no further round: no case is dropped."""
    import time

    from fastrobust.bench import interleaved
    from kernels import bench

    cases = bench.cases(DEVICE, [3], [10], compile_reference=True)
    assert all(c.impls["compiled"] is not None for c in cases)   # wrapped lazily: nothing compiles here
    calls = []

    def counted(name, fn):   # a timed variant returns None (or a dict of phase times), not the result
        return lambda: (calls.append(name), fn()) and None
    variants = {f"{c.op} {impl}": counted(f"{c.op} {impl}", fn) for c in cases for impl, fn in c.impls.items()
                if fn is not None and impl != "compiled"}   # compile time is not what this checks
    assert len(variants) == 2 * len(BENCH_OPS)
    timings = interleaved(variants, repeats=5, warmup=0, device=DEVICE, deadline=time.time())
    assert list(timings) == list(variants)
    assert all(t.summary()["calls"] == 1 and len(t.cpu) == 1 for t in timings.values())
    assert calls == list(variants)


@interpreter_only
def test_triton_imported_before_interpreter_flag_raises(monkeypatch):
    """TRITON_INTERPRET=1 set only after triton was imported (its standard library then targets the
    compiler): a clear error instead of a failure deep inside the interpreter."""
    import kernels._common as common

    monkeypatch.setattr(common, "TRITON_INTERPRETER_BUILD", False)
    z, *_ = make()
    with pytest.raises(ValueError, match="imported before TRITON_INTERPRET=1"):
        kernels.resolve_backend(z, "triton")
