"""``fastrobust compare``: the exact and t-based tests against closed forms and scipy, the paired bootstrap,
the refusal to compare evaluations of different points or settings, and the command on synthetic run
folders (two evaluations; two groups of three seeds, paired and unpaired; one seed each)."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math

import numpy as np
import pytest
from scipy import stats as sps

from fastrobust import compare, points
from fastrobust.cli import main as cli_main
from fastrobust.config import EvalConfig
from fastrobust.errors import ConfigError
from fastrobust.evaluate import attack_label, attack_settings


# ---------------------------------------------------------------------------------------- synthetic evaluations
def synthetic_points(rng: np.random.Generator, n: int = 400, aa: int = 80, acc: tuple = (0.95, 0.8, 0.7),
                     attacks=("fgsm", "pgd", "autoattack"), start: int = 0, **eval_options) -> points.Points:
    """The record an evaluation of a model of accuracies ``acc`` (NA, FGSM, PGD) would write, with the
    meta data of a real EvalConfig; the labels depend on the index only, as a test set's do."""
    cfg = dataclasses.asdict(EvalConfig(**{"dataset": "mnist", "eps": 0.1, "pgd_steps": 10, "aa_samples": aa,
                                           "aa_version": "custom", "aa_attacks": ("apgd-ce",), **eval_options})
                             .resolved())
    natural = rng.random(n) < acc[0]
    fgsm = natural & (rng.random(n) < acc[1] / acc[0])
    pgd = fgsm & (rng.random(n) < acc[2] / acc[1])
    flags = {"fgsm": fgsm, "pgd": pgd, "autoattack": pgd[:aa] & (rng.random(aa) < 0.95)}
    flags = {k: v for k, v in flags.items() if k in attacks}
    p = points.from_evaluation(natural, flags, np.zeros(n), {
        "dataset": "mnist", "split": "test", "eps": cfg["eps"], "norm": cfg["norm"],
        "attacks": {a: {"label": attack_label(a, cfg), "n": len(f), "settings": attack_settings(a, cfg)}
                    for a, f in flags.items()}})
    p.index = np.arange(start, start + n, dtype=np.int64)
    p.label = p.index % 10
    return p


