"""Input checked before the work: the radius against the data's range, output paths before anything is
loaded, output into a pipe that closes early, and fp16 overflow storms stopped like NaN storms.

Where the behaviour is a process's (exit status, what reaches stderr, a pipe), the tests run
``python -m fastrobust`` / ``python -m recipes...`` as subprocesses on real MNIST and assert the status,
that no traceback is printed, and, for a refused command, that an existing good run folder is byte for
byte unchanged (the sha256 of every file before and after). Everything trains a few steps of SmallCNN.
"""
import hashlib
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import recipes
from fastrobust import checkpoint as ck
from conftest import parse_train_config, train_config
from fastrobust.cli import BROKEN_PIPE_EXIT, exit_quietly_on_broken_pipe
from fastrobust.config import EvalConfig, TrainConfig
from fastrobust.errors import ConfigError, NumericalError
from fastrobust.evaluate import evaluate, sweep_checks
from fastrobust.methods import TRADES, Standard
from fastrobust.models import create_model
from fastrobust.report import check_output_file, check_output_folder
from fastrobust.step import GRAD_SCALER_INIT_SCALE, MAX_CALIBRATION_SKIPS, TrainStep
from fastrobust.train import Trainer, train, weight_norm
from recipes import paper_tables
from conftest import InfGradient

REPO = Path(__file__).resolve().parents[1]
# a run of 4 steps of 64 images, 64 held out, a final evaluation on 64 test points
SMALL_RUN = ["--dataset", "mnist", "--model", "smallcnn", "--epochs", "1", "--train-limit", "256", "--val-samples",
             "64", "--eval-num-samples", "64", "--eval-aa-samples", "0", "--eval-sweep-samples", "32",
             "--eval-pgd-steps", "3", "--no-progress", "--eps", "0.3"]
SMALL_EVAL = ["--num-samples", "64", "--aa-samples", "0", "--sweep-samples", "32", "--pgd-steps", "3", "--no-progress"]


def python(args, data_dir, cwd, stdout=subprocess.PIPE, timeout=180) -> subprocess.CompletedProcess:
    env = dict(os.environ, FASTROBUST_DATA=str(data_dir),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, stdout=stdout, stderr=subprocess.PIPE,
                          text=True, timeout=timeout)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one-line error of a refused command: status 2, no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def tree_sha256(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, data_dir) -> Path:
    """A finished run folder (2 TRADES steps, a final evaluation) that refused commands must not touch."""
    out = tmp_path_factory.mktemp("good") / "run"
    cfg = train_config(dataset="mnist", model="smallcnn", method=TRADES(), epochs=1, lr=0.01, lr_schedule="constant",
                      eps=0.3, attack_steps=1, attack_step_size=0.3, train_limit=128, batch_size=64, val_samples=32,
                      out_dir=str(out), progress=False, data_dir=str(data_dir))
    cfg.eval = EvalConfig(dataset="mnist", eps=0.3, num_samples=32, aa_samples=0, sweep_samples=0, pgd_steps=2,
                          attacks=("pgd",), batch_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg)
    return out


# -- 5. the radius against the data's range ---------------------------------------------------------

@pytest.mark.parametrize("eps,hint", [(8, "8/255 = 0.03137"), (16, "16/255 = 0.06275"), (255, "255/255 = 1"),
                                      (1e6, None), (1.5, None), (256, None)])
def test_linf_radius_above_the_input_range_is_refused_everywhere(tmp_path, eps, hint):
    """One rule for the training radius, the evaluation's, an evaluation on its own and a recipe's
    override; a whole number from 2 to 255 is read as pixel levels and the fraction suggested."""
    def refused(make, what):
        with pytest.raises(ConfigError, match=re.escape(f"{what} = {eps:g} (linf) is above the input range")) as e:
            make()
        assert (hint in str(e.value)) if hint else ("Did you mean" not in str(e.value))

    refused(lambda: train_config(dataset="mnist", model="smallcnn", eps=eps).validate(), "eps")
    refused(lambda: train_config(dataset="mnist", model="smallcnn", eps=0.3, eval=EvalConfig(eps=eps)).validate(),
            "eval eps")
    refused(lambda: EvalConfig(dataset="mnist", eps=eps).validate(), "eval eps")
    refused(lambda: EvalConfig(dataset="mnist").resolved(train_eps=eps),
            "eval eps (the training radius, the evaluation's default)")
    refused(lambda: recipes.make_config("mnist", "at", "smallcnn", "cpu", tmp_path, {"eps": eps}), "eps")


