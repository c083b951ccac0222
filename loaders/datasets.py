"""Dataset discovery and decoding into in-memory uint8 arrays.

Every backend starts from :func:`load_arrays`, which returns an :class:`ArraySplit`: the whole
split as ``images`` (``np.uint8``, N x H x W x C, HWC, C = 1 for MNIST and 3 for CIFAR-10) and
``labels`` (``np.int64``, N), in the dataset's original order.

Data root
---------
:func:`resolve_data_dir` picks the root: the explicit ``data_dir`` argument, else the environment
variable ``FASTROBUST_DATA``, else ``./data``.

Search order (first match wins; a match that turns out to be corrupt is an error, never skipped)
--------------------------------------------------------------------------------------------------
``cifar10`` (split ``train`` / ``test``):

1. ``<root>/cifar-10-batches-py/``      torchvision's pickled batches (bit-exact originals),
   read through ``torchvision.datasets.CIFAR10`` (which checks their md5);
2. ``<root>/cifar10-npz/<split>.npz``    array format (below);
3. ``<root>/cifar10/<split>.npz``        array format;
4. ``<root>/cifar10-<split>.npz``        array format.

``mnist`` (split ``train`` / ``test``; the IDX prefix is ``train`` / ``t10k``):

1. ``<root>/MNIST/raw/<prefix>-images-idx3-ubyte`` and ``<prefix>-labels-idx1-ubyte``
   (torchvision's layout), each file uncompressed if present, else its ``.gz``;
2. ``<root>/mnist-npz/<split>.npz``;
3. ``<root>/mnist/<split>.npz``;
4. ``<root>/mnist-<split>.npz``.

The torchvision layouts come first because they hold the original pixels; the npz copies in the
project's shared data are JPEG-degraded for CIFAR-10 (see its README).

Array format (``.npz``)
-----------------------
A numpy ``.npz`` archive (``np.savez`` or ``np.savez_compressed``) with:

* ``images``: ``uint8``, shape N x H x W x C (HWC, RGB for CIFAR-10), values 0-255.
  For MNIST, N x 28 x 28 (no channel axis) is accepted too.
* ``labels``: any integer dtype, shape N, values in ``[0, num_classes)``.

Other keys (e.g. ``lossless``) are ignored. Pickled objects are refused (``allow_pickle=False``).

Errors
------
Anything wrong with the data raises :class:`fastrobust.errors.DataError` naming the file, the
problem and the fix: no dataset found (the message lists every path tried), corrupt or truncated
archives / IDX / gzip files, wrong shapes or dtypes, labels out of range or of the wrong length.
An unknown dataset or split name raises :class:`fastrobust.errors.ConfigError` with suggestions.
"""
from __future__ import annotations

import gzip
import os
import threading
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from .errors import ConfigError, DataError, unknown_name

__all__ = [
    "ArraySplit", "DatasetInfo", "DATASETS", "SPLITS", "resolve_data_dir", "load_arrays",
    "dataset_info", "clear_cache",
]

SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """Static metadata of a supported dataset."""
    name: str
    num_classes: int
    channels: int
    size: int                         # images are size x size
    num_samples: Dict[str, int]       # full split sizes
    mean: Tuple[float, ...]           # per-channel statistics of the training images (input normalisation)
    std: Tuple[float, ...]
    torchvision_class: str            # torchvision.datasets class that downloads it
    train_pad: int = 0                # the paper's training augmentation: random crop after zero padding,
    train_flip: bool = False          # and random horizontal flips

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        """HWC shape of one image."""
        return (self.size, self.size, self.channels)


DATASETS: Dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo("cifar10", num_classes=10, channels=3, size=32,
                           num_samples={"train": 50_000, "test": 10_000},
                           mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616),
                           torchvision_class="CIFAR10", train_pad=4, train_flip=True),
    "mnist": DatasetInfo("mnist", num_classes=10, channels=1, size=28,
                         num_samples={"train": 60_000, "test": 10_000},
                         mean=(0.1307,), std=(0.3081,), torchvision_class="MNIST"),
}


