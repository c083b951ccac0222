"""Each method's loss and parameter gradients against an independent float64 computation of its formula."""
import math

import numpy as np
import pytest
import torch

from conftest import random_smallcnn
from fastrobust.config import TrainConfig
from fastrobust.methods import AdvBatch, build_method, class_margins, dro_class_weights, per_sample_sensitivity


def _cfg(method, **kw):
    base = dict(dataset="mnist", model="smallcnn", method=method, eps=0.3, attack_steps=3, attack_step_size=0.1,
                kernels="reference")
    base.update(kw)
    return TrainConfig(**base).validate()


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


def formula(method, model, x, x_adv, y, cfg, sens=None, class_w=None):
    z, z_adv = model(x), model(x_adv)
    idx = torch.arange(len(y))
    if method == "standard":
        return _ce(z, y).mean()
    if method == "trades":
        return _ce(z, y).mean() + cfg.beta * _kl(z, z_adv).mean()
    if method == "mart":
        q, p = _probs(z_adv), _probs(z)
        q_masked = q.clone()
        q_masked[idx, y] = -1
        wrong = q_masked.argmax(1)
        bce = _ce(z_adv, y) - torch.log(1.0001 - q[idx, wrong])
        return (bce + cfg.beta * _kl(z, z_adv) * (1 - p[idx, y])).mean()
    if method == "dtrades":
        p = _probs(z).detach()
        h = -(p * torch.log(p + cfg.entropy_eps)).sum(1)
        mm = lambda v: (v - v.min()) / (v.max() - v.min())  # noqa: E731
        lam = cfg.lambda_scale * (cfg.lambda_alpha * mm(h) + cfg.lambda_beta * mm(sens))
        return _ce(z, y).mean() + (lam * _kl(z, z_adv)).mean()
    if method == "faal":
        c = z_adv.shape[1]
        per = _ce(z, y) + cfg.beta * _kl(z, z_adv)
        return (c / len(y)) * (class_w[y] * per).sum()
    raise AssertionError(method)


def _compare(method, cfg, seed, sens_fn=None):
    model = _model(seed)
    x, x_adv, y = _batch(seed)
    m = build_method(cfg)
    out = m.loss(model, x, y, AdvBatch(x_adv, None))
    grads = torch.autograd.grad(out.loss, _params(model))
    sens = out.stats.get("sensitivity")
    class_w = out.stats.get("class_weights")
    if class_w is not None:
        class_w = class_w.double()
    ref = formula(method, model, x, x_adv, y, cfg, sens=sens_fn(model, x, x_adv) if sens_fn else sens, class_w=class_w)
    ref_grads = torch.autograd.grad(ref, _params(model))
    torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-12)
    return out


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("method,kw", [("standard", {}), ("trades", {"beta": 4.0}), ("mart", {"beta": 5.0}),
                                       ("faal", {"faal_r": 0.3, "faal_base": "trades", "beta": 2.0})])
def test_loss_and_gradients_match_formula(method, kw, seed):
    _compare(method, _cfg(method, **kw), seed)


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
    cfg = _cfg("dtrades", sensitivity="exact", lambda_alpha=0.7, lambda_beta=1.3)
    out = _compare("dtrades", cfg, seed, sens_fn=_sensitivity_by_loop)
    lam = out.stats["lambda"]
    assert lam.min() >= 0 and lam.max() <= cfg.lambda_alpha + cfg.lambda_beta + 1e-12


def test_dtrades_sensitivity_modes_agree_in_eval_mode():
    model = _model(5)
    x, x_adv, y = _batch(5)
    exact = build_method(_cfg("dtrades", sensitivity="exact")).loss(model, x, y, AdvBatch(x_adv)).stats["sensitivity"]
    func = per_sample_sensitivity(model, x_adv, model(x).detach())
    torch.testing.assert_close(func, exact, rtol=1e-5, atol=0)
    torch.testing.assert_close(func, _sensitivity_by_loop(model, x, x_adv), rtol=1e-5, atol=0)


def test_dtrades_func_mode_uses_running_stats_with_batchnorm():
    model = random_smallcnn(6, batchnorm=True).double().eval()
    x, x_adv, y = _batch(6)
    exact = build_method(_cfg("dtrades", sensitivity="exact")).loss(model, x, y, AdvBatch(x_adv)).stats["sensitivity"]
    func = build_method(_cfg("dtrades", sensitivity="func")).loss(model, x, y, AdvBatch(x_adv)).stats["sensitivity"]
    torch.testing.assert_close(func, exact, rtol=1e-5, atol=0)


def test_dtrades_attack_sensitivity_is_last_pgd_gradient():
    model = _model(7).float()
    x, _, y = _batch(7)
    x = x.float()
    cfg = _cfg("dtrades", sensitivity="attack", attack_steps=1)
    torch.manual_seed(11)
    adv = build_method(cfg).attack(model, x, y)
    torch.manual_seed(11)
    x0 = (x + 0.001 * torch.randn_like(x)).clamp(0, 1).requires_grad_(True)  # the TRADES start
    (g,) = torch.autograd.grad(_kl(model(x).detach().double(), model(x0).double()).sum(), x0)
    torch.testing.assert_close(adv.grad_norm, g.flatten(1).norm(dim=1).float(), rtol=1e-4, atol=1e-7)


def test_dtrades_with_constant_lambda_equals_trades():
    c = 2.5
    model = _model(8)
    x, x_adv, y = _batch(8)
    ones = torch.ones(len(y), dtype=torch.float64)
    d = build_method(_cfg("dtrades", sensitivity="attack", lambda_norm="none", lambda_alpha=0.0, lambda_beta=c))
    t = build_method(_cfg("trades", beta=c))
    ld = d.loss(model, x, y, AdvBatch(x_adv, ones))
    lt = t.loss(model, x, y, AdvBatch(x_adv))
    assert torch.equal(ld.stats["lambda"], torch.full_like(ones, c))
    torch.testing.assert_close(ld.loss, lt.loss, rtol=1e-14, atol=0)


def test_dtrades_mean_normalisation_sets_batch_mean_lambda():
    model = _model(9)
    x, x_adv, y = _batch(9)
    cfg = _cfg("dtrades", lambda_norm="mean", lambda_scale=3.0)
    lam = build_method(cfg).loss(model, x, y, AdvBatch(x_adv)).stats["lambda"]
    assert math.isclose(float(lam.mean()), 3.0 * (cfg.lambda_alpha + cfg.lambda_beta), rel_tol=1e-9)


@pytest.mark.parametrize("base", ["at", "mart"])
def test_faal_other_bases_reweight_per_sample_losses(base):
    model = _model(10)
    x, x_adv, y = _batch(10, n=20)
    cfg = _cfg("faal", faal_base=base, faal_r=0.5)
    out = build_method(cfg).loss(model, x, y, AdvBatch(x_adv))
    w = out.stats["class_weights"].double()
    z, z_adv = model(x), model(x_adv)
    if base == "at":
        per = _ce(z_adv, y)
    else:
        idx = torch.arange(len(y))
        q, p = _probs(z_adv), _probs(z)
        qm = q.clone()
        qm[idx, y] = -1
        per = _ce(z_adv, y) - torch.log(1.0001 - q[idx, qm.argmax(1)]) + cfg.beta * _kl(z, z_adv) * (1 - p[idx, y])
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
