"""Run configuration: one flat, validated dataclass per job, serialisable to JSON for manifests."""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
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
LAMBDA_SYNCS = ("local", "global")
LOADERS = ("auto", "gpu", "torch", "ffcv")
RANDOM_STARTS = ("uniform", "trades", "none")
AA_VERSIONS = ("standard", "plus", "rand", "custom")
AA_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
MAX_SEED = 2**63 - 1


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("None" if a is type(None) else _type_name(a) for a in args)
    if origin is tuple:
        return f"a comma-separated list of {_type_name(args[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """``value`` checked against the annotation ``tp`` (ints pass as floats, lists as tuples); a
    ConfigError naming the field otherwise. Keeps a bad type from surfacing later as a traceback."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, name)
            except ConfigError:
                pass
    elif origin is tuple:
        if isinstance(value, (tuple, list)):
            return tuple(_coerce(v, args[0], name) for v in value)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(f"{name} must be {_type_name(tp)}, got {value!r}.")


def _check_field_types(obj: Any, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            continue
        setattr(obj, f.name, _coerce(getattr(obj, f.name), tp, prefix + f.name))


def _check_choice(value: str, valid: tuple[str, ...], kind: str) -> None:
    if value not in valid:
        raise unknown_name(kind, value, valid)


def _check_nonneg_int(value: int, what: str) -> None:
    if value < 0:
        raise ConfigError(f"{what} must be an integer >= 0, got {value}.")


def _check_path(value: str | None, what: str) -> None:
    if value is not None and not value.strip():
        raise ConfigError(f"{what} must not be an empty string; pass a path.")

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
        out = dataclasses.replace(self)
        _check_field_types(out, "eval ")
        if out.dataset not in EVAL_DEFAULTS:
            raise unknown_name("dataset", out.dataset, EVAL_DEFAULTS)
        d = EVAL_DEFAULTS[out.dataset]
        out.eps = d["eps"] if out.eps is None else out.eps
        out.pgd_step_size = d["pgd_step_size"] if out.pgd_step_size is None else out.pgd_step_size
        out.validate()
        return out

    def validate(self) -> None:
        _check_field_types(self, "eval ")
        check_eps(self.eps, "eval eps")
        if not self.attacks:
            raise ConfigError(f"eval attacks must name at least one of {', '.join(EVAL_ATTACKS)}.")
        for a in self.attacks:
            _check_choice(a, EVAL_ATTACKS, "attack")
        _check_choice(self.norm, ("linf", "l2"), "norm")
        _check_choice(self.pgd_random_start, RANDOM_STARTS, "random start")
        _check_choice(self.aa_version, AA_VERSIONS, "AutoAttack version")
        for a in self.aa_attacks:
            _check_choice(a, AA_ATTACKS, "AutoAttack attack")
        check_positive_int(self.pgd_steps, "pgd_steps")
        check_positive_int(self.batch_size, "eval batch_size")
        if self.num_samples is not None:
            check_positive_int(self.num_samples, "eval num_samples")
        if self.aa_samples < 0 or self.sweep_samples < 0:
            raise ConfigError(f"aa_samples and sweep_samples must be >= 0, got {self.aa_samples} and {self.sweep_samples}")
        if self.aa_version == "custom" and not self.aa_attacks:
            raise ConfigError("aa_version 'custom' needs aa_attacks, e.g. ('apgd-ce', 'apgd-t')")
        if not (self.pgd_step_size and self.pgd_step_size > 0 and math.isfinite(self.pgd_step_size)):
            raise ConfigError(f"pgd_step_size must be a finite number > 0, got {self.pgd_step_size}")
        for m in self.sweep_multipliers:
            if not (m >= 0 and math.isfinite(m)):
                raise ConfigError(f"sweep_multipliers must be finite numbers >= 0, got {m}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"eval seed must be an integer in [0, 2**63), got {self.seed}")


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
    lambda_sync: str = "local"              # D-TRADES under DDP: normalise H and s per rank (paper) or over the global batch
    entropy_eps: float = 1e-12
    faal_r: float = 0.1
    faal_base: str = "trades"               # at | trades | mart
    kernels: str = "auto"
    # engineering
    device: str = "auto"
    amp: str = "auto"                       # bf16 on a GPU, off on the CPU
    channels_last: bool = True              # model and batches in NHWC: faster convolutions on GPU and CPU
    dropout: float | None = None            # override the model's dropout rate (SmallCNN: 0.5); 0 turns it off
    sync_bn: bool = False                   # DDP: SyncBatchNorm (batch statistics over the global batch; CUDA only)
    compile: bool = False
    compile_mode: str = "default"           # default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs
    activation_checkpointing: bool = False  # recompute residual blocks in the backward (WRN-34-10 memory)
    ema_decay: float | None = None
    init_checkpoint: str | None = None      # fine-tune from these weights (FAAL's official protocol)
    seed: int = 0
    out_dir: str = "runs/default"
    ckpt_every_steps: int = 0               # also checkpoint mid-epoch every n steps (0: epochs only)
    resume: bool = False
    max_bad_steps: int = 5                  # consecutive bad steps before stopping: non-finite loss, or fp16 overflow at loss scale <= 1
    log_every: int = 10
    progress: bool = True
    final_eval: bool = True
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> "TrainConfig":
        """Check every field (type, range, names) and return self; a ConfigError names the first bad one.
        Everything that can be checked without touching data, devices or files is checked here."""
        _check_field_types(self)
        if not isinstance(self.eval, EvalConfig):
            raise ConfigError(f"eval must be an EvalConfig, got {type(self.eval).__name__}")
        for value, valid, kind in ((self.dataset, DATASETS, "dataset"), (self.method, METHODS, "method"),
                                   (self.lr_schedule, LR_SCHEDULES, "lr schedule"),
                                   (self.lambda_norm, LAMBDA_NORMS, "lambda normalisation"),
                                   (self.lambda_sync, LAMBDA_SYNCS, "lambda sync mode"),
                                   (self.sensitivity, SENSITIVITIES, "sensitivity mode"),
                                   (self.faal_base, FAAL_BASES, "FAAL base loss"), (self.amp, AMP_MODES, "amp mode"),
                                   (self.kernels, KERNEL_BACKENDS, "kernel backend"), (self.norm, ("linf", "l2"), "norm"),
                                   (self.compile_mode, COMPILE_MODES, "compile mode"), (self.loader, LOADERS, "loader")):
            _check_choice(value, valid, kind)
        _check_device(self.device)
        for name in ("data_dir", "beton_dir", "init_checkpoint", "out_dir"):
            _check_path(getattr(self, name), name)
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
        for name in ("entropy_eps", "lr_gamma"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ConfigError(f"{name} must be a finite number > 0, got {v}")
        for m in self.lr_milestones:
            if not (m >= 0 and math.isfinite(m)):
                raise ConfigError(f"lr_milestones must be finite epochs >= 0, got {m}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError(f"ema_decay must lie in (0, 1), got {self.ema_decay}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must lie in [0, 1), got {self.dropout}")
        check_positive_int(self.max_bad_steps, "max_bad_steps")
        check_positive_int(self.log_every, "log_every")
        _check_nonneg_int(self.val_samples, "val_samples")
        _check_nonneg_int(self.ckpt_every_steps, "ckpt_every_steps")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed must be an integer in [0, 2**63), got {self.seed}")
        self.lr_milestones = tuple(float(m) for m in self.lr_milestones)
        self.eval = dataclasses.replace(self.eval, dataset=self.dataset)
        self.eval.resolved()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Build from a dict (a manifest's "config", recipe overrides); unknown keys are a ConfigError
        with suggestions. Values are not validated here: call ``validate()``."""
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a mapping of field names to values, got {type(d).__name__}")
        d = dict(d)
        _check_keys(d, cls, "config key")
        ev = d.pop("eval", None)
        cfg = cls(**d)
        if isinstance(ev, dict):
            _check_keys(ev, EvalConfig, "eval config key")
            cfg.eval = EvalConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ev.items()})
        elif isinstance(ev, EvalConfig):
            cfg.eval = ev
        elif ev is not None:
            raise ConfigError(f"eval must be a mapping of evaluation options, got {ev!r}")
        if isinstance(cfg.lr_milestones, list):
            cfg.lr_milestones = tuple(cfg.lr_milestones)
        return cfg

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _check_keys(d: dict, cls: Any, kind: str) -> None:
    known = [f.name for f in dataclasses.fields(cls)]
    for key in d:
        if not isinstance(key, str) or key not in known:
            raise unknown_name(kind, str(key), known)


def _check_device(name: str) -> None:
    if name == "auto":
        return
    import torch  # late: keeps config import-light
    try:
        torch.device(name)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ConfigError(f"invalid device {name!r}; use auto, cpu, cuda or cuda:N.") from e
