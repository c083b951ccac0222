"""Each method's loss and parameter gradients against an independent float64 computation of its formula."""
import math

import numpy as np
import pytest
import torch

from conftest import random_smallcnn, train_config
from fastrobust import distributed as dist
from fastrobust.attacks import pgd_perturb, random_start
from fastrobust.config import TrainConfig
from fastrobust.errors import ConfigError
from fastrobust.methods import (AT, DTRADES, FAAL, MART, TRADES, AdvBatch, Standard, class_margins,
                                dro_class_weights, method_from_dict, per_sample_sensitivity)
from fastrobust.step import TrainStep

EPS = 0.3  # the MNIST training radius


def _batch(seed, n=12):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=g, dtype=torch.float64)
    x_adv = (x + 0.2 * (torch.rand(x.shape, generator=g, dtype=torch.float64) - 0.5)).clamp(0, 1)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, x_adv, y


def _model(seed=0):
    return random_smallcnn(seed).double().eval()  # eval: dropout off, so both sides see the same network


def _params(model):
    return [p for p in model.parameters() if p.requires_grad]


def _loss(method, model, x, y, adv):
    return method.loss(model, x, y, adv, backend="reference")


# independent float64 formulas: explicit softmax, log and sums, no shared helpers with the library
def _probs(logits):
    e = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def _ce(logits, y):
    p = _probs(logits)
    return -torch.log(p[torch.arange(len(y)), y])


def _kl(z, z_adv):
    p, q = _probs(z), _probs(z_adv)
    return (p * (torch.log(p) - torch.log(q))).sum(1)


def formula(m, model, x, x_adv, y, sens=None, class_w=None):
    z, z_adv = model(x), model(x_adv)
    idx = torch.arange(len(y))
    if m.name == "standard":
        return _ce(z, y).mean()
    if m.name == "at":
        return _ce(z_adv, y).mean()
    if m.name == "trades":
        return _ce(z, y).mean() + m.beta * _kl(z, z_adv).mean()
    if m.name == "mart":
        q, p = _probs(z_adv), _probs(z)
        q_masked = q.clone()
        q_masked[idx, y] = -1
        wrong = q_masked.argmax(1)
        bce = _ce(z_adv, y) - torch.log(1.0001 - q[idx, wrong])
        return (bce + m.beta * _kl(z, z_adv) * (1 - p[idx, y])).mean()
    if m.name == "dtrades":
        p = _probs(z).detach()
        h = -(p * torch.log(p + m.entropy_eps)).sum(1)
        mm = lambda v: (v - v.min()) / (v.max() - v.min())  # noqa: E731
        lam = m.lambda_scale * (m.alpha * mm(h) + m.beta * mm(sens))
        return _ce(z, y).mean() + (lam * _kl(z, z_adv)).mean()
    if m.name == "faal":
        c = z_adv.shape[1]
        per = _ce(z, y) + m.beta * _kl(z, z_adv)
        return (c / len(y)) * (class_w[y] * per).sum()
    raise AssertionError(m.name)


def _compare(m, seed, sens_fn=None):
    model = _model(seed)
    x, x_adv, y = _batch(seed)
    out = _loss(m, model, x, y, AdvBatch(x_adv, None))
    grads = torch.autograd.grad(out.loss, _params(model))
    sens = out.stats.get("sensitivity")
    class_w = out.stats.get("class_weights")
    if class_w is not None:
        class_w = class_w.double()
    ref = formula(m, model, x, x_adv, y, sens=sens_fn(model, x, x_adv) if sens_fn else sens, class_w=class_w)
    ref_grads = torch.autograd.grad(ref, _params(model))
    torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-12)
    return out


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("method", [Standard(), AT(), TRADES(beta=4.0), MART(beta=5.0),
                                    FAAL(r=0.3, base="trades", beta=2.0)], ids=lambda m: m.name)
def test_loss_and_gradients_match_formula(method, seed):
    _compare(method, seed)


