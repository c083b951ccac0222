"""The kernels' first-use self-check (kernels/dispatch.py): a wrong or failing Triton kernel is caught.

The first time a Triton kernel runs for an (op, device, dtype, shape class) it is compared with the
float64 reference on a probe batch. Here wrong kernels are injected by monkeypatching the python
wrappers in ``kernels.ops`` (what the dispatcher calls, for the probe and the real call alike): one
that returns perturbed values, and one that raises as a compile failure would. Under "auto" the call
falls back to the reference with one RuntimeWarning; under an explicit "triton" it raises
KernelCheckError. On the CPU "auto" never picks Triton, so the fixture ``auto_is_triton`` makes it
resolve as on a GPU (the kernels then run in the interpreter); with FASTROBUST_TEST_DEVICE=cuda it is
what "auto" does anyway. ``kernels.testing.self_check()`` gives every test its own, empty verdicts.

Cost of the check on the CPU interpreter, paid once per process and per (op, dtype, C), measured as
process CPU time (the 2 cores were shared, wall time was 2-3x these under load); a loss probe is a
16-row forward + backward, without and with per-sample weights, of the fused op and of the float64
reference; TRITON_INTERPRET=1, torch 2.14.1, triton 3.8.0, Xeon (AVX-512), ms:

    op            dtype       C=2   C=10  C=100  C=1000
    trades_loss   float32     128    152    153    191
    dtrades_loss  float32     170    167    169    195
    mart_loss     float32     162    161    154    244
    trades_loss   bfloat16    149    160    157    244
    dtrades_loss  bfloat16    173    173    174    245
    mart_loss     bfloat16    165    158    156    254
    trades_loss   float16     155    158    158    237
    dtrades_loss  float16     173    167    167    177
    mart_loss     float16     148    134    155    242
    pgd_step      float32     14-17 per norm, for (1, 28, 28) and (3, 32, 32)

The first probe of a process costs ~1.7 s CPU more (building the kernels for the interpreter and
warming up autograd / the custom ops), which the first kernel call pays anyway. kernels.self_check() for
one (dtype, C, image shape) runs 3 loss probes and 2 PGD probes, ~0.5 s after that first one; this
module runs ~40 probes. (On a GPU "auto" checks each kernel it uses once; on the CPU "auto" runs the
reference ops and checks nothing.)

The probe tolerances are the kernel tests' own or looser (tests/test_kernels.py; looser by the probe's
larger KL weights and, for fp16 / bf16, one full ulp of the stored dtype), on inputs inside the tests'
range, so a kernel that passes those tests passes its probe on any CPU; the figures recorded (worst
error / tolerance) are ~0.1-0.2 for fp32 and < 1 for bf16, whose interpreter casts truncate (an error
below one ulp by construction).
"""
from __future__ import annotations

import inspect
import re
import warnings
import zlib

from test_kernels_device import AUDIT, DEVICE, cpu_tensors, to_dev  # noqa: F401  (before triton / kernels)

import pytest
import torch

import kernels
from kernels import dispatch, ops
from kernels.testing import self_check

SAMPLE_SHAPE = (1, 6, 6)


class FakeCompileError(Exception):
    """Stands in for a Triton compile / launch failure."""


@pytest.fixture(autouse=True)
def _fresh_verdicts(monkeypatch):
    monkeypatch.delenv("FASTROBUST_KERNELS", raising=False)
    kernels.set_backend(None)
    with self_check(True):
        yield
    kernels.set_backend(None)


@pytest.fixture
def auto_is_triton(monkeypatch):
    """ "auto" resolves to Triton, as it does for CUDA tensors (explicit names resolve as before)."""
    resolve = dispatch._resolve

    def as_on_a_gpu(device_type, name):
        name = dispatch.get_backend() if name is None else name
        return "triton" if name == "auto" and dispatch.triton_usable(torch.device(device_type)) else \
            resolve(device_type, name)
    monkeypatch.setattr(dispatch, "_resolve", as_on_a_gpu)
    assert kernels.resolve_backend(to_dev(torch.zeros(2, 3)), "auto") == "triton"


