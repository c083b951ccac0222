"""Training methods: one dataclass per method, holding its options and its loss, in one registry.

    @register_method
    @dataclass
    class TRADES(Method):
        beta: float = option(6.0, "weight of the KL term", low=0)
        def loss(self, model, x, y, adv, *, backend="auto", distributed=False) -> MethodOutput: ...

The class attributes say how the training attack runs (``objective``: "kl", "ce", or None for no
attack; ``random_start``); the trainer runs it in eval mode and hands the result to ``loss`` (train
mode). :data:`METHODS` is the one list of method names: the config, the CLI, the recipes and the docs
read it. The losses go through :mod:`kernels` (fused Triton on CUDA, the plain PyTorch reference on
the CPU) and return their per-sample statistics with them, for the logs.

A method that acts around the update declares ``step_hooks`` and gets ``before_loss(ctx)`` after the
training attack and ``after_step(ctx)`` after the optimiser step (also for a skipped step), with a
:class:`StepContext`; AWP perturbs the weights there and restores them.

Under DDP (``distributed=True``) every rank holds a shard of the global batch. What is per sample
stays per sample; what couples the batch is explicit: D-TRADES' lambda normalisation is per rank
(``sync="local"``, the paper's per-GPU batch) or over the global batch (``"global"``: its statistics are
all-reduced); FAAL's class margins are always all-reduced, so every rank uses the same class weights.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, ContextManager

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from kernels.reference import kl_divergence

from . import distributed as dist
from .attacks import eval_mode, fp32
from .errors import ConfigError, unknown_name
from .options import check_fields, option

METHODS: dict[str, type["Method"]] = {}


def register_method(cls: type["Method"]) -> type["Method"]:
    """Add a method class to :data:`METHODS` under its ``name``."""
    METHODS[cls.name] = cls
    return cls


@dataclass
class AdvBatch:
    x_adv: torch.Tensor | None
    grad_norm: torch.Tensor | None = None   # per-sample ||grad_{x'} objective|| at the last PGD iterate


@dataclass
class MethodOutput:
    loss: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)   # detached, per sample or per class
    logits_nat: torch.Tensor | None = None
    logits_adv: torch.Tensor | None = None


@dataclass
class StepContext:
    """What a method's step hooks (:meth:`Method.before_loss`, :meth:`Method.after_step`) get: one per step,
    built by ``TrainStep`` after the training attack, for methods that declare ``step_hooks``."""
    model: nn.Module            # the unwrapped module: the compiled and DDP modules share its parameters
    x: torch.Tensor
    y: torch.Tensor
    adv: AdvBatch               # the step's training attack
    epoch: int                  # counted from 0
    step: int
    autocast: Callable[[], ContextManager]   # the step's autocast (a null context without AMP)
    backend: str                # the loss-head kernels' backend
    distributed: bool           # under DDP: several ranks, each with a shard of the global batch
    loss_scale: float = 1.0     # the fp16 grad scaler's current scale (1 without one)
    store: dict[str, Any] = field(default_factory=dict)     # kept across the steps of one TrainStep
    scratch: dict[str, Any] = field(default_factory=dict)   # this step only: what before_loss leaves after_step
    stats: dict[str, torch.Tensor] = field(default_factory=dict)   # added to the step's MethodOutput.stats


def _head_stats(head: kernels.LossHead, kl_weight: torch.Tensor | float) -> dict[str, torch.Tensor]:
    """The head's per-sample terms; ``weighted_kl``: each sample's KL as it enters the loss (times its weight)."""
    return {"kl": head.kl, "weighted_kl": (kl_weight * head.kl).detach(), "entropy": head.entropy,
            "ce_nat": head.ce_nat, "ce_adv": head.ce_adv}


@dataclass
class Method:
    """Base class. Subclasses are dataclasses whose fields are the method's options (see :func:`option`)."""
    name: ClassVar[str] = "base"
    objective: ClassVar[str | None] = "kl"   # the training attack's objective; None: clean inputs only
    random_start: ClassVar[str] = "trades"   # x + 0.001 N(0, 1), as in the official TRADES and MART code
    faal_base: ClassVar[bool] = False        # FAAL can reweight this method's per-sample loss per class
    extends: ClassVar[str | None] = None     # the method whose step this one adds to: the bench's cost ratio
    renamed_options: ClassVar[dict[str, str]] = {}   # an option's former name -> its name: older records still read
    kl_weight: ClassVar[str | None] = None   # the option that weights the loss's KL term, if any (AWP's beta sets it)

    # What the rest of the library asks a method, so that no method's name or option is read outside its class.
    @property
    def double_backward(self) -> bool:
        """The loss backpropagates twice through the adversarial forward (compile keeps its buffers apart)."""
        return False

    @property
    def variant(self) -> str | None:
        """The option value that changes what a step costs, if any: the bench labels rows name[variant]."""
        return None

    @property
    def step_hooks(self) -> bool:
        """The method acts around the update (``before_loss``, ``after_step``); without it the step never
        calls them and builds no context."""
        return False

    def before_loss(self, ctx: StepContext) -> None:
        """After the training attack, before the loss (e.g. perturb the weights: in place, under no_grad)."""

    def after_step(self, ctx: StepContext) -> None:
        """After the optimiser step, and also when the step is skipped or fails (undo what before_loss did)."""

    @property
    def label(self) -> str:
        return f"{self.name}[{self.variant}]" if self.variant else self.name

    @classmethod
    def bench_variants(cls) -> list["Method"]:
        """The instances ``fastrobust bench step --methods NAME`` times: one per step cost."""
        return [cls()]

    def validate(self) -> "Method":
        check_fields(self, f"{self.name} ")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, adv: AdvBatch, *, backend: str = "auto",
             distributed: bool = False) -> MethodOutput:
        raise NotImplementedError


