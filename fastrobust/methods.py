"""Training methods behind one interface.

``method(model, x, y) -> MethodOutput(loss, stats)``, split into ``attack`` (eval mode, no
parameter gradients) and ``loss`` (train mode) so the trainer and the step profiler can time the
two phases. ``stats`` holds detached per-sample diagnostics (KL, lambda, entropy, sensitivity) and
per-class ones (FAAL's weights) for logging.

The loss heads go through :mod:`kernels` (fused Triton on CUDA, plain PyTorch reference ops on the
CPU, one switch: ``cfg.kernels``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

from .attacks import eval_mode, fp32, kl_divergence, pgd_perturb
from .config import TrainConfig
from .errors import unknown_name


@dataclass
class AdvBatch:
    x_adv: torch.Tensor | None
    grad_norm: torch.Tensor | None = None   # per-sample ||grad_{x'} objective|| at the last PGD iterate


@dataclass
class MethodOutput:
    loss: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    logits_nat: torch.Tensor | None = None
    logits_adv: torch.Tensor | None = None


class Method:
    name = "base"
    objective = "kl"          # the training attack's objective
    random_start = "trades"   # x + 0.001 N(0, 1), as in the official TRADES and MART code

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> AdvBatch:
        with eval_mode(model):
            res = pgd_perturb(model, x, y, eps=self.cfg.eps, step_size=self.cfg.attack_step_size,
                              steps=self.cfg.attack_steps, norm=self.cfg.norm,
                              random_start_kind=self.random_start, objective=self.objective)
        return AdvBatch(res.x_adv, res.last_grad_norm)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, adv: AdvBatch) -> MethodOutput:
        raise NotImplementedError

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> MethodOutput:
        return self.loss(model, x, y, self.attack(model, x, y))

    def _head_stats(self, z: torch.Tensor, z_adv: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            head = kernels.loss_head(z.detach(), z_adv.detach(), y, self.cfg.entropy_eps, backend=self.cfg.kernels)
        return {"kl": head.kl, "entropy": head.entropy, "ce_nat": head.ce_nat, "ce_adv": head.ce_adv}


class Standard(Method):
    """Cross-entropy on clean inputs."""
    name = "standard"

    def attack(self, model, x, y):
        return AdvBatch(None)

    def loss(self, model, x, y, adv):
        z = model(x)
        ce = F.cross_entropy(fp32(z), y, reduction="none")
        return MethodOutput(ce.mean(), {"ce_nat": ce.detach()}, logits_nat=z)


class TRADES(Method):
    """Zhang et al. 2019: CE(f(x), y) + beta (1/B) sum_i KL(p_i || q_i), x' from the KL attack.

    The clean forward is made once in train mode and serves both terms (the official code makes
    it twice); the KL target p is not detached, as in the official code."""
    name = "trades"

    def loss(self, model, x, y, adv):
        z, z_adv = model(x), model(adv.x_adv)
        loss = kernels.trades_loss(z, z_adv, y, self.cfg.beta, backend=self.cfg.kernels)
        return MethodOutput(loss, self._head_stats(z, z_adv, y), z, z_adv)


class MART(Method):
    """Wang et al. 2020: BCE(f(x'), y) + beta (1/B) sum_i KL(p_i || q_i) (1 - p_{i,y}), x' from CE PGD,
    with BCE = CE(f(x'), y) - log(1.0001 - q_{y'}) and y' the most probable wrong class under q."""
    name = "mart"
    objective = "ce"

    def loss(self, model, x, y, adv):
        z, z_adv = model(x), model(adv.x_adv)
        loss = kernels.mart_loss(z, z_adv, y, self.cfg.beta, backend=self.cfg.kernels)
        return MethodOutput(loss, self._head_stats(z, z_adv, y), z, z_adv)


class DTRADES(Method):
    """TRADES with a per-sample weight lambda_i = alpha H_i + beta s_i (both batch-normalised).

    H_i = -sum_c p_ic log(p_ic + eps) is the clean prediction's entropy, s_i = ||grad_{x'_i} KL(p_i||q_i)||_2
    the sensitivity at the adversarial point. lambda is a weight: it is detached. Sensitivity modes:
      exact  - the input gradient of the training forward at the final x' (one extra input-gradient
               backward, no extra forward; with batch norm in train mode it includes the batch coupling);
      attack - the input gradient of the last PGD step, already computed: free;
      func   - torch.func vmap(grad) per sample, with batch norm on running statistics (a one-sample
               batch has none); equals ``exact`` for models without batch-coupled layers or in eval mode.
    ``lambda_norm="mean"`` with ``lambda_scale`` sets the batch-mean lambda to lambda_scale (alpha + beta),
    e.g. to match a TRADES beta: the paper's min-max lambda averages about 1 while TRADES uses 4 to 6.
    """
    name = "dtrades"

    def loss(self, model, x, y, adv):
        cfg = self.cfg
        z = model(x)
        x_adv = adv.x_adv
        if cfg.sensitivity == "exact":
            x_adv = x_adv.detach().requires_grad_(True)
        z_adv = model(x_adv)
        if cfg.sensitivity == "exact":
            log_p = F.log_softmax(fp32(z.detach()), dim=1)
            (g,) = torch.autograd.grad(kl_divergence(log_p, z_adv).sum(), x_adv, retain_graph=True)
            s = torch.linalg.vector_norm(fp32(g.flatten(1)), dim=1)
        elif cfg.sensitivity == "attack":
            s = fp32(adv.grad_norm)
        else:
            s = per_sample_sensitivity(model, x_adv, z.detach())
        loss, lam, ce, kl, entropy = kernels.dtrades_loss(
            z, z_adv, y, s.detach(), cfg.lambda_alpha, cfg.lambda_beta, cfg.lambda_norm, cfg.lambda_scale,
            cfg.entropy_eps, backend=cfg.kernels)
        stats = {"kl": kl.detach(), "lambda": lam.detach(), "entropy": entropy.detach(),
                 "sensitivity": s.detach(), "ce_nat": ce.detach()}
        return MethodOutput(loss, stats, z, z_adv)


def per_sample_sensitivity(model: nn.Module, x_adv: torch.Tensor, clean_logits: torch.Tensor) -> torch.Tensor:
    """||grad_{x'_i} KL(p_i || q_i)||_2 per sample with torch.func (vmap over grad), in eval mode.

    Only input gradients are formed: parameters enter as constants, so no per-sample parameter
    gradient is ever materialised."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    log_p = F.log_softmax(fp32(clean_logits), dim=1)

    def kl_one(xi: torch.Tensor, log_pi: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, (params, buffers), (xi.unsqueeze(0),))
        return kl_divergence(log_pi.unsqueeze(0), logits).sum()

    with eval_mode(model):
        g = vmap(grad(kl_one))(x_adv.detach(), log_p)
    return torch.linalg.vector_norm(fp32(g.flatten(1)), dim=1)


# ----------------------------------------------------------------------------------------------
# FAAL (Zhang et al., CVPR 2024): class-wise distributionally robust reweighting.

def class_margins(z_adv: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean adversarial margin max_{k != y} q_k - q_y, and per-class counts.
    Classes absent from the batch get margin -1 (they carry no weight in the objective anyway)."""
    q = F.softmax(fp32(z_adv.detach()), dim=1)
    q_y = q.gather(1, y[:, None]).squeeze(1)
    q_wrong = q.scatter(1, y[:, None], float("-inf")).amax(1)
    margin = q_wrong - q_y
    counts = torch.bincount(y, minlength=num_classes).to(q.dtype)
    sums = torch.zeros(num_classes, dtype=q.dtype, device=q.device).index_add_(0, y, margin)
    means = torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, -1.0))
    return means, counts