@pytest.fixture
def probes(monkeypatch):
    """Counts of the probe runs, per op."""
    counts = {}
    for name in ("_probe_losses", "_probe_pgd"):
        real = getattr(dispatch, name)

        def counted(*args, real=real, name=name):
            op = args[0] if name == "_probe_losses" else "pgd_step"
            counts[op] = counts.get(op, 0) + 1
            return real(*args)
        monkeypatch.setattr(dispatch, name, counted)
    return counts


def inputs(seed=0):
    """Loss inputs (B=6, C=10) and PGD inputs (B=3, SAMPLE_SHAPE) on DEVICE."""
    g = torch.Generator().manual_seed(zlib.crc32(repr(("selfcheck", seed)).encode()))
    z = torch.randn(6, 10, generator=g) * 2
    za = z + torch.randn(6, 10, generator=g)
    y = torch.randint(0, 10, (6,), generator=g)
    s = 2 * torch.rand(6, generator=g)
    x = torch.rand((3,) + SAMPLE_SHAPE, generator=g)
    xa = (x + 0.02 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    grad = torch.randn(x.shape, generator=g)
    return {k: to_dev(v) for k, v in dict(z=z, za=za, y=y, s=s, x=x, xa=xa, grad=grad).items()}


def call(op, t, backend):
    """The public op on the inputs ``t`` -> a flat tuple of its result tensors."""
    if op == "trades_loss":
        out = kernels.trades_loss(t["z"], t["za"], t["y"], 6.0, backend=backend)
    elif op == "dtrades_loss":
        out = kernels.dtrades_loss(t["z"], t["za"], t["y"], t["s"], 1.0, 0.5, "minmax", 2.0, backend=backend)
    elif op == "mart_loss":
        out = kernels.mart_loss(t["z"], t["za"], t["y"], 5.0, backend=backend)
    else:
        return tuple(kernels.pgd_step(t["xa"], t["grad"], t["x"], 0.01, 0.03, "linf", backend=backend))
    return (out.loss, *out.head) + (() if out.lam is None else (out.lam,))


def call_line(op) -> int:
    """The line of :func:`call` that calls ``kernels.<op>``."""
    lines, first = inspect.getsourcelines(call)
    return first + next(i for i, line in enumerate(lines) if f"kernels.{op}(" in line)


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b))


def perturbed(op):
    """The real wrapper of ``op``, with the loss 1e-3 relative off (the probe's tolerance: 1e-5), or for
    pgd_step x_new 1e-3 off (tolerance 1e-6)."""
    real = getattr(ops, op)

    def wrong(*args, **kwargs):
        wrong.calls += 1
        out = real(*args, **kwargs)
        if op == "pgd_step":
            return out[0] + 1e-3, out[1]
        return out._replace(loss=out.loss * (1 + 1e-3))
    wrong.calls = 0
    return wrong


def raising(op):
    def fail(*args, **kwargs):
        fail.calls += 1
        raise FakeCompileError(f"ptxas fatal: cannot build {op} (injected)")
    fail.calls = 0
    return fail


def shape_class(op, B=6):
    """A loss verdict is keyed by C and the launch's tiles for (B, C) (the compiled variant); the PGD step's by
    the norm and the image shape. The helper calls use 6 x 10 logits; kernels.self_check's default B is 16."""
    return ["linf", SAMPLE_SHAPE] if op == "pgd_step" else list(kernels.dispatch._launch_class(B, 10))


OPS = ["trades_loss", "dtrades_loss", "mart_loss", "pgd_step"]
WRONG = {"perturbed": perturbed, "raising": raising}