def current_option_names(d: dict) -> dict:
    """A recorded ``to_dict()`` with the options its method has renamed since (:attr:`Method.renamed_options`)
    under their names now: what a run folder or checkpoint written before the rename holds reads as today's."""
    cls = METHODS.get(d.get("name")) if isinstance(d.get("name"), str) else None
    if cls is None or not cls.renamed_options:
        return d
    return {cls.renamed_options.get(key, key): value for key, value in d.items()}


def method_from_dict(d: dict | str | Method) -> Method:
    """A method from its name or its ``to_dict()`` (manifests, recipes, ``--set method=...``); a record
    of an older version, with options since renamed, reads under their names now."""
    if isinstance(d, Method):
        return d
    if isinstance(d, str):
        d = {"name": d}
    if not isinstance(d, dict) or "name" not in d:
        raise ConfigError(f"a method must be a name or a mapping with a 'name', got {d!r}")
    d = dict(current_option_names(d))
    name = d.pop("name")
    if name not in METHODS:
        raise unknown_name("method", name, METHODS)
    cls = METHODS[name]
    known = [f.name for f in dataclasses.fields(cls)]
    for key in d:
        if key not in known:
            raise unknown_name(f"{name} option", key, known or ["(none)"])
    return cls(**d)


@register_method
@dataclass
class Standard(Method):
    """Cross-entropy on clean inputs."""
    name: ClassVar[str] = "standard"
    objective: ClassVar[str | None] = None

    def loss(self, model, x, y, adv, *, backend="auto", distributed=False):
        z = model(x)
        ce = F.cross_entropy(fp32(z), y, reduction="none")
        return MethodOutput(ce.mean(), {"ce_nat": ce.detach()}, logits_nat=z)


@register_method
@dataclass
class AT(Method):
    """PGD adversarial training (Madry et al. 2018): CE(f(x'), y), x' from uniform-start CE PGD."""
    name: ClassVar[str] = "at"
    faal_base: ClassVar[bool] = True
    objective: ClassVar[str | None] = "ce"
    random_start: ClassVar[str] = "uniform"

    def loss(self, model, x, y, adv, *, backend="auto", distributed=False):
        z_adv = model(adv.x_adv)
        ce = F.cross_entropy(fp32(z_adv), y, reduction="none")
        return MethodOutput(ce.mean(), {"ce_adv": ce.detach()}, logits_adv=z_adv)