@dataclass
class ArraySplit:
    """One split of a dataset, fully decoded in memory.

    ``images``: uint8 N x H x W x C; ``labels``: int64 N. The arrays are read-only views of an
    in-process cache: copy them before writing to them.
    """
    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    source: str
    name: str
    split: str
    info: DatasetInfo = field(repr=False, default=None)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def channels(self) -> int:
        return int(self.images.shape[3])


def dataset_info(name: str) -> DatasetInfo:
    """Metadata for ``name``; unknown names raise ConfigError with suggestions."""
    key = str(name).lower()
    if key not in DATASETS:
        raise unknown_name("dataset", name, DATASETS)
    return DATASETS[key]


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise unknown_name("split", split, SPLITS)
    return split


def resolve_data_dir(data_dir=None) -> Path:
    """The data root: ``data_dir`` if given, else ``$FASTROBUST_DATA``, else ``./data``."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get("FASTROBUST_DATA")
    if env:
        return Path(env).expanduser()
    return Path("data")


# ----------------------------------------------------------------------------------------------
# In-process cache of decoded arrays. Key: the resolved file path(s) plus size and mtime, so a
# file rewritten in place is decoded again.
# ----------------------------------------------------------------------------------------------
_CACHE: Dict[tuple, Tuple[np.ndarray, np.ndarray]] = {}
_CACHE_LOCK = threading.Lock()


def clear_cache() -> None:
    """Forget every decoded split (frees the memory)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _file_key(p: Path) -> tuple:
    st = p.stat()
    return (str(p.resolve()), st.st_size, st.st_mtime_ns)


def _cached(key: tuple, loader: Callable[[], Tuple[np.ndarray, np.ndarray]]):
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
    if hit is not None:
        return hit
    images, labels = loader()
    images = np.ascontiguousarray(images)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    with _CACHE_LOCK:
        _CACHE[key] = (images, labels)
    return images, labels


# ----------------------------------------------------------------------------------------------
# Validation shared by every format
# ----------------------------------------------------------------------------------------------
def _validate(images, labels, info: DatasetInfo, where: str) -> Tuple[np.ndarray, np.ndarray]:
    """Check dtype, shape, label range; return (uint8 NHWC images, int64 labels)."""
    images = np.asarray(images)
    labels = np.asarray(labels)
    s, c = info.size, info.channels
    expected = f"N x {s} x {s} x {c} (HWC)"
    if images.dtype != np.uint8:
        hint = ""
        if np.issubdtype(images.dtype, np.floating):
            hint = (" If the values are floats in [0, 1], convert them with "
                    "np.clip(np.round(x * 255), 0, 255).astype(np.uint8).")
        raise DataError(f"{where}: images have dtype {images.dtype}, expected uint8 with values "
                        f"0-255.{hint} Rewrite the file with uint8 images.")
    if c == 1 and images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or tuple(images.shape[1:]) != (s, s, c):
        hint = ""
        if images.ndim == 4 and tuple(images.shape[1:]) == (c, s, s):
            hint = " The images look like NCHW; transpose them with x.transpose(0, 2, 3, 1)."
        raise DataError(f"{where}: images have shape {tuple(images.shape)}, expected {expected} "
                        f"for {info.name}.{hint} Rewrite the file with the expected shape.")
    if images.shape[0] == 0:
        raise DataError(f"{where}: the split is empty (0 images). Re-create or re-download it.")
    if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1:
        raise DataError(f"{where}: labels have dtype {labels.dtype} and shape "
                        f"{tuple(labels.shape)}, expected a 1-D integer array of length N. "
                        f"Rewrite the file with integer class labels.")
    if labels.shape[0] != images.shape[0]:
        raise DataError(f"{where}: length mismatch: {images.shape[0]} images but "
                        f"{labels.shape[0]} labels. The file is inconsistent or truncated; "
                        f"re-create or re-download it.")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= info.num_classes:
        raise DataError(f"{where}: labels out of range: found values in [{lo}, {hi}], expected "
                        f"[0, {info.num_classes - 1}] for {info.name}. Fix the labels or check "
                        f"that the file belongs to {info.name}.")
    return images, labels.astype(np.int64, copy=False)


# ----------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------
_NPZ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError,
               AttributeError, TypeError)


