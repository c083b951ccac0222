import pytest
import torch

from fastrobust.errors import ConfigError
from fastrobust.models import (NORMALIZATIONS, ModelSpec, create_model, list_models,
                               model_from_spec)

# Parameter counts of the published CIFAR-10 architectures (10 classes, 3x32x32 inputs):
# ResNet-18 and VGG-16-BN as in the TRADES/MART code bases, PreAct ResNet-18 of Rice et al. (2020),
# WRN-34-10 of the TRADES paper, and the TRADES SmallCNN on MNIST.
PUBLISHED = {("resnet18", "cifar10"): 11_173_962, ("vgg16", "cifar10"): 14_728_266,
             ("preact_resnet18", "cifar10"): 11_172_170, ("wrn34_10", "cifar10"): 46_160_474,
             ("smallcnn", "mnist"): 312_202}


def _parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,dataset", sorted(PUBLISHED))
def test_parameter_counts_match_published(name, dataset):
    assert _parameters(create_model(name, dataset=dataset)) == PUBLISHED[(name, dataset)]


def test_resnet18_is_about_11_2m():
    assert abs(_parameters(create_model("resnet18", dataset="cifar10")) - 11.2e6) < 0.05e6


@pytest.mark.parametrize("name", [n for n in list_models() if n != "wrn34_10"])
@pytest.mark.parametrize("chans,size", [(3, 32), (1, 28)])
@pytest.mark.parametrize("classes", [7, 100])
def test_every_model_any_geometry(name, chans, size, classes):
    model = create_model(name, num_classes=classes, in_chans=chans, img_size=size).eval()
    x = torch.rand(2, chans, size, size)
    assert model(x).shape == (2, classes)


def test_wrn_on_mnist_geometry():
    model = create_model("wrn34_10", dataset="mnist").eval()
    assert model(torch.rand(1, 1, 28, 28)).shape == (1, 10)


def test_vgg16_pads_mnist_to_32():
    model = create_model("vgg16", dataset="mnist")
    pad = model.net.features[0]
    assert isinstance(pad, torch.nn.ZeroPad2d)
    assert pad(torch.zeros(1, 1, 28, 28)).shape[-2:] == (32, 32)


@pytest.mark.parametrize("name", ["resnet18", "vgg16", "smallcnn", "preact_resnet18"])
def test_channels_last_matches_contiguous(name):
    """The two layouts run different float32 convolution kernels, so they agree only up to rounding, which
    is bounded by each path's own float32 error (about 1e-6 on SmallCNN's logits of up to 2, 1e-8 on the
    others' logits of about 0.05). Measured on AVX-512, AVX2 and SSE4.1 kernels: at most 0.13 of the
    tolerance (SmallCNN, AVX2), at most 0.002 for the others."""
    ds = "mnist" if name == "smallcnn" else "cifar10"
    model = create_model(name, dataset=ds).eval()
    if name == "smallcnn":  # its last layer starts at zero, which would make the logits 0 on both sides
        torch.nn.init.normal_(model.net.classifier.fc3.weight, std=0.3)
    spec = model.spec
    x = torch.rand(4, spec.in_chans, spec.img_size, spec.img_size)
    ref = model(x)
    model_cl = model.to(memory_format=torch.channels_last)
    out = model_cl(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_normalisation_is_inside_the_model():
    model = create_model("smallcnn", dataset="mnist").eval()
    mean, std = NORMALIZATIONS["mnist"]
    x = torch.rand(3, 1, 28, 28)
    manual = model.net((x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1))
    torch.testing.assert_close(model(x), manual)


@pytest.mark.parametrize("dataset,norm,expected", [("mnist", None, "mnist"), ("mnist", "none", "none"),
                                                   ("cifar10", None, "cifar10"), (None, "cifar10", "cifar10"),
                                                   (None, None, "none")])
def test_normalisation_by_name(dataset, norm, expected):
    model = create_model("smallcnn", dataset=dataset, normalization=norm)
    stats = NORMALIZATIONS[expected] or ((0.0,) * model.spec.in_chans, (1.0,) * model.spec.in_chans)
    assert (model.spec.mean, model.spec.std) == stats
    torch.testing.assert_close(model.normalize.mean.flatten(), torch.tensor(stats[0]))


def test_explicit_mean_keeps_the_dataset_std():
    """An override of one statistic leaves the other at the dataset's value (not at 1)."""
    model = create_model("smallcnn", dataset="mnist", mean=(0.5,))
    assert model.spec.mean == (0.5,) and model.spec.std == NORMALIZATIONS["mnist"][1]
    model = create_model("smallcnn", dataset="mnist", std=(0.25,))
    assert model.spec.mean == NORMALIZATIONS["mnist"][0] and model.spec.std == (0.25,)


def test_bad_normalisation_is_rejected():
    with pytest.raises(ConfigError, match="cifar10"):
        create_model("resnet18", normalization="cifar")
    with pytest.raises(ConfigError, match="3 normalisation means given for 1 input channels"):
        create_model("smallcnn", dataset="mnist", normalization="cifar10")


def test_unknown_model_suggests_names():
    with pytest.raises(ConfigError, match="resnet18"):
        create_model("resnet-18")


def test_spec_round_trip_rebuilds_same_architecture():
    model = create_model("vgg16", num_classes=5, in_chans=1, img_size=28)
    clone = model_from_spec(ModelSpec.from_dict(model.spec.to_dict()))
    assert clone.spec == model.spec
    assert [k for k in clone.state_dict()] == [k for k in model.state_dict()]


@pytest.mark.parametrize("name", ["resnet18", "preact_resnet18"])
def test_activation_checkpointing_gives_same_gradients(name):
    import copy
    model = create_model(name, dataset="cifar10").train()
    ckpt = copy.deepcopy(model)
    ckpt.activation_checkpointing = True
    assert ckpt.activation_checkpointing and not model.activation_checkpointing
    x = torch.rand(4, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3])
    ref = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    got = torch.autograd.grad(torch.nn.functional.cross_entropy(ckpt(x), y), list(ckpt.parameters()))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for (k, a), b in zip(ckpt.state_dict().items(), model.state_dict().values()):  # running stats counted once
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=k)
