"""Bookkeeping shared by the backends: epochs, resume, distributed shards, argument checks."""
from __future__ import annotations

import math
from typing import Iterator, Optional, Tuple

import torch

from .errors import ConfigError, check_positive_int

from .augment import NO_AUGMENT, AugmentSpec, sample_order

__all__ = ["EpochLoader", "resolve_rank", "resolve_device"]


def resolve_rank(rank: Optional[int] = None, world_size: Optional[int] = None) -> Tuple[int, int]:
    """``(rank, world_size)``: the arguments if given, else torch.distributed's if it is
    initialised, else ``(0, 1)``."""
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised and world_size == dist.get_world_size() else 0
    world_size = check_positive_int(world_size, "world_size")
    if isinstance(rank, bool) or int(rank) != rank or not 0 <= int(rank) < world_size:
        raise ConfigError(f"rank must be an integer in [0, world_size={world_size}), got {rank!r}.")
    return int(rank), world_size


def resolve_device(device) -> torch.device:
    """A ``torch.device``; asking for CUDA where there is none is a ConfigError."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"invalid device {device!r} ({e}); use 'cpu', 'cuda' or 'cuda:N'.") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available here; "
                              f"pass device='cpu'.")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


class EpochLoader:
    """Base class of the three backends.

    Iterating yields ``(images, labels)``: float32 N x C x H x W in [0, 1] (channels_last) and
    int64 N, both on ``device``.

    Epochs: ``iter(loader)`` runs epoch ``loader.epoch`` and then advances ``loader.epoch`` by
    one, so a plain ``for epoch ...: for x, y in loader`` sees a new permutation every epoch.
    ``set_epoch(e)`` chooses the epoch of the next ``iter``; ``set_epoch(e, start_batch=k)`` (or
    ``iter_from(k)`` for the current epoch) skips the first ``k`` batches: the batches that follow
    are bit-identical to those of an uninterrupted epoch (for the gpu and torch backends, also when
    augmenting; ffcv draws its augmentation from its own unseeded RNG).

    Attributes: ``backend``, ``batch_size``, ``drop_last``, ``shuffle``, ``augment``
    (an :class:`AugmentSpec`), ``seed``, ``rank``, ``world_size``, ``device``, ``epoch``,
    ``dataset_size`` (samples in the whole split) and ``num_samples`` (samples this rank visits
    per epoch: ``ceil(dataset_size / world_size)``, shards are padded so every rank gets the same
    number; the last partial batch is dropped when ``drop_last``).
    """

    backend: str = "base"

    def __init__(self, *, dataset_size: int, batch_size: int, device, shuffle: bool = False,
                 augment: AugmentSpec = NO_AUGMENT, drop_last: bool = False, seed: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None):
        self.batch_size = check_positive_int(batch_size, "batch_size")
        if isinstance(seed, bool) or int(seed) != seed or int(seed) < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {seed!r}.")
        if not isinstance(augment, AugmentSpec):
            raise ConfigError(f"augment must be an AugmentSpec, got {augment!r}.")
        self.seed = int(seed)
        self.device = resolve_device(device)
        self.shuffle = bool(shuffle)
        self.augment = augment
        self.drop_last = bool(drop_last)
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.dataset_size = int(dataset_size)
        self.num_samples = math.ceil(self.dataset_size / self.world_size)
        self.epoch = 0
        self._start_batch = 0

    # -- sizes --------------------------------------------------------------------------------
    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def epoch_indices(self, epoch: Optional[int] = None) -> torch.Tensor:
        """Dataset indices this rank visits in ``epoch`` (CPU int64), in batch order, without the
        dropped tail when ``drop_last``."""
        epoch = self.epoch if epoch is None else int(epoch)
        idx = sample_order(self.dataset_size, shuffle=self.shuffle, seed=self.seed, epoch=epoch,
                           rank=self.rank, world_size=self.world_size)
        return idx[:len(self) * self.batch_size]

    # -- epochs and resume ----------------------------------------------------------------------
    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Run ``epoch`` on the next ``iter``, starting at batch ``start_batch``."""
        if isinstance(epoch, bool) or int(epoch) != epoch or int(epoch) < 0:
            raise ConfigError(f"epoch must be an integer >= 0, got {epoch!r}.")
        n = len(self)
        if isinstance(start_batch, bool) or int(start_batch) != start_batch \
                or not 0 <= int(start_batch) <= n:
            raise ConfigError(f"start_batch must be an integer in [0, {n}] (batches per epoch), "
                              f"got {start_batch!r}.")
        self.epoch = int(epoch)
        self._start_batch = int(start_batch)

    def iter_from(self, start_batch: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Iterate the current epoch from batch ``start_batch`` (resume after an interruption)."""
        self.set_epoch(self.epoch, start_batch)
        return iter(self)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self.epoch, self._start_batch
        self.epoch, self._start_batch = epoch + 1, 0
        return self._iterate(epoch, start)

    def _iterate(self, epoch: int, start_batch: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        aug = (f"pad={self.augment.pad},flip={self.augment.flip}" if self.augment.active
               else "none")
        return (f"{type(self).__name__}(backend={self.backend!r}, samples={self.num_samples}, "
                f"batch_size={self.batch_size}, batches={len(self)}, device={self.device}, "
                f"shuffle={self.shuffle}, augment={aug}, drop_last={self.drop_last}, "
                f"rank={self.rank}/{self.world_size})")
