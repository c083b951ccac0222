"""Robustness evaluation with gradient-masking sanity checks.

Definitions (all fractions of the evaluated test points):
  NA  natural accuracy: argmax f(x) = y.
  RA  robust accuracy under an attack: argmax f(x_adv) = y (as in the TRADES/D-TRADES evaluation
      code). AutoAttack only attacks clean-correct points, so its RA also requires NA's correctness.
  RD  robustness drop: NA - RA, with NA taken over the same points as RA.
  ASR attack success rate, the paper's definition: 1 - RA.
  conditional ASR: the share of clean-correct points that the attack flips to a wrong class.

Every evaluation runs the sanity checks README "Evaluation" lists (their tolerances are below), each
"passed" or "FAILED" with its numbers. Failures point at gradient masking or a broken attack; they
never stop the evaluation.

Each batch's attacks are seeded from (cfg.seed, batch index), so a batch's numbers do not depend on
which batches ran before it: a distributed evaluation (torchrun, or ``distributed=True``) shards the
batches round-robin, all-reduces the per-point flags, and gives the single-process result.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import distributed as dist
from .attacks import ATTACKS, PGD, eval_mode, weak_attack_warning
from .config import EvalConfig
from .points import Points, from_evaluation

LARGE_EPS_MAX_RA = 0.05
PGD_AA_MAX_GAP = 0.05
MAX_CLASS_SHARE = 0.5


@dataclass
class Check:
    name: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"[{'passed' if self.passed else 'FAILED'}] {self.name}: {self.detail}"


@dataclass
class EvalResult:
    config: dict
    n: int
    na: float
    ra: dict[str, float]
    n_attacked: dict[str, int]
    na_on_attacked: dict[str, float]
    conditional_asr: dict[str, float]
    per_class: dict[str, list[float]] = field(default_factory=dict)  # accuracy per class: "natural" and each attack
    sweep: list[dict[str, float]] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    points: Points | None = field(default=None, repr=False)   # per-point outcomes (points.npz), not in the JSON

    @property
    def rd(self) -> dict[str, float]:
        return {a: self.na_on_attacked[a] - ra for a, ra in self.ra.items()}

    @property
    def asr(self) -> dict[str, float]:
        return {a: 1.0 - ra for a, ra in self.ra.items()}

    def worst_class(self, attack: str) -> float:
        """The lowest per-class accuracy under ``attack`` (FAAL's fairness criterion)."""
        return min(v for v in self.per_class[attack] if v == v)

    @property
    def all_passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def label(self, attack: str) -> str:
        return attack_label(attack, self.config)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(dataclasses.replace(self, points=None))
        d.pop("points")
        d.update(rd=self.rd, asr=self.asr, all_checks_passed=self.all_passed)
        return d


def attack_label(name: str, config: dict) -> str:
    """How results name an attack (e.g. PGD-20)."""
    return ATTACKS[name].label(config)


def attack_settings(name: str, config: dict) -> dict:
    """The options that decide an attack's outcome."""
    return ATTACKS[name].settings(config)


def _stderr(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 1.0 / max(n, 1)) / max(n, 1))


