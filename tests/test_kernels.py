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
* scalar losses: ``|a - e| <= 1e-5 |e|``.
* gradients, per sample (row) norm-wise: ``||ga_i - ge_i||_2 <= 1e-5 ||ge_i||_2 + 1e-6 a_i``, a_i =
  c_i / B the per-sample gradient scale: a row's exact gradient can be a cancelling difference of
  O(a_i) terms (p -> e_y for a confidently correct sample), leaving fp32 rounding of ~6e-8 a_i.
"""
from __future__ import annotations

import zlib

from test_kernels_device import DEVICE, INTERPRETED, to_dev  # before triton / kernels are imported

import pytest
import torch

import kernels
from kernels import reference as R
from kernels.testing import block_sizes, poison_outputs

RTOL = 1e-5
STAT_ATOL = 1e-6
GRAD_ATOL = 1e-6          # times the per-sample scale c_i / B
# Relative error of one stored gradient element: fp16 rounds to nearest (half an ulp, 2^-11); for
# bf16 Triton's CPU interpreter truncates fp32 -> bf16 casts, so allow a full ulp, 2^-7; a GPU rounds
# to nearest, half an ulp, 2^-8.
LOW_PRECISION_UNIT = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -7 if INTERPRETED else 2.0 ** -8}
FP16_SUBNORMAL_HALF_ULP = 2.0 ** -25


@pytest.fixture(autouse=True)
def _poison():
    with poison_outputs():
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


def assert_grad_close(actual, expected, scale, rtol=RTOL, atol_rows=None, name=""):
    """Per-row: ||a_i - e_i|| <= rtol ||e_i|| + GRAD_ATOL * scale_i (+ atol_rows_i)."""
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
    z = z.detach().clone().requires_grad_(True)
    za = za.detach().clone().requires_grad_(True)
    out = loss_fn(z, za)
    loss = out[0] if isinstance(out, tuple) else out
    k = 1.7  # a non-unit upstream gradient: the backward must use it
    gz, gza = torch.autograd.grad(loss * k, (z, za))
    return out, gz, gza


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
    (lt, gz, gza) = grads(lambda a, b: kernels.trades_loss(a, b, y, kl_weight, to_dev(c), backend="triton"), z, za)
    w64 = w.double() if weighted else 6.0
    c64 = c.double() if weighted else None
    (lr, gz_r, gza_r) = grads(lambda a, b: R.trades_loss(a, b, yc, w64, c64), z64, za64)
    assert lt.dtype == torch.float32 and lt.dim() == 0
    assert_close(lt, lr, atol=0.0, name="loss")
    scale = (c if weighted else torch.ones(B)) / B * 1.7
    assert_grad_close(gz, gz_r, scale, name="grad z")
    assert_grad_close(gza, gza_r, scale, name="grad z_adv")


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
    (lt, gz, gza) = grads(lambda a, b: kernels.mart_loss(a, b, y, 5.0, to_dev(c), backend="triton"), z, za)
    c64 = c.double() if weighted else None
    (lr, gz_r, gza_r) = grads(lambda a, b: R.mart_loss(a, b, yc, 5.0, c64), z64, za64)
    assert_close(lt, lr, atol=0.0, name="loss")
    scale = (c if weighted else torch.ones(B)) / B * 1.7
    terms = mart_grad_z_terms(z64, za64, yc, 5.0, scale)
    assert_grad_close(gz, gz_r, scale, atol_rows=1e-6 * terms, name="grad z")
    assert_grad_close(gza, gza_r, scale, name="grad z_adv")


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
    loss, lam, ce, kl, ent = out
    assert_close(loss, ref[0], atol=0.0, name="loss")
    for name, a, e in zip(("lam", "ce", "kl", "entropy"), out[1:], ref[1:]):
        assert a.shape == (B,) and not a.requires_grad
        assert_close(a, e, name=name)
    cw = c if c is not None else torch.ones(B)
    assert_grad_close(gz, gz_r, cw / B * 1.7, name="grad z")
    assert_grad_close(gza, gza_r, cw / B * 1.7, name="grad z_adv")


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
    scale = torch.full((B,), 1.7 / B)
    for fn, (l, a, b) in ((R.trades_loss, (lt, gz, gza)), (R.mart_loss, (lm, gzm, gzam))):
        (lr, ar, br) = grads(lambda p, q: fn(p, q, yc, 6.0), z64, za64)
        assert_close(l, lr, atol=0.0, name=f"{fn.__name__} loss")
        assert_grad_close(a, ar, scale, name=f"{fn.__name__} grad z")
        assert_grad_close(b, br, scale, name=f"{fn.__name__} grad z_adv")


# ----------------------------------------------------------------------------- low precision
# The kernels upcast to fp32 on load, so against the float64 reference on the *same* (upcast)
# low-precision values the statistics and losses meet the fp32 tolerances above. Gradients are
# stored in the input dtype: each element adds the rounding of that dtype (LOW_PRECISION_UNIT); fp16 gradients below 2^-14 are subnormal,
# adding up to 2^-25 absolute per element (sqrt(C) 2^-25 per row).
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
    scale = torch.full((B,), 1.7 / B)
    s = torch.rand(B, generator=torch.Generator().manual_seed(seed + 1))
    norm = "none" if kind == "extreme" else "minmax"   # see DTRADES_CASES
    for name, fn_t, fn_r in (
            ("trades", lambda a, b: kernels.trades_loss(a, b, y, 6.0, backend="triton"),
             lambda a, b: R.trades_loss(a, b, yc, 6.0)),
            ("mart", lambda a, b: kernels.mart_loss(a, b, y, 6.0, backend="triton"),
             lambda a, b: R.mart_loss(a, b, yc, 6.0)),
            ("dtrades", lambda a, b: kernels.dtrades_loss(a, b, y, to_dev(s), 1.0, 1.0, norm, 3.0, backend="triton"),
             lambda a, b: R.dtrades_loss(a, b, yc, s.double(), 1.0, 1.0, norm, 3.0))):
        lt, gz, gza = grads(fn_t, z, za)
        lr, gz_r, gza_r = grads(fn_r, z64, za64)
        if name == "dtrades":
            assert_close(lt[1], lr[1], name="dtrades lambda")
            lt, lr = lt[0], lr[0]
        if name == "mart":
            terms = mart_grad_z_terms(z64, za64, yc, 6.0, scale)
            sub_z = sub + 1e-6 * terms
        else:
            sub_z = sub
        assert lt.dtype == torch.float32
        assert gz.dtype == dtype and gza.dtype == dtype
        assert_close(lt, lr, atol=0.0, name=f"{name} loss")
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
    loss = kernels.trades_loss(z, za_view, y, 6.0, backend="triton")
    (g_wide,) = torch.autograd.grad(loss, wide)
    za_r = za64.clone().requires_grad_(True)
    (g_r,) = torch.autograd.grad(R.trades_loss(z64, za_r, yc, 6.0), za_r)
    assert_grad_close(g_wide[:, 3:13], g_r, torch.full((6,), 1 / 6), name="grad z_adv")
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