def _read_npz(path: Path, info: DatasetInfo) -> Tuple[np.ndarray, np.ndarray]:
    fix = f"Re-create it (np.savez_compressed(path, images=..., labels=...)) or re-download it."
    try:
        archive = np.load(path, allow_pickle=False)
    except _NPZ_ERRORS as e:
        raise DataError(f"{path}: not a readable .npz archive (corrupt or truncated zip: "
                        f"{type(e).__name__}: {e}). {fix}") from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: is a single .npy array, expected an .npz archive with keys "
                        f"'images' and 'labels'. {fix}")
    with archive:
        missing = [k for k in ("images", "labels") if k not in archive.files]
        if missing:
            raise DataError(f"{path}: missing key(s) {missing}; found {sorted(archive.files)}. "
                            f"The array format needs 'images' (uint8 N x H x W x C) and "
                            f"'labels' (integer N). {fix}")
        try:
            images = archive["images"]
            labels = archive["labels"]
        except _NPZ_ERRORS as e:
            raise DataError(f"{path}: corrupt or truncated member inside the .npz "
                            f"({type(e).__name__}: {e}). {fix}") from e
    return _validate(images, labels, info, str(path))


_IDX_MAGIC = {"images": 2051, "labels": 2049}


def _read_idx(path: Path, kind: str) -> np.ndarray:
    """Parse one MNIST IDX file (optionally gzipped) into a uint8 array."""
    fix = ("Delete it and restore the original file (torchvision.datasets.MNIST(root, "
           "download=True) or --download re-fetches it).")
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (gzip.BadGzipFile, EOFError, zlib.error, OSError) as e:
        what = "bad or truncated gzip" if path.suffix == ".gz" else "unreadable file"
        raise DataError(f"{path}: {what} ({type(e).__name__}: {e}). {fix}") from e
    ndim = 3 if kind == "images" else 1
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX file: {len(raw)} bytes, shorter than the "
                        f"{header}-byte header. {fix}")
    magic = int.from_bytes(raw[:4], "big")
    if magic != _IDX_MAGIC[kind]:
        raise DataError(f"{path}: not an IDX {kind} file (magic number {magic}, expected "
                        f"{_IDX_MAGIC[kind]}). {fix}")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        state = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DataError(f"{path}: {state} IDX file: header declares shape {tuple(dims)} "
                        f"({expected} bytes) but the data holds {len(raw)} bytes. {fix}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _read_mnist_idx(img_path: Path, lbl_path: Path, info: DatasetInfo):
    images = _read_idx(img_path, "images")
    labels = _read_idx(lbl_path, "labels")
    return _validate(images, labels, info, f"{img_path} + {lbl_path.name}")


def _read_cifar_torchvision(folder: Path, split: str, info: DatasetInfo):
    try:
        from torchvision.datasets import CIFAR10
        ds = CIFAR10(str(folder.parent), train=(split == "train"), download=False)
    except Exception as e:  # torchvision raises RuntimeError for missing/corrupt batches
        raise DataError(f"{folder}: torchvision could not load the CIFAR-10 batches "
                        f"({type(e).__name__}: {e}). A batch file is missing, truncated or fails "
                        f"its md5 check: delete the folder and download it again "
                        f"(download=True / --download), or use the npz array format.") from e
    return _validate(ds.data, np.asarray(ds.targets), info, str(folder))


# ----------------------------------------------------------------------------------------------
# Discovery
# ----------------------------------------------------------------------------------------------
@dataclass
class _Candidate:
    describe: str                                   # what was tried, for error messages
    probe: Callable[[], Optional[Tuple[tuple, Callable, str]]]   # -> (cache key, loader, source)


def _npz_candidate(path: Path, info: DatasetInfo) -> _Candidate:
    def probe():
        if not path.is_file():
            return None
        return (("npz",) + _file_key(path), lambda: _read_npz(path, info), str(path))
    return _Candidate(str(path), probe)


def _candidates(info: DatasetInfo, root: Path, split: str) -> List[_Candidate]:
    out: List[_Candidate] = []
    if info.name == "cifar10":
        folder = root / "cifar-10-batches-py"

        def probe_tv():
            if not folder.is_dir():
                return None
            files = sorted(folder.glob("*_batch*"))
            key = ("cifar-tv", split) + tuple(k for f in files for k in _file_key(f))
            return (key, lambda: _read_cifar_torchvision(folder, split, info), str(folder))
        out.append(_Candidate(f"{folder}/ (torchvision CIFAR10 batches)", probe_tv))
    else:
        raw = root / "MNIST" / "raw"
        prefix = "train" if split == "train" else "t10k"
        img = raw / f"{prefix}-images-idx3-ubyte"
        lbl = raw / f"{prefix}-labels-idx1-ubyte"

        def pick(p: Path) -> Optional[Path]:
            if p.is_file():
                return p
            gz = p.with_name(p.name + ".gz")
            return gz if gz.is_file() else None

        def probe_idx():
            pi, pl = pick(img), pick(lbl)
            if pi is None and pl is None:
                return None
            if pi is None or pl is None:
                have = pi if pi is not None else pl
                lack = lbl if pl is None else img
                raise DataError(f"{have}: found, but its partner {lack.name}[.gz] is missing "
                                f"from {raw}. Restore the missing file (MNIST needs both the "
                                f"images and the labels file) or re-download with download=True.")
            key = ("mnist-idx",) + _file_key(pi) + _file_key(pl)
            return (key, lambda: _read_mnist_idx(pi, pl, info), f"{pi} + {pl}")
        out.append(_Candidate(f"{img}[.gz] + {lbl.name}[.gz] (torchvision MNIST layout)",
                              probe_idx))
    name = info.name
    for p in (root / f"{name}-npz" / f"{split}.npz", root / name / f"{split}.npz",
              root / f"{name}-{split}.npz"):
        out.append(_npz_candidate(p, info))
    return out


def _torchvision_download(name: str, root: Path, split: str) -> None:
    """Let torchvision fetch ``name`` into ``root`` (separate function so tests can replace it)."""
    from torchvision import datasets as tvd
    cls = getattr(tvd, DATASETS[name].torchvision_class)
    root.mkdir(parents=True, exist_ok=True)
    cls(str(root), train=(split == "train"), download=True)


def _not_found(info: DatasetInfo, root: Path, split: str, tried: List[str],
               download_error: Optional[BaseException] = None) -> DataError:
    abs_root = root.absolute()
    state = "" if root.is_dir() else " (the folder does not exist)"
    lines = "\n".join(f"  - {t}" for t in tried)
    msg = (f"no {info.name} '{split}' data found under {abs_root}{state}. Tried, in order:\n"
           f"{lines}\n")
    if download_error is not None:
        msg += (f"Downloading with torchvision into {abs_root} failed too "
                f"({type(download_error).__name__}: {download_error}); the network may be "
                f"unreachable. ")
    msg += (f"Fix: point at the folder that holds the data with --data-dir DIR (data_dir=...) or "
            f"FASTROBUST_DATA=DIR, or download it (download=True / --download, needs network), "
            f"or place an .npz in the array format (see loaders.datasets) at one of the paths "
            f"above.")
    return DataError(msg)


def load_arrays(dataset: str, split: str, data_dir=None, *, download: bool = False,
                limit: Optional[int] = None) -> ArraySplit:
    """Load one split as uint8 NHWC images and int64 labels (see the module docstring).

    ``limit=n`` keeps the first ``n`` samples (all of them if the split is smaller).
    Decoded arrays are cached in-process, keyed by the resolved file path (and size/mtime).
    """
    info = dataset_info(dataset)
    split = _check_split(split)
    if limit is not None:
        if isinstance(limit, bool) or int(limit) != limit or int(limit) < 1:
            raise ConfigError(f"limit must be an integer >= 1 (or None for the full split), "
                              f"got {limit!r}.")
        limit = int(limit)
    root = resolve_data_dir(data_dir)

    def search():
        tried = []
        for cand in _candidates(info, root, split):
            tried.append(cand.describe)
            found = cand.probe()
            if found is not None:
                return found, tried
        return None, tried

    found, tried = search()
    if found is None and download:
        try:
            _torchvision_download(info.name, root, split)
        except Exception as e:
            raise _not_found(info, root, split, tried, download_error=e) from e
        found, tried = search()
    if found is None:
        raise _not_found(info, root, split, tried)
    key, loader, source = found
    images, labels = _cached(key, loader)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return ArraySplit(images=images, labels=labels, num_classes=info.num_classes, source=source,
                      name=info.name, split=split, info=info)