# ----------------------------------------------------------------------------- auto: fall back, warn once
@pytest.mark.parametrize("kind", list(WRONG))
@pytest.mark.parametrize("op", OPS)
@pytest.mark.usefixtures("auto_is_triton")
def test_auto_falls_back_to_the_reference_with_one_warning(monkeypatch, probes, op, kind):
    t = inputs()
    reference = call(op, t, "reference")
    wrong = WRONG[kind](op)
    monkeypatch.setattr(ops, op, wrong)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = call(op, t, "auto")
        second = call(op, t, None)            # the process default is "auto" too
    assert same(first, reference) and same(second, reference)
    ours = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    msg = str(ours[0].message)
    assert f"Triton {op} kernel" in msg and "self-check" in msg and "reference" in msg
    if kind == "raising":
        assert "FakeCompileError: ptxas fatal" in msg
    else:
        figure = float(re.search(r"worst error / test tolerance ([0-9.e+-]+|inf)", msg).group(1))
        assert figure > 1
    if not AUDIT:   # the warning points at the line calling the public op (the audit wraps the ops)
        assert (ours[0].filename, ours[0].lineno) == (__file__, call_line(op))
    # the probe ran once, for the first call only; the second call did not touch the wrong kernel
    assert probes == {op: 1}
    calls_after_probe = wrong.calls
    assert calls_after_probe >= 1
    call(op, t, "auto")
    assert wrong.calls == calls_after_probe and probes == {op: 1}
    (verdict,) = kernels.self_check_report()
    assert verdict["op"] == op and verdict["passed"] is False
    assert verdict["device"] == str(DEVICE) and verdict["dtype"] == "float32"
    assert verdict["shape_class"] == shape_class(op)
    assert verdict["detail"] in msg


def test_perturbed_kernel_really_differs(monkeypatch):
    """Control: with the self-check off the injected kernel runs, and its output is not the reference's
    (so the fallback asserted above is observable)."""
    t = inputs()
    with self_check(False):
        for op in OPS:
            monkeypatch.setattr(ops, op, perturbed(op))
            assert not same(call(op, t, "triton"), call(op, t, "reference"))
    assert kernels.self_check_report() == []


# ----------------------------------------------------------------------------- explicit triton: raise
@pytest.mark.parametrize("kind", list(WRONG))
@pytest.mark.parametrize("op", OPS)
def test_explicit_triton_raises_kernel_check_error(monkeypatch, probes, op, kind):
    t = inputs()
    monkeypatch.setattr(ops, op, WRONG[kind](op))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)     # an error, not a warning
        for _ in range(2):                                 # the verdict stays; the probe runs once
            with pytest.raises(kernels.KernelCheckError) as info:
                call(op, t, "triton")
            msg = str(info.value)
            assert f"Triton {op} kernel" in msg and "--kernels reference" in msg
            assert ("FakeCompileError: ptxas fatal" in msg) if kind == "raising" else \
                re.search(r"worst error / test tolerance ([0-9.e+-]+|inf)", msg)
    assert probes == {op: 1}
    assert isinstance(info.value, RuntimeError)
    (verdict,) = kernels.self_check_report()
    assert verdict["op"] == op and verdict["passed"] is False


