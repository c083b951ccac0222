"""RobustBench zoo models through ``fastrobust eval --robustbench`` and ``--export-robustbench`` entries.

Offline: a zoo architecture (Wong2020Fast, a PreActResNet-18) with seeded random weights is saved where
RobustBench keeps a downloaded file, in a temporary folder, and evaluated on a few real CIFAR-10 test points
with cheap attacks; the CLI's outcome must be exactly what ``evaluate`` gives on the same module.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import loaders
from fastrobust import checkpoint as ck
from fastrobust import points as points_io
from fastrobust.cli import main as cli_main
from fastrobust.config import EvalConfig
from fastrobust.errors import ConfigError
from fastrobust.evaluate import evaluate

REPO = Path(__file__).resolve().parents[1]
NAME = "Wong2020Fast"   # cifar10 Linf: a PreActResNet-18 that registers its own normalisation (mu, sigma)
# a few points and cheap attacks: the tests are about loading and the files, not about the numbers
EVAL = {"eps": 8 / 255, "num_samples": 8, "batch_size": 4, "pgd_steps": 2, "sweep_samples": 4,
        "sweep_multipliers": (0.0, 1.0), "aa_samples": 4, "aa_version": "custom", "aa_attacks": ("apgd-ce",)}
FLAGS = ["--eps", "8/255", "--num-samples", "8", "--batch-size", "4", "--pgd-steps", "2", "--sweep-samples", "4",
         "--sweep-multipliers", "0,1", "--aa-samples", "4", "--aa-version", "custom", "--aa-attacks", "apgd-ce",
         "--no-progress"]


def _registry():
    from fastrobust import zoo
    try:
        return zoo.registry()
    except ConfigError as e:
        pytest.skip(f"robustbench is not importable here: {e}")


def _cli(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(argv)
    return code, out.getvalue(), err.getvalue()


def _error_line(argv) -> str:
    code, _, err = _cli(argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("fastrobust: error: "), (code, err)
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def zoo_model(tmp_path_factory):
    """The architecture from RobustBench's registry with seeded weights, and its weight file in RobustBench's
    layout: under 'state_dict', with DataParallel's 'module.' prefix, without the normalisation buffers."""
    model_dicts, BenchmarkDataset, ThreatModel = _registry()
    torch.manual_seed(0)
    module = model_dicts[BenchmarkDataset("cifar10")][ThreatModel("Linf")][NAME]["model"]().eval()
    root = tmp_path_factory.mktemp("robustbench") / "models"
    path = root / "cifar10" / "Linf" / f"{NAME}.pt"
    state = {f"module.{k}": v for k, v in module.state_dict().items() if k not in ("mu", "sigma")}
    ck.atomic_save({"state_dict": state, "epoch": 1}, path)
    return module, root, path


@pytest.fixture(scope="module")
def cli_eval(zoo_model, tmp_path_factory):
    _, root, _ = zoo_model
    out = tmp_path_factory.mktemp("eval")
    code, stdout, err = _cli(["eval", "--robustbench", NAME, "--robustbench-dir", str(root), "--dataset", "cifar10",
                              "--data-dir", str(os.environ.get("FASTROBUST_DATA") or REPO.parent / "shared" / "data"),
                              "--out", str(out / "eval"), "--export-robustbench", str(out / "entry.json"), *FLAGS])
    assert code == 0, err
    return out, stdout


