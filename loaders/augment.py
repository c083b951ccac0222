"""The one definition of sample order and training augmentation, shared by the backends.

Sample order
------------
:func:`sample_order` gives the indices one rank visits in one epoch. It is exactly
``torch.utils.data.DistributedSampler(shuffle=..., seed=seed, drop_last=False)`` after
``set_epoch(epoch)``: a ``torch.randperm`` drawn from a CPU generator seeded with
``seed + epoch`` (or ``arange`` when not shuffling), padded by repeating its head up to a
multiple of ``world_size``, then ``[rank::world_size]``. With ``world_size == 1`` it is just the
seeded permutation. The gpu and ffcv backends call it; the torch backend uses the
DistributedSampler itself, so all three visit samples in the same order.

Augmentation
------------
The paper's training augmentation (CIFAR-10): a random translation by ``(ty, tx)``, each drawn
uniformly from ``{-pad, ..., pad}`` (pad = 4), with zero fill -- identical to
``RandomCrop(32, padding=4)`` with zero padding -- followed by a horizontal flip with
probability 0.5. MNIST uses none. Per image ``i``::

    w'  = W - 1 - w   if flipped else   w
    out[i, c, h, w] = x[i, c, h + ty, w' + tx]   (0 where the source pixel is outside the image)

:func:`augment_batch` applies it to a whole NCHW batch (uint8 or float) on the batch's device:
one gather kernel on CUDA, numpy strided copies on the CPU (both pure copies, so bit-identical).
Its random numbers are drawn on the CPU from a ``torch.Generator``; the loaders seed that
generator with :func:`batch_seed` ``(seed, epoch, batch_index, rank)``, so two backends that
share this code produce bit-identical batches on the same device, and the same augmentation
parameters on every device. (The final ``/ 255`` may differ by one ulp between CPU and CUDA:
CUDA divides by a scalar through its reciprocal.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from .datasets import dataset_info

__all__ = ["AugmentSpec", "NO_AUGMENT", "paper_augment", "sample_order",
           "batch_seed", "batch_generator", "draw_params", "augment_batch", "to_float01",
           "finish_batch"]


@dataclass(frozen=True)
class AugmentSpec:
    """``pad``: maximum translation in pixels (zero fill); ``flip``: random horizontal flip."""
    pad: int = 0
    flip: bool = False

    @property
    def active(self) -> bool:
        return self.pad > 0 or self.flip


NO_AUGMENT = AugmentSpec()


def paper_augment(dataset: str, enabled: bool = True) -> AugmentSpec:
    """The paper's training augmentation for ``dataset`` (none when ``enabled`` is False), from the
    dataset registry: CIFAR-10 pads by 4 and flips, MNIST trains on the raw images."""
    if not enabled:
        return NO_AUGMENT
    info = dataset_info(dataset)
    return AugmentSpec(pad=info.train_pad, flip=info.train_flip)


def sample_order(n: int, *, shuffle: bool, seed: int, epoch: int, rank: int = 0,
                 world_size: int = 1) -> torch.Tensor:
    """Indices (int64, CPU) that ``rank`` visits in ``epoch``: DistributedSampler semantics."""
    if shuffle:
        g = torch.Generator()
        g.manual_seed(int(seed) + int(epoch))
        idx = torch.randperm(n, generator=g)
    else:
        idx = torch.arange(n)
    if world_size > 1:
        total = math.ceil(n / world_size) * world_size
        extra = total - n
        if extra:
            reps = math.ceil(extra / n)
            idx = torch.cat([idx, idx.repeat(reps)[:extra]])
        idx = idx[rank::world_size]
    return idx


_SEED_TAG = 0x5EED_A06  # separates augmentation seeds from any other use of the same numbers


def batch_seed(seed: int, epoch: int, batch_index: int, rank: int = 0) -> int:
    """A 63-bit generator seed that depends on every argument (hashed with SeedSequence)."""
    ss = np.random.SeedSequence([int(seed) % (1 << 64), int(epoch), int(batch_index),
                                 int(rank), _SEED_TAG])
    return int(ss.generate_state(1, np.uint64)[0] >> np.uint64(1))


def batch_generator(seed: int, epoch: int, batch_index: int, rank: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(batch_seed(seed, epoch, batch_index, rank))
    return g


def draw_params(n: int, spec: AugmentSpec, generator: torch.Generator
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-image ``shifts`` (n x 2 int64: ty, tx) and ``flips`` (n bool), drawn on the CPU.

    Always draws both, in this order, so the stream of random numbers does not depend on which
    parts of the augmentation are active.
    """
    shifts = torch.randint(-spec.pad, spec.pad + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    if not spec.flip:
        flips = torch.zeros_like(flips)
    return shifts, flips


def augment_batch(x: torch.Tensor, spec: AugmentSpec, generator: Optional[torch.Generator] = None,
                  *, shifts: Optional[torch.Tensor] = None, flips: Optional[torch.Tensor] = None
                  ) -> torch.Tensor:
    """Translate (zero fill) and flip each image of the NCHW batch ``x``.

    ``x`` may be uint8 or float and in any memory format; the result has ``x``'s dtype and device,
    shape N x C x H x W and ``torch.channels_last`` memory format. The random parameters come from
    ``generator`` (see :func:`draw_params`) unless ``shifts``/``flips`` are given.

    The result is a pure copy of input pixels (or 0), so every implementation gives bit-identical
    values: on CUDA one gather kernel (no host synchronisation; the few parameters are copied to
    the device asynchronously), on the CPU numpy's strided copies (PyTorch's CPU indexing kernels
    are ~10x slower for this).
    """
    if x.dim() != 4:
        raise ValueError(f"augment_batch expects an N x C x H x W batch, got shape {tuple(x.shape)}")
    if shifts is None or flips is None:
        if generator is None:
            raise ValueError("augment_batch needs a generator or explicit shifts and flips")
        shifts, flips = draw_params(x.shape[0], spec, generator)
    if x.device.type == "cpu":
        return _augment_numpy(x, shifts, flips)
    return _augment_torch(x, shifts, flips)


def _augment_torch(x: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """One gather over an NHWC view: out[n, h, w] = x[n, h + ty, w' + tx] (or 0)."""
    n, _, h, w = x.shape
    dev = x.device
    shifts = shifts.to(dev, non_blocking=True)
    flips = flips.to(dev, non_blocking=True)
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = ar_h[None, :] + shifts[:, 0:1]                                   # N x H
    cols = torch.where(flips[:, None], (w - 1 - ar_w)[None, :], ar_w[None, :]) + shifts[:, 1:2]
    valid = (((rows >= 0) & (rows < h))[:, :, None]
             & ((cols >= 0) & (cols < w))[:, None, :])                      # N x H x W
    xh = x.permute(0, 2, 3, 1)                                              # NHWC view
    n_idx = torch.arange(n, device=dev)[:, None, None]
    out = xh[n_idx, rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]]
    out.masked_fill_(~valid[..., None], 0)                                 # N x H x W x C
    return out.permute(0, 3, 1, 2)                                          # channels_last NCHW


def _augment_numpy(x: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """CPU version: zero-pad, take each image's window through a strided view, flip in place."""
    xh = x.detach().permute(0, 2, 3, 1).numpy()                             # NHWC view
    n, h, w, c = xh.shape
    s = shifts.cpu().numpy().astype(np.int64)
    f = flips.cpu().numpy().astype(bool)
    p = int(np.abs(s).max()) if s.size else 0
    padded = np.zeros((n, h + 2 * p, w + 2 * p, c), dtype=xh.dtype)
    padded[:, p:p + h, p:p + w] = xh
    s0, s1, s2, s3 = padded.strides
    windows = np.lib.stride_tricks.as_strided(
        padded, shape=(n, 2 * p + 1, 2 * p + 1, h, w, c), strides=(s0, s1, s2, s1, s2, s3),
        writeable=False)
    out = windows[np.arange(n), s[:, 0] + p, s[:, 1] + p]                   # N x H x W x C copy
    if f.any():
        out[f] = out[f][:, :, ::-1]
    return torch.from_numpy(out).permute(0, 3, 1, 2)


def to_float01(x: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> float32 ``x / 255`` in [0, 1], channels_last, on ``x``'s device (no sync).

    On the CPU, numpy does the (single-threaded, correctly rounded) division: the values equal
    torch's CPU ``x.float().div_(255)``, but no intra-op thread pool is involved -- with 2 cores
    shared with other work, torch's per-op thread barriers made this step 10x slower at times.
    """
    if x.device.type == "cpu" and x.dtype == torch.uint8:
        xh = x.permute(0, 2, 3, 1).numpy()                                  # NHWC view
        out = np.empty(xh.shape, dtype=np.float32)
        np.divide(xh, np.float32(255), out=out)
        return torch.from_numpy(out).permute(0, 3, 1, 2)                    # channels_last
    x = x.to(torch.float32, copy=True)              # keeps channels_last strides when present
    if not x.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous(memory_format=torch.channels_last)
    return x.div_(255)


def finish_batch(x: torch.Tensor, y: torch.Tensor, spec: AugmentSpec, *, seed: int, epoch: int,
                 batch_index: int, rank: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Augment (if ``spec`` is active) and convert one uint8 NCHW batch already on its device."""
    if spec.active:
        x = augment_batch(x, spec, batch_generator(seed, epoch, batch_index, rank))
    return to_float01(x), y.long()
