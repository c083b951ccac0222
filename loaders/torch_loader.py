"""The "torch" backend: a plain ``torch.utils.data.DataLoader`` fallback.

Works with any map-style dataset whose items are ``(image, label)``: torchvision datasets such as
``torchvision.datasets.MNIST`` / ``CIFAR10`` (PIL images), datasets returning numpy HW/HWC arrays
or CHW tensors, and the in-memory :class:`ArrayDataset` (which fetches whole batches at once via
``__getitems__``). Worker processes only fetch and collate uint8 images; the batch is then moved
to ``device`` (pinned memory + ``non_blocking`` on CUDA) and augmented there with the shared,
generator-driven :func:`loaders.augment.augment_batch`, seeded by (seed, epoch, batch index,
rank). So this backend yields exactly the gpu backend's batches for the same seed.

The sample order comes from a ``DistributedSampler`` (``num_replicas=world_size``, ``rank``,
``seed``), re-seeded each epoch with ``set_epoch`` -- also when not distributed (world_size 1).
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .errors import ConfigError

from .augment import NO_AUGMENT, AugmentSpec, finish_batch
from .base import EpochLoader
from .datasets import ArraySplit

__all__ = ["TorchLoader", "ArrayDataset", "default_num_workers"]


def default_num_workers() -> int:
    """Small by default: the workers only copy uint8 bytes."""
    return min(2, os.cpu_count() or 1)


class _Batch(tuple):
    """An already-collated ``(images NHWC uint8, labels int64)`` pair from ``__getitems__``."""


class ArrayDataset(Dataset):
    """In-memory dataset over uint8 N x H x W x C images and integer labels."""

    def __init__(self, images, labels):
        self.images = torch.from_numpy(np.array(images, dtype=np.uint8, copy=True)) \
            if not isinstance(images, torch.Tensor) else images.to("cpu", torch.uint8)
        self.labels = torch.from_numpy(np.array(labels, dtype=np.int64, copy=True)) \
            if not isinstance(labels, torch.Tensor) else labels.to("cpu", torch.int64)
        if self.images.dim() != 4 or self.images.shape[0] != self.labels.shape[0]:
            raise ConfigError(f"ArrayDataset needs N x H x W x C images and N labels, got "
                              f"{tuple(self.images.shape)} and {tuple(self.labels.shape)}.")

    @classmethod
    def from_split(cls, split: ArraySplit) -> "ArrayDataset":
        return cls(split.images, split.labels)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])

    def __getitems__(self, indices):
        # numpy's row gather: much faster than torch's CPU index_select on uint8 rows
        idx = np.asarray(indices, dtype=np.int64)
        return _Batch((torch.from_numpy(self.images.numpy()[idx]),
                       torch.from_numpy(self.labels.numpy()[idx])))


def _to_hwc_uint8(img) -> torch.Tensor:
    """One image (PIL, numpy HW/HWC, torch CHW/HW uint8 or float in [0, 1]) -> uint8 HWC."""
    if isinstance(img, torch.Tensor):
        t = img
        if t.is_floating_point():
            t = (t * 255).round_().clamp_(0, 255).to(torch.uint8)
        if t.dim() == 2:
            return t[:, :, None].contiguous()
        if t.dim() == 3 and t.shape[0] in (1, 3) and t.shape[-1] not in (1, 3):
            return t.permute(1, 2, 0).contiguous()     # CHW tensor, as torchvision produces
        return t.contiguous()
    a = np.asarray(img)
    if not a.flags.writeable:
        a = a.copy()
    if np.issubdtype(a.dtype, np.floating):
        a = np.clip(np.round(a * 255), 0, 255)
    a = np.ascontiguousarray(a, dtype=np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    return torch.from_numpy(a)


def _collate(samples):
    if isinstance(samples, _Batch):
        return samples[0], samples[1]
    images = torch.stack([_to_hwc_uint8(s[0]) for s in samples])
    labels = torch.tensor([int(s[1]) for s in samples], dtype=torch.int64)
    return images, labels


class _EpochSampler(Sampler):
    """DistributedSampler + drop_last truncation + skipping the first batches of an epoch."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int, rank: int,
                 world_size: int, used: int):
        self._inner = DistributedSampler(range(n), num_replicas=world_size, rank=rank,
                                         shuffle=shuffle, seed=seed, drop_last=False)
        self._bs = batch_size
        self._used = used          # samples per epoch after dropping the last partial batch
        self.epoch = 0
        self.start_batch = 0

    def __iter__(self):
        self._inner.set_epoch(self.epoch)
        idx = list(self._inner)[:self._used]
        return iter(idx[self.start_batch * self._bs:])

    def __len__(self) -> int:
        return max(0, self._used - self.start_batch * self._bs)


class TorchLoader(EpochLoader):
    """DataLoader-based backend over any map-style ``(image, label)`` dataset."""

    backend = "torch"

    def __init__(self, dataset, batch_size: int, device="cpu", *, shuffle: bool = False,
                 augment: AugmentSpec = NO_AUGMENT, drop_last: bool = False, seed: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None,
                 num_workers: Optional[int] = None, pin_memory: Optional[bool] = None,
                 prefetch_factor: Optional[int] = None, multiprocessing_context=None):
        if isinstance(dataset, ArraySplit):
            dataset = ArrayDataset.from_split(dataset)
        super().__init__(dataset_size=len(dataset), batch_size=batch_size, device=device,
                         shuffle=shuffle, augment=augment, drop_last=drop_last, seed=seed,
                         rank=rank, world_size=world_size)
        if num_workers is None:
            num_workers = default_num_workers()
        if isinstance(num_workers, bool) or int(num_workers) != num_workers or num_workers < 0:
            raise ConfigError(f"num_workers must be an integer >= 0, got {num_workers!r}.")
        self.num_workers = int(num_workers)
        self.pin_memory = (self.device.type == "cuda") if pin_memory is None else bool(pin_memory)
        self.dataset = dataset
        self._sampler = _EpochSampler(self.dataset_size, self.batch_size, self.shuffle, self.seed,
                                      self.rank, self.world_size, len(self) * self.batch_size)
        extra = {}
        if self.num_workers > 0:
            extra = dict(persistent_workers=True, multiprocessing_context=multiprocessing_context)
            if prefetch_factor is not None:
                extra["prefetch_factor"] = int(prefetch_factor)
        self._dataloader = DataLoader(
            dataset, batch_size=self.batch_size, sampler=self._sampler, drop_last=False,
            collate_fn=_collate, num_workers=self.num_workers, pin_memory=self.pin_memory,
            generator=torch.Generator().manual_seed(self.seed), **extra)

    def _iterate(self, epoch: int, start_batch: int):
        self._sampler.epoch, self._sampler.start_batch = epoch, start_batch
        dev = self.device
        for b, (x, y) in enumerate(self._dataloader, start=start_batch):
            x = x.to(dev, non_blocking=True).permute(0, 3, 1, 2)      # NCHW, channels_last
            y = y.to(dev, non_blocking=True)
            yield finish_batch(x, y, self.augment, seed=self.seed, epoch=epoch, batch_index=b,
                               rank=self.rank)
