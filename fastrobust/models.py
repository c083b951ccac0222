"""Model registry (timm-style): ``create_model(name, num_classes=, in_chans=, img_size=, mean=, std=)``.

Every model starts with a :class:`Normalize` layer, so attacks always work on inputs in [0, 1] and
the perturbation budget is measured in pixel space. The spec a model was built from travels with
it (``model.spec``) and is stored in checkpoints, so loading weights into another architecture or
class count is caught before any tensor is copied.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import loaders

from .errors import ConfigError, unknown_name

# Per-channel input normalisation (mean, std) by name: each dataset's training statistics (from the
# loaders' dataset registry, which also holds geometry and class counts), and "none" for models that
# take raw [0, 1] inputs (the official TRADES and MART models).
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {
    "none": None, **{name: (info.mean, info.std) for name, info in loaders.DATASETS.items()}}

# What a training run may ask for: "dataset" (the training dataset's own statistics) or a name above.
INPUT_NORMALIZATIONS = ("dataset", *NORMALIZATIONS)

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_classes: int
    in_chans: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        return cls(d["name"], int(d["num_classes"]), int(d["in_chans"]), int(d["img_size"]),
                   tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"]))


class Normalize(nn.Module):
    """(x - mean) / std as the model's first layer; inputs stay in [0, 1] for every attack."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ConfigError(f"normalisation needs one positive std per mean, got mean={mean}, std={std}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class RobustModel(nn.Module):
    """Normalize -> network. ``spec`` records how it was built.

    ``activation_checkpointing = True`` makes residual blocks (ResNet, PreAct ResNet, WRN) recompute
    their activations in the backward instead of storing them: less memory for one more forward."""

    def __init__(self, spec: ModelSpec, net: nn.Module):
        super().__init__()
        self.spec = spec
        self.normalize = Normalize(spec.mean, spec.std)
        self.net = net

    @property
    def activation_checkpointing(self) -> bool:
        return any(getattr(m, "checkpointed", False) for m in self.modules())

    @activation_checkpointing.setter
    def activation_checkpointing(self, on: bool) -> None:
        for m in self.modules():
            if isinstance(m, _Checkpointable):
                m.checkpointed = bool(on)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def create_model(name: str, *, num_classes: int | None = None, in_chans: int | None = None,
                 img_size: int | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, dataset: str | None = None,
                 normalization: str | None = None) -> RobustModel:
    """Build a registered model. ``dataset`` fills in whatever geometry and class count is not given
    explicitly (and, unless ``normalization`` names another entry of :data:`NORMALIZATIONS`, that
    dataset's normalisation); without it the defaults are 10 classes, 3x32x32, no scaling."""
    if name not in _REGISTRY:
        raise unknown_name("model", name, _REGISTRY)
    if normalization == "dataset":
        normalization = None   # the dataset's own, below
    if dataset is not None:
        info = loaders.dataset_info(dataset)
        num_classes = info.num_classes if num_classes is None else num_classes
        in_chans = info.channels if in_chans is None else in_chans
        img_size = info.size if img_size is None else img_size
        if normalization is None and in_chans == info.channels:
            normalization = info.name
    if normalization is not None:
        if normalization not in NORMALIZATIONS:
            raise unknown_name("input normalisation", normalization, NORMALIZATIONS)
        stats = NORMALIZATIONS[normalization]
        if stats is not None:  # per field: an explicit mean keeps the named std, and the reverse
            mean = stats[0] if mean is None else mean
            std = stats[1] if std is None else std
    num_classes = 10 if num_classes is None else int(num_classes)
    in_chans = 3 if in_chans is None else int(in_chans)
    img_size = 32 if img_size is None else int(img_size)
    if num_classes < 2:
        raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
    if img_size < 8:
        raise ConfigError(f"img_size must be >= 8, got {img_size}")
    mean = tuple(mean) if mean is not None else (0.0,) * in_chans
    std = tuple(std) if std is not None else (1.0,) * in_chans
    if len(mean) != in_chans:
        raise ConfigError(f"{len(mean)} normalisation means given for {in_chans} input channels (normalisation "
                          f"{normalization!r}); choose one for {in_chans}-channel inputs")
    spec = ModelSpec(name, num_classes, in_chans, img_size, mean, std)
    return RobustModel(spec, _REGISTRY[name](num_classes=num_classes, in_chans=in_chans, img_size=img_size))


def model_from_spec(spec: ModelSpec | dict) -> RobustModel:
    spec = spec if isinstance(spec, ModelSpec) else ModelSpec.from_dict(spec)
    return create_model(spec.name, num_classes=spec.num_classes, in_chans=spec.in_chans,
                        img_size=spec.img_size, mean=spec.mean, std=spec.std)


