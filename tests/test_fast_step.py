"""The fast training step gives the same losses as the plain one: compiled vs eager, Triton kernels
(interpreter) vs reference ops, bf16 autocast vs fp32; and training runs from the FFCV backend."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, for the kernel-path test

import copy
import json
from pathlib import Path

import pytest
import torch

import loaders
from conftest import random_smallcnn
from fastrobust.bench import run_step_bench, step_markdown
from fastrobust.config import TrainConfig
from fastrobust.train import TrainStep, train


def _cfg(**kw):
    base = dict(dataset="mnist", model="smallcnn", method="dtrades", eps=0.3, attack_steps=3, attack_step_size=0.1,
                lr=0.05, device="cpu")
    base.update(kw)
    return TrainConfig(**base).validate()


@pytest.fixture(scope="module")
def batches(data_dir):
    data = loaders.load_arrays("mnist", "train", data_dir, limit=128)
    x = torch.from_numpy(data.images.copy()).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(data.labels.copy()).long()
    return [(x[i:i + 32], y[i:i + 32]) for i in range(0, 128, 32)]


def _paired_steps(cfg_a, cfg_b, batches, share_attack):
    """Follow cfg_a's training trajectory; at every step evaluate both configurations from the same
    weights on the same batch. Yields (loss_a, loss_b, grads_a, grads_b) per step.

    Free-running trajectories are not compared: sign(grad) in the attack turns rounding-level
    differences in near-zero gradient components into whole steps, after which two runs diverge
    legitimately. Comparing from a shared state at every step checks the same loss curve without
    that chaos."""
    torch.manual_seed(0)
    model = random_smallcnn(0)
    model.net.classifier.drop.p = 0.0  # dropout draws would differ between the two paths
    a = TrainStep(cfg_a, copy.deepcopy(model), torch.device("cpu"))
    b = TrainStep(cfg_b, copy.deepcopy(model), torch.device("cpu"))
    for x, y in batches:
        b.model.load_state_dict(a.model.state_dict())
        results = []
        for step in (a, b):
            torch.manual_seed(1)
            if step is b and share_attack:
                adv = results[0][2]
            else:
                with step.autocast():
                    adv = step.method.attack(step.net, x, y)
            step.model.train()
            with step.autocast():
                loss = step.method.loss(step.net, x, y, adv).loss.float()
            grads = torch.autograd.grad(loss, list(step.model.parameters()))
            results.append((loss.detach(), grads, adv))
        yield results[0][0], results[1][0], results[0][1], results[1][1]
        for p, g in zip(a.model.parameters(), results[0][1]):
            p.grad = g
        a.opt.step()


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("method,tol", [("trades", 1e-5), ("dtrades", 3e-3)])
def test_compiled_step_matches_eager(batches, method, tol):
    """Norm-wise relative errors of loss and gradients. inductor fuses and reorders float32
    reductions, so agreement is to rounding; D-TRADES' exact sensitivity is an input-gradient norm,
    and a rounding-level change can flip a ReLU or max-pool switch on its path, so it gets a wider
    (stated) tolerance."""
    steps = list(_paired_steps(_cfg(method=method), _cfg(method=method, compile=True), batches, share_attack=True))
    for loss_e, loss_c, grads_e, grads_c in steps:
        assert _rel(loss_c, loss_e) < 1e-5
        assert max(_rel(gc, ge) for gc, ge in zip(grads_c, grads_e)) < tol


def test_compiled_attack_matches_eager_gradients(batches):
    """The compiled model's input gradients (what the attack follows) equal eager ones."""
    torch.manual_seed(0)
    model = random_smallcnn(0).eval()
    compiled = torch.compile(model)
    x, y = batches[0]
    grads = []
    for net in (model, compiled):
        xr = x.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(torch.nn.functional.cross_entropy(net(xr), y, reduction="sum"), xr)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)


def test_triton_kernels_match_reference_ops_in_training(batches):
    """The loss curve of a smoke run with the kernels on (Triton, interpreted on the CPU) and off."""
    curve = list(_paired_steps(_cfg(kernels="reference"), _cfg(kernels="triton"), batches, share_attack=False))
    ref = torch.stack([c[0] for c in curve])
    tri = torch.stack([c[1] for c in curve])
    torch.testing.assert_close(tri, ref, rtol=1e-5, atol=1e-6)
    for _, _, g_ref, g_tri in curve:
        for a, b in zip(g_tri, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_step_tracks_fp32(batches):
    # bf16 keeps 8 mantissa bits in the forwards (and its own attack); the loss heads accumulate in
    # fp32. Stated tolerance: each step's loss within 5% of the fp32 step's from the same weights.
    for loss_32, loss_16, _, _ in _paired_steps(_cfg(amp="off"), _cfg(amp="bf16"), batches, share_attack=False):
        torch.testing.assert_close(loss_16, loss_32, rtol=0.05, atol=0.0)


def test_training_from_ffcv_backend(tmp_path, data_dir):
    cfg = TrainConfig(dataset="mnist", model="smallcnn", method="trades", epochs=1, lr=0.01, lr_schedule="constant",
                      eps=0.3, attack_steps=2, attack_step_size=0.15, train_limit=256, batch_size=64, val_samples=64,
                      loader="ffcv", beton_dir=str(tmp_path / "betons"), out_dir=str(tmp_path / "run"),
                      progress=False, final_eval=False, data_dir=str(data_dir))
    summary = train(cfg)
    manifest = json.loads((Path(summary["out_dir"]) / "manifest.json").read_text())
    assert manifest["loader"] == "ffcv"
    assert list((tmp_path / "betons").glob("*.beton"))
    assert summary["history"][0]["val_na"] >= 0


def test_step_bench_reports_ratios(data_dir, tmp_path):
    report = run_step_bench(["trades", "dtrades"], ["smallcnn"], [16], "cpu", dataset="mnist",
                            sensitivities=("attack", "exact"), repeats=1, warmup=1, attack_steps=2,
                            data_dir=str(data_dir), progress=False)
    names = {r["variant"] for r in report["rows"]}
    assert {"trades", "trades eager ref", "dtrades[attack]", "dtrades[exact]"} <= names
    ratios = {r["ratio"]: r["value"] for r in report["ratios"]}
    assert {"dtrades[attack] / trades", "dtrades[exact] / trades", "trades fast / eager ref"} <= set(ratios)
    assert all(v > 0 for v in ratios.values())
    rows = {r["variant"]: r for r in report["rows"]}
    # the eager reference recomputes f(x) at every attack step and the clean forward twice: more FLOPs
    assert rows["trades eager ref"]["gflop_per_step"] > rows["trades"]["gflop_per_step"]
    assert rows["dtrades[exact]"]["gflop_per_step"] > rows["dtrades[attack]"]["gflop_per_step"]
    assert "Ratios" in step_markdown(report)


def test_nothing_we_import_changes_torch_threads():
    """ffcv sets torch's thread count to 1 on import: that would halve CPU training speed unnoticed."""
    from fastrobust.report import versions
    from loaders.ffcv_loader import require_ffcv

    before = torch.get_num_threads()
    require_ffcv()
    versions()
    assert torch.get_num_threads() == before
