"""The three loader backends, their shared augmentation, resume, sharding and the ffcv writer.

CPU only, real data (small subsets). FFCV compiles its pipelines with numba on first use (seconds
each), so ffcv loaders are shared through module fixtures where a test only reads them.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler, Subset

import loaders
from fastrobust.errors import ConfigError, DataError
from loaders import bench, ffcv_loader
from loaders.augment import (AugmentSpec, _augment_numpy, _augment_torch, augment_batch,
                             batch_generator, sample_order)
from loaders.torch_loader import TorchLoader

REPO = Path(__file__).resolve().parents[1]
# Skip the ffcv tests only where ffcv is not installed at all; an install that is present but
# broken must fail them.
needs_ffcv = pytest.mark.skipif(importlib.util.find_spec("ffcv") is None,
                                reason="ffcv not installed (pip install .[ffcv])")
N = 512          # samples in the subsets
BS = 100         # 512 = 5 * 100 + 12: the last batch is partial
FFCV_THREADS = 2


# ---------------------------------------------------------------------------------------------
# helpers and fixtures
# ---------------------------------------------------------------------------------------------
def collect(loader, it=None):
    xs, ys = [], []
    for x, y in (loader if it is None else it):
        xs.append(x.clone())
        ys.append(y.clone())
    return xs, ys


def cat(loader, it=None):
    xs, ys = collect(loader, it)
    return torch.cat(xs), torch.cat(ys)


def to_u8(x: torch.Tensor) -> torch.Tensor:
    """Float [0, 1] images back to their uint8 values (exact for k / 255)."""
    return (x * 255).round().to(torch.uint8)


def keys(x: torch.Tensor):
    """One hashable key per image (its uint8 pixels)."""
    u = to_u8(x).permute(0, 2, 3, 1).reshape(x.shape[0], -1).numpy()
    return [r.tobytes() for r in u]


def array_keys(images: np.ndarray):
    return [r.tobytes() for r in np.ascontiguousarray(images).reshape(len(images), -1)]


def build(backend, dataset="cifar10", split="test", *, data_dir, beton_dir=None, **kw):
    kw.setdefault("limit", N)
    if backend == "torch":
        kw.setdefault("num_workers", 0)
    if backend == "ffcv":
        kw.setdefault("num_workers", FFCV_THREADS)
    return loaders.build(dataset, split, kw.pop("batch_size", BS), "cpu", backend=backend,
                         data_dir=data_dir, beton_dir=beton_dir, **kw)


@pytest.fixture(scope="module")
def beton_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("betons")


@pytest.fixture(scope="module")
def cifar(data_dir):
    return loaders.load_arrays("cifar10", "test", data_dir, limit=N)


@pytest.fixture(scope="module")
def cifar_train(data_dir):
    return loaders.load_arrays("cifar10", "train", data_dir, limit=N)


@pytest.fixture(scope="module")
def ffcv_train_plain(data_dir, beton_dir):
    """ffcv on the train subset: shuffled, no augmentation (so batches can be compared)."""
    return build("ffcv", split="train", augment=False, data_dir=data_dir, beton_dir=beton_dir)


# ---------------------------------------------------------------------------------------------
# the shared augmentation and order
# ---------------------------------------------------------------------------------------------
def _reference_augment(x, shifts, flips):
    """Independent definition: zero-pad, crop at (pad + ty, pad + tx), then flip."""
    out = []
    p = int(shifts.abs().max())
    _, _, h, w = x.shape
    for i in range(x.shape[0]):
        padded = F.pad(x[i], (p, p, p, p))
        ty, tx = int(shifts[i, 0]), int(shifts[i, 1])
        crop = padded[:, p + ty:p + ty + h, p + tx:p + tx + w]
        out.append(crop.flip(-1) if flips[i] else crop)
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_augment_matches_reference(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (40, 3, 9, 11), generator=g, dtype=torch.uint8).to(dtype)
    if dtype.is_floating_point:
        x = x / 255
    x = x.contiguous(memory_format=torch.channels_last) if dtype == torch.uint8 else x
    spec = AugmentSpec(pad=3, flip=True)
    shifts = torch.randint(-3, 4, (40, 2), generator=g)
    flips = torch.rand(40, generator=g) < 0.5
    ref = _reference_augment(x, shifts, flips)
    for impl in (_augment_numpy, _augment_torch):
        out = impl(x, shifts, flips)
        assert out.dtype == dtype and out.shape == x.shape
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(out, ref), impl.__name__
    # drawn from a generator: same seed -> same result; flips and shifts both used
    a = augment_batch(x, spec, batch_generator(0, 1, 2))
    b = augment_batch(x, spec, batch_generator(0, 1, 2))
    c = augment_batch(x, spec, batch_generator(0, 1, 3))
    assert torch.equal(a, b) and not torch.equal(a, c)
    s, f = loaders.augment.draw_params(4000, spec, batch_generator(0, 0, 0))
    assert s.min() == -3 and s.max() == 3 and 0.45 < f.float().mean() < 0.55


@pytest.mark.parametrize("n", [10, 11])
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("shuffle", [False, True])
def test_sample_order_is_distributed_sampler(n, world_size, shuffle):
    for rank in range(world_size):
        ds = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=shuffle,
                                seed=7, drop_last=False)
        for epoch in (0, 3):
            ds.set_epoch(epoch)
            ours = sample_order(n, shuffle=shuffle, seed=7, epoch=epoch, rank=rank,
                                world_size=world_size)
            assert ours.tolist() == list(ds)


# ---------------------------------------------------------------------------------------------
# factory
# ---------------------------------------------------------------------------------------------
def test_build_defaults(data_dir):
    tr = build("gpu", "cifar10", "train", data_dir=data_dir)
    te = build("gpu", "cifar10", "test", data_dir=data_dir)
    mn = build("gpu", "mnist", "train", data_dir=data_dir)
    assert tr.shuffle and tr.augment == AugmentSpec(pad=4, flip=True) and not tr.drop_last
    assert not te.shuffle and not te.augment.active and not te.drop_last
    assert mn.shuffle and not mn.augment.active                  # MNIST: no augmentation
    for ld in (tr, te, mn):
        assert ld.num_samples == N and ld.batch_size == BS and len(ld) == 6
        assert ld.backend == "gpu" and (ld.rank, ld.world_size) == (0, 1)
    assert build("gpu", data_dir=data_dir, drop_last=True).__len__() == 5


def test_build_validation(data_dir):
    with pytest.raises(ConfigError, match="batch_size"):
        build("gpu", batch_size=0, data_dir=data_dir)
    with pytest.raises(ConfigError, match="unknown backend 'fccv'.*'ffcv'"):
        build("fccv", data_dir=data_dir)
    with pytest.raises(ConfigError, match="unknown split"):
        build("gpu", split="valid", data_dir=data_dir)
    with pytest.raises(ConfigError, match="rank"):
        build("gpu", rank=2, world_size=2, data_dir=data_dir)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            loaders.build("mnist", "test", 8, "cuda", data_dir=data_dir, limit=8)
    ld = build("gpu", data_dir=data_dir)
    with pytest.raises(ConfigError, match="start_batch"):
        ld.set_epoch(0, start_batch=7)
    with pytest.raises(ConfigError, match="augment"):
        build("gpu", augment="yes", data_dir=data_dir)


def test_auto_picks_gpu_on_cpu_and_logs(data_dir, caplog):
    with caplog.at_level("INFO", logger="fastrobust.loaders"):
        ld = build("auto", data_dir=data_dir)
    assert ld.backend == "gpu"
    assert any("auto picked backend 'gpu'" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------
# gpu and torch: output format, identical augmentation, order, resume, sharding
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["gpu", "torch"])
def test_train_batches_well_formed(backend, data_dir):
    ld = build(backend, split="train", data_dir=data_dir)
    xs, ys = collect(ld)
    assert [len(y) for y in ys] == [BS] * 5 + [N - 5 * BS] and len(ld) == 6
    for x, y in zip(xs, ys):
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32)
        assert x.is_contiguous(memory_format=torch.channels_last) and x.device.type == "cpu"
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        assert y.dtype == torch.int64 and y.shape == (x.shape[0],)
        assert 0 <= int(y.min()) and int(y.max()) <= 9


def test_gpu_and_torch_identical_with_augmentation(data_dir, cifar_train):
    gpu = build("gpu", split="train", data_dir=data_dir, seed=3)
    tor = build("torch", split="train", data_dir=data_dir, seed=3)
    tor_w = build("torch", split="train", data_dir=data_dir, seed=3, num_workers=2)
    epochs = []
    for epoch in (0, 1):
        for ld in (gpu, tor, tor_w):
            ld.set_epoch(epoch)
        g, t, tw = cat(gpu), cat(tor), cat(tor_w)
        assert torch.equal(g[0], t[0]) and torch.equal(g[1], t[1])
        assert torch.equal(g[0], tw[0]) and torch.equal(g[1], tw[1])
        epochs.append(g)
    assert not torch.equal(epochs[0][0], epochs[1][0])                 # new epoch, new batches
    other_seed = build("gpu", split="train", data_dir=data_dir, seed=4)
    assert not torch.equal(cat(other_seed)[0], epochs[0][0])
    # the augmentation really changed the images: compare with the same order un-augmented
    plain = build("gpu", split="train", data_dir=data_dir, seed=3, augment=False)
    x_plain, y_plain = cat(plain)
    assert torch.equal(y_plain, epochs[0][1])
    changed = (x_plain != epochs[0][0]).flatten(1).any(1).float().mean()
    assert changed > 0.9


@pytest.mark.parametrize("backend", ["gpu", "torch"])
@pytest.mark.parametrize("drop_last", [False, True])
def test_each_sample_once_per_epoch(backend, drop_last, data_dir, cifar_train):
    ld = build(backend, split="train", augment=False, drop_last=drop_last, data_dir=data_dir)
    _check_epoch_coverage(ld, cifar_train, drop_last)


def _check_epoch_coverage(ld, arrays, drop_last):
    xs, ys = collect(ld)
    assert len(xs) == len(ld)
    x, y = torch.cat(xs), torch.cat(ys)
    got = Counter(keys(x))
    want = Counter(array_keys(arrays.images))
    label_of = dict(zip(array_keys(arrays.images), arrays.labels.tolist()))
    assert [label_of[k] for k in keys(x)] == y.tolist()           # labels travel with images
    if not drop_last:
        assert got == want
    else:
        assert all(c == 1 for c in got.values()) and not (got - want)
        assert x.shape[0] == (N // BS) * BS and N - x.shape[0] < BS
    assert list(keys(x)) != array_keys(arrays.images)[:x.shape[0]]   # shuffled


@pytest.mark.parametrize("backend", ["gpu", "torch"])
def test_resume_bit_identical(backend, data_dir):
    ld = build(backend, split="train", data_dir=data_dir, seed=5)
    ld.set_epoch(2)
    full_x, full_y = collect(ld)
    assert ld.epoch == 3
    for k in (1, 4, 6):
        ld.set_epoch(2, start_batch=k)
        xs, ys = collect(ld)
        assert len(xs) == len(full_x) - k
        assert all(torch.equal(a, b) for a, b in zip(xs, full_x[k:]))
        assert all(torch.equal(a, b) for a, b in zip(ys, full_y[k:]))
    ld.set_epoch(2)
    xs, _ = collect(ld, ld.iter_from(3))
    assert all(torch.equal(a, b) for a, b in zip(xs, full_x[3:])) and len(xs) == 3


def test_epochs_advance_and_repeat(data_dir):
    ld = build("gpu", split="train", augment=False, data_dir=data_dir)
    e0, e1 = cat(ld)[1], cat(ld)[1]
    assert ld.epoch == 2 and not torch.equal(e0, e1)
    ld.set_epoch(0)
    assert torch.equal(cat(ld)[1], e0)


@pytest.mark.parametrize("backend", ["gpu", "torch"])
@pytest.mark.parametrize("n", [N, N - 1])
def test_distributed_shards(backend, n, data_dir, cifar_train):
    shards = [build(backend, split="train", augment=False, limit=n, rank=r, world_size=2,
                    data_dir=data_dir) for r in range(2)]
    assert [s.num_samples for s in shards] == [n // 2 + n % 2] * 2
    assert len(shards[0]) == len(shards[1])
    got = [Counter(keys(cat(s)[0])) for s in shards]
    everything = Counter(array_keys(cifar_train.images[:n]))
    assert set(got[0]) | set(got[1]) == set(everything)
    overlap = sum((got[0] & got[1]).values())
    assert overlap == (0 if n % 2 == 0 else 1)                      # padding repeats one sample


def test_distributed_gpu_equals_torch_with_augmentation(data_dir):
    for rank in range(2):
        kw = dict(split="train", rank=rank, world_size=2, seed=9, data_dir=data_dir)
        g, t = cat(build("gpu", **kw)), cat(build("torch", **kw))
        assert torch.equal(g[0], t[0]) and torch.equal(g[1], t[1])


def test_torch_backend_with_torchvision_dataset(data_dir):
    from torchvision.datasets import MNIST
    tv = Subset(MNIST(str(data_dir), train=False), range(N))
    t = cat(TorchLoader(tv, BS, "cpu", num_workers=0))
    g = cat(build("gpu", "mnist", "test", data_dir=data_dir))
    assert t[0].shape == (N, 1, 28, 28) and torch.equal(t[0], g[0]) and torch.equal(t[1], g[1])


# ---------------------------------------------------------------------------------------------
# all three backends agree
# ---------------------------------------------------------------------------------------------
@needs_ffcv
@pytest.mark.parametrize("dataset", ["cifar10", "mnist"])
def test_three_backends_same_test_batches(dataset, data_dir, beton_dir):
    arrays = loaders.load_arrays(dataset, "test", data_dir, limit=N)
    expect_x = torch.from_numpy(np.array(arrays.images)).permute(0, 3, 1, 2).float() / 255
    outs = {}
    for backend in ("gpu", "torch", "ffcv"):
        ld = build(backend, dataset, "test", data_dir=data_dir, beton_dir=beton_dir)
        assert ld.backend == backend and len(ld) == 6
        outs[backend] = collect(ld)
    for backend, (xs, ys) in outs.items():
        x, y = torch.cat(xs), torch.cat(ys)
        c = arrays.channels
        assert x.shape == (N, c) + arrays.images.shape[1:3], backend
        assert all(b.is_contiguous(memory_format=torch.channels_last) for b in xs), backend
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.equal(x, expect_x), backend          # MNIST via ffcv: round trip is exact
        assert y.tolist() == arrays.labels.tolist(), backend
        assert [len(b) for b in ys] == [BS] * 5 + [12]


@needs_ffcv
def test_ffcv_shuffled_order_matches_gpu(data_dir, ffcv_train_plain):
    gpu = build("gpu", split="train", augment=False, data_dir=data_dir)
    for epoch in (0, 1):
        gpu.set_epoch(epoch)
        ffcv_train_plain.set_epoch(epoch)
        g, f = cat(gpu), cat(ffcv_train_plain)
        assert torch.equal(g[0], f[0]) and torch.equal(g[1], f[1])


@needs_ffcv
@pytest.mark.parametrize("drop_last", [False, True])
def test_ffcv_each_sample_once(drop_last, data_dir, beton_dir, cifar_train, ffcv_train_plain):
    ld = ffcv_train_plain if not drop_last else build(
        "ffcv", split="train", augment=False, drop_last=True, data_dir=data_dir,
        beton_dir=beton_dir)
    ld.set_epoch(0)
    _check_epoch_coverage(ld, cifar_train, drop_last)


@needs_ffcv
def test_ffcv_resume(ffcv_train_plain):
    ld = ffcv_train_plain
    ld.set_epoch(4)
    full_x, full_y = collect(ld)
    ld.set_epoch(4, start_batch=2)
    xs, ys = collect(ld)
    assert len(xs) == len(full_x) - 2
    assert all(torch.equal(a, b) for a, b in zip(xs, full_x[2:]))
    assert all(torch.equal(a, b) for a, b in zip(ys, full_y[2:]))


@needs_ffcv
def test_ffcv_distributed_shards(data_dir, beton_dir, cifar_train):
    shards = [build("ffcv", split="train", augment=False, rank=r, world_size=2,
                    data_dir=data_dir, beton_dir=beton_dir) for r in range(2)]
    gpu = [build("gpu", split="train", augment=False, rank=r, world_size=2, data_dir=data_dir)
           for r in range(2)]
    got = []
    for f, g in zip(shards, gpu):
        fx, fy = cat(f)
        gx, gy = cat(g)
        assert len(f) == len(g) == 3 and torch.equal(fx, gx) and torch.equal(fy, gy)
        got.append(Counter(keys(fx)))
    assert not (got[0] & got[1])
    assert got[0] + got[1] == Counter(array_keys(cifar_train.images))


@needs_ffcv
def test_ffcv_augmentation_statistics(data_dir, beton_dir, cifar_train):
    """Each ffcv-augmented image must be its original translated by (ty, tx) in [-4, 4]^2 with
    zero fill and possibly flipped; flips ~ 1/2; shifts spread over the whole range."""
    # one numba thread: compiling the parallel version of this pipeline takes ~12 s here
    ld = build("ffcv", split="train", shuffle=False, data_dir=data_dir, beton_dir=beton_dir,
               num_workers=1)
    assert ld.augment == AugmentSpec(pad=4, flip=True)
    xs, ys = collect(ld)
    for x in xs:
        assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    x, y = torch.cat(xs), torch.cat(ys)
    assert y.tolist() == cifar_train.labels.tolist()
    aug = to_u8(x)
    orig = torch.from_numpy(np.array(cifar_train.images)).permute(0, 3, 1, 2)
    n = orig.shape[0]
    matches = torch.zeros(n, 9, 9, 2, dtype=torch.bool)
    expected_sum = torch.zeros(3, dtype=torch.float64)
    for ty in range(-4, 5):
        for tx in range(-4, 5):
            for f in (0, 1):
                cand = augment_batch(orig, AugmentSpec(4, True),
                                     shifts=torch.tensor([[ty, tx]]).expand(n, 2),
                                     flips=torch.full((n,), bool(f)))
                matches[:, ty + 4, tx + 4, f] = (cand == aug).flatten(1).all(1)
                expected_sum += cand.double().mean(dim=(0, 2, 3))
    assert matches.flatten(1).any(1).all(), "an image is not a +-4 px translate/flip of its source"
    unique = matches.flatten(1).sum(1) == 1
    assert unique.float().mean() > 0.9
    idx = matches[unique].flatten(1).float().argmax(1)
    ty, tx, flip = idx // 18 - 4, (idx // 2) % 9 - 4, idx % 2
    assert 0.4 < flip.float().mean() < 0.6
    for t in (ty, tx):
        assert set(t.tolist()) == set(range(-4, 5))                 # the full range is used
        assert abs(t.float().mean()) < 0.6
    # mean brightness: the zero fill darkens images exactly as the uniform shift law predicts
    expected_mean = expected_sum / (81 * 2) / 255
    observed = aug.double().mean(dim=(0, 2, 3)) / 255
    plain = orig.double().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(observed, expected_mean, atol=0.01)
    assert (plain - expected_mean).min() > 0.03                    # so the check has teeth


# ---------------------------------------------------------------------------------------------
# betons: corruption, idempotent writes, missing ffcv
# ---------------------------------------------------------------------------------------------
@needs_ffcv
def test_corrupt_beton(tmp_path, data_dir, beton_dir):
    good = loaders.write_beton("mnist", "test", beton_dir, data_dir=data_dir, limit=N,
                               progress=False)
    junk = tmp_path / "junk.beton"
    junk.write_bytes(np.random.default_rng(0).bytes(10_000))
    cut = tmp_path / "cut.beton"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    tiny = tmp_path / "tiny.beton"
    tiny.write_bytes(b"\x02\x00")
    for p in (junk, cut, tiny):
        with pytest.raises(DataError, match="corrupt or truncated beton") as e:
            loaders.FfcvLoader(p, 8, "cpu")
        assert str(p) in str(e.value) and "write it again" in str(e.value)
    with pytest.raises(DataError, match="not found"):
        loaders.FfcvLoader(tmp_path / "absent.beton", 8, "cpu")


def _small_root(root: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "cifar10-test.npz", images=rng.integers(0, 256, (40, 32, 32, 3), np.uint8),
             labels=rng.integers(0, 10, 40))
    return root


@needs_ffcv
def test_write_beton_idempotent(tmp_path, monkeypatch):
    root = _small_root(tmp_path / "data", seed=0)
    out = tmp_path / "betons"
    p = loaders.write_beton("cifar10", "test", out, data_dir=root, progress=False)
    assert p == out / "cifar10_test.beton"
    side = json.loads((out / "cifar10_test.beton.json").read_text())
    assert side["num_samples"] == 40 and side["limit"] is None and len(side["source_sha256"]) == 64
    stamp = p.stat().st_mtime_ns

    ns = ffcv_loader.require_ffcv()

    def no_write(*a, **k):
        raise AssertionError("write_beton rewrote a valid, up-to-date beton")
    monkeypatch.setattr(ns, "DatasetWriter", no_write)
    assert loaders.write_beton("cifar10", "test", out, data_dir=root, progress=False) == p
    assert p.stat().st_mtime_ns == stamp
    monkeypatch.undo()

    # changed source -> rewritten, with the new pixels
    _small_root(root, seed=1)
    loaders.write_beton("cifar10", "test", out, data_dir=root, progress=False)
    side2 = json.loads((out / "cifar10_test.beton.json").read_text())
    assert side2["source_sha256"] != side["source_sha256"]
    new = loaders.load_arrays("cifar10", "test", root)
    x, y = cat(loaders.FfcvLoader(p, 16, "cpu", num_workers=1))
    assert torch.equal(to_u8(x), torch.from_numpy(np.array(new.images)).permute(0, 3, 1, 2))
    assert y.tolist() == new.labels.tolist()

    # a damaged beton with an intact sidecar is rewritten too
    p.write_bytes(p.read_bytes()[:5000])
    loaders.write_beton("cifar10", "test", out, data_dir=root, progress=False)
    assert ffcv_loader.validate_beton(p).num_samples == 40
    # the limit is part of the name
    q = loaders.write_beton("cifar10", "test", out, data_dir=root, limit=7, progress=False)
    assert q.name == "cifar10_test_n7.beton" and ffcv_loader.validate_beton(q).num_samples == 7


@needs_ffcv
def test_mnist_beton_round_trip_exact(data_dir, beton_dir):
    arrays = loaders.load_arrays("mnist", "test", data_dir, limit=N)
    p = loaders.write_beton("mnist", "test", beton_dir, data_dir=data_dir, limit=N,
                            progress=False)
    side = json.loads(Path(str(p) + ".json").read_text())
    assert side["channels"] == 1 and side["stored_channels"] == 3
    x, y = cat(loaders.FfcvLoader(p, 128, "cpu", num_workers=1))   # channels from the sidecar
    assert x.shape == (N, 1, 28, 28)
    assert torch.equal(to_u8(x), torch.from_numpy(np.array(arrays.images)).permute(0, 3, 1, 2))
    assert y.tolist() == arrays.labels.tolist()


def test_missing_ffcv_is_config_error(monkeypatch, data_dir, tmp_path):
    monkeypatch.setitem(sys.modules, "ffcv", None)           # makes `import ffcv` fail
    monkeypatch.setattr(ffcv_loader, "_FFCV", None)
    for call in (lambda: build("ffcv", data_dir=data_dir, beton_dir=tmp_path),
                 lambda: loaders.write_beton("mnist", "test", tmp_path, data_dir=data_dir)):
        with pytest.raises(ConfigError) as e:
            call()
        msg = str(e.value)
        assert "pip install .[ffcv]" in msg and "libturbojpeg0-dev libopencv-dev pkg-config" in msg
    assert not loaders.ffcv_available()
    assert build("auto", data_dir=data_dir).backend == "gpu"
    assert not list(tmp_path.iterdir())


def test_import_and_auto_without_ffcv(data_dir):
    code = ("import sys; sys.modules['ffcv'] = None\n"
            "import loaders\n"
            f"ld = loaders.build('mnist', 'test', 32, 'cpu', data_dir={str(data_dir)!r}, limit=64)\n"
            "x, y = next(iter(ld))\n"
            "print(ld.backend, tuple(x.shape), loaders.ffcv_available())\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["gpu", "(32,", "1,", "28,", "28)", "False"]


# ---------------------------------------------------------------------------------------------
# benchmark plumbing (no timing assertions)
# ---------------------------------------------------------------------------------------------
def test_bench_rows(data_dir):
    """loaders.bench.window defines the case, fastrobust.bench.run_loader_bench times it (the shared
    interleaved timer): one row per backend, images counted per window, the loader / step ratio."""
    from fastrobust.bench import run_loader_bench
    w = bench.window("torch", "cpu", batch_size=64, batches=10, data_dir=data_dir, limit=256, num_workers=0)
    assert w.images == 10 * 64
    w()   # 10 batches from an epoch of 4 (256 / 64, drop_last): it crosses epoch boundaries
    rows = run_loader_bench("cpu", 64, ("gpu", "torch"), repeats=2, data_dir=data_dir, consumer=1.0,
                            dataset="cifar10", batches=3, limit=256, num_workers=0)
    assert [r["backend"] for r in rows] == ["gpu", "torch"]
    for r in rows:
        assert r["status"] == "ok" and r["batches_per_window"] * r["batch_size"] == 3 * 64 and r["img_per_s"] > 0
        assert r["windows"] == 2 and r["img_per_cpu_s"] > 0
        assert r["loader_over_step"] == r["img_per_s"]   # consumer: 1 img/s
    (only,) = run_loader_bench("cpu", 32, ("gpu",), repeats=1, data_dir=data_dir, batches=1, limit=64)
    assert only["status"] == "ok" and "loader_over_step" not in only   # no consumer, no ratio
    (missing,) = run_loader_bench("cpu", 32, ("nope",), repeats=1, data_dir=data_dir, batches=1, limit=64)
    assert missing["status"].startswith("unavailable: ConfigError: unknown backend 'nope'") and missing["img_per_s"] is None
    with pytest.raises(RuntimeError, match="loader yields no batches"):
        bench.window("gpu", "cpu", batch_size=128, batches=1, data_dir=data_dir, limit=64)()