def test_cli_matches_evaluate_on_the_same_module(zoo_model, cli_eval, data_dir):
    module, _, path = zoo_model
    out, stdout = cli_eval
    assert f"{NAME} (RobustBench cifar10 Linf)" in stdout and "AutoAttack" in stdout
    data = loaders.load_arrays("cifar10", "test", data_dir)
    cfg = EvalConfig(dataset="cifar10", **EVAL)
    direct = evaluate(module, data.images, data.labels, cfg, "cpu", progress=False)
    (saved,) = json.loads((out / "eval" / "results.json").read_text()).values()
    assert saved["n"] == direct.n == 8 and saved["na"] == direct.na and saved["ra"] == direct.ra
    assert set(saved["ra"]) == {"fgsm", "pgd", "autoattack"} and saved["n_attacked"] == direct.n_attacked
    assert [(c["name"], c["passed"]) for c in saved["checks"]] == [(c.name, c.passed) for c in direct.checks]
    points = points_io.load(out / "eval")
    assert np.array_equal(points.natural, direct.points.natural) and np.array_equal(points.label, direct.points.label)
    assert set(points.attacks) == set(direct.points.attacks)
    assert all(np.array_equal(points.attacks[a], direct.points.attacks[a]) for a in points.attacks)
    man = json.loads((out / "eval" / "eval_manifest.json").read_text())
    assert man["robustbench"] == {"model": NAME, "dataset": "cifar10", "threat_model": "Linf", "weights": str(path),
                                  "weights_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def test_export_reads_back_as_robustbench_model_info(cli_eval):
    from robustbench.utils import ModelInfo
    out, _ = cli_eval
    entry = json.loads((out / "entry.json").read_text())
    info = ModelInfo(**{f.name: entry[f.name] for f in dataclasses.fields(ModelInfo) if f.name in entry})
    (saved,) = json.loads((out / "eval" / "results.json").read_text()).values()
    assert info.dataset == "cifar10" and info.eps == "8/255"
    assert info.clean_acc == str(round(100 * saved["na"], 2))
    assert info.autoattack_acc == str(round(100 * saved["ra"]["autoattack"], 2))
    assert info.authors == info.venue == info.link == "" and info.reported is None
    extra = entry["fastrobust"]
    assert extra["threat_model"] == "Linf" and extra["eps"] == saved["config"]["eps"]
    assert extra["n"] == saved["n"] and extra["autoattack_n"] == saved["n_attacked"]["autoattack"] == 4
    assert [(c["name"], c["passed"]) for c in extra["checks"]] == [(c["name"], c["passed"]) for c in saved["checks"]]
    assert extra["all_checks_passed"] == saved["all_checks_passed"] and extra["robustbench_model"] == NAME
    assert Path(extra["points"]) == (out / "eval" / "points.npz").resolve() and Path(extra["points"]).is_file()


@pytest.mark.parametrize("flags", [["--attacks", "fgsm,pgd"], ["--aa-samples", "0"]])
def test_export_without_autoattack_fails_before_anything_runs(flags, tmp_path):
    line = _error_line(["eval", "--robustbench", NAME, "--robustbench-dir", str(tmp_path / "none"), "--eps", "8/255",
                        "--export-robustbench", str(tmp_path / "entry.json"), *flags])
    assert "--export-robustbench" in line and "autoattack" in line and "--aa-samples" in line
    assert not (tmp_path / "entry.json").exists() and not (tmp_path / "none").exists()


def test_missing_weights_name_the_file_and_never_connect(tmp_path, monkeypatch):
    _registry()
    tried = []

    def no_network(*args, **kwargs):
        tried.append(args)
        raise OSError("network disabled in this test")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    line = _error_line(["eval", "--robustbench", NAME, "--robustbench-dir", str(tmp_path), "--eps", "8/255"])
    assert str(tmp_path / "cifar10" / "Linf" / f"{NAME}.pt") in line and "load_model(" in line and not tried


def test_unknown_unsupported_and_conflicting_models(tmp_path):
    _registry()
    assert "Did you mean 'Wong2020Fast'" in _error_line(["eval", "--robustbench", "Wong2020Fsat", "--eps", "8/255"])
    assert "--norm linf" in _error_line(["eval", "--robustbench", NAME, "--norm", "l2", "--eps", "0.5"])
    assert "not supported" in _error_line(["eval", "--robustbench", "Chen2020Adversarial", "--eps", "8/255"])
    line = _error_line(["eval", "--robustbench", NAME, "--checkpoint", str(tmp_path / "x.pt"), "--eps", "8/255"])
    assert "drop --checkpoint" in line
    assert "--robustbench NAME" in _error_line(["eval", "--eps", "8/255"])


def test_damaged_weight_file_is_a_checkpoint_error(tmp_path):
    _registry()
    path = tmp_path / "cifar10" / "Linf" / f"{NAME}.pt"
    path.parent.mkdir(parents=True)
    path.write_text("not weights")
    line = _error_line(["eval", "--robustbench", NAME, "--robustbench-dir", str(tmp_path), "--eps", "8/255"])
    assert str(path) in line and "cannot be loaded" in line


def test_without_robustbench_a_hint_and_checkpoints_still_evaluate(tmp_path, data_dir):
    """With robustbench unimportable: --robustbench is one line with the install hint, and a fastrobust
    checkpoint is evaluated, and exported as a RobustBench entry, as before (only --robustbench imports it)."""
    from fastrobust.models import create_model
    model = create_model("smallcnn", dataset="mnist")
    path = ck.atomic_save({"format": ck.FORMAT, "spec": model.spec.to_dict(), "model": model.state_dict(),
                           "config": {"dataset": "mnist", "eps": 0.3}}, tmp_path / "final.pt")
    script = ("import sys; sys.modules['robustbench'] = None\n"
              "from fastrobust.cli import main\n"
              f"print('rb', main(['eval', '--robustbench', '{NAME}', '--eps', '8/255']), flush=True)\n"
              f"print('ck', main(['eval', '--checkpoint', r'{path}', '--data-dir', r'{data_dir}', '--num-samples', '4',"
              f" '--attacks', 'fgsm,autoattack', '--aa-samples', '2', '--aa-version', 'custom',"
              f" '--aa-attacks', 'apgd-ce',"
              f" '--sweep-samples', '0', '--no-progress', '--out', r'{tmp_path / 'ev'}',"
              f" '--export-robustbench', r'{tmp_path / 'entry.json'}']))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "rb 2" in proc.stdout and "ck 0" in proc.stdout, (proc.stdout, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fastrobust: error:")]
    assert len(errors) == 1 and "pip install 'fastrobust[robustbench]'" in errors[0] and "Traceback" not in proc.stderr
    (saved,) = json.loads((tmp_path / "ev" / "results.json").read_text()).values()
    entry = json.loads((tmp_path / "entry.json").read_text())
    assert entry["dataset"] == "mnist" and entry["eps"] == "0.3" and entry["fastrobust"]["threat_model"] == "Linf"
    assert entry["autoattack_acc"] == str(round(100 * saved["ra"]["autoattack"], 2))
    assert entry["architecture"] == "smallcnn"


def test_an_architecture_that_downloads_is_refused_offline(zoo_model, monkeypatch):
    """A zoo constructor that fetches weights (timm's pretrained=True) meets a refused connection: one line."""
    model_dicts, BenchmarkDataset, ThreatModel = _registry()
    attempts = []

    def downloading_constructor():
        attempts.append(1)
        socket.create_connection(("drive.google.com", 443), timeout=5)
    entry = model_dicts[BenchmarkDataset("cifar10")][ThreatModel("Linf")][NAME]
    monkeypatch.setitem(entry, "model", downloading_constructor)
    line = _error_line(["eval", "--robustbench", NAME, "--robustbench-dir", str(zoo_model[1]), "--eps", "8/255"])
    assert attempts and "cannot be built offline" in line and "does not download" in line
