"""The "gpu" backend: the whole split resident on the target device (airbench style).

The images live on ``device`` as one uint8 N x H x W x C tensor (CIFAR-10 train: 150 MB) and the
labels as int64. Each epoch draws the sample order on the CPU (:func:`loaders.augment.sample_order`,
one small host-to-device copy per epoch); each batch is an ``index_select`` plus the shared batched
augmentation, all on the device, without host synchronisation. On ``device='cpu'`` the split is
"device-resident" in host memory and the row gather, augmentation and float conversion go through
numpy (single-threaded, ~10x faster than torch's CPU indexing kernels on uint8 and immune to
intra-op thread stalls on busy machines). No compiled dependency.
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

from .errors import ConfigError

from .augment import NO_AUGMENT, AugmentSpec, finish_batch
from .base import EpochLoader, resolve_device
from .datasets import ArraySplit

__all__ = ["GpuLoader"]

ArrayLike = Union[np.ndarray, torch.Tensor]


def _as_tensor(a: ArrayLike, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.to(device=device, dtype=dtype).contiguous()
    # np.array(copy) also handles the read-only arrays of the load_arrays cache.
    t = torch.from_numpy(np.array(a, dtype=np.dtype(str(dtype).split(".")[-1]), copy=True))
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=False).contiguous()


class GpuLoader(EpochLoader):
    """Device-resident loader. ``images``: uint8 N x H x W x C (numpy or torch); ``labels``: N."""

    backend = "gpu"

    def __init__(self, images: ArrayLike, labels: ArrayLike, batch_size: int, device="cpu", *,
                 shuffle: bool = False, augment: AugmentSpec = NO_AUGMENT,
                 drop_last: bool = False, seed: int = 0, rank: Optional[int] = None,
                 world_size: Optional[int] = None):
        is_u8 = (images.dtype == torch.uint8 if isinstance(images, torch.Tensor)
                 else images.dtype == np.uint8)
        if images.ndim != 4 or not is_u8:
            raise ConfigError(f"GpuLoader needs uint8 N x H x W x C images, got dtype "
                              f"{images.dtype} and shape {tuple(images.shape)}.")
        if labels.shape[0] != images.shape[0]:
            raise ConfigError(f"GpuLoader: {images.shape[0]} images but {labels.shape[0]} labels.")
        super().__init__(dataset_size=int(images.shape[0]), batch_size=batch_size, device=device,
                         shuffle=shuffle, augment=augment, drop_last=drop_last, seed=seed,
                         rank=rank, world_size=world_size)
        self.images = _as_tensor(images, self.device, torch.uint8)     # N x H x W x C
        self.labels = _as_tensor(labels, self.device, torch.int64)

    @classmethod
    def from_split(cls, split: ArraySplit, batch_size: int, device="cpu", **kwargs) -> "GpuLoader":
        return cls(split.images, split.labels, batch_size, resolve_device(device), **kwargs)

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size() + self.labels.numel() * 8

    def _iterate(self, epoch: int, start_batch: int):
        bs = self.batch_size
        order = self.epoch_indices(epoch)
        on_cpu = self.device.type == "cpu"
        if on_cpu:
            # numpy's row gather is far faster than torch's CPU index_select for uint8 rows
            order_np = order.numpy()
            images_np, labels_np = self.images.numpy(), self.labels.numpy()
        else:
            order = order.pin_memory().to(self.device, non_blocking=True)
        for b in range(start_batch, len(self)):
            if on_cpu:
                idx = order_np[b * bs:(b + 1) * bs]
                x = torch.from_numpy(images_np[idx])
                y = torch.from_numpy(labels_np[idx])
            else:
                idx = order[b * bs:(b + 1) * bs]
                x = self.images.index_select(0, idx)
                y = self.labels.index_select(0, idx)
            yield finish_batch(x.permute(0, 3, 1, 2), y, self.augment, seed=self.seed,
                               epoch=epoch, batch_index=b, rank=self.rank)
