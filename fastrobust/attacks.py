"""Attacks behind one interface: ``attack(model, x, y) -> x_adv``.

Every attack puts the model in eval mode for its duration and restores each module's previous
mode afterwards, keeps inputs in [0, 1] (normalisation lives inside the model), and takes every
option explicitly: there is no hidden default radius or step size to get wrong.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from kernels.reference import kl_divergence

from .errors import ConfigError, check_eps, check_positive_int, unknown_name
from .options import check_fields, option

NORMS = kernels.PGD_NORMS                      # "linf", "l2"
RANDOM_STARTS = ("uniform", "trades", "none")  # in the ball; x + 0.001 N(0, 1) (TRADES, MART); none
METHOD_S = "method"   # a training attack's objective or random start: the one its method declares


def _ce_objective(logits_adv: torch.Tensor, y: torch.Tensor, log_p: torch.Tensor | None) -> torch.Tensor:
    return F.cross_entropy(fp32(logits_adv), y, reduction="none")


def _kl_objective(logits_adv: torch.Tensor, y: torch.Tensor, log_p: torch.Tensor | None) -> torch.Tensor:
    return kl_divergence(log_p, F.log_softmax(fp32(logits_adv), dim=1))


def _cw_objective(logits_adv: torch.Tensor, y: torch.Tensor, log_p: torch.Tensor | None) -> torch.Tensor:
    z = fp32(logits_adv)
    true = z.gather(1, y[:, None]).squeeze(1)
    other = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), float("-inf")).amax(1)
    return other - true


class Objective(NamedTuple):
    """What PGD ascends: ``loss(logits_adv, y, log_p) -> (B,)`` per sample; ``log_p`` is the clean
    prediction's log-softmax when ``needs_clean`` (else None)."""
    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
    needs_clean: bool


# The attack objectives, by name: adding one is one entry.
OBJECTIVES: dict[str, Objective] = {
    "ce": Objective(_ce_objective, False),     # cross-entropy with the label (Madry et al.)
    "kl": Objective(_kl_objective, True),      # KL(f(x) || f(x')), TRADES' inner maximisation
    "cw": Objective(_cw_objective, False),     # CW margin max_{j != y} z_j - z_y (Carlini and Wagner 2017)
}
AA_VERSIONS = ("standard", "plus", "rand", "custom")
AA_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
# Under bf16 autocast the TRADES start x + 0.001 N(0, 1) is below the input's resolution (for 43% of the
# pixels the first convolution sees exactly x), so the first KL gradient is rounding noise. The first step
# in fp32 restores the attack's strength (BENCHMARKS.md, "bf16 and the training attack": final KL 0.84x
# of fp32's under bf16, 1.00x with one fp32 step); later iterates are a step away, where bf16 resolves them.
FP32_STEPS_UNDER_AMP = 1


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside, each module's own previous mode restored afterwards (not just the root's)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def weak_attack_warning(eps: float, step_size: float, steps: int, name: str) -> str | None:
    """steps x step < eps means the iterates cannot reach the boundary of the ball from its centre."""
    if eps > 0 and steps * step_size < eps * (1 - 1e-9):
        return (f"{name}: steps x step size = {steps} x {step_size:g} = {steps * step_size:g} < eps = {eps:g}; "
                f"the attack cannot cover its ball and will overstate robustness. "
                f"Use at least {math.ceil(eps / step_size)} steps or a step size >= {eps / steps:g}.")
    return None


