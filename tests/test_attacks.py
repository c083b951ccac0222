import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import random_smallcnn
from fastrobust.attacks import FGSM, OBJECTIVES, PGD, AutoAttack, eval_mode, pgd_perturb, random_start
from fastrobust.config import EvalConfig
from fastrobust.errors import ConfigError


def _inputs(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def _ce(model, x, y):
    with eval_mode(model), torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


@pytest.mark.parametrize("start", ["uniform", "trades", "none"])
@pytest.mark.parametrize("objective", ["ce", "kl"])
def test_linf_projection_and_box(small_model, start, objective):
    x, y = _inputs()
    eps = 0.1
    x_adv = PGD(eps=eps, step_size=0.04, steps=5, norm="linf", random_start=start, objective=objective)(small_model, x, y)
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1


@pytest.mark.parametrize("start", ["uniform", "none"])
def test_l2_radius_respected(small_model, start):
    x, y = _inputs()
    eps = 1.5
    x_adv = PGD(eps=eps, step_size=0.5, steps=6, norm="l2", random_start=start, objective="ce")(small_model, x, y)
    norms = torch.linalg.vector_norm((x_adv - x).flatten(1), dim=1)
    assert norms.max() <= eps * (1 + 1e-5)
    assert norms.max() > 0.5 * eps  # it actually moved
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_pgd_no_worse_than_fgsm_on_average(small_model):
    x, y = _inputs(64)
    eps = 0.1
    fgsm = FGSM(eps=eps)(small_model, x, y)
    pgd = PGD(eps=eps, step_size=0.025, steps=10, norm="linf", random_start="none", objective="ce")(small_model, x, y)
    # 1e-3 relative: far above float32 rounding of a 64-sample mean (PGD's clipped iterate can equal FGSM's
    # bit for bit on some points), far below the gap a PGD that does not ascend would leave
    pgd_ce, fgsm_ce = _ce(small_model, pgd, y).mean(), _ce(small_model, fgsm, y).mean()
    print(f"CE after PGD {float(pgd_ce):.5f}, after FGSM {float(fgsm_ce):.5f}")
    assert pgd_ce >= fgsm_ce * (1 - 1e-3)


def test_loss_increases_along_the_attack(small_model):
    x, y = _inputs(32)
    losses = []
    x_adv = x.clone()
    for _ in range(6):
        x_adv = pgd_perturb(small_model.eval(), x_adv, y, eps=0.02, step_size=0.005, steps=1, norm="linf",
                            objective="ce", start=random_start(x_adv, 0.02, "linf", "none")).x_adv
        losses.append(float(_ce(small_model, x_adv, y).mean()))
    assert all(b > a for a, b in zip(losses, losses[1:])), losses


def test_kl_attack_computes_clean_logits_once(small_model):
    x, y = _inputs(8)
    calls = []
    handle = small_model.register_forward_hook(lambda m, i, o: calls.append(1))
    PGD(eps=0.1, step_size=0.02, steps=7, norm="linf", random_start="trades", objective="kl")(small_model, x, y)
    handle.remove()
    assert len(calls) == 7 + 1


def test_mode_restored_per_module():
    model = random_smallcnn(batchnorm=True).train()
    model.net.classifier.drop.eval()  # a deliberately mixed state
    seen = []
    hook = model.register_forward_pre_hook(lambda m, i: seen.append(m.training))
    x, y = _inputs(4)
    PGD(eps=0.1, step_size=0.05, steps=2, norm="linf", random_start="uniform", objective="ce")(model, x, y)
    hook.remove()
    assert seen and not any(seen)  # eval mode during the attack
    assert model.training and model.net.features.relu2[0].training
    assert not model.net.classifier.drop.training


def test_early_stop_freezes_each_sample_at_its_first_fooling_iterate(small_model):
    x, y = _inputs(32)
    model = small_model.eval()
    with torch.no_grad():
        y = model(x).argmax(1)  # all correct at the start
    steps = 8
    kw = dict(eps=0.3, step_size=0.05, norm="linf", objective="ce", start=random_start(x, 0.3, "linf", "none"))
    iterates = [x]  # the same attack without early stopping, written out
    x_cur = x
    for _ in range(steps):
        x_cur = x_cur.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(x_cur), y, reduction="sum"), x_cur)
        x_cur = torch.min(torch.max(x_cur.detach() + 0.05 * g.sign(), x - 0.3), x + 0.3).clamp(0, 1)
        iterates.append(x_cur)
    with torch.no_grad():
        fooled = torch.stack([model(it).argmax(1) != y for it in iterates[:-1]])  # (steps, B)
    expected = iterates[-1].clone()
    for i in range(len(y)):
        hits = fooled[:, i].nonzero()
        if len(hits):
            expected[i] = iterates[int(hits[0])][i]
    res = pgd_perturb(model, x, y, steps=steps, early_stop=True, **kw)
    assert fooled.any(dim=0).sum() >= 4  # the attack fools several samples early
    torch.testing.assert_close(res.x_adv, expected)


