"""AWP (adversarial weight perturbation, Wu et al. 2020) and the step hooks it is built on.

The perturbation against its formula, computed here from autograd gradients in float64: the proxy's one
SGD step of lr 0.01 ascending the base loss moves each weight by d_l = 0.01 grad_l, so
v_l = gamma ||w_l|| d_l / (||d_l|| + 1e-20) for every weight of dimension > 1 and nothing else moves.
The update: the optimiser's step from the gradient at w + v, applied to w (v subtracted after it).
Then the warm-up, the restore on skipped and failed steps, a non-finite proxy gradient, the trainer's
epoch and EMA, DDP (2 gloo processes: identical ranks, v from the global batch), compile, and the
registry/CLI declarations. Every comparison says what its tolerance covers.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import copy  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from conftest import parse_train_config, random_smallcnn, train_config  # noqa: E402
from fastrobust import checkpoint as ck  # noqa: E402
from fastrobust.bench import bench_methods  # noqa: E402
from fastrobust.config import TrainConfig  # noqa: E402
from fastrobust.errors import ConfigError  # noqa: E402
from fastrobust.awp import AWP_EPS, AWP_PROXY_LR, awp_weights  # noqa: E402
from fastrobust.methods import AT, AWP, METHODS, TRADES, MethodOutput  # noqa: E402
from fastrobust.step import TrainStep  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
F64_EPS = torch.finfo(torch.float64).eps


class Tiny(nn.Module):
    """Conv + batch norm + linear, and a 2-D parameter not named weight: AWP perturbs conv.weight and
    fc.weight only (the biases, the batch-norm scale and shift and ``mix`` stay)."""

    def __init__(self, seed: int = 0, batchnorm: bool = True):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4) if batchnorm else nn.Identity()
        self.fc = nn.Linear(4 * 8 * 8, 10)
        self.mix = nn.Parameter(torch.eye(10) + 0.1 * torch.randn(10, 10))
        if batchnorm:
            nn.init.uniform_(self.bn.weight, 0.5, 1.5)
            nn.init.normal_(self.bn.bias, std=0.1)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1)) @ self.mix


def _cfg(method, **kw):
    values = dict(dataset="mnist", model="smallcnn", method=method, eps=0.3, attack_steps=2, attack_step_size=0.15,
                  lr=0.05, momentum=0.9, weight_decay=5e-4, device="cpu", compile=False, amp="off")
    values.update(kw)
    return train_config(**values).validate()


def _batch(seed=1, n=16, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g, dtype=dtype), torch.randint(0, 10, (n,), generator=g)


def _formula_loss(base: str, beta: float, model, x, y, x_adv):
    """The base losses, written out: AT CE(f(x'), y); TRADES CE(f(x), y) + beta mean_i KL(p_i || q_i)."""
    if base == "at":
        return F.cross_entropy(model(x_adv), y)
    z, z_adv = model(x), model(x_adv)
    log_p, log_q = F.log_softmax(z, 1), F.log_softmax(z_adv, 1)
    return F.cross_entropy(z, y) + beta * (log_p.exp() * (log_p - log_q)).sum(1).mean()


def _grads(model, loss):
    names = [n for n, _ in model.named_parameters()]
    return dict(zip(names, torch.autograd.grad(loss, list(model.parameters()))))


def _capture(method):
    """Wrap the method's hooks to record what the step saw: the adversarial batch, the weights at the
    perturbed point (after before_loss) and the perturbation v of each weight."""
    seen = {}
    before, after = method.before_loss, method.after_step

    def before_loss(ctx):
        before(ctx)
        seen["x_adv"] = ctx.adv.x_adv.detach().clone()
        seen["perturbed"] = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
        seen["v"] = [v.detach().clone() for _, v in ctx.scratch.get("awp", [])]

    def after_step(ctx):
        seen["after_step_calls"] = seen.get("after_step_calls", 0) + 1
        after(ctx)

    method.before_loss, method.after_step = before_loss, after_step
    return seen


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# -- the perturbation and the update against their formulas (float64) -------------------------------

@pytest.mark.parametrize("base,seed", [("at", 0), ("trades", 1)])
@pytest.mark.parametrize("lr", [0.0, 0.05])
def test_perturbation_and_update_match_the_formula(base, seed, lr):
    """float64 on fresh random inputs. The step's v against gamma ||w_l|| d_l / (||d_l|| + 1e-20) with
    d_l = 0.01 grad_l(w) (the proxy's SGD step): the implementation forms d as (w + 0.01 g) - w, exact
    up to eps ||w|| / ||d|| relative (< 1e-12 here), so 1e-10 norm-wise. Parameters that are not
    weights of dimension > 1 do not move at all. After the step (momentum 0.9, weight decay 5e-4, the
    first step: buffer = g + wd p) the weights equal w - lr (g(w + v) + wd (w + v)), the optimiser's
    update from the perturbed point applied to w: subtracting v again rounds at eps ||w||, hence
    1e-14 ||w|| + 1e-10 ||update||. lr = 0: the weights return to w (to that rounding)."""
    awp = AWP(base=base, gamma=5e-3, beta=6.0 if base == "trades" else None)
    model = Tiny(seed).double()
    before = copy.deepcopy(model)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    step = TrainStep(_cfg(awp), model, CPU)
    step.opt.param_groups[0]["lr"] = lr   # TrainConfig asks lr > 0; the optimiser takes 0
    seen = _capture(awp)
    x, y = _batch(seed + 10)
    result = step(x, y, step=0)
    assert result.failure is None and seen["after_step_calls"] == 1

    # v from autograd at w, in train mode, on the step's adversarial batch
    ref = copy.deepcopy(before).train()
    g = _grads(ref, _formula_loss(base, 6.0, ref, x, y, seen["x_adv"]))
    perturbed_names = {n for n, _ in awp_weights(model)}
    assert perturbed_names == {"conv.weight", "fc.weight"}
    for n, w in w0.items():
        moved = seen["perturbed"][n] - w
        if n not in perturbed_names:
            assert torch.equal(seen["perturbed"][n], w), n
            continue
        d = AWP_PROXY_LR * g[n]
        v = 5e-3 * w.norm() * d / (d.norm() + AWP_EPS)
        assert _rel(moved, v) < 1e-10, (n, _rel(moved, v))
        assert abs(float(moved.norm() / w.norm()) - 5e-3) < 1e-12   # layer-wise, relative to the weight's norm
    stats = result.output.stats   # logged in float32
    assert float(stats["awp_applied"]) == 1.0 and abs(float(stats["awp_relative_norm"]) - 5e-3) < 1e-9
    unperturbed = float(_formula_loss(base, 6.0, ref, x, y, seen["x_adv"]).detach())
    assert abs(float(stats["awp_loss_unperturbed"]) - unperturbed) < 1e-6 * unperturbed

    # the update: the gradient at the perturbed point (the step's own perturbed weights), applied to w
    at_perturbed = copy.deepcopy(before).train()
    with torch.no_grad():
        for n, p in at_perturbed.named_parameters():
            p.copy_(seen["perturbed"][n])
    g_pert = _grads(at_perturbed, _formula_loss(base, 6.0, at_perturbed, x, y, seen["x_adv"]))
    for n, p in model.named_parameters():
        update = -lr * (g_pert[n] + 5e-4 * seen["perturbed"][n])
        err = float((p.detach() - (w0[n] + update)).norm())
        assert err <= 1e-14 * float(w0[n].norm()) + 1e-10 * float(update.norm()), (n, err)
        if lr == 0:
            assert err <= 4 * F64_EPS * float(w0[n].norm()), n


def test_later_steps_perturb_from_the_current_weights():
    """The one proxy is reloaded from the model every step: at the second step v is relative to the
    weights after the first update (the proxy's own first step must not leak into it)."""
    awp = AWP(base="at")
    model = Tiny(3).double()
    step = TrainStep(_cfg(awp), model, CPU)
    seen = _capture(awp)
    x, y = _batch(4)
    step(x, y, step=0)
    proxy = step.hook_store["awp_proxy"][0]
    w1 = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = copy.deepcopy(model)
    step(x, y, step=1)
    assert step.hook_store["awp_proxy"][0] is proxy   # one proxy, reused
    ref = state.train()
    g = _grads(ref, _formula_loss("at", 0, ref, x, y, seen["x_adv"]))
    for n in ("conv.weight", "fc.weight"):
        d = AWP_PROXY_LR * g[n]
        v = 5e-3 * w1[n].norm() * d / (d.norm() + AWP_EPS)
        assert _rel(seen["perturbed"][n] - w1[n], v) < 1e-10


def test_the_proxy_keeps_the_models_batch_norm_statistics_apart():
    """The proxy's train-mode forward moves the proxy's running statistics, not the model's: the
    model's move only by its own loss forward, as with the base method."""
    model_awp, model_at = Tiny(5).double(), Tiny(5).double()
    awp_step = TrainStep(_cfg(AWP(base="at"), lr=1e-9), model_awp, CPU)
    at_step = TrainStep(_cfg(AT(), lr=1e-9), model_at, CPU)
    x, y = _batch(6)
    awp_step(x, y, step=0)
    at_step(x, y, step=0)
    # one train-mode forward each (at slightly different weights: w + v against w)
    assert int(model_awp.bn.num_batches_tracked) == int(model_at.bn.num_batches_tracked) == 1
    assert _rel(model_awp.bn.running_mean, model_at.bn.running_mean) < 0.05


# -- warm-up, skipped and failed steps, non-finite proxy gradients -----------------------------------

def test_warmup_epochs_train_the_base_method_exactly():
    """Before ``warmup_epochs`` epochs (counted from 0) AWP is its base: bitwise the same weights as AT's step
    (the same attack, loss and update; no proxy is built). From epoch ``warmup_epochs`` on it perturbs."""
    init = Tiny(7).double()
    awp = AWP(base="at", warmup_epochs=2)
    a = TrainStep(_cfg(AT()), copy.deepcopy(init), CPU)
    b = TrainStep(_cfg(awp), copy.deepcopy(init), CPU)
    x, y = _batch(8)
    for i, epoch in enumerate((0, 1)):
        ra, rb = a(x, y, step=i, epoch=epoch), b(x, y, step=i, epoch=epoch)
        assert ra.loss == rb.loss and float(rb.output.stats["awp_applied"]) == 0.0
        assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    assert "awp_proxy" not in b.hook_store
    ra, rb = a(x, y, step=2, epoch=2), b(x, y, step=2, epoch=2)
    assert float(rb.output.stats["awp_applied"]) == 1.0 and rb.loss != ra.loss
    assert not torch.equal(a.model.fc.weight, b.model.fc.weight)


def test_gamma_zero_is_the_base_method():
    init = Tiny(9).double()
    a = TrainStep(_cfg(AT()), copy.deepcopy(init), CPU)
    b = TrainStep(_cfg(AWP(base="at", gamma=0.0)), copy.deepcopy(init), CPU)
    x, y = _batch(9)
    a(x, y, step=0)
    b(x, y, step=0)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


def _perturbed_then(failing_loss):
    """A step whose loss is replaced by ``failing_loss`` (after the perturbation): (seen, step, w0, result
    or the exception)."""
    awp = AWP(base="at")
    model = Tiny(11).double()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    step = TrainStep(_cfg(awp), model, CPU)
    seen = _capture(awp)
    awp.loss = failing_loss
    x, y = _batch(12)
    try:
        outcome = step(x, y, step=0)
    except RuntimeError as e:
        outcome = e
    return seen, step, w0, outcome


def _assert_restored(seen, model, w0):
    assert seen["after_step_calls"] == 1
    assert not torch.equal(seen["perturbed"]["fc.weight"], w0["fc.weight"])   # the step was perturbed
    for n, p in model.named_parameters():
        # (w + v) - v: within one rounding of w per element
        assert torch.allclose(p.detach(), w0[n], rtol=2 * F64_EPS, atol=0), n


def test_a_skipped_step_restores_the_weights():
    """A non-finite loss skips the update; the weights are w again, not w + v."""
    seen, step, w0, result = _perturbed_then(
        lambda *a, **k: MethodOutput(torch.tensor(float("nan"), dtype=torch.float64)))
    assert result.failure and "nan" in result.failure
    _assert_restored(seen, step.model, w0)


def test_a_failing_step_restores_the_weights():
    def boom(*a, **k):
        raise RuntimeError("boom")

    seen, step, w0, error = _perturbed_then(boom)
    assert isinstance(error, RuntimeError) and str(error) == "boom"
    _assert_restored(seen, step.model, w0)


def test_an_fp16_overflow_restores_the_weights():
    """fp16 autocast with the grad scaler (on the CPU): a loss whose scaled gradients overflow is skipped
    by the scaler; the weights come back from w + v to w (to fp32 rounding)."""
    awp = AWP(base="at")
    model = Tiny(13, batchnorm=False)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    step = TrainStep(_cfg(awp, amp="fp16"), model, CPU)
    assert step.scaler.is_enabled()
    seen = _capture(awp)
    base_loss = awp.loss

    def huge(*a, **k):
        out = base_loss(*a, **k)
        out.loss = out.loss * 1e36
        return out

    awp.loss = huge
    result = step(*_batch(14, dtype=torch.float32), step=0)
    assert result.failure and "overflowed" in result.failure
    assert float(result.output.stats["awp_applied"]) == 1.0
    assert seen["after_step_calls"] == 1 and not torch.equal(seen["perturbed"]["fc.weight"], w0["fc.weight"])
    for n, p in model.named_parameters():
        assert torch.allclose(p.detach(), w0[n], rtol=2 * torch.finfo(torch.float32).eps, atol=0), n


def test_a_non_finite_proxy_gradient_leaves_the_step_unperturbed():
    """Only the proxy's loss is infinite: no perturbation that step (awp_applied 0), no crash, and the
    step is exactly the base method's."""
    init = Tiny(15).double()

    class InfOnTheProxy(AT):
        def loss(self, model, x, y, adv, **kw):
            out = super().loss(model, x, y, adv, **kw)
            if model is not b.model:
                out.loss = out.loss * float("inf")
            return out

    awp = AWP(base="at")
    awp.base_method = lambda: InfOnTheProxy()
    a = TrainStep(_cfg(AT()), copy.deepcopy(init), CPU)
    b = TrainStep(_cfg(awp), copy.deepcopy(init), CPU)
    x, y = _batch(16)
    ra, rb = a(x, y, step=0), b(x, y, step=0)
    assert rb.failure is None and float(rb.output.stats["awp_applied"]) == 0.0
    assert float(rb.output.stats["awp_relative_norm"]) == 0.0
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


def test_methods_without_hooks_take_the_plain_step(monkeypatch):
    """No context, no hook call, nothing kept: the fast path of every other method is unchanged."""
    def never(*a, **k):
        raise AssertionError("a method without step hooks reached the hook path")

    monkeypatch.setattr(TrainStep, "_before_loss", never)
    for name, cls in METHODS.items():
        if not cls().step_hooks:
            step = TrainStep(_cfg(cls()), Tiny(17).double(), CPU)
            assert step(*_batch(18), step=0).failure is None, name
            assert step.hook_store == {}
    assert AWP().step_hooks and not AT().step_hooks


# -- the trainer: epoch and EMA ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory):
    """SmallCNN with a random last layer: with the default zero one the perturbation is zero (only the
    last layer has a gradient, and its norm is 0)."""
    model = random_smallcnn(0)
    path = tmp_path_factory.mktemp("awp_init") / "init.pt"
    ck.atomic_save({"format": ck.FORMAT, "spec": model.spec.to_dict(), "model": model.state_dict()}, path)
    return path


def test_the_trainer_passes_the_epoch_and_the_ema_sees_the_restored_weights(tmp_path, data_dir, init_ckpt):
    """warmup_epochs 1: the trainer's epoch 0 trains unperturbed, epoch 1 perturbed (the logs say so). The EMA,
    updated by the trainer after the step returns, averages the restored weights: ema = lerp(ema, w,
    1 - decay) exactly as torch computes it (the same float32 ops), where an EMA of w + v would be off by
    (1 - decay) v ~ 2.5e-3 ||w||."""
    from fastrobust.train import Trainer
    cfg = train_config(dataset="mnist", model="smallcnn", method=AWP(base="at", warmup_epochs=1), eps=0.3, attack_steps=2,
                       attack_step_size=0.15, epochs=2, batch_size=64, train_limit=128, val_samples=64,
                      ema_decay=0.5, init_checkpoint=str(init_ckpt), dropout=0.0, log_every=1, compile=False,
                      final_eval=False, progress=False, device="cpu", data_dir=str(data_dir),
                      out_dir=str(tmp_path / "run"))
    trainer = Trainer(cfg)
    trainer.loader.set_epoch(0)
    x, y = next(iter(trainer.loader))
    record = trainer.step(x, y)
    assert record["awp_applied_mean"] == 0.0
    trainer.epoch = 1
    ema_before = [p.detach().clone() for p in trainer.ema.module.parameters()]
    record = trainer.step(x, y)
    assert record["awp_applied_mean"] == 1.0 and abs(record["awp_relative_norm_mean"] - 5e-3) < 1e-6
    assert "awp_loss_unperturbed_mean" in record
    for e0, p, e in zip(ema_before, trainer.model.parameters(), trainer.ema.module.parameters()):
        assert torch.allclose(e, torch.lerp(e0, p.detach(), 0.5), rtol=1e-6, atol=1e-7)
    json.dumps(record)   # the log line


# -- DDP: 2 gloo processes -----------------------------------------------------------------------

DDP_SCRIPT = textwrap.dedent('''
    import json, sys
    import torch
    sys.path.insert(0, sys.argv[2])
    from test_awp import Tiny, _batch, _capture, _cfg
    from fastrobust import distributed as dist
    from fastrobust.methods import AWP
    from fastrobust.step import TrainStep

    dev = dist.init_from_env("cpu")
    rank, world = dist.rank(), dist.world_size()
    awp = AWP(base="at")
    cfg = _cfg(awp, norm="l2", eps=1.0, attack_steps=2, attack_step_size=0.5)
    step = TrainStep(cfg, Tiny(21, batchnorm=False).double(), dev)
    seen = _capture(awp)
    vs = []
    for i in range(2):
        x, y = _batch(30 + i, n=16)
        # rows rank::world, as the loaders shard (and the attack's per-sample starts follow)
        assert step(x[rank::world], y[rank::world], step=i).failure is None
        vs.append([v.tolist() for v in seen["v"]])
    weights = {n: p.detach().tolist() for n, p in step.model.named_parameters()}
    everyone = dist.all_gather_object({"weights": weights, "v": vs})
    if rank == 0:
        json.dump(everyone, open(sys.argv[1], "w"))
    dist.shutdown()
''')


def test_ddp_ranks_apply_the_same_perturbation_and_stay_identical(tmp_path):
    """Two processes, 8 samples each of a 16-sample batch (rows rank::2; no batch norm, an L2 attack: the
    per-sample work does not depend on the sharding). The proxy gradient is all-reduced, so both ranks apply the same v
    (bitwise) and end with bitwise identical weights after 2 steps; without the all-reduce each rank's v
    would come from its own shard (and differ by O(1)). v equals one process's v on the whole batch to the
    rounding of the gradient sums (1e-10 norm-wise in float64)."""
    script, out = tmp_path / "ddp_awp.py", tmp_path / "ranks.json"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(out), str(REPO / "tests")], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = json.loads(out.read_text())
    assert r0["weights"] == r1["weights"] and r0["v"] == r1["v"]
    # one process, the whole batch, the same first step
    awp = AWP(base="at")
    step = TrainStep(_cfg(awp, norm="l2", eps=1.0, attack_steps=2, attack_step_size=0.5),
                     Tiny(21, batchnorm=False).double(), CPU, distributed=False)
    seen = _capture(awp)
    step(*_batch(30, n=16), step=0)
    for v_ddp, v_single in zip(r0["v"][0], seen["v"]):
        assert _rel(torch.tensor(v_ddp, dtype=torch.float64), v_single) < 1e-10


# -- compile ----------------------------------------------------------------------------------------

def test_compiled_awp_step_matches_eager():
    """torch.compile on the CPU: the compiled module shares the parameters the hooks modify in place, so a
    compiled AWP step gives the eager step's weights (float32; inductor reassociates sums: per-tensor
    1e-4 relative covers that rounding, while a perturbation left in the weights or missed by the
    compiled forward would be gamma = 5e-3 of them)."""
    init = Tiny(23, batchnorm=False)
    eager = TrainStep(_cfg(AWP(base="trades")), copy.deepcopy(init), CPU)
    compiled = TrainStep(_cfg(AWP(base="trades"), compile=True), copy.deepcopy(init), CPU)
    for i in range(2):
        x, y = _batch(40 + i, dtype=torch.float32)
        re, rc = eager(x, y, step=i), compiled(x, y, step=i)
        assert rc.failure is None and compiled.net is not compiled.model and not compiled.notes
        assert abs(re.loss - rc.loss) < 1e-4 * abs(re.loss)
        assert float(rc.output.stats["awp_applied"]) == 1.0
    for (n, p), q in zip(eager.model.named_parameters(), compiled.model.parameters()):
        assert _rel(q.detach(), p.detach()) < 1e-4, n


# -- declarations: registry, config, CLI, bench ------------------------------------------------------

def test_awp_wraps_any_method_with_a_training_attack():
    bases = set(AWP.__dataclass_fields__["base"].metadata["choices"]())
    assert bases == {n for n, cls in METHODS.items() if cls is not AWP and cls().objective is not None}
    assert AWP.name not in bases and "standard" not in bases and {"at", "trades"} <= bases
    for base in bases:
        m = AWP(base=base).validate()
        b = METHODS[base]()
        assert (m.objective, m.random_start, m.double_backward) == (b.objective, b.random_start, b.double_backward)
        assert m.extends == b.label and m.label == f"awp[{b.label}]"
    assert AWP(base="trades", beta=6.0).base_method() == TRADES(beta=6.0)
    assert AWP(base="trades").base_method() == TRADES()
    with pytest.raises(ConfigError, match="base at has none"):
        AWP(base="at", beta=1.0).validate()
    with pytest.raises(ConfigError, match="unknown AWP base 'awp'"):
        AWP(base="awp").validate()
    with pytest.raises(ConfigError, match="unknown AWP base 'standard'"):
        AWP(base="standard").validate()


def test_awp_from_the_command_line_and_the_bench():
    cfg = parse_train_config(["--dataset", "mnist", "--model", "smallcnn", "--method", "awp", "--awp-base", "trades",
                              "--awp-beta", "6", "--awp-warmup-epochs", "10", "--eps", "0.3"])
    assert cfg.method == AWP(base="trades", gamma=5e-3, warmup_epochs=10, beta=6.0) and cfg.method.objective == "kl"
    assert TrainConfig.from_dict(cfg.to_dict()).validate() == cfg
    assert cfg.to_dict()["method"] == {"name": "awp", "base": "trades", "gamma": 5e-3, "warmup_epochs": 10, "beta": 6.0}
    assert [m.label for m in bench_methods(["awp"])] == ["awp[at]", "awp[trades]"]
    assert [m.label for m in bench_methods(["awp[trades]"])] == ["awp[trades]"]
