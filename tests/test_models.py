import pytest
import torch

from fastrobust.errors import ConfigError
from fastrobust.models import (DATASET_STATS, ModelSpec, count_parameters, create_model, list_models,
                               model_from_spec)

# Parameter counts of the published CIFAR-10 architectures (10 classes, 3x32x32 inputs):
# ResNet-18 and VGG-16-BN as in the TRADES/MART code bases, PreAct ResNet-18 of Rice et al. (2020),
# WRN-34-10 of the TRADES paper, and the TRADES SmallCNN on MNIST.
PUBLISHED = {("resnet18", "cifar10"): 11_173_962, ("vgg16", "cifar10"): 14_728_266,
             ("preact_resnet18", "cifar10"): 11_172_170, ("wrn34_10", "cifar10"): 46_160_474,
             ("smallcnn", "mnist"): 312_202}


@pytest.mark.parametrize("name,dataset", sorted(PUBLISHED))
def test_parameter_counts_match_published(name, dataset):
    assert count_parameters(create_model(name, dataset=dataset)) == PUBLISHED[(name, dataset)]


def test_resnet18_is_about_11_2m():
    assert abs(count_parameters(create_model("resnet18", dataset="cifar10")) - 11.2e6) < 0.05e6


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
    ds = "mnist" if name == "smallcnn" else "cifar10"
    model = create_model(name, dataset=ds).eval()
    spec = model.spec
    x = torch.rand(4, spec.in_chans, spec.img_size, spec.img_size)
    ref = model(x)
    model_cl = model.to(memory_format=torch.channels_last)
    out = model_cl(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_normalisation_is_inside_the_model():
    model = create_model("smallcnn", dataset="mnist").eval()
    mean, std = DATASET_STATS["mnist"][:2]
    x = torch.rand(3, 1, 28, 28)
    manual = model.net((x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1))
    torch.testing.assert_close(model(x), manual)


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
