"""One optimisation step of a method: the training attack (eval mode), the loss (train mode), the update.

Shared by the trainer and the step profiler, so what is profiled is what trains. AMP autocasts the
forwards (bf16 by default on a GPU; fp16 uses a grad scaler); losses accumulate in fp32. A non-finite
loss or an fp16 overflow skips the update and is reported in ``StepResult.failure``; an overflow while
the grad scaler is still calibrating its scale is marked ``calibrating`` (see MAX_CALIBRATION_SKIPS),
every other one is a bad step for the trainer to count, as a non-finite loss is.

Safe defaults on a GPU nobody has checked: with ``compile=None`` (auto) a model that torch.compile
cannot compile trains eagerly after one warning (the failed step is retried eagerly from the same
weights, buffers and RNG state, and the fallback is recorded in ``TrainStep.notes`` for the run
manifest); an explicit ``--compile`` turns that failure into a ConfigError. Under bf16 autocast
(``amp="auto"`` on a GPU, or ``--amp bf16``) a loss that is non-finite in the first
``AMP_PROBATION_STEPS`` steps while fp32 gives a finite one from the same weights and batch stops the
run with a NumericalError naming ``--amp off``; when fp32 is not finite either it is an ordinary
skipped step.

Under an initialised process group with several ranks the training forward/backward runs through
``DistributedDataParallel`` (``self.train_net``); the attack uses the unwrapped (possibly compiled)
module ``self.net``, in eval mode with input gradients only, so DDP's reducer never sees a forward
without its parameter backward. Rank 0's buffers (batch-norm running statistics) are broadcast before
every attack, and the skip decision for a non-finite loss is agreed by all ranks. The attack's random
start for step ``step`` is drawn per sample from (cfg.seed, step), independent of the sharding.

A method that acts around the update declares ``step_hooks`` (AWP): ``before_loss(ctx)`` runs after the
attack, ``after_step(ctx)`` after the optimiser step in a finally (skipped and failed steps included), with
a :class:`fastrobust.methods.StepContext` (the unwrapped model, the batch, the adversarial batch, the epoch
from ``__call__(..., epoch=)``, the step, autocast, backend, DDP). They change parameters in place under
no_grad, which the compiled and DDP modules share. Methods without hooks take the plain step.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

import kernels

from . import checkpoint as ckpt_io
from . import distributed as dist
from .attacks import FP32_STEPS_UNDER_AMP, random_start
from .config import TrainConfig
from .errors import ConfigError, FastRobustError, NumericalError
from .methods import AdvBatch, MethodOutput, StepContext

# fp16 overflows. The grad scaler multiplies the loss by its scale before the backward, halves the scale
# and skips the step when a gradient overflows, and doubles it after GRAD_SCALER_GROWTH_INTERVAL steps
# without one. Its calibration is the search for a scale that works: an overflow counts as calibration
# (skipped, not a bad step) only while the scale is above MIN_HEALTHY_LOSS_SCALE, above the scale of the
# last step that was applied (none yet, or grown since: at that scale the gradients fitted), and for at
# most MAX_CALIBRATION_SKIPS overflows in a row: from GRAD_SCALER_INIT_SCALE = 2^16, 16 halvings reach 1,
# so no calibration needs more. Any other overflow means the gradients outgrew fp16 (a storm, e.g. at a
# learning rate that blows the weights up) and is a bad step, counted towards max_bad_steps like a NaN.
MIN_HEALTHY_LOSS_SCALE = 1.0   # at or below it even unscaled (or shrunk) gradients overflow fp16
GRAD_SCALER_INIT_SCALE = 2.0 ** 16   # torch's default, passed explicitly so the bound below follows it
GRAD_SCALER_GROWTH_INTERVAL = 2000   # torch's default
MAX_CALIBRATION_SKIPS = round(math.log2(GRAD_SCALER_INIT_SCALE / MIN_HEALTHY_LOSS_SCALE))   # 16
AMP_PROBATION_STEPS = 3   # bf16 losses checked against fp32 when non-finite during the first steps
AUTO_COMPILE_DEVICES = ("cuda",)   # where compile=None (auto) compiles


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    mode = "bf16" if cfg.amp == "auto" and device.type == "cuda" else ("off" if cfg.amp == "auto" else cfg.amp)
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def compile_wanted(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether a step for ``cfg`` on ``device`` runs compiled: ``cfg.compile``, or for None (auto) whether
    the device is one of :data:`AUTO_COMPILE_DEVICES`."""
    return device.type in AUTO_COMPILE_DEVICES if cfg.compile is None else bool(cfg.compile)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compile_model(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """torch.compile the model. A method that backpropagates twice through the adversarial forward
    (D-TRADES' exact sensitivity: input gradient, then the loss, with retain_graph) declares it
    (``Method.double_backward``): inductor's in-place buffer reuse overwrites saved activations in the
    first backward and silently corrupts the second (seen with torch 2.14 on the CPU: parameter
    gradients off by 3x; tests/test_trainer.py catches it), so such a method compiles without in-place
    buffers."""
    mode = None if cfg.compile_mode == "default" else cfg.compile_mode
    if cfg.method.double_backward:
        options = dict(torch._inductor.list_mode_options(mode)) if mode else {}  # options and mode are exclusive
        options["inplace_buffers"] = False
        return torch.compile(model, options=options)
    return torch.compile(model, mode=mode)


@dataclass
class StepResult:
    loss: float
    output: MethodOutput | None
    attack_s: float
    update_s: float
    failure: str | None = None
    calibrating: bool = False   # an fp16 overflow while the grad scaler is still finding its scale (see above)


class TrainStep:
    """``step(x, y, step=i) -> StepResult``. ``official_style`` is the step profiler's baseline: the
    reference loss ops, f(x) recomputed at every attack step, and the official code's second clean
    forward for the KL target (a zero-weight term: its forward and backward cost, no change to the loss)."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, device: torch.device, *, distributed: bool | None = None,
                 official_style: bool = False):
        self.cfg, self.model, self.device, self.official_style = cfg, model, device, official_style
        if distributed is None:
            distributed = dist.world_size() > 1
        self.rank, self.world = (dist.rank(), dist.world_size()) if distributed else (0, 1)
        if cfg.sync_bn and self.world > 1:
            if device.type != "cuda":
                raise ConfigError("sync_bn needs CUDA: torch's SyncBatchNorm runs on GPUs only. On the CPU keep "
                                  "per-rank batch-norm statistics (--no-sync-bn).")
            if nn.SyncBatchNorm.convert_sync_batchnorm(model) is not model:
                raise ConfigError("sync_bn: the model's root module is a batch norm; wrap it in a container first.")
        self.amp = amp_dtype(cfg, device)
        self.opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler(device.type, init_scale=GRAD_SCALER_INIT_SCALE,
                                           growth_interval=GRAD_SCALER_GROWTH_INTERVAL,
                                           enabled=self.amp is torch.float16)
        self.applied_scale: float | None = None   # the loss scale of the last applied fp16 step
        self.overflows_in_a_row = 0
        self.method = cfg.method
        # the training attack; a method with no objective trains on clean inputs
        self.pgd = cfg.attack.for_method(cfg.method) if cfg.method.objective else None
        self.backend = "reference" if official_style else cfg.kernels
        want_compile = compile_wanted(cfg, device)
        self.compile_pending = want_compile   # compiled, and not yet run once
        self.notes: list[str] = []
        self._wrap(compile_model(model, cfg) if want_compile else model)
        self.calls = 0
        self.epoch = 0   # of the current step, counted from 0 (the trainer passes it)
        self.hook_store: dict = {}   # what a method's step hooks keep across steps (StepContext.store)
        self._hook_ctx: StepContext | None = None

    def _wrap(self, net: nn.Module) -> None:
        self.net = self.train_net = net
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel
            # Buffers are broadcast once per step by hand (before the attack), not at every forward.
            self.train_net = DistributedDataParallel(net, device_ids=[self.device.index] if self.device.type == "cuda"
                                                     else None, broadcast_buffers=False)

    def autocast(self, enabled: bool = True):
        if self.amp is None or not enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def attack(self, x: torch.Tensor, y: torch.Tensor, step: int) -> AdvBatch:
        """The training attack (``cfg.attack`` with the method's objective and start where it names none),
        from the per-sample start of step ``step``."""
        pgd = self.pgd
        if pgd is None:
            return AdvBatch(None)
        g = torch.Generator(device=x.device)
        g.manual_seed(dist.derive_seed(self.cfg.seed, "attack-start", step))
        start = random_start(x, pgd.eps, pgd.norm, pgd.random_start, generator=g, rank=self.rank,
                             world_size=self.world)
        fp32_steps = FP32_STEPS_UNDER_AMP if self.amp is not None and pgd.random_start == "trades" else 0
        with self.autocast():
            res = pgd.perturb(self.net, x, y, start=start, recompute_clean=self.official_style, fp32_steps=fp32_steps)
        return AdvBatch(res.x_adv, res.last_grad_norm)

    def loss(self, x: torch.Tensor, y: torch.Tensor, adv: AdvBatch, amp: bool = True) -> MethodOutput:
        self.model.train()
        with self.autocast(amp):
            out = self.method.loss(self.train_net, x, y, adv, backend=self.backend, distributed=self.world > 1)
            if self.official_style and self.method.objective == "kl":
                out.loss = out.loss + 0.0 * self.train_net(x).float().sum()
        return out

    def __call__(self, x: torch.Tensor, y: torch.Tensor, *, step: int | None = None, epoch: int = 0) -> StepResult:
        step = self.calls if step is None else step
        self.calls = step + 1
        self.epoch = epoch
        if not self.compile_pending:
            return self._step(x, y, step)
        # the first compiled step: if it fails, the eager retry starts from the same weights, buffers and RNG
        state, rng = copy.deepcopy(self.model.state_dict()), ckpt_io.rng_state()
        try:
            result = self._step(x, y, step)
        except (FastRobustError, kernels.KernelCheckError):
            raise   # this library's own verdicts (bf16 probation, a kernel self-check): not compile failures
        except Exception as e:  # noqa: BLE001 - any other failure of the first compiled step
            first = str(e).splitlines()[0][:200] if str(e) else ""
            if self.cfg.compile:
                raise ConfigError(f"torch.compile failed on this model and --compile was requested "
                                  f"({type(e).__name__}: {first}). Run without --compile (auto: eager where "
                                  f"compiling fails) or with --no-compile.") from e
            note = f"torch.compile failed on the first step ({type(e).__name__}: {first}); training continues eagerly"
            warnings.warn(note, RuntimeWarning, stacklevel=2)
            self.notes.append(note)
            self.opt.zero_grad(set_to_none=True)
            self.model.load_state_dict(state)
            ckpt_io.set_rng_state(rng)
            self._wrap(self.model)
            result = self._step(x, y, step)
        finally:
            self.compile_pending = False
        return result

    def _step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> StepResult:
        """One step. A method with step hooks (``Method.step_hooks``, e.g. AWP) gets ``before_loss`` after
        the attack and ``after_step`` after the update, in a finally: also after a skipped step (non-finite
        loss, fp16 overflow) or an exception, so what before_loss changed in the weights is undone before
        anyone else sees them (the trainer's EMA update, checkpoints, the compile fallback's retry).
        Without hooks this is the plain step: no context, no extra work."""
        if not self.method.step_hooks:
            return self._update(x, y, step)
        self._hook_ctx = None
        try:
            result = self._update(x, y, step)
        finally:
            ctx, self._hook_ctx = self._hook_ctx, None
            if ctx is not None:
                self.method.after_step(ctx)
        if ctx is not None and result.output is not None:
            result.output.stats.update(ctx.stats)
        return result

    def _before_loss(self, x: torch.Tensor, y: torch.Tensor, adv: AdvBatch, step: int) -> None:
        ctx = StepContext(model=self.model, x=x, y=y, adv=adv, epoch=self.epoch, step=step, autocast=self.autocast,
                          backend=self.backend, distributed=self.world > 1,
                          loss_scale=self.scaler.get_scale() if self.scaler.is_enabled() else 1.0,
                          store=self.hook_store)
        self._hook_ctx = ctx   # first: after_step runs even if before_loss fails part way
        self.method.before_loss(ctx)

    def _update(self, x: torch.Tensor, y: torch.Tensor, step: int) -> StepResult:
        t0 = time.perf_counter()
        if self.world > 1:
            dist.broadcast_buffers(self.model)
        adv = self.attack(x, y, step)
        sync(self.device)
        t1 = time.perf_counter()
        if self.method.step_hooks:
            self._before_loss(x, y, adv, step)   # its cost counts as the update's
        out = self.loss(x, y, adv)
        loss = out.loss.float()
        value = float(loss.detach())
        bad_here = not math.isfinite(value)
        if self.amp is torch.bfloat16 and self.calls <= AMP_PROBATION_STEPS:
            self._check_bf16(x, y, adv, value, step, bad_here)
        if dist.any_flag(bad_here) if self.world > 1 else bad_here:
            self.opt.zero_grad(set_to_none=True)
            why = f"loss is {value}" if bad_here else "the loss is not finite on another rank"
            return StepResult(value, out, t1 - t0, time.perf_counter() - t1, why)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.opt)
        self.scaler.update()
        sync(self.device)
        t2 = time.perf_counter()
        if scale_before is not None and self.scaler.get_scale() < scale_before:
            # DDP has averaged the gradients, so every rank sees the same overflow
            self.overflows_in_a_row += 1
            why = f"fp16 gradients overflowed at loss scale {scale_before:g} (the grad scaler skipped the step and " \
                  f"lowered the scale to {self.scaler.get_scale():g})"
            if scale_before <= MIN_HEALTHY_LOSS_SCALE:
                why += "; the gradients overflow fp16 without any scaling"
            elif self.applied_scale is not None and scale_before <= self.applied_scale:
                why += f"; a step was applied at loss scale {self.applied_scale:g}, so the gradients have grown"
            elif self.overflows_in_a_row > MAX_CALIBRATION_SKIPS:
                why += f"; {self.overflows_in_a_row} overflows in a row, more than calibration takes"
            else:
                return StepResult(value, out, t1 - t0, t2 - t1, why, calibrating=True)
            return StepResult(value, out, t1 - t0, t2 - t1, why)
        if scale_before is not None:
            self.applied_scale, self.overflows_in_a_row = scale_before, 0
        return StepResult(value, out, t1 - t0, t2 - t1)

    def _check_bf16(self, x, y, adv, value: float, step: int, bad_here: bool) -> None:
        """A non-finite bf16 loss early on: if fp32 gives a finite one from the same weights and batch, bf16
        is the cause, and training cannot be trusted to recover. Under DDP every rank takes part (a
        collective), so all of them stop together."""
        fp32_value = float(self.loss(x, y, adv, amp=False).loss.detach().float()) if bad_here else math.nan
        blamed = math.isfinite(fp32_value)
        if not (dist.any_flag(blamed) if self.world > 1 else blamed):
            return
        where = (f"the loss is {value} under bf16 autocast but {fp32_value:.4g} in fp32 from the same weights and "
                 f"batch" if blamed else "on another rank the loss is not finite under bf16 autocast but finite "
                 "in fp32")
        raise NumericalError(f"step {step}: {where}: bf16 overflows or underflows in this model. "
                             f"Train with --amp off (fp32).")