@register_method
@dataclass
class TRADES(Method):
    """Zhang et al. 2019: CE(f(x), y) + beta (1/B) sum_i KL(p_i || q_i), x' from the KL attack.

    The clean forward is made once in train mode and serves both terms (the official code makes
    it twice); the KL target p is not detached, as in the official code."""
    name: ClassVar[str] = "trades"
    faal_base: ClassVar[bool] = True
    kl_weight: ClassVar[str | None] = "beta"
    beta: float = option(6.0, "weight of the KL term (official TRADES: 6; the D-TRADES paper: 4)", low=0)

    def loss(self, model, x, y, adv, *, backend="auto", distributed=False):
        z, z_adv = model(x), model(adv.x_adv)
        out = kernels.trades_loss(z, z_adv, y, self.beta, backend=backend)
        return MethodOutput(out.loss, _head_stats(out.head, self.beta), z, z_adv)


@register_method
@dataclass
class MART(Method):
    """Wang et al. 2020: BCE(f(x'), y) + beta (1/B) sum_i KL(p_i || q_i) (1 - p_{i,y}), x' from CE PGD,
    with BCE = CE(f(x'), y) - log(1.0001 - q_{y'}) and y' the most probable wrong class under q."""
    name: ClassVar[str] = "mart"
    faal_base: ClassVar[bool] = True
    kl_weight: ClassVar[str | None] = "beta"
    objective: ClassVar[str | None] = "ce"
    beta: float = option(5.0, "weight of the KL term (official MART ResNet-18 and the D-TRADES paper: 5)", low=0)

    def loss(self, model, x, y, adv, *, backend="auto", distributed=False):
        z, z_adv = model(x), model(adv.x_adv)
        out = kernels.mart_loss(z, z_adv, y, self.beta, backend=backend)
        return MethodOutput(out.loss, _head_stats(out.head, self.beta * (1 - out.head.p_y)), z, z_adv)


