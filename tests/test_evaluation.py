import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import loaders
from fastrobust.attacks import eval_mode, pgd_perturb, random_start
from fastrobust.config import EvalConfig
from fastrobust.evaluate import EvalResult, evaluate
from fastrobust.methods import TRADES, AdvBatch
from fastrobust.models import create_model
from fastrobust.report import results_markdown, save_results

MNIST_EPS = 0.3
PAPER_MNIST_PGD_STEP = 0.01   # the D-TRADES paper's MNIST PGD-20 step: 20 x 0.01 = 0.2 < 0.3
# The briefly TRADES-trained SmallCNN (trades_smallcnn): 64 steps of batch 64 against a 5 x 0.075 KL attack.
TRAIN_IMAGES, TRAIN_BATCH, TRAIN_LR = 4096, 64, 0.05
TRAIN_STEPS, TRAIN_STEP = 5, 0.075


@pytest.fixture(scope="module")
def result(trained_smallcnn, mnist_test):
    # PGD-20 with step 0.03 covers the 0.3 ball (the paper's step 0.01 does not: see below)
    cfg = EvalConfig(dataset="mnist", eps=MNIST_EPS, num_samples=300, aa_samples=40, sweep_samples=100,
                     batch_size=150, pgd_step_size=0.03)
    return evaluate(trained_smallcnn, mnist_test.images, mnist_test.labels, cfg, progress=False)


@pytest.fixture(scope="module")
def trades_smallcnn(data_dir):
    """SmallCNN after one short TRADES run (beta 4) at eps 0.3: one pass over the first 4096 MNIST
    training images, batch 64, lr 0.05, against a KL attack that covers the ball (5 x 0.075 >= 0.3).
    Such a model resists small perturbations around a random start but not a strong attack: the case
    the PGD vs AutoAttack check exists for. Cost: 15 s (28 s of CPU time) on 2 lightly loaded cores;
    up to a few minutes when the cores are shared with other jobs."""
    torch.manual_seed(0)
    train = loaders.load_arrays("mnist", "train", data_dir, limit=TRAIN_IMAGES)
    x = torch.from_numpy(train.images.copy()).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(train.labels.copy()).long()
    model = create_model("smallcnn", dataset="mnist")
    opt = torch.optim.SGD(model.parameters(), lr=TRAIN_LR, momentum=0.9)
    method = TRADES(beta=4.0)
    perm = torch.randperm(len(y))
    for i in range(0, len(y), TRAIN_BATCH):
        xb, yb = x[perm[i:i + TRAIN_BATCH]], y[perm[i:i + TRAIN_BATCH]]
        with eval_mode(model):
            x_adv = pgd_perturb(model, xb, yb, eps=MNIST_EPS, step_size=TRAIN_STEP, steps=TRAIN_STEPS, norm="linf",
                                objective=method.objective,
                                start=random_start(xb, MNIST_EPS, "linf", method.random_start)).x_adv
        model.train()
        loss = method.loss(model, xb, yb, AdvBatch(x_adv), backend="reference").loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_paper_mnist_pgd_is_too_weak_and_flagged(trades_smallcnn, mnist_test):
    """The paper's MNIST PGD-20 with step 0.01 cannot leave a 0.2 radius of its random start inside the
    0.3 ball: warned up front, and AutoAttack on the same points exposes the robustness it overstates.

    It runs on a briefly TRADES-trained SmallCNN, no longer on the clean-trained one. Against a clean
    model even the weak PGD leaves only a few percent, so whether the gap cleared the check's 5 points
    depended on float32 rounding: on an AVX2 machine PGD RA was 2% against AutoAttack's 0%, the check
    passed and this test failed. The TRADES model keeps 41-53% RA under the weak PGD while AutoAttack
    leaves 0-4% (training seeds 0-3; the AVX-512, AVX2 and SSE4.1 runs of this test fall in that range):
    a gap of 40 to 50 points, far above the check's threshold (5 points, or two standard errors: about
    10 points at 100 points and 50% RA) and above the 20 points asserted here, which rounding cannot close.
    AutoAttack runs its two APGD attacks only: FAB-T and Square, the rest of the standard version, spend
    minutes on the points APGD leaves, and could only lower AutoAttack's RA, widening the gap further."""
    cfg = EvalConfig(dataset="mnist", eps=MNIST_EPS, pgd_step_size=PAPER_MNIST_PGD_STEP, num_samples=100,
                     aa_samples=100, sweep_samples=0, batch_size=100, attacks=("pgd", "autoattack"),
                     aa_version="custom", aa_attacks=("apgd-ce", "apgd-t"))
    with pytest.warns(UserWarning, match="cannot cover its ball"):
        r = evaluate(trades_smallcnn, mnist_test.images, mnist_test.labels, cfg, progress=False)
    print(f"NA {r.na:.3f}, RA {r.ra}", *(c.line() for c in r.checks), sep="\n")
    assert any("cannot cover its ball" in w for w in r.warnings)
    (gap,) = [c for c in r.checks if c.name == "PGD vs AutoAttack"]
    assert not gap.passed and "overstates robustness" in gap.detail
    assert r.ra["pgd"] > r.ra["autoattack"]
    assert r.ra["pgd"] - r.ra["autoattack"] > 0.20, gap.detail  # far from the check's threshold, on any CPU


