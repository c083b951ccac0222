"""Is a difference real? ``fastrobust compare``: paired tests of two evaluations, and comparisons over seeds.

Two evaluations of the same test points: for NA and each attack, the exact McNemar test on the points one
model gets right and the other wrong, and a paired bootstrap interval of the accuracy difference. Two
groups of runs, one run per training seed: the mean difference over seeds with a t-interval (paired by
seed when both groups hold the same seeds, else Welch's), beside each seed's paired per-point test.
Accuracies are in percent, differences (always A - B) in percentage points. The tests themselves, with
their distributions, are in :mod:`fastrobust.stats` (re-exported here).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import points as points_io
from .attacks import ATTACKS
from .errors import ConfigError, check_positive_int
from .points import Points
from .report import atomic_write_text, csv_text, markdown_table, write_json
from .stats import (McNemar, TInterval, binom_two_sided_p, check_level, mcnemar_exact, paired_bootstrap_ci,
                    t_interval_paired, t_interval_welch, t_quantile)

__all__ = ["McNemar", "TInterval", "binom_two_sided_p", "mcnemar_exact", "paired_bootstrap_ci", "t_interval_paired",
           "t_interval_welch", "t_quantile", "PairedRow", "PairComparison", "GroupRow", "GroupComparison",
           "compare_points", "compare_pair", "compare_groups", "run_seed", "shared_measures", "write_comparison"]

# ---------------------------------------------------------------------------------------- two evaluations
@dataclass
class PairedRow:
    """One measure (NA or an attack) of two evaluations of the same points."""
    measure: str      # "natural" or an attack's name
    label: str
    n: int
    acc_a: float
    acc_b: float
    diff: float       # acc_a - acc_b, points
    ci_low: float     # paired bootstrap interval of diff
    ci_high: float
    a_only: int       # points A gets right and B wrong
    b_only: int
    p: float          # exact McNemar


def _measure_order(names) -> list[str]:
    registry = list(ATTACKS)
    return sorted(names, key=lambda k: (registry.index(k) if k in registry else len(registry), k))


def shared_measures(runs: Sequence[Points], labels: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The measures every run holds (NA first, attacks in the registry's order) and, for every other
    attack, which runs lack it (it is reported as skipped, never dropped silently)."""
    held = [set(p.attacks) for p in runs]
    common = set.intersection(*held)
    skipped = {name: "not evaluated in " + ", ".join(lab for lab, h in zip(labels, held) if name not in h)
               for name in _measure_order(set.union(*held) - common)}
    return ["natural"] + _measure_order(common), skipped


def compare_points(a: Points, b: Points, measures: Sequence[str] | None = None, *, reps: int = 10_000,
                   seed: int = 0, level: float = 0.95) -> list[PairedRow]:
    """The paired tests of every measure both hold (or of ``measures``); stops, naming each difference, if
    the two were not evaluated on the same points under the same settings."""
    measures = list(measures or shared_measures([a, b], ["A", "B"])[0])
    points_io.check_comparable(a, b, measures)
    rows = []
    for name in measures:
        fa, fb = a.flags(name), b.flags(name)
        test, (low, high) = mcnemar_exact(fa, fb), paired_bootstrap_ci(fa, fb, reps, seed, level)
        rows.append(PairedRow(name, a.label_of(name), len(fa), 100 * fa.mean(), 100 * fb.mean(),
                              100 * (fa.mean() - fb.mean()), 100 * low, 100 * high, test.a_only, test.b_only, test.p))
    return rows


def _p(p: float | None) -> str | None:
    return None if p is None else f"{p:.3g}"


def _ci(low: float | None, high: float | None) -> str | None:
    return None if low is None else f"[{low:.2f}, {high:.2f}]"


def _paired_cells(r: PairedRow) -> list[Any]:
    return [_ci(r.ci_low, r.ci_high), r.a_only, r.b_only, _p(r.p)]


def _threat(p: Points) -> str:
    m = p.meta
    return f"{m.get('dataset')} {m.get('split')} points, {m.get('norm')} eps = {m.get('eps')}"