@register_method
@dataclass
class DTRADES(Method):
    """TRADES with a per-sample weight lambda_i = lambda_scale (alpha N(H_i) + beta N(s_i)), detached, where N is
    the batch normalisation ``normalize`` (the paper's min-max).

    H_i = -sum_c p_ic log(p_ic + entropy_eps) is the clean prediction's entropy, s_i = ||grad_{x'_i}
    KL(p_i||q_i)||_2 the sensitivity at the adversarial point. Sensitivity modes:
      exact  - the input gradient of the training forward at the final x' (one extra input-gradient
               backward, no extra forward; with batch norm in train mode it includes the batch coupling);
      attack - the input gradient of the last PGD step, already computed: free;
      func   - torch.func vmap(grad) per sample, with batch norm on running statistics (a one-sample
               batch has none); equals ``exact`` for models without batch-coupled layers or in eval mode.
    ``normalize="mean"`` with ``lambda_scale`` sets the batch-mean lambda to lambda_scale (alpha + beta), e.g.
    to match a TRADES beta: the paper's min-max lambda averages about 1 while TRADES uses 4 to 6. The options
    are named as the parameters of :func:`kernels.dtrades_loss` and the flags (``--dtrades-normalize``,
    ``--dtrades-lambda-scale``); records written when they were ``norm`` and ``scale`` still read.
    """
    name: ClassVar[str] = "dtrades"
    extends: ClassVar[str | None] = "trades"
    renamed_options: ClassVar[dict[str, str]] = {"norm": "normalize", "scale": "lambda_scale"}
    alpha: float = option(1.0, "weight of the normalised clean entropy H in lambda", low=0)
    beta: float = option(1.0, "weight of the normalised sensitivity s in lambda", low=0)
    normalize: str = option("minmax", "batch normalisation of H and s (the paper: minmax)",
                            choices=kernels.NORMALIZE_MODES, kind="lambda normalisation")
    lambda_scale: float = option(1.0, "factor on lambda", low=0)
    sensitivity: str = option("exact", "how s is computed: exact, attack (free) or func (torch.func)",
                              choices=("exact", "attack", "func"), kind="sensitivity mode")
    sync: str = option("local", "under DDP, normalise H and s per process (local, the paper's per-GPU batch) "
                       "or over the global batch", choices=("local", "global"), kind="lambda sync mode")
    entropy_eps: float = option(1e-12, "eps inside log(p + eps) of the entropy", low=0, low_open=True)

    @property
    def double_backward(self) -> bool:
        return self.sensitivity == "exact"   # the input gradient at x', then the loss, through one forward

    @property
    def variant(self) -> str:
        return self.sensitivity

    @classmethod
    def bench_variants(cls) -> list["DTRADES"]:
        return [cls(sensitivity=mode) for mode in ("attack", "exact", "func")]

    def loss(self, model, x, y, adv, *, backend="auto", distributed=False):
        z = model(x)
        x_adv = adv.x_adv
        if self.sensitivity == "exact":
            x_adv = x_adv.detach().requires_grad_(True)
        z_adv = model(x_adv)
        if self.sensitivity == "exact":
            log_p = F.log_softmax(fp32(z.detach()), dim=1)
            kl = kl_divergence(log_p, F.log_softmax(fp32(z_adv), dim=1)).sum()
            (g,) = torch.autograd.grad(kl, x_adv, retain_graph=True)
            s = torch.linalg.vector_norm(fp32(g.flatten(1)), dim=1)
        elif self.sensitivity == "attack":
            s = fp32(adv.grad_norm)
        else:
            s = per_sample_sensitivity(model, x_adv, z.detach())
        reduce = dist.all_reduce if distributed and self.sync == "global" else None
        out = kernels.dtrades_loss(z, z_adv, y, s.detach(), alpha=self.alpha, beta=self.beta, normalize=self.normalize,
                                   lambda_scale=self.lambda_scale, entropy_eps=self.entropy_eps, reduce=reduce,
                                   backend=backend)
        stats = {"kl": out.head.kl, "weighted_kl": (out.lam * out.head.kl).detach(), "lambda": out.lam.detach(),
                 "entropy": out.head.entropy, "sensitivity": s.detach(), "ce_nat": out.head.ce_nat}
        return MethodOutput(out.loss, stats, z, z_adv)


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
        return kl_divergence(log_pi.unsqueeze(0), F.log_softmax(fp32(logits), dim=1)).sum()

    with eval_mode(model):
        g = vmap(grad(kl_one))(x_adv.detach(), log_p)
    return torch.linalg.vector_norm(fp32(g.flatten(1)), dim=1)


# ----------------------------------------------------------------------------------------------
# FAAL (Zhang et al., CVPR 2024): class-wise distributionally robust reweighting.

