"""Data loading for fastrobust: datasets, three interchangeable backends and one factory.

>>> import loaders
>>> train = loaders.build("cifar10", "train", batch_size=512, device="cuda")   # backend='auto'
>>> for epoch in range(epochs):
...     train.set_epoch(epoch)
...     for x, y in train:        # float32 N x 3 x 32 x 32 in [0, 1], channels_last; int64 N
...         ...

Backends (all yield the same batches for the same seed, see :mod:`loaders.augment`):

* ``gpu``   -- the whole split resident on the device, augmentation on the device (no compiled
  dependency; also runs on ``device='cpu'``);
* ``torch`` -- ``torch.utils.data.DataLoader`` fallback over any map-style dataset;
* ``ffcv``  -- FFCV ``.beton`` + ``Loader`` (optional dependency; its augmentation uses its own
  RNG, so batches match the others only without augmentation).

``ffcv`` is imported lazily: ``import loaders`` works without it.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import torch

from .errors import ConfigError, check_positive_int, unknown_name

from .augment import AugmentSpec, augment_batch, paper_augment, sample_order
from .base import EpochLoader, resolve_device, resolve_rank
from .datasets import (DATASETS, SPLITS, ArraySplit, DatasetInfo, clear_cache, dataset_info,
                       load_arrays, resolve_data_dir)
from .ffcv_loader import (FFCV_INSTALL_HINT, FfcvLoader, beton_path, ffcv_available,
                          require_ffcv, validate_beton, write_beton)
from .gpu import GpuLoader
from .torch_loader import ArrayDataset, TorchLoader

__all__ = [
    "build", "BACKENDS", "choose_backend", "load_arrays", "resolve_data_dir", "DATASETS",
    "DatasetInfo", "ArraySplit", "SPLITS", "dataset_info", "clear_cache", "write_beton",
    "beton_path", "validate_beton", "ffcv_available", "FFCV_INSTALL_HINT", "EpochLoader",
    "GpuLoader", "TorchLoader", "FfcvLoader", "ArrayDataset", "AugmentSpec", "augment_batch",
    "paper_augment", "sample_order", "DEFAULT_BETON_DIR",
]

logger = logging.getLogger("fastrobust.loaders")

BACKENDS = ("auto", "gpu", "torch", "ffcv")
DEFAULT_BETON_DIR = Path("data") / "betons"

# Fraction of the free CUDA memory the resident split may take in 'auto' (the model, its
# activations and the attack's buffers need the rest).
_GPU_MEMORY_FRACTION = 0.25


def choose_backend(device, nbytes: int) -> str:
    """The backend 'auto' picks for a split of ``nbytes`` bytes on ``device``.

    Rule, from the loader benchmark (loaders/bench.py, BENCHMARKS.md): the device-resident 'gpu'
    backend is the fastest wherever the split fits. Measured on the CPU (2 shared cores, CIFAR-10
    train, batch 128, shuffled + augmented, median of 5 x 200 batches): gpu ~156k img/s, ffcv
    ~85k img/s (2 numba threads, plus ~12 s of JIT compile at the first epoch), torch ~57k img/s
    (2 workers). The gpu backend has no worker processes, no per-sample work and no compile step;
    on CUDA it also keeps the host out of the loop entirely (airbench style), so it is the
    natural pick there too (not measured here: no GPU on the machine the numbers come from).
    The split "fits" on the CPU always (its arrays are already in host memory) and on CUDA when
    it takes at most 25% of the currently free device memory. Otherwise: 'ffcv' if importable
    (streams from a memory-mapped beton with compiled, multi-threaded augmentation), else 'torch'.
    """
    dev = resolve_device(device)
    if dev.type != "cuda":
        return "gpu"
    free, _total = torch.cuda.mem_get_info(dev)
    if nbytes <= _GPU_MEMORY_FRACTION * free:
        return "gpu"
    return "ffcv" if ffcv_available() else "torch"


def _flag(value, default: bool, what: str) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"{what} must be True, False or None, got {value!r}.")
    return value


def build(dataset: str, split: str, batch_size: int, device="cpu", backend: str = "auto",
          seed: int = 0, distributed: bool = False, *, data_dir=None, limit: Optional[int] = None,
          shuffle: Optional[bool] = None, augment: Optional[bool] = None,
          drop_last: Optional[bool] = None, num_workers: Optional[int] = None, beton_dir=None,
          rank: Optional[int] = None, world_size: Optional[int] = None,
          download: bool = False) -> EpochLoader:
    """Build a loader for ``dataset`` / ``split``.

    Defaults: ``train`` shuffles and applies the paper's augmentation (CIFAR-10: translate +-4 px
    with zero fill + horizontal flip; MNIST: none); ``test`` does neither; ``drop_last`` is False.
    ``distributed=True`` shards by ``torch.distributed``'s rank/world size when it is
    initialised; explicit ``rank``/``world_size`` always win (and shard even without
    ``distributed``). ``num_workers``: DataLoader workers (torch) or FFCV threads (ffcv); unused
    by gpu. ``beton_dir`` (ffcv): where the beton is written if missing (default ``./data/betons``).
    Returns an :class:`EpochLoader` (``GpuLoader``, ``TorchLoader`` or ``FfcvLoader``).
    """
    info = dataset_info(dataset)
    if split not in SPLITS:
        raise unknown_name("split", split, SPLITS)
    batch_size = check_positive_int(batch_size, "batch_size")
    if not isinstance(backend, str) or backend.lower() not in BACKENDS:
        raise unknown_name("backend", backend, BACKENDS)
    backend = backend.lower()
    dev = resolve_device(device)
    train = split == "train"
    shuffle = _flag(shuffle, train, "shuffle")
    spec = paper_augment(info.name, _flag(augment, train, "augment"))
    drop_last = _flag(drop_last, False, "drop_last")
    if distributed or rank is not None or world_size is not None:
        rank, world_size = resolve_rank(rank, world_size)
    else:
        rank, world_size = 0, 1
    common = dict(shuffle=shuffle, augment=spec, drop_last=drop_last, seed=seed, rank=rank,
                  world_size=world_size)

    if backend == "ffcv":
        require_ffcv()   # a clear ConfigError with the install hint before anything else
    arrays = None
    if backend != "ffcv":   # every other backend starts from the decoded arrays
        arrays = load_arrays(info.name, split, data_dir, download=download, limit=limit)
    if backend == "auto":
        backend = choose_backend(dev, arrays.images.nbytes + arrays.labels.nbytes)
        logger.info("loaders.build(%s, %s): auto picked backend %r on %s (%.0f MB split)",
                    info.name, split, backend, dev,
                    (arrays.images.nbytes + arrays.labels.nbytes) / 1e6)

    if backend == "gpu":
        if num_workers is not None:
            logger.debug("num_workers=%s ignored by the gpu backend", num_workers)
        return GpuLoader(arrays.images, arrays.labels, batch_size, dev, **common)
    if backend == "torch":
        return TorchLoader(ArrayDataset.from_split(arrays), batch_size, dev,
                           num_workers=num_workers, **common)
    # ffcv
    if download and arrays is None:
        load_arrays(info.name, split, data_dir, download=True, limit=limit)
    out_dir = Path(beton_dir) if beton_dir is not None else DEFAULT_BETON_DIR
    path = write_beton(info.name, split, out_dir, data_dir=data_dir, limit=limit, progress=True)
    return FfcvLoader(path, batch_size, dev, num_workers=num_workers, channels=info.channels,
                      **common)
