"""The fused PGD-step kernel vs the reference op, and the step's invariants.

Runs on the CPU through Triton's interpreter, or compiled on a GPU with FASTROBUST_TEST_DEVICE=cuda
(tests/test_kernels_device.py: inputs built on the CPU and moved with ``to_dev``, the reference run on
CPU copies); outputs are poisoned (NaN) before each launch.

Tolerances: x_new elementwise ``|a - e| <= 1e-6`` against the float32 reference on the same inputs
(values lie in [0, 1], where fp32's ulp is <= 6e-8; the kernel and torch may order the same few
fp32 operations differently, e.g. ``step * (g / n)`` vs ``(step * g) / n``, a few ulps at most);
grad_norm ``|a - e| <= 1e-5 |e|`` against float64 ``torch.linalg.vector_norm``.
"""
from __future__ import annotations

import zlib

from test_kernels_device import to_dev  # before triton / kernels are imported

import pytest
import torch

import kernels
from kernels import reference as R
from kernels.testing import block_sizes, poison_outputs, self_check

X_ATOL = 1e-6
RTOL = 1e-5


@pytest.fixture(autouse=True)
def _poison():
    # self-check off, as in test_kernels.py: every test here compares with the reference itself
    with poison_outputs(), self_check(False):
        yield


def make_batch(shape, seed, zero_frac=0.0, dtype=torch.float32):
    """(x_adv, grad, x_nat) on DEVICE: x_nat in [0, 1] (with pixels at exactly 0 and 1), x_adv inside
    the eps-ball, grad ~ N(0, 1) with a fraction of exact zeros (sign(0) = 0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g)
    x = torch.where(torch.rand(shape, generator=g) < 0.1, (x > 0.5).float(), x)
    xa = (x + 0.03 * (2 * torch.rand(shape, generator=g) - 1)).clamp(0, 1)
    grad = torch.randn(shape, generator=g)
    grad = torch.where(torch.rand(shape, generator=g) < zero_frac, torch.zeros_like(grad), grad)
    return to_dev(xa.to(dtype)), to_dev(grad.to(dtype)), to_dev(x.to(dtype))


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def check_against_reference(xa, grad, x, step, eps, norm):
    """The kernel on the device tensors against the reference on their CPU copies."""
    out, gn = kernels.pgd_step(xa, grad, x, step, eps, norm, backend="triton")
    ref, gn_ref = R.pgd_step(xa.cpu(), grad.cpu(), x.cpu(), step, eps, norm)
    assert out.shape == xa.shape and out.dtype == xa.dtype and out.device == xa.device
    assert torch.isfinite(out).all() and torch.isfinite(gn).all(), "unwritten output"
    assert (out.cpu().double() - ref.double()).abs().max().item() <= X_ATOL
    assert gn.dtype == torch.float32 and gn.shape == (xa.shape[0],)
    exact = torch.linalg.vector_norm(grad.cpu().double().reshape(grad.shape[0], -1), dim=1)
    assert ((gn.cpu().double() - exact).abs() <= RTOL * exact).all()
    return out, gn


SHAPES = [(1, 3, 4, 4), (3, 3, 8, 8), (128, 3, 32, 32), (2, 1, 5, 7)]


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_pgd_step_matches_reference_and_invariants(shape, norm):
    xa, grad, x = make_batch(shape, seed_of("pgd", shape, norm), zero_frac=0.05)
    eps = 8 / 255 if norm == "linf" else 0.5
    step = 2 / 255 if norm == "linf" else 0.2
    out, _ = check_against_reference(xa, grad, x, step, eps, norm)
    assert out.min() >= 0 and out.max() <= 1
    delta = (out - x).reshape(shape[0], -1)
    if norm == "linf":
        assert delta.abs().max() <= eps + 1e-6
    else:
        assert (torch.linalg.vector_norm(delta.double(), dim=1) <= eps * (1 + 1e-5)).all()


def test_linf_sign_of_zero_gradient_is_zero():
    """Where grad == 0 the pixel does not move (before projection / clamping)."""
    xa, grad, x = make_batch((2, 3, 6, 6), seed_of("zero"), zero_frac=0.5)
    eps = 0.5   # large ball: nothing is projected
    out, _ = check_against_reference(xa, grad, x, 0.01, eps, "linf")
    still = grad == 0
    assert still.any()
    assert torch.equal(out[still], xa[still])
    moved = (~still) & (xa > 0.02) & (xa < 0.98)
    assert torch.allclose((out - xa)[moved], 0.01 * grad.sign()[moved], atol=1e-6)


def test_l2_projection_is_active_and_exact():
    """A step that leaves the ball ends on its surface (where no pixel is clamped)."""
    g = torch.Generator().manual_seed(seed_of("l2-proj"))
    x = to_dev(0.25 + 0.5 * torch.rand(4, 3, 8, 8, generator=g))          # far from the [0, 1] bounds
    xa = x.clone()
    grad = to_dev(torch.randn(4, 3, 8, 8, generator=g))
    eps = 0.1
    out, gn = check_against_reference(xa, grad, x, 1.0, eps, "l2")   # step 1.0 >> eps
    dist = torch.linalg.vector_norm((out - x).double().reshape(4, -1), dim=1)
    # 1e-5: half-ulp float32 errors over 192 elements move the distance by ~4e-6 relative and each unit
    # direction element by ~6e-7 at most, on any CPU; a missing or wrong projection is off by O(1)
    assert torch.allclose(dist, torch.full_like(dist, eps), rtol=1e-5)
    direction = (out - x).reshape(4, -1) / dist[:, None].float()
    expect = grad.reshape(4, -1) / gn[:, None]
    assert torch.allclose(direction, expect, atol=1e-5)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_channels_last(norm):
    shape = (3, 3, 8, 8)
    xa, grad, x = make_batch(shape, seed_of("cl", norm))
    xa_cl = xa.contiguous(memory_format=torch.channels_last)
    out_cl, gn_cl = check_against_reference(xa_cl, grad.contiguous(memory_format=torch.channels_last),
                                            x.contiguous(memory_format=torch.channels_last), 0.01, 0.03, norm)
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    out, gn = kernels.pgd_step(xa, grad, x, 0.01, 0.03, norm, backend="triton")
    # same values as from contiguous inputs; the per-sample sums run in memory order, so norms (and
    # the L2 step built from them) may differ in the last bits, L-inf's elementwise step may not
    assert torch.allclose(gn_cl, gn, rtol=RTOL, atol=0)
    if norm == "linf":
        assert torch.equal(out_cl, out)
    else:
        assert (out_cl - out).abs().max() <= X_ATOL
    # mixed layouts: channels_last x_adv with contiguous grad / x_nat
    out_mixed, gn_mixed = check_against_reference(xa_cl, grad, x, 0.01, 0.03, norm)
    assert out_mixed.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out_mixed, out_cl) and torch.equal(gn_mixed, gn_cl)


def test_non_dense_input_gives_contiguous_output():
    xa, grad, x = make_batch((3, 3, 8, 16), seed_of("slice"))
    xa_s, grad_s, x_s = xa[..., ::2], grad[..., ::2], x[..., ::2]
    out, _ = check_against_reference(xa_s, grad_s, x_s, 0.01, 0.03, "l2")
    assert out.is_contiguous()


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("shape,block_n", [((3, 3, 16, 16), 256), ((2, 3, 10, 10), 128), ((5, 1, 3, 3), 16)])
def test_multi_tile_samples(shape, block_n, norm):
    """Samples longer than one tile: the looping path (L2's three sweeps), partial last tile."""
    xa, grad, x = make_batch(shape, seed_of("tiles", shape, block_n, norm), zero_frac=0.05)
    eps = 8 / 255 if norm == "linf" else 0.3
    with block_sizes(block_n=block_n):
        out, _ = check_against_reference(xa, grad, x, 0.5 * eps, eps, norm)
    assert out.min() >= 0 and out.max() <= 1


def test_low_precision_images_and_gradients():
    """bf16 gradient with fp32 images, and fp16 images: math in fp32, output in x_adv's dtype."""
    xa, grad, x = make_batch((3, 3, 8, 8), seed_of("lowp"))
    out, gn = check_against_reference(xa, grad.bfloat16(), x, 0.01, 0.03, "l2")
    assert out.dtype == torch.float32
    xa16, g16, x16 = xa.half(), grad.half(), x.half()
    out16, gn16 = kernels.pgd_step(xa16, g16, x16, 0.01, 0.03, "linf", backend="triton")
    ref16, gn_ref16 = R.pgd_step(xa16.cpu(), g16.cpu(), x16.cpu(), 0.01, 0.03, "linf")
    assert out16.dtype == torch.float16
    # both compute in fp32 and round to fp16 once: at most one fp16 ulp (2^-11 in [0.5, 1]) apart
    assert (out16.cpu().float() - ref16.float()).abs().max() <= 2.0 ** -11
    assert torch.allclose(gn16.cpu(), gn_ref16, rtol=RTOL)


def test_reference_backend_invariants_too():
    """The reference op (what the CPU runs by default) honours the same invariants."""
    xa, grad, x = make_batch((4, 3, 8, 8), seed_of("ref"))
    out, gn = kernels.pgd_step(xa, grad, x, 2 / 255, 8 / 255, "linf", backend="reference")
    assert (out - x).abs().max() <= 8 / 255 + 1e-6 and out.min() >= 0 and out.max() <= 1
    assert torch.allclose(gn, torch.linalg.vector_norm(grad.reshape(4, -1), dim=1), rtol=RTOL)
    out2, _ = kernels.pgd_step(xa, grad, x, 1.0, 0.1, "l2", backend="reference")
    assert (torch.linalg.vector_norm((out2 - x).reshape(4, -1), dim=1) <= 0.1 * (1 + 1e-5)).all()


def test_bad_arguments():
    xa, grad, x = make_batch((2, 3, 4, 4), seed_of("bad"))
    with pytest.raises(ValueError, match="linf"):
        kernels.pgd_step(xa, grad, x, 0.01, 0.03, "l1", backend="triton")
    with pytest.raises(ValueError, match="shape"):
        kernels.pgd_step(xa, grad[:, :2], x, 0.01, 0.03, "linf", backend="triton")
