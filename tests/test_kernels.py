"""Triton loss-head kernels vs the float64 reference ops (forward statistics, losses, gradients).

Runs on the CPU through Triton's interpreter, or compiled on a GPU with FASTROBUST_TEST_DEVICE=cuda
(tests/test_kernels_device.py): inputs are built on the CPU, moved with ``to_dev``, and the float64
reference runs on the CPU copies. Every kernel output is poisoned (NaN / -1) before each launch, so an
element a kernel leaves unwritten fails the comparison.

Tolerances (fp32 inputs; the reference is evaluated in float64 on the same values):
* per-sample statistics and lambda, elementwise: ``|a - e| <= 1e-5 |e| + 1e-6``. The 1e-6 floor
  is for values that are tiny differences of O(1)..O(log C) terms (kl of p ~ q, the entropy of a
  one-hot p, p_y of a confidently wrong sample): fp32 keeps those terms to ~6e-8 relative, so the
  exact float64 value can be far smaller than what fp32 can resolve; 1e-6 is ~16 fp32 ulps of 1.
* scalar losses: ``|a - e| <= 1e-5 |e| + 1e-6 sum_i t_i``, t_i = c_i n_i / B the size of sample i's
  unit terms (:func:`unit_terms`; c the sample weight, n = 1 + w for TRADES / D-TRADES with KL weight
  w, 2 + beta for MART): the loss sums the statistics above, so it inherits their floor. (With no floor
  it held only by rounding: a B = 1 MART loss of 9e-3 is a sum of ~5e-3 fp32 terms near log(1) and
  missed 1e-5 relative by 9% under NumPy's baseline (SSE) exp / log, which the interpreter uses.)
* gradients, per sample (row) norm-wise: ``||ga_i - ge_i||_2 <= 1e-5 ||ge_i||_2 + 1e-6 k t_i``, k = 1.7
  the upstream gradient: a row's exact gradient can be a cancelling difference of O(k t_i) terms
  (p -> e_y for a confidently correct sample; w (q - p) for q ~ p), leaving fp32 rounding of a few
  ulps of that size. (A floor without the KL weight's factor held by 10% on AVX2 / AVX-512 NumPy:
  TRADES' w (q - p) with w = 6, C = 2.)

These hold on any x86-64 CPU: the float64 reference is exact to ~1e-16 whatever its SIMD path; the
interpreter does each Triton op as one NumPy call on fp32 (no FMA contraction, summation order fixed by
NumPy's pairwise algorithm), so the CPU only changes exp / log, by a few ulps (AVX2 / AVX-512 SIMD
versions vs glibc), far inside the 16-ulp floors and the 1e-5 (~170 ulps) relative part.
"""
from __future__ import annotations

import zlib

from test_kernels_device import DEVICE, INTERPRETED, to_dev  # before triton / kernels are imported

import pytest
import torch

import kernels
from kernels import reference as R
from kernels.testing import block_sizes, poison_outputs, self_check

RTOL = 1e-5
STAT_ATOL = 1e-6
GRAD_ATOL = 1e-6          # times the per-sample size of the gradient's terms, k t_i (see unit_terms)
UPSTREAM = 1.7            # grads(): a non-unit upstream gradient, the backward must use it
# Relative error of one stored gradient element: fp16 rounds to nearest (half an ulp, 2^-11); for
# bf16 Triton's CPU interpreter truncates fp32 -> bf16 casts, so allow a full ulp, 2^-7; a GPU rounds
# to nearest, half an ulp, 2^-8.
LOW_PRECISION_UNIT = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -7 if INTERPRETED else 2.0 ** -8}
FP16_SUBNORMAL_HALF_ULP = 2.0 ** -25


