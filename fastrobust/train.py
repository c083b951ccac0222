"""The trainer: a plain loop (nanoGPT-style), exactly resumable, validated on held-out training images.

Run folder layout (``cfg.out_dir``)::

    manifest.json          config (the method's options included), versions, git commit, device, seed,
                           data split, kernel self-checks, warnings and fallbacks
    log.jsonl              one record per logged step and per epoch
    epochs.csv, curves.png per-epoch summary and training curves
    checkpoints/step-*.pt  rolling resumable checkpoints (newest two kept), best.pt, final.pt
    results.{md,csv,json}  the final evaluation on the test set, eps_sweep.png, na_ra.png
    throughput.{md,json}   img/s, ms per step, attack/update split, peak memory, device
    .lock                  flock-ed by the process training into the folder (fastrobust.run_folder: what
                           --resume checks, --overwrite, the lock, the history cut on resume)

Model selection never sees the test set: the last ``val_samples`` training images are held out (and
never trained on), and ``best.pt`` is the epoch with the best ``select_by`` on them. Resuming restores
model, optimiser, grad scaler, EMA, every RNG state (every rank's, under DDP) and the position inside
the epoch; the loaders are deterministic in (seed, epoch, batch) and the attack's start in (seed,
step, sample), so a resumed run gives the same weights as an uninterrupted one (bit-identical on the
CPU). SIGTERM is honoured at the next step boundary: a checkpoint is written and
:class:`TrainingInterrupted` raised (status 143 from the CLI); ``--resume`` continues. Under
``torchrun``, ``batch_size`` is the global batch and only rank 0 writes (README, "Scaling out").
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import resource
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

import kernels
import loaders

from . import checkpoint as ckpt_io
from . import distributed as dist
from . import report
from . import run_folder
from . import tensorboard_log
from .config import TrainConfig, lr_factor
from .errors import CheckpointError, ConfigError
from .evaluate import evaluate
from .models import create_model
from .step import TrainStep, amp_dtype, compile_wanted
from .stops import RunStops, weight_norm


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


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


def throughput(times: list[tuple[float, float, int]], device: torch.device, warmup: int = 2) -> dict[str, Any]:
    """Medians over the timed steps (attack seconds, update seconds, images), the first ``warmup`` excluded."""
    rows = times[warmup:] or times
    if not rows:
        return {}
    a, u, n = (statistics.median(col) for col in zip(*rows))
    total = statistics.median([x + y for x, y, _ in rows])
    return {"device": report.device_description(device), "steps_timed": len(rows), "ms_per_step": 1000 * total,
            "img_per_s": n / total, "attack_ms": 1000 * a, "update_ms": 1000 * u, "attack_share": a / total,
            "peak_memory_mb": peak_memory_mb(device)}


class Trainer(RunStops):

    def __init__(self, cfg: TrainConfig, manifest_extra: dict[str, Any] | None = None):
        self.cfg = cfg.validate()
        self.manifest_extra = dict(manifest_extra or {})   # e.g. a recipe's protocol notes, copied into manifest.json
        self.device = dist.resolve_device(cfg.device)
        self.rank, self.world = dist.rank(), dist.world_size()
        self.main = self.rank == 0
        if cfg.batch_size % self.world:
            lo, hi = cfg.batch_size // self.world * self.world, -(-cfg.batch_size // self.world) * self.world
            raise ConfigError(f"batch_size {cfg.batch_size} is the global batch and must be divisible by the number "
                              f"of processes ({self.world}); use {hi}" + (f" or {lo}" if lo else "") +
                              " (the learning rate is meant for the global batch).")
        self.out, self.ckpt_dir = Path(cfg.out_dir), Path(cfg.out_dir) / "checkpoints"
        # What the device makes of the settings, beyond rounding: recorded, and compared on resume like the fields.
        amp = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype(cfg, self.device)]
        self.resolved = {"amp": amp, "drop_last": compile_wanted(cfg, self.device)}
        info = loaders.dataset_info(cfg.dataset)
        self.expected_spec = {"name": cfg.model, "num_classes": info.num_classes, "in_chans": info.channels,
                              "img_size": info.size}
        # Refuse a folder this start may not use (another run, a resume of another config, a folder in use)
        # before anything is written or loaded; fit() checks again once it holds the folder's lock.
        dist.on_main(run_folder.inspect, cfg, self.resolved, self.expected_spec)
        dist.on_main(report.check_output_folder, self.out, "run folder (--out-dir)")
        self.use_tensorboard = self.main and tensorboard_log.wanted(cfg.tensorboard)
        self.tensorboard: tensorboard_log.TensorBoardLog | None = None   # opened once the folder is claimed
        seed_everything(cfg.seed)
        self.warnings: list[str] = []
        weakness = cfg.attack.weakness() if cfg.method.objective else None
        note = f"training attack {weakness}" if weakness else None
        if note:
            self.warnings.append(note)
            if self.main:
                warnings.warn(note, stacklevel=2)

        # Hold out the last val_samples training images; train on the first of the rest.
        full = loaders.dataset_info(cfg.dataset).num_samples["train"]
        self.train_n = min(cfg.train_limit or full, full - cfg.val_samples)
        if self.train_n < cfg.batch_size:
            raise ConfigError(f"{self.train_n} training images (train_limit {cfg.train_limit}, {cfg.val_samples} held "
                              f"out for validation) do not fill one batch of {cfg.batch_size}: lower batch_size or "
                              f"val_samples.")
        # A compiled step specialises on the batch shape: drop the last partial batch rather than recompile.
        compiled = compile_wanted(cfg, self.device)
        self.loader = loaders.build(cfg.dataset, "train", cfg.batch_size // self.world, self.device,
                                    backend=cfg.loader, seed=cfg.seed, data_dir=cfg.data_dir, limit=self.train_n,
                                    drop_last=True if compiled else None,
                                    beton_dir=cfg.beton_dir, rank=self.rank, world_size=self.world)
        self.val = None
        if cfg.val_samples:
            train_split = loaders.load_arrays(cfg.dataset, "train", cfg.data_dir)
            self.val = (train_split.images[full - cfg.val_samples:], train_split.labels[full - cfg.val_samples:])
        self.split = {"train": [0, self.train_n], "validation": [full - cfg.val_samples, full],
                      "test": "the whole test split, final evaluation only"}

        self.model = create_model(cfg.model, dataset=cfg.dataset, normalization=cfg.input_normalization).to(self.device)
        if cfg.dropout is not None:
            for m in self.model.modules():
                if isinstance(m, nn.modules.dropout._DropoutNd):
                    m.p = cfg.dropout
        self.model.activation_checkpointing = cfg.activation_checkpointing
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if cfg.init_checkpoint:
            init = ckpt_io.load_checkpoint(cfg.init_checkpoint)
            ckpt_io.check_spec(init["spec"], self.model.spec, cfg.init_checkpoint)
            ckpt_io.load_weights(self.model, init["model"], cfg.init_checkpoint)
        self.stepper = TrainStep(cfg, self.model, self.device)
        self.opt, self.scaler = self.stepper.opt, self.stepper.scaler
        kernels.self_check(self.device, self.stepper.amp or torch.float32, self.model.spec.num_classes,
                           (self.model.spec.in_chans, self.model.spec.img_size, self.model.spec.img_size), cfg.kernels,
                           batch_size=cfg.batch_size // self.world)   # the per-process batch: its launch shape
        self.steps_per_epoch = len(self.loader)
        self.ema = None
        if cfg.ema_decay:
            self.ema = torch.optim.swa_utils.AveragedModel(
                self.model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
        if self.rank:  # the same weights everywhere, but each rank draws its own dropout masks
            seed_everything(dist.derive_seed(cfg.seed, "rank", self.rank) % 2**32)
        self.epoch = self.batch = self.global_step = self.bad_steps = 0
        self.best = -1.0
        self.history: list[dict[str, Any]] = []
        self.known_checkpoints: dict[int, Path] = {}   # the step checkpoints this run wrote or validated: prunable
        self.resumes: list[dict[str, Any]] = []        # every resume of the run, with the settings it changed
        self.times: list[tuple[float, float, int]] = []
        self.stop_signal: str | None = None
        self.phase = "setup"
        self.validated = False   # whether this process has run a validation pass (a weak PGD is said once)

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"format": ckpt_io.FORMAT, "spec": self.model.spec.to_dict(), "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None, "rng": ckpt_io.rng_state(), "epoch": self.epoch,
                "batch": self.batch, "global_step": self.global_step, "best": self.best,
                "history": json.dumps(self.history), "config": self.cfg.to_dict(), "bad_steps": self.bad_steps,
                "world_size": self.world, "resolved": self.resolved, "resumes": self.resumes}

    def save(self, name: str | None = None) -> Path:
        """Write a checkpoint (rank 0, atomically) and return its path once it is on disk, on every rank. A
        collective under DDP: all ranks call it at the same step."""
        path = self.ckpt_dir / (name or f"step-{self.global_step:08d}.pt")
        rng_ranks = dist.all_gather_object(ckpt_io.rng_state()) if self.world > 1 else None

        def write() -> Path:
            state = self.state_dict()
            if rng_ranks is not None:
                state["rng_ranks"] = rng_ranks
            ckpt_io.atomic_save(state, path)
            if name is None:
                self.known_checkpoints[self.global_step] = path
                ckpt_io.prune(self.known_checkpoints, keep=2)
            return path

        return dist.on_main(write)

    def restore(self, plan: run_folder.Plan | None = None) -> bool:
        """Resume from the checkpoint ``plan`` names (fit: after the run folder's checks), or, called on its
        own, from the newest usable step checkpoint; unusable ones are reported and skipped. Rank 0
        chooses the file; every rank loads it (out_dir must be on a filesystem all nodes see)."""
        def choose() -> run_folder.Plan:
            ckpt_io.clean_stale_temporaries(self.ckpt_dir)
            scan = ckpt_io.scan_step_checkpoints(self.ckpt_dir, self.model.spec)
            return run_folder.Plan("resume", checkpoint=str(scan.valid[-1][1]) if scan.valid else None,
                                   valid=[(s, str(p)) for s, p in scan.valid],
                                   rejected=[(str(p), why) for p, why in scan.rejected])

        plan = plan or dist.on_main(choose)
        if self.main:
            for _, why in plan.rejected:
                warnings.warn(f"skipping unusable checkpoint: {why}", stacklevel=2)
            self.known_checkpoints = {step: Path(p) for step, p in plan.valid}
        if plan.checkpoint is None:
            return False
        path = Path(plan.checkpoint)
        ck = ckpt_io.load_checkpoint(path)
        ckpt_io.check_spec(ck["spec"], self.model.spec, path)
        ckpt_io.load_weights(self.model, ck["model"], path)
        self.opt.load_state_dict(ck["optimizer"])
        self.scaler.load_state_dict(ck["scaler"])
        if self.ema is not None and ck.get("ema") is not None:
            self.ema.load_state_dict(ck["ema"])
        if ck.get("rng_ranks") is not None and len(ck["rng_ranks"]) == self.world:
            ckpt_io.set_rng_state(ck["rng_ranks"][self.rank])
        elif self.rank == 0:
            ckpt_io.set_rng_state(ck["rng"])
        if ck.get("world_size", 1) != self.world and self.main:
            warnings.warn(f"{path} was written by a run with {ck.get('world_size', 1)} process(es), this one has "
                          f"{self.world}: training continues with the same global batch, but the dropout streams of "
                          f"ranks > 0 differ, so the result is not bit-identical to an uninterrupted run.", stacklevel=2)
        self.epoch, self.batch, self.global_step = ck["epoch"], ck["batch"], ck["global_step"]
        self.best, self.history = ck.get("best", ck.get("best_ra", -1.0)), json.loads(ck["history"])
        self.bad_steps = ck.get("bad_steps", 0)
        if self.batch > self.steps_per_epoch:
            raise CheckpointError(f"{path} stopped at batch {self.batch} of an epoch that now has {self.steps_per_epoch} "
                                  f"batches: resume with the same batch_size, train_limit and data.")
        self.resumes = [*(ck.get("resumes") or []), {"checkpoint": path.name, "step": self.global_step,
                                                     "changes": plan.changes}]
        changed = run_folder.describe_changes(plan.changes)
        dist.print0(f"resumed from {path} at epoch {self.epoch}, batch {self.batch} (step {self.global_step})"
                    + (f", with settings that do not change the trained model changed ({changed})" if changed else ""))
        return True

    # -- one step ---------------------------------------------------------------------------------
    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any] | None:
        lr = self.cfg.lr * lr_factor(self.cfg, self.epoch, self.batch / self.steps_per_epoch)
        for group in self.opt.param_groups:   # a pure function of the step: exact on resume
            group["lr"] = lr
        notes = len(self.stepper.notes)
        if self.start_weight_norm is None:
            self.start_weight_norm = weight_norm(self.model.state_dict())
        res = self.stepper(x, y, step=self.global_step, epoch=self.epoch)
        if len(self.stepper.notes) != notes:
            self.write_manifest()   # a fallback (compile): recorded now, not only if the run finishes
        if res.failure:
            self.opt.zero_grad(set_to_none=True)
            if res.calibrating:
                warnings.warn(f"step {self.global_step}: {res.failure}; step skipped (the scaler is still calibrating, "
                              f"not counted as a bad step)", stacklevel=2)
                return None
            self.bad_steps += 1
            self.last_failure = res.failure
            warnings.warn(f"step {self.global_step}: {res.failure}; step skipped ({self.bad_steps} in a row)", stacklevel=2)
            if self.bad_steps >= self.cfg.max_bad_steps:
                raise self.bad_steps_stop(res.failure)
            return None
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.bad_steps = 0
        self.last_finite_loss = (self.global_step, res.loss)
        self.times.append((res.attack_s, res.update_s, len(y) * self.world))
        record: dict[str, Any] = {"loss": res.loss, "lr": lr}
        if self.global_step % self.cfg.log_every == 0:
            out = res.output
            record.update(summarize_stats(out.stats))
            logits = out.logits_nat if out.logits_nat is not None else out.logits_adv
            record["train_acc"] = float((logits.argmax(1) == y).float().mean())
            if out.logits_adv is not None:
                record["train_adv_acc"] = float((out.logits_adv.argmax(1) == y).float().mean())
            total = res.attack_s + res.update_s
            record.update(img_per_s=len(y) * self.world / total if total > 0 else None, ms_per_step=1000 * total,
                          attack_ms=1000 * res.attack_s)
            if self.world > 1:  # loss and accuracies over the global batch (the other statistics are rank 0's)
                keys = [k for k in ("loss", "train_acc", "train_adv_acc") if k in record]
                means = dist.all_reduce(torch.tensor([record[k] for k in keys], dtype=torch.float64), "sum") / self.world
                record.update({k: float(v) for k, v in zip(keys, means)})
        return record

    # -- the loop ---------------------------------------------------------------------------------
    def validate_epoch(self) -> dict[str, float]:
        """NA, PGD RA and worst-class PGD RA on the held-out training images (the final evaluation's PGD)."""
        cfg = self.cfg
        if not cfg.val_samples:
            return {}
        ev = dataclasses.replace(cfg.eval, attacks=("pgd",), aa_samples=0, sweep_samples=0, num_samples=None,
                                 seed=cfg.seed).resolved(cfg.attack.eps)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            # a weak validation PGD is said at this process's first validation, not every epoch
            r = evaluate(self.eval_model(), *self.val, ev, self.device, progress=False, distributed=self.world > 1,
                         warn_weak=not self.validated)
        self.validated = True
        return {"val_na": r.na, "val_pgd_ra": r.ra["pgd"], "val_worst_class_pgd_ra": r.worst_class("pgd"),
                "val_n": r.n}

    def eval_model(self) -> nn.Module:
        model = self.ema.module if self.ema is not None else self.model
        if self.world > 1:
            dist.broadcast_buffers(model)  # per-rank batch-norm statistics: evaluate rank 0's everywhere
        return model

    def log(self, record: dict[str, Any]) -> None:
        if self.main:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.tensorboard is not None:
                self.tensorboard.write(record)

    def write_manifest(self) -> None:
        if self.main:
            report.write_json(self.out / "manifest.json", report.manifest(
                self.cfg.to_dict(), device=self.device, seed=self.cfg.seed, data_split=self.split,
                loader=getattr(self.loader, "backend", self.cfg.loader), kernels_self_check=kernels.self_check_report(),
                warnings=self.warnings, fallbacks=self.stepper.notes, resolved=self.resolved, resumes=self.resumes,
                resumed_with_changes=run_folder.merged_changes(self.resumes),
                distributed={"world_size": self.world, "per_rank_batch": self.cfg.batch_size // self.world,
                             "backend": dist.backend()}, **self.manifest_extra))

    def fit(self) -> dict[str, Any]:
        with self.stop_on_signals(), self.holding_folder():
            return self._fit()

    @contextlib.contextmanager
    def holding_folder(self):
        """The run folder's lock for the whole run, taken by rank 0: the ranks of one run are one writer."""
        lock = run_folder.FolderLock(self.out)
        dist.on_main(lock.acquire)
        try:
            yield
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()
                self.tensorboard = None
            lock.release()

    def claim_folder(self) -> run_folder.Plan:
        """Rank 0, holding the lock: the folder's checks once more (another process may have used it since
        __init__), then the folder made what the run starts from."""
        plan = run_folder.inspect(self.cfg, self.resolved, self.expected_spec, check_lock=False)
        line = run_folder.prepare(plan, self.out)
        if line:
            print(line)
        if self.use_tensorboard:   # after prepare: log.jsonl is what the run continues from
            self.tensorboard = tensorboard_log.TensorBoardLog(
                self.out, resume_step=plan.step if plan.action in ("resume", "restart") else None)
        return plan

    def _fit(self) -> dict[str, Any]:
        cfg = self.cfg
        plan = dist.on_main(self.claim_folder)
        if plan.checkpoint is not None:
            self.restore(plan)
        self.write_manifest()
        self.phase = "train"
        while self.epoch < cfg.epochs:
            epoch_start = time.perf_counter()
            self.loader.set_epoch(self.epoch, start_batch=self.batch)
            bar = tqdm(total=self.steps_per_epoch, initial=self.batch, leave=False,
                       desc=f"{cfg.method.name} epoch {self.epoch + 1}/{cfg.epochs}", disable=not (cfg.progress and self.main))
            for x, y in self.loader:
                self.check_stop()
                record = self.step(x if cfg.channels_last else x.contiguous(), y)
                self.batch += 1
                self.global_step += 1
                bar.update(1)
                if record is not None:
                    bar.set_postfix(loss=f"{record['loss']:.3f}")
                    if (self.global_step - 1) % cfg.log_every == 0:
                        self.log({"kind": "step", "epoch": self.epoch, "step": self.global_step, **record})
                if cfg.ckpt_every_steps and self.global_step % cfg.ckpt_every_steps == 0:
                    self.save()
            bar.close()
            lr = self.opt.param_groups[0]["lr"]
            self.epoch, self.batch = self.epoch + 1, 0
            val = self.validate_epoch()
            summary = {"kind": "epoch", "epoch": self.epoch, "step": self.global_step, "lr": lr,
                       "epoch_seconds": time.perf_counter() - epoch_start, **val, **throughput(self.times, self.device)}
            self.history.append(summary)
            self.log(summary)
            if val and val[f"val_{cfg.select_by}"] > self.best:
                self.best = val[f"val_{cfg.select_by}"]
                self.save("best.pt")
            saved = self.save()
            if cfg.progress and self.main:
                print(f"epoch {self.epoch}: " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items()
                                                        if k in ("val_na", "val_pgd_ra", "img_per_s", "epoch_seconds")))
            self.check_stop(saved)
        self.check_bad_steps_at_end()
        self.check_stop(self.save("final.pt"))
        self.phase = "final evaluation"
        return self.finish()

    def finish(self) -> dict[str, Any]:
        cfg = self.cfg
        self.write_manifest()   # with the fallbacks the run took
        if self.main:
            report.write_history(self.out, self.history, self.steps_per_epoch,
                                 f"{cfg.method.name} {cfg.model} on {cfg.dataset}")
        tp = throughput(self.times, self.device)
        tp.update(method=cfg.method.name, model=cfg.model, dataset=cfg.dataset, batch_size=cfg.batch_size,
                  amp=str(self.stepper.amp), compile=self.stepper.net is not self.model, kernels=cfg.kernels,
                  world_size=self.world)
        if self.main:
            report.write_json(self.out / "throughput.json", tp)
            report.atomic_write_text(self.out / "throughput.md", report.throughput_markdown({cfg.method.name: tp}))
        summary: dict[str, Any] = {"out_dir": str(self.out), "throughput": tp, "history": self.history}
        if cfg.final_eval:
            test = loaders.load_arrays(cfg.dataset, "test", cfg.data_dir)
            result = evaluate(self.eval_model(), test.images, test.labels, cfg.eval.resolved(cfg.attack.eps), self.device,
                              progress=cfg.progress and self.main, distributed=self.world > 1)
            result.warnings[:0] = self.warnings
            final = self.ckpt_dir / "final.pt"
            if self.main:
                report.save_results({f"{cfg.dataset}_{cfg.method.name}_{cfg.model}": result}, self.out, report.manifest(
                    cfg.to_dict(), device=self.device, seed=cfg.seed, checkpoint=str(final),
                    checkpoint_sha256=report.sha256(final), world_size=self.world))
            summary["eval"] = result
            if self.tensorboard is not None:
                self.tensorboard.write_evaluation(result, self.global_step)
        dist.barrier()  # rank 0's files are complete when train() returns on any rank
        return summary


def train(cfg: TrainConfig, manifest_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``cfg``; ``manifest_extra``: more top-level entries of manifest.json (a recipe's protocol notes)."""
    return Trainer(cfg, manifest_extra).fit()
