"""Training methods behind one interface.

``method(model, x, y) -> MethodOutput(loss, stats)``, split into ``attack`` (eval mode, no
parameter gradients) and ``loss`` (train mode) so the trainer and the step profiler can time the
two phases. ``stats`` holds detached per-sample diagnostics (KL, lambda, entropy, sensitivity) and
per-class ones (FAAL's weights) for logging.

The loss heads go through :mod:`kernels` (fused Triton on CUDA, plain PyTorch reference ops on the
CPU, one switch: ``cfg.kernels``).

Under DDP (``method.distributed = True``, set by the trainer's step) every rank holds a shard of the
global batch. What is per sample stays per sample; what couples the batch is handled explicitly:
D-TRADES' lambda normalisation is per rank (``lambda_sync="local"``, the paper's per-GPU batch) or
over the global batch (``"global"``: min/max or sum/count all-reduced); FAAL's class margins are
always all-reduced (per-class sums and counts), so every rank uses the same class weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

from . import distributed as dist
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


def attack_start(x: torch.Tensor, *, kind: str, eps: float, norm: str, seed: int, step: int,
                 rank: int = 0, world_size: int = 1) -> torch.Tensor | None:
    """The training attack's first iterate ``x + delta`` (projected by the attack), or None for no
    random start.

    ``delta`` is drawn for the whole global batch (``world_size`` shards of ``len(x)``) from a
    generator seeded by (seed, step), and this rank keeps rows ``rank::world_size``: the loaders
    shard like DistributedSampler, so that row is the one its sample occupies in the global batch.
    Each sample's noise is therefore the same whatever the number of processes, and needs no RNG
    state in checkpoints. ``kind``: "trades" (0.001 N(0, 1)), "uniform" (uniform in the ball)."""
    if kind == "none":
        return None
    shape = (x.shape[0] * world_size,) + tuple(x.shape[1:])
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    g = torch.Generator(device=x.device)
    g.manual_seed(dist.derive_seed(seed, "attack-start", step))
    opts = dict(generator=g, device=x.device, dtype=dtype)
    if kind == "trades":
        delta = 0.001 * torch.randn(shape, **opts)
    elif norm == "linf":
        delta = (2 * torch.rand(shape, **opts) - 1) * eps
    else:  # uniform in the L2 ball: gaussian direction, radius eps * U^(1/d)
        direction = torch.randn(shape, **opts)
        direction = direction / torch.linalg.vector_norm(direction.flatten(1), dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
        radius = eps * torch.rand(shape[0], **opts).pow(1.0 / x[0].numel())
        delta = direction * radius.view(-1, *[1] * (x.dim() - 1))
    return x + delta[rank::world_size].to(x.dtype)


class Method:
    name = "base"
    objective = "kl"          # the training attack's objective
    random_start = "trades"   # x + 0.001 N(0, 1), as in the official TRADES and MART code
    attacks = True            # False: the method trains on clean inputs only

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.distributed = False  # set by TrainStep under DDP: batch-coupled statistics are all-reduced

    def start(self, x: torch.Tensor, step: int, rank: int = 0, world_size: int = 1) -> torch.Tensor | None:
        """The attack's first iterate for training step ``step`` (see :func:`attack_start`)."""
        if not self.attacks:
            return None
        return attack_start(x, kind=self.random_start, eps=self.cfg.eps, norm=self.cfg.norm, seed=self.cfg.seed,
                            step=step, rank=rank, world_size=world_size)

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, start: torch.Tensor | None = None) -> AdvBatch:
        """PGD from ``start`` when given, else from a random start drawn from the global RNG."""
        with eval_mode(model):
            res = pgd_perturb(model, x, y, eps=self.cfg.eps, step_size=self.cfg.attack_step_size,
                              steps=self.cfg.attack_steps, norm=self.cfg.norm,
                              random_start_kind=self.random_start, objective=self.objective, start=start)
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
    attacks = False

    def attack(self, model, x, y, start=None):
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
    ``lambda_sync="global"`` normalises H and s over the global batch (min/max or sum/count all-reduced
    across ranks); lambda is then formed here and the loss is ``kernels.trades_loss`` with it as the
    per-sample KL weight - the same loss ``kernels.dtrades_loss`` computes with its in-kernel
    normalisation. "local" (default) normalises over each rank's batch, as the paper's per-GPU batch did.
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
        if cfg.lambda_sync == "global" and cfg.lambda_norm != "none":
            head = kernels.loss_head(z.detach(), z_adv.detach(), y, cfg.entropy_eps, backend=cfg.kernels)
            entropy, ce, kl = head.entropy, head.ce_nat, head.kl
            h_n, s_n = normalize_global([entropy, fp32(s.detach())], cfg.lambda_norm, self.distributed)
            lam = cfg.lambda_scale * (cfg.lambda_alpha * h_n + cfg.lambda_beta * s_n)
            loss = kernels.trades_loss(z, z_adv, y, lam, backend=cfg.kernels)
        else:
            loss, lam, ce, kl, entropy = kernels.dtrades_loss(
                z, z_adv, y, s.detach(), cfg.lambda_alpha, cfg.lambda_beta, cfg.lambda_norm, cfg.lambda_scale,
                cfg.entropy_eps, backend=cfg.kernels)
        stats = {"kl": kl.detach(), "lambda": lam.detach(), "entropy": entropy.detach(),
                 "sensitivity": s.detach(), "ce_nat": ce.detach()}
        return MethodOutput(loss, stats, z, z_adv)


