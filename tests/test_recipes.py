"""recipes: the learning rate of every epoch of every cell against the official code's schedule, the
cell modules, the rows every profile must have, the FAAL official fine-tune, and clean errors.

Schedules are pure Python float arithmetic (IEEE double, no vectorised kernels), so the comparisons
give the same result on every CPU; ``math.isclose`` with rel_tol 1e-12 only absorbs the difference
between multiplying by gamma k times and raising gamma to the k-th power."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import recipes
from fastrobust.config import lr_factor
from fastrobust.methods import AT, DTRADES, FAAL
from recipes.protocols import ARCHS, PROFILES

REPO = Path(__file__).resolve().parents[1]
CELLS = [(p, d, r, a) for p in PROFILES for d, r, a in PROFILES[p].cells]


def official_lr(base_lr: float, epoch: int, milestones, gamma: float) -> float:
    """The official TRADES/MART ``adjust_learning_rate``: epochs counted from 1, and for each milestone
    ``if epoch >= m: lr *= gamma``."""
    lr = base_lr
    for m in milestones:
        if epoch >= m:
            lr *= gamma
    return lr


def independent_lr(cfg, epoch: int, fraction: float = 0.0) -> float:
    """The learning rate in epoch ``epoch`` (from 1), ``fraction`` into it, by each schedule's definition."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "cosine":   # per step, from lr at the first step to 0 at the end of the last epoch
        return cfg.lr * (1 + math.cos(math.pi * (epoch - 1 + fraction) / cfg.epochs)) / 2
    return official_lr(cfg.lr, epoch, cfg.lr_milestones, cfg.lr_gamma)


def library_lr(cfg, epoch: int, fraction: float = 0.0) -> float:
    """What the trainer uses: lr x lr_factor(cfg, epoch counted from 0, fraction)."""
    return cfg.lr * lr_factor(cfg, epoch - 1, fraction)


def runs(values: list[float]) -> str:
    """'epochs 1-74: 0.1; 75-76: 0.01': every epoch's rate, consecutive equal ones together."""
    parts, start = [], 1
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[i - 1]:
            parts.append(f"{start}-{i}: {values[i - 1]:.6g}" if i > start else f"{start}: {values[i - 1]:.6g}")
            start = i + 1
    return "; ".join(parts)


def _config(profile, dataset, row, arch, tmp_path):
    return recipes.make_config(dataset, row, arch, profile, root=tmp_path)


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_epochs_learning_rate_matches_the_official_schedule(profile, tmp_path):
    print()
    for _, dataset, row, arch in [c for c in CELLS if c[0] == profile]:
        cfg = _config(profile, dataset, row, arch, tmp_path)
        mine = [library_lr(cfg, e) for e in range(1, cfg.epochs + 1)]
        print(f"{profile:9s} {dataset}_{row}_{arch}: {cfg.lr_schedule}, epochs {runs(mine)}")
        for e in range(1, cfg.epochs + 1):
            for fraction in (0.0, 0.5, 0.999):   # piecewise and constant: constant within an epoch
                assert math.isclose(library_lr(cfg, e, fraction), independent_lr(cfg, e, fraction), rel_tol=1e-12), \
                    (profile, dataset, row, arch, e, fraction)


def _epochs_at(profile, dataset, row, arch, tmp_path) -> list[float]:
    cfg = _config(profile, dataset, row, arch, tmp_path)
    return [library_lr(cfg, e) for e in range(1, cfg.epochs + 1)]


def _close(values, expected) -> bool:
    return len(values) == len(expected) and all(math.isclose(a, b, rel_tol=1e-12) for a, b in zip(values, expected))


@pytest.mark.parametrize("arch", ["resnet18", "vgg16", "preact_resnet18", "wrn34_10"])
def test_official_trades_cifar10_trains_74_epochs_at_0_1_then_2_at_0_01(arch, tmp_path):
    assert _close(_epochs_at("official", "cifar10", "trades", arch, tmp_path), [0.1] * 74 + [0.01] * 2)


@pytest.mark.parametrize("arch", ARCHS["cifar10"])
def test_paper_cifar10_100_epochs_decays_at_90_and_100(arch, tmp_path):
    for row in PROFILES["paper"].rows:
        lrs = _epochs_at("paper", "cifar10", row, arch, tmp_path)
        assert _close(lrs, [0.1] * 89 + [0.01] * 10 + [0.001]), (row, runs(lrs))   # 90-99 at 0.01, 100 at 0.001


def test_official_mnist_and_mart_schedules(tmp_path):
    for arch in ARCHS["mnist"]:   # TRADES MNIST: lr 0.01, x0.1 from 55, 75 and 90, 100 epochs
        assert _close(_epochs_at("official", "mnist", "trades", arch, tmp_path),
                      [0.01] * 54 + [1e-3] * 20 + [1e-4] * 15 + [1e-5] * 11)
    for arch in ARCHS["cifar10"]:   # MART train_resnet.py: lr 0.01, 120 epochs, x0.1 from 75, 90 and 100
        assert _close(_epochs_at("official", "cifar10", "mart", arch, tmp_path),
                      [0.01] * 74 + [1e-3] * 15 + [1e-4] * 10 + [1e-5] * 21)


def _faal_cells():
    return [(d, a) for d, r, a in PROFILES["official"].cells if r == "faal"]