def as_float_images(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 NHWC (the loaders' array format) or float NCHW in [0, 1] -> float NCHW in [0, 1]."""
    if isinstance(images, np.ndarray) and not images.flags.writeable:
        images = images.copy()  # the loaders' arrays are read-only: a tensor must not alias them
    t = torch.as_tensor(images)
    if t.dtype == torch.uint8:
        if t.dim() == 4 and t.shape[-1] in (1, 3) and t.shape[1] not in (1, 3):
            t = t.permute(0, 3, 1, 2)
        return t.float().div_(255.0).contiguous()
    return t.float().contiguous()


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with eval_mode(model):
        return model(x).argmax(1)


def model_memory_format(model: nn.Module) -> torch.memory_format:
    """channels_last when the model's convolutions are stored that way: inputs should match, since
    mixing formats makes every convolution convert (several times slower on the CPU)."""
    p = next((p for p in model.parameters() if p.dim() == 4), None)
    channels_last = p is not None and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def input_gradient_check(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Check:
    with eval_mode(model):
        x = x.clone().requires_grad_(True)
        loss = F.cross_entropy(model(x).float(), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, x)
    norms = torch.linalg.vector_norm(g.flatten(1), dim=1)
    finite = bool(torch.isfinite(g).all())
    zero_frac = float((norms == 0).float().mean())
    passed = finite and zero_frac <= 0.1
    return Check("gradients", passed, f"finite={finite}, zero-gradient samples {zero_frac:.1%} of {len(norms)} "
                                      f"(<= 10% allowed), median ||grad|| {float(norms.median()):.3g}")


def _my_batches(n: int, batch_size: int, rank: int, world: int) -> list[tuple[int, slice]]:
    """This rank's share of the batches of ``n`` points: whole batches, round-robin, with their global indices."""
    return [(i, slice(start, min(start + batch_size, n))) for i, start in enumerate(range(0, n, batch_size))
            if i % world == rank]


def _seed_batch(seed: int, phase: str, *index: int) -> None:
    torch.manual_seed(dist.derive_seed(seed, "eval", phase, *index))


def _gather_flags(flags: dict[str, torch.Tensor], world: int) -> dict[str, torch.Tensor]:
    """Every rank filled the entries of its own batches (zeros elsewhere): one SUM all-reduce."""
    if world == 1 or not flags:
        return flags
    names = list(flags)
    stacked = dist.all_reduce(torch.stack([flags[k].to(torch.int32) for k in names]), "sum")
    return {k: stacked[i] > 0 for i, k in enumerate(names)}


def evaluate(model: nn.Module, images: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray,
             cfg: EvalConfig, device: str | torch.device = "cpu", progress: bool = True,
             distributed: bool | None = None, warn_weak: bool = True) -> EvalResult:
    """Evaluate ``model`` on ``images``/``labels`` (the first ``cfg.num_samples``), in fp32, in eval mode.

    ``distributed`` (default: whether a process group with several ranks is initialised): every rank
    calls this with the same model and data, and all return the same result. A PGD too weak for its
    ball is recorded in the result's warnings and, with ``warn_weak``, raised as a warning (rank 0)."""
    cfg = cfg.resolved()   # the radius must be set: evaluation never guesses a threat model (idempotent)
    cfg_dict = dataclasses.asdict(cfg)
    device = torch.device(device)
    if distributed is None:
        distributed = dist.world_size() > 1
    rank, world = (dist.rank(), dist.world_size()) if distributed else (0, 1)
    progress = progress and rank == 0
    torch.manual_seed(cfg.seed)
    n = len(labels) if cfg.num_samples is None else min(cfg.num_samples, len(labels))
    x_all = as_float_images(images[:n])
    # np.array copies: the loaders' label arrays are read-only
    y_all = (labels[:n] if torch.is_tensor(labels) else torch.from_numpy(np.array(labels[:n]))).long()
    notes: list[str] = []
    pgd_note = weak_attack_warning(cfg.eps, cfg.pgd_step_size, cfg.pgd_steps, f"PGD-{cfg.pgd_steps}")
    if pgd_note and "pgd" in cfg.attacks:
        notes.append(pgd_note)
        if rank == 0 and warn_weak:
            warnings.warn(pgd_note, stacklevel=2)
    attacks = {a: ATTACKS[a].for_evaluation(cfg) for a in ATTACKS if a in cfg.attacks and ATTACKS[a].per_batch}
    for a in [a for a, attack in attacks.items() if attack is None]:
        notes.append(f"{attack_label(a, cfg_dict)} does not apply to the {cfg.norm} threat model; skipped.")
        del attacks[a]
    batch_attacks = list(attacks)

    flags = {a: torch.zeros(n, dtype=torch.bool) for a in ["clean", *batch_attacks]}
    preds = torch.zeros(n, dtype=torch.int64)
    model = model.to(device)
    fmt = model_memory_format(model)
    mine = _my_batches(n, cfg.batch_size, rank, world)
    for i, sl in tqdm(mine, desc="eval " + "+".join(["clean"] + batch_attacks), disable=not progress, leave=False):
        _seed_batch(cfg.seed, "batch", i)
        x, y = x_all[sl].to(device, memory_format=fmt), y_all[sl].to(device)
        preds[sl] = predict(model, x).cpu()
        flags["clean"][sl] = preds[sl] == y_all[sl]
        for a in batch_attacks:
            flags[a][sl] = (predict(model, attacks[a](model, x, y)) == y).cpu()
    flags = _gather_flags(flags, world)
    if world > 1:
        preds = dist.all_reduce(preds, "sum")  # each entry was filled by exactly one rank
    clean = flags.pop("clean")
    correct = flags

    # The attacks too costly for every point (AutoAttack) run on the first cfg.aa_samples, and count a
    # point as robust only when it is also clean-correct (AutoAttack does not attack the others).
    n_few = min(cfg.aa_samples, n)
    for a in [a for a in ATTACKS if a in cfg.attacks and not ATTACKS[a].per_batch and n_few]:
        attack = ATTACKS[a].for_evaluation(cfg, device)
        few = torch.zeros(n_few, dtype=torch.bool)
        mine = _my_batches(n_few, cfg.batch_size, rank, world)
        for i, sl in tqdm(mine, desc=f"eval {attack_label(a, cfg_dict)}", disable=not progress, leave=False):
            x, y = x_all[sl].to(device), y_all[sl].to(device)   # AutoAttack re-seeds itself (cfg.seed) per call
            few[sl] = (predict(model, attack(model, x, y)) == y).cpu() & clean[sl]
        correct[a] = _gather_flags({a: few}, world)[a]

    base = {a: clean[:len(f)] for a, f in correct.items()}   # the clean flags on each attack's points
    result = EvalResult(
        config=cfg_dict, n=n, na=float(clean.float().mean()),
        ra={a: float(f.float().mean()) for a, f in correct.items()}, n_attacked={a: len(f) for a, f in correct.items()},
        na_on_attacked={a: float(base[a].float().mean()) for a in correct},
        conditional_asr={a: float((base[a] & ~f).sum()) / max(int(base[a].sum()), 1) for a, f in correct.items()},
        per_class={a: _per_class(f, y_all[:len(f)]) for a, f in dict(correct, natural=clean).items()}, warnings=notes)
    result.points = from_evaluation(clean, correct, y_all, {
        "dataset": cfg.dataset, "split": "test", "eps": cfg.eps, "norm": cfg.norm,
        "attacks": {a: {"label": attack_label(a, cfg_dict), "n": len(f), "settings": attack_settings(a, cfg_dict)}
                    for a, f in correct.items()}})
    result.checks += ordering_checks(result, clean, correct)
    if "autoattack" in correct and "pgd" in correct:
        result.checks.append(attack_gap_check(result, correct))
    result.checks.append(diversity_check(preds))
    if cfg.sweep_samples and cfg.eps > 0:
        m = min(cfg.sweep_samples, n)
        result.sweep = eps_sweep(model, x_all[:m], y_all[:m], cfg, device, progress, rank=rank, world=world)
        # the evaluation's own PGD RA at its radius, on the sweep's points, joins the monotone check: a
        # headline above the sweep's RA at a smaller or the same radius is as much a sign of a broken attack
        headline = {"eps": cfg.eps, "ra": float(correct["pgd"][:m].float().mean()), "n": m,
                    "label": result.label("pgd")} if "pgd" in correct else None
        result.checks += sweep_checks(result.sweep, float(clean[:m].float().mean()), m, headline=headline)
    result.checks.append(input_gradient_check(model, x_all[:cfg.batch_size].to(device, memory_format=fmt),
                                              y_all[:cfg.batch_size].to(device)))
    return result


def _per_class(flags: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Accuracy per class label 0..max(y) (NaN for a class absent from these points)."""
    counts = torch.bincount(y, minlength=int(y.max()) + 1 if len(y) else 1).double()
    hits = torch.bincount(y, weights=flags.double(), minlength=len(counts))
    return [float(v) for v in torch.where(counts > 0, hits / counts.clamp_min(1), float("nan"))]


def ordering_checks(result: EvalResult, clean: torch.Tensor, correct: dict[str, torch.Tensor]) -> list[Check]:
    """AutoAttack <= PGD <= FGSM <= NA (the registry's order reversed), each pair on the same points."""
    order = [a for a in reversed(ATTACKS) if a in correct] + ["natural"]
    flags = dict(correct, natural=clean)
    def name(a: str) -> str:
        return "NA" if a == "natural" else result.label(a)

    checks = []
    for stronger, weaker in zip(order, order[1:]):
        m = min(len(flags[stronger]), len(flags[weaker]))
        p_s = float(flags[stronger][:m].float().mean())
        p_w = float(flags[weaker][:m].float().mean())
        tol = 2 * _stderr(p_w, m)
        checks.append(Check(f"ordering {name(stronger)} <= {name(weaker)}", p_s <= p_w + tol,
                            f"{100 * p_s:.2f}% vs {100 * p_w:.2f}% on {m} points (tolerance {100 * tol:.2f}%)"))
    return checks


def attack_gap_check(result: EvalResult, correct: dict[str, torch.Tensor]) -> Check:
    """AutoAttack is the reference: PGD RA far above it means PGD was too weak to trust."""
    m = len(correct["autoattack"])
    pgd = float(correct["pgd"][:m].float().mean())
    aa = float(correct["autoattack"].float().mean())
    tol = max(PGD_AA_MAX_GAP, 2 * _stderr(pgd, m))
    detail = (f"{result.label('pgd')} RA {100 * pgd:.2f}% vs {result.label('autoattack')} RA {100 * aa:.2f}% on the "
              f"same {m} points (gap <= {100 * tol:.2f} points allowed)")
    if pgd - aa > tol:
        detail += (f"; PGD overstates robustness by {100 * (pgd - aa):.1f} points: it is too weak for this model "
                   f"(more steps or a larger step) or gradients are masked. Report AutoAttack")
    return Check("PGD vs AutoAttack", pgd - aa <= tol, detail)


def diversity_check(preds: torch.Tensor) -> Check:
    counts = torch.bincount(preds)
    top = int(counts.argmax())
    share = float(counts[top]) / max(len(preds), 1)
    detail = f"class {top} takes {100 * share:.1f}% of {len(preds)} clean predictions (<= {100 * MAX_CLASS_SHARE:.0f}% allowed)"
    if share > MAX_CLASS_SHARE:
        detail += "; the model has collapsed towards one class, so its robust accuracy measures little"
    return Check("prediction diversity", share <= MAX_CLASS_SHARE, detail)


def eps_sweep(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: EvalConfig, device: torch.device,
              progress: bool, rank: int = 0, world: int = 1) -> list[dict[str, float]]:
    """PGD RA at multiples of eps (step size scaled with eps), plus a radius covering the whole box.
    With ``world`` > 1 each rank attacks its round-robin share of the batches (hits all-reduced)."""
    box = 1.0 if cfg.norm == "linf" else math.sqrt(x[0].numel())
    radii = sorted({min(cfg.eps * k, box) for k in cfg.sweep_multipliers} | {box})
    hits = torch.zeros(len(radii), dtype=torch.int64)
    fmt = model_memory_format(model)
    mine = _my_batches(len(y), cfg.batch_size, rank, world)
    for k, eps in enumerate(tqdm(radii, desc="eval eps-sweep", disable=not progress, leave=False)):
        step = cfg.pgd_step_size * eps / cfg.eps if eps < box else 2.5 * box / cfg.pgd_steps
        # the evaluation's PGD with its step scaled to each radius: as strong as that PGD, reported once
        pgd = PGD(eps=eps, step_size=max(step, 1e-12), steps=cfg.pgd_steps, norm=cfg.norm,
                  random_start=cfg.pgd_random_start, objective=cfg.pgd_objective)
        for i, sl in mine:
            _seed_batch(cfg.seed, "sweep", k, i)
            xb, yb = x[sl].to(device, memory_format=fmt), y[sl].to(device)
            hits[k] += int((predict(model, pgd.perturb(model, xb, yb).x_adv) == yb).sum())
    if world > 1:
        hits = dist.all_reduce(hits, "sum")
    return [{"eps": eps, "ra": int(h) / len(y), "n": len(y)} for eps, h in zip(radii, hits)]


def sweep_checks(sweep: list[dict[str, float]], na: float, m: int,
                 headline: dict[str, Any] | None = None) -> list[Check]:
    """eps = 0, monotone in eps (the sweep and, given, the evaluation's ``headline`` PGD point) and
    large eps. Monotone: no point's RA exceeds that of a point at the next smaller radius, or of the
    other point at its own radius (the headline beside the sweep's run at that radius), by more than two
    standard errors."""
    zero = [p for p in sweep if p["eps"] == 0]
    checks = []
    if zero:
        checks.append(Check("eps = 0", abs(zero[0]["ra"] - na) < 0.5 / m,
                            f"PGD RA {100 * zero[0]['ra']:.2f}% vs NA {100 * na:.2f}% on {m} points (must be equal)"))
    points = sorted(sweep + ([headline] if headline else []), key=lambda p: p["eps"])   # stable: headline after a tie
    radii = sorted({p["eps"] for p in points})
    pairs = [(a, b) for lo, hi in zip(radii, radii[1:]) for a in points if a["eps"] == lo for b in points
             if b["eps"] == hi]
    pairs += [(a, b) for a in points for b in points if a is not b and a["eps"] == b["eps"]]
    rises = [(a, b) for a, b in pairs if b["ra"] > a["ra"] + 2 * _stderr(a["ra"], m)]
    curve = ", ".join(f"{p['eps']:.4g}{' (' + p['label'] + ', the evaluation)' if p is headline else ''}: "
                      f"{100 * p['ra']:.1f}%" for p in points)
    detail = f"RA by eps: {curve}"
    if rises:
        detail += "; RA rises beyond two standard errors from " + ", ".join(
            f"{100 * a['ra']:.1f}% at eps {a['eps']:.4g} to {100 * b['ra']:.1f}% at eps {b['eps']:.4g}"
            for a, b in rises)
    checks.append(Check("monotone in eps", not rises, detail))
    last = sweep[-1]
    checks.append(Check("large eps", last["ra"] <= LARGE_EPS_MAX_RA,
                        f"PGD RA {100 * last['ra']:.2f}% at eps {last['eps']:.4g} (the whole box; "
                        f"<= {100 * LARGE_EPS_MAX_RA:.0f}% expected)"))
    return checks
