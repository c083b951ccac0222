"""The report's comparative claims, tested on a profile's runs with :mod:`fastrobust.compare`.

Each claim is a direction ("D-TRADES has a higher NA than TRADES"), tested on the same test points and over
the training seeds a profile runs:
  * several seeds in both groups: the t-interval of the mean difference over seeds (paired by seed when
    both groups hold the same seeds), with its p;
  * one seed in a group: the paired bootstrap interval on the points with the exact McNemar p (an RD
    difference has no McNemar form: its interval is the bootstrap of the per-point RD difference).
A claim is *supported* when the 95% interval excludes 0 on the claimed side (and the test's p, where it has
one, is below 0.05), *contradicted* when both say so on the other side, and *not significant at this scale*
otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from fastrobust import methods
from fastrobust.compare import compare_groups, t_interval_paired, t_interval_welch
from fastrobust.points import load as load_points
from fastrobust.report import markdown_table
from recipes import run_dir
from recipes.protocols import DISPLAY, PROFILES

# the rows the claims name: the methods' own rows, and the paper's alpha = beta = 0.5 ablation row
DTRADES, TRADES = methods.DTRADES.name, methods.TRADES.name
HALF = DTRADES + "_half"
LEVEL, REPS = 0.95, 10_000


@dataclass
class Claim:
    text: str
    a: str            # the row the claim is about
    b: str            # the row it is compared with
    metric: str       # "na", "ra" or "rd"
    sign: int         # +1: a above b is claimed; -1: a below b


def claims(rows: Sequence[str]) -> list[Claim]:
    """The report's claims that a profile with these rows can test."""
    out = []
    if DTRADES in rows and TRADES in rows:
        out += [Claim("D-TRADES keeps a higher NA than TRADES", DTRADES, TRADES, "na", +1),
                Claim("D-TRADES has a lower RA than TRADES", DTRADES, TRADES, "ra", -1)]
    others = [r for r in rows if r != DTRADES and r != HALF]
    if DTRADES in rows:
        out += [Claim(f"D-TRADES has a higher RD than {r}", DTRADES, r, "rd", +1) for r in others]
        out += [Claim(f"D-TRADES has a higher ASR (a lower RA) than {r}", DTRADES, r, "ra", -1)
                for r in others if r != TRADES]
    if DTRADES in rows and HALF in rows:
        out += [Claim("alpha = beta = 1 gives a higher NA than 0.5", DTRADES, HALF, "na", +1),
                Claim("alpha = beta = 1 gives a higher RA than 0.5", DTRADES, HALF, "ra", +1)]
    return out


def verdict(low: float | None, high: float | None, sign: int, p: float | None = None) -> str:
    """From the interval and, where the test gives one, its p: a difference counts only when both agree
    (the percentile bootstrap and the exact test can part at a handful of discordant points)."""
    if low is None or high is None:
        return "untested"
    if p is not None and p >= 1 - LEVEL:
        return "not significant at this scale"
    if (low > 0 and sign > 0) or (high < 0 and sign < 0):
        return "supported"
    if (low > 0 and sign < 0) or (high < 0 and sign > 0):
        return "contradicted"
    return "not significant at this scale"


def _rd(points, name: str) -> tuple[np.ndarray, np.ndarray]:
    flags = points.flags(name)
    return points.natural[:len(flags)].astype(float), flags.astype(float)


def _rd_test(dirs_a: list[Path], dirs_b: list[Path], name: str) -> tuple[float, float | None, float | None, str, float | None]:
    """RD_a - RD_b (points): over seeds when both groups have several, else on the points of the first runs."""
    pa, pb = [load_points(d) for d in dirs_a], [load_points(d) for d in dirs_b]
    rd = lambda p: 100 * float(np.subtract(*_rd(p, name)).mean())  # noqa: E731
    ra, rb = [rd(p) for p in pa], [rd(p) for p in pb]
    if min(len(ra), len(rb)) >= 2:
        paired = len(ra) == len(rb)
        iv = (t_interval_paired if paired else t_interval_welch)(ra, rb, LEVEL)
        return iv.mean, iv.low, iv.high, f"{'paired' if paired else 'Welch'} t over seeds", iv.p
    (na_a, rob_a), (na_b, rob_b) = _rd(pa[0], name), _rd(pb[0], name)
    if len(na_a) != len(na_b):
        return float(np.mean(ra) - np.mean(rb)), None, None, "different points", None
    d = (na_a - rob_a) - (na_b - rob_b)
    rng = np.random.default_rng(0)
    boot = np.array([d[rng.integers(0, len(d), len(d))].mean() for _ in range(2000)])
    low, high = np.quantile(boot, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return 100 * float(d.mean()), 100 * float(low), 100 * float(high), "bootstrap on the points (n = 1 seed)", None


def tested_claims(found: dict, profile: str, root: str | Path) -> str:
    """A Markdown section: each testable claim per (dataset, architecture) and attack, with its test."""
    prof = PROFILES[profile]
    out = []
    for dataset, arch in dict.fromkeys((d, a) for d, _, a in prof.cells):
        present = {r: sorted(found[(d, r, a)]["seeds"]) for d, r, a in found if (d, a) == (dataset, arch)}
        dirs = {r: [run_dir(dataset, r, arch, profile, root, s) for s in seeds] for r, seeds in present.items()}
        dirs = {r: ds for r, ds in dirs.items() if all((d / "points.npz").is_file() for d in ds)}
        rows = []
        for claim in claims(list(dirs)):
            if claim.metric == "rd":
                attacks = [a for a in load_points(dirs[claim.a][0]).attacks]
                for name in attacks:
                    diff, low, high, how, p = _rd_test(dirs[claim.a], dirs[claim.b], name)
                    rows.append([claim.text, f"RD ({load_points(dirs[claim.a][0]).label_of(name)})", diff,
                                 _ci(low, high), how, _p(p), verdict(low, high, claim.sign, p)])
                continue
            comparison = compare_groups(dirs[claim.a], dirs[claim.b], (claim.a, claim.b), reps=REPS, level=LEVEL)
            for m in comparison.measures:
                if (m.measure == "natural") != (claim.metric == "na"):
                    continue
                diff = m.diff
                if m.interval is not None:
                    low, high, p, how = m.interval.low, m.interval.high, m.interval.p, m.test
                else:   # one seed in a group: the paired test on the points of the first seed both groups hold
                    pr = next((s.paired for s in m.seeds if s.paired is not None), None)
                    low, high, p = (None, None, None) if pr is None else (pr.ci_low, pr.ci_high, pr.p)
                    diff = m.diff if pr is None else pr.diff
                    how = "McNemar + bootstrap on the points (n = 1 seed" + \
                          ("" if pr is None else f", {next(s.run for s in m.seeds if s.paired is pr)}") + ")"
                rows.append([claim.text, m.label, diff, _ci(low, high), how, _p(p),
                             verdict(low, high, claim.sign, p)])
        if rows:
            out += [f"### {DISPLAY.get(dataset, dataset)}, {DISPLAY.get(arch, arch)}", "",
                    markdown_table(["Claim", "Measure", "A − B (points)", "95% CI", "test", "p", "verdict"], rows), ""]
    if not out:
        return ""
    return "\n".join(["## The report's claims, tested", "",
                      "A is the claim's first row, B the second; the same test points for every run (per-point files), "
                      "intervals at 95% (recipes/questions.py).", ""] + out)


def _ci(low, high) -> str:
    return "—" if low is None or high is None else f"[{low:+.2f}, {high:+.2f}]"


def _p(p) -> str:
    return "—" if p is None else f"{p:.3g}"
