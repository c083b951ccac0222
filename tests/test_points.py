"""points.npz: every evaluation keeps its per-point outcomes, which agree with its reported numbers, with
the radius and attack settings that make two evaluations comparable point by point."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fastrobust import points
from fastrobust.config import EvalConfig
from fastrobust.errors import ConfigError
from fastrobust.evaluate import evaluate
from fastrobust.report import save_results

CFG = dict(dataset="mnist", eps=0.1, pgd_steps=5, num_samples=60, aa_samples=12, aa_version="custom",
           aa_attacks=("apgd-ce",), sweep_samples=0, batch_size=30)


@pytest.fixture(scope="module")
def evaluated(trained_smallcnn, mnist_test, tmp_path_factory):
    r = evaluate(trained_smallcnn, mnist_test.images, mnist_test.labels, EvalConfig(**CFG), progress=False)
    out = tmp_path_factory.mktemp("eval")
    save_results({"m": r}, out)
    return r, out


def test_the_file_holds_the_flags_behind_every_reported_number(evaluated, mnist_test):
    r, out = evaluated
    p = points.load(out)
    assert p.path.name == "points.npz"
    assert np.array_equal(p.index, np.arange(60)) and np.array_equal(p.label, mnist_test.labels[:60])
    assert p.natural.mean() == pytest.approx(r.na)
    assert set(p.attacks) == set(r.ra)
    for a, flags in p.attacks.items():
        assert len(flags) == r.n_attacked[a] and flags.mean() == pytest.approx(r.ra[a])
        assert not (flags & ~p.natural[:len(flags)]).any() or a != "autoattack"   # AA counts clean-correct only
    assert len(p.attacks["autoattack"]) == 12
    assert p.meta["eps"] == 0.1 and p.meta["attacks"]["pgd"]["settings"]["pgd_steps"] == 5
    assert p.meta["attacks"]["pgd"]["label"] == "PGD-5"
    assert "points" not in json.loads((out / "results.json").read_text())["m"]   # the JSON stays small


def test_a_folder_without_the_file_says_how_to_make_it(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(ConfigError, match="evaluated before they were kept.*fastrobust eval"):
        points.load(tmp_path)


def test_a_damaged_or_foreign_file_is_a_clean_error(tmp_path):
    (tmp_path / "points.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="not a readable per-point file"):
        points.load(tmp_path / "points.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ConfigError, match="lacks index, label, natural, meta"):
        points.load(tmp_path / "other.npz")


def test_comparable_only_on_the_same_points_and_settings(evaluated, tmp_path):
    r, out = evaluated
    a = points.load(out)
    points.check_comparable(a, a, ["natural", "pgd", "autoattack"])   # itself: comparable
    other = points.Points(a.index, a.label, a.natural, dict(a.attacks), json.loads(json.dumps(a.meta)))
    other.meta["attacks"]["pgd"]["settings"]["pgd_steps"] = 20
    with pytest.raises(ConfigError, match="PGD-5 pgd_steps: 5 vs 20"):
        points.check_comparable(a, other, ["pgd"])
    points.check_comparable(a, other, ["natural", "fgsm"])   # the PGD settings do not matter to FGSM
    shorter = points.Points(a.index[:30], a.label[:30], a.natural[:30], {"pgd": a.attacks["pgd"][:30]}, a.meta)
    with pytest.raises(ConfigError, match="60 vs 30 points"):
        points.check_comparable(a, shorter, ["pgd"])
    moved = points.Points(a.index + 100, a.label, a.natural, dict(a.attacks), a.meta)
    with pytest.raises(ConfigError, match="other test indices"):
        points.check_comparable(a, moved, ["natural"])
    wider = points.Points(a.index, a.label, a.natural, dict(a.attacks), {**a.meta, "eps": 0.3})
    with pytest.raises(ConfigError, match="eps: 0.1 vs 0.3"):
        points.check_comparable(a, wider, ["natural"])