@dataclass
class PairComparison:
    names: tuple[str, str]
    paths: tuple[str, str]
    threat: str
    paired: list[PairedRow]
    skipped: dict[str, str]
    test: dict[str, Any]      # reps, seed, level of the bootstrap

    def rows(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.paired]

    def markdown(self) -> str:
        (na, nb), (pa, pb) = self.names, self.paths
        headers = ["Measure", "n", f"{na} (%)", f"{nb} (%)", "A − B", f"{100 * self.test['level']:g}% CI (bootstrap)",
                   "A only right", "B only right", "McNemar p"]
        body = [[r.label, r.n, r.acc_a, r.acc_b, r.diff, *_paired_cells(r)] for r in self.paired]
        intro = (f"**A** = {na} ({pa}); **B** = {nb} ({pb}). {self.threat}. Paired on the same points: A − B in "
                 f"points; the exact McNemar test on the points only one gets right; a paired bootstrap interval "
                 f"({self.test['reps']} replicates, seed {self.test['seed']}).")
        return "\n".join([intro, "", markdown_table(headers, body), *_notes(self.skipped, [])]) + "\n"

    def csv(self) -> str:
        rows = self.rows()
        return csv_text(list(rows[0]), [list(r.values()) for r in rows])

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "points", **asdict(self)}


def _notes(skipped: dict[str, str], notes: list[str]) -> list[str]:
    lines = [f"- skipped {name}: {why}" for name, why in skipped.items()] + [f"- {n}" for n in notes]
    return [""] + lines if lines else []


def _test_options(reps: int, seed: int, level: float) -> dict[str, Any]:
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise ConfigError(f"the bootstrap seed must be an integer >= 0, got {seed!r}.")
    return {"reps": check_positive_int(reps, "--reps"), "seed": int(seed), "level": check_level(level)}


def _labels(names: Sequence[str] | None) -> tuple[str, str]:
    if names is not None and len(names) != 2:
        raise ConfigError(f"names labels the two sides, A and B: give two, got {list(names)}.")
    return tuple(names or ("A", "B"))


def compare_pair(a: str | Path, b: str | Path, names: Sequence[str] | None = None, *, reps: int = 10_000,
                 seed: int = 0, level: float = 0.95) -> PairComparison:
    """Two evaluations (run or evaluation folders, or ``points.npz`` files) compared point by point."""
    test = _test_options(reps, seed, level)
    pa, pb = points_io.load(a), points_io.load(b)
    labels = _labels(names)
    measures, skipped = shared_measures([pa, pb], labels)
    rows = compare_points(pa, pb, measures, **test)
    return PairComparison(labels, (str(a), str(b)), _threat(pa), rows, skipped, test)


# ---------------------------------------------------------------------------------------- groups of seeds
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is not readable JSON ({e}); restore it or train the run again.") from e


def run_seed(path: str | Path) -> int | None:
    """The training seed of a run folder (its ``manifest.json`` config), of an evaluation inside a run's
    folder, or of an evaluation of a run's checkpoint; None when no training manifest records one. (An
    evaluation's own seed is its attacks', not the training seed.)"""
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    checkpoint = Path(_read_json(folder / "eval_manifest.json").get("checkpoint") or ".")
    candidates = [folder / "manifest.json", folder / "eval_manifest.json", folder.parent / "manifest.json"]
    if checkpoint.parent.name == "checkpoints":
        candidates.insert(2, checkpoint.parent.parent / "manifest.json")
    for manifest in candidates:
        config = _read_json(manifest).get("config") or {}
        if "method" in config and "seed" in config:   # a training config, not an evaluation's
            return int(config["seed"])
    return None


@dataclass
class Run:
    path: str
    seed: int | None
    points: Points = field(repr=False)

    @property
    def tag(self) -> str:
        return f"seed {self.seed}" if self.seed is not None else Path(self.path).name


@dataclass
class SeedRow:
    """One seed's runs of the two groups (or one run, when the other group lacks that seed)."""
    run: str
    acc_a: float | None
    acc_b: float | None
    paired: PairedRow | None   # the per-point test, when both runs of the seed share their points


@dataclass
class GroupRow:
    measure: str
    label: str
    acc_a: list[float]          # per run, in the order given
    acc_b: list[float]
    mean_a: float
    mean_b: float
    diff: float                 # mean_a - mean_b
    interval: TInterval | None  # over seeds: paired by seed, else Welch; None with one run in a group
    test: str
    seeds: list[SeedRow]