# ----------------------------------------------------------------------------- correct kernels pass
@pytest.mark.parametrize("op", OPS)
@pytest.mark.usefixtures("auto_is_triton")
def test_correct_kernel_passes_and_runs(monkeypatch, probes, op):
    t = inputs()
    with self_check(False):
        unchecked = call(op, t, "triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert same(call(op, t, "auto"), unchecked)       # the Triton kernel ran, and gave what it gives
        assert same(call(op, t, "triton"), unchecked)
    assert probes == {op: 1}
    (verdict,) = kernels.self_check_report()
    assert verdict["passed"] is True and verdict["shape_class"] == shape_class(op)
    figure = float(re.fullmatch(r"worst error / test tolerance ([0-9.e+-]+)", verdict["detail"]).group(1))
    assert 0 <= figure <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_self_check_fills_every_verdict(probes, dtype):
    """The real kernels pass, in every dtype a run may use (the loss logits' dtype; images stay fp32)."""
    report = kernels.self_check(DEVICE, dtype, 10, SAMPLE_SHAPE, "triton")
    assert report == kernels.self_check_report()
    keys = sorted((v["op"], str(v["shape_class"])) for v in report)
    loss_class = str(shape_class("trades_loss", B=16))
    assert keys == sorted([("trades_loss", loss_class), ("dtrades_loss", loss_class), ("mart_loss", loss_class),
                           ("pgd_step", str(["linf", SAMPLE_SHAPE])), ("pgd_step", str(["l2", SAMPLE_SHAPE]))])
    for v in report:
        want_dtype = "float32" if v["op"] == "pgd_step" else str(dtype).replace("torch.", "")
        assert v["passed"] is True and v["device"] == str(DEVICE) and v["dtype"] == want_dtype, v
        assert 0 <= float(v["detail"].rsplit(" ", 1)[1]) <= 1, v
    assert probes == {"trades_loss": 1, "dtrades_loss": 1, "mart_loss": 1, "pgd_step": 2}
    # a second call re-uses the verdicts
    assert kernels.self_check(DEVICE, dtype, 10, SAMPLE_SHAPE, "triton") == report
    assert probes == {"trades_loss": 1, "dtrades_loss": 1, "mart_loss": 1, "pgd_step": 2}


@pytest.mark.usefixtures("cpu_tensors")
def test_self_check_without_triton_records_nothing():
    assert kernels.self_check("cpu", torch.float32, 10, SAMPLE_SHAPE, "reference") == []
    # "auto" runs the reference ops on CPU tensors (even under the interpreter): nothing to check
    assert kernels.self_check("cpu", torch.float32, 10, SAMPLE_SHAPE, "auto") == []
    assert kernels.self_check_report() == []


# ----------------------------------------------------------------------------- the weighted kernel variants
def is_weighted(op, args) -> bool:
    """Whether a call of the ``kernels.ops`` wrapper (positional, as the dispatcher makes it) launches the
    weighted kernel variants: a tensor KL weight (TRADES) or sample weights."""
    if op == "trades_loss":
        return torch.is_tensor(args[3]) or (len(args) > 4 and args[4] is not None)
    n = 4 if op == "mart_loss" else 9
    return len(args) > n and args[n] is not None


def only_weighted_wrong(op):
    """``op``'s wrapper, right without per-sample weights and 1e-3 off with them (those launches are
    separately compiled kernel variants)."""
    real = getattr(ops, op)

    def wrong(*args):
        out = real(*args)
        return out._replace(loss=out.loss * (1 + 1e-3)) if is_weighted(op, args) else out
    return wrong


@pytest.mark.parametrize("op", ["trades_loss", "mart_loss", "dtrades_loss"])
def test_probe_covers_the_weighted_variants(monkeypatch, op):
    monkeypatch.setattr(ops, op, only_weighted_wrong(op))
    t = inputs()
    with pytest.raises(kernels.KernelCheckError, match=op):
        call(op, t, "triton")        # an unweighted call: its own kernel is right, the op's probe is not


@pytest.mark.usefixtures("auto_is_triton")
def test_dtrades_global_lambda_is_checked_as_the_trades_kernels(monkeypatch):
    """dtrades_loss(reduce=...) runs loss_head and the TRADES loss with a (B,) KL weight: a wrong
    weighted TRADES kernel sends it to the reference; the fused D-TRADES kernel is not involved."""
    monkeypatch.setattr(ops, "trades_loss", only_weighted_wrong("trades_loss"))
    monkeypatch.setattr(ops, "dtrades_loss", raising("dtrades_loss"))
    t = inputs()

    def global_loss(backend):
        return kernels.dtrades_loss(t["z"], t["za"], t["y"], t["s"], 1.0, 0.5, "minmax", 2.0,
                                    reduce=lambda v, op: v, backend=backend)
    with pytest.warns(RuntimeWarning, match="Triton trades_loss kernel"):
        got = global_loss("auto")
    want = global_loss("reference")
    assert torch.equal(got.loss, want.loss) and torch.equal(got.lam, want.lam)
    assert [v["op"] for v in kernels.self_check_report()] == ["trades_loss"]


def test_a_batch_that_compiles_another_variant_gets_its_own_verdict(probes):
    """The compiled kernel depends on the tiles (B, C) selects, so a verdict for a 16-row probe does not vouch
    for a 512-row training batch: that batch is probed at its own size."""
    kernels.self_check(DEVICE, torch.float32, 10, SAMPLE_SHAPE, "triton", batch_size=16)
    kernels.self_check(DEVICE, torch.float32, 10, SAMPLE_SHAPE, "triton", batch_size=512)
    classes = {str(v["shape_class"]) for v in kernels.self_check_report() if v["op"] == "trades_loss"}
    assert kernels.dispatch._launch_class(16, 10) != kernels.dispatch._launch_class(512, 10)
    assert classes == {str(list(kernels.dispatch._launch_class(b, 10))) for b in (16, 512)}
    assert probes["trades_loss"] == 2
