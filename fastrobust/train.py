"""The trainer: a plain loop (nanoGPT-style), exactly resumable, with per-epoch robustness checks.

Run folder layout (``cfg.out_dir``)::

    manifest.json          config, versions, git commit, device, seed
    log.jsonl              one record per logged step and per epoch
    epochs.csv             per-epoch summary
    checkpoints/step-*.pt  rolling resumable checkpoints (newest two kept), best.pt, final.pt
    results.{md,csv,json}  the final evaluation tables
    throughput.{md,json}   img/s, ms per step, attack/update split, peak memory, device
    curves.png, na_ra.png  training curves and NA against RA

Resuming (``resume=True``) restores model, optimiser, grad scaler, EMA, every RNG state and the
position inside the epoch (the learning rate is a function of the step). The loaders are
deterministic in (seed, epoch, batch), so a resumed run produces the same weights as an
uninterrupted one (bit-identical on the CPU).
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import resource
import statistics
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
from .config import EvalConfig, TrainConfig
from .errors import CheckpointError, ConfigError, NumericalError
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


class TrainStep:
    """One optimisation step of a method: attack (eval mode), loss (train mode), update.

    Shared by the trainer and the step profiler, so what is profiled is what trains. AMP autocasts
    the forwards (bf16 by default on a GPU; fp16 uses a grad scaler); losses accumulate in fp32.
    A non-finite loss or an fp16 overflow skips the update and is reported in ``failure``."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, device: torch.device):
        self.cfg, self.model, self.device = cfg, model, device
        self.amp = amp_dtype(cfg, device)
        self.opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp is torch.float16)
        self.method = build_method(cfg)
        self.net = compile_model(model, cfg) if cfg.compile else model

    def autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        t0 = time.perf_counter()
        with self.autocast():
            adv = self.method.attack(self.net, x, y)
        _sync(self.device)
        t1 = time.perf_counter()
        self.model.train()
        with self.autocast():
            out = self.method.loss(self.net, x, y, adv)
        loss = out.loss.float()
        value = float(loss.detach())
        if not math.isfinite(value):
            self.opt.zero_grad(set_to_none=True)
            return StepResult(value, out, t1 - t0, time.perf_counter() - t1, f"loss is {value}")
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.opt)
        self.scaler.update()
        _sync(self.device)
        t2 = time.perf_counter()
        if scale_before is not None and self.scaler.get_scale() < scale_before:
            return StepResult(value, out, t1 - t0, t2 - t1, "fp16 gradients overflowed (the grad scaler skipped the step)")
        return StepResult(value, out, t1 - t0, t2 - t1)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg.validate()
        self.device = resolve_device(cfg.device)
        self.out = Path(cfg.out_dir)
        self.ckpt_dir = self.out / "checkpoints"
        _check_writable(self.out)
        self.channels_last = cfg.channels_last
        seed_everything(cfg.seed)

        # A compiled step specialises on the batch shape: drop the last partial batch rather than
        # recompile for it (fewer than batch_size samples per epoch go unseen, a different subset each epoch).
        self.loader = loaders.build(cfg.dataset, "train", cfg.batch_size, self.device, backend=cfg.loader,
                                    seed=cfg.seed, data_dir=cfg.data_dir, limit=cfg.train_limit,
                                    drop_last=True if cfg.compile else None, beton_dir=cfg.beton_dir)
        self.test = loaders.load_arrays(cfg.dataset, "test", cfg.data_dir)
        self.model = create_model(cfg.model, dataset=cfg.dataset).to(self.device)
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
        self.epoch, self.batch, self.global_step = 0, 0, 0
        self.best_ra = -1.0
        self.history: list[dict[str, Any]] = []
        self.times = StepTimes()
        self.bad_steps = 0
        self.stop_requested = False

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"format": ckpt_io.FORMAT, "spec": self.model.spec.to_dict(), "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "rng": rng_state(), "epoch": self.epoch, "batch": self.batch, "global_step": self.global_step,
                "best_ra": self.best_ra, "history": json.dumps(self.history), "config": self.cfg.to_dict(),
                "bad_steps": self.bad_steps}

    def save(self, name: str | None = None) -> Path:
        path = self.ckpt_dir / (name or f"step-{self.global_step:08d}.pt")
        ckpt_io.atomic_save(self.state_dict(), path)
        if name is None:
            ckpt_io.prune(self.ckpt_dir, keep=2)
        return path

    def restore(self) -> bool:
        found = ckpt_io.newest_valid(self.ckpt_dir)
        if found is None:
            return False
        path, ck = found
        ckpt_io.check_spec(ck["spec"], self.model.spec, path)
        ckpt_io.load_weights(self.model, ck["model"], path)
        self.opt.load_state_dict(ck["optimizer"])
        self.scaler.load_state_dict(ck["scaler"])
        if self.ema is not None and ck.get("ema") is not None:
            self.ema.load_state_dict(ck["ema"])
        set_rng_state(ck["rng"])
        self.epoch, self.batch, self.global_step = ck["epoch"], ck["batch"], ck["global_step"]
        self.best_ra, self.history = ck["best_ra"], json.loads(ck["history"])
        self.bad_steps = ck.get("bad_steps", 0)
        print(f"resumed from {path} at epoch {self.epoch}, batch {self.batch} (step {self.global_step})")
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
        res = self.stepper(x, y)
        if res.failure:
            return self._bad_step(res.failure)
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.bad_steps = 0
        self.times.attack.append(res.attack_s)
        self.times.update.append(res.update_s)
        self.times.images.append(len(y))
        record = {"loss": res.loss}
        if self.global_step % self.cfg.log_every == 0:
            out = res.output
            record.update(summarize_stats(out.stats))
            logits = out.logits_nat if out.logits_nat is not None else out.logits_adv
            record["train_acc"] = float((logits.argmax(1) == y).float().mean())
            if out.logits_adv is not None:
                record["train_adv_acc"] = float((out.logits_adv.argmax(1) == y).float().mean())
        return record

    def _bad_step(self, why: str) -> None:
        self.bad_steps += 1
        self.opt.zero_grad(set_to_none=True)
        warnings.warn(f"step {self.global_step}: {why}; step skipped ({self.bad_steps} in a row)", stacklevel=2)
        if self.bad_steps >= self.cfg.max_bad_steps:
            path = self.save()
            raise NumericalError(
                f"{self.bad_steps} consecutive non-finite steps ({why}). Training stopped; the last good state is in "
                f"{path}. Lower the learning rate, use --amp off (fp32) or bf16 instead of fp16, and check the data.")
        return None

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
            r = evaluate(self.eval_model(), self.test.images, self.test.labels, ev, self.device, progress=False)
        return {"val_na": r.na, "val_pgd_ra": r.ra["pgd"], "val_n": n}

    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def log(self, record: dict[str, Any]) -> None:
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.resume:
            self.restore()
        elif (self.out / "log.jsonl").exists():
            (self.out / "log.jsonl").unlink()
        write_json(self.out / "manifest.json", manifest(cfg.to_dict(), device=self.device, seed=cfg.seed,
                                                        loader=getattr(self.loader, "backend", cfg.loader),
                                                        kernels=cfg.kernels))
        while self.epoch < cfg.epochs:
            epoch_start = time.perf_counter()
            self.loader.set_epoch(self.epoch, start_batch=self.batch)
            bar = tqdm(total=self.steps_per_epoch, initial=self.batch, desc=f"{cfg.method} epoch {self.epoch + 1}/{cfg.epochs}",
                       disable=not cfg.progress, leave=False)
            for x, y in self.loader:
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
            self.save()
            if cfg.progress:
                print(f"epoch {self.epoch}: " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items()
                                                        if k in ("val_na", "val_pgd_ra", "img_per_s", "epoch_seconds")))
        self.save("final.pt")
        return self.finish()

    def finish(self) -> dict[str, Any]:
        cfg = self.cfg
        self.write_history()
        throughput = self.times.report(self.device)
        throughput.update(method=cfg.method, model=cfg.model, dataset=cfg.dataset, batch_size=cfg.batch_size,
                          amp=str(self.stepper.amp), compile=cfg.compile, kernels=cfg.kernels)
        write_json(self.out / "throughput.json", throughput)
        atomic_write_text(self.out / "throughput.md", throughput_markdown({cfg.method: throughput}))
        summary: dict[str, Any] = {"out_dir": str(self.out), "throughput": throughput, "history": self.history}
        if cfg.final_eval:
            result = evaluate(self.eval_model(), self.test.images, self.test.labels, cfg.eval, self.device,
                              progress=cfg.progress)
            name = f"{cfg.dataset}_{cfg.method}_{cfg.model}"
            save_results({name: result}, self.out, manifest(cfg.to_dict(), device=self.device, seed=cfg.seed,
                                                            checkpoint=str(self.ckpt_dir / "final.pt"),
                                                            checkpoint_sha256=_sha256(self.ckpt_dir / "final.pt")))
            plot_scatter(self.out / "na_ra.png", {name: (100 * result.na, 100 * result.ra.get("pgd", float("nan")))},
                         xlabel="natural accuracy (%)", ylabel="PGD robust accuracy (%)", title="NA against RA")
            summary["eval"] = result
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