@pytest.fixture(autouse=True)
def _poison():
    # The first-use self-check (kernels.dispatch) is off here: these tests compare every kernel with the
    # float64 reference themselves, at the same or tighter tolerances, so a wrong kernel fails with the
    # test's own diagnostic rather than a KernelCheckError from a probe; the verdicts would depend on
    # test order (test_poisoning_catches_unwritten_outputs breaks a launch on purpose); and the probes
    # would add ~10 s of CPU time to this module, _dispatch and _pgd (58 -> 69 s user, measured; the
    # probe costs are in tests/test_kernels_selfcheck.py).
    with poison_outputs(), self_check(False):
        yield


def seed_of(*parts) -> int:
    """A distinct, reproducible seed per parametrised case."""
    return zlib.crc32(repr(parts).encode())


def make_case(kind: str, B: int, C: int, seed: int, dtype=torch.float32):
    """(z, z_adv, y) in ``dtype`` on DEVICE, for the kernels, plus the reference's inputs on the CPU:
    the exact float64 copies of z and z_adv, and y.

    normal  - N(0, 1) logits with a per-row temperature in [0.2, 5] (entropies spread over the batch)
    extreme - logits of size 1e4: a mix of exactly +-1e4 and uniform values in [-1e4, 1e4]
    ties    - small integers (many equal logits), one all-equal row, and in z_adv two wrong classes
              (the first and the last one) sharing the row maximum
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (B,), generator=g)
    if kind == "normal":
        t = 0.2 + 4.8 * torch.rand(B, 1, generator=g)
        z = torch.randn(B, C, generator=g) * t
        za = z + torch.randn(B, C, generator=g) * t * 0.7
    elif kind == "extreme":
        def one():
            u = (2 * torch.rand(B, C, generator=g) - 1) * 1e4
            sign = torch.where(torch.rand(B, C, generator=g) < 0.5, -1e4, 1e4)
            return torch.where(torch.rand(B, C, generator=g) < 0.3, sign, u)
        z, za = one(), one()
    elif kind == "ties":
        z = torch.randint(-2, 3, (B, C), generator=g).float()
        za = torch.randint(-2, 3, (B, C), generator=g).float()
        z[0] = 1.0
        if C >= 3:
            wrong = [[c for c in range(C) if c != int(y[i])] for i in range(B)]
            first = torch.tensor([w[0] for w in wrong])
            last = torch.tensor([w[-1] for w in wrong])
            top = za.max(1).values + 1
            za[torch.arange(B), first] = top
            za[torch.arange(B), last] = top
    else:
        raise ValueError(kind)
    z, za = z.to(dtype), za.to(dtype)
    return to_dev(z), to_dev(za), to_dev(y), z.double(), za.double(), y


def assert_close(actual, expected, rtol=RTOL, atol=STAT_ATOL, name=""):
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{name}: non-finite values (unwritten output?) {a}"
    err = (a - e).abs()
    bound = atol + rtol * e.abs()
    bad = err > bound
    assert not bad.any(), (f"{name}: {int(bad.sum())}/{a.numel()} out of tolerance, worst excess "
                           f"{(err - bound).max().item():.3e} (err {err.max().item():.3e})")


def unit_terms(B, c=None, n=1.0):
    """t_i = c_i n_i / B (float64, CPU): the size of the unit terms sample i adds to a loss, c the sample
    weights (None: 1), n the number of unit-weighted terms (1 + w for TRADES / D-TRADES with KL weight w,
    2 + beta for MART: ce_adv, the log term and beta kl (1 - p_y)). Float or (B,)."""
    c = torch.ones(B, dtype=torch.float64) if c is None else c.double().cpu()
    n = n.double().cpu() if torch.is_tensor(n) else torch.tensor(float(n), dtype=torch.float64)
    return c * n / B


def loss_atol(t) -> float:
    """The scalar loss's floor: the statistics' STAT_ATOL carried through the sum of unit terms t."""
    return STAT_ATOL * float(t.sum())


def assert_grad_close(actual, expected, scale, rtol=RTOL, atol_rows=None, name=""):
    """Per-row: ||a_i - e_i|| <= rtol ||e_i|| + GRAD_ATOL * scale_i (+ atol_rows_i); scale = k t_i."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert a.shape == e.shape and a.dtype == a.dtype
    assert torch.isfinite(a).all(), f"{name}: non-finite gradient (unwritten output?)"
    err = (a - e).norm(dim=1)
    bound = rtol * e.norm(dim=1) + GRAD_ATOL * scale.double().cpu()
    if atol_rows is not None:
        bound = bound + atol_rows.cpu() if torch.is_tensor(atol_rows) else bound + atol_rows
    bad = err > bound
    assert not bad.any(), (f"{name}: rows {bad.nonzero().flatten().tolist()[:8]} out of tolerance, worst "
                           f"relative {(err / e.norm(dim=1).clamp_min(1e-300)).max().item():.3e}")