def test_last_grad_norm_is_gradient_at_last_iterate(small_model):
    x, y = _inputs(8)
    torch.manual_seed(3)
    res = pgd_perturb(small_model.eval(), x, y, eps=0.1, step_size=0.05, steps=1, norm="linf",
                      objective="ce", start=random_start(x, 0.1, "linf", "none"))
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(small_model(xr), y, reduction="sum"), xr)
    torch.testing.assert_close(res.last_grad_norm, torch.linalg.vector_norm(g.flatten(1), dim=1))


def test_eps_zero_returns_the_input(small_model):
    x, y = _inputs()
    for attack in (FGSM(eps=0.0), PGD(eps=0.0, step_size=0.01, steps=3, norm="linf", random_start="uniform", objective="ce")):
        assert torch.equal(attack(small_model, x, y), x)


def test_negative_eps_is_rejected():
    with pytest.raises(ConfigError, match="eps"):
        PGD(eps=-0.1, step_size=0.01, steps=3, norm="linf", random_start="uniform", objective="ce")
    with pytest.raises(ConfigError, match="eps"):
        FGSM(eps=-1)


def test_bad_options_are_rejected_with_names():
    with pytest.raises(ConfigError, match="linf"):
        PGD(eps=0.1, step_size=0.01, steps=3, norm="inf", random_start="uniform", objective="ce")
    with pytest.raises(ConfigError, match="steps"):
        PGD(eps=0.1, step_size=0.01, steps=0, norm="linf", random_start="uniform", objective="ce")
    with pytest.raises(ConfigError, match="pgd"):
        EvalConfig(attacks=("pdg",)).validate()