def normalize_global(values: list[torch.Tensor], mode: str, distributed: bool) -> list[torch.Tensor]:
    """Batch-normalise each (B,) statistic with ``kernels.reference.normalize_batch``'s formula, the
    batch being the global one when ``distributed``: one all-reduce for all of them (MAX of -min and
    max for "minmax", SUM of sums and counts for "mean"). "minmax": (v - lo) / (hi - lo), 0.5 where
    hi == lo; "mean": v / mean, 1 where the mean is 0."""
    values = [v.detach() for v in values]
    if mode == "minmax":
        stats = torch.stack([t for v in values for t in (-v.min(), v.max())])
        if distributed:
            stats = dist.all_reduce(stats, "max")
        out = []
        for i, v in enumerate(values):
            lo, hi = -stats[2 * i], stats[2 * i + 1]
            span = hi - lo
            spread = span > 0
            out.append(torch.where(spread, (v - lo) / torch.where(spread, span, torch.ones_like(span)),
                                   torch.full_like(v, 0.5)))
        return out
    if mode == "mean":
        stats = torch.stack([v.sum() for v in values] + [torch.tensor(float(len(values[0])), device=values[0].device,
                                                                       dtype=values[0].dtype)])
        if distributed:
            stats = dist.all_reduce(stats, "sum")
        out = []
        for i, v in enumerate(values):
            m = stats[i] / stats[-1]
            nonzero = m != 0
            out.append(torch.where(nonzero, v / torch.where(nonzero, m, torch.ones_like(m)), torch.ones_like(v)))
        return out
    if mode == "none":
        return values
    raise unknown_name("lambda normalisation", mode, ("minmax", "mean", "none"))


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (torch.func must not run DDP's forward)."""
    from torch.nn.parallel import DistributedDataParallel
    return model.module if isinstance(model, DistributedDataParallel) else model


def per_sample_sensitivity(model: nn.Module, x_adv: torch.Tensor, clean_logits: torch.Tensor) -> torch.Tensor:
    """||grad_{x'_i} KL(p_i || q_i)||_2 per sample with torch.func (vmap over grad), in eval mode.

    Only input gradients are formed: parameters enter as constants, so no per-sample parameter
    gradient is ever materialised."""
    from torch.func import functional_call, grad, vmap

    model = _unwrap(model)
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

def class_margin_sums(z_adv: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums of the adversarial margin max_{k != y} q_k - q_y, and per-class counts."""
    q = F.softmax(fp32(z_adv.detach()), dim=1)
    q_y = q.gather(1, y[:, None]).squeeze(1)
    q_wrong = q.scatter(1, y[:, None], float("-inf")).amax(1)
    margin = q_wrong - q_y
    counts = torch.bincount(y, minlength=num_classes).to(q.dtype)
    sums = torch.zeros(num_classes, dtype=q.dtype, device=q.device).index_add_(0, y, margin)
    return sums, counts


def class_margins(z_adv: torch.Tensor, y: torch.Tensor, num_classes: int,
                  distributed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean adversarial margin max_{k != y} q_k - q_y, and per-class counts, over the global
    batch when ``distributed`` (sums and counts all-reduced, so every rank gets the same numbers).
    Classes absent from the batch get margin -1 (they carry no weight in the objective anyway)."""
    sums, counts = class_margin_sums(z_adv, y, num_classes)
    if distributed:
        sums, counts = dist.all_reduce(torch.stack([sums, counts]), "sum").unbind(0)
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
        margins, counts = class_margins(z_adv, y, num_classes, self.distributed)
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