def grads(loss_fn, z, za):
    """(LossOutput, grad z, grad z_adv) of ``loss_fn(z, za)``, for a non-unit upstream gradient."""
    z = z.detach().clone().requires_grad_(True)
    za = za.detach().clone().requires_grad_(True)
    out = loss_fn(z, za)
    gz, gza = torch.autograd.grad(out.loss * UPSTREAM, (z, za))
    return out, gz, gza


def assert_head_close(head, ref, name=""):
    """A kernel's LossHead against the float64 reference's: floats at the statistics' tolerance, float32
    on DEVICE, detached; wrong_idx exactly."""
    for field in R.LossHead._fields[:-1]:
        t = getattr(head, field)
        assert t.dtype == torch.float32 and t.device == DEVICE and not t.requires_grad, f"{name} {field}"
        assert_close(t, getattr(ref, field), name=f"{name} head.{field}")
    assert head.wrong_idx.dtype == torch.int64
    assert torch.equal(head.wrong_idx.cpu(), ref.wrong_idx), f"{name} head.wrong_idx"


def assert_head_equal(a, b, name=""):
    """Two LossHeads computed by the same kernel (or the same reference ops): bitwise equal."""
    for field in R.LossHead._fields:
        assert torch.equal(getattr(a, field), getattr(b, field)), f"{name} head.{field}"


# ----------------------------------------------------------------------------- the sweep
# Each B in {1, 3, 128} and each C in {2, 10, 100, 1000} appears, for each kind; (256, 1000) is
# the larger case. The interpreter runs every program instance in Python, so the grid is a subset.
SHAPES = [(1, 2), (3, 10), (128, 10), (3, 100), (128, 2), (1, 1000), (3, 1000)]
KINDS = ["normal", "extreme", "ties"]
SWEEP = [(k, B, C) for k in KINDS for (B, C) in SHAPES] + [("normal", 256, 1000)]


def _ids(case):
    return "-".join(map(str, case))


@pytest.mark.parametrize("case", SWEEP, ids=_ids)
def test_loss_head_matches_reference(case):
    kind, B, C = case
    z, za, y, z64, za64, yc = make_case(kind, B, C, seed_of("head", *case))
    got = kernels.loss_head(z, za, y, 1e-12, backend="triton")
    ref = R.loss_head(z64, za64, yc, 1e-12)
    for name in R.LossHead._fields[:-1]:
        assert getattr(got, name).dtype == torch.float32
        assert getattr(got, name).device == DEVICE
        assert_close(getattr(got, name), getattr(ref, name), name=name)
    assert got.wrong_idx.dtype == torch.int64
    assert torch.equal(got.wrong_idx.cpu(), ref.wrong_idx)
    assert (got.wrong_idx != y).all()


@pytest.mark.parametrize("B,C", [(3, 10), (128, 100), (3, 1000)])
def test_wrong_class_ties_pick_lowest_index(B, C):
    z, za, y, *_ = make_case("ties", B, C, seed_of("tie-idx", B, C))   # on DEVICE
    got = kernels.loss_head(z, za, y, backend="triton")
    first_wrong = torch.where(y == 0, 1, 0)          # the first of the two tied maxima
    assert torch.equal(got.wrong_idx, first_wrong)