def write_run(folder, p: points.Points, seed: int | None, method: str = "trades"):
    """A run folder as far as compare reads it: points.npz and the training manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    points.save(p, folder / points.FILE)
    if seed is not None:
        (folder / "manifest.json").write_text(json.dumps({"config": {"seed": seed, "method": {"name": method}},
                                                          "seed": seed}))
    return folder


def run_cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_main(["compare", *map(str, args)])
    return rc, out.getvalue(), err.getvalue()


def flags_of(rng, n, p_a, p_b):
    return rng.random(n) < p_a, rng.random(n) < p_b


# ---------------------------------------------------------------------------------------- known answers
def test_mcnemar_known_answers():
    a, b = np.zeros(20, bool), np.zeros(20, bool)
    b[:6] = True                          # b = 0, c = 6: p = 2 (1/2)^6
    assert compare.mcnemar_exact(a, b) == (0, 6, 0.03125)
    same = np.arange(30) % 3 == 0
    assert compare.mcnemar_exact(same, same).p == 1.0
    assert compare.paired_bootstrap_ci(same, same, reps=500) == (0.0, 0.0)
    assert compare.binom_two_sided_p(1, 3) == 1.0 and compare.binom_two_sided_p(0, 2) == 0.5
    assert compare.binom_two_sided_p(1, 10) == pytest.approx(2 * 11 / 1024, rel=1e-13)


def test_t_quantile_closed_forms_and_a_hand_computed_interval():
    for q in (0.6, 0.9, 0.975, 0.999, 0.01):
        assert compare.t_quantile(q, 1) == pytest.approx(math.tan(math.pi * (q - 0.5)), rel=1e-11)   # Cauchy
        assert compare.t_quantile(q, 2) == pytest.approx((2 * q - 1) / math.sqrt(2 * q * (1 - q)), rel=1e-11)
    # differences 1, 2, 3 with df 2: mean 2, sd 1, se 1/sqrt(3); t_0.975(2) = 1/sqrt(2 * 0.975 * 0.025) * 0.95
    iv = compare.t_interval_paired([2.0, 4.0, 6.0], [1.0, 2.0, 3.0], level=0.95)
    half = 0.95 / math.sqrt(2 * 0.975 * 0.025) / math.sqrt(3)
    assert (iv.mean, iv.df) == (2.0, 2) and iv.low == pytest.approx(2 - half, rel=1e-11)
    assert iv.high == pytest.approx(2 + half, rel=1e-11) and iv.t == pytest.approx(2 * math.sqrt(3))
    # two-sided p of t with 2 df in closed form: 1 - |t| / sqrt(2 + t^2)
    assert iv.p == pytest.approx(1 - iv.t / math.sqrt(2 + iv.t ** 2), rel=1e-11)


def test_degenerate_intervals_and_bad_input_are_clear():
    iv = compare.t_interval_paired([1.0, 2.0], [0.0, 1.0])     # every difference 1: no spread
    assert (iv.low, iv.high, iv.p) == (1.0, 1.0, 0.0)
    assert compare.t_interval_welch([1.0, 1.0], [1.0, 1.0]).p == 1.0
    with pytest.raises(ConfigError, match="at least 2"):
        compare.t_interval_welch([1.0], [1.0, 2.0])
    with pytest.raises(ConfigError, match="equally long"):
        compare.mcnemar_exact(np.ones(3, bool), np.ones(4, bool))
    with pytest.raises(ConfigError, match="between 0 and 1"):
        compare.paired_bootstrap_ci(np.ones(3, bool), np.ones(3, bool), level=95)


# ---------------------------------------------------------------------------------------- against scipy
@pytest.mark.parametrize("n_a,n_b", [(b, c) for b in range(0, 13, 2) for c in range(0, 13, 3)]
                         + [(480, 520), (450, 550), (300, 700), (0, 1000), (999, 1), (900, 1101), (1000, 1400), (2500, 2600)])
def test_exact_mcnemar_matches_scipy_binomtest(n_a, n_b):
    n = n_a + n_b
    expected = 1.0 if n == 0 else sps.binomtest(n_a, n, 0.5).pvalue
    assert compare.binom_two_sided_p(n_a, n) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_mcnemar_on_random_flags_matches_scipy():
    rng = np.random.default_rng(7)
    for n in (50, 500, 5000):
        a, b = flags_of(rng, n, 0.8, 0.75)
        test = compare.mcnemar_exact(a, b)
        assert (test.a_only, test.b_only) == (int((a & ~b).sum()), int((~a & b).sum()))
        assert test.p == pytest.approx(sps.binomtest(test.a_only, test.a_only + test.b_only, 0.5).pvalue, rel=1e-9)


@pytest.mark.parametrize("df", list(range(1, 31)) + [2.5, 7.3, 45.5, 100, 250, 1000, 1e5, 1e6])
def test_t_quantiles_match_scipy(df):
    for q in (0.55, 0.7, 0.9, 0.95, 0.975, 0.995, 0.9995, 1e-6, 0.025, 0.3):
        assert compare.t_quantile(q, df) == pytest.approx(sps.t.ppf(q, df), rel=1e-10, abs=1e-12)


def test_paired_and_welch_t_match_scipy():
    rng = np.random.default_rng(11)
    for n in (2, 3, 5, 12, 40):
        x = rng.normal(60, 2, n)
        y = x - 0.8 + rng.normal(0, 1.5, n)
        iv, ref = compare.t_interval_paired(x, y, 0.9), sps.ttest_rel(x, y)
        assert iv.p == pytest.approx(ref.pvalue, rel=1e-9) and iv.t == pytest.approx(ref.statistic, rel=1e-12)
        assert (iv.low, iv.high) == pytest.approx(tuple(ref.confidence_interval(0.9)), rel=1e-9)
        z = rng.normal(58, 4, n + 3)
        iv, ref = compare.t_interval_welch(x, z, 0.95), sps.ttest_ind(x, z, equal_var=False)
        assert iv.p == pytest.approx(ref.pvalue, rel=1e-9) and iv.df == pytest.approx(ref.df, rel=1e-12)
        assert (iv.low, iv.high) == pytest.approx(tuple(ref.confidence_interval(0.95)), rel=1e-9)


# ---------------------------------------------------------------------------------------- bootstrap
def test_bootstrap_interval_holds_the_difference_is_about_normal_width_and_is_reproducible():
    rng = np.random.default_rng(3)
    n = 20_000
    a, b = flags_of(rng, n, 0.70, 0.68)
    b = np.where(rng.random(n) < 0.6, a, b)   # paired outcomes agree on most points, as two models' do
    diff = a.mean() - b.mean()
    low, high = compare.paired_bootstrap_ci(a, b, reps=10_000, seed=5)
    assert low < diff < high
    p10, p01 = (a & ~b).mean(), (~a & b).mean()
    normal_half = sps.norm.ppf(0.975) * math.sqrt((p10 + p01 - (p10 - p01) ** 2) / n)
    assert (high - low) / (2 * normal_half) == pytest.approx(1.0, abs=0.05)
    assert (low + high) / 2 == pytest.approx(diff, abs=0.1 * normal_half)
    assert compare.paired_bootstrap_ci(a, b, reps=10_000, seed=5) == (low, high)
    assert compare.paired_bootstrap_ci(a, b, reps=10_000, seed=6) != (low, high)
    narrow = compare.paired_bootstrap_ci(a, b, reps=10_000, seed=5, level=0.5)
    assert low < narrow[0] < narrow[1] < high


# ---------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("change,named", [
    (dict(n=300), "300"),                  # fewer points
    (dict(start=5), "other test indices"),
    (dict(eps=0.2), "eps"),
    (dict(pgd_steps=20), "pgd_steps"),
])
def test_different_points_or_settings_are_refused_naming_the_difference(tmp_path, change, named):
    a = write_run(tmp_path / "a", synthetic_points(np.random.default_rng(0)), 0)
    b = write_run(tmp_path / "b", synthetic_points(np.random.default_rng(1), **change), 0)
    with pytest.raises(ConfigError, match="not comparable point by point") as e:
        compare.compare_pair(a, b)
    assert named in str(e.value)
    rc, out, err = run_cli(a, b)
    assert rc == 2 and out == "" and "Traceback" not in err
    assert err.startswith("fastrobust: error:") and named in err and err.count("\n") == 1


def test_bad_command_lines_are_one_line_errors(tmp_path):
    for args in ([tmp_path], [tmp_path, tmp_path, tmp_path], ["--a", tmp_path], ["--a", tmp_path, "--b", tmp_path]):
        rc, out, err = run_cli(*args)
        assert rc == 2 and "Traceback" not in err and err.startswith("fastrobust: error:") and err.count("\n") == 1
    rc, _, err = run_cli(tmp_path / "nowhere", tmp_path)
    assert rc == 2 and "nowhere" in err
    run = write_run(tmp_path / "run", synthetic_points(np.random.default_rng(0)), 0)
    for args, named in (([run, run, "--reps", "0"], "--reps"), ([run, run, "--level", "1.5"], "between 0 and 1"),
                        ([run, run, "--seed", "-1"], "seed"), (["--a", run, run, "--b", tmp_path], "more than once")):
        rc, out, err = run_cli(*args)
        assert rc == 2 and named in err and err.count("\n") == 1 and out == ""


# ---------------------------------------------------------------------------------------- the command
def test_two_evaluations_end_to_end(tmp_path):
    rng = np.random.default_rng(21)
    pa, pb = synthetic_points(rng, acc=(0.96, 0.85, 0.75)), synthetic_points(rng, acc=(0.94, 0.80, 0.66))
    a, b = write_run(tmp_path / "a", pa, 0), write_run(tmp_path / "b", pb, 0)
    rc, out, err = run_cli(a, b / points.FILE, "--names", "D-TRADES", "TRADES", "--out", tmp_path / "cmp")
    assert rc == 0, err
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert (tmp_path / "cmp" / "compare.md").read_text().strip() in out
    assert saved["kind"] == "points" and [r["measure"] for r in saved["paired"]] == ["natural", "fgsm", "pgd",
                                                                                      "autoattack"]
    for row in saved["paired"]:
        fa, fb = pa.flags(row["measure"]), pb.flags(row["measure"])
        only_a, only_b = int((fa & ~fb).sum()), int((~fa & fb).sum())
        assert row["n"] == len(fa) and row["diff"] == pytest.approx(100 * (fa.mean() - fb.mean()))
        assert (row["a_only"], row["b_only"]) == (only_a, only_b)
        assert row["p"] == pytest.approx(sps.binomtest(only_a, only_a + only_b, 0.5).pvalue, rel=1e-9)
        assert row["ci_low"] <= row["diff"] <= row["ci_high"]
        assert f"| {row['label']} | {row['n']} |" in out
    assert "D-TRADES (%)" in out and "McNemar p" in out
    assert (tmp_path / "cmp" / "compare.csv").read_text().splitlines()[0].startswith("measure,label,n,acc_a")


def test_an_attack_in_one_evaluation_only_is_listed_as_skipped(tmp_path):
    rng = np.random.default_rng(2)
    a = write_run(tmp_path / "a", synthetic_points(rng), 0)
    b = write_run(tmp_path / "b", synthetic_points(rng, attacks=("fgsm", "pgd")), 0)
    result = compare.compare_pair(a, b)
    assert [r.measure for r in result.paired] == ["natural", "fgsm", "pgd"]
    assert "autoattack" in result.skipped and "skipped autoattack: not evaluated in B" in result.markdown()


def make_groups(tmp_path, seeds_a, seeds_b, n=1000):
    rng = np.random.default_rng(sum(seeds_a) + 31 * sum(seeds_b))
    dirs = {}
    for group, seeds, acc in (("a", seeds_a, (0.95, 0.82, 0.72)), ("b", seeds_b, (0.93, 0.78, 0.66))):
        for s in seeds:
            folder = write_run(tmp_path / group / f"seed{s}", synthetic_points(rng, n=n, acc=acc), s)
            dirs.setdefault(group, []).append(folder)
    return dirs["a"], dirs["b"]


def accuracies(dirs, measure):
    return [100 * points.load(d).flags(measure).mean() for d in dirs]


def test_groups_of_three_seeds_pair_by_seed(tmp_path):
    dirs_a, dirs_b = make_groups(tmp_path, (0, 1, 2), (2, 0, 1))
    rc, out, err = run_cli("--a", *dirs_a, "--b", *dirs_b, "--out", tmp_path / "cmp")
    assert rc == 0, err
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    by_seed_b = dict(zip((2, 0, 1), dirs_b))
    for row in saved["mean"]:
        acc_a = accuracies(dirs_a, row["measure"])
        acc_b = accuracies([by_seed_b[s] for s in (0, 1, 2)], row["measure"])
        ref = sps.ttest_rel(acc_a, acc_b)
        assert row["test"] == "paired t over 3 seeds" and row["df"] == 2
        assert row["diff"] == pytest.approx(np.mean(acc_a) - np.mean(acc_b))
        assert row["p"] == pytest.approx(ref.pvalue, rel=1e-9)
        assert (row["ci_low"], row["ci_high"]) == pytest.approx(tuple(ref.confidence_interval(0.95)), rel=1e-9)
    per_seed = [r for r in saved["per_seed"] if r["measure"] == "pgd"]
    assert [r["run"] for r in per_seed] == ["seed 0", "seed 1", "seed 2"]
    for r, s in zip(per_seed, (0, 1, 2)):
        fa, fb = points.load(dirs_a[s]).flags("pgd"), points.load(by_seed_b[s]).flags("pgd")
        only_a, only_b = int((fa & ~fb).sum()), int((~fa & fb).sum())
        assert r["p"] == pytest.approx(sps.binomtest(only_a, only_a + only_b, 0.5).pvalue, rel=1e-9)
    assert "**Mean over seeds**" in out and "**Per seed**" in out and "| PGD-10 | seed 2 |" in out
    csv_tables = [line.split(",")[0] for line in (tmp_path / "cmp" / "compare.csv").read_text().splitlines()]
    assert csv_tables.count("mean") == 4 and csv_tables.count("seed") == 12


def test_groups_of_other_seeds_use_welch(tmp_path):
    dirs_a, dirs_b = make_groups(tmp_path, (0, 1, 2), (3, 4, 5))
    result = compare.compare_groups(dirs_a, dirs_b, names=("D-TRADES a=b=1", "D-TRADES a=b=0.5"))
    for row in result.rows():
        ref = sps.ttest_ind(accuracies(dirs_a, row["measure"]), accuracies(dirs_b, row["measure"]), equal_var=False)
        assert row["test"] == "Welch t" and row["p"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert all(r["p"] is None for r in result.seed_rows())   # no seed in both groups: no per-point test
    assert "Welch's, unpaired" in result.markdown() and "D-TRADES a=b=0.5 mean" in result.markdown()


def test_one_seed_per_group_gives_only_the_paired_test(tmp_path):
    dirs_a, dirs_b = make_groups(tmp_path, (4,), (4,))
    rc, out, err = run_cli("--a", *dirs_a, "--b", *dirs_b)
    assert rc == 0, err
    assert "n = 1" in out and "no interval over seeds" in out
    result = compare.compare_groups(dirs_a, dirs_b)
    assert all(r["ci_low"] is None and r["p"] is None for r in result.rows())
    assert all(r["p"] is not None for r in result.seed_rows())


def test_groups_under_different_settings_are_refused(tmp_path):
    dirs_a, dirs_b = make_groups(tmp_path, (0, 1), (0, 1))
    write_run(dirs_b[1], synthetic_points(np.random.default_rng(0), n=1000, pgd_steps=40), 1)
    rc, out, err = run_cli("--a", *dirs_a, "--b", *dirs_b)
    assert rc == 2 and "pgd_steps" in err and "Traceback" not in err


def test_the_training_seed_is_read_from_the_run_not_from_an_evaluation(tmp_path):
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    write_run(run, synthetic_points(np.random.default_rng(0)), 7)
    (run / "eval" / "eval_manifest.json").write_text(json.dumps({"config": {"seed": 0, "eps": 0.1}, "seed": 0,
                                                                  "checkpoint": "elsewhere/final.pt"}))
    assert compare.run_seed(run) == 7 and compare.run_seed(run / points.FILE) == 7
    assert compare.run_seed(run / "eval") == 7          # the evaluation's own seed is its attacks'
    assert compare.run_seed(tmp_path) is None