def test_radii_up_to_the_range_are_accepted_and_l2_is_bounded_by_the_diagonal():
    assert EvalConfig(dataset="mnist", eps=1.0).resolved().eps == 1.0          # the whole range is a radius
    assert train_config(dataset="mnist", model="smallcnn", eps=1.0).validate().attack.eps == 1.0
    assert parse_train_config(["--dataset", "mnist", "--model", "smallcnn", "--eps", "8/255"]).attack.eps == 8 / 255
    # L2: the diagonal of the [0, 1] box, sqrt(C H W): 28 for MNIST, sqrt(3072) = 55.43 for CIFAR-10
    assert EvalConfig(dataset="mnist", norm="l2", eps=28.0).resolved().eps == 28.0
    with pytest.raises(ConfigError, match=r"eval eps = 28.5 \(l2\) is above the diagonal of the \[0, 1\] box of mnist "
                                          r"images, 28"):
        EvalConfig(dataset="mnist", norm="l2", eps=28.5).resolved()
    assert EvalConfig(dataset="cifar10", norm="l2", eps=55.0).resolved().eps == 55.0
    with pytest.raises(ConfigError, match=r"55.43"):
        train_config(dataset="cifar10", norm="l2", eps=56.0, attack_step_size=20.0,
                    eval=EvalConfig(norm="l2", eps=0.5)).validate()
    # an evaluation that takes an L2 training radius in its own (L-inf) norm says which flag fixes it
    with pytest.raises(ConfigError, match=r"training radius 2 \(l2\) by default, but in its own norm, linf, .* pass "
                                          r"--eval-norm l2"):
        train_config(dataset="mnist", model="smallcnn", norm="l2", eps=2.0, attack_step_size=1.0).validate()
    cfg = train_config(dataset="mnist", model="smallcnn", norm="l2", eps=2.0, attack_step_size=1.0,
                      eval=EvalConfig(norm="l2")).validate()
    assert cfg.eval.resolved(cfg.attack.eps).eps == 2.0


def test_a_pixel_level_radius_is_refused_before_touching_a_run(good_run, data_dir, tmp_path):
    before = tree_sha256(good_run)
    train8 = python(["-m", "fastrobust", "train", *SMALL_RUN, "--eps", "8", "--out-dir", str(good_run)], data_dir,
                    tmp_path)
    assert "Did you mean 8/255 = 0.03137?" in error_line(train8)
    # the evaluation's default folder is the run's eval/: nothing may appear there either
    eval8 = python(["-m", "fastrobust", "eval", "--checkpoint", str(good_run / "checkpoints" / "final.pt"),
                    *SMALL_EVAL, "--eps", "8"], data_dir, tmp_path)
    assert "eval eps = 8 (linf) is above the input range" in error_line(eval8)
    assert not train8.stdout and not eval8.stdout
    assert tree_sha256(good_run) == before


def test_the_whole_box_radius_evaluates_and_its_headline_joins_the_monotone_check(small_model, mnist_test):
    """eps = 1 equals the range: allowed, and the sweep's whole-box point (PGD built directly) still runs."""
    cfg = EvalConfig(dataset="mnist", eps=1.0, num_samples=32, aa_samples=0, sweep_samples=32, attacks=("pgd",),
                     pgd_steps=5, batch_size=32, sweep_multipliers=(0.0, 0.5, 1.0))
    r = evaluate(small_model, mnist_test.images, mnist_test.labels, cfg, progress=False)
    assert [p["eps"] for p in r.sweep] == [0.0, 0.5, 1.0]
    checks = {c.name: c for c in r.checks}
    assert "1 (PGD-5, the evaluation): " in checks["monotone in eps"].detail
    assert checks["large eps"].detail.startswith(f"PGD RA {100 * r.sweep[-1]['ra']:.2f}% at eps 1 (the whole box")


SWEEP = [{"eps": 0.0, "ra": 0.9}, {"eps": 0.15, "ra": 0.5}, {"eps": 0.3, "ra": 0.2}, {"eps": 1.0, "ra": 0.0}]


def _monotone(headline, m=200):
    return {c.name: c for c in sweep_checks(SWEEP, 0.9, m, headline)}["monotone in eps"]