def _weights(B, seed, weighted):
    """Per-sample KL weights w and sample weights c, on the CPU (to_dev them for the kernels)."""
    if not weighted:
        return None, None
    g = torch.Generator().manual_seed(seed)
    return 0.5 + 6 * torch.rand(B, generator=g), 0.2 + torch.rand(B, generator=g)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("case", SWEEP, ids=_ids)
def test_trades_loss_and_grads(case, weighted):
    kind, B, C = case
    seed = seed_of("trades", weighted, *case)
    z, za, y, z64, za64, yc = make_case(kind, B, C, seed)
    w, c = _weights(B, seed + 1, weighted)
    kl_weight = to_dev(w) if weighted else 6.0
    (out, gz, gza) = grads(lambda a, b: kernels.trades_loss(a, b, y, kl_weight, to_dev(c), backend="triton"), z, za)
    w64 = w.double() if weighted else 6.0
    c64 = c.double() if weighted else None
    (ref, gz_r, gza_r) = grads(lambda a, b: R.trades_loss(a, b, yc, w64, c64), z64, za64)
    lt, lr = out.loss, ref.loss
    t = unit_terms(B, c, 1 + (w if weighted else 6.0))
    assert lt.dtype == torch.float32 and lt.dim() == 0
    assert_close(lt, lr, atol=loss_atol(t), name="loss")
    scale = UPSTREAM * t
    assert_grad_close(gz, gz_r, scale, name="grad z")
    assert_grad_close(gza, gza_r, scale, name="grad z_adv")
    # the statistics computed with the loss: the reference's, and loss_head's on the same inputs
    assert out.lam is None
    assert_head_close(out.head, R.loss_head(z64, za64, yc, 1e-12), name="trades")
    assert_head_equal(out.head, kernels.loss_head(z, za, y, 1e-12, backend="triton"), name="trades vs loss_head")
    assert_head_equal(ref.head, R.loss_head(z64, za64, yc, 1e-12), name="reference trades")


def mart_grad_z_terms(z64, za64, y, beta, scale):
    """Per-row size of the two terms of MART's grad_z, a beta ((1 - p_y) p (r - kl) - kl p_y (e_y - p)),
    in float64. With 1e4 logits both can be ~1e4 times larger than their difference, and kl itself is
    only representable to fp32's ~6e-8 relative, so no fp32 evaluation can beat ~u times this size."""
    log_p, log_q = torch.log_softmax(z64, 1), torch.log_softmax(za64, 1)
    p, r = log_p.exp(), log_p - log_q
    kl = (p * r).sum(1, keepdim=True)
    p_y = p.gather(1, y[:, None])
    e_y = torch.nn.functional.one_hot(y, z64.shape[1]).double()
    t1 = ((1 - p_y) * p * (r - kl)).norm(dim=1)
    t2 = (kl * p_y * (e_y - p)).norm(dim=1)
    return scale.double() * beta * (t1 + t2)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("case", SWEEP, ids=_ids)
