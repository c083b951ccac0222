"""Robustness evaluation with gradient-masking sanity checks.

Definitions (all fractions of the evaluated test points):
  NA  natural accuracy: argmax f(x) = y.
  RA  robust accuracy under an attack: argmax f(x_adv) = y (as in the TRADES/D-TRADES evaluation
      code). AutoAttack only attacks clean-correct points, so its RA also requires NA's correctness.
  RD  robustness drop: NA - RA, with NA taken over the same points as RA.
  ASR attack success rate, the paper's definition: 1 - RA.
  conditional ASR: the share of clean-correct points that the attack flips to a wrong class.

Every evaluation runs and records these checks, each "passed" or "FAILED" with its numbers:
  ordering   AutoAttack RA <= PGD RA <= FGSM RA <= NA, within two binomial standard errors;
  eps = 0    PGD RA at eps 0 equals NA exactly;
  monotone   PGD RA does not rise as eps grows (within the error bar);
  large eps  PGD RA at a radius covering the whole [0,1] box is about 0 (<= 5%);
  gradients  input gradients are finite and mostly non-zero;
  PGD vs AA  PGD RA exceeds AutoAttack RA on the same points by at most 5 points (or two standard
             errors): a larger gap means PGD is too weak for this model, and its RA overstates robustness;
  diversity  no class takes more than half of the clean predictions: a collapsed model's robust
             accuracy is only the share of its favourite class.
Failures point at gradient masking or a broken attack; they never stop the evaluation.

Randomness is per batch: each batch's attacks start from a seed derived from (cfg.seed, batch
index), so a batch's numbers do not depend on which batches ran before it. That is what lets a
distributed evaluation (launched by torchrun, or ``distributed=True``) shard the batches round-robin
across ranks and all-reduce the per-point flags, and still give exactly the single-process result
(on the CPU; on GPUs up to the convolution algorithms each device picks).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import distributed as dist
from .attacks import FGSM, PGD, AutoAttack, eval_mode, weak_attack_warning
from .config import EvalConfig
from .report import csv_text, markdown_table, plot_lines, write_json, atomic_write_text

ATTACK_LABELS = {"fgsm": "FGSM", "pgd": "PGD-{steps}", "autoattack": "AutoAttack"}
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
    sweep: list[dict[str, float]] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def rd(self) -> dict[str, float]:
        return {a: self.na_on_attacked[a] - ra for a, ra in self.ra.items()}

    @property
    def asr(self) -> dict[str, float]:
        return {a: 1.0 - ra for a, ra in self.ra.items()}

    @property
    def all_passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def label(self, attack: str) -> str:
        if attack == "autoattack" and self.config.get("aa_version", "standard") != "standard":
            return f"AutoAttack ({self.config['aa_version']}: {', '.join(self.config.get('aa_attacks') or ())})"
        return ATTACK_LABELS[attack].format(steps=self.config["pgd_steps"])

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(rd=self.rd, asr=self.asr, all_checks_passed=self.all_passed)
        return d


def _stderr(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 1.0 / max(n, 1)) / max(n, 1))


def as_float_images(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 NHWC (the loaders' array format) or float NCHW in [0, 1] -> float NCHW in [0, 1]."""
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
    for p in model.parameters():
        if p.dim() == 4:
            return torch.channels_last if p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() \
                else torch.contiguous_format
    return torch.contiguous_format