def test_faal_official_fine_tunes_the_official_trades_checkpoint(tmp_path):
    """TrustAI/FAAL run_prn.py + ft_prn.py: a 2-epoch fine-tune of that architecture's TRADES model with
    the AT base loss, r 0.5, lr 0.01 then 0.001 (MultiStepLR at epoch 1 of 0..1), wd 5e-4, eps 8/255,
    step 2/255, 10 steps, the checkpoint with the best worst-class PGD accuracy kept."""
    cells = _faal_cells()
    assert {a for _, a in cells} >= {"preact_resnet18", "wrn34_10", "resnet18", "vgg16"}
    for dataset, arch in cells:
        cfg = _config("official", dataset, "faal", arch, tmp_path)
        assert cfg.method == FAAL(r=0.5, base="at", beta=cfg.method.beta) and cfg.method.base == "at"
        assert (cfg.epochs, cfg.weight_decay, cfg.attack.steps, cfg.select_by) == (2, 5e-4, 10, "worst_class_pgd_ra")
        assert math.isclose(cfg.attack.eps, 8 / 255) and math.isclose(cfg.attack.step_size, 2 / 255)
        assert _close([library_lr(cfg, e) for e in (1, 2)], [0.01, 0.001])
        # the same architecture's official TRADES run, which the official profile trains too
        assert (dataset, "trades", arch) in PROFILES["official"].cells
        trades = _config("official", dataset, "trades", arch, tmp_path)
        assert cfg.init_checkpoint == str(Path(trades.out_dir) / "checkpoints" / "final.pt")
        assert cfg.model == trades.model == arch and cfg.dataset == trades.dataset


# ----------------------------------------------------------------------------------- cell modules
def test_every_cell_module_resolves():
    import importlib
    import importlib.util
    cells = recipes.all_cells()
    assert set(cells) == {f"{d}_{r}_{a}" for p in PROFILES.values() for d, r, a in p.cells}
    for name, cell in cells.items():
        assert importlib.util.find_spec(f"recipes.{name}") is not None, name
        assert importlib.import_module(f"recipes.{name}").CELL == cell
    assert importlib.util.find_spec("recipes.cifar10_dtrades_resnet19") is None   # a name that is no cell


def _python(*args, timeout=120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_cell_module_help_and_the_list_of_cells():
    r = _python("-m", "recipes.cifar10_dtrades_resnet18", "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: python -m recipes.cifar10_dtrades_resnet18") and "--profile" in r.stdout
    listed = _python("-m", "recipes")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == len(recipes.all_cells())
    for name, cell in recipes.all_cells().items():
        (line,) = [ln for ln in lines if ln.split()[2] == f"recipes.{name}"]
        profiles = line.split("profiles: ")[1].split(", ")
        assert profiles == [p for p, prof in PROFILES.items() if cell in prof.cells], line


def test_ablation_rows_exist_for_every_dataset_and_architecture(tmp_path):
    """The paper's Tables 6.1/6.2: D-TRADES with alpha = beta = 0.5 beside alpha = beta = 1."""
    for dataset, archs in ARCHS.items():
        for arch in archs:
            half = _config("paper", dataset, "dtrades_half", arch, tmp_path).method
            full = _config("paper", dataset, "dtrades", arch, tmp_path).method
            assert half == DTRADES(alpha=0.5, beta=0.5, normalize="minmax", lambda_scale=1.0), (dataset, arch)
            assert full == DTRADES(alpha=1.0, beta=1.0, normalize="minmax", lambda_scale=1.0), (dataset, arch)


def test_at_has_a_recipe_for_every_dataset_and_architecture(tmp_path):
    """PGD-AT (new in the redesign) is a row wherever the paper's methods are: every dataset x arch
    cell of the paper profile and of every profile that trains that paper grid."""
    for profile in ("paper", "smoke"):
        for dataset, archs in ARCHS.items():
            for arch in archs:
                assert (dataset, "at", arch) in PROFILES[profile].cells, (profile, dataset, arch)
                cfg = _config(profile, dataset, "at", arch, tmp_path)
                assert cfg.method == AT() and cfg.method.objective == "ce" and cfg.method.random_start == "uniform"
    assert ("mnist", "at", "smallcnn") in PROFILES["cpu"].cells
    assert f"cifar10_at_vgg16" in recipes.all_cells()


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("argv,expected", [
    (["--set", "epochs"], "--set expects key=value"),
    (["--set", "epochz=2"], "unknown config key 'epochz'. Did you mean 'epochs'"),
    (["--set", "batch_size=-1"], "batch_size must be an integer >= 1, got -1"),
    (["--set", "eval={'attacks': ('pgdd',)}"], "unknown attack 'pgdd'"),
    (["--set", "method={'name': 'dtrades', 'sync': 'globl'}"], "unknown lambda sync mode 'globl'. Did you mean 'global'"),
    (["--set", "method=dtrade"], "unknown method 'dtrade'"),
])
def test_recipe_command_line_errors_are_clean(argv, expected, capsys):
    code = recipes.main("mnist", "dtrades", "smallcnn", ["--profile", "smoke", *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("python -m recipes.mnist_dtrades_smallcnn: error: ") and len(err.strip().splitlines()) == 1, err
    assert expected in err, err


def test_recipe_profile_without_the_cell_is_one_line(capsys):
    code = recipes.main("mnist", "dtrades", "smallcnn", ["--profile", "official"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "profile 'official' has no cell mnist_dtrades_smallcnn; profiles with it: cpu, cpu_eps03, demo, paper, smoke" in err


def test_recipe_malformed_flags_are_argparse_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        recipes.main("mnist", "dtrades", "smallcnn", ["--profile", "paperr"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: python -m recipes.mnist_dtrades_smallcnn") and "Traceback" not in err