def test_mart_loss_and_grads(case, weighted):
    """grad_z is held to 1e-5 relative plus 1e-6 (16 fp32 ulps) of the size of its cancelling terms
    (:func:`mart_grad_z_terms`), which matters only for the 1e4-logit rows; the rest as documented."""
    kind, B, C = case
    seed = seed_of("mart", weighted, *case)
    z, za, y, z64, za64, yc = make_case(kind, B, C, seed)
    _, c = _weights(B, seed + 1, weighted)
    (out, gz, gza) = grads(lambda a, b: kernels.mart_loss(a, b, y, 5.0, to_dev(c), backend="triton"), z, za)
    c64 = c.double() if weighted else None
    (ref, gz_r, gza_r) = grads(lambda a, b: R.mart_loss(a, b, yc, 5.0, c64), z64, za64)
    t = unit_terms(B, c, 2 + 5.0)
    assert_close(out.loss, ref.loss, atol=loss_atol(t), name="loss")
    scale = UPSTREAM * t
    terms = mart_grad_z_terms(z64, za64, yc, 5.0, UPSTREAM * unit_terms(B, c))
    assert_grad_close(gz, gz_r, scale, atol_rows=1e-6 * terms, name="grad z")
    assert_grad_close(gza, gza_r, scale, name="grad z_adv")
    assert out.lam is None
    assert_head_close(out.head, R.loss_head(z64, za64, yc, 1e-12), name="mart")
    assert_head_equal(out.head, kernels.loss_head(z, za, y, 1e-12, backend="triton"), name="mart vs loss_head")
    assert_head_equal(ref.head, R.loss_head(z64, za64, yc, 1e-12), name="reference mart")


# D-TRADES: min-max / mean normalisation divides by the batch spread (or mean) of the entropy, which
# is ill-conditioned when the entropies are all tiny and fp32 rounds them to 0 (one-hot p from 1e4
# logits, where float64 still sees 1e-100-sized values): those cases run with normalize="none".
DTRADES_CASES = ([(k, B, C, norm) for (k, B, C) in SWEEP if k != "extreme" for norm in R.NORMALIZE_MODES]
                 + [("extreme", B, C, "none") for (B, C) in SHAPES])


@pytest.mark.parametrize("case", DTRADES_CASES, ids=_ids)
def test_dtrades_loss_lambda_and_grads(case):
    kind, B, C, norm = case
    seed = seed_of("dtrades", *case)
    z, za, y, z64, za64, yc = make_case(kind, B, C, seed)
    g = torch.Generator().manual_seed(seed + 7)
    s = 3 * torch.rand(B, generator=g)
    c = 0.2 + torch.rand(B, generator=g) if B > 1 else None
    alpha, beta, scale = 1.3, 0.7, 2.0
    out, gz, gza = grads(lambda a, b: kernels.dtrades_loss(a, b, y, to_dev(s), alpha, beta, norm, scale, 1e-12,
                                                           to_dev(c), backend="triton"), z, za)
    ref, gz_r, gza_r = grads(lambda a, b: R.dtrades_loss(a, b, yc, s.double(), alpha, beta, norm, scale, 1e-12,
                                                         None if c is None else c.double()), z64, za64)
    t = unit_terms(B, c, 1 + ref.lam)
    assert_close(out.loss, ref.loss, atol=loss_atol(t), name="loss")
    for name, a, e in (("lam", out.lam, ref.lam), ("ce", out.head.ce_nat, ref.head.ce_nat),
                       ("kl", out.head.kl, ref.head.kl), ("entropy", out.head.entropy, ref.head.entropy)):
        assert a.shape == (B,) and not a.requires_grad
        assert_close(a, e, name=name)
    assert_grad_close(gz, gz_r, UPSTREAM * t, name="grad z")
    assert_grad_close(gza, gza_r, UPSTREAM * t, name="grad z_adv")
    assert_head_close(out.head, R.loss_head(z64, za64, yc, 1e-12), name="dtrades")
    assert_head_equal(out.head, kernels.loss_head(z, za, y, 1e-12, backend="triton"), name="dtrades vs loss_head")
    assert_head_equal(ref.head, R.loss_head(z64, za64, yc, 1e-12), name="reference dtrades")


