"""Run configuration: a validated dataclass per job, serialisable to JSON for manifests.

Every field is an :func:`~fastrobust.options.option`: its help text, default, valid names and range
are declared once, and the CLI's flags, their ``--help`` and the checks all come from there. The
method and its options are a :class:`~fastrobust.methods.Method` (``TrainConfig.method``); everything
else here is a run setting: data, optimiser, schedule, training attack, device, I/O, evaluation.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

import torch

import kernels
import loaders

from .attacks import AA_ATTACKS, AA_VERSIONS, ATTACKS, NORMS, OBJECTIVES, PGD, RANDOM_STARTS
from .errors import ConfigError, check_radius, radius_bound, unknown_name
from .methods import TRADES, Method, current_option_names, method_from_dict
from .models import INPUT_NORMALIZATIONS, list_models
from .options import check_fields, option

LR_SCHEDULES = ("piecewise", "cosine", "constant")
AMP_MODES = ("auto", "bf16", "fp16", "off")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SELECTION_METRICS = ("pgd_ra", "worst_class_pgd_ra")
MAX_SEED = 2**63
# The training attack's fields by their flat names: recipe overrides (the CLI's --eps, --norm, --attack-steps,
# --attack-step-size) and the configs run folders recorded before TrainConfig.attack held them.
FLAT_ATTACK_KEYS = {"eps": "eps", "norm": "norm", "attack_steps": "steps", "attack_step_size": "step_size"}


def default_attack(**changes: Any) -> PGD:
    """TrainConfig's training attack, the D-TRADES paper's CIFAR-10 one (eps 0.031, PGD-10 x 0.007), with
    ``changes`` (e.g. ``steps=1`` for a quick step)."""
    return PGD(**{"eps": 0.031, "step_size": 0.007, "steps": 10, **changes})


@dataclass
class EvalConfig:
    """Robustness evaluation. ``eps=None`` takes the training radius (a run's, or a checkpoint's)."""
    dataset: str = option("cifar10", "test set", choices=loaders.DATASETS)
    eps: float | None = option(None, "radius of every attack (none: the training radius; RobustBench's "
                               "CIFAR-10 standard is 8/255 = 0.03137, the D-TRADES paper's 0.031)", low=0)
    norm: str = option("linf", "threat model", choices=NORMS)
    attacks: tuple[str, ...] = option(tuple(ATTACKS), "attacks to run", choices=ATTACKS, kind="attack")
    pgd_steps: int = option(20, "PGD steps", low=1)
    pgd_step_size: float | None = option(None, "PGD step size (none: 2.5 eps / steps, which covers the ball)",
                                         low=0, low_open=True)
    pgd_random_start: str = option("uniform", "PGD random start", choices=RANDOM_STARTS, kind="random start")
    pgd_objective: str = option("ce", "what PGD ascends: ce (cross-entropy), cw (the CW margin) or kl",
                                choices=OBJECTIVES, kind="attack objective")
    num_samples: int | None = option(None, "first n test points (none: the whole test set)", low=1)
    aa_samples: int = option(1000, "AutoAttack on the first n test points", low=0)
    aa_version: str = option("standard", "AutoAttack version (custom: the attacks in aa_attacks)",
                             choices=AA_VERSIONS, kind="AutoAttack version")
    aa_attacks: tuple[str, ...] = option((), "AutoAttack's attacks for aa_version custom, e.g. apgd-ce,apgd-t",
                                         choices=AA_ATTACKS, kind="AutoAttack attack")
    batch_size: int = option(256, "evaluation batch size", low=1)
    sweep_samples: int = option(200, "eps-sweep sanity checks on the first n points", low=0)
    sweep_multipliers: tuple[float, ...] = option((0.0, 0.25, 0.5, 1.0, 2.0), "radii of the eps sweep, in eps",
                                                  low=0)
    seed: int = option(0, "seed of the attacks' random starts", low=0, high=MAX_SEED, high_open=True)

    def resolved(self, train_eps: float | None = None) -> "EvalConfig":
        """A copy with the radius and PGD step filled in, checked."""
        out = dataclasses.replace(self)
        out.validate()
        if out.eps is None:
            if train_eps is None:
                raise ConfigError("the evaluation radius is unknown: pass --eps (e.g. 0.3 for MNIST, 8/255 for "
                                  "CIFAR-10); a fastrobust checkpoint records its training radius.")
            out.eps = float(train_eps)
        # the radius against the images' range, now that the dataset (the image size, for L2) is settled
        check_radius(out.eps, out.norm, out.dataset, "eval eps" if self.eps is not None else
                     "eval eps (the training radius, the evaluation's default)")
        if out.pgd_step_size is None:
            out.pgd_step_size = 2.5 * out.eps / out.pgd_steps if out.eps > 0 else 1e-3
        return out

    def validate(self) -> "EvalConfig":
        check_fields(self, "eval ")
        if self.eps is not None:   # L-inf against the input range here; L2 once the dataset is known (resolved)
            check_radius(self.eps, self.norm, None, "eval eps")
        if not self.attacks:
            raise ConfigError(f"eval attacks must name at least one of {', '.join(ATTACKS)}.")
        if self.aa_version == "custom" and not self.aa_attacks:
            raise ConfigError("aa_version 'custom' needs aa_attacks, e.g. apgd-ce,apgd-t")
        return self


@dataclass
class TrainConfig:
    """Everything a training run needs. The run settings default to the D-TRADES paper's CIFAR-10
    protocol; a method's options default to its authors' values (the recipes hold every protocol)."""
    dataset: str = option("cifar10", "dataset", choices=loaders.DATASETS)
    model: str = option("resnet18", "architecture", choices=list_models)
    method: Method = option(help="training method and its options", factory=TRADES)
    # data
    data_dir: str | None = option(None, "dataset root (none: $FASTROBUST_DATA, else ./data)")
    train_limit: int | None = option(None, "train on the first n training images only (smoke runs)", low=1)
    val_samples: int = option(1000, "the last n training images, held out: per-epoch validation and the choice "
                              "of best.pt (the test set never selects a model)", low=0)
    loader: str = option("auto", "data loader backend", choices=loaders.BACKENDS, kind="loader")
    beton_dir: str | None = option(None, "where FFCV .beton files are written and read (ffcv loader)")
    # optimisation: SGD with momentum
    epochs: int = option(100, "epochs", low=1)
    batch_size: int = option(128, "global batch size (split across processes under torchrun)", low=1)
    lr: float = option(0.1, "learning rate", low=0, low_open=True)
    momentum: float = option(0.9, "SGD momentum", low=0)
    weight_decay: float = option(2e-4, "SGD weight decay", low=0)
    lr_schedule: str = option("piecewise", "learning-rate schedule", choices=LR_SCHEDULES, kind="lr schedule")
    lr_milestones: tuple[float, ...] = option((90.0, 100.0), "piecewise: epochs (counted from 1, as the official "
                                              "TRADES/MART code counts them) from which lr is multiplied by "
                                              "lr_gamma once more", low=0)
    lr_gamma: float = option(0.1, "piecewise: the factor at each milestone", low=0, low_open=True)
    attack: PGD = option(help="the training attack (objective and random start: the method's unless set)",
                         factory=default_attack)
    select_by: str = option("pgd_ra", "validation metric that picks best.pt (FAAL's official code: "
                            "worst_class_pgd_ra)", choices=SELECTION_METRICS, kind="selection metric")
    # engineering
    kernels: str = option("auto", "loss-head kernels: auto (Triton on CUDA, checked against the reference on "
                          "first use), triton, reference", choices=kernels.BACKENDS, kind="kernel backend")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    amp: str = option("auto", "autocast: auto (bf16 on a GPU, off on the CPU), bf16, fp16 or off",
                      choices=AMP_MODES, kind="amp mode")
    channels_last: bool = option(True, "model and batches in NHWC (faster convolutions on GPU and CPU)")
    input_normalization: str = option("dataset", "the model's first layer: none (raw [0, 1] inputs, as the official "
                                      "TRADES, MART and FAAL code and the D-TRADES report's code train), dataset (the "
                                      "training dataset's mean/std) or a named dataset's mean/std",
                                      choices=INPUT_NORMALIZATIONS, kind="input normalisation")
    dropout: float | None = option(None, "override the model's dropout rate (SmallCNN: 0.5); 0 turns it off",
                                   low=0, high=1, high_open=True)
    sync_bn: bool = option(False, "under DDP: SyncBatchNorm, statistics over the global batch (CUDA only)")
    compile: bool | None = option(None, "torch.compile the model (none: on for CUDA, falling back to eager with "
                                  "a warning if it fails; true: required)")
    compile_mode: str = option("default", "torch.compile mode", choices=COMPILE_MODES, kind="compile mode")
    activation_checkpointing: bool = option(False, "recompute residual blocks in the backward (less memory)")
    ema_decay: float | None = option(None, "keep an exponential moving average of the weights", low=0, high=1,
                                     low_open=True, high_open=True)
    init_checkpoint: str | None = option(None, "start from these weights (fine-tuning, e.g. FAAL's protocol)")
    seed: int = option(0, "seed of initialisation, data order and attack starts", low=0, high=MAX_SEED,
                       high_open=True)
    out_dir: str = option("runs/default", "run folder")
    ckpt_every_steps: int = option(0, "also checkpoint every n steps (0: at epoch ends only)", low=0)
    resume: bool = option(False, "continue the run in out_dir from its newest checkpoint (only with the settings it "
                          "was trained with; see README, Run folders)")
    overwrite: bool = option(False, "train a new run in an out_dir that holds one: the old run's files are deleted "
                             "first")
    max_bad_steps: int = option(5, "consecutive non-finite steps before training stops", low=1)
    log_every: int = option(10, "log step statistics every n steps", low=1)
    progress: bool = option(True, "progress bars")
    tensorboard: bool | None = option(None, "write TensorBoard scalars into the run folder as it trains (none: when "
                                      "the tensorboard package is installed)")
    final_eval: bool = option(True, "evaluate on the test set after training")
    eval: EvalConfig = option(help="final evaluation", factory=EvalConfig)

    def validate(self) -> "TrainConfig":
        """Check every field (type, range, names) and return self; a ConfigError names the first bad one.
        Everything that can be checked without touching data, devices or files is checked here."""
        if isinstance(self.method, (str, dict)):
            self.method = method_from_dict(self.method)
        if not isinstance(self.method, Method):
            raise ConfigError(f"method must be a method name or a Method, got {self.method!r}")
        if not isinstance(self.eval, EvalConfig):
            raise ConfigError(f"eval must be an EvalConfig, got {type(self.eval).__name__}")
        if not isinstance(self.attack, PGD):
            raise ConfigError(f"attack must be a PGD (the training attack), got {type(self.attack).__name__}")
        check_fields(self)
        self.method.validate()
        _check_device(self.device)
        for name in ("data_dir", "beton_dir", "init_checkpoint", "out_dir"):
            if getattr(self, name) is not None and not getattr(self, name).strip():
                raise ConfigError(f"{name} must not be an empty string; pass a path.")
        self.lr_milestones = tuple(float(m) for m in self.lr_milestones)
        attack = self.attack
        check_radius(attack.eps, attack.norm, self.dataset, "eps")
        self.eval = dataclasses.replace(self.eval, dataset=self.dataset)
        try:
            self.eval.resolved(attack.eps)
        except ConfigError as e:
            if self.eval.eps is None and self.eval.norm != attack.norm:   # the default radius, in another norm
                bound = radius_bound(self.eval.norm, self.dataset)
                raise ConfigError(f"the evaluation takes the training radius {attack.eps:g} ({attack.norm}) by "
                                  f"default, but in its own norm, {self.eval.norm}, where radii above {bound:.4g} are "
                                  f"out of range on {self.dataset}: pass --eval-norm {attack.norm}, or an "
                                  f"--eval-eps.") from e
            raise
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["method"] = self.method.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Build from a dict (a manifest's "config", recipe overrides); unknown keys are a ConfigError
        with suggestions. Values are not validated here: call ``validate()``."""
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a mapping of field names to values, got {type(d).__name__}")
        d = upgraded(d)
        _check_keys(d, cls, "config key")
        ev, attack = d.pop("eval", None), d.pop("attack", None)
        cfg = cls(**d)
        if isinstance(attack, dict):
            _check_keys(attack, PGD, "attack config key")
            cfg.attack = PGD(**{**dataclasses.asdict(cfg.attack), **attack})
        elif attack is not None:
            cfg.attack = attack   # validate() says what is wrong with anything but a PGD
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


