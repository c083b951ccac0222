"""AWP (adversarial weight perturbation, Wu et al., NeurIPS 2020) around any method with a training attack,
built on the step hooks alone (``Method.step_hooks``, ``before_loss``, ``after_step``). Registered in
:data:`fastrobust.methods.METHODS` as ``awp`` when :mod:`fastrobust.methods` is imported.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from . import distributed as dist
from .errors import ConfigError
from .methods import AT, METHODS, TRADES, Method, StepContext, register_method
from .options import option


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
    gradient (fp16/bf16) leaves that step unperturbed. The first ``warmup_epochs`` (counted from 0)
    train the base method alone. The proxy costs one more forward and backward of the base loss a step.

    Logged per step: ``awp_applied`` (1, or 0 in the warm-up and after a non-finite proxy gradient),
    ``awp_relative_norm`` ||v|| / ||w|| over the perturbed weights (gamma when applied, up to the 1e-20)
    and ``awp_loss_unperturbed``, the base loss at w (the proxy's forward); ``loss`` is the one at w + v."""
    name: ClassVar[str] = "awp"
    base: str = option(AT.name, "the method whose loss is perturbed (AT-AWP: at, TRADES-AWP: trades); it runs "
                       "with its default options but beta", kind="AWP base", choices=lambda: _awp_bases())
    gamma: float = option(5e-3, "size of the weight perturbation relative to each layer's weight norm "
                          "(official TRADES-AWP: 5e-3; the AT-AWP script: 1e-2)", low=0)
    warmup_epochs: int = option(0, "epochs (counted from 0) trained before the perturbation starts (official AT-AWP: "
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
        if ctx.epoch < self.warmup_epochs or self.gamma == 0:
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
            ctx.scratch["perturbation"] = pairs          # before the weights move: after_step undoes what follows
            for w, q in pairs:
                w.add_(q)
            v_norm = torch.where(ok, d_norm * factor, torch.zeros_like(d_norm))
            ctx.stats.update(awp_applied=ok.float(), awp_relative_norm=(torch.linalg.vector_norm(v_norm) /
                                                                        torch.linalg.vector_norm(w_norm)).float(),
                             awp_loss_unperturbed=out.loss.detach().float())

    def after_step(self, ctx: StepContext) -> None:
        with torch.no_grad():
            for w, v in ctx.scratch.pop("perturbation", ()):
                w.sub_(v)