# ----------------------------------------------------------------------------- D-TRADES global lambda
def run_as_ranks(fn, parts):
    """``[fn(part, reduce) for part in parts]`` with ``reduce(t, op)`` a fake all-reduce ("sum" / "max", as
    torch.distributed.all_reduce) across the parts as if each were one rank's batch. A first round
    records what each part hands to ``reduce`` (returned unchanged); the second combines every call with
    the other parts' same call. Valid because the statistics handed in do not depend on what ``reduce``
    returns (they are local min / max / sum / count), which the second round checks."""
    seen = [[] for _ in parts]
    for k, part in enumerate(parts):
        fn(part, lambda t, op, k=k: seen[k].append((t.detach().clone(), op)) or t)
    outs = []
    for k, part in enumerate(parts):
        calls = []

        def reduce(t, op, k=k, calls=calls):
            i = len(calls)
            calls.append(op)
            assert op == seen[k][i][1] and torch.equal(t, seen[k][i][0]), "reduce calls changed between rounds"
            stacked = torch.stack([rank[i][0] for rank in seen])
            return stacked.sum(0) if op == "sum" else stacked.max(0).values
        outs.append(fn(part, reduce))
        assert len(calls) == len(seen[k]) > 0
    return outs


@pytest.mark.parametrize("norm", ["minmax", "mean"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_dtrades_reduce_gives_the_global_normalisation(backend, norm):
    """dtrades_loss(..., reduce=fn) on two parts of a batch (a fake two-rank all-reduce, unequal parts so
    that the mean's count must be the global one) equals the float64 reference on the whole batch: lambda,
    the statistics, and the batch loss sum_k n_k loss_k / B with its gradients. Tolerances as documented
    (fp32 ops against float64 on the same values: the same on any CPU)."""
    B, C, n0 = 13, 10, 5
    seed = seed_of("dtrades-reduce", backend, norm)
    z, za, y, z64, za64, yc = make_case("normal", B, C, seed)
    g = torch.Generator().manual_seed(seed + 1)
    s, c = 3 * torch.rand(B, generator=g), 0.2 + torch.rand(B, generator=g)
    sd, cd = to_dev(s), to_dev(c)
    alpha, beta, scale = 1.3, 0.7, 2.0
    zz, zza = z.clone().requires_grad_(True), za.clone().requires_grad_(True)
    parts = [slice(0, n0), slice(n0, B)]

    def part_loss(sl, reduce):
        return kernels.dtrades_loss(zz[sl], zza[sl], y[sl], sd[sl], alpha, beta, norm, scale, 1e-12, cd[sl],
                                    reduce=reduce, backend=backend)

    outs = run_as_ranks(part_loss, parts)
    total = sum(out.loss * (sl.stop - sl.start) for out, sl in zip(outs, parts)) / B
    gz, gza = torch.autograd.grad(total * UPSTREAM, (zz, zza))
    zr, zar = z64.clone().requires_grad_(True), za64.clone().requires_grad_(True)
    ref = R.dtrades_loss(zr, zar, yc, s.double(), alpha, beta, norm, scale, 1e-12, c.double())
    gz_r, gza_r = torch.autograd.grad(ref.loss * UPSTREAM, (zr, zar))
    t = unit_terms(B, c, 1 + ref.lam)

    assert_close(total, ref.loss, atol=loss_atol(t), name="batch loss")
    assert_close(torch.cat([out.lam for out in outs]), ref.lam, name="lam")
    for field in R.LossHead._fields:
        got = torch.cat([getattr(out.head, field) for out in outs])
        if field == "wrong_idx":
            assert torch.equal(got.cpu(), ref.head.wrong_idx)
        else:
            assert_close(got, getattr(ref.head, field), name=field)
    assert_grad_close(gz, gz_r, UPSTREAM * t, name="grad z")
    assert_grad_close(gza, gza_r, UPSTREAM * t, name="grad z_adv")
    # and the test can tell: a part normalised on its own gets another lambda
    local = part_loss(parts[0], None).lam
    assert (local.cpu().double() - ref.lam[:n0]).abs().max() > 1e-2


# ----------------------------------------------------------------------------- multi-tile paths
@pytest.mark.parametrize("kind,B,C,block_b,block_c", [
    ("normal", 3, 100, None, 32), ("ties", 5, 100, None, 16), ("extreme", 3, 1000, None, 256),
    ("normal", 2, 10, None, 4), ("ties", 4, 37, None, 8),
    ("normal", 13, 10, 4, None), ("ties", 13, 37, 2, 16), ("extreme", 9, 100, 8, None)])
def test_multi_tile_rows(kind, B, C, block_b, block_c):
    """Rows longer than one tile (online logsumexp, cross-tile argmax ties, partial last tile) and
    grids of several row blocks with a partial last block."""
    seed = seed_of("tiles", kind, B, C, block_b, block_c)
    z, za, y, z64, za64, yc = make_case(kind, B, C, seed)
    with block_sizes(block_b=block_b, block_c=block_c):
        head = kernels.loss_head(z, za, y, backend="triton")
        (lt, gz, gza) = grads(lambda a, b: kernels.trades_loss(a, b, y, 6.0, backend="triton"), z, za)
        (lm, gzm, gzam) = grads(lambda a, b: kernels.mart_loss(a, b, y, 6.0, backend="triton"), z, za)
    ref = R.loss_head(z64, za64, yc)
    for name in R.LossHead._fields[:-1]:
        assert_close(getattr(head, name), getattr(ref, name), name=name)
    assert torch.equal(head.wrong_idx.cpu(), ref.wrong_idx)
    for fn, (l, a, b), n in ((R.trades_loss, (lt, gz, gza), 1 + 6.0), (R.mart_loss, (lm, gzm, gzam), 2 + 6.0)):
        (lr, ar, br) = grads(lambda p, q: fn(p, q, yc, 6.0), z64, za64)
        t = unit_terms(B, None, n)
        assert_close(l.loss, lr.loss, atol=loss_atol(t), name=f"{fn.__name__} loss")
        assert_grad_close(a, ar, UPSTREAM * t, name=f"{fn.__name__} grad z")
        assert_grad_close(b, br, UPSTREAM * t, name=f"{fn.__name__} grad z_adv")
        assert_head_equal(l.head, head, name=f"{fn.__name__} (multi-tile) vs loss_head")


# ----------------------------------------------------------------------------- low precision
# The kernels upcast to fp32 on load, so against the float64 reference on the *same* (upcast)
# low-precision values the statistics and losses meet the fp32 tolerances above. Gradients are
# stored in the input dtype: each element adds the rounding of that dtype (LOW_PRECISION_UNIT); fp16
# gradients below 2^-14 are subnormal, adding up to 2^-25 absolute per element (sqrt(C) 2^-25 per row).
# Both are properties of the formats and of the cast (truncating or rounding), the same on every CPU.
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind,B,C", [("normal", 3, 10), ("normal", 128, 100), ("extreme", 3, 1000),
                                      ("ties", 1, 2), ("ties", 128, 10)])