def test_monotone_check_includes_the_headline_pgd_ra():
    """The headline RA at the evaluation's radius is a point of the curve: above the sweep's RA at a
    smaller radius, or above the sweep's own run at the same radius (the whole box included), beyond two
    standard errors, the check fails, naming the rise. Within two standard errors it passes."""
    assert _monotone(None).passed and _monotone(None).detail == "RA by eps: 0: 90.0%, 0.15: 50.0%, 0.3: 20.0%, 1: 0.0%"
    consistent = _monotone({"eps": 0.3, "ra": 0.22, "label": "PGD-20"})
    assert consistent.passed, consistent.detail
    assert "0.3: 20.0%, 0.3 (PGD-20, the evaluation): 22.0%, 1: 0.0%" in consistent.detail
    above_smaller = _monotone({"eps": 0.3, "ra": 0.6, "label": "PGD-20"})
    assert not above_smaller.passed
    assert "from 50.0% at eps 0.15 to 60.0% at eps 0.3" in above_smaller.detail
    # the reported case: PGD-20 RA 18% at the whole box while the sweep's own run there gives 0%
    at_the_box = _monotone({"eps": 1.0, "ra": 0.18, "label": "PGD-20"})
    assert not at_the_box.passed and "from 0.0% at eps 1 to 18.0% at eps 1" in at_the_box.detail
    # the tolerance: two binomial standard errors of the RA it is compared with, on 200 points
    tol_05, tol_02 = 2 * math.sqrt(0.5 * 0.5 / 200), 2 * math.sqrt(0.2 * 0.8 / 200)   # 7.07% and 5.66%
    assert _monotone({"eps": 0.2, "ra": 0.5 + tol_05 - 0.002, "label": "PGD-20"}).passed
    assert not _monotone({"eps": 0.2, "ra": 0.5 + tol_05 + 0.002, "label": "PGD-20"}).passed
    assert _monotone({"eps": 0.3, "ra": 0.2 + tol_02 - 0.002, "label": "PGD-20"}).passed
    assert not _monotone({"eps": 0.3, "ra": 0.2 + tol_02 + 0.002, "label": "PGD-20"}).passed


# -- 6. output paths, checked before the work ------------------------------------------------------

def test_output_folders_are_created_or_refused_with_the_reason(tmp_path):
    assert check_output_folder(tmp_path / "a" / "b", "--out").is_dir()
    (tmp_path / "file").write_text("keep")
    with pytest.raises(ConfigError, match=r"--out .*file is an existing file, not a folder"):
        check_output_folder(tmp_path / "file", "--out")
    with pytest.raises(ConfigError, match=r"--out .*file/sub cannot be created or written to \(.*file is a file, not "
                                          r"a folder\)"):
        check_output_folder(tmp_path / "file" / "sub", "--out")
    with pytest.raises(ConfigError, match=r"--out .* is an existing folder; pass the path of a file"):
        check_output_file(tmp_path, "--out")
    assert (tmp_path / "file").read_text() == "keep" and not list(tmp_path.glob("**/.write-test-*"))


@pytest.mark.parametrize("where", ["existing file", "under a file"])
def test_eval_out_is_checked_before_the_model_is_loaded(good_run, data_dir, tmp_path, where):
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    out = blocker if where == "existing file" else blocker / "sub"
    before = tree_sha256(good_run)
    proc = python(["-m", "fastrobust", "eval", "--checkpoint", str(good_run / "checkpoints" / "final.pt"),
                   *SMALL_EVAL, "--out", str(out)], data_dir, tmp_path)
    assert str(out) in error_line(proc) and not proc.stdout          # no evaluation ran, no table printed
    assert blocker.read_text() == "not a folder" and tree_sha256(good_run) == before


