"""The trainer: a plain loop (nanoGPT-style), exactly resumable, with per-epoch robustness checks.

Run folder layout (``cfg.out_dir``)::

    manifest.json          config, versions, git commit, device, seed
    log.jsonl              one record per logged step and per epoch
    epochs.csv             per-epoch summary
    checkpoints/step-*.pt  rolling resumable checkpoints (newest two kept), best.pt, final.pt
    results.{md,csv,json}  the final evaluation tables
    throughput.{md,json}   img/s, ms per step, attack/update split, peak memory, device
    curves.png, na_ra.png  training curves and NA against RA

Resuming (``resume=True``) restores model, optimiser, grad scaler, EMA, every RNG state (every
rank's, under DDP) and the position inside the epoch (the learning rate is a function of the step).
The loaders are deterministic in (seed, epoch, batch) and the training attack's random start in
(seed, step, sample), so a resumed run produces the same weights as an uninterrupted one
(bit-identical on the CPU). SIGTERM (a scheduler's pre-emption, ``kill``) is handled at the next
step boundary: a checkpoint is written and the run exits with :class:`TrainingInterrupted`
(status 143 from the CLI); ``--resume`` continues it.

Distributed (launched by ``torchrun``; see :mod:`fastrobust.distributed`): ``batch_size`` is the
global batch, each of the N processes takes ``batch_size / N`` samples of every batch, the
gradients are averaged by DDP, so the learning rate keeps its meaning for the global batch. The
attacks run on the unwrapped module (eval mode, input gradients only), only the training
forward/backward goes through DDP. Only rank 0 writes files; evaluation is sharded by whole
batches and gives exactly the single-process numbers.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import resource
import signal
import statistics
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

import loaders

from . import checkpoint as ckpt_io
from . import distributed as dist
from .config import EvalConfig, TrainConfig
from .errors import CheckpointError, ConfigError, FastRobustError, NumericalError
from .evaluate import EvalResult, evaluate, predict, save_results, results_markdown
from .methods import MethodOutput, build_method
from .models import create_model
from .report import atomic_write_text, device_description, manifest, markdown_table, plot_lines, plot_scatter, write_json


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def setup_device(name: str) -> torch.device:
    """The device to compute on: under torchrun, join the process group first (NCCL with
    ``cuda:LOCAL_RANK``, or gloo on the CPU); otherwise :func:`resolve_device`."""
    if dist.launched_by_torchrun():
        return dist.init_from_env(name)
    return resolve_device(name)


class TrainingInterrupted(FastRobustError):
    """A stop signal (SIGTERM) ended training at a step boundary, after a checkpoint was written."""
    exit_code = 143  # 128 + SIGTERM, what a shell reports for a process killed by SIGTERM


# An fp16 overflow while the grad scaler's scale is above this is the scaler calibrating (it halves
# the scale and retries): skipped, not counted. At or below it even unscaled gradients overflow fp16.
MIN_HEALTHY_LOSS_SCALE = 1.0


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    mode = cfg.amp
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" else "off"
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(cfg: TrainConfig, epoch_float: float) -> float:
    """Learning-rate multiplier at a fractional epoch; evaluated per step so resume is exact."""
    if cfg.lr_schedule == "constant":
        return 1.0
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(epoch_float / cfg.epochs, 1.0)))
    return cfg.lr_gamma ** sum(epoch_float >= m for m in cfg.lr_milestones)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
             "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize_stats(stats: dict[str, torch.Tensor]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in stats.items():
        v = v.detach().float()
        if k in ("class_weights", "class_margins"):
            out[k] = [round(float(t), 5) for t in v.cpu()]
        else:
            out[f"{k}_mean"] = float(v.mean())
            if k == "lambda":
                out.update(lambda_min=float(v.min()), lambda_max=float(v.max()), lambda_std=float(v.std(unbiased=False)))
    return out


@dataclass
class StepTimes:
    attack: list[float] = field(default_factory=list)
    update: list[float] = field(default_factory=list)
    images: list[int] = field(default_factory=list)

    def report(self, device: torch.device, warmup: int = 2) -> dict[str, Any]:
        a, u, n = self.attack[warmup:] or self.attack, self.update[warmup:] or self.update, self.images[warmup:] or self.images
        if not a:
            return {}
        total = [x + y for x, y in zip(a, u)]
        med = statistics.median(total)
        return {"device": device_description(device), "steps_timed": len(total),
                "ms_per_step": 1000 * med, "img_per_s": statistics.median(n) / med,
                "attack_ms": 1000 * statistics.median(a), "update_ms": 1000 * statistics.median(u),
                "attack_share": statistics.median(a) / med, "peak_memory_mb": peak_memory_mb(device)}


def compile_model(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """torch.compile the model. D-TRADES' exact sensitivity backpropagates twice through the adversarial
    forward (input gradient, then the loss, with retain_graph); inductor's in-place buffer reuse
    overwrites saved activations in the first backward and silently corrupts the second (seen with
    torch 2.14 on the CPU: parameter gradients off by 3x; tests/test_fast_step.py catches it), so
    that case compiles without in-place buffers."""
    double_backward = cfg.method == "dtrades" and cfg.sensitivity == "exact"
    mode = None if cfg.compile_mode == "default" else cfg.compile_mode
    if double_backward:
        # options and mode are exclusive in torch.compile: spell the mode's options out
        options = dict(torch._inductor.list_mode_options(mode)) if mode else {}
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
    calibrating: bool = False   # an fp16 overflow while the grad scaler is still finding its scale


class TrainStep:
    """One optimisation step of a method: attack (eval mode), loss (train mode), update.

    Shared by the trainer and the step profiler, so what is profiled is what trains. AMP autocasts
    the forwards (bf16 by default on a GPU; fp16 uses a grad scaler); losses accumulate in fp32.
    A non-finite loss or an fp16 overflow skips the update and is reported in ``failure``.

    Under an initialised process group with several ranks (``distributed=None`` detects it) the
    training forward/backward runs through ``DistributedDataParallel`` (``self.train_net``); the
    attack uses the unwrapped (possibly compiled) module ``self.net``, in eval mode with input
    gradients only, so DDP's reducer never sees a forward without its parameter backward. Rank 0's
    buffers (batch-norm running statistics) are broadcast before every attack, the skip decision for
    a non-finite loss is agreed by all ranks, and ``cfg.sync_bn`` converts batch norms to SyncBatchNorm.

    The attack's random start for call ``step`` (the trainer passes its global step; otherwise a
    counter) is drawn per sample from (cfg.seed, step), independent of the sharding."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, device: torch.device, *, distributed: bool | None = None):
        self.cfg, self.model, self.device = cfg, model, device
        if distributed is None:
            distributed = dist.world_size() > 1
        self.rank, self.world = (dist.rank(), dist.world_size()) if distributed else (0, 1)
        if cfg.sync_bn and self.world > 1:
            if device.type != "cuda":
                raise ConfigError("sync_bn needs CUDA: torch's SyncBatchNorm runs on GPUs only. On the CPU keep "
                                  "per-rank batch-norm statistics (--no-sync-bn).")
            converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            if converted is not model:
                raise ConfigError("sync_bn: the model's root module is a batch norm; wrap it in a container first.")
        self.amp = amp_dtype(cfg, device)
        self.opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp is torch.float16)
        self.method = build_method(cfg)
        self.method.distributed = self.world > 1
        self.net = compile_model(model, cfg) if cfg.compile else model
        self.train_net = self.net
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel
            # Buffers are broadcast once per step by hand (before the attack), not at every forward.
            self.train_net = DistributedDataParallel(self.net, device_ids=[device.index] if device.type == "cuda" else None,
                                                     broadcast_buffers=False)
        self.calls = 0

    def autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, *, step: int | None = None) -> StepResult:
        step = self.calls if step is None else step
        self.calls = step + 1
        t0 = time.perf_counter()
        if self.world > 1:
            dist.broadcast_buffers(self.model)
        start = self.method.start(x, step, self.rank, self.world)
        with self.autocast():
            adv = self.method.attack(self.net, x, y, start=start)
        _sync(self.device)
        t1 = time.perf_counter()
        self.model.train()
        with self.autocast():
            out = self.method.loss(self.train_net, x, y, adv)
        loss = out.loss.float()
        value = float(loss.detach())
        bad_here = not math.isfinite(value)
        if dist.any_flag(bad_here) if self.world > 1 else bad_here:
            self.opt.zero_grad(set_to_none=True)
            why = f"loss is {value}" if bad_here else "the loss is not finite on another rank"
            return StepResult(value, out, t1 - t0, time.perf_counter() - t1, why)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.opt)
        self.scaler.update()
        _sync(self.device)
        t2 = time.perf_counter()
        if scale_before is not None and self.scaler.get_scale() < scale_before:
            # DDP has averaged the gradients, so every rank sees the same overflow
            return StepResult(value, out, t1 - t0, t2 - t1,
                              f"fp16 gradients overflowed at loss scale {scale_before:g} (the grad scaler skipped the "
                              f"step and lowered the scale to {self.scaler.get_scale():g})",
                              calibrating=scale_before > MIN_HEALTHY_LOSS_SCALE)
        return StepResult(value, out, t1 - t0, t2 - t1)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg.validate()
        self.device = setup_device(cfg.device)
        self.rank, self.world = dist.rank(), dist.world_size()
        self.main = self.rank == 0
        if cfg.batch_size % self.world:
            lo, hi = cfg.batch_size // self.world * self.world, -(-cfg.batch_size // self.world) * self.world
            raise ConfigError(f"batch_size {cfg.batch_size} is the global batch and must be divisible by the number "
                              f"of processes ({self.world}); use {hi}" + (f" or {lo}" if lo else "") +
                              " (the learning rate is meant for the global batch).")
        self.rank_batch = cfg.batch_size // self.world
        self.out = Path(cfg.out_dir)
        self.ckpt_dir = self.out / "checkpoints"
        dist.on_main(_check_writable, self.out)
        self.channels_last = cfg.channels_last
        seed_everything(cfg.seed)

        # A compiled step specialises on the batch shape: drop the last partial batch rather than
        # recompile for it (fewer than batch_size samples per epoch go unseen, a different subset each epoch).
        # Under DDP each rank loads its shard (DistributedSampler order) of every global batch.
        self.loader = loaders.build(cfg.dataset, "train", self.rank_batch, self.device, backend=cfg.loader,
                                    seed=cfg.seed, data_dir=cfg.data_dir, limit=cfg.train_limit,
                                    drop_last=True if cfg.compile else None, beton_dir=cfg.beton_dir,
                                    rank=self.rank, world_size=self.world)
        self.test = loaders.load_arrays(cfg.dataset, "test", cfg.data_dir)
        self.model = create_model(cfg.model, dataset=cfg.dataset).to(self.device)
        if cfg.dropout is not None:
            for m in self.model.modules():
                if isinstance(m, nn.modules.dropout._DropoutNd):
                    m.p = cfg.dropout
        self.model.activation_checkpointing = cfg.activation_checkpointing
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if cfg.init_checkpoint:
            init = ckpt_io.load_checkpoint(cfg.init_checkpoint)
            ckpt_io.check_spec(init["spec"], self.model.spec, cfg.init_checkpoint)
            ckpt_io.load_weights(self.model, init["model"], cfg.init_checkpoint)
        self.stepper = TrainStep(cfg, self.model, self.device)
        self.opt, self.scaler, self.method = self.stepper.opt, self.stepper.scaler, self.stepper.method
        self.steps_per_epoch = len(self.loader)
        self.ema = None
        if cfg.ema_decay:
            self.ema = torch.optim.swa_utils.AveragedModel(
                self.model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
        if self.rank:
            # Identical weights everywhere (same seed; DDP also broadcasts rank 0's), but each rank
            # draws its own dropout masks. Rank 0 keeps the single-process stream.
            seed_everything(dist.derive_seed(cfg.seed, "rank", self.rank) % 2**32)
        self.epoch, self.batch, self.global_step = 0, 0, 0
        self.best_ra = -1.0
        self.history: list[dict[str, Any]] = []
        self.times = StepTimes()
        self.bad_steps = 0
        self.stop_requested = False
        self.stop_signal: str | None = None
        self.phase = "setup"

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"format": ckpt_io.FORMAT, "spec": self.model.spec.to_dict(), "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "rng": rng_state(), "epoch": self.epoch, "batch": self.batch, "global_step": self.global_step,
                "best_ra": self.best_ra, "history": json.dumps(self.history), "config": self.cfg.to_dict(),
                "bad_steps": self.bad_steps, "world_size": self.world}

    def save(self, name: str | None = None) -> Path:
        """Write a checkpoint (rank 0, atomically) and return its path; every rank returns once it is
        on disk, or raises rank 0's error. A collective under DDP: all ranks call it at the same step."""
        path = self.ckpt_dir / (name or f"step-{self.global_step:08d}.pt")
        rng_ranks = dist.all_gather_object(rng_state()) if self.world > 1 else None

        def write() -> Path:
            state = self.state_dict()
            if rng_ranks is not None:
                state["rng_ranks"] = rng_ranks
            ckpt_io.atomic_save(state, path)
            if name is None:
                ckpt_io.prune(self.ckpt_dir, keep=2)
            return path

        return dist.on_main(write)

    def restore(self) -> bool:
        """Resume from the newest loadable step checkpoint (corrupt ones are reported and skipped).
        Rank 0 chooses the file; every rank loads that same file (out_dir must be on a filesystem
        all nodes see)."""
        loaded: dict[str, Any] = {}

        def choose() -> str | None:
            ckpt_io.clean_stale_temporaries(self.ckpt_dir)
            found = ckpt_io.newest_valid(self.ckpt_dir)
            if found is None:
                return None
            loaded["ck"] = found[1]
            return str(found[0])

        chosen = dist.on_main(choose)
        if chosen is None:
            return False
        path = Path(chosen)
        ck = loaded.get("ck") or ckpt_io.load_checkpoint(path)
        ckpt_io.check_spec(ck["spec"], self.model.spec, path)
        ckpt_io.load_weights(self.model, ck["model"], path)
        self.opt.load_state_dict(ck["optimizer"])
        self.scaler.load_state_dict(ck["scaler"])
        if self.ema is not None and ck.get("ema") is not None:
            self.ema.load_state_dict(ck["ema"])
        saved_world = ck.get("world_size", 1)
        if ck.get("rng_ranks") is not None and len(ck["rng_ranks"]) == self.world:
            set_rng_state(ck["rng_ranks"][self.rank])
        elif self.rank == 0:
            set_rng_state(ck["rng"])
        if saved_world != self.world and self.main:
            warnings.warn(f"{path} was written by a run with {saved_world} process(es), this one has {self.world}: "
                          f"training continues with the same global batch, but the dropout streams of ranks > 0 "
                          f"differ, so the result is not bit-identical to an uninterrupted run.", stacklevel=2)
        self.epoch, self.batch, self.global_step = ck["epoch"], ck["batch"], ck["global_step"]
        self.best_ra, self.history = ck["best_ra"], json.loads(ck["history"])
        self.bad_steps = ck.get("bad_steps", 0)
        if self.batch > self.steps_per_epoch:
            raise CheckpointError(f"{path} stopped at batch {self.batch} of an epoch that now has {self.steps_per_epoch} "
                                  f"batches: resume with the same batch_size, train_limit and data.")
        dist.print0(f"resumed from {path} at epoch {self.epoch}, batch {self.batch} (step {self.global_step})")
        return True

    # -- one step ---------------------------------------------------------------------------------
    def set_lr(self) -> float:
        # The schedule is a pure function of the global step: nothing to checkpoint, exact on resume.
        lr = self.cfg.lr * lr_factor(self.cfg, self.global_step / self.steps_per_epoch)
        for group in self.opt.param_groups:
            group["lr"] = lr
        return lr

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any] | None:
        self.set_lr()
        res = self.stepper(x, y, step=self.global_step)
        if res.failure:
            return self._bad_step(res)
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.bad_steps = 0
        self.times.attack.append(res.attack_s)
        self.times.update.append(res.update_s)
        self.times.images.append(len(y) * self.world)
        record = {"loss": res.loss}
        if self.global_step % self.cfg.log_every == 0:
            out = res.output
            record.update(summarize_stats(out.stats))
            logits = out.logits_nat if out.logits_nat is not None else out.logits_adv
            record["train_acc"] = float((logits.argmax(1) == y).float().mean())
            if out.logits_adv is not None:
                record["train_adv_acc"] = float((out.logits_adv.argmax(1) == y).float().mean())
            if self.world > 1:
                # loss and accuracies over the global batch (the other statistics are rank 0's)
                keys = [k for k in ("loss", "train_acc", "train_adv_acc") if k in record]
                means = dist.all_reduce(torch.tensor([record[k] for k in keys], dtype=torch.float64), "sum") / self.world
                record.update({k: float(v) for k, v in zip(keys, means)})
        return record

    def _bad_step(self, res: StepResult) -> None:
        self.opt.zero_grad(set_to_none=True)
        if res.calibrating:
            warnings.warn(f"step {self.global_step}: {res.failure}; step skipped (the scaler is still calibrating, "
                          f"not counted as a bad step)", stacklevel=2)
            return None
        self.bad_steps += 1
        warnings.warn(f"step {self.global_step}: {res.failure}; step skipped ({self.bad_steps} in a row)", stacklevel=2)
        if self.bad_steps >= self.cfg.max_bad_steps:
            path = self.save()
            raise NumericalError(
                f"{self.bad_steps} consecutive bad steps ({res.failure}). Training stopped; the last good state "
                f"is in {path}. Lower the learning rate, use --amp off (fp32) or bf16 instead of fp16, and check the data.")
        return None

    # -- stop signals -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def stop_on_signals(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        """While training, SIGTERM only sets a flag; the loop checks it at the next step boundary (all
        ranks agree through an all-reduce), writes a checkpoint and raises TrainingInterrupted.
        Outside the training loop (setup, final evaluation) it raises at once: nothing to save."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            self.stop_signal = signal.Signals(signum).name
            self.stop_requested = True
            if self.phase != "train":
                raise TrainingInterrupted(f"stopped by {self.stop_signal} during {self.phase}; the newest checkpoint in "
                                          f"{self.ckpt_dir} is intact. Resume with --resume.")

        previous = {sig: signal.signal(sig, handler) for sig in signals}
        try:
            yield
        finally:
            for sig, h in previous.items():
                signal.signal(sig, h)

    def check_stop(self, saved: Path | None = None) -> None:
        """At a step boundary: if any rank was asked to stop, checkpoint here (unless ``saved`` already
        holds this state) and raise TrainingInterrupted."""
        if not (dist.any_flag(self.stop_requested) if self.world > 1 else self.stop_requested):
            return
        path = saved or self.save()
        why = self.stop_signal or "a stop signal on another rank"
        raise TrainingInterrupted(f"stopped by {why} at epoch {self.epoch}, batch {self.batch} (step {self.global_step}); "
                                  f"checkpoint written to {path}. Run the same command with --resume to continue.")

    # -- the loop ---------------------------------------------------------------------------------
    def validate_epoch(self) -> dict[str, float]:
        cfg = self.cfg
        n = min(cfg.val_samples, len(self.test.labels))
        if n == 0:
            return {}
        ev = EvalConfig(dataset=cfg.dataset, eps=cfg.eval.eps, norm=cfg.eval.norm, attacks=("pgd",),
                        pgd_steps=cfg.eval.pgd_steps, pgd_step_size=cfg.eval.pgd_step_size, num_samples=n,
                        aa_samples=0, batch_size=cfg.eval.batch_size, sweep_samples=0, seed=cfg.seed)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = evaluate(self.eval_model(), self.test.images, self.test.labels, ev, self.device, progress=False,
                         distributed=self.world > 1)
        return {"val_na": r.na, "val_pgd_ra": r.ra["pgd"], "val_n": n}

    def eval_model(self) -> nn.Module:
        model = self.ema.module if self.ema is not None else self.model
        if self.world > 1:
            dist.broadcast_buffers(model)  # per-rank batch-norm statistics: evaluate rank 0's everywhere
        return model

    def log(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def fit(self) -> dict[str, Any]:
        with self.stop_on_signals():
            return self._fit()

    def _fit(self) -> dict[str, Any]:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.resume:
            self.restore()
        elif self.main and (self.out / "log.jsonl").exists():
            (self.out / "log.jsonl").unlink()
        if self.main:
            write_json(self.out / "manifest.json", manifest(
                cfg.to_dict(), device=self.device, seed=cfg.seed, loader=getattr(self.loader, "backend", cfg.loader),
                kernels=cfg.kernels, distributed={"world_size": self.world, "per_rank_batch": self.rank_batch,
                                                  "backend": dist.backend()}))
        self.phase = "train"
        while self.epoch < cfg.epochs:
            epoch_start = time.perf_counter()
            self.loader.set_epoch(self.epoch, start_batch=self.batch)
            bar = tqdm(total=self.steps_per_epoch, initial=self.batch, desc=f"{cfg.method} epoch {self.epoch + 1}/{cfg.epochs}",
                       disable=not (cfg.progress and self.main), leave=False)
            for x, y in self.loader:
                self.check_stop()
                if not self.channels_last:
                    x = x.contiguous()  # the loaders deliver NHWC; match the model's layout
                record = self.step(x, y)
                self.batch += 1
                self.global_step += 1
                bar.update(1)
                if record is not None:
                    bar.set_postfix(loss=f"{record['loss']:.3f}")
                    if (self.global_step - 1) % cfg.log_every == 0:
                        self.log({"kind": "step", "epoch": self.epoch, "step": self.global_step,
                                  "lr": self.opt.param_groups[0]["lr"], **record})
                if cfg.ckpt_every_steps and self.global_step % cfg.ckpt_every_steps == 0:
                    self.save()
            bar.close()
            self.epoch, self.batch = self.epoch + 1, 0
            val = self.validate_epoch()
            summary = {"kind": "epoch", "epoch": self.epoch, "step": self.global_step, "lr": self.opt.param_groups[0]["lr"],
                       "epoch_seconds": time.perf_counter() - epoch_start, **val, **self.times.report(self.device)}
            self.history.append(summary)
            self.log(summary)
            if val and val["val_pgd_ra"] > self.best_ra:
                self.best_ra = val["val_pgd_ra"]
                self.save("best.pt")
            saved = self.save()
            if cfg.progress and self.main:
                print(f"epoch {self.epoch}: " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items()
                                                        if k in ("val_na", "val_pgd_ra", "img_per_s", "epoch_seconds")))
            self.check_stop(saved)
        final = self.save("final.pt")
        self.check_stop(final)
        self.phase = "final evaluation"
        return self.finish()

    def finish(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.main:
            self.write_history()
        throughput = self.times.report(self.device)
        throughput.update(method=cfg.method, model=cfg.model, dataset=cfg.dataset, batch_size=cfg.batch_size,
                          amp=str(self.stepper.amp), compile=cfg.compile, kernels=cfg.kernels, world_size=self.world)
        if self.main:
            write_json(self.out / "throughput.json", throughput)
            atomic_write_text(self.out / "throughput.md", throughput_markdown({cfg.method: throughput}))
        summary: dict[str, Any] = {"out_dir": str(self.out), "throughput": throughput, "history": self.history}
        if cfg.final_eval:
            result = evaluate(self.eval_model(), self.test.images, self.test.labels, cfg.eval, self.device,
                              progress=cfg.progress and self.main, distributed=self.world > 1)
            name = f"{cfg.dataset}_{cfg.method}_{cfg.model}"
            if self.main:
                save_results({name: result}, self.out, manifest(cfg.to_dict(), device=self.device, seed=cfg.seed,
                                                                checkpoint=str(self.ckpt_dir / "final.pt"),
                                                                checkpoint_sha256=_sha256(self.ckpt_dir / "final.pt"),
                                                                world_size=self.world))
                plot_scatter(self.out / "na_ra.png", {name: (100 * result.na, 100 * result.ra.get("pgd", float("nan")))},
                             xlabel="natural accuracy (%)", ylabel="PGD robust accuracy (%)", title="NA against RA")
            summary["eval"] = result
        dist.barrier()  # rank 0's files are complete when train() returns on any rank
        return summary

    def write_history(self) -> None:
        if not self.history:
            return
        keys = ["epoch", "lr", "val_na", "val_pgd_ra", "img_per_s", "ms_per_step", "attack_ms", "update_ms",
                "peak_memory_mb", "epoch_seconds"]
        rows = [[h.get(k) for k in keys] for h in self.history]
        from .report import csv_text
        atomic_write_text(self.out / "epochs.csv", csv_text(keys, rows))
        steps = [json.loads(line) for line in (self.out / "log.jsonl").read_text().splitlines()
                 if '"kind": "step"' in line] if (self.out / "log.jsonl").exists() else []
        series = {}
        if steps:
            series["train loss"] = ([s["step"] / self.steps_per_epoch for s in steps], [s["loss"] for s in steps])
        if any("val_na" in h for h in self.history):
            series["val NA"] = ([h["epoch"] for h in self.history], [h.get("val_na", float("nan")) for h in self.history])
            series["val PGD RA"] = ([h["epoch"] for h in self.history], [h.get("val_pgd_ra", float("nan")) for h in self.history])
        if series:
            plot_lines(self.out / "curves.png", series, xlabel="epoch", ylabel="loss / accuracy",
                       title=f"{self.cfg.method} {self.cfg.model} on {self.cfg.dataset}")


def throughput_markdown(rows: dict[str, dict[str, Any]]) -> str:
    headers = ["Run", "img/s", "ms/step", "attack ms", "update ms", "attack share", "peak MB", "device"]
    body = [[name, r.get("img_per_s"), r.get("ms_per_step"), r.get("attack_ms"), r.get("update_ms"),
             r.get("attack_share"), r.get("peak_memory_mb"), r.get("device")] for name, r in rows.items()]
    return "**Training throughput** (median over timed steps, first 2 excluded)\n\n" + markdown_table(headers, body) + "\n"


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{time.time_ns()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output folder {out} is not writable ({e.strerror or e}). Choose another --out-dir.") from e


def _sha256(path: Path) -> str | None:
    import hashlib
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def train(cfg: TrainConfig) -> dict[str, Any]:
    return Trainer(cfg).fit()
