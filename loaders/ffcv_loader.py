"""The "ffcv" backend: ``.beton`` writer and FFCV ``Loader`` pipelines.

``ffcv`` is optional: nothing here imports it until a beton is written or a loader is built, and
then a missing or broken install raises a ConfigError saying how to install it.

Beton layout
------------
Fields ``image`` (``RGBImageField(write_mode='raw')``: raw uint8 pixels, no JPEG loss) and
``label`` (``IntField``), in the dataset's original order. MNIST is grey: each image is stored
replicated to three identical channels in the RGB field (lossless: every stored channel equals
the original), and the loader keeps channel 0, so MNIST batches are N x 1 x 28 x 28 again.

Next to ``<name>.beton`` a sidecar ``<name>.beton.json`` records the format version, dataset,
split, limit, sample count and the sha256 of the source arrays; :func:`write_beton` skips the
write when the beton is valid and the sidecar matches the current source data.

Pipelines
---------
image: ``SimpleRGBImageDecoder`` -> [train: ``RandomTranslate(padding=4, fill=0)`` ->
``RandomHorizontalFlip(0.5)``, CIFAR-10 only] -> ``ToTensor`` -> ``ToDevice(non_blocking=True)``
-> ``ToTorchImage(channels_last=True)`` -> ``Convert(float32)``, then an in-place ``div_(255)``
(a device kernel, no host sync). label: ``IntDecoder`` -> ``ToTensor`` -> ``ToDevice``.

Order: a custom ``TraversalOrder`` that returns :func:`loaders.augment.sample_order` -- FFCV's
RANDOM (seeded per epoch) / SEQUENTIAL semantics, but with the DistributedSampler permutation and
an explicit ``rank``/``world_size``. That is FFCV's distributed mode (one shard per rank, same
padding as DistributedSampler) without requiring an initialised process group, and the sample
order equals the other backends'. FFCV's augmentations draw from numba's own (unseeded) RNG, so
they are not reproducible and differ from the gpu/torch backends' (same distribution).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import queue
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .errors import ConfigError, DataError

from .augment import NO_AUGMENT, AugmentSpec
from .base import EpochLoader
from .datasets import dataset_info, load_arrays

__all__ = ["write_beton", "beton_path", "validate_beton", "FfcvLoader", "ffcv_available",
           "require_ffcv", "FFCV_INSTALL_HINT", "BETON_FORMAT_VERSION"]

FFCV_INSTALL_HINT = ("install it with `apt-get install -y libturbojpeg0-dev libopencv-dev "
                     "pkg-config` and then `pip install .[ffcv]` (ffcv==1.0.2, numba, "
                     "opencv-python)")
BETON_FORMAT_VERSION = 1

_FFCV = None          # the imported ffcv namespace, once it worked
_FFCV_ERROR = None    # the import error, once it failed


class _Namespace:
    pass


def _import_ffcv():
    """Import the pieces of ffcv we use; raise ImportError (or any error) if that fails.

    Importing ffcv calls ``torch.set_num_threads(1)`` (its pipeline compiler's default), which would
    silently halve CPU training speed on two cores: the thread count is restored afterwards."""
    import importlib
    threads = torch.get_num_threads()
    try:
        importlib.import_module("ffcv")
    finally:
        torch.set_num_threads(threads)
    ns = _Namespace()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader
    from ffcv.traversal_order.base import TraversalOrder
    from ffcv.transforms import (Convert, RandomHorizontalFlip, RandomTranslate, ToDevice,
                                 ToTensor, ToTorchImage)
    from ffcv import types as ftypes
    from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter
    for k, v in dict(locals()).items():
        if k not in ("ns", "importlib"):
            setattr(ns, k, v)
    return ns


def require_ffcv():
    """The ffcv namespace, or a ConfigError with the install hint."""
    global _FFCV, _FFCV_ERROR
    if _FFCV is not None:
        return _FFCV
    try:
        _FFCV = _import_ffcv()
    except Exception as e:  # ImportError, or a broken native library (OSError, ...)
        _FFCV_ERROR = e
        raise ConfigError(f"the 'ffcv' backend needs the ffcv package, which cannot be imported "
                          f"here ({type(e).__name__}: {e}); {FFCV_INSTALL_HINT}. Or pick "
                          f"backend='gpu' or 'torch', which need no compiled dependency.") from e
    _FFCV_ERROR = None
    return _FFCV


def ffcv_available() -> bool:
    """True when ffcv can be imported (imports it, ~seconds the first time)."""
    try:
        require_ffcv()
        return True
    except ConfigError:
        return False


# ----------------------------------------------------------------------------------------------
# Validation of a beton, before FFCV reads it (FFCV itself fails late and obscurely)
# ----------------------------------------------------------------------------------------------
@dataclass
class BetonInfo:
    path: Path
    num_samples: int
    field_names: tuple
    image_shape: tuple       # (H, W, 3) when constant
    file_size: int


def validate_beton(path) -> BetonInfo:
    """Check the header, field table, metadata and allocation table of a beton against its size.

    Raises DataError naming the file for anything missing, truncated or malformed.
    """
    ff = require_ffcv()
    path = Path(path)
    fix = ("Delete it and write it again (loaders.write_beton / loaders.build(backend='ffcv') "
           "re-creates it from the source data).")
    if not path.is_file():
        raise DataError(f"{path}: beton file not found. Write it with loaders.write_beton(...) or "
                        f"let loaders.build(..., backend='ffcv', beton_dir=...) create it.")
    size = path.stat().st_size
    H, F, A = ff.ftypes.HeaderType, ff.ftypes.FieldDescType, ff.ftypes.ALLOC_TABLE_TYPE

    def bad(problem):
        return DataError(f"{path}: corrupt or truncated beton: {problem}. {fix}")

    try:
        if size < H.itemsize:
            raise bad(f"{size} bytes, smaller than the {H.itemsize}-byte header")
        header = np.fromfile(path, dtype=H, count=1)[0]
        version = int(header["version"])
        if version != ff.ftypes.CURRENT_VERSION:
            raise bad(f"header version {version}, expected FFCV format "
                      f"{ff.ftypes.CURRENT_VERSION} (not a beton, or written by another ffcv)")
        n, nf = int(header["num_samples"]), int(header["num_fields"])
        page, alloc_ptr = int(header["page_size"]), int(header["alloc_table_ptr"])
        if not 1 <= nf <= 64 or n < 1 or page < 1 or page & (page - 1):
            raise bad(f"implausible header (num_samples={n}, num_fields={nf}, page_size={page})")
        fields_end = H.itemsize + nf * F.itemsize
        if fields_end > size:
            raise bad(f"field table ends at byte {fields_end} but the file has {size} bytes")
        desc = np.fromfile(path, dtype=F, count=nf, offset=H.itemsize)
        handlers = ff.ftypes.get_handlers(desc)
        if any(h is None for h in handlers):
            raise bad("unknown field type in the field table")
        names = tuple(d["name"].tobytes().split(b"\x00")[0].decode("ascii", "replace")
                      for d in desc)
        want = {"image": ff.RGBImageField, "label": ff.IntField}
        for name, cls in want.items():
            if name not in names or not isinstance(handlers[names.index(name)], cls):
                raise bad(f"fields are {names}; expected 'image' (RGBImageField) and 'label' "
                          f"(IntField)")
        meta_type = ff.ftypes.get_metadata_type(handlers)
        meta_end = fields_end + n * meta_type.itemsize
        if meta_end > size or alloc_ptr > size or alloc_ptr < meta_end:
            raise bad(f"the header places the metadata at bytes {fields_end}-{meta_end} and the "
                      f"allocation table at byte {alloc_ptr}, but the file has {size} bytes")
        if (size - alloc_ptr) % A.itemsize:
            raise bad(f"allocation table size {size - alloc_ptr} is not a multiple of "
                      f"{A.itemsize} bytes")
        meta = np.fromfile(path, dtype=meta_type, count=n, offset=fields_end)
        img = meta[f"f{names.index('image')}"]
        alloc = np.fromfile(path, dtype=A, offset=alloc_ptr)
        if len(alloc) < n:
            raise bad(f"allocation table lists {len(alloc)} regions for {n} samples")
        if (alloc["sample_id"] >= n).any() or (alloc["ptr"] + alloc["size"] > alloc_ptr).any():
            raise bad("allocation table points outside the data region")
        h, w = img["height"].astype(np.int64), img["width"].astype(np.int64)
        raw = img["mode"] == 1
        end = img["data_ptr"].astype(np.int64) + np.where(raw, h * w * 3, 1)
        if (img["mode"] > 1).any() or (h < 1).any() or (w < 1).any() \
                or (img["data_ptr"] < meta_end).any() or (end > alloc_ptr).any():
            raise bad("image metadata (mode/size/data pointer) outside the data region")
        shape = (int(h[0]), int(w[0]), 3) if (h == h[0]).all() and (w == w[0]).all() else None
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: unreadable beton ({type(e).__name__}: {e}). {fix}") from e
    return BetonInfo(path=path, num_samples=n, field_names=names, image_shape=shape,
                     file_size=size)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def beton_path(dataset: str, split: str, out_dir, limit: Optional[int] = None) -> Path:
    """``<out_dir>/<dataset>_<split>[_n<limit>].beton``."""
    suffix = f"_n{int(limit)}" if limit is not None else ""
    return Path(out_dir) / f"{dataset_info(dataset).name}_{split}{suffix}.beton"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _source_hash(images: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(f"{images.shape}|{images.dtype}|{labels.shape}".encode())
    h.update(memoryview(np.ascontiguousarray(images)).cast("B"))
    h.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    return h.hexdigest()


class _RGBSource:
    """Indexable (image HWC uint8 with 3 channels, int label) view of the arrays for the writer.
    Grey images are replicated to 3 channels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = self.images[i]
        if img.shape[2] == 1:
            img = np.repeat(img, 3, axis=2)
        return np.ascontiguousarray(img), int(self.labels[i])


def write_beton(dataset: str, split: str, out_dir, data_dir=None, limit: Optional[int] = None,
                progress: bool = True, *, num_workers: Optional[int] = None) -> Path:
    """Write ``<out_dir>/<dataset>_<split>[_n<limit>].beton`` from :func:`load_arrays` data.

    Idempotent: when the beton exists, validates, and its sidecar JSON records the same format
    version, limit and sha256 of the source arrays, nothing is written. Writes go to a temporary
    file that is renamed into place, so an interrupted write never leaves a half beton behind.
    """
    ff = require_ffcv()
    info = dataset_info(dataset)
    arrays = load_arrays(info.name, split, data_dir, limit=limit)
    path = beton_path(info.name, split, out_dir, limit)
    record = {
        "format_version": BETON_FORMAT_VERSION,
        "dataset": info.name,
        "split": split,
        "limit": limit,
        "num_samples": len(arrays),
        "image_shape": list(arrays.images.shape[1:]),
        "channels": arrays.channels,
        "stored_channels": 3,
        "grey_replicated_to_rgb": arrays.channels == 1,
        "source": arrays.source,
        "source_sha256": _source_hash(arrays.images, arrays.labels),
    }
    side = _sidecar(path)
    if path.is_file() and side.is_file():
        try:
            old = json.loads(side.read_text())
        except (OSError, ValueError):
            old = None
        keys = ("format_version", "limit", "num_samples", "source_sha256", "channels")
        if old is not None and all(old.get(k) == record[k] for k in keys):
            try:
                if validate_beton(path).num_samples == len(arrays):
                    return path
            except DataError:
                pass  # corrupt: rewrite below
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if num_workers is None:
        num_workers = max(1, min(os.cpu_count() or 1, 8, math.ceil(len(arrays) / 2000)))
    writer = ff.DatasetWriter(str(tmp), {"image": ff.RGBImageField(write_mode="raw"),
                                         "label": ff.IntField()},
                              page_size=ff.MIN_PAGE_SIZE, num_workers=int(num_workers))
    quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    try:
        with quiet:
            writer.from_indexed_dataset(_RGBSource(arrays.images, arrays.labels), chunksize=256)
        validate_beton(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    side.write_text(json.dumps(record, indent=1))
    return path


def read_sidecar(path) -> Optional[dict]:
    side = _sidecar(Path(path))
    try:
        return json.loads(side.read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
_ORDER_CLASS = None


def _order_class(ff):
    """A TraversalOrder whose instances FFCV's Loader accepts (it calls ``order(loader)``)."""
    global _ORDER_CLASS
    if _ORDER_CLASS is None:
        class EpochOrder(ff.TraversalOrder):
            def __init__(self, owner: "FfcvLoader"):   # bound to a Loader later, in __call__
                self.owner = owner

            def __call__(self, loader):
                ff.TraversalOrder.__init__(self, loader)
                return self

            def sample_order(self, epoch: int):
                o = self.owner
                idx = o.epoch_indices(epoch)[o._ffcv_start * o.batch_size:]
                return idx.numpy().astype(np.uint64)
        _ORDER_CLASS = EpochOrder
    return _ORDER_CLASS


class FfcvLoader(EpochLoader):
    """FFCV ``Loader`` over a beton written by :func:`write_beton`.

    ``channels``: 1 for betons holding grey images replicated to RGB (MNIST), 3 otherwise; read
    from the sidecar when None. ``num_workers``: FFCV/numba threads (default: all cores). Note
    that FFCV sets ``torch.set_num_threads(num_workers)`` when iterating.
    """

    backend = "ffcv"

    def __init__(self, path, batch_size: int, device="cpu", *, shuffle: bool = False,
                 augment: AugmentSpec = NO_AUGMENT, drop_last: bool = False, seed: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None,
                 num_workers: Optional[int] = None, channels: Optional[int] = None,
                 batches_ahead: int = 3, os_cache: bool = True):
        ff = require_ffcv()
        self.path = Path(path)
        binfo = validate_beton(self.path)
        super().__init__(dataset_size=binfo.num_samples, batch_size=batch_size, device=device,
                         shuffle=shuffle, augment=augment, drop_last=drop_last, seed=seed,
                         rank=rank, world_size=world_size)
        if channels is None:
            side = read_sidecar(self.path) or {}
            channels = int(side.get("channels", 3))
        if channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3, got {channels!r}.")
        if binfo.image_shape is None:
            raise DataError(f"{self.path}: images of different sizes; this loader needs one size.")
        self.channels = channels
        self.image_shape = (channels,) + tuple(binfo.image_shape[:2])
        self.num_workers = int(num_workers) if num_workers else (os.cpu_count() or 1)
        self._ffcv_start = 0
        dev = self.device
        image_ops = [ff.SimpleRGBImageDecoder()]
        if augment.pad > 0:
            image_ops.append(ff.RandomTranslate(padding=augment.pad, fill=(0, 0, 0)))
        if augment.flip:
            image_ops.append(ff.RandomHorizontalFlip(0.5))
        image_ops += [ff.ToTensor(), ff.ToDevice(dev, non_blocking=True),
                      ff.ToTorchImage(channels_last=True), ff.Convert(torch.float32)]
        label_ops = [ff.IntDecoder(), ff.ToTensor(), ff.ToDevice(dev, non_blocking=True)]
        try:
            self._loader = ff.Loader(
                str(self.path), batch_size=self.batch_size, num_workers=self.num_workers,
                os_cache=os_cache, order=_order_class(ff)(self),
                distributed=self.world_size > 1, seed=self.seed,
                pipelines={"image": image_ops, "label": label_ops},
                drop_last=self.drop_last, batches_ahead=batches_ahead)
        except (DataError, ConfigError):
            raise
        except Exception as e:
            raise DataError(f"{self.path}: FFCV could not open the beton ({type(e).__name__}: "
                            f"{e}). Delete it and write it again with loaders.write_beton.") from e

    def _finish(self, x: torch.Tensor, y: torch.Tensor):
        if self.channels == 1:
            out = torch.empty((x.shape[0], 1) + tuple(x.shape[2:]), dtype=torch.float32,
                              device=x.device, memory_format=torch.channels_last)
            torch.div(x[:, :1], 255, out=out)
            x = out
        else:
            x = x.div_(255)
        # FFCV recycles its label buffers after a few batches; the copy keeps ours intact.
        return x, y.reshape(-1).clone()

    def _iterate(self, epoch: int, start_batch: int):
        self._ffcv_start = start_batch
        self._loader.next_epoch = epoch
        try:
            it = iter(self._loader)      # calls our sample_order(epoch) right away
        finally:
            self._ffcv_start = 0
        try:
            for x, y in it:
                yield self._finish(x, y)
        finally:
            _stop_epoch_iterator(it)


def _stop_epoch_iterator(it, timeout: float = 60.0) -> None:
    """Stop FFCV's producer thread and wait for it.

    ``EpochIterator.close`` only sets a flag that the thread checks when its output queue stays
    full; a thread left running inside numba's thread pool at interpreter exit aborts the process
    ("terminate called without an active exception"). Join it; if it is blocked putting the
    end-of-epoch marker into a full queue, make room.
    """
    it.close()
    deadline = time.monotonic() + timeout
    while it.is_alive() and time.monotonic() < deadline:
        it.join(timeout=0.6)
        if it.is_alive():
            try:
                it.output_queue.get_nowait()
            except queue.Empty:
                pass
