"""The input-normalisation option changes the input convention and nothing else.

A model with a mean/std first layer and one that takes raw [0, 1] inputs are the same function once the
normalisation is folded into the first convolution (exact for SmallCNN, whose first convolution has no
padding: a padded border would see 0 in normalised space, which is the mean in raw space). The option
is recorded where the run's meaning is: the checkpoint's model spec, the manifest, and every profile.
"""
from __future__ import annotations

import json

import pytest
import torch

import recipes
from fastrobust.checkpoint import load_checkpoint
from fastrobust.config import TrainConfig
from fastrobust.errors import ConfigError
from fastrobust.models import create_model, model_from_spec
from fastrobust.train import Trainer
from recipes.protocols import PROFILES
from conftest import train_config


def _pair(seed: int):
    torch.manual_seed(seed)
    normalised = create_model("smallcnn", dataset="mnist")
    torch.manual_seed(seed)
    raw = create_model("smallcnn", dataset="mnist", normalization="none")
    return normalised, raw


def test_the_option_changes_only_the_first_layer_statistics():
    normalised, raw = _pair(3)
    a, b = normalised.state_dict(), raw.state_dict()
    assert a.keys() == b.keys()
    differing = sorted(k for k in a if not torch.equal(a[k], b[k]))
    assert differing == ["normalize.mean", "normalize.std"]
    assert raw.spec.mean == (0.0,) and raw.spec.std == (1.0,)
    assert normalised.spec.mean != raw.spec.mean


def test_folding_the_normalisation_into_the_first_convolution_gives_the_same_function():
    normalised, raw = _pair(int(torch.randint(0, 2**31 - 1, ()).item()))
    normalised, raw = normalised.double().eval(), raw.double().eval()
    last = normalised.net.classifier.fc3   # zero at initialisation (the TRADES reference): give it values
    torch.nn.init.normal_(last.weight, std=0.1)
    torch.nn.init.normal_(last.bias, std=0.1)
    raw.load_state_dict({k: v for k, v in normalised.state_dict().items() if not k.startswith("normalize.")},
                        strict=False)
    mean, std = normalised.normalize.mean.double(), normalised.normalize.std.double()   # (1, C, 1, 1)
    conv_a, conv_b = normalised.net.features.conv1, raw.net.features.conv1
    with torch.no_grad():   # W (x - m) / s + b = (W / s) x + (b - sum W m / s)
        conv_b.weight.copy_(conv_a.weight / std.view(1, -1, 1, 1))
        conv_b.bias.copy_(conv_a.bias - (conv_a.weight * (mean / std).view(1, -1, 1, 1)).sum((1, 2, 3)))
    x = torch.rand(16, 1, 28, 28, dtype=torch.float64, requires_grad=True)
    out_a, out_b = normalised(x), raw(x)
    torch.testing.assert_close(out_a, out_b, rtol=1e-10, atol=1e-10)
    g_a, = torch.autograd.grad(out_a.square().sum(), x)
    g_b, = torch.autograd.grad(out_b.square().sum(), x)
    torch.testing.assert_close(g_a, g_b, rtol=1e-9, atol=1e-10)
    assert not torch.allclose(out_a, raw.net(normalised.normalize(x)))   # the folded layer really differs


def test_a_run_records_the_convention_in_checkpoint_and_manifest(tmp_path, data_dir):
    cfg = train_config(dataset="mnist", model="smallcnn", method="trades", input_normalization="none", epochs=1,
                      train_limit=256, val_samples=0, batch_size=128, attack_steps=1, attack_step_size=0.3, eps=0.3,
                      lr=0.01, out_dir=str(tmp_path / "run"), progress=False, final_eval=False, data_dir=str(data_dir))
    Trainer(cfg).fit()
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "final.pt")
    assert ckpt["spec"]["mean"] == (0.0,) or list(ckpt["spec"]["mean"]) == [0.0]
    assert model_from_spec(ckpt["spec"]).spec.std == (1.0,)   # eval and resume rebuild the raw-input model
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["config"]["input_normalization"] == "none"


def test_an_unknown_convention_is_refused_with_the_valid_names():
    with pytest.raises(ConfigError, match="input normalisation 'imagenet'.*none"):
        train_config(dataset="mnist", model="smallcnn", input_normalization="imagenet").validate()


# the one official code that normalises: AWP's AT script (after Rice et al.) feeds (x - mean) / std to its
# PreAct ResNet-18, with CIFAR-10's statistics; TRADES, MART, FAAL and TRADES-AWP feed ToTensor() straight in
NORMALISED_BY_THEIR_CODE = {("cifar10", "at_awp", "preact_resnet18")}


@pytest.mark.parametrize("profile", ["official", "paper", "cpu_eps03"])
def test_profiles_that_follow_the_official_code_normalise_as_it_does(profile):
    for cell in PROFILES[profile].cells:
        expected = "dataset" if cell in NORMALISED_BY_THEIR_CODE and profile == "official" else "none"
        assert recipes.make_config(*cell, profile).input_normalization == expected, cell