def _batches(n: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


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


def _my_batches(slices: list[slice], rank: int, world: int) -> list[tuple[int, slice]]:
    """This rank's share of the batches: whole batches, round-robin, with their global indices."""
    return [(i, sl) for i, sl in enumerate(slices) if i % world == rank]


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
             distributed: bool | None = None) -> EvalResult:
    """Evaluate ``model`` on ``images``/``labels`` (the first ``cfg.num_samples``), in fp32, in eval mode.

    ``distributed`` (default: whether a process group with several ranks is initialised): every rank
    calls this with the same model and data, attacks its round-robin share of the batches, and all
    ranks return the same result, equal to the single-process one."""
    cfg = cfg.resolved()
    device = torch.device(device)
    if distributed is None:
        distributed = dist.world_size() > 1
    rank, world = (dist.rank(), dist.world_size()) if distributed else (0, 1)
    progress = progress and rank == 0
    torch.manual_seed(cfg.seed)
    n = len(labels) if cfg.num_samples is None else min(cfg.num_samples, len(labels))
    x_all = as_float_images(images[:n])
    y_all = torch.as_tensor(np.asarray(labels[:n]) if not torch.is_tensor(labels) else labels[:n]).long()
    notes: list[str] = []
    pgd_note = weak_attack_warning(cfg.eps, cfg.pgd_step_size, cfg.pgd_steps, f"PGD-{cfg.pgd_steps}")
    if pgd_note and "pgd" in cfg.attacks:
        notes.append(pgd_note)
        if rank == 0:
            warnings.warn(pgd_note, stacklevel=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the weak-attack note is recorded once above
        attacks = {"fgsm": FGSM(eps=cfg.eps) if cfg.norm == "linf" else None,
                   "pgd": PGD(eps=cfg.eps, step_size=cfg.pgd_step_size, steps=cfg.pgd_steps, norm=cfg.norm,
                              random_start=cfg.pgd_random_start, objective="ce")}
    if cfg.norm != "linf" and "fgsm" in cfg.attacks:
        notes.append("FGSM is an L-inf attack; skipped for an L2 evaluation.")
    batch_attacks = [a for a in ("fgsm", "pgd") if a in cfg.attacks and attacks.get(a) is not None]

    flags = {"clean": torch.zeros(n, dtype=torch.bool)}
    preds = torch.zeros(n, dtype=torch.int64)
    flags.update({a: torch.zeros(n, dtype=torch.bool) for a in batch_attacks})
    model = model.to(device)
    fmt = model_memory_format(model)
    mine = _my_batches(_batches(n, cfg.batch_size), rank, world)
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

    n_aa = min(cfg.aa_samples, n) if "autoattack" in cfg.attacks else 0
    if n_aa:
        aa = AutoAttack(eps=cfg.eps, norm=cfg.norm, version=cfg.aa_version, batch_size=cfg.batch_size,
                        seed=cfg.seed, device=device, attacks=cfg.aa_attacks or None)
        aa_flags = torch.zeros(n_aa, dtype=torch.bool)
        mine = _my_batches(_batches(n_aa, cfg.batch_size), rank, world)
        for i, sl in tqdm(mine, desc="eval AutoAttack", disable=not progress, leave=False):
            x, y = x_all[sl].to(device), y_all[sl].to(device)   # AutoAttack re-seeds itself (cfg.seed) per call
            aa_flags[sl] = (predict(model, aa(model, x, y)) == y).cpu() & clean[sl]
        correct["autoattack"] = _gather_flags({"aa": aa_flags}, world)["aa"]

    ra, n_att, na_att, cond = {}, {}, {}, {}
    for a, flags_a in correct.items():
        m = len(flags_a)
        base = clean[:m]
        ra[a] = float(flags_a.float().mean())
        n_att[a] = m
        na_att[a] = float(base.float().mean())
        cond[a] = float((base & ~flags_a).sum()) / max(int(base.sum()), 1)
    result = EvalResult(config=dataclasses.asdict(cfg), n=n, na=float(clean.float().mean()), ra=ra,
                        n_attacked=n_att, na_on_attacked=na_att, conditional_asr=cond, warnings=notes)
    result.checks += ordering_checks(result, clean, correct)
    if "autoattack" in correct and "pgd" in correct:
        result.checks.append(attack_gap_check(result, correct))
    result.checks.append(diversity_check(preds))
    if cfg.sweep_samples and cfg.eps > 0:
        m = min(cfg.sweep_samples, n)
        result.sweep = eps_sweep(model, x_all[:m], y_all[:m], cfg, device, progress, rank=rank, world=world)
        result.checks += sweep_checks(result.sweep, float(clean[:m].float().mean()), m)
    result.checks.append(input_gradient_check(model, x_all[:cfg.batch_size].to(device, memory_format=fmt),
                                              y_all[:cfg.batch_size].to(device)))
    return result


def ordering_checks(result: EvalResult, clean: torch.Tensor, correct: dict[str, torch.Tensor]) -> list[Check]:
    """AutoAttack <= PGD <= FGSM <= NA, each pair compared on the same points."""
    order = [a for a in ("autoattack", "pgd", "fgsm") if a in correct] + ["natural"]
    flags = dict(correct, natural=clean)
    checks = []
    for stronger, weaker in zip(order, order[1:]):
        m = min(len(flags[stronger]), len(flags[weaker]))
        p_s = float(flags[stronger][:m].float().mean())
        p_w = float(flags[weaker][:m].float().mean())
        tol = 2 * _stderr(p_w, m)
        name_s = result.label(stronger) if stronger != "natural" else "NA"
        name_w = result.label(weaker) if weaker != "natural" else "NA"
        checks.append(Check(f"ordering {name_s} <= {name_w}", p_s <= p_w + tol,
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
    mine = _my_batches(_batches(len(y), cfg.batch_size), rank, world)
    for k, eps in enumerate(tqdm(radii, desc="eval eps-sweep", disable=not progress, leave=False)):
        step = cfg.pgd_step_size * eps / cfg.eps if eps < box else 2.5 * box / cfg.pgd_steps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pgd = PGD(eps=eps, step_size=max(step, 1e-12), steps=cfg.pgd_steps, norm=cfg.norm,
                      random_start=cfg.pgd_random_start, objective="ce")
        for i, sl in mine:
            _seed_batch(cfg.seed, "sweep", k, i)
            xb, yb = x[sl].to(device, memory_format=fmt), y[sl].to(device)
            hits[k] += int((predict(model, pgd(model, xb, yb)) == yb).sum())
    if world > 1:
        hits = dist.all_reduce(hits, "sum")
    return [{"eps": eps, "ra": int(h) / len(y), "n": len(y)} for eps, h in zip(radii, hits)]


def sweep_checks(sweep: list[dict[str, float]], na: float, m: int) -> list[Check]:
    zero = [p for p in sweep if p["eps"] == 0]
    checks = []
    if zero:
        checks.append(Check("eps = 0", abs(zero[0]["ra"] - na) < 0.5 / m,
                            f"PGD RA {100 * zero[0]['ra']:.2f}% vs NA {100 * na:.2f}% on {m} points (must be equal)"))
    rises = [(a, b) for a, b in zip(sweep, sweep[1:]) if b["ra"] > a["ra"] + 2 * _stderr(a["ra"], m)]
    curve = ", ".join(f"{p['eps']:.4g}: {100 * p['ra']:.1f}%" for p in sweep)
    checks.append(Check("monotone in eps", not rises, f"RA by eps: {curve}"))
    last = sweep[-1]
    checks.append(Check("large eps", last["ra"] <= LARGE_EPS_MAX_RA,
                        f"PGD RA {100 * last['ra']:.2f}% at eps {last['eps']:.4g} (the whole box; "
                        f"<= {100 * LARGE_EPS_MAX_RA:.0f}% expected)"))
    return checks


# ----------------------------------------------------------------------------------------------
# Tables and files

def table_rows(results: dict[str, EvalResult]) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """The paper's layout, one row per model: accuracy, robustness drop and attack success rate (%)."""
    attacks = [a for a in ("fgsm", "pgd", "autoattack") if any(a in r.ra for r in results.values())]
    any_r = next(iter(results.values()))
    labels = [any_r.label(a) for a in attacks]
    pct = lambda v: None if v is None else 100.0 * v  # noqa: E731
    acc = [[name, pct(r.na)] + [pct(r.ra.get(a)) for a in attacks] for name, r in results.items()]
    rd = [[name] + [pct(r.rd.get(a)) for a in attacks] for name, r in results.items()]
    asr = [[name] + [pct(r.asr.get(a)) for a in attacks] + [pct(r.conditional_asr.get(a)) for a in attacks]
           for name, r in results.items()]
    return {"accuracy": (["Model", "Natural"] + labels, acc),
            "robustness_drop": (["Model"] + labels, rd),
            "attack_success_rate": (["Model"] + labels + [f"{lab} (cond.)" for lab in labels], asr)}


def results_markdown(results: dict[str, EvalResult]) -> str:
    tables = table_rows(results)
    r0 = next(iter(results.values()))
    cfg = r0.config
    header = (f"Threat model: {cfg['norm']} eps = {cfg['eps']:.4g}; PGD-{cfg['pgd_steps']} step {cfg['pgd_step_size']:.4g} "
              f"({cfg['pgd_random_start']} start); {r0.n} test points (AutoAttack {cfg['aa_version']} on the first "
              f"{r0.n_attacked.get('autoattack', 0)}). All numbers in %.")
    parts = [header, "", "**Accuracy (NA and RA)**", "", markdown_table(*tables["accuracy"]), "",
             "**Robustness drop RD = NA - RA**", "", markdown_table(*tables["robustness_drop"]), "",
             "**Attack success rate: ASR = 1 - RA; conditional = share of clean-correct points flipped**", "",
             markdown_table(*tables["attack_success_rate"]), "", "**Sanity checks**", ""]
    for name, r in results.items():
        parts += [f"- {name}: {c.line()}" for c in r.checks]
        parts += [f"- {name}: warning: {w}" for w in r.warnings]
    return "\n".join(parts) + "\n"


def save_results(results: dict[str, EvalResult], out_dir: str | Path, manifest: dict | None = None) -> dict[str, Path]:
    out = Path(out_dir)
    tables = table_rows(results)
    paths = {"md": atomic_write_text(out / "results.md", results_markdown(results)),
             "json": write_json(out / "results.json", {k: r.to_dict() for k, r in results.items()})}
    csv_parts = []
    for name, (headers, rows) in tables.items():
        csv_parts.append(csv_text(["table"] + headers, [[name] + row for row in rows]))
    paths["csv"] = atomic_write_text(out / "results.csv", "".join(csv_parts))
    sweeps = {name: ([p["eps"] for p in r.sweep], [100 * p["ra"] for p in r.sweep]) for name, r in results.items() if r.sweep}
    if sweeps:
        paths["sweep_png"] = plot_lines(out / "eps_sweep.png", sweeps, xlabel="eps", ylabel="PGD robust accuracy (%)",
                                        title="Robust accuracy against radius")
    if manifest is not None:
        paths["manifest"] = write_json(out / "eval_manifest.json", manifest)
    return paths