def test_train_and_recipe_output_folders_are_checked_first(data_dir, tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("x")
    run = python(["-m", "fastrobust", "train", *SMALL_RUN, "--out-dir", str(blocker)], data_dir, tmp_path)
    assert "run folder (--out-dir)" in error_line(run)
    recipe = python(["-m", "recipes.mnist_at_smallcnn", "--profile", "cpu", "--runs", str(blocker), "--set",
                     "epochs=1", "train_limit=256"], data_dir, tmp_path)
    assert f"--runs {blocker} is an existing file" in error_line(recipe)
    assert blocker.read_text() == "x"


def test_paper_tables_outputs_are_checked_first(data_dir, tmp_path, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("x")
    runs = ["--profile", "cpu", "--runs", str(tmp_path / "runs")]
    proc = python(["-m", "recipes.paper_tables", *runs, "--out", str(blocker / "tables.md")], data_dir, tmp_path)
    assert "is an existing file, not a folder" in error_line(proc) and not proc.stdout
    for argv, message in [(["--out", str(tmp_path)], "is an existing folder"),
                          (["--emit-jobs", str(blocker)], f"--emit-jobs {blocker} is an existing file"),
                          (["--run-missing", "--runs", str(blocker)], f"{blocker} is an existing file")]:
        assert paper_tables.main(runs + argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert blocker.read_text() == "x"


def _into_closed_pipe(args, data_dir, cwd) -> subprocess.CompletedProcess:
    """Run with stdout a pipe whose reading end is already closed: the first write fails."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return python(args, data_dir, cwd, stdout=write_end)
    finally:
        os.close(write_end)


@pytest.mark.parametrize("args", [["-m", "recipes"], ["-m", "fastrobust", "train", "--dry-run", *SMALL_RUN],
                                  ["-m", "recipes.paper_tables", "--profile", "cpu", "--runs", "runs"],
                                  ["-m", "fastrobust", "--help"]],
                         ids=["recipes listing", "train dry-run", "paper_tables", "fastrobust help"])
def test_output_into_a_closed_pipe_ends_quietly(data_dir, tmp_path, args):
    """141 (128 + SIGPIPE) where the command's own output met the closed pipe; argparse's --help already
    drops a failed write itself (status 0). Never a traceback or an 'Exception ignored' notice."""
    proc = _into_closed_pipe(args, data_dir, tmp_path)
    assert proc.stderr == "" and proc.returncode in (BROKEN_PIPE_EXIT, 0)
    if "--help" not in args:
        assert proc.returncode == BROKEN_PIPE_EXIT


def test_a_listing_piped_into_head_prints_no_traceback(data_dir, tmp_path):
    proc = subprocess.run(["bash", "-c", f"set -o pipefail; {sys.executable} -m recipes | head -1"], cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=60)
    assert proc.stdout.startswith("python -m recipes.") and proc.stdout.count("\n") == 1
    assert proc.stderr == "" and proc.returncode in (0, BROKEN_PIPE_EXIT)


def test_a_broken_pipe_other_than_stdout_is_not_hidden(tmp_path, monkeypatch):
    with open(tmp_path / "stdout.txt", "w") as f:
        monkeypatch.setattr(sys, "stdout", f)

        def fails() -> int:
            raise BrokenPipeError("a socket's peer went away")

        with pytest.raises(BrokenPipeError, match="socket"):
            exit_quietly_on_broken_pipe(fails)


# -- 7. fp16 storms stop like NaN storms ----------------------------------------------------------

# SMALL_RUN with 128 training images and 32 held out (later flags win)
STORM = ["-m", "fastrobust", "train", *SMALL_RUN, "--method", "standard", "--lr", "1e4", "--train-limit", "128",
         "--val-samples", "32"]


def test_an_fp16_overflow_storm_stops_the_run(data_dir, tmp_path):
    """--lr 1e4: step 0 is applied at loss scale 65536 and blows the weights up; every later step
    overflows. Those are not calibration (a step worked at that scale), so five of them stop the run,
    exit 2, with fp16 advice, and no checkpoint of the blown-up weights is named good."""
    out = tmp_path / "run"
    proc = python([*STORM, "--amp", "fp16", "--batch-size", "16", "--out-dir", str(out)], data_dir, tmp_path)
    line = error_line(proc)
    assert "5 consecutive bad steps (fp16 gradients overflowed at loss scale 4096" in line
    assert "a step was applied at loss scale 65536, so the gradients have grown" in line
    assert "no checkpoint holds weights from before they blew up" in line and "the last finite loss was" in line
    assert "--amp bf16" in line and "--amp off" in line and "--lr, now 10000" in line
    assert "still calibrating" not in proc.stderr
    assert not (out / "checkpoints" / "final.pt").exists() and not (out / "results.json").exists()


def test_a_run_ending_in_an_fp16_storm_over_blown_up_weights_fails(data_dir, tmp_path):
    """4 steps: step 0 blows the weights up, steps 1-3 overflow; max_bad_steps (5) is never reached, but the
    run must not end with exit 0, a final.pt and a final evaluation of those weights."""
    out = tmp_path / "run"
    proc = python([*STORM, "--amp", "fp16", "--batch-size", "32", "--out-dir", str(out)], data_dir, tmp_path)
    assert "training ended in 3 consecutive bad steps (fp16 gradients overflowed" in error_line(proc)
    assert not (out / "checkpoints" / "final.pt").exists() and not (out / "results.json").exists()


def test_an_fp32_nan_storm_gets_advice_without_amp(data_dir, tmp_path):
    proc = python([*STORM, "--amp", "off", "--batch-size", "16", "--out-dir", str(tmp_path / "run")], data_dir,
                  tmp_path)
    line = error_line(proc)
    assert "5 consecutive bad steps (loss is nan)" in line and "--lr, now 10000; e.g. 1000" in line
    assert "--amp" not in line and "bf16" not in line and "fp16" not in line


def test_the_last_good_state_is_the_newest_checkpoint_saved_before_the_blow_up(tmp_path, data_dir, monkeypatch):
    """Two epochs of two steps; the first step of epoch 2 multiplies the weights by 1000 (finite, blown up)
    and has a NaN loss: the run stops (max_bad_steps 1) naming epoch 1's checkpoint, whose weights are
    those training started from give or take the updates, not the blown-up ones, which are not written."""
    cfg = train_config(dataset="mnist", model="smallcnn", method=Standard(), epochs=2, lr=0.01, lr_schedule="constant",
                      train_limit=64, batch_size=32, val_samples=32, eps=0.3, max_bad_steps=1, final_eval=False,
                      out_dir=str(tmp_path / "run"), progress=False, data_dir=str(data_dir))
    cfg.eval = EvalConfig(dataset="mnist", eps=0.3, num_samples=32, aa_samples=0, sweep_samples=0, attacks=("pgd",),
                          pgd_steps=2, batch_size=32)
    trainer = Trainer(cfg)
    original, calls = trainer.stepper.method.loss, []

    def blows_up(model, x, y, adv, **kw):
        calls.append(1)
        out = original(model, x, y, adv, **kw)
        if len(calls) == 3:
            with torch.no_grad():
                for p in trainer.model.parameters():
                    p.mul_(1000.0)
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer.stepper.method, "loss", blows_up)
    with warnings.catch_warnings(), pytest.raises(NumericalError) as err:
        warnings.simplefilter("ignore")
        trainer.fit()
    message = str(err.value)
    named = Path(re.search(r"the last good state is in (\S+\.pt)", message).group(1))
    assert named.name in ("step-00000002.pt", "best.pt") and "they blew up after it" in message
    assert f"--init-checkpoint {named}" in message
    saved = ck.load_checkpoint(named)
    assert saved["global_step"] == 2
    start = trainer.start_weight_norm
    assert math.isclose(weight_norm(saved["model"]), start, rel_tol=0.05)
    assert weight_norm(trainer.model.state_dict()) > 100 * start
    assert not (Path(cfg.out_dir) / "checkpoints" / "step-00000003.pt").exists()


def _overflow_every_step(step: TrainStep) -> None:
    """Make every later step of ``step`` overflow: the method's loss gets infinite gradients."""
    original = step.method.loss

    def loss(model, x, y, adv, **kw):
        out = original(model, x, y, adv, **kw)
        out.loss = InfGradient.apply(out.loss)
        return out
    step.method.loss = loss


def test_calibration_is_bounded_and_ends_once_a_scale_has_worked(mnist_test):
    """From a grown scale (2^20, as after a resume) overflows count as calibration only
    MAX_CALIBRATION_SKIPS (16 = log2 of the initial 2^16) times in a row; and once a step has been applied
    at a scale, an overflow at or below it is a bad step."""
    assert MAX_CALIBRATION_SKIPS == 16 and GRAD_SCALER_INIT_SCALE == 2.0 ** 16
    x = torch.from_numpy(mnist_test.images[:4].copy()).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(mnist_test.labels[:4].copy()).long()

    def stepper(overflowing: bool) -> TrainStep:
        torch.manual_seed(0)   # each its own config: the method object (whose loss is patched) is not shared
        cfg = train_config(dataset="mnist", model="smallcnn", method=Standard(), amp="fp16", device="cpu", lr=0.01,
                          eps=0.3).validate()
        step = TrainStep(cfg, create_model("smallcnn", dataset="mnist"), torch.device("cpu"))
        if overflowing:
            _overflow_every_step(step)
        return step

    grown = stepper(overflowing=True)
    grown.scaler.load_state_dict({"scale": 2.0 ** 20, "growth_factor": 2.0, "backoff_factor": 0.5,
                                  "growth_interval": 2000, "_growth_tracker": 0})
    results = [grown(x, y, step=i) for i in range(MAX_CALIBRATION_SKIPS + 1)]
    assert all(r.failure and r.calibrating for r in results[:-1])
    assert not results[-1].calibrating and "17 overflows in a row, more than calibration takes" in results[-1].failure
    assert "at loss scale 16 " in results[-1].failure

    worked = stepper(overflowing=False)
    assert worked(x, y, step=0).failure is None and worked.applied_scale == GRAD_SCALER_INIT_SCALE
    _overflow_every_step(worked)
    after = worked(x, y, step=1)
    assert not after.calibrating and "a step was applied at loss scale 65536, so the gradients have grown" in after.failure