def test_weak_attack_warns_once_at_its_first_call(small_model):
    x, y = _inputs(4)
    weak = PGD(eps=0.3, step_size=0.01, steps=20, norm="linf", random_start="uniform", objective="ce")
    with pytest.warns(UserWarning, match="PGD-20: .* cannot cover its ball"):
        weak(small_model, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weak(small_model, x, y)   # said once per attack
        PGD(eps=0.3, step_size=0.01, steps=40, norm="linf", random_start="uniform", objective="ce")(small_model, x, y)
        # the evaluation's PGD: the evaluation says it (and records it), not the attack
        PGD.for_evaluation(EvalConfig(eps=0.3, pgd_steps=20, pgd_step_size=0.01).resolved())(small_model, x, y)


def test_autoattack_wrapper_respects_ball_and_beats_clean(small_model):
    x, y = _inputs(16)
    with torch.no_grad():
        y = small_model.eval()(x).argmax(1)
    aa = AutoAttack(eps=0.1, norm="linf", version="custom", attacks=("apgd-ce",), batch_size=16, device="cpu")
    x_adv = aa(small_model, x, y)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-5
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        fooled = int((small_model(x_adv).argmax(1) != y).sum())
    print(f"APGD-CE fooled {fooled} of 16")
    assert fooled > 0   # an untrained model at eps 0.1: APGD-CE flips most points, on any CPU


@pytest.mark.parametrize("kind,norm", [("uniform", "linf"), ("uniform", "l2"), ("trades", "linf")])
def test_random_start_is_in_the_ball_and_the_box(kind, norm):
    x, _ = _inputs(64)
    eps = 0.3 if norm == "linf" else 2.0
    start = random_start(x, eps, norm, kind)
    delta = (start - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else torch.linalg.vector_norm(delta, dim=1)
    assert size.max() <= eps * (1 + 1e-6) and start.min() >= 0 and start.max() <= 1
    if kind == "trades":  # x + 0.001 N(0, 1): a few thousandths at most, never the radius
        assert 0 < delta.abs().max() < 0.01
    else:  # spread over the ball, not concentrated at its centre
        assert size.min() > 0.5 * eps


def test_random_start_keeps_float64():
    x = _inputs(4)[0].double()
    for kind in ("uniform", "trades", "none"):
        assert random_start(x, 0.1, "linf", kind).dtype == torch.float64


def test_random_start_per_sample_whatever_the_number_of_processes():
    """With a generator seeded per step, rank r of N keeps rows r::N of the noise drawn for the global
    batch: sample i gets the same start in one process as on rank i % N (DistributedSampler's split)."""
    x, _ = _inputs(12)
    for kind, norm in (("uniform", "linf"), ("uniform", "l2"), ("trades", "linf")):
        whole = random_start(x, 0.3, norm, kind, generator=torch.Generator().manual_seed(7))
        for rank in range(3):
            shard = random_start(x[rank::3], 0.3, norm, kind, generator=torch.Generator().manual_seed(7),
                                 rank=rank, world_size=3)
            assert torch.equal(shard, whole[rank::3]), (kind, norm, rank)


def test_start_is_the_first_iterate(small_model):
    """pgd_perturb starts from ``start`` (projected), not from a start of its own: with a step too small
    to matter, the result stays at the given start."""
    x, y = _inputs(8)
    start = random_start(x, 0.2, "linf", "uniform", generator=torch.Generator().manual_seed(3))
    res = pgd_perturb(small_model.eval(), x, y, eps=0.2, step_size=1e-6, steps=1, norm="linf", objective="ce",
                      start=start)
    assert (res.x_adv - start).abs().max() <= 1e-6 + 1e-7
    far = pgd_perturb(small_model.eval(), x, y, eps=0.1, step_size=1e-6, steps=1, norm="linf", objective="ce",
                      start=x + 0.5)  # outside the ball and the box: projected first
    assert (far.x_adv - x).abs().max() <= 0.1 + 1e-6 and far.x_adv.max() <= 1


def test_recompute_clean_gives_the_same_attack(small_model):
    """The step profiler's official-style attack recomputes f(x) at every KL step: the same iterates
    (the model is deterministic in eval mode), one clean forward per step."""
    x, y = _inputs(8)
    model = small_model.eval()
    start = random_start(x, 0.1, "linf", "trades", generator=torch.Generator().manual_seed(5))
    kw = dict(eps=0.1, step_size=0.02, steps=4, norm="linf", objective="kl", start=start)
    calls = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(1))
    once = pgd_perturb(model, x, y, **kw)
    n_once = len(calls)
    every = pgd_perturb(model, x, y, recompute_clean=True, **kw)
    handle.remove()
    assert n_once == 4 + 1 and len(calls) - n_once == 4 + 4
    assert torch.equal(once.x_adv, every.x_adv)


def _objective_formula(name, z, z_adv, y):
    """Independent float64 formulas of the attack objectives, per sample."""
    idx = torch.arange(len(y))
    log_q = z_adv - torch.logsumexp(z_adv, 1, keepdim=True)
    if name == "ce":
        return -log_q[idx, y]
    if name == "kl":
        log_p = z - torch.logsumexp(z, 1, keepdim=True)
        return (log_p.exp() * (log_p - log_q)).sum(1)
    others = z_adv.clone()
    others[idx, y] = -float("inf")
    return others.max(1).values - z_adv[idx, y]


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_every_objective_equals_its_float64_formula_with_gradients(name):
    g = torch.Generator().manual_seed(11)
    z = torch.randn(16, 10, generator=g, dtype=torch.float64)
    z_adv = (z + torch.randn(16, 10, generator=g, dtype=torch.float64)).requires_grad_(True)
    y = torch.randint(0, 10, (16,), generator=g)
    objective = OBJECTIVES[name]
    log_p = torch.log_softmax(z, 1) if objective.needs_clean else None
    got, ref = objective.loss(z_adv, y, log_p), _objective_formula(name, z, z_adv, y)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    w = torch.rand(16, generator=g, dtype=torch.float64)
    (g_got,), (g_ref,) = torch.autograd.grad((w * got).sum(), z_adv), torch.autograd.grad((w * ref).sum(), z_adv)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_pgd_ascends_every_objective(name):
    """A few PGD steps raise the batch's objective well above its value at the start."""
    model = random_smallcnn(5).eval()
    g = torch.Generator().manual_seed(5)
    x = torch.rand(32, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    start = random_start(x, 0.3, "linf", "trades")
    value = lambda xa: float(_objective_formula(name, model(x).double(), model(xa).double(), y).mean())  # noqa: E731
    with torch.no_grad():
        before = value(start)
    x_adv = pgd_perturb(model, x, y, eps=0.3, step_size=0.05, steps=5, norm="linf", objective=name, start=start).x_adv
    with torch.no_grad():
        assert value(x_adv) > before + 1e-3, (name, before, value(x_adv))


def test_the_evaluation_pgd_takes_its_objective_from_the_config():
    cfg = EvalConfig(eps=0.1, pgd_objective="cw").resolved()
    pgd = PGD.for_evaluation(cfg)
    assert pgd.objective == "cw" and PGD.label(cfg.__dict__) == "PGD-20-CW"
    assert PGD.settings(cfg.__dict__)["pgd_objective"] == "cw"
    assert "pgd_objective" not in PGD.settings(EvalConfig(eps=0.1).resolved().__dict__)   # ce: as before the option
