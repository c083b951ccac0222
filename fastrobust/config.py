"""Run configuration: one flat, validated dataclass per job, serialisable to JSON for manifests."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, check_eps, check_positive_int, unknown_name

DATASETS = ("cifar10", "mnist")
METHODS = ("standard", "trades", "mart", "faal", "dtrades")
LR_SCHEDULES = ("piecewise", "cosine", "constant")
LAMBDA_NORMS = ("minmax", "mean", "none")
SENSITIVITIES = ("exact", "attack", "func")
FAAL_BASES = ("at", "trades", "mart")
AMP_MODES = ("auto", "bf16", "fp16", "off")
KERNEL_BACKENDS = ("auto", "triton", "reference")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
EVAL_ATTACKS = ("fgsm", "pgd", "autoattack")

# The per-dataset threat model applies to every attack of an evaluation. Using the wrong radius
# for one attack is how the paper's MNIST AutoAttack column (RA 95.9% beside PGD RA 9.7%) arose.
EVAL_DEFAULTS = {
    "cifar10": {"eps": 0.031, "pgd_step_size": 0.003},
    "mnist": {"eps": 0.3, "pgd_step_size": 0.01},
}


@dataclass
class EvalConfig:
    """Robustness evaluation. ``None`` radius/step take the dataset's defaults (EVAL_DEFAULTS)."""
    dataset: str = "cifar10"
    eps: float | None = None
    norm: str = "linf"
    attacks: tuple[str, ...] = EVAL_ATTACKS
    pgd_steps: int = 20
    pgd_step_size: float | None = None
    pgd_random_start: str = "uniform"
    num_samples: int | None = None          # None: the whole test set
    aa_samples: int = 1000                  # AutoAttack on the first n test points
    aa_version: str = "standard"
    aa_attacks: tuple[str, ...] = ()        # with aa_version="custom": e.g. ("apgd-ce", "apgd-t")
    batch_size: int = 256
    sweep_samples: int = 200                # eps-sweep sanity checks on the first n points
    sweep_multipliers: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0)
    seed: int = 0

    def resolved(self) -> "EvalConfig":
        if self.dataset not in EVAL_DEFAULTS:
            raise unknown_name("dataset", self.dataset, EVAL_DEFAULTS)
        d = EVAL_DEFAULTS[self.dataset]
        out = dataclasses.replace(self, eps=d["eps"] if self.eps is None else self.eps,
                                  pgd_step_size=d["pgd_step_size"] if self.pgd_step_size is None else self.pgd_step_size,
                                  attacks=tuple(self.attacks), sweep_multipliers=tuple(self.sweep_multipliers),
                                  aa_attacks=tuple(self.aa_attacks))
        out.validate()
        return out

    def validate(self) -> None:
        check_eps(self.eps, "eval eps")
        for a in self.attacks:
            if a not in EVAL_ATTACKS:
                raise unknown_name("attack", a, EVAL_ATTACKS)
        if self.norm not in ("linf", "l2"):
            raise unknown_name("norm", self.norm, ("linf", "l2"))
        check_positive_int(self.pgd_steps, "pgd_steps")
        check_positive_int(self.batch_size, "eval batch_size")
        if self.num_samples is not None:
            check_positive_int(self.num_samples, "eval num_samples")
        if self.aa_samples < 0 or self.sweep_samples < 0:
            raise ConfigError("aa_samples and sweep_samples must be >= 0")
        if self.aa_version == "custom" and not self.aa_attacks:
            raise ConfigError("aa_version 'custom' needs aa_attacks, e.g. ('apgd-ce', 'apgd-t')")
        if not (self.pgd_step_size and self.pgd_step_size > 0):
            raise ConfigError(f"pgd_step_size must be > 0, got {self.pgd_step_size}")