def fp32(t: torch.Tensor) -> torch.Tensor:
    """Upcast half precision to float32 for accumulation; float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(fp32(t.flatten(1)), dim=1)


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *[1] * (like.dim() - 1))


def random_start(x: torch.Tensor, eps: float, norm: str, kind: str, *, generator: torch.Generator | None = None,
                 rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """The first PGD iterate: x plus noise of ``kind`` ("trades": 0.001 N(0, 1); "uniform": uniform in
    the ball; "none"), projected into the ball and the [0, 1] box.

    The noise is drawn for ``world_size`` shards of ``len(x)`` rows and this rank keeps rows
    ``rank::world_size``: with a generator seeded per training step, each sample's start is then the
    same whatever the number of processes (the loaders shard like DistributedSampler)."""
    if kind == "none" or (eps == 0 and kind == "uniform"):
        return x.detach().clone()
    shape = (x.shape[0] * world_size,) + tuple(x.shape[1:])
    opts = dict(generator=generator, device=x.device, dtype=x.dtype if x.dtype == torch.float64 else torch.float32)
    if kind == "trades":
        delta = 0.001 * torch.randn(shape, **opts)
    elif norm == "linf":
        delta = (2 * torch.rand(shape, **opts) - 1) * eps
    else:  # uniform in the L2 ball: gaussian direction, radius eps * U^(1/d)
        direction = torch.randn(shape, **opts)
        direction = direction / _per_sample(_flat_norm(direction).clamp_min(1e-12), direction)
        radius = eps * torch.rand(shape[0], **opts).pow(1.0 / x[0].numel())
        delta = direction * _per_sample(radius, direction)
    return project(x + delta[rank::world_size].to(x.dtype), x, eps, norm)


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Back into the eps-ball around x, then into the [0, 1] box."""
    if norm == "linf":
        x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps)
    else:
        delta = x_adv - x
        scale = (eps / _flat_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
        x_adv = x + delta * _per_sample(scale, delta).to(delta.dtype)
    return x_adv.clamp(0.0, 1.0)


class PGDResult(NamedTuple):
    x_adv: torch.Tensor
    last_grad_norm: torch.Tensor  # per-sample ||grad of the objective|| at the last iterate attacked


def pgd_perturb(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step_size: float, steps: int,
                norm: str, objective: str, start: torch.Tensor, early_stop: bool = False,
                clean_logits: torch.Tensor | None = None, recompute_clean: bool = False,
                fp32_steps: int = 0) -> PGDResult:
    """The PGD loop from ``start`` (see :func:`random_start`), in whatever mode the model is in (callers
    use :func:`eval_mode`).

    With ``objective="kl"`` the target p = softmax(f(x)) is computed once (or taken from
    ``clean_logits``); ``recompute_clean`` recomputes it at every step, as the official TRADES code
    does (the step profiler's baseline). The per-sample objective is summed, not averaged, so each
    sample's gradient is its own ``grad_{x'_i} loss_i``: the quantity D-TRADES' ``attack`` sensitivity reuses.
    ``fp32_steps``: the first n steps run with autocast off (see :data:`FP32_STEPS_UNDER_AMP`).
    """
    x = x.detach()

    def target() -> torch.Tensor:   # in fp32 when the first steps are: their q must be compared with a p as exact
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False) if fp32_steps else contextlib.nullcontext():
            logits = model(x) if clean_logits is None or recompute_clean else clean_logits
            return F.log_softmax(fp32(logits.detach()), dim=1)

    objective_fn = OBJECTIVES[objective]
    log_p = target() if objective_fn.needs_clean else None
    x_adv = project(start.detach().to(x.dtype), x, eps, norm).detach()
    grad_norm = torch.zeros(x.shape[0], device=x.device)
    active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    for i in range(steps):
        if objective_fn.needs_clean and recompute_clean and i > 0:
            log_p = target()
        x_adv.requires_grad_(True)
        with torch.enable_grad(), torch.autocast(x.device.type, enabled=False) if i < fp32_steps \
                else contextlib.nullcontext():
            logits_adv = model(x_adv)
            loss = objective_fn.loss(logits_adv, y, log_p).sum()
            (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach()
        x_next, grad_norm = kernels.pgd_step(x_adv, grad, x, step_size, eps, norm)
        if early_stop:
            active = active & (logits_adv.detach().argmax(1) == y)
            x_next = torch.where(_per_sample(active, x), x_next, x_adv)
        x_adv = x_next
    return PGDResult(x_adv.detach(), grad_norm)


def _check_names(**pairs: tuple[str, tuple[str, ...], str]) -> None:
    for value, valid, kind in pairs.values():
        if value not in valid:
            raise unknown_name(kind, value, valid)


@dataclass(kw_only=True)
class PGD:
    """Projected gradient descent (Madry et al. 2018) in the L-inf or L2 ball: the evaluation's PGD and,
    as ``TrainConfig.attack``, the training attack (one class, one set of checks).

    ``random_start``: "uniform" (in the ball), "trades" (x + 0.001 N(0, 1)) or "none"; ``objective``: a
    name in :data:`OBJECTIVES` ("ce", "kl" (TRADES), "cw"). Either may be "method" (the default): the
    training method's own, which :meth:`for_method` fills in. ``early_stop``: freeze each sample at its first
    misclassified iterate. A weak attack (steps x step size < eps) warns at its first call; the trainer
    and the evaluation say it once themselves, with their context, and record it.
    """
    eps: float = option(help="radius", low=0)
    step_size: float = option(help="step size", low=0, low_open=True)
    steps: int = option(help="steps", low=1)
    norm: str = option("linf", "threat model", choices=NORMS)
    random_start: str = option(METHOD_S, "first iterate (method: the training method's)",
                               choices=(METHOD_S, *RANDOM_STARTS), kind="random start")
    objective: str = option(METHOD_S, "what the attack ascends (method: the training method's)",
                            choices=(METHOD_S, *OBJECTIVES), kind="attack objective")
    early_stop: bool = option(False, "freeze each sample at its first misclassified iterate")
    name: ClassVar[str] = "PGD"

    def __post_init__(self):
        check_fields(self, "attack ")
        self._weakness_said = False

    def weakness(self) -> str | None:
        return weak_attack_warning(self.eps, self.step_size, self.steps, f"{self.name}-{self.steps}")

    def for_method(self, method: Any) -> "PGD":
        """This attack with the objective and random start the training method declares where it says "method"."""
        return dataclasses.replace(self, objective=method.objective if self.objective == METHOD_S else self.objective,
                                   random_start=method.random_start if self.random_start == METHOD_S
                                   else self.random_start)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, clean_logits: torch.Tensor | None = None,
                start: torch.Tensor | None = None, recompute_clean: bool = False, fp32_steps: int = 0) -> PGDResult:
        """The attack from ``start`` (default: a fresh random start), in eval mode."""
        if METHOD_S in (self.objective, self.random_start):
            raise ConfigError("this PGD takes its objective or random start from a training method (\"method\"): "
                              "pass objective= and random_start=, or use attack.for_method(method).")
        if start is None:
            start = random_start(x, self.eps, self.norm, self.random_start)
        with eval_mode(model):
            return pgd_perturb(model, x, y, eps=self.eps, step_size=self.step_size, steps=self.steps, norm=self.norm,
                               objective=self.objective, early_stop=self.early_stop, clean_logits=clean_logits,
                               start=start, recompute_clean=recompute_clean, fp32_steps=fp32_steps)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self._weakness_said and (message := self.weakness()):
            warnings.warn(message, stacklevel=2)
        self._weakness_said = True
        return self.perturb(model, x, y).x_adv

    # The evaluation's view of an attack (every registered attack has these three):
    per_batch: ClassVar[bool] = True   # runs on every evaluated batch (False: on cfg.aa_samples points)

    @classmethod
    def for_evaluation(cls, cfg: Any) -> "PGD":
        """The attack an :class:`~fastrobust.config.EvalConfig` (resolved) asks for. A weak PGD is said
        by the evaluation, which records it in the results, so the attack itself stays quiet."""
        pgd = cls(eps=cfg.eps, step_size=cfg.pgd_step_size, steps=cfg.pgd_steps, norm=cfg.norm,
                  random_start=cfg.pgd_random_start, objective=cfg.pgd_objective)
        pgd._weakness_said = True
        return pgd

    @staticmethod
    def label(cfg: dict) -> str:
        objective = cfg.get("pgd_objective", "ce")   # results written before the option: ce
        return f"PGD-{cfg['pgd_steps']}" + ("" if objective == "ce" else f"-{objective.upper()}")

    @staticmethod
    def settings(cfg: dict) -> dict:
        """The evaluation options that decide this attack's outcome (two evaluations compare point by
        point only when these agree)."""
        out = {k: cfg[k] for k in ("eps", "norm", "pgd_steps", "pgd_step_size", "pgd_random_start", "seed")}
        if cfg.get("pgd_objective", "ce") != "ce":   # absent for ce: points files from before the option compare
            out["pgd_objective"] = cfg["pgd_objective"]
        return out