class _Checkpointable(nn.Module):
    """A block whose forward can be recomputed in the backward (torch.utils.checkpoint, non-reentrant,
    so input gradients for the attacks and double backward keep working)."""
    checkpointed = False

    def __call__(self, *args, **kwargs):
        if self.checkpointed and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint
            return checkpoint(self._forward_once, *args, use_reentrant=False, **kwargs)
        return super().__call__(*args, **kwargs)

    def _forward_once(self, *args, **kwargs):
        if torch._C._current_graph_task_id() == -1:  # the real forward
            return super().__call__(*args, **kwargs)
        # the recomputation inside the backward: batch norm must not count this batch a second time
        norms = [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
        for m in norms:
            m.momentum = 0.0
        try:
            return super().__call__(*args, **kwargs)
        finally:
            for m, (momentum, tracked) in zip(norms, saved):
                m.momentum = momentum
                m.num_batches_tracked.copy_(tracked)


# ----------------------------------------------------------------------------------------------
# ResNet-18 (CIFAR variant: 3x3 stem, no max-pool), He et al. 2016 as used by TRADES/MART/D-TRADES.

class BasicBlock(_Checkpointable):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(_Checkpointable):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class ResNet(nn.Module):
    """Four stages of two blocks; global average pooling makes it size-agnostic (32x32 and 28x28)."""

    def __init__(self, block, num_classes: int, in_chans: int, preact: bool = False):
        super().__init__()
        self.stem = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False)
        self.stem_bn = nn.Identity() if preact else nn.BatchNorm2d(64)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [block(cin, cout, stride), block(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.final_bn = nn.BatchNorm2d(512) if preact else nn.Identity()
        self.preact = preact
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        out = self.stem(x)
        if not self.preact:
            out = F.relu(self.stem_bn(out))
        out = self.layers(out)
        if self.preact:
            out = F.relu(self.final_bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


@register_model
def resnet18(num_classes: int = 10, in_chans: int = 3, img_size: int = 32) -> nn.Module:
    return ResNet(BasicBlock, num_classes, in_chans)


@register_model
def preact_resnet18(num_classes: int = 10, in_chans: int = 3, img_size: int = 32) -> nn.Module:
    return ResNet(PreActBlock, num_classes, in_chans, preact=True)


# ----------------------------------------------------------------------------------------------
# VGG-16 with BatchNorm (CIFAR variant: 13 conv layers, five 2x2 max-pools, one linear classifier).

_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


@register_model
def vgg16(num_classes: int = 10, in_chans: int = 3, img_size: int = 32) -> nn.Module:
    """Five halvings need a side divisible by 32. Smaller inputs (MNIST's 28x28) are zero-padded
    symmetrically up to the next multiple of 32 inside the network. Zero is MNIST's background
    value, so the padded digit is the same picture on a larger canvas and no pooling is changed."""
    layers: list[nn.Module] = []
    padded = -(-img_size // 32) * 32
    if padded != img_size:
        total = padded - img_size
        layers.append(nn.ZeroPad2d((total // 2, total - total // 2, total // 2, total - total // 2)))
    cin = in_chans
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            cin = v
    features = nn.Sequential(*layers)
    side = padded // 32
    return nn.Sequential(OrderedDict(features=features, flatten=nn.Flatten(),
                                     classifier=nn.Linear(512 * side * side, num_classes)))


# ----------------------------------------------------------------------------------------------
# SmallCNN: the 4-conv / 3-FC MNIST network of the TRADES paper (Zhang et al. 2019).

@register_model
def smallcnn(num_classes: int = 10, in_chans: int = 1, img_size: int = 28, drop: float = 0.5) -> nn.Module:
    side = ((img_size - 4) // 2 - 4) // 2  # two valid 3x3 convs, pool, two more, pool
    if side < 1:
        raise ConfigError(f"smallcnn needs img_size >= 14, got {img_size}")
    features = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(in_chans, 32, 3), relu1=nn.ReLU(),
        conv2=nn.Conv2d(32, 32, 3), relu2=nn.ReLU(), pool1=nn.MaxPool2d(2, 2),
        conv3=nn.Conv2d(32, 64, 3), relu3=nn.ReLU(),
        conv4=nn.Conv2d(64, 64, 3), relu4=nn.ReLU(), pool2=nn.MaxPool2d(2, 2)))
    classifier = nn.Sequential(OrderedDict(
        fc1=nn.Linear(64 * side * side, 200), relu1=nn.ReLU(), drop=nn.Dropout(drop),
        fc2=nn.Linear(200, 200), relu2=nn.ReLU(), fc3=nn.Linear(200, num_classes)))
    for m in features.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
            nn.init.zeros_(m.bias)
    # The TRADES reference starts from a zero last layer: uniform predictions at initialisation.
    nn.init.zeros_(classifier.fc3.weight)
    nn.init.zeros_(classifier.fc3.bias)
    return nn.Sequential(OrderedDict(features=features, flatten=nn.Flatten(), classifier=classifier))


# ----------------------------------------------------------------------------------------------
# WideResNet-34-10 (Zagoruyko & Komodakis 2016), the standard TRADES CIFAR-10 model: pre-activation
# blocks, as in PreAct ResNet, three stages of widths 160, 320, 640.

class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int, in_chans: int):
        super().__init__()
        if (depth - 4) % 6:
            raise ConfigError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.stem = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        blocks, cin = [], widths[0]
        for cout, stride in zip(widths[1:], (1, 2, 2)):
            for i in range(n):
                blocks.append(PreActBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        out = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


@register_model
def wrn34_10(num_classes: int = 10, in_chans: int = 3, img_size: int = 32) -> nn.Module:
    return WideResNet(34, 10, num_classes, in_chans)