def test_at_loss_uses_only_the_adversarial_forward():
    """PGD-AT's loss is CE(f(x'), y): the clean input must not enter it (a NaN there changes nothing)."""
    model = _model(12)
    x, x_adv, y = _batch(12)
    out = _loss(AT(), model, torch.full_like(x, float("nan")), y, AdvBatch(x_adv))
    torch.testing.assert_close(out.loss, _ce(model(x_adv), y).mean(), rtol=1e-10, atol=0)
    torch.testing.assert_close(out.stats["ce_adv"], _ce(model(x_adv), y), rtol=1e-10, atol=0)
    assert out.logits_nat is None and out.logits_adv is not None


def _ce_pgd_by_hand(model, x, y, start, step_size, steps):
    """L-inf CE PGD written out: sign steps, projection onto the eps-ball and the box."""
    x_cur = start
    for _ in range(steps):
        x_cur = x_cur.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(_ce(model(x_cur), y).sum(), x_cur)
        x_cur = torch.min(torch.max(x_cur.detach() + step_size * g.sign(), x - EPS), x + EPS).clamp(0, 1)
    return x_cur


def test_at_training_attack_is_uniform_start_ce_pgd():
    """The trainer's attack for AT is Madry's: a uniform start in the eps-ball, then CE sign steps.
    Run in float64 with the reference ops, so the comparison is exact up to float64 rounding."""
    assert (AT.objective, AT.random_start) == ("ce", "uniform")
    cfg = train_config(dataset="mnist", model="smallcnn", method=AT(), eps=EPS, attack_steps=3, attack_step_size=0.1,
                      kernels="reference", device="cpu", amp="off", compile=False, seed=5).validate()
    model = _model(13).train()
    x, _, y = _batch(13)
    step = 4
    adv = TrainStep(cfg, model, torch.device("cpu")).attack(x, y, step)
    assert model.training  # the attack ran in eval mode and restored the mode
    g = torch.Generator().manual_seed(dist.derive_seed(cfg.seed, "attack-start", step))
    start = random_start(x, EPS, "linf", "uniform", generator=g)
    # uniform in the ball, not TRADES' 0.001 N(0, 1): the start spreads over the whole radius
    assert (start - x).abs().max() > 0.9 * EPS
    expected = _ce_pgd_by_hand(model.eval(), x, y, start, 0.1, 3)
    torch.testing.assert_close(adv.x_adv, expected, rtol=0, atol=1e-12)


def _sensitivity_by_loop(model, x, x_adv):
    """||grad_{x'_i} KL(p_i || q_i)|| one sample at a time (independent of the batched paths)."""
    out = []
    for i in range(len(x)):
        xi = x_adv[i:i + 1].clone().requires_grad_(True)
        kl = _kl(model(x[i:i + 1]).detach(), model(xi)).sum()
        (g,) = torch.autograd.grad(kl, xi)
        out.append(g.norm())
    return torch.stack(out)


@pytest.mark.parametrize("seed", [3, 4])
def test_dtrades_exact_matches_formula(seed):
    m = DTRADES(sensitivity="exact", alpha=0.7, beta=1.3)
    out = _compare(m, seed, sens_fn=_sensitivity_by_loop)
    lam = out.stats["lambda"]
    assert lam.min() >= 0 and lam.max() <= m.alpha + m.beta + 1e-12


def test_dtrades_sensitivity_modes_agree_in_eval_mode():
    model = _model(5)
    x, x_adv, y = _batch(5)
    exact = _loss(DTRADES(sensitivity="exact"), model, x, y, AdvBatch(x_adv)).stats["sensitivity"]
    func = per_sample_sensitivity(model, x_adv, model(x).detach())
    torch.testing.assert_close(func, exact, rtol=1e-5, atol=0)
    torch.testing.assert_close(func, _sensitivity_by_loop(model, x, x_adv), rtol=1e-5, atol=0)


def test_dtrades_func_mode_uses_running_stats_with_batchnorm():
    model = random_smallcnn(6, batchnorm=True).double().eval()
    x, x_adv, y = _batch(6)
    exact = _loss(DTRADES(sensitivity="exact"), model, x, y, AdvBatch(x_adv)).stats["sensitivity"]
    func = _loss(DTRADES(sensitivity="func"), model, x, y, AdvBatch(x_adv)).stats["sensitivity"]
    torch.testing.assert_close(func, exact, rtol=1e-5, atol=0)