def class_margins(z_adv: torch.Tensor, y: torch.Tensor, num_classes: int,
                  distributed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean adversarial margin max_{k != y} q_k - q_y and per-class counts, over the global
    batch when ``distributed`` (sums and counts all-reduced, so every rank gets the same numbers).
    Classes absent from the batch get margin -1 (they carry no weight in the objective anyway)."""
    q = F.softmax(fp32(z_adv.detach()), dim=1)
    margin = q.scatter(1, y[:, None], float("-inf")).amax(1) - q.gather(1, y[:, None]).squeeze(1)
    counts = torch.bincount(y, minlength=num_classes).to(q.dtype)
    sums = torch.zeros(num_classes, dtype=q.dtype, device=q.device).index_add_(0, y, margin)
    if distributed:
        sums, counts = dist.all_reduce(torch.stack([sums, counts]), "sum").unbind(0)
    means = torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, -1.0))
    return means, counts


def _kl_uniform(w: torch.Tensor) -> torch.Tensor:
    return (-math.log(w.shape[-1]) - torch.log(w)).mean(-1)


def dro_class_weights(a: torch.Tensor, r: float, iters: int = 100) -> torch.Tensor:
    """argmax_w sum_c a_c w_c over the simplex subject to KL(uniform || w) <= r.

    KKT gives w_c = nu u_c / (mu - a_c) with mu > max a and nu normalising; KL(u || w(mu)) falls
    monotonically from infinity to 0 as mu grows, so mu is found by bisection on log(mu - max a).
    A fixed iteration count keeps it on the device with no host synchronisation. Returns float64."""
    a = a.detach().to(torch.float64)
    uniform = torch.full_like(a, 1.0 / a.shape[0])
    spread = a.max() - a.min()
    if r <= 0:
        return uniform
    scale = torch.clamp(spread, min=1e-30)
    lo, hi = torch.log(scale) + math.log(1e-15), torch.log(scale) + math.log(1e8)

    def weights(log_gap: torch.Tensor) -> torch.Tensor:
        inv = 1.0 / (a.max() + torch.exp(log_gap) - a)
        return inv / inv.sum()

    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        too_far = _kl_uniform(weights(mid)) > r   # KL too large: mu must grow
        lo, hi = torch.where(too_far, mid, lo), torch.where(too_far, hi, mid)
    return torch.where(spread > 0, weights(hi), uniform)  # hi always satisfies the constraint


@register_method
@dataclass
class FAAL(Method):
    """Fairness-aware adversarial learning: the base loss reweighted per class by the worst case
    within a KL ball of radius r around the uniform class distribution:
        L = (C/B) sum_i w[y_i] l_i,  w = dro_class_weights(n_c * m_c, r), w detached.
    Base losses: "at" - CE(f(x'), y) with x' from uniform-start CE PGD (the official run scripts);
    "trades" - CE(f(x), y) + beta KL(p||q) with the TRADES KL attack; "mart" - MART's per-sample loss
    with its CE attack."""
    name: ClassVar[str] = "faal"
    kl_weight: ClassVar[str | None] = "beta"   # with the trades and mart bases
    r: float = option(0.5, "radius of the KL ball around the uniform class weights (official: 0.5)", low=0)
    base: str = option("at", "base loss reweighted per class (official: at)", kind="FAAL base",
                       choices=lambda: [n for n, cls in METHODS.items() if cls.faal_base])
    beta: float = option(6.0, "KL weight of the trades and mart base losses", low=0)

    @property
    def objective(self) -> str:
        return "kl" if self.base == "trades" else "ce"

    @property
    def random_start(self) -> str:
        return "uniform" if self.base == "at" else "trades"

    def loss(self, model, x, y, adv, *, backend="auto", distributed=False):
        z = None if self.base == "at" else model(x)
        z_adv = model(adv.x_adv)
        num_classes = z_adv.shape[1]
        margins, counts = class_margins(z_adv, y, num_classes, distributed)
        w = dro_class_weights(counts.double() * margins.double(), self.r).to(fp32(z_adv).dtype)
        sample_weight = (num_classes * w)[y].detach()
        if self.base == "at":
            ce = F.cross_entropy(fp32(z_adv), y, reduction="none")
            loss, stats = (sample_weight * ce).mean(), {"ce_adv": ce.detach()}
        else:
            fn = kernels.trades_loss if self.base == "trades" else kernels.mart_loss
            out = fn(z, z_adv, y, self.beta, sample_weight=sample_weight, backend=backend)
            kl_weight = sample_weight * self.beta * (1 if self.base == "trades" else 1 - out.head.p_y)
            loss, stats = out.loss, _head_stats(out.head, kl_weight)
        stats.update(class_weights=w.detach(), class_margins=margins.detach())
        return MethodOutput(loss, stats, z, z_adv)


# AWP wraps any method above from its own module (its class is registered on import)
from .awp import AWP  # noqa: E402,F401
