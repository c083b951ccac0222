"""README "Extending": each way to add a method, a model, an attack and a kernel is one registry entry, and
everything else (config, CLI flags and --help, checkpoints, evaluation, dispatch with its self-check) picks
it up. Each test adds a toy one in a temporary registry entry."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the toy kernel runs interpreted

import dataclasses
from typing import ClassVar

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from conftest import parse_train_config, train_config
from fastrobust import attacks, cli, models
from fastrobust.checkpoint import atomic_save, load_model
from fastrobust.config import EvalConfig, TrainConfig
from fastrobust.evaluate import evaluate
from fastrobust.methods import METHODS, Method, MethodOutput
from fastrobust.options import option
from fastrobust.step import TrainStep


@dataclasses.dataclass
class Blend(Method):
    """A toy method: (1 - w) CE(f(x), y) + w CE(f(x'), y), x' from uniform-start CE PGD."""
    name: ClassVar[str] = "blend"
    objective: ClassVar[str] = "ce"
    random_start: ClassVar[str] = "uniform"
    weight: float = option(0.5, "weight of the adversarial cross-entropy", low=0, high=1)

    def loss(self, model, x, y, adv, *, backend="auto", distributed=False):
        z, z_adv = model(x), model(adv.x_adv)
        loss = (1 - self.weight) * F.cross_entropy(z, y) + self.weight * F.cross_entropy(z_adv, y)
        return MethodOutput(loss, {}, z, z_adv)


def test_a_method_is_one_class(monkeypatch, capsys):
    monkeypatch.setitem(METHODS, "blend", Blend)
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    help_text = capsys.readouterr().out
    assert "--blend-weight" in help_text and "weight of the adversarial cross-entropy" in help_text
    cfg = parse_train_config(["--dataset", "mnist", "--model", "smallcnn", "--method", "blend",
                                  "--blend-weight", "0.25", "--eps", "0.3", "--attack-steps", "2",
                                  "--attack-step-size", "0.15"])
    assert cfg.method == Blend(weight=0.25)
    assert cfg.to_dict()["method"] == {"name": "blend", "weight": 0.25}
    assert TrainConfig.from_dict(cfg.to_dict()).validate() == cfg
    assert "blend weight must lie in [0, 1]" in str(pytest.raises(
        Exception, lambda: parse_train_config(["--method", "blend", "--blend-weight", "2"])).value)
    step = TrainStep(dataclasses.replace(cfg, device="cpu"), models.create_model("smallcnn", dataset="mnist"),
                     torch.device("cpu"))
    result = step(torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,)))
    assert result.failure is None and torch.isfinite(torch.tensor(result.loss))


def test_a_model_is_one_function(monkeypatch, tmp_path):
    def tiny(num_classes=10, in_chans=1, img_size=28):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_chans * img_size * img_size, num_classes))

    monkeypatch.setitem(models._REGISTRY, "tiny", tiny)
    assert "tiny" in models.list_models()
    cfg = parse_train_config(["--dataset", "mnist", "--model", "tiny", "--eps", "0.3"])
    model = models.create_model(cfg.model, dataset="mnist")
    assert model.spec.name == "tiny" and model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    path = atomic_save({"format": "fastrobust-checkpoint/1", "spec": model.spec.to_dict(), "model": model.state_dict()},
                       tmp_path / "tiny.pt")
    loaded, _ = load_model(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_a_kernel_is_one_registry_entry(monkeypatch):
    """A fused kernel and its reference, registered once: dispatch runs it, self-checked on first use, and
    under "auto" a wrong one falls back to the reference with a warning."""
    from kernels._common import lazy_jit, tl

    @lazy_jit
    def _double_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(out_ptr + offs, 2 * tl.load(x_ptr + offs, mask=mask), mask=mask)

    def fused(x):
        out = torch.empty_like(x)
        _double_kernel[(triton_cdiv(x.numel(), 64),)](x, out, x.numel(), BLOCK=64)
        return out

    def probe(x):
        t = torch.randn(3, *x.shape[1:])
        return float(((fused(t) - 2 * t.double()).abs() / (1e-6 + 1e-6 * t.abs())).max())

    toy = kernels.Kernel(reference=lambda x: 2 * x, fused=fused, shape_class=lambda x: tuple(x.shape[1:]),
                         probe=probe, examples=lambda *a: [])
    monkeypatch.setitem(kernels.KERNELS, "double", toy)
    from kernels.testing import self_check
    x = torch.randn(5, 7)
    with self_check():
        assert torch.equal(kernels.run("double", x, backend="triton"), 2 * x)
        (verdict,) = [v for v in kernels.self_check_report() if v["op"] == "double"]
        assert verdict["passed"] and verdict["shape_class"] == [7]
    broken = dataclasses.replace(toy, fused=lambda x: 3 * x, probe=lambda x: float("inf"))
    monkeypatch.setitem(kernels.KERNELS, "double", broken)
    monkeypatch.setattr(kernels.dispatch, "_resolve", lambda device_type, name: "triton")   # as "auto" on a GPU
    with self_check(), pytest.warns(RuntimeWarning, match="Triton double kernel failed its self-check"):
        assert torch.equal(kernels.run("double", x, backend="auto"), 2 * x)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(kw_only=True)
class Noise:
    """A toy attack: uniform noise in the L-inf ball (weak on purpose)."""
    eps: float
    name: str = "Noise"
    per_batch: ClassVar[bool] = True   # runs on every evaluated batch

    @classmethod
    def for_evaluation(cls, cfg: EvalConfig):
        return cls(eps=cfg.eps) if cfg.norm == "linf" else None

    @staticmethod
    def label(cfg: dict) -> str:
        return "Noise"

    @staticmethod
    def settings(cfg: dict) -> dict:
        return {"eps": cfg["eps"], "norm": cfg["norm"]}

    def __call__(self, model, x, y):
        return attacks.random_start(x, self.eps, "linf", "uniform")


@pytest.fixture
def noise_first_in_attacks():
    """ATTACKS runs from the weakest attack to the strongest: the toy attack goes in front."""
    original = dict(attacks.ATTACKS)
    attacks.ATTACKS.clear()
    attacks.ATTACKS.update({"noise": Noise, **original})
    yield
    attacks.ATTACKS.clear()
    attacks.ATTACKS.update(original)


def test_an_attack_is_one_class(noise_first_in_attacks, trained_smallcnn, mnist_test):
    cfg = EvalConfig(dataset="mnist", eps=0.3, attacks=("noise", "pgd"), pgd_step_size=0.03, num_samples=64,
                     aa_samples=0, sweep_samples=0, batch_size=64)
    r = evaluate(trained_smallcnn, mnist_test.images, mnist_test.labels, cfg, progress=False)
    assert set(r.ra) == {"noise", "pgd"} and r.ra["pgd"] <= r.ra["noise"]   # 0% against ~95%: any CPU
    # noise can turn a wrong point right, so its RA against NA is left to the evaluator's ordering check,
    # which allows two standard errors
    assert r.label("noise") == "Noise"
    # the registry's order sets the ordering checks: the new attack sits between PGD and NA
    ordering = {c.name: c.passed for c in r.checks if c.name.startswith("ordering")}
    assert ordering == {"ordering PGD-20 <= Noise": True, "ordering Noise <= NA": True}, r.checks
