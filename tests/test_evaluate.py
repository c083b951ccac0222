import json

import pytest
import torch
import torch.nn as nn

from fastrobust.config import EvalConfig
from fastrobust.evaluate import EvalResult, evaluate, results_markdown, save_results


@pytest.fixture(scope="module")
def result(trained_smallcnn, mnist_test):
    # PGD-20 with step 0.03 covers the 0.3 ball (the paper's step 0.01 does not: see below)
    cfg = EvalConfig(dataset="mnist", num_samples=300, aa_samples=40, sweep_samples=100, batch_size=150,
                     pgd_step_size=0.03)
    return evaluate(trained_smallcnn, mnist_test.images, mnist_test.labels, cfg, progress=False)


def test_paper_mnist_pgd_is_too_weak_and_flagged(trained_smallcnn, mnist_test):
    """The paper's MNIST PGD-20 with step 0.01 cannot reach eps 0.3: warned up front, and AutoAttack
    on the same points exposes the robustness it overstates."""
    cfg = EvalConfig(dataset="mnist", num_samples=100, aa_samples=100, sweep_samples=0, batch_size=100,
                     attacks=("pgd", "autoattack"))
    with pytest.warns(UserWarning, match="cannot cover its ball"):
        r = evaluate(trained_smallcnn, mnist_test.images, mnist_test.labels, cfg, progress=False)
    assert any("cannot cover its ball" in w for w in r.warnings)
    (gap,) = [c for c in r.checks if c.name == "PGD vs AutoAttack"]
    assert not gap.passed and "overstates robustness" in gap.detail
    assert r.ra["pgd"] > r.ra["autoattack"]


def test_clean_model_numbers_are_consistent(result):
    assert result.na > 0.9
    assert set(result.ra) == {"fgsm", "pgd", "autoattack"}
    assert result.ra["autoattack"] <= result.ra["pgd"] <= result.ra["fgsm"] <= result.na
    assert result.n == 300 and result.n_attacked["autoattack"] == 40
    assert result.all_passed, [c.line() for c in result.checks if not c.passed]
    names = [c.name for c in result.checks]
    assert any(n.startswith("ordering") for n in names)
    assert {"eps = 0", "monotone in eps", "large eps", "gradients", "PGD vs AutoAttack",
            "prediction diversity"} <= set(names)
    assert not result.warnings


def test_eps_zero_equals_natural_accuracy(result, trained_smallcnn, mnist_test):
    zero = [p for p in result.sweep if p["eps"] == 0][0]
    with torch.no_grad():
        x = torch.from_numpy(mnist_test.images[:100]).permute(0, 3, 1, 2).float() / 255
        na = int((trained_smallcnn(x).argmax(1) == torch.from_numpy(mnist_test.labels[:100])).sum()) / 100
    assert zero["ra"] == na
    assert result.sweep[-1]["eps"] == 1.0  # the whole box


def test_derived_metrics_follow_their_definitions(result):
    for a, ra in result.ra.items():
        assert result.asr[a] == pytest.approx(1 - ra)
        assert result.rd[a] == pytest.approx(result.na_on_attacked[a] - ra)
        assert 0 <= result.conditional_asr[a] <= 1
    # conditional ASR counts flips among clean-correct points: RA = NA (1 - cASR) when no wrong point turns right
    assert result.ra["autoattack"] == pytest.approx(result.na_on_attacked["autoattack"] * (1 - result.conditional_asr["autoattack"]))


class Binarize(nn.Module):
    """Rounds inputs to {0, 1}: a non-differentiable step that masks gradients."""
    def forward(self, x):
        return torch.round(x)


def test_gradient_masking_is_flagged(trained_smallcnn, mnist_test):
    masked = nn.Sequential(Binarize(), trained_smallcnn).eval()
    cfg = EvalConfig(dataset="mnist", num_samples=100, attacks=("fgsm", "pgd"), sweep_samples=50, batch_size=100,
                     pgd_steps=30)
    r = evaluate(masked, mnist_test.images, mnist_test.labels, cfg, progress=False)
    failed = {c.name for c in r.checks if not c.passed}
    assert "gradients" in failed
    assert not r.all_passed
    # with zero gradients PGD cannot move: robust accuracy at eps 0.3 stays near natural accuracy
    assert r.ra["pgd"] > 0.5


def test_results_files(result, tmp_path):
    paths = save_results({"smallcnn": result}, tmp_path, manifest={"seed": 0})
    md = paths["md"].read_text()
    assert "Natural" in md and "PGD-20" in md and "AutoAttack" in md and "Robustness drop" in md
    assert "FAILED" not in md and "passed" in md
    data = json.loads(paths["json"].read_text())["smallcnn"]
    assert data["na"] == pytest.approx(result.na) and data["all_checks_passed"] is True
    csv = paths["csv"].read_text().splitlines()
    assert csv[0].startswith("table,Model,Natural") and len(csv) >= 4
    assert paths["sweep_png"].stat().st_size > 1000
    assert json.loads(paths["manifest"].read_text()) == {"seed": 0}


def test_failed_checks_are_reported_in_markdown():
    r = EvalResult(config=dict(EvalConfig(dataset="mnist").resolved().__dict__), n=10, na=0.5, ra={"pgd": 0.6},
                   n_attacked={"pgd": 10}, na_on_attacked={"pgd": 0.5}, conditional_asr={"pgd": 0.0})
    from fastrobust.evaluate import Check
    r.checks.append(Check("ordering PGD-20 <= NA", False, "60.00% vs 50.00%"))
    assert "[FAILED] ordering PGD-20 <= NA" in results_markdown({"m": r})


def test_pgd_far_above_autoattack_is_flagged(result):
    from fastrobust.evaluate import attack_gap_check
    m = 40
    pgd = torch.zeros(300, dtype=torch.bool)
    pgd[:20] = True                                   # PGD RA 50% on the first 40 points
    aa = torch.zeros(m, dtype=torch.bool)             # AutoAttack RA 0%
    check = attack_gap_check(result, {"pgd": pgd, "autoattack": aa})
    assert not check.passed and "overstates robustness by 50.0 points" in check.detail
    assert attack_gap_check(result, {"pgd": pgd, "autoattack": pgd[:m].clone()}).passed


def test_collapsed_model_is_flagged(mnist_test):
    class Constant(nn.Module):
        def forward(self, x):
            return torch.zeros(len(x), 10).index_fill_(1, torch.tensor([3]), 1.0) + 0 * x.flatten(1)[:, :1]

    cfg = EvalConfig(dataset="mnist", num_samples=50, attacks=("fgsm",), sweep_samples=0, batch_size=50)
    r = evaluate(Constant(), mnist_test.images, mnist_test.labels, cfg, progress=False)
    (check,) = [c for c in r.checks if c.name == "prediction diversity"]
    assert not check.passed and "class 3 takes 100.0%" in check.detail
    assert not r.all_passed