def test_clean_model_numbers_are_consistent(result):
    """The clean-trained SmallCNN at eps 0.3 against a PGD that covers its ball: NA far above 80% and
    every attack near 0% RA, so each check holds by a wide margin on any CPU (the margins are printed)."""
    print(f"NA {result.na:.3f}, RA {result.ra}", *(c.line() for c in result.checks), sep="\n")
    assert result.na > 0.8   # 94-97% measured across instruction sets (conftest.trained_smallcnn)
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
    cfg = EvalConfig(dataset="mnist", eps=MNIST_EPS, num_samples=100, attacks=("fgsm", "pgd"), sweep_samples=50,
                     batch_size=100, pgd_steps=30, pgd_step_size=PAPER_MNIST_PGD_STEP)
    r = evaluate(masked, mnist_test.images, mnist_test.labels, cfg, progress=False)
    print(f"NA {r.na:.3f}, RA {r.ra}", *(c.line() for c in r.checks), sep="\n")
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
    cfg = EvalConfig(dataset="mnist", eps=MNIST_EPS, pgd_step_size=PAPER_MNIST_PGD_STEP).resolved()
    r = EvalResult(config=dict(cfg.__dict__), n=10, na=0.5, ra={"pgd": 0.6},
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


def test_images_become_float_nchw_without_aliasing_read_only_arrays(mnist_test):
    from fastrobust.evaluate import as_float_images
    images = mnist_test.images[:4]                       # uint8 NHWC, read-only
    t = as_float_images(images)
    assert t.shape == (4, 1, 28, 28) and t.dtype == torch.float32
    assert torch.equal(t, torch.from_numpy(images.copy()).permute(0, 3, 1, 2).float() / 255)
    floats = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    floats.flags.writeable = False
    f = as_float_images(floats)
    assert torch.equal(f, torch.from_numpy(floats.copy()))
    assert not np.shares_memory(f.numpy(), floats)       # writing to f must not touch read-only memory


def test_collapsed_model_is_flagged(mnist_test):
    class Constant(nn.Module):
        def forward(self, x):
            return torch.zeros(len(x), 10).index_fill_(1, torch.tensor([3]), 1.0) + 0 * x.flatten(1)[:, :1]

    cfg = EvalConfig(dataset="mnist", eps=MNIST_EPS, num_samples=50, attacks=("fgsm",), sweep_samples=0, batch_size=50)
    r = evaluate(Constant(), mnist_test.images, mnist_test.labels, cfg, progress=False)
    (check,) = [c for c in r.checks if c.name == "prediction diversity"]
    assert not check.passed and "class 3 takes 100.0%" in check.detail
    assert not r.all_passed
