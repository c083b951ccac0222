"""loaders.datasets: real MNIST / CIFAR-10 and every way bad data must fail fast.

Expected values come from shared/data/README.md (counts, first labels), not from running the code.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import loaders
from fastrobust.errors import ConfigError, DataError
from loaders import datasets as lds

# README: per-class counts and first labels.
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
CIFAR_TRAIN_FIRST = [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
CIFAR_TEST_FIRST = [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]


def _write_npz(path: Path, images, labels, **extra) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, images=images, labels=labels, **extra)
    return path


def _cifar_like(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, 10, n).astype(np.uint8))


# ---------------------------------------------------------------------------------------------
# Real data
# ---------------------------------------------------------------------------------------------
def test_metadata():
    assert set(loaders.DATASETS) == {"cifar10", "mnist"}
    c, m = loaders.DATASETS["cifar10"], loaders.DATASETS["mnist"]
    assert (c.num_classes, c.channels, c.size) == (10, 3, 32)
    assert (m.num_classes, m.channels, m.size) == (10, 1, 28)


@pytest.mark.parametrize("split,n,counts", [("train", 60000, MNIST_TRAIN_COUNTS),
                                            ("test", 10000, MNIST_TEST_COUNTS)])
def test_mnist_real(data_dir, split, n, counts):
    a = loaders.load_arrays("mnist", split, data_dir)
    assert a.images.shape == (n, 28, 28, 1) and a.images.dtype == np.uint8
    assert a.labels.shape == (n,) and a.labels.dtype == np.int64
    assert np.bincount(a.labels, minlength=10).tolist() == counts
    assert a.num_classes == 10 and a.name == "mnist" and a.split == split
    assert "MNIST" in a.source and a.images.max() == 255 and a.images.min() == 0


@pytest.mark.parametrize("split,n,first", [("train", 50000, CIFAR_TRAIN_FIRST),
                                           ("test", 10000, CIFAR_TEST_FIRST)])
def test_cifar_real(data_dir, split, n, first):
    a = loaders.load_arrays("cifar10", split, data_dir)
    assert a.images.shape == (n, 32, 32, 3) and a.images.dtype == np.uint8
    assert a.labels.dtype == np.int64 and a.labels[:10].tolist() == first
    assert np.bincount(a.labels, minlength=10).tolist() == [n // 10] * 10
    assert a.source.endswith(f"cifar10-npz/{split}.npz")


def test_limit_keeps_first_samples(data_dir):
    full = loaders.load_arrays("cifar10", "test", data_dir)
    part = loaders.load_arrays("cifar10", "test", data_dir, limit=100)
    assert len(part) == 100 and part.images.shape == (100, 32, 32, 3)
    assert np.array_equal(part.images, full.images[:100])
    assert part.labels.tolist() == full.labels[:100].tolist()
    assert len(loaders.load_arrays("mnist", "test", data_dir, limit=10**9)) == 10000
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="limit"):
            loaders.load_arrays("mnist", "test", data_dir, limit=bad)


def test_cache_and_read_only(data_dir):
    a = loaders.load_arrays("mnist", "test", data_dir)
    b = loaders.load_arrays("mnist", "test", data_dir, limit=5)
    assert np.shares_memory(a.images, b.images)          # decoded once, served from the cache
    with pytest.raises(ValueError):
        a.images[0, 0, 0, 0] = 1                          # the cache cannot be corrupted


def test_resolve_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTROBUST_DATA", str(tmp_path / "env"))
    assert loaders.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert loaders.resolve_data_dir() == tmp_path / "env"
    monkeypatch.delenv("FASTROBUST_DATA")
    assert loaders.resolve_data_dir() == Path("data")


def test_env_var_is_used(monkeypatch, data_dir):
    monkeypatch.setenv("FASTROBUST_DATA", str(data_dir))
    assert len(loaders.load_arrays("mnist", "test", limit=3)) == 3


# ---------------------------------------------------------------------------------------------
# Array format and search order
# ---------------------------------------------------------------------------------------------
def test_npz_format_and_search_order(tmp_path):
    x1, y1 = _cifar_like(8, seed=1)
    x2, y2 = _cifar_like(9, seed=2)
    x3, y3 = _cifar_like(10, seed=3)
    _write_npz(tmp_path / "cifar10-test.npz", x3, y3)
    a = loaders.load_arrays("cifar10", "test", tmp_path)
    assert len(a) == 10 and np.array_equal(a.images, x3)
    _write_npz(tmp_path / "cifar10" / "test.npz", x2, y2)
    assert len(loaders.load_arrays("cifar10", "test", tmp_path)) == 9
    _write_npz(tmp_path / "cifar10-npz" / "test.npz", x1, y1, lossless=np.ones(8, bool))
    a = loaders.load_arrays("cifar10", "test", tmp_path)
    assert len(a) == 8 and np.array_equal(a.images, x1) and a.labels.tolist() == y1.tolist()
    assert a.labels.dtype == np.int64


def test_mnist_npz_without_channel_axis(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, 12)
    _write_npz(tmp_path / "mnist-npz" / "train.npz", x, y)
    a = loaders.load_arrays("mnist", "train", tmp_path)
    assert a.images.shape == (12, 28, 28, 1) and np.array_equal(a.images[..., 0], x)


def test_mnist_gz_only(tmp_path, data_dir):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(data_dir / "MNIST" / "raw" / name, raw / name)
    a = loaders.load_arrays("mnist", "test", tmp_path)
    b = loaders.load_arrays("mnist", "test", data_dir)
    assert a.source.endswith(".gz") and np.array_equal(a.images, b.images)
    assert np.array_equal(a.labels, b.labels)


# ---------------------------------------------------------------------------------------------
# Bad data fails fast, naming the file and the fix
# ---------------------------------------------------------------------------------------------
def test_missing_root_lists_tried_paths(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(DataError) as e:
        loaders.load_arrays("cifar10", "train", root)
    msg = str(e.value)
    for tried in ("cifar-10-batches-py", "cifar10-npz/train.npz", "cifar10/train.npz",
                  "cifar10-train.npz"):
        assert str(root / tried) in msg
    assert "does not exist" in msg
    assert "--data-dir" in msg and "FASTROBUST_DATA" in msg and "download" in msg
    with pytest.raises(DataError) as e:
        loaders.load_arrays("mnist", "test", tmp_path)
    assert str(tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte") in str(e.value)
    assert str(tmp_path / "mnist-test.npz") in str(e.value)


def test_random_bytes_npz(tmp_path):
    p = tmp_path / "cifar10-npz" / "test.npz"
    p.parent.mkdir()
    p.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(DataError, match="not a readable .npz") as e:
        loaders.load_arrays("cifar10", "test", tmp_path)
    assert str(p) in str(e.value) and "Re-create" in str(e.value)


def test_truncated_real_npz(tmp_path, data_dir):
    src = (data_dir / "cifar10-npz" / "test.npz").read_bytes()
    p = tmp_path / "cifar10-npz" / "test.npz"
    p.parent.mkdir()
    p.write_bytes(src[: len(src) // 2])
    with pytest.raises(DataError, match="corrupt or truncated") as e:
        loaders.load_arrays("cifar10", "test", tmp_path)
    assert str(p) in str(e.value)


def test_missing_key(tmp_path):
    x, _ = _cifar_like()
    p = tmp_path / "cifar10-npz" / "test.npz"
    p.parent.mkdir()
    np.savez(p, images=x, targets=np.zeros(16, int))
    with pytest.raises(DataError, match=r"missing key\(s\) \['labels'\]") as e:
        loaders.load_arrays("cifar10", "test", tmp_path)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("case,pattern", [
    ("shape", r"shape \(16, 31, 32, 3\), expected N x 32 x 32 x 3"),
    ("nchw", r"look like NCHW"),
    ("dtype", r"dtype float32, expected uint8"),
    ("range", r"labels out of range: found values in \[0, 10\]"),
    ("negative", r"labels out of range: found values in \[-1, "),
    ("length", r"length mismatch: 16 images but 15 labels"),
    ("label_dtype", r"labels have dtype float64"),
    ("empty", r"empty"),
])
def test_bad_arrays(tmp_path, case, pattern):
    x, y = _cifar_like()
    y = y.astype(np.int64)
    if case == "shape":
        x = x[:, :31]
    elif case == "nchw":
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    elif case == "dtype":
        x = x.astype(np.float32) / 255
    elif case == "range":
        y[3] = 10
    elif case == "negative":
        y[3] = -1
    elif case == "length":
        y = y[:15]
    elif case == "label_dtype":
        y = y.astype(np.float64)
    elif case == "empty":
        x, y = x[:0], y[:0]
    p = _write_npz(tmp_path / "cifar10-npz" / "train.npz", x, y)
    with pytest.raises(DataError, match=pattern) as e:
        loaders.load_arrays("cifar10", "train", tmp_path)
    assert str(p) in str(e.value)
    assert re.search(r"(?i)rewrite|re-create|fix the", str(e.value))   # says how to fix it


def _mnist_copy(tmp_path, data_dir, images_bytes=None, name="t10k-images-idx3-ubyte"):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    shutil.copy(data_dir / "MNIST" / "raw" / "t10k-labels-idx1-ubyte", raw)
    (raw / name).write_bytes(images_bytes)
    return raw / name


def test_truncated_idx(tmp_path, data_dir):
    src = (data_dir / "MNIST" / "raw" / "t10k-images-idx3-ubyte").read_bytes()
    p = _mnist_copy(tmp_path, data_dir, src[:100_000])
    with pytest.raises(DataError, match="truncated IDX file") as e:
        loaders.load_arrays("mnist", "test", tmp_path)
    assert str(p) in str(e.value) and "download" in str(e.value)


def test_idx_shorter_than_header(tmp_path, data_dir):
    p = _mnist_copy(tmp_path, data_dir, b"\x00\x00\x08")
    with pytest.raises(DataError, match="header") as e:
        loaders.load_arrays("mnist", "test", tmp_path)
    assert str(p) in str(e.value)


def test_idx_bad_magic(tmp_path, data_dir):
    labels = (data_dir / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").read_bytes()
    p = _mnist_copy(tmp_path, data_dir, labels)      # a labels file where images belong
    with pytest.raises(DataError, match="magic number 2049, expected 2051") as e:
        loaders.load_arrays("mnist", "test", tmp_path)
    assert str(p) in str(e.value)


def test_bad_gzip(tmp_path, data_dir):
    gz = (data_dir / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").read_bytes()
    p = _mnist_copy(tmp_path, data_dir, gz[: len(gz) // 3], name="t10k-images-idx3-ubyte.gz")
    with pytest.raises(DataError, match="gzip") as e:
        loaders.load_arrays("mnist", "test", tmp_path)
    assert str(p) in str(e.value)


def test_idx_wrong_image_size(tmp_path, data_dir):
    header = (2051).to_bytes(4, "big") + (10000).to_bytes(4, "big") + (27).to_bytes(4, "big") * 2
    p = _mnist_copy(tmp_path, data_dir, header + bytes(10000 * 27 * 27))
    with pytest.raises(DataError, match=r"shape \(10000, 27, 27, 1\)") as e:
        loaders.load_arrays("mnist", "test", tmp_path)
    assert str(p) in str(e.value)


def test_idx_label_count_mismatch(tmp_path, data_dir):
    header = (2051).to_bytes(4, "big") + (9999).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    _mnist_copy(tmp_path, data_dir, header + bytes(9999 * 28 * 28))
    with pytest.raises(DataError, match="length mismatch: 9999 images but 10000 labels"):
        loaders.load_arrays("mnist", "test", tmp_path)


def test_idx_partner_missing(tmp_path, data_dir):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    shutil.copy(data_dir / "MNIST" / "raw" / "t10k-labels-idx1-ubyte", raw)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.*missing") as e:
        loaders.load_arrays("mnist", "test", tmp_path)
    assert str(raw / "t10k-labels-idx1-ubyte") in str(e.value)


def test_torchvision_cifar_folder_corrupt(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="torchvision could not load") as e:
        loaders.load_arrays("cifar10", "train", tmp_path)
    assert str(folder) in str(e.value) and "download" in str(e.value)


def test_unknown_names(data_dir):
    with pytest.raises(ConfigError, match="unknown dataset 'cifar'.*'cifar10'"):
        loaders.load_arrays("cifar", "train", data_dir)
    with pytest.raises(ConfigError, match="unknown split 'tset'.*'test'"):
        loaders.load_arrays("mnist", "tset", data_dir)


def test_download_failure_is_data_error(tmp_path, monkeypatch):
    calls = []

    def fail(name, root, split):
        calls.append((name, root, split))
        raise OSError("network unreachable")
    monkeypatch.setattr(lds, "_torchvision_download", fail)
    with pytest.raises(DataError, match="network unreachable") as e:
        loaders.load_arrays("mnist", "train", tmp_path / "dl", download=True)
    assert calls == [("mnist", tmp_path / "dl", "train")]
    assert str(tmp_path / "dl") in str(e.value)
    with pytest.raises(DataError):                       # no download attempt without the flag
        loaders.load_arrays("mnist", "train", tmp_path / "dl")
    assert len(calls) == 1


def test_download_then_found(tmp_path, monkeypatch):
    x, y = _cifar_like(5)

    def fake(name, root, split):        # stands in for torchvision writing into the root
        _write_npz(root / f"{name}-{split}.npz", x, y)
    monkeypatch.setattr(lds, "_torchvision_download", fake)
    a = loaders.load_arrays("cifar10", "test", tmp_path, download=True)
    assert len(a) == 5 and np.array_equal(a.images, x)


def test_rewritten_file_is_reread(tmp_path):
    x, y = _cifar_like(6, seed=1)
    p = _write_npz(tmp_path / "cifar10-test.npz", x, y)
    assert np.array_equal(loaders.load_arrays("cifar10", "test", tmp_path).images, x)
    x2, y2 = _cifar_like(7, seed=2)
    _write_npz(p, x2, y2)
    assert np.array_equal(loaders.load_arrays("cifar10", "test", tmp_path).images, x2)