def test_low_precision_inputs(dtype, kind, B, C):
    seed = seed_of("lowp", str(dtype), kind, B, C)
    z, za, y, z64, za64, yc = make_case(kind, B, C, seed, dtype)
    head = kernels.loss_head(z, za, y, backend="triton")
    ref = R.loss_head(z64, za64, yc)
    for name in R.LossHead._fields[:-1]:
        assert getattr(head, name).dtype == torch.float32
        assert_close(getattr(head, name), getattr(ref, name), name=name)
    assert torch.equal(head.wrong_idx.cpu(), ref.wrong_idx)
    u = LOW_PRECISION_UNIT[dtype]
    sub = (C ** 0.5) * FP16_SUBNORMAL_HALF_ULP if dtype == torch.float16 else 0.0
    a = UPSTREAM * unit_terms(B)        # the per-sample gradient scale, for MART's cancelling terms
    s = torch.rand(B, generator=torch.Generator().manual_seed(seed + 1))
    norm = "none" if kind == "extreme" else "minmax"   # see DTRADES_CASES
    for name, fn_t, fn_r in (
            ("trades", lambda a, b: kernels.trades_loss(a, b, y, 6.0, backend="triton"),
             lambda a, b: R.trades_loss(a, b, yc, 6.0)),
            ("mart", lambda a, b: kernels.mart_loss(a, b, y, 6.0, backend="triton"),
             lambda a, b: R.mart_loss(a, b, yc, 6.0)),
            ("dtrades", lambda a, b: kernels.dtrades_loss(a, b, y, to_dev(s), 1.0, 1.0, norm, 3.0, backend="triton"),
             lambda a, b: R.dtrades_loss(a, b, yc, s.double(), 1.0, 1.0, norm, 3.0))):
        out, gz, gza = grads(fn_t, z, za)
        ref_out, gz_r, gza_r = grads(fn_r, z64, za64)
        if name == "dtrades":
            assert_close(out.lam, ref_out.lam, name="dtrades lambda")
        assert_head_close(out.head, ref, name=f"{name} ({dtype})")
        lt, lr = out.loss, ref_out.loss
        t = unit_terms(B, None, 1 + ref_out.lam if name == "dtrades" else 1 + 6.0 if name == "trades" else 2 + 6.0)
        scale = UPSTREAM * t
        if name == "mart":
            terms = mart_grad_z_terms(z64, za64, yc, 6.0, a)
            sub_z = sub + 1e-6 * terms
        else:
            sub_z = sub
        assert lt.dtype == torch.float32
        assert gz.dtype == dtype and gza.dtype == dtype
        assert_close(lt, lr, atol=loss_atol(t), name=f"{name} loss")
        assert_grad_close(gz, gz_r, scale, rtol=u + RTOL, atol_rows=sub_z, name=f"{name} grad z")
        assert_grad_close(gza, gza_r, scale, rtol=u + RTOL, atol_rows=sub, name=f"{name} grad z_adv")


