"""Attacks behind one interface: ``attack(model, x, y) -> x_adv``.

Every attack puts the model in eval mode for its duration and restores each module's previous
mode afterwards, keeps inputs in [0, 1] (normalisation lives inside the model), and takes every
option explicitly: there is no hidden default radius or step size to get wrong.
"""
from __future__ import annotations

import contextlib
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

from .errors import ConfigError, check_eps, check_positive_int, unknown_name

NORMS = ("linf", "l2")
RANDOM_STARTS = ("uniform", "trades", "none")
OBJECTIVES = ("ce", "kl")


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


def kl_divergence(log_p: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(p || q) with q = softmax(logits_adv), from log p (fp32 accumulation)."""
    log_q = F.log_softmax(fp32(logits_adv), dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(fp32(t.flatten(1)), dim=1)


def random_start(x: torch.Tensor, eps: float, norm: str, kind: str) -> torch.Tensor:
    if kind == "none" or eps == 0 and kind == "uniform":
        start = x.clone()
    elif kind == "trades":
        start = x + 0.001 * torch.randn_like(x)
    elif norm == "linf":
        start = x + torch.empty_like(x).uniform_(-eps, eps)
    else:  # uniform in the L2 ball: gaussian direction, radius eps * U^(1/d)
        direction = torch.randn_like(x)
        direction = direction / _flat_norm(direction).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
        d = x[0].numel()
        radius = eps * torch.rand(x.shape[0], device=x.device).pow(1.0 / d)
        start = x + direction * radius.view(-1, *[1] * (x.dim() - 1))
    return project(start, x, eps, norm)


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Back into the eps-ball around x, then into the [0, 1] box."""
    if norm == "linf":
        x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps)
    else:
        delta = x_adv - x
        scale = (eps / _flat_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
        x_adv = x + delta * scale.view(-1, *[1] * (x.dim() - 1)).to(delta.dtype)
    return x_adv.clamp(0.0, 1.0)


class PGDResult(NamedTuple):
    x_adv: torch.Tensor
    last_grad_norm: torch.Tensor  # per-sample ||grad of the objective|| at the last iterate attacked


def pgd_perturb(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step_size: float,
                steps: int, norm: str, random_start_kind: str, objective: str, early_stop: bool = False,
                clean_logits: torch.Tensor | None = None, start: torch.Tensor | None = None) -> PGDResult:
    """The PGD loop, in whatever mode the model is in (callers use :func:`eval_mode`).

    With ``objective="kl"`` the target distribution p = softmax(f(x)) is computed once, not at every
    step as the official TRADES code does; pass ``clean_logits`` to reuse a forward already made.
    The per-sample objective is summed, not averaged, so each sample's gradient is its own
    ``grad_{x'_i} loss_i`` - the quantity D-TRADES' ``attack`` sensitivity reuses.
    ``start``, when given, is the first iterate (projected into the ball) instead of a random start
    drawn here: the trainer draws it per sample so it does not depend on how a batch is sharded.
    """
    x = x.detach()
    if objective == "kl":
        with torch.no_grad():
            logits = model(x) if clean_logits is None else clean_logits
            log_p = F.log_softmax(fp32(logits.detach()), dim=1)
    if start is None:
        x_adv = random_start(x, eps, norm, random_start_kind).detach()
    else:
        x_adv = project(start.detach().to(x.dtype), x, eps, norm).detach()
    grad_norm = torch.zeros(x.shape[0], device=x.device)
    active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            logits_adv = model(x_adv)
            if objective == "ce":
                loss = F.cross_entropy(fp32(logits_adv), y, reduction="sum")
            else:
                loss = kl_divergence(log_p, logits_adv).sum()
            (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach()
        x_next, grad_norm = kernels.pgd_step(x_adv, grad, x, step_size, eps, norm)
        if early_stop:
            active = active & (logits_adv.detach().argmax(1) == y)
            x_next = torch.where(active.view(-1, *[1] * (x.dim() - 1)), x_next, x_adv)
        x_adv = x_next
    return PGDResult(x_adv.detach(), grad_norm)


@dataclass(kw_only=True)
class PGD:
    """Projected gradient descent (Madry et al. 2018) in the L-inf or L2 ball.

    ``random_start``: "uniform" (in the ball), "trades" (x + 0.001 N(0, 1)) or "none".
    ``objective``: "ce" (cross-entropy with the label) or "kl" (KL(f(x) || f(x')), TRADES).
    ``early_stop``: freeze each sample at the first iterate that is misclassified.
    """
    eps: float
    step_size: float
    steps: int
    norm: str
    random_start: str
    objective: str
    early_stop: bool = False
    name: str = "PGD"

    def __post_init__(self):
        self.eps = check_eps(self.eps)
        self.steps = check_positive_int(self.steps, f"{self.name} steps")
        if not self.step_size > 0:
            raise ConfigError(f"{self.name} step size must be > 0, got {self.step_size}")
        for value, valid, kind in ((self.norm, NORMS, "norm"), (self.random_start, RANDOM_STARTS, "random start"),
                                   (self.objective, OBJECTIVES, "attack objective")):
            if value not in valid:
                raise unknown_name(kind, value, valid)
        message = weak_attack_warning(self.eps, self.step_size, self.steps, self.name)
        if message:
            warnings.warn(message, stacklevel=3)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                clean_logits: torch.Tensor | None = None) -> PGDResult:
        with eval_mode(model):
            return pgd_perturb(model, x, y, eps=self.eps, step_size=self.step_size, steps=self.steps,
                               norm=self.norm, random_start_kind=self.random_start, objective=self.objective,
                               early_stop=self.early_stop, clean_logits=clean_logits)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.perturb(model, x, y).x_adv


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
            return pgd_perturb(model, x, y, eps=self.eps, step_size=self.eps, steps=1, norm="linf",
                               random_start_kind="none", objective="ce").x_adv


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
        if self.norm not in NORMS:
            raise unknown_name("norm", self.norm, NORMS)
        if self.version not in ("standard", "plus", "rand", "custom"):
            raise unknown_name("AutoAttack version", self.version, ("standard", "plus", "rand", "custom"))
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
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # pyautoattack reshapes gradients with .view: it needs contiguous (NCHW) inputs
                x_adv, _ = adversary.run_standard_evaluation(x.to(device).contiguous(), y.to(device),
                                                             batch_size=self.batch_size)
        return x_adv.detach()


ATTACKS = {"fgsm": FGSM, "pgd": PGD, "autoattack": AutoAttack}


def make_attack(name: str, **options):
    """Build an attack by name ("fgsm", "pgd", "autoattack"); every option is passed explicitly."""
    if name not in ATTACKS:
        raise unknown_name("attack", name, ATTACKS)
    return ATTACKS[name](**options)