def _kl_uniform(w: torch.Tensor) -> torch.Tensor:
    c = w.shape[-1]
    return (-math.log(c) - torch.log(w)).mean(-1)


def dro_class_weights(a: torch.Tensor, r: float, iters: int = 100) -> torch.Tensor:
    """argmax_w sum_c a_c w_c over the simplex subject to KL(uniform || w) <= r.

    KKT gives w_c = nu u_c / (mu - a_c) with mu > max a and nu normalising; KL(u || w(mu)) falls
    monotonically from infinity to 0 as mu grows, so mu is found by bisection on log(mu - max a).
    A fixed iteration count keeps it on the device with no host synchronisation. Returns float64."""
    a = a.detach().to(torch.float64)
    c = a.shape[0]
    uniform = torch.full_like(a, 1.0 / c)
    spread = a.max() - a.min()
    if r <= 0:
        return uniform
    scale = torch.clamp(spread, min=1e-30)
    lo = torch.log(scale) + math.log(1e-15)
    hi = torch.log(scale) + math.log(1e8)

    def weights(log_gap: torch.Tensor) -> torch.Tensor:
        inv = 1.0 / (a.max() + torch.exp(log_gap) - a)
        return inv / inv.sum()

    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        too_far = _kl_uniform(weights(mid)) > r   # KL too large: mu must grow
        lo = torch.where(too_far, mid, lo)
        hi = torch.where(too_far, hi, mid)
    w = weights(hi)  # hi always satisfies the constraint
    return torch.where(spread > 0, w, uniform)