@dataclass
class GroupComparison:
    names: tuple[str, str]
    runs: tuple[list[Run], list[Run]]
    threat: str
    measures: list[GroupRow]
    skipped: dict[str, str]
    notes: list[str]
    test: dict[str, Any]

    def rows(self) -> list[dict[str, Any]]:
        """One row per measure: the means, A - B, its interval over seeds and the test's p."""
        iv = lambda r, k: None if r.interval is None else getattr(r.interval, k)  # noqa: E731
        return [{"measure": r.measure, "label": r.label, "runs_a": len(r.acc_a), "runs_b": len(r.acc_b),
                 "mean_a": r.mean_a, "mean_b": r.mean_b, "diff": r.diff, "ci_low": iv(r, "low"),
                 "ci_high": iv(r, "high"), "df": iv(r, "df"), "p": iv(r, "p"), "test": r.test} for r in self.measures]

    def seed_rows(self) -> list[dict[str, Any]]:
        """One row per measure and seed: both accuracies and that seed's paired per-point test."""
        out = []
        for r in self.measures:
            for s in r.seeds:
                pr = s.paired
                out.append({"measure": r.measure, "label": r.label, "run": s.run, "acc_a": s.acc_a, "acc_b": s.acc_b,
                            "diff": None if None in (s.acc_a, s.acc_b) else s.acc_a - s.acc_b,
                            **{k: None if pr is None else getattr(pr, k)
                               for k in ("n", "ci_low", "ci_high", "a_only", "b_only", "p")}})
        return out

    def markdown(self) -> str:
        (na, nb), level = self.names, f"{100 * self.test['level']:g}%"
        means = [[r["label"], r["mean_a"], r["mean_b"], r["diff"], _ci(r["ci_low"], r["ci_high"]), r["test"],
                  _p(r["p"])] for r in self.rows()]
        seeds = [[r["label"], r["run"], r["acc_a"], r["acc_b"], r["diff"], _ci(r["ci_low"], r["ci_high"]), r["a_only"],
                  r["b_only"], _p(r["p"])] for r in self.seed_rows()]
        lines = [f"**{g}** = {name}: {len(runs)} run(s), " + ", ".join(f"{r.tag} ({r.path})" for r in runs) + "."
                 for g, name, runs in zip("AB", self.names, self.runs)]
        lines += ["", f"{self.threat}. Accuracies in %, A − B in points.", "",
                  f"**Mean over seeds** ({level} t-interval)", "",
                  markdown_table(["Measure", f"{na} mean", f"{nb} mean", "A − B", f"{level} CI", "test", "p"], means),
                  "", f"**Per seed** (the seed's two runs on the same points: paired bootstrap {level} interval, "
                      f"{self.test['reps']} replicates, seed {self.test['seed']}; exact McNemar test)", "",
                  markdown_table(["Measure", "Run", na, nb, "A − B", f"{level} CI (bootstrap)", "A only right",
                                  "B only right", "McNemar p"], seeds)]
        return "\n".join(lines + _notes(self.skipped, self.notes)) + "\n"

    def csv(self) -> str:
        return "".join(csv_text(["table", *rows[0]], [[table, *r.values()] for r in rows])
                       for table, rows in (("mean", self.rows()), ("seed", self.seed_rows())))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "groups", "names": self.names, "threat": self.threat, "test": self.test,
                "runs": [[{"path": r.path, "seed": r.seed} for r in g] for g in self.runs],
                "mean": self.rows(), "per_seed": self.seed_rows(), "skipped": self.skipped, "notes": self.notes}


def _seed_pairing(runs_a: list[Run], runs_b: list[Run], names: Sequence[str]) -> tuple[bool, list[int], list[str]]:
    """Whether the interval pairs by seed, the seeds that have one run in each group, and why not paired."""
    seeds = [[r.seed for r in g] for g in (runs_a, runs_b)]
    once = [{s for s in sd if s is not None and sd.count(s) == 1} for sd in seeds]
    common = sorted(once[0] & once[1])
    paired = all(len(o) == len(sd) for o, sd in zip(once, seeds)) and once[0] == once[1] and len(common) > 1
    if paired or min(map(len, seeds)) < 2:
        return paired, common, []
    shown = "; ".join(f"{n}: " + ", ".join("?" if s is None else str(s) for s in sd) for n, sd in zip(names, seeds))
    return paired, common, [f"the groups do not hold the same distinct, known training seeds ({shown}): the interval "
                            f"over seeds is Welch's, unpaired"]