def test_dtrades_attack_sensitivity_is_last_pgd_gradient():
    """The attack runs in float64 (double model and inputs; the attack keeps float64 through) from a
    start drawn here, and the reference gradient is taken at that same start, so both sides compute
    the same float64 quantity: they agree to ~1e-10 on any CPU. (A float32 attack against a float64
    reference is not exact: at 0.001 from x the KL gradient is a difference of nearly equal softmaxes,
    and float32 rounding there reached 1.5e-4 relative error on some CPUs.)"""
    model = _model(7)
    x, _, y = _batch(7)
    m = DTRADES(sensitivity="attack")
    assert (m.objective, m.random_start) == ("kl", "trades")
    start = random_start(x, EPS, "linf", m.random_start, generator=torch.Generator().manual_seed(11))
    assert start.dtype == torch.float64
    res = pgd_perturb(model, x, y, eps=EPS, step_size=0.1, steps=1, norm="linf", objective=m.objective, start=start)
    assert res.last_grad_norm.dtype == torch.float64
    x0 = start.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(_kl(model(x).detach(), model(x0)).sum(), x0)
    expected = g.flatten(1).norm(dim=1)
    assert (expected > 0).all()
    torch.testing.assert_close(res.last_grad_norm, expected, rtol=1e-10, atol=0)
    # and the "attack" sensitivity is that gradient norm, handed over unchanged
    out = _loss(m, model, x, y, AdvBatch(res.x_adv, res.last_grad_norm))
    assert torch.equal(out.stats["sensitivity"], res.last_grad_norm)


def test_dtrades_with_constant_lambda_equals_trades():
    c = 2.5
    model = _model(8)
    x, x_adv, y = _batch(8)
    ones = torch.ones(len(y), dtype=torch.float64)
    ld = _loss(DTRADES(sensitivity="attack", normalize="none", alpha=0.0, beta=c), model, x, y, AdvBatch(x_adv, ones))
    lt = _loss(TRADES(beta=c), model, x, y, AdvBatch(x_adv))
    assert torch.equal(ld.stats["lambda"], torch.full_like(ones, c))
    torch.testing.assert_close(ld.loss, lt.loss, rtol=1e-14, atol=0)


def test_dtrades_mean_normalisation_sets_batch_mean_lambda():
    model = _model(9)
    x, x_adv, y = _batch(9)
    m = DTRADES(normalize="mean", lambda_scale=3.0)
    lam = _loss(m, model, x, y, AdvBatch(x_adv)).stats["lambda"]
    assert math.isclose(float(lam.mean()), 3.0 * (m.alpha + m.beta), rel_tol=1e-9)


def test_a_dtrades_record_with_the_former_option_names_reads_under_the_names_now():
    """Run folders and checkpoints written before the rename record D-TRADES' normalize and lambda_scale
    as norm and scale: they load (and so resume) as the same method, written back under the names now."""
    old = {"name": "dtrades", "alpha": 1.0, "beta": 1.0, "norm": "mean", "scale": 3.0, "sensitivity": "attack",
           "sync": "local", "entropy_eps": 1e-12}
    m = method_from_dict(old)
    assert m == DTRADES(normalize="mean", lambda_scale=3.0, sensitivity="attack")
    assert m.to_dict() == {**{k: v for k, v in old.items() if k not in ("norm", "scale")},
                           "normalize": "mean", "lambda_scale": 3.0}
    assert TrainConfig.from_dict({"method": old}).validate().method == m
    assert method_from_dict(m.to_dict()) == m
    with pytest.raises(ConfigError, match="unknown trades option 'norm'"):   # a rename is one method's own
        method_from_dict({"name": "trades", "norm": "mean"})


@pytest.mark.parametrize("base", ["at", "mart"])
def test_faal_other_bases_reweight_per_sample_losses(base):
    model = _model(10)
    x, x_adv, y = _batch(10, n=20)
    m = FAAL(base=base, r=0.5)
    out = _loss(m, model, x, y, AdvBatch(x_adv))
    w = out.stats["class_weights"].double()
    z, z_adv = model(x), model(x_adv)
    if base == "at":
        per = _ce(z_adv, y)
    else:
        idx = torch.arange(len(y))
        q, p = _probs(z_adv), _probs(z)
        qm = q.clone()
        qm[idx, y] = -1
        per = _ce(z_adv, y) - torch.log(1.0001 - q[idx, qm.argmax(1)]) + m.beta * _kl(z, z_adv) * (1 - p[idx, y])
    ref = (10 / len(y)) * (w[y] * per).sum()
    torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=0)


