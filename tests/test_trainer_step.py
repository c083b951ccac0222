"""The training step (fastrobust.step.TrainStep): its fast paths give the plain step's losses (compiled vs
eager, Triton kernels in the interpreter vs the reference ops, bf16 autocast vs fp32), its safety nets
(compile fallback, bf16 probation), training from the FFCV backend, the step benchmark's ratios and
FLOPs, and torch's thread count.

Across CPUs: each comparison runs both paths on one machine from the same weights on the same batch, so
what differs between AVX2 and AVX-512 is only which last bits each path rounds; every tolerance below
says why it covers that (norm-wise or per element as stated; the figures quoted were measured with
ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA forcing AVX-512, AVX2 and SSE4.1 on one machine).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, for the kernel-path test

import copy  # noqa: E402
import json  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import loaders  # noqa: E402
from conftest import random_smallcnn, train_config  # noqa: E402
from fastrobust import step as step_module  # noqa: E402
from fastrobust.bench import bench_methods, run_step_bench, step_markdown  # noqa: E402
from fastrobust.config import TrainConfig  # noqa: E402
from fastrobust.errors import ConfigError, NumericalError  # noqa: E402
from fastrobust.methods import METHODS, TRADES  # noqa: E402
from fastrobust.step import AMP_PROBATION_STEPS, TrainStep  # noqa: E402
from fastrobust.train import Trainer, train  # noqa: E402

CPU = torch.device("cpu")


def _cfg(method="dtrades", **kw):
    base = dict(dataset="mnist", model="smallcnn", method=METHODS[method](), eps=0.3, attack_steps=3,
                attack_step_size=0.1, lr=0.05, device="cpu")
    base.update(kw)
    return train_config(**base).validate()


@pytest.fixture(scope="module")
def batches(data_dir):
    data = loaders.load_arrays("mnist", "train", data_dir, limit=128)
    x = torch.from_numpy(data.images.copy()).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(data.labels.copy()).long()
    return [(x[i:i + 32], y[i:i + 32]) for i in range(0, 128, 32)]


def _paired_steps(cfg_a, cfg_b, batches, share_attack, dtype=torch.float32):
    """Follow cfg_a's training trajectory; at every step evaluate both configurations from the same
    weights on the same batch (model and images in ``dtype``). Yields (loss_a, loss_b, grads_a, grads_b)
    per step.

    Free-running trajectories are not compared: sign(grad) in the attack turns rounding-level
    differences in near-zero gradient components into whole steps, after which two runs diverge
    legitimately. Comparing from a shared state at every step checks the same loss curve without
    that chaos."""
    torch.manual_seed(0)
    model = random_smallcnn(0).to(dtype)
    model.net.classifier.drop.p = 0.0  # dropout draws would differ between the two paths
    a = TrainStep(cfg_a, copy.deepcopy(model), CPU)
    b = TrainStep(cfg_b, copy.deepcopy(model), CPU)
    for i, (x, y) in enumerate(batches):
        x = x.to(dtype)
        b.model.load_state_dict(a.model.state_dict())
        results = []
        for step in (a, b):
            adv = results[0][2] if step is b and share_attack else step.attack(x, y, i)
            loss = step.loss(x, y, adv).loss.float()
            grads = torch.autograd.grad(loss, list(step.model.parameters()))
            results.append((loss.detach(), grads, adv))
        yield results[0][0], results[1][0], results[0][1], results[1][1]
        for p, g in zip(a.model.parameters(), results[0][1]):
            p.grad = g
        a.opt.step()


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# -- fast paths against the plain step --------------------------------------------------------------

@pytest.mark.parametrize("dtype,loss_tol,grad_tol", [(torch.float64, 1e-12, {"trades": 1e-10, "dtrades": 1e-10}),
                                                     (torch.float32, 1e-5, {"trades": 1e-3, "dtrades": 3e-3})],
                         ids=["float64", "float32"])
@pytest.mark.parametrize("method", ["trades", "dtrades"])
def test_compiled_step_matches_eager(batches, method, dtype, loss_tol, grad_tol):
    """Norm-wise relative errors of the loss and of each parameter's gradient, the attack shared.

    inductor runs the same ATen convolutions and matmuls as eager and fuses and reorders the rest
    (loss heads, pointwise backward, the sums of the clean and adversarial branches' gradients), so the
    two differ by reassociation rounding only, amplified where the computation is ill-conditioned: a
    gradient that is a sum of ~10^6 nearly cancelling terms (SmallCNN's conv1.bias) and D-TRADES'
    min-max lambda, which divides by the spread of nearly equal entropies.
    float64 makes that exact by construction on any CPU: rounding 1e-16, so even 10^4 amplification
    stays below 1e-10 (measured 1e-15 on AVX-512, AVX2 and SSE4.1).
    float32, the precision that trains: the same rounding at 1e-7 amplified gives per-tensor errors up
    to 3.7e-5 (TRADES, conv1.bias, AVX2) and 4.3e-4 (D-TRADES, AVX-512) and which step shows it
    depends on the instruction set; the tolerances leave 7x-27x over those, and a miscompiled gradient
    (inductor's in-place buffer bug gave 3x) is far outside them. The loss itself is well-conditioned:
    1e-5 (measured <= 1.3e-6)."""
    cfgs = (_cfg(method), _cfg(method, compile=True))
    for loss_e, loss_c, grads_e, grads_c in _paired_steps(*cfgs, batches, share_attack=True, dtype=dtype):
        assert _rel(loss_c, loss_e) < loss_tol
        assert max(_rel(gc, ge) for gc, ge in zip(grads_c, grads_e)) < grad_tol[method]


def test_compiled_attack_matches_eager_gradients(batches):
    """The compiled model's input gradients (what the attack follows) equal eager ones, per element to
    rtol 1e-4 / atol 1e-7. In eval mode the compiled graph calls the same convolution and matmul
    kernels as eager and fuses only exact operations around them (bias, ReLU, max-pool, copies): measured
    bitwise equal on AVX-512, AVX2 and SSE4.1, so the tolerance only absorbs a reassociated sum should
    a CPU's kernels fuse differently."""
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
    """The loss curve of a smoke run with the kernels on (Triton, interpreted on the CPU) and off. Exact
    up to rounding by construction: both paths run the same attack (the PGD step is the reference op
    in both, so the adversarial batches are bitwise equal) and the loss heads are smooth functions of
    the same logits (no argmax or sign on the way), so only float32 reassociation differs (~1e-7);
    rtol 1e-5 on the loss and 1e-4 per gradient element hold on any instruction set."""
    curve = list(_paired_steps(_cfg(kernels="reference"), _cfg(kernels="triton"), batches, share_attack=False))
    ref = torch.stack([c[0] for c in curve])
    tri = torch.stack([c[1] for c in curve])
    torch.testing.assert_close(tri, ref, rtol=1e-5, atol=1e-6)
    for _, _, g_ref, g_tri in curve:
        for a, b in zip(g_tri, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_step_tracks_fp32(batches):
    """bf16 keeps 8 mantissa bits in the forwards (and in its own attack); the loss heads accumulate in
    fp32. Stated tolerance: each step's loss within 5% of the fp32 step's from the same weights. Across
    CPUs: bf16 rounding (2^-8 = 0.4% per operation) dominates every instruction set's float32 rounding
    by 10^4, so the error is bf16's own whatever the CPU; measured worst 1.2% (AVX-512 0.2%, AVX2 0.9%,
    SSE4.1 1.2%)."""
    for loss_32, loss_16, _, _ in _paired_steps(_cfg(amp="off"), _cfg(amp="bf16"), batches, share_attack=False):
        torch.testing.assert_close(loss_16, loss_32, rtol=0.05, atol=0.0)


# -- safety nets: compile fallback, bf16 probation --------------------------------------------------

class _FailsToCompile(nn.Module):
    """What torch.compile hands back when the backend cannot build the graph: it fails at the first call."""

    def forward(self, x):
        raise RuntimeError("backend='inductor' raised:\nCppCompileError: C++ compile error (injected by the test)")


def _small_run(tmp_path, data_dir, name, **kw):
    cfg = train_config(dataset="mnist", model="smallcnn", method=TRADES(), epochs=1, lr=0.01, lr_schedule="constant",
                      eps=0.3, attack_steps=1, attack_step_size=0.3, train_limit=64, batch_size=32, val_samples=0,
                      out_dir=str(tmp_path / name), progress=False, data_dir=str(data_dir), final_eval=False, **kw)
    return Trainer(cfg)


def test_compile_failure_falls_back_to_eager_once_with_a_note(tmp_path, data_dir, monkeypatch):
    """compile=None (auto, here made to compile on the CPU): the failed first step is retried eagerly
    from the same state, with exactly one RuntimeWarning, a note in TrainStep.notes and the manifest's
    "fallbacks"; the weights are then exactly those of an eager run (same process: exact)."""
    eager = _small_run(tmp_path, data_dir, "eager", compile=False)
    eager.fit()
    monkeypatch.setattr(step_module, "AUTO_COMPILE_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(step_module, "compile_model", lambda model, cfg: _FailsToCompile())
    trainer = _small_run(tmp_path, data_dir, "fallback")
    assert trainer.stepper.compile_pending
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit()
    runtime = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1, runtime
    assert runtime[0] == ("torch.compile failed on the first step (RuntimeError: backend='inductor' raised:); "
                          "training continues eagerly")
    assert trainer.stepper.notes == runtime and trainer.stepper.net is trainer.model
    manifest = json.loads((Path(trainer.cfg.out_dir) / "manifest.json").read_text())
    assert manifest["fallbacks"] == runtime
    for k, v in eager.model.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[k], v), k


def test_compile_failure_is_an_error_when_compile_was_requested(batches, monkeypatch):
    monkeypatch.setattr(step_module, "compile_model", lambda model, cfg: _FailsToCompile())
    step = TrainStep(_cfg("trades", compile=True), random_smallcnn(0), CPU)
    x, y = batches[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # an error, not a fallback warning
        with pytest.raises(ConfigError, match=r"torch.compile failed on this model and --compile was requested "
                                              r"\(RuntimeError: backend='inductor' raised:\).*--no-compile"):
            step(x, y)
    assert step.notes == []


class _InfUnderAutocast(nn.Module):
    """A model whose training forward overflows under CPU autocast (or always, with ``always``)."""

    def __init__(self, always=False):
        super().__init__()
        self.inner, self.always = random_smallcnn(0), always

    def forward(self, x):
        z = self.inner(x)
        if self.training and (self.always or torch.is_autocast_enabled("cpu")):
            return z * float("inf")
        return z


def _weights(step):
    return {k: v.clone() for k, v in step.model.state_dict().items()}


def test_bf16_probation_stops_a_loss_that_only_bf16_breaks(batches):
    x, y = batches[0]
    step = TrainStep(_cfg("trades", amp="bf16", attack_steps=1, attack_step_size=0.3), _InfUnderAutocast(), CPU)
    before = _weights(step)
    with pytest.raises(NumericalError, match=r"step 0: the loss is nan under bf16 autocast but \d.* in fp32 .*"
                                             r"Train with --amp off \(fp32\)"):
        step(x, y, step=0)
    assert all(torch.equal(v, step.model.state_dict()[k]) for k, v in before.items())
    # after the probation steps the same loss is an ordinary skipped step
    late = TrainStep(_cfg("trades", amp="bf16", attack_steps=1, attack_step_size=0.3), _InfUnderAutocast(), CPU)
    result = late(x, y, step=AMP_PROBATION_STEPS)
    assert result.failure == "loss is nan"


def test_bf16_probation_passes_a_loss_that_fp32_breaks_too(batches):
    """Not finite in fp32 either: not bf16's fault, so the ordinary skipped bad step, weights untouched."""
    x, y = batches[0]
    step = TrainStep(_cfg("trades", amp="bf16", attack_steps=1, attack_step_size=0.3), _InfUnderAutocast(True), CPU)
    before = _weights(step)
    result = step(x, y, step=0)
    assert result.failure == "loss is nan"
    assert all(torch.equal(v, step.model.state_dict()[k]) for k, v in before.items())


def test_bf16_probation_in_a_compiled_first_step_is_not_a_compile_failure(batches, monkeypatch):
    """The first compiled step runs under the fallback's guard; the probation's NumericalError must pass
    through it as itself, not be mistaken for a compile failure and retried."""
    monkeypatch.setattr(step_module, "AUTO_COMPILE_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(step_module, "compile_model", lambda model, cfg: model)   # "compiles" fine
    step = TrainStep(_cfg("trades", amp="bf16", attack_steps=1, attack_step_size=0.3), _InfUnderAutocast(), CPU)
    x, y = batches[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(NumericalError, match="--amp off"):
            step(x, y, step=0)
    assert step.notes == []


# -- loaders, benchmark, threads --------------------------------------------------------------------

def test_training_from_ffcv_backend(tmp_path, data_dir):
    cfg = train_config(dataset="mnist", model="smallcnn", method=TRADES(), epochs=1, lr=0.01, lr_schedule="constant",
                      eps=0.3, attack_steps=2, attack_step_size=0.15, train_limit=256, batch_size=64, val_samples=64,
                      loader="ffcv", beton_dir=str(tmp_path / "betons"), out_dir=str(tmp_path / "run"),
                      progress=False, final_eval=False, data_dir=str(data_dir))
    summary = train(cfg)
    manifest = json.loads((Path(summary["out_dir"]) / "manifest.json").read_text())
    assert manifest["loader"] == "ffcv"
    assert list((tmp_path / "betons").glob("*.beton"))
    assert summary["history"][0]["val_na"] >= 0 and summary["history"][0]["val_n"] == 64


def test_step_bench_reports_ratios_and_flops(data_dir):
    report = run_step_bench(bench_methods(["trades", "dtrades[attack]", "dtrades[exact]"]), ["smallcnn"], [16], "cpu",
                            dataset="mnist", repeats=1, warmup=1, attack_steps=2,
                            data_dir=str(data_dir), progress=False)
    names = {r["variant"] for r in report["rows"]}
    assert {"trades", "trades eager ref", "dtrades[attack]", "dtrades[exact]", "dtrades[exact] eager ref"} <= names
    ratios = {r["ratio"]: r for r in report["ratios"]}
    assert {"dtrades[attack] / trades", "dtrades[exact] / trades", "trades fast / eager ref"} <= set(ratios)
    assert all(r["wall"] > 0 and r["cpu"] > 0 for r in ratios.values())
    rows = {r["variant"]: r for r in report["rows"]}
    assert all(r["ms_median"] > 0 and r["cpu_ms_median"] > 0 for r in rows.values())
    # FLOPs are counted (matmuls and convolutions), not timed: facts about the algorithms.
    # The eager reference recomputes f(x) at every attack step and the clean forward twice: more FLOPs
    assert rows["trades eager ref"]["gflop_per_step"] > rows["trades"]["gflop_per_step"]
    assert ratios["trades fast / eager ref"]["flops"] < 1
    # the exact sensitivity costs one more input-gradient backward; the attack sensitivity nothing
    assert rows["dtrades[exact]"]["gflop_per_step"] > rows["dtrades[attack]"]["gflop_per_step"]
    assert ratios["dtrades[attack] / trades"]["flops"] == 1.0
    assert report["inputs"] == "test images" and "Ratios" in step_markdown(report)


def test_recipe_step_cost_times_the_compared_configs_through_the_step_bench(data_dir):
    """``make demo --step-bench`` (recipes.step_cost): the rows' own configs, timed by run_step_bench, each row
    with wall and CPU ms/step and GFLOP/step, and its ratios to the last row (the baseline)."""
    import recipes
    configs = [recipes.make_config("mnist", r, "smallcnn", "demo", overrides={
        "batch_size": 8, "attack_steps": 1, "device": "cpu", "data_dir": str(data_dir)}) for r in ("dtrades", "trades")]
    text = recipes.step_cost(configs)
    assert "PGD-1 training attack" in text and "CPU ms" in text and "GFLOP/step" in text
    table = {line.split(" | ")[2]: line for line in text.splitlines() if line.startswith("| smallcnn | 8 |")}
    assert {"mnist_dtrades_smallcnn", "mnist_trades_smallcnn", "mnist_dtrades_smallcnn / mnist_trades_smallcnn"} \
        == set(table), text


def test_nothing_we_import_changes_torch_threads():
    """ffcv sets torch's thread count to 1 on import: that would halve CPU training speed unnoticed."""
    from fastrobust.report import versions
    from loaders.ffcv_loader import require_ffcv

    before = torch.get_num_threads()
    require_ffcv()
    versions()
    assert torch.get_num_threads() == before
