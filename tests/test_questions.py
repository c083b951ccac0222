"""recipes.questions: the report's comparative claims, each tested on run folders and given a verdict that
follows from its interval (supported, contradicted, not significant at this scale)."""
from __future__ import annotations

import json

import numpy as np

from fastrobust import points
from recipes import paper_tables as pt
from recipes import questions, run_dir

PROFILE = "cpu_eps03"
N, N_AA = 400, 100


def _meta():
    settings = {"fgsm": {"eps": 0.3, "norm": "linf"},
                "pgd": {"eps": 0.3, "norm": "linf", "pgd_steps": 40, "pgd_step_size": 0.01,
                        "pgd_random_start": "uniform", "seed": 0},
                "autoattack": {"eps": 0.3, "norm": "linf", "aa_version": "standard", "aa_attacks": [], "seed": 0}}
    labels = {"fgsm": "FGSM", "pgd": "PGD-40", "autoattack": "AutoAttack"}
    return {"dataset": "mnist", "split": "test", "eps": 0.3, "norm": "linf",
            "attacks": {a: {"label": labels[a], "n": N_AA if a == "autoattack" else N, "settings": s}
                        for a, s in settings.items()}}


def _run(root, row, seed, na, ra, rng):
    out = run_dir("mnist", row, "smallcnn", PROFILE, root, seed)
    out.mkdir(parents=True)
    natural = rng.random(N) < na
    robust = natural & (rng.random(N) < ra / na)
    flags = {"fgsm": robust, "pgd": robust, "autoattack": robust[:N_AA]}
    points.save(points.from_evaluation(natural, flags, np.zeros(N, dtype=np.int64), _meta()), out / "points.npz")
    r = {"na": float(natural.mean()), "n": N, "ra": {a: float(f.mean()) for a, f in flags.items()},
         "n_attacked": {a: len(f) for a, f in flags.items()}, "config": {"eps": 0.3}, "all_checks_passed": True,
         "checks": []}
    r.update(rd={a: r["na"] - v for a, v in r["ra"].items()}, asr={a: 1 - v for a, v in r["ra"].items()},
             conditional_asr={a: 0.0 for a in r["ra"]})
    (out / "results.json").write_text(json.dumps({row: r}))
    (out / "manifest.json").write_text(json.dumps({"config": {"seed": seed, "method": {"name": row}}}))


def _verdicts(text):
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| ") and "Claim" not in line]
    return {(r[1].strip(), r[2].strip()): r[-2].strip() for r in rows}


def test_verdict_follows_the_interval():
    assert questions.verdict(0.5, 2.0, +1) == "supported"
    assert questions.verdict(-2.0, -0.5, +1) == "contradicted"
    assert questions.verdict(-2.0, -0.5, -1) == "supported"
    assert questions.verdict(-0.5, 2.0, -1) == "not significant at this scale"
    assert questions.verdict(None, None, +1) == "untested"
    assert questions.verdict(1.0, 10.0, -1, p=0.0625) == "not significant at this scale"   # the test disagrees
    assert questions.verdict(1.0, 10.0, -1, p=0.01) == "contradicted"


def test_claims_get_the_verdicts_their_data_imply(tmp_path):
    rng = np.random.default_rng()
    for seed in (0, 1, 2):
        _run(tmp_path, "trades", seed, na=0.80, ra=0.30, rng=rng)   # 17 and 30 points apart: always significant
        same = int(rng.integers(2**31))
        _run(tmp_path, "dtrades", seed, na=0.97, ra=0.60, rng=np.random.default_rng(same))
        # the ablation's outcomes equal alpha = beta = 1's point for point: a difference of exactly zero
        _run(tmp_path, "dtrades_half", seed, na=0.97, ra=0.60, rng=np.random.default_rng(same))
    _run(tmp_path, "mart", 0, na=0.97, ra=0.60, rng=rng)
    found = pt.load(tmp_path, PROFILE)
    text = questions.tested_claims(found, PROFILE, tmp_path)
    v = _verdicts(text)
    assert v[("D-TRADES keeps a higher NA than TRADES", "NA")] == "supported"
    assert v[("D-TRADES has a lower RA than TRADES", "PGD-40")] == "contradicted"
    assert v[("alpha = beta = 1 gives a higher NA than 0.5", "NA")] == "not significant at this scale"
    assert "paired t over 3 seeds" in text
    mart = [line for line in text.splitlines() if "than mart" in line]
    assert mart and all("n = 1 seed" in line for line in mart)   # one MART seed: the per-point tests
    assert ("D-TRADES has a higher RD than trades", "RD (PGD-40)") in v
