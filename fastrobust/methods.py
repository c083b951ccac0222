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

import copy
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


def method_from_dict(d: dict | str | Method) -> Method:
    """A method from its name or its ``to_dict()`` (manifests, recipes, ``--set method=...``)."""
    if isinstance(d, Method):
        return d
    if isinstance(d, str):
        d = {"name": d}
    if not isinstance(d, dict) or "name" not in d:
        raise ConfigError(f"a method must be a name or a mapping with a 'name', got {d!r}")
    d = dict(d)
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
    """TRADES with a per-sample weight lambda_i = scale (alpha norm(H_i) + beta norm(s_i)), detached.

    H_i = -sum_c p_ic log(p_ic + entropy_eps) is the clean prediction's entropy, s_i = ||grad_{x'_i}
    KL(p_i||q_i)||_2 the sensitivity at the adversarial point. Sensitivity modes:
      exact  - the input gradient of the training forward at the final x' (one extra input-gradient
               backward, no extra forward; with batch norm in train mode it includes the batch coupling);
      attack - the input gradient of the last PGD step, already computed: free;
      func   - torch.func vmap(grad) per sample, with batch norm on running statistics (a one-sample
               batch has none); equals ``exact`` for models without batch-coupled layers or in eval mode.
    ``norm="mean"`` with ``scale`` sets the batch-mean lambda to scale (alpha + beta), e.g. to match a
    TRADES beta: the paper's min-max lambda averages about 1 while TRADES uses 4 to 6.
    """
    name: ClassVar[str] = "dtrades"
    extends: ClassVar[str | None] = "trades"
    alpha: float = option(1.0, "weight of the normalised clean entropy H in lambda", low=0)
    beta: float = option(1.0, "weight of the normalised sensitivity s in lambda", low=0)
    norm: str = option("minmax", "batch normalisation of H and s (the paper: minmax)", choices=kernels.NORMALIZE_MODES,
                       kind="lambda normalisation")
    scale: float = option(1.0, "factor on lambda", low=0)
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
        out = kernels.dtrades_loss(z, z_adv, y, s.detach(), self.alpha, self.beta, self.norm, self.scale,
                                   self.entropy_eps, reduce=reduce, backend=backend)
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


# ----------------------------------------------------------------------------------------------
# AWP (Wu et al., NeurIPS 2020): adversarial weight perturbation, built on the step hooks alone.

AWP_PROXY_LR = 0.01   # the proxy's plain SGD step (official AT_AWP; v depends on it only through AWP_EPS)
AWP_EPS = 1e-20       # in gamma ||w|| d / (||d|| + eps), as the official code


def awp_weights(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """What AWP perturbs: every parameter named ``...weight`` of dimension > 1 (convolution and linear
    weights; not biases, not normalisation scales), as the official code."""
    return [(n, p) for n, p in model.named_parameters() if p.dim() > 1 and "weight" in n.rsplit(".", 1)[-1]]


def _awp_bases() -> list[str]:
    """Every registered method with a training attack, AWP itself excepted."""
    return [n for n, cls in METHODS.items() if not issubclass(cls, AWP) and cls().objective is not None]


def _average_grads_over_ranks(params: list[nn.Parameter]) -> None:
    """Replace each parameter's gradient by its mean over the ranks (one all-reduce), in place."""
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = dist.all_reduce(torch.cat([g.reshape(-1) for g in grads]), "sum") / dist.world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view(g.shape))
        offset += g.numel()


