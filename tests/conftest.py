"""Shared fixtures. The suite is CPU-only; real data comes from ../shared/data (or FASTROBUST_DATA)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

# torch.compile's on-disk cache does not key its CPU kernels on the instruction set ATen runs with
# (ATEN_CPU_CAPABILITY): kernels compiled in an AVX-512 run and reused under a forced AVX2 run (or the
# reverse) give NaNs or corrupt memory. One cache per instruction set keeps runs of the suite with
# different ATEN_CPU_CAPABILITY settings apart; subprocesses inherit it.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.gettempdir()) / (
    "fastrobust-inductor-" + (os.environ.get("ATEN_CPU_CAPABILITY") or "native"))))

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def train_config(**values):
    """A TrainConfig from keyword values, not validated: the training attack's by their flat names too
    (``eps=0.3, attack_steps=1, attack_step_size=0.3, norm="l2"``), as a recipe's overrides give them."""
    from fastrobust.config import TrainConfig
    return TrainConfig.from_dict(values)


def parse_train_config(argv):
    """``fastrobust train`` flags -> a validated TrainConfig, as the CLI builds it (ConfigError for a bad
    value, SystemExit(2) from argparse for a malformed command line)."""
    import argparse

    from fastrobust.cli import add_train_flags, config_from_args
    parser = argparse.ArgumentParser(prog="fastrobust train")
    add_train_flags(parser)
    return config_from_args(parser.parse_args(list(argv))).validate()


def _data_dir() -> Path:
    env = os.environ.get("FASTROBUST_DATA")
    return Path(env) if env else (REPO.parent / "shared" / "data")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = _data_dir()
    if not d.is_dir():
        pytest.fail(f"test data not found at {d}: set FASTROBUST_DATA to the folder holding MNIST/ "
                    f"and cifar10-npz/ (CI uses ../shared/data)")
    return d


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


def random_smallcnn(seed: int = 0, num_classes: int = 10, batchnorm: bool = False):
    """A SmallCNN with a random (not zero) last layer, so input gradients are informative."""
    from fastrobust.models import create_model

    torch.manual_seed(seed)
    model = create_model("smallcnn", dataset="mnist", num_classes=num_classes)
    torch.nn.init.normal_(model.net.classifier.fc3.weight, std=0.3)
    if batchnorm:
        model.net.features.relu2 = torch.nn.Sequential(torch.nn.BatchNorm2d(32), torch.nn.ReLU())
    return model


@pytest.fixture
def small_model():
    return random_smallcnn()


@pytest.fixture(scope="session")
def mnist_test(data_dir):
    import loaders
    return loaders.load_arrays("mnist", "test", data_dir)


@pytest.fixture(scope="session")
def trained_smallcnn(data_dir):
    """SmallCNN after a short clean training run on real MNIST (a few seconds on 2 cores). Its NA on the
    first 1000 test images depends on the CPU's rounding (the run is chaotic): 96.9% on AVX-512, 93.9%
    with AVX2 forced (one thread). Tests that only need "a trained model" ask for NA > 80%: chance is 10%."""
    import loaders
    from fastrobust.models import create_model

    torch.manual_seed(0)
    train = loaders.load_arrays("mnist", "train", data_dir, limit=8192)
    x = torch.from_numpy(train.images.copy()).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(train.labels.copy()).long()
    model = create_model("smallcnn", dataset="mnist")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for epoch in range(2):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


class InfGradient(torch.autograd.Function):
    """Identity forward, infinite gradient: an fp16 overflow that no loss scale can fix."""
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")