@dataclass(kw_only=True)
class FGSM:
    """Fast gradient sign method (Goodfellow et al. 2015): one L-inf step of size eps, no random start."""
    eps: float
    name: str = "FGSM"

    def __post_init__(self):
        self.eps = check_eps(self.eps)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.eps == 0:
            return x.detach().clone()
        with eval_mode(model):
            return pgd_perturb(model, x, y, eps=self.eps, step_size=self.eps, steps=1, norm="linf", objective="ce",
                               start=x).x_adv

    per_batch: ClassVar[bool] = True

    @classmethod
    def for_evaluation(cls, cfg: Any) -> "FGSM | None":
        return cls(eps=cfg.eps) if cfg.norm == "linf" else None   # an L-inf attack only

    @staticmethod
    def label(cfg: dict) -> str:
        return "FGSM"

    @staticmethod
    def settings(cfg: dict) -> dict:
        return {k: cfg[k] for k in ("eps", "norm")}


@dataclass(kw_only=True)
class AutoAttack:
    """The original AutoAttack (Croce & Hein 2020) from ``pyautoattack``.

    The device is passed explicitly (pyautoattack defaults to the CPU); ``None`` means x's device.
    ``version="standard"`` runs APGD-CE, APGD-T, FAB-T and Square; "custom" runs ``attacks``.
    """
    eps: float
    norm: str
    version: str = "standard"
    batch_size: int = 500
    seed: int = 0
    device: str | torch.device | None = None
    attacks: tuple[str, ...] | None = None
    name: str = "AutoAttack"

    def __post_init__(self):
        self.eps = check_eps(self.eps)
        _check_names(norm=(self.norm, NORMS, "norm"), version=(self.version, AA_VERSIONS, "AutoAttack version"))
        for a in self.attacks or ():
            _check_names(attack=(a, AA_ATTACKS, "AutoAttack attack"))
        self.batch_size = check_positive_int(self.batch_size, "AutoAttack batch size")

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from pyautoattack import AutoAttack as _AutoAttack

        if self.eps == 0:
            return x.detach().clone()
        device = torch.device(self.device) if self.device is not None else x.device
        logging.getLogger("auto-attack").setLevel(logging.WARNING)
        with eval_mode(model):
            adversary = _AutoAttack(model, norm="Linf" if self.norm == "linf" else "L2", eps=self.eps,
                                    version=self.version, device=device, seed=self.seed,
                                    attacks=list(self.attacks) if self.version == "custom" else None)
            adversary.verbose = False
            with warnings.catch_warnings():   # a third-party call: pyautoattack's own deprecation and
                warnings.simplefilter("ignore")  # version notices, not about this evaluation
                # pyautoattack reshapes gradients with .view: it needs contiguous (NCHW) inputs
                x_adv, _ = adversary.run_standard_evaluation(x.to(device).contiguous(), y.to(device),
                                                             batch_size=self.batch_size)
        return x_adv.detach()

    per_batch: ClassVar[bool] = False   # minutes per 100 robust points: cfg.aa_samples only

    @classmethod
    def for_evaluation(cls, cfg: Any, device: str | torch.device | None = None) -> "AutoAttack":
        return cls(eps=cfg.eps, norm=cfg.norm, version=cfg.aa_version, batch_size=cfg.batch_size, seed=cfg.seed,
                   device=device, attacks=cfg.aa_attacks or None)

    @staticmethod
    def label(cfg: dict) -> str:
        if cfg.get("aa_version", "standard") != "standard":
            return f"AutoAttack ({cfg['aa_version']}: {', '.join(cfg.get('aa_attacks') or ())})"
        return "AutoAttack"

    @staticmethod
    def settings(cfg: dict) -> dict:
        return {"eps": cfg["eps"], "norm": cfg["norm"], "aa_version": cfg["aa_version"],
                "aa_attacks": list(cfg["aa_attacks"]), "seed": cfg["seed"]}


# Ordered from the weakest to the strongest: the evaluation checks that each RA is at most the previous one's.
ATTACKS = {"fgsm": FGSM, "pgd": PGD, "autoattack": AutoAttack}

