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
from kernels.testing import poison_outputs

BACKENDS = ["triton", "reference"]


@pytest.fixture(autouse=True)
def _clean_default(monkeypatch):
    monkeypatch.delenv("FASTROBUST_KERNELS", raising=False)
    kernels.set_backend(None)
    with poison_outputs():
        yield
    kernels.set_backend(None)


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
    assert torch.equal(kernels.trades_loss(z, za, y, 6.0), R.trades_loss(z, za, y, 6.0))
    assert torch.equal(kernels.mart_loss(z, za, y, 6.0, backend="auto"), R.mart_loss(z, za, y, 6.0))
    got = kernels.dtrades_loss(z, za, y, s, 1.0, 1.0, "minmax", 1.0, 1e-12)
    want = R.dtrades_loss(z, za, y, s, 1.0, 1.0, "minmax", 1.0, 1e-12)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    head = kernels.loss_head(z, za, y)
    assert all(torch.equal(a, b) for a, b in zip(head, R.loss_head(z, za, y)))


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
    assert torch.equal(a, b)


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
        loss, lam, ce, kl, ent = kernels.dtrades_loss(z, za, y, s, 1.0, 0.5, "minmax", 2.0, 1e-12,
                                                      backend="triton")
        return loss
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
    lr = R.dtrades_loss(zr, zar, y.cpu(), s.cpu().double(), 1.0, 0.5, "minmax", 2.0, 1e-12)[0]
    lr.backward()
    assert torch.allclose(lc.cpu().double(), lr, rtol=1e-5)
    assert torch.allclose(gzc.cpu().double(), zr.grad, rtol=1e-4, atol=1e-7)


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
        return a + b + head.kl.sum() + x_new.sum() + gn.sum()

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
        c = kernels.dtrades_loss(z, za, y, s, 1.0, 1.0, "minmax", 2.0)[0]
        head = kernels.loss_head(z, za, y)
        x_new, gn = kernels.pgd_step(x, x - 0.5, x, 0.01, 0.03, "l2")
        return a + b + c + head.kl.sum() + x_new.sum() + gn.sum()

    assert kernels.resolve_backend(z) == "reference"
    explanation = torch._dynamo.explain(f)(z, za, x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


# ----------------------------------------------------------------------------- D-TRADES lambda
@pytest.mark.parametrize("backend", BACKENDS)
def test_minmax_lambda_range(backend):
    z, za, y, s = make(B=32, C=10, seed=5, on_device=True)
    alpha, beta, scale = 1.5, 0.5, 3.0
    _, lam, *_ = kernels.dtrades_loss(z, za, y, s, alpha, beta, "minmax", scale, backend=backend)
    assert lam.shape == (32,) and torch.isfinite(lam).all()
    assert lam.min() >= 0 and lam.max() <= scale * (alpha + beta) * (1 + 1e-6)
    # alpha alone: lam / scale is the min-max-normalised entropy, spanning exactly [0, 1]
    _, lam_h, _, _, ent = kernels.dtrades_loss(z, za, y, s, 1.0, 0.0, "minmax", scale, backend=backend)
    assert lam_h.min() == 0 and lam_h.max() == scale
    assert lam_h.argmin() == ent.argmin() and lam_h.argmax() == ent.argmax()


@pytest.mark.parametrize("backend", BACKENDS)
def test_minmax_without_spread_gives_midpoint(backend):
    alpha, beta, scale = 1.5, 0.5, 3.0
    z, za, y, s = make(B=1, C=10, seed=6, on_device=True)      # B = 1: no spread at all
    _, lam, *_ = kernels.dtrades_loss(z, za, y, s, alpha, beta, "minmax", scale, backend=backend)
    assert torch.equal(lam, torch.full_like(lam, scale * (alpha * 0.5 + beta * 0.5)))
    z, za, y, _ = make(B=5, C=10, seed=7, on_device=True)      # identical rows, constant s
    z, za, y = z[:1].expand(5, -1).contiguous(), za[:1].expand(5, -1).contiguous(), y[:1].expand(5).contiguous()
    _, lam, *_ = kernels.dtrades_loss(z, za, y, to_dev(torch.full((5,), 0.3)), alpha, beta, "minmax", scale,
                                      backend=backend)
    assert torch.equal(lam, torch.full_like(lam, scale * (alpha * 0.5 + beta * 0.5)))
    assert not torch.isnan(lam).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_mean_normalisation(backend):
    alpha, beta, scale = 1.5, 0.5, 3.0
    z, za, y, s = make(B=16, C=10, seed=8, on_device=True)
    _, lam, *_ = kernels.dtrades_loss(z, za, y, s, alpha, beta, "mean", scale, backend=backend)
    assert torch.allclose(lam.mean().cpu(), torch.tensor(scale * (alpha + beta), dtype=lam.dtype), rtol=1e-6)
    # a zero-mean (all-zero) sensitivity normalises to 1, not NaN
    _, lam0, _, _, ent = kernels.dtrades_loss(z, za, y, to_dev(torch.zeros(16)), alpha, beta, "mean", scale,
                                              backend=backend)
    assert torch.isfinite(lam0).all()
    assert torch.allclose(lam0, scale * (alpha * ent / ent.mean() + beta), rtol=1e-6)


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
        loss = res[0] if isinstance(res, tuple) else res
        if isinstance(res, tuple):
            assert torch.equal(res[1].cpu(), torch.full((12,), c_val, dtype=res[1].dtype))
        loss.backward()
        out.append((loss, zz.grad, zza.grad))
    (ld, gzd, gzad), (lt, gzt, gzat) = out
    assert torch.equal(ld, lt)
    assert torch.equal(gzd, gzt) and torch.equal(gzad, gzat)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dtrades_logging_outputs_are_detached(backend):
    z, za, y, s = make(requires_grad=True, on_device=True)
    loss, lam, ce, kl, ent = kernels.dtrades_loss(z, za, y, s, 1.0, 1.0, backend=backend)
    assert loss.requires_grad
    assert not any(t.requires_grad for t in (lam, ce, kl, ent))


# ----------------------------------------------------------------------------- benchmark harness
def test_bench_without_cuda_prints_notice_and_returns_nothing(capsys):
    from kernels import bench

    assert bench.run(device="cpu") == []
    out = capsys.readouterr().out.strip()
    assert out == bench.CPU_NOTICE and "CUDA GPU" in out and "TRITON_INTERPRET=1" in out


def test_bench_harness_runs_every_case_and_formats():
    """Exercise the benchmark code path on DEVICE (on the CPU: interpreter, wall-clock timer; tiny
    shapes); timings are not checked, only that every op was run for every implementation and reported."""
    from kernels import bench

    timer = bench._cuda_timer if DEVICE.type == "cuda" else bench._wall_timer
    rows = bench._run(str(DEVICE), [3], [10], iters=1, repeats=1, warmup=0, dtype=torch.float32,
                      timer=timer, compile_reference=False)
    ops_seen = [r["op"] for r in rows]
    assert ops_seen == ["trades fwd+bwd", "dtrades fwd+bwd", "mart fwd+bwd", "loss_head fwd",
                        "pgd_step linf", "pgd_step l2"]
    for r in rows:
        assert r["status"] == "ok"
        assert r["triton_us"] is not None and r["eager_us"] is not None and r["compiled_us"] is None
        assert r["bytes"] > 0 and r["triton_gbps"] is not None
        assert not any(k.endswith("_error") for k in r)
    table = bench.format_markdown(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows) and lines[0].startswith("| op | shape")
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_bench_past_its_deadline_reports_every_case_as_skipped():
    """Under a time budget (fastrobust.gpu_suite) cases past the deadline are listed, not dropped."""
    import time

    from kernels import bench

    timer = bench._cuda_timer if DEVICE.type == "cuda" else bench._wall_timer
    rows = bench._run(str(DEVICE), [3], [10], iters=1, repeats=1, warmup=0, dtype=torch.float32, timer=timer,
                      compile_reference=True, deadline=time.monotonic())
    assert len(rows) == 6
    assert all(r["status"] == bench.BUDGET_SKIP and r["triton_us"] is None and r["compiled_us"] is None
               for r in rows)
    table = bench.format_markdown(rows)
    assert "6 case(s) not measured" in table


@interpreter_only
def test_triton_imported_before_interpreter_flag_raises(monkeypatch):
    """TRITON_INTERPRET=1 set only after triton was imported (its standard library then targets the
    compiler): a clear error instead of a failure deep inside the interpreter."""
    import kernels._common as common

    monkeypatch.setattr(common, "TRITON_INTERPRETER_BUILD", False)
    z, *_ = make()
    with pytest.raises(ValueError, match="imported before TRITON_INTERPRET=1"):
        kernels.resolve_backend(z, "triton")