def test_partial_requires_grad_and_strided_rows():
    """Only z_adv needs a gradient, and z_adv is a column slice of a wider tensor (row stride 16 > C)."""
    z, za, y, z64, za64, yc = make_case("normal", 6, 10, seed_of("partial"))
    wide = to_dev(torch.zeros(6, 16))
    wide[:, 3:13] = za
    wide.requires_grad_(True)
    za_view = wide[:, 3:13]
    assert za_view.stride() == (16, 1)
    loss = kernels.trades_loss(z, za_view, y, 6.0, backend="triton").loss
    (g_wide,) = torch.autograd.grad(loss, wide)
    za_r = za64.clone().requires_grad_(True)
    (g_r,) = torch.autograd.grad(R.trades_loss(z64, za_r, yc, 6.0).loss, za_r)
    assert_grad_close(g_wide[:, 3:13], g_r, unit_terms(6, None, 1 + 6.0), name="grad z_adv")
    assert (g_wide[:, :3] == 0).all() and (g_wide[:, 13:] == 0).all()
    head = kernels.loss_head(z, za_view.detach(), y, backend="triton")
    assert_close(head.kl, R.loss_head(z64, za64, yc).kl, name="kl (strided)")


def test_poisoning_catches_unwritten_outputs(monkeypatch):
    """The poison is live: launching one row block too few leaves the last rows NaN / -1."""
    import kernels.fused_loss_head as fused

    z, za, y, *_ = make_case("normal", 5, 10, seed_of("poison"))
    monkeypatch.setattr(fused, "triton_cdiv", lambda a, b: (a + b - 1) // b - 1)
    with block_sizes(block_b=2):
        head = kernels.loss_head(z, za, y, backend="triton")
    assert torch.isfinite(head.kl[:4]).all()
    assert torch.isnan(head.kl[4]) and torch.isnan(head.ce_nat[4]) and head.wrong_idx[4] == -1