def compare_groups(dirs_a: Sequence[str | Path], dirs_b: Sequence[str | Path], names: Sequence[str] | None = None, *,
                   reps: int = 10_000, seed: int = 0, level: float = 0.95) -> GroupComparison:
    """Two groups of run folders (one per training seed; ``names`` labels the groups, default A and B)."""
    test = _test_options(reps, seed, level)
    if not dirs_a or not dirs_b:
        raise ConfigError("a group comparison needs at least one run folder in each group: --a DIR [DIR ...] "
                          "--b DIR [DIR ...].")
    resolved = [Path(d).resolve() for d in (*dirs_a, *dirs_b)]
    twice = sorted({str(d) for d in resolved if resolved.count(d) > 1})
    if twice:
        raise ConfigError(f"{', '.join(twice)} given more than once: name each run folder once, in one group.")
    names = _labels(names)
    runs_a, runs_b = ([Run(str(d), run_seed(d), points_io.load(d)) for d in dirs] for dirs in (dirs_a, dirs_b))
    runs = runs_a + runs_b
    measures, skipped = shared_measures([r.points for r in runs], [f"{names[0]} {r.tag}" for r in runs_a]
                                        + [f"{names[1]} {r.tag}" for r in runs_b])
    for r in runs[1:]:   # every run under one threat model; the number of points may differ between seeds
        problems = points_io.differences(runs[0].points, r.points, measures, same_points=False)
        if problems:
            raise ConfigError(f"{runs[0].path} and {r.path} were not evaluated under the same threat model and attack "
                              f"settings: {'; '.join(problems)}. Evaluate every run with the same settings.")
    paired, common, notes = _seed_pairing(runs_a, runs_b, names)
    by_seed = [{r.seed: r for r in g} for g in (runs_a, runs_b)]
    tests: dict[int, dict[str, PairedRow]] = {}
    for s in common:
        a, b = by_seed[0][s].points, by_seed[1][s].points
        problems = points_io.differences(a, b, measures)
        if problems:
            notes.append(f"seed {s}: no per-point test, the two runs were not evaluated on the same points "
                         f"({'; '.join(problems)})")
        tests[s] = {} if problems else {r.measure: r for r in compare_points(a, b, measures, **test)}
    if min(len(runs_a), len(runs_b)) == 1:
        notes.append("one run in a group (n = 1): no interval over seeds exists; the per-point test of each seed "
                     "is the only test")
    rows = []
    for name in measures:
        acc = lambda r: 100 * float(r.points.flags(name).mean())  # noqa: E731
        acc_a, acc_b = [acc(r) for r in runs_a], [acc(r) for r in runs_b]
        seeds = [SeedRow(f"seed {s}", acc(by_seed[0][s]), acc(by_seed[1][s]), tests[s].get(name)) for s in common]
        seeds += [SeedRow(f"{names[g]} {r.tag}", acc(r) if g == 0 else None, acc(r) if g == 1 else None, None)
                  for g, group in enumerate((runs_a, runs_b)) for r in group if r.seed not in common]
        if min(len(acc_a), len(acc_b)) < 2:
            interval, how = None, f"none (n = {min(len(acc_a), len(acc_b))})"
        elif paired:
            order_b = [acc(by_seed[1][r.seed]) for r in runs_a]
            interval, how = t_interval_paired(acc_a, order_b, test["level"]), f"paired t over {len(acc_a)} seeds"
        else:
            interval, how = t_interval_welch(acc_a, acc_b, test["level"]), "Welch t"
        rows.append(GroupRow(name, runs[0].points.label_of(name), acc_a, acc_b, float(np.mean(acc_a)),
                             float(np.mean(acc_b)), float(np.mean(acc_a) - np.mean(acc_b)), interval, how, seeds))
    return GroupComparison(names, (runs_a, runs_b), _threat(runs[0].points), rows, skipped, notes, test)


def write_comparison(result: PairComparison | GroupComparison, out_dir: str | Path) -> dict[str, Path]:
    """``compare.{md,csv,json}`` in ``out_dir``, each written atomically."""
    out = Path(out_dir)
    try:
        return {"md": atomic_write_text(out / "compare.md", result.markdown()),
                "csv": atomic_write_text(out / "compare.csv", result.csv()),
                "json": write_json(out / "compare.json", result.to_dict())}
    except OSError as e:
        raise ConfigError(f"cannot write the comparison into {out} ({e.strerror or e}); choose another --out.") from e
