"""Seeds as an axis: one run folder per training seed, every seed in --run-missing, --emit-jobs and the
tables (mean ± standard deviation with n over seeds; every seed's value in the CSV/JSON)."""
from __future__ import annotations

import csv
import json
import random
import statistics

import pytest

import recipes
from fastrobust.errors import ConfigError
from recipes import paper_tables as pt
from recipes.protocols import PROFILES

CELL = ("mnist", "trades", "smallcnn")
PROFILE = "cpu_eps03"


def _result(na, pgd, aa, n=1000, n_aa=200):
    ra = {"fgsm": min(na, pgd + 0.05), "pgd": pgd, "autoattack": aa}
    return {"na": na, "n": n, "ra": ra, "rd": {a: na - v for a, v in ra.items()},
            "asr": {a: 1 - v for a, v in ra.items()}, "conditional_asr": {a: (na - v) / na for a, v in ra.items()},
            "n_attacked": {"fgsm": n, "pgd": n, "autoattack": n_aa}, "config": {"eps": 0.3},
            "all_checks_passed": True, "checks": [{"name": "ordering", "passed": True, "detail": ""}]}


def _write(root, cell, seed, r):
    path = recipes.run_dir(*cell, PROFILE, root, seed) / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"_".join(cell): r}))


def test_each_seed_has_its_own_run_folder_and_training_seed(tmp_path):
    configs = [recipes.make_config(*CELL, PROFILE, tmp_path, seed=s) for s in (0, 1, 2)]
    assert [c.seed for c in configs] == [0, 1, 2]
    assert len({c.out_dir for c in configs}) == 3 and configs[2].out_dir.endswith("seed2")
    assert {c.eval.seed for c in configs} == {0}   # the same attack seed: every run evaluated on equal terms


def test_the_seed_is_not_a_set_override_and_bad_lists_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="--seeds"):
        recipes.make_config(*CELL, PROFILE, tmp_path, overrides={"seed": 3})
    for bad in ("a,b", "-1", ","):
        with pytest.raises(ConfigError, match="--seeds takes"):
            recipes.parse_seeds(bad)
    assert recipes.parse_seeds("2,0,2") == (2, 0)
    assert recipes.parse_seeds(None) is None


def test_run_cells_trains_every_seed_of_a_row(tmp_path, monkeypatch):
    trained = []

    def fake_train(cfg, *extra):
        trained.append((cfg.seed, cfg.out_dir))
        return {"throughput": {"img_per_s": 1.0}}

    monkeypatch.setattr("fastrobust.train.train", fake_train)
    recipes.run_cells([CELL], PROFILE, tmp_path, {}, seeds=None)
    assert [s for s, _ in trained] == list(PROFILES[PROFILE].seeds_of("trades")) == [0, 1, 2]
    trained.clear()
    recipes.run_cells([("mnist", "mart", "smallcnn")], PROFILE, tmp_path, {}, seeds=(4, 5))
    assert [s for s, _ in trained] == [4, 5] and all(o.endswith(f"seed{s}") for s, o in trained)


def test_tables_show_mean_and_std_over_seeds_and_the_csv_keeps_each(tmp_path):
    rng = random.Random()
    nas = [rng.uniform(0.9, 0.99) for _ in range(3)]
    for seed, na in enumerate(nas):
        _write(tmp_path, CELL, seed, _result(na, na - 0.3, na - 0.35))
    _write(tmp_path, ("mnist", "mart", "smallcnn"), 0, _result(0.97, 0.6, 0.55))
    found = pt.load(tmp_path, PROFILE)
    text = pt.tables(found, PROFILE)
    pct = [100 * v for v in nas]
    row = [line for line in text.splitlines() if line.startswith("| trades |")][0]
    assert f"{statistics.fmean(pct):.2f} ± {statistics.stdev(pct):.2f} (n=3)" in row
    mart = [line for line in text.splitlines() if line.startswith("| mart |")][0]
    assert "(n=" not in mart   # one seed: no spread over seeds is claimed
    csv_path, json_path = pt.write_values(found, tmp_path / "values")
    rows = [r for r in csv.DictReader(csv_path.open()) if r["row"] == "trades" and r["metric"] == "na"]
    assert sorted(int(r["seed"]) for r in rows) == [0, 1, 2]
    assert sorted(float(r["value_percent"]) for r in rows) == pytest.approx(sorted(pct), abs=1e-3)
    assert len(json.loads(json_path.read_text())) == len(list(csv.DictReader(csv_path.open())))


def test_missing_seeds_get_their_own_launch_lines_and_array_tasks(tmp_path):
    _write(tmp_path, CELL, 1, _result(0.95, 0.6, 0.55))
    found = pt.load(tmp_path, PROFILE)
    missing = pt.missing_runs(found, PROFILE)
    assert (CELL, 1) not in missing and (CELL, 0) in missing and (CELL, 2) in missing
    n_runs = sum(len(PROFILES[PROFILE].seeds_of(r)) for _, r, _ in PROFILES[PROFILE].cells)
    assert len(missing) == n_runs - 1
    jobs, slurm = pt.emit_jobs(missing, PROFILE, str(tmp_path), tmp_path / "jobs", nproc=1)
    lines = [line for line in jobs.read_text().splitlines() if line and not line.startswith("#")]
    assert len(lines) == len(missing)
    assert any("recipes.mnist_trades_smallcnn" in line and "--seeds 2 " in line for line in lines)
    assert f"--array=0-{len(missing) - 1}" in slurm.read_text()


def test_paper_tables_cli_takes_seeds(tmp_path, capsys):
    _write(tmp_path, CELL, 7, _result(0.95, 0.6, 0.55))
    assert pt.main(["--profile", PROFILE, "--runs", str(tmp_path), "--seeds", "7"]) == 0
    out = capsys.readouterr().out
    assert "1 of 7 cells present (1 of 7 runs)" in out
    assert "--seeds 7 --resume" in out
    assert pt.main(["--profile", PROFILE, "--runs", str(tmp_path), "--seeds", "x"]) == 2