@dataclass
class TrainConfig:
    """Everything a training run needs. Defaults are the paper's CIFAR-10 protocol with TRADES."""
    # what to train
    dataset: str = "cifar10"
    model: str = "resnet18"
    method: str = "trades"
    # data
    data_dir: str | None = None
    train_limit: int | None = None          # first n training images (smoke runs)
    val_samples: int = 1000                 # held-out test slice for the per-epoch PGD check
    loader: str = "auto"                    # auto | gpu (device-resident) | torch | ffcv
    beton_dir: str | None = None            # where FFCV .beton files are written/read (ffcv loader)
    # optimisation (SGD with momentum)
    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    lr_schedule: str = "piecewise"
    lr_milestones: tuple[float, ...] = (90.0, 100.0)  # epochs; lr *= lr_gamma at each
    lr_gamma: float = 0.1
    # the training attack
    norm: str = "linf"
    eps: float = 0.031
    attack_steps: int = 10
    attack_step_size: float = 0.007
    # method options
    beta: float = 6.0                       # TRADES / MART KL weight; FAAL's base-loss weight
    lambda_alpha: float = 1.0               # D-TRADES: weight of the entropy H
    lambda_beta: float = 1.0                # D-TRADES: weight of the sensitivity s
    lambda_norm: str = "minmax"             # minmax (paper) | mean | none
    lambda_scale: float = 1.0
    sensitivity: str = "exact"              # exact | attack | func
    entropy_eps: float = 1e-12
    faal_r: float = 0.1
    faal_base: str = "trades"               # at | trades | mart
    kernels: str = "auto"
    # engineering
    device: str = "auto"
    amp: str = "auto"                       # bf16 on a GPU, off on the CPU
    channels_last: bool = True              # model and batches in NHWC: faster convolutions on GPU and CPU
    compile: bool = False
    compile_mode: str = "default"           # default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs
    activation_checkpointing: bool = False  # recompute residual blocks in the backward (WRN-34-10 memory)
    ema_decay: float | None = None
    init_checkpoint: str | None = None      # fine-tune from these weights (FAAL's official protocol)
    seed: int = 0
    out_dir: str = "runs/default"
    ckpt_every_steps: int = 0               # also checkpoint mid-epoch every n steps (0: epochs only)
    resume: bool = False
    max_bad_steps: int = 5                  # consecutive non-finite steps before stopping
    log_every: int = 10
    progress: bool = True
    final_eval: bool = True
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> "TrainConfig":
        for value, valid, kind in ((self.dataset, DATASETS, "dataset"), (self.method, METHODS, "method"),
                                   (self.lr_schedule, LR_SCHEDULES, "lr schedule"),
                                   (self.lambda_norm, LAMBDA_NORMS, "lambda normalisation"),
                                   (self.sensitivity, SENSITIVITIES, "sensitivity mode"),
                                   (self.faal_base, FAAL_BASES, "FAAL base loss"), (self.amp, AMP_MODES, "amp mode"),
                                   (self.kernels, KERNEL_BACKENDS, "kernel backend"), (self.norm, ("linf", "l2"), "norm"),
                                   (self.compile_mode, COMPILE_MODES, "compile mode")):
            if value not in valid:
                raise unknown_name(kind, value, valid)
        from .models import list_models  # late: keeps config import-light
        if self.model not in list_models():
            raise unknown_name("model", self.model, list_models())
        check_eps(self.eps, "eps")
        check_positive_int(self.epochs, "epochs")
        check_positive_int(self.batch_size, "batch_size")
        check_positive_int(self.attack_steps, "attack_steps")
        if self.train_limit is not None:
            check_positive_int(self.train_limit, "train_limit")
        for name in ("lr", "attack_step_size"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ConfigError(f"{name} must be a finite number > 0, got {v}")
        for name in ("momentum", "weight_decay", "beta", "lambda_alpha", "lambda_beta", "lambda_scale", "faal_r"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ConfigError(f"{name} must be a finite number >= 0, got {v}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError(f"ema_decay must lie in (0, 1), got {self.ema_decay}")
        if self.max_bad_steps < 1:
            raise ConfigError(f"max_bad_steps must be >= 1, got {self.max_bad_steps}")
        self.lr_milestones = tuple(float(m) for m in self.lr_milestones)
        self.eval = dataclasses.replace(self.eval, dataset=self.dataset)
        self.eval.resolved()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown config keys {sorted(unknown)}; valid keys: {sorted(known)}")
        ev = d.pop("eval", None)
        cfg = cls(**d)
        if isinstance(ev, dict):
            ev_known = {f.name for f in dataclasses.fields(EvalConfig)}
            bad = set(ev) - ev_known
            if bad:
                raise ConfigError(f"unknown eval config keys {sorted(bad)}; valid keys: {sorted(ev_known)}")
            cfg.eval = EvalConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ev.items()})
        elif isinstance(ev, EvalConfig):
            cfg.eval = ev
        for k in ("lr_milestones",):
            setattr(cfg, k, tuple(getattr(cfg, k)))
        return cfg

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