class FAAL(Method):
    """Fairness-aware adversarial learning: the base loss reweighted per class by the worst case
    within a KL ball of radius r around the uniform class distribution:
        L = (C/B) sum_i w[y_i] l_i,  w = dro_class_weights(n_c * m_c, r), w detached.
    Base losses (``faal_base``): "at" - CE(f(x'), y) with x' from uniform-start CE PGD (Madry AT);
    "trades" - CE(f(x), y) + beta KL(p||q) with the TRADES KL attack (default: the family D-TRADES
    belongs to); "mart" - MART's per-sample loss with its CE attack."""
    name = "faal"

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.objective = "ce" if cfg.faal_base in ("at", "mart") else "kl"
        self.random_start = "uniform" if cfg.faal_base == "at" else "trades"

    def loss(self, model, x, y, adv):
        cfg = self.cfg
        if cfg.faal_base == "at":
            z, z_adv = None, model(adv.x_adv)
        else:
            z, z_adv = model(x), model(adv.x_adv)
        num_classes = z_adv.shape[1]
        margins, counts = class_margins(z_adv, y, num_classes)
        w = dro_class_weights(counts.double() * margins.double(), cfg.faal_r).to(fp32(z_adv).dtype)
        sample_weight = (num_classes * w)[y].detach()
        if cfg.faal_base == "at":
            ce = F.cross_entropy(fp32(z_adv), y, reduction="none")
            loss = (sample_weight * ce).mean()
            stats = {"ce_adv": ce.detach()}
        elif cfg.faal_base == "trades":
            loss = kernels.trades_loss(z, z_adv, y, cfg.beta, sample_weight=sample_weight, backend=cfg.kernels)
            stats = self._head_stats(z, z_adv, y)
        else:
            loss = kernels.mart_loss(z, z_adv, y, cfg.beta, sample_weight=sample_weight, backend=cfg.kernels)
            stats = self._head_stats(z, z_adv, y)
        stats.update(class_weights=w.detach(), class_margins=margins.detach())
        return MethodOutput(loss, stats, z, z_adv)


METHODS: dict[str, Callable[[TrainConfig], Method]] = {
    "standard": Standard, "trades": TRADES, "mart": MART, "faal": FAAL, "dtrades": DTRADES}


def build_method(cfg: TrainConfig) -> Method:
    if cfg.method not in METHODS:
        raise unknown_name("method", cfg.method, METHODS)
    return METHODS[cfg.method](cfg)