def test_class_margins_and_missing_classes():
    z_adv = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 1, 3])
    means, counts = class_margins(z_adv, y, 4)
    q = torch.softmax(z_adv, 1)
    for c in range(4):
        rows = [i for i in range(6) if int(y[i]) == c]
        if not rows:
            assert means[c] == -1 and counts[c] == 0
            continue
        m = [max(q[i, k] for k in range(4) if k != c) - q[i, c] for i in rows]
        assert math.isclose(float(means[c]), float(sum(m) / len(m)), rel_tol=1e-12)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("r", [0.01, 0.1, 0.5, 2.0])
def test_dro_solver_matches_scipy(seed, r):
    from scipy.optimize import minimize

    rng = np.random.default_rng(seed)
    c = int(rng.integers(3, 12))
    a = rng.normal(size=c) * rng.uniform(0.1, 20)
    u = np.full(c, 1.0 / c)

    def kl(w):
        return float(np.sum(u * np.log(u / w)))

    best = None
    for start in (u, np.exp(a - a.max()) / np.exp(a - a.max()).sum() * 0.5 + 0.5 * u):
        res = minimize(lambda w: -a @ w, start, jac=lambda w: -a, method="SLSQP",
                       bounds=[(1e-12, 1)] * c,
                       constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1},
                                    {"type": "ineq", "fun": lambda w: r - kl(w)}],
                       options={"ftol": 1e-14, "maxiter": 1000})
        if res.success and (best is None or -res.fun > -best.fun):
            best = res
    assert best is not None
    w = dro_class_weights(torch.tensor(a), r).double().numpy()
    assert abs(w.sum() - 1) < 1e-6 and (w > 0).all()
    assert kl(w) <= r * (1 + 1e-4) + 1e-9
    assert a @ w >= -best.fun - 1e-5 * (1 + abs(best.fun))  # at least as good as the generic solver
    np.testing.assert_allclose(w, best.x, atol=2e-3)


def test_dro_solver_edge_cases():
    a = torch.tensor([0.3, 0.3, 0.3])
    third = torch.full((3,), 1 / 3, dtype=torch.float64)
    torch.testing.assert_close(dro_class_weights(a, 0.5), third)
    torch.testing.assert_close(dro_class_weights(torch.tensor([1.0, 2.0, 3.0]), 0.0), third)
    w = dro_class_weights(torch.tensor([0.0, 0.0, 5.0]), 0.1)
    assert w[2] > w[0] and torch.isclose(w[0], w[1])


@pytest.mark.parametrize("method", [TRADES(beta=4.0), MART(beta=5.0), DTRADES(), FAAL(r=0.3, base="trades", beta=2.0),
                                    FAAL(r=0.3, base="mart", beta=2.0)], ids=lambda m: f"{m.name}-{getattr(m, 'base', '')}")
def test_weighted_kl_is_each_samples_kl_term_of_the_loss(method):
    """The logged weighted_kl (TensorBoard's train/weighted_kl_mean) is the KL term as the loss weights it,
    checked against the independent float64 formulas."""
    model = _model(3)
    x, x_adv, y = _batch(3)
    out = _loss(method, model, x, y, AdvBatch(x_adv, None))
    with torch.no_grad():
        z, z_adv = model(x), model(x_adv)
        kl, p_y = _kl(z, z_adv), _probs(z)[torch.arange(len(y)), y]
    if method.name == "dtrades":
        weight = out.stats["lambda"]
    else:
        base = method.base if method.name == "faal" else method.name
        weight = method.beta * ((1 - p_y) if base == "mart" else 1)
        if method.name == "faal":
            weight = weight * 10 * out.stats["class_weights"].double()[y]
    torch.testing.assert_close(out.stats["weighted_kl"], weight * kl, rtol=1e-10, atol=1e-14)