def upgraded(d: dict[str, Any]) -> dict[str, Any]:
    """A config mapping in today's layout: its flat training-attack keys (:data:`FLAT_ATTACK_KEYS`) moved
    under "attack", a recorded method's renamed options (``Method.renamed_options``) under their names now."""
    d = dict(d)
    if isinstance(d.get("method"), dict):
        d["method"] = current_option_names(d["method"])
    flat = {FLAT_ATTACK_KEYS[k]: d.pop(k) for k in FLAT_ATTACK_KEYS if k in d}
    if flat:
        attack = d.get("attack")
        d["attack"] = {**(dataclasses.asdict(attack) if isinstance(attack, PGD) else
                          attack if isinstance(attack, dict) else {}), **flat}
    return d


def training_radius(record: dict[str, Any]) -> Any:
    """The training attack's eps in a recorded config (a checkpoint's, a manifest's), or None."""
    attack = upgraded(record).get("attack")
    return attack.get("eps") if isinstance(attack, dict) else None


def lr_factor(cfg: TrainConfig, epoch: int, epoch_fraction: float = 0.0) -> float:
    """The learning-rate multiplier in epoch ``epoch`` (counted from 0), ``epoch_fraction`` into it.

    piecewise: constant within an epoch, one factor of lr_gamma per milestone m with epoch + 1 >= m, the
    official code's ``if epoch >= m`` over epochs counted from 1 (TRADES' 76 epochs with milestone 75
    train 74 epochs at the full rate, then 2); cosine: per step; constant: 1."""
    if cfg.lr_schedule == "constant":
        return 1.0
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min((epoch + epoch_fraction) / cfg.epochs, 1.0)))
    return cfg.lr_gamma ** sum(epoch + 1 >= m for m in cfg.lr_milestones)


def _check_keys(d: dict, cls: Any, kind: str) -> None:
    known = [f.name for f in dataclasses.fields(cls)]
    for key in d:
        if not isinstance(key, str) or key not in known:
            raise unknown_name(kind, str(key), known)


def _check_device(name: str) -> None:
    if name == "auto":
        return
    try:
        torch.device(name)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ConfigError(f"invalid device {name!r}; use auto, cpu, cuda or cuda:N.") from e