@register_method
@dataclass
class AWP(Method):
    """Adversarial weight perturbation: the base method's loss at the weights w + v, its update applied at w.

    Each step, after the base's training attack (``before_loss``): a proxy copy of the model (one, kept
    and reloaded from the model every step) takes one plain SGD step (lr 0.01, no momentum, no weight
    decay) that ascends the base loss on the step's adversarial batch, in train mode (the proxy's
    batch-norm statistics move, not the model's); for every weight of dimension > 1,
        d_l = w_proxy_l - w_l,   v_l = gamma ||w_l|| d_l / (||d_l|| + 1e-20),
    and v is added to the model's weights. The loss, its backward and the optimiser step run at w + v;
    ``after_step`` subtracts v again (also when the step is skipped or fails), so the update lands on
    the unperturbed weights and the trainer (EMA, checkpoints, evaluation) never sees w + v. Under DDP
    the proxy's gradient is averaged over the ranks: every rank applies the same v. A non-finite proxy
    gradient (fp16/bf16) leaves that step unperturbed. The first ``warmup`` epochs (counted from 0)
    train the base method alone. The proxy costs one more forward and backward of the base loss a step.

    Logged per step: ``awp_applied`` (1, or 0 in the warm-up and after a non-finite proxy gradient),
    ``awp_relative_norm`` ||v|| / ||w|| over the perturbed weights (gamma when applied, up to the 1e-20)
    and ``awp_loss_unperturbed``, the base loss at w (the proxy's forward); ``loss`` is the one at w + v."""
    name: ClassVar[str] = "awp"
    base: str = option("at", "the method whose loss is perturbed (AT-AWP: at, TRADES-AWP: trades); it runs "
                       "with its default options but beta", kind="AWP base", choices=lambda: _awp_bases())
    gamma: float = option(5e-3, "size of the weight perturbation relative to each layer's weight norm "
                          "(official TRADES-AWP: 5e-3; the AT-AWP script: 1e-2)", low=0)
    warmup: int = option(0, "epochs (counted from 0) trained before the perturbation starts (official AT-AWP: "
                         "0; TRADES-AWP perturbs from its epoch 10 counted from 1, i.e. after 9)", low=0)
    beta: float | None = option(None, "the base's KL weight, for bases with one (trades, mart, faal); none: the "
                                "base's default", low=0)

    def base_method(self) -> Method:
        """The base method, with ``beta`` as its KL weight when given."""
        cls = METHODS[self.base]
        return cls(**{cls.kl_weight: self.beta}) if self.beta is not None and cls.kl_weight else cls()

    def validate(self) -> "AWP":
        super().validate()
        if self.beta is not None and METHODS[self.base].kl_weight is None:
            having = [n for n in _awp_bases() if METHODS[n].kl_weight]
            raise ConfigError(f"awp beta is the base method's KL weight, but the base {self.base} has none (bases "
                              f"with one: {', '.join(having)}): leave beta unset or choose another base.")
        self.base_method().validate()
        return self

    # the training attack, compile's double backward and the bench's labels are the base's
    @property
    def objective(self) -> str | None:
        return self.base_method().objective

    @property
    def random_start(self) -> str:
        return self.base_method().random_start

    @property
    def double_backward(self) -> bool:
        return self.base_method().double_backward

    @property
    def variant(self) -> str:
        return self.base_method().label

    @property
    def extends(self) -> str:
        return self.base_method().label

    @classmethod
    def bench_variants(cls) -> list["AWP"]:
        return [cls(), cls(base=TRADES.name)]

    @property
    def step_hooks(self) -> bool:
        return True

    def loss(self, model, x, y, adv, *, backend="auto", distributed=False):
        return self.base_method().loss(model, x, y, adv, backend=backend, distributed=distributed)

    def before_loss(self, ctx: StepContext) -> None:
        if ctx.epoch < self.warmup or self.gamma == 0:
            zero = torch.zeros((), device=ctx.x.device)
            ctx.stats.update(awp_applied=zero, awp_relative_norm=zero)
            return
        if "awp_proxy" not in ctx.store:
            proxy = copy.deepcopy(ctx.model)
            ctx.store["awp_proxy"] = (proxy, torch.optim.SGD(proxy.parameters(), lr=AWP_PROXY_LR, momentum=0.0,
                                                             weight_decay=0.0))
        proxy, proxy_opt = ctx.store["awp_proxy"]
        proxy.load_state_dict(ctx.model.state_dict())
        proxy.train()
        proxy_opt.zero_grad(set_to_none=True)
        with ctx.autocast():
            out = self.base_method().loss(proxy, ctx.x, ctx.y, ctx.adv, backend=ctx.backend,
                                          distributed=ctx.distributed)
        # ascent: SGD descends the negated loss (scaled like the step's under fp16; v does not depend on it)
        (-ctx.loss_scale * out.loss.float()).backward()
        proxy_params = dict(proxy.named_parameters())
        pairs = [(w, proxy_params[n]) for n, w in awp_weights(ctx.model)]
        if ctx.distributed:
            _average_grads_over_ranks([q for _, q in pairs])
        proxy_opt.step()
        with torch.no_grad():
            for w, q in pairs:
                q.sub_(w)   # d_l, in the proxy's storage (reloaded at the next step): no extra copy
            w_norm = torch.stack([torch.linalg.vector_norm(w) for w, _ in pairs])
            d_norm = torch.stack([torch.linalg.vector_norm(q) for _, q in pairs])
            factor = self.gamma * w_norm / (d_norm + AWP_EPS)
            ok = torch.isfinite(d_norm).all() & torch.isfinite(factor).all()   # on the device: no host sync
            factor = torch.where(ok, factor, torch.zeros_like(factor))
            for (w, q), f in zip(pairs, factor):
                q.masked_fill_(~ok, 0).mul_(f)   # v_l (zero after a non-finite proxy gradient)
            ctx.scratch["awp"] = pairs          # before the weights move: after_step undoes what follows
            for w, q in pairs:
                w.add_(q)
            v_norm = torch.where(ok, d_norm * factor, torch.zeros_like(d_norm))
            ctx.stats.update(awp_applied=ok.float(), awp_relative_norm=(torch.linalg.vector_norm(v_norm) /
                                                                        torch.linalg.vector_norm(w_norm)).float(),
                             awp_loss_unperturbed=out.loss.detach().float())

    def after_step(self, ctx: StepContext) -> None:
        with torch.no_grad():
            for w, v in ctx.scratch.pop("awp", ()):
                w.sub_(v)
