"""A run folder is a contract (fastrobust.run_folder): --resume continues only the run the folder holds,
a fresh run never silently replaces another, one process writes a folder, and a resumed history equals
an uninterrupted one. Real ``python -m fastrobust train`` processes wherever the behaviour is a
process's (exit status, the lock, a kill); every refusal exits with 2 and one line, no traceback, and
leaves every file of the folder byte-for-byte as it was."""
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from fastrobust import checkpoint as ck
from fastrobust import run_folder, tensorboard_log
from fastrobust.config import EvalConfig, TrainConfig
from fastrobust.errors import ConfigError, TrainingInterrupted
from fastrobust.methods import DTRADES, MART, TRADES
from fastrobust.train import Trainer, train
from conftest import train_config

REPO = Path(__file__).resolve().parents[1]
# 2 epochs of 4 TRADES steps (64 images, one attack step), a 32-image validation, a tiny final evaluation
TINY = ["--dataset", "mnist", "--model", "smallcnn", "--method", "trades", "--epochs", "2", "--lr", "0.01",
        "--lr-schedule", "constant", "--eps", "0.3", "--attack-steps", "1", "--attack-step-size", "0.3",
        "--train-limit", "256", "--batch-size", "64", "--val-samples", "32", "--log-every", "1", "--no-progress",
        "--eval-num-samples", "32", "--eval-aa-samples", "0", "--eval-sweep-samples", "0", "--eval-attacks", "pgd",
        "--eval-pgd-steps", "2", "--eval-batch-size", "32"]
# the fields of a log record that time the run rather than describe it
TIMING = {"epoch_seconds", "img_per_s", "ms_per_step", "attack_ms", "update_ms", "attack_share", "peak_memory_mb",
          "steps_timed", "device"}


def _env():
    # one thread per process: these processes share a small machine, and every run compared bit for
    # bit runs with the same thread count
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


def _train(out, data_dir, *extra, args=TINY):
    return [sys.executable, "-m", "fastrobust", "train", *args, "--data-dir", str(data_dir), "--out-dir", str(out),
            *extra]


def _run(out, data_dir, *extra, args=TINY) -> subprocess.CompletedProcess:
    return subprocess.run(_train(out, data_dir, *extra, args=args), env=_env(), cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def _refused(done: subprocess.CompletedProcess) -> str:
    """The one error line of a process that exited with status 2."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "Traceback" not in done.stderr, (done.returncode, done.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("fastrobust: error: "), done.stderr
    return lines[0]


def _hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (hidden ones included), by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def _untimed(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = ck.load_checkpoint(a)["model"], ck.load_checkpoint(b)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir) -> Path:
    """A finished run folder (2 epochs, final evaluation, results); tests work on copies."""
    out = tmp_path_factory.mktemp("finished") / "run"
    done = _run(out, data_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def test_a_config_recorded_before_a_method_option_was_renamed_resumes():
    """A checkpoint or manifest written when D-TRADES' normalize and lambda_scale were norm and scale
    compares equal to the same run now, and a real change of them is still refused under the names now."""
    base = TrainConfig(dataset="mnist", model="smallcnn", method=DTRADES(normalize="mean", lambda_scale=3.0)).to_dict()
    method = {("norm" if k == "normalize" else "scale" if k == "lambda_scale" else k): v
              for k, v in base["method"].items()}
    old = dict(base, method=method)
    assert "normalize" not in old["method"] and run_folder.compare_configs(old, base) == ([], {})
    other = dict(base, method=dict(base["method"], normalize="minmax"))
    assert run_folder.compare_configs(old, other)[0] == ["method.normalize: mean -> minmax"]
    stored = REPO / "recipes/results/mnist_dtrades_smallcnn/cpu_eps03/seed0/manifest.json"   # one written before
    if stored.is_file():
        recorded = json.loads(stored.read_text())["config"]
        assert run_folder.compare_configs(recorded, TrainConfig.from_dict(recorded).validate().to_dict()) == ([], {})


# -- 1. --resume continues only the run it was ----------------------------------------------------------

def test_resume_with_other_training_settings_is_refused_and_changes_nothing(run_copy, data_dir):
    before = _hashes(run_copy)
    done = _run(run_copy, data_dir, "--resume", "--method", "standard", "--lr", "0.5", "--batch-size", "32",
                "--train-limit", "128", "--eps", "0.2", "--attack-steps", "2", "--seed", "5", "--amp", "bf16")
    line = _refused(done)
    for diff in ("method.name: trades -> standard", "lr: 0.01 -> 0.5", "batch_size: 64 -> 32",
                 "train_limit: 256 -> 128", "attack.eps: 0.3 -> 0.2", "attack.steps: 1 -> 2", "seed: 0 -> 5",
                 "amp: auto -> bf16", "amp (as resolved on the device): off -> bf16"):
        assert diff in line, (diff, line)
    assert "--overwrite" in line and "step-00000008.pt" in line
    assert _hashes(run_copy) == before


def test_training_fields_are_denied_by_default():
    """Any field outside the documented allow-list counts, a field added later included; a field a
    checkpoint does not record compares as its default; another method's options are not listed."""
    base = train_config(dataset="mnist", model="smallcnn", method=TRADES()).to_dict()
    same, allowed = run_folder.compare_configs(base, dict(base))
    assert same == [] and allowed == {}
    newer = dict(base, input_normalization="none", a_field_added_later=3)
    training, _ = run_folder.compare_configs(base, newer)
    assert training == ["input_normalization: dataset -> none", "a_field_added_later: (not recorded) -> 3"]
    older = {k: v for k, v in base.items() if k != "input_normalization"}   # written before the field existed
    assert run_folder.compare_configs(older, base) == ([], {})
    beta = dict(base, method=dict(base["method"], beta=1.0))
    assert run_folder.compare_configs(base, beta)[0] == ["method.beta: 6.0 -> 1.0"]
    mart = dict(base, method=MART().to_dict())
    assert run_folder.compare_configs(base, mart)[0] == ["method.name: trades -> mart"]
    validation = dict(base, eval=dict(base["eval"], pgd_steps=7))   # the PGD that picks best.pt
    assert run_folder.compare_configs(base, validation)[0] == ["eval.pgd_steps: 20 -> 7"]
    harmless = dict(base, device="cpu", log_every=3, resume=True, loader="torch",
                    eval=dict(base["eval"], num_samples=10, attacks=["pgd"]))
    training, allowed = run_folder.compare_configs(base, harmless)
    assert training == [] and allowed == {"device": ["auto", "cpu"], "loader": ["auto", "torch"], "log_every": [10, 3],
                                          "eval.attacks": [list(base["eval"]["attacks"]), ["pgd"]],
                                          "eval.num_samples": [None, 10]}
    assert run_folder.compare_configs(base, dict(base, loader="ffcv"))[0] == ["loader: auto -> ffcv"]
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    fields |= {f"eval.{f.name}" for f in dataclasses.fields(EvalConfig)}
    assert set(run_folder.MAY_DIFFER) <= fields   # the allow-list names real fields only


def test_resume_with_allowed_changes_records_them(finished, run_copy, data_dir):
    final = run_copy / "checkpoints" / "final.pt"
    original = run_copy / "original-final.pt"
    shutil.copy(final, original)
    done = _run(run_copy, data_dir, "--resume", "--no-final-eval", "--eval-num-samples", "16", "--log-every", "2")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    moved = f"out_dir: {finished} -> {run_copy}"   # the copy is a moved folder
    assert (f"with settings that do not change the trained model changed ({moved}; log_every: 1 -> 2; final_eval: "
            f"true -> false; eval.num_samples: 32 -> 16)") in done.stdout
    manifest = json.loads((run_copy / "manifest.json").read_text())
    assert manifest["resumed_with_changes"] == {"log_every": [1, 2], "final_eval": [True, False],
                                                "eval.num_samples": [32, 16], "out_dir": [str(finished), str(run_copy)]}
    assert manifest["resumes"][-1]["checkpoint"] == "step-00000008.pt"
    assert _same_weights(final, original)   # nothing was left to train


# -- 2. a fresh run never silently replaces another ---------------------------------------------------

def test_a_fresh_run_into_a_run_folder_needs_resume_or_overwrite(run_copy, data_dir):
    before = _hashes(run_copy)
    line = _refused(_run(run_copy, data_dir, "--seed", "5"))
    assert "already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert _hashes(run_copy) == before

    old_events = {p.name for p in run_copy.glob("events.out.tfevents.*")}
    assert old_events or not tensorboard_log.available()   # the old run's TensorBoard events: an overwrite removes them
    (run_copy / "notes.txt").write_text("mine")                      # not a run's file: kept
    (run_copy / "eval").mkdir()
    (run_copy / "eval" / "results.json").write_text("{}")            # `fastrobust eval` of the old run
    done = _run(run_copy, data_dir, "--seed", "5", "--overwrite", "--no-final-eval")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "--overwrite: deleted the" in done.stdout
    names = {p.relative_to(run_copy).as_posix() for p in run_copy.rglob("*") if p.is_file()}
    events = {n for n in names if n.startswith("events.out.tfevents.")}
    assert len(events) == int(tensorboard_log.available()) and not events & old_events   # the new run's events only
    assert names - events == {".lock", "notes.txt", "manifest.json", "log.jsonl", "epochs.csv", "curves.png",
                     "throughput.json", "throughput.md", "checkpoints/best.pt", "checkpoints/final.pt",
                     "checkpoints/step-00000004.pt", "checkpoints/step-00000008.pt"}   # no old results left
    assert json.loads((run_copy / "manifest.json").read_text())["config"]["seed"] == 5
    for name in ("best.pt", "final.pt", "step-00000004.pt", "step-00000008.pt"):
        assert ck.load_checkpoint(run_copy / "checkpoints" / name)["config"]["seed"] == 5, name
    steps = [r["step"] for r in _records(run_copy) if r["kind"] == "step"]
    assert steps == list(range(1, 9))   # the new run's log only


def test_resume_on_an_empty_folder_starts_fresh_and_says_so(tmp_path, data_dir):
    out = tmp_path / "new"
    done = _run(out, data_dir, "--resume", "--epochs", "1", "--no-final-eval")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    said = [line for line in done.stdout.splitlines() if "step 0" in line]
    assert said == [f"--resume: no checkpoint in {out / 'checkpoints'}, so the run starts from step 0."]
    assert (out / "checkpoints" / "final.pt").is_file()


def test_resume_and_overwrite_together_are_refused(tmp_path):
    cfg = train_config(dataset="mnist", model="smallcnn", out_dir=str(tmp_path / "x"), resume=True, overwrite=True)
    with pytest.raises(ConfigError, match="--resume continues the run in .* and --overwrite deletes it"):
        run_folder.inspect(cfg, {})
    assert not (tmp_path / "x").exists()


# -- 3 and 4. one writer; a kill between a logged step and the next checkpoint -------------------------

# 16 TRADES steps of 32 images, a checkpoint every 8 steps, every step logged
KILLABLE = ["--dataset", "mnist", "--model", "smallcnn", "--method", "trades", "--epochs", "1", "--lr", "0.01",
            "--lr-schedule", "constant", "--eps", "0.3", "--attack-steps", "1", "--attack-step-size", "0.3",
            "--train-limit", "512", "--batch-size", "32", "--val-samples", "32", "--log-every", "1", "--no-progress",
            "--no-final-eval", "--ckpt-every-steps", "8"]


def test_one_writer_and_a_resume_after_a_kill_has_the_uninterrupted_history(tmp_path, data_dir):
    """A (16 steps, a checkpoint every 8) is frozen (SIGSTOP) once it has logged step 10, so it holds the
    lock with steps 9-10 logged after its newest checkpoint. B, into the same folder, is refused with A's
    PID and changes nothing. A is then killed; the resume cuts log.jsonl back to step 8 and ends with the
    log and the weights of an uninterrupted run."""
    ref = tmp_path / "uninterrupted"
    done = _run(ref, data_dir, args=KILLABLE)
    assert done.returncode == 0, done.stderr[-3000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(_train(out, data_dir, args=KILLABLE), env=_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()
            logged = (out / "log.jsonl").read_text().count('"kind": "step"') if (out / "log.jsonl").exists() else 0
            if logged >= 10:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGSTOP)
        time.sleep(0.2)   # the log line being written when it stopped is complete or not; either is handled
        assert [p.name for p in ck.step_checkpoints(out / "checkpoints")] == ["step-00000008.pt"]
        before = _hashes(out)
        assert json.loads((out / ".lock").read_text())["pid"] == proc.pid

        for extra in (["--resume"], []):
            line = _refused(_run(out, data_dir, *extra, args=KILLABLE))
            assert f"is in use by another training process (PID {proc.pid} on " in line, line
        assert _hashes(out) == before
    finally:
        proc.kill()
        proc.wait()
    assert max(r["step"] for r in _records(out)) >= 10   # logged past the newest checkpoint, then killed

    done = _run(out, data_dir, "--resume", args=KILLABLE)   # the kill released the lock
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "log.jsonl cut back to step-00000008.pt" in done.stdout
    assert f"resumed from {out / 'checkpoints' / 'step-00000008.pt'}" in done.stdout
    resumed, uninterrupted = _records(out), _records(ref)
    assert [(r["kind"], r["step"]) for r in resumed] == [(r["kind"], r["step"]) for r in uninterrupted]
    assert _untimed(resumed) == _untimed(uninterrupted)   # the same losses, bit for bit, once each
    assert _same_weights(out / "checkpoints" / "final.pt", ref / "checkpoints" / "final.pt")


def test_resume_with_only_unusable_checkpoints_lists_why_and_changes_nothing(run_copy, data_dir):
    ckpts = run_copy / "checkpoints"
    data = (ckpts / "step-00000004.pt").read_bytes()
    (ckpts / "step-00000004.pt").write_bytes(data[:len(data) // 2])
    (ckpts / "step-00000008.pt").write_text("not a checkpoint\n")
    (ckpts / "final.pt").write_bytes(b"")
    before = _hashes(run_copy)
    line = _refused(_run(run_copy, data_dir, "--resume"))
    assert f"--resume found no usable checkpoint in {ckpts}" in line
    assert "step-00000008.pt cannot be loaded (" in line   # each named with torch's reason
    assert "step-00000004.pt cannot be loaded (RuntimeError: PytorchStreamReader failed reading zip archive" in line
    assert "final.pt cannot be loaded (EOFError)" in line and "best.pt is the epoch chosen on validation" in line
    assert "--overwrite" in line
    assert _hashes(run_copy) == before


def test_resume_of_a_finished_run_without_its_step_checkpoints_continues_from_final(run_copy, data_dir):
    """Deleting the rolling checkpoints of a finished run (to save space) leaves final.pt, its end state:
    --resume continues from there (nothing left to train), it does not train the run again from step 0."""
    for path in ck.step_checkpoints(run_copy / "checkpoints"):
        path.unlink()
    final = run_copy / "checkpoints" / "final.pt"
    shutil.copy(final, run_copy / "original-final.pt")
    log = (run_copy / "log.jsonl").read_text()
    done = _run(run_copy, data_dir, "--resume", "--no-final-eval")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"resumed from {final} at epoch 2, batch 0 (step 8)" in done.stdout
    assert (run_copy / "log.jsonl").read_text() == log
    assert _same_weights(final, run_copy / "original-final.pt")


# -- 4, in one process: a kill during the first checkpoint write; pruning --------------------------------

def _cfg(tmp_path, data_dir, **kw) -> TrainConfig:
    """4 TRADES steps of 32 images, one attack step, a checkpoint after every step, no validation."""
    cfg = train_config(dataset="mnist", model="smallcnn", method=TRADES(), epochs=1, lr=0.01, lr_schedule="constant",
                      eps=0.3, attack_steps=1, attack_step_size=0.3, train_limit=128, batch_size=32, val_samples=0,
                      out_dir=str(tmp_path / "run"), progress=False, data_dir=str(data_dir), final_eval=False,
                      ckpt_every_steps=1, log_every=1)
    cfg.eval = EvalConfig(dataset="mnist", eps=0.3, num_samples=32, aa_samples=0, sweep_samples=0, attacks=("pgd",),
                          batch_size=32)
    return dataclasses.replace(cfg, **kw)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_kill_during_the_first_checkpoint_write_resumes_from_step_0(tmp_path, data_dir, capsys):
    """The first run logged two steps and died while writing its first checkpoint: --resume says there
    is nothing saved (naming the partial write), removes it and the unsaved records, and starts over."""
    out = tmp_path / "run"
    ref = train(_cfg(tmp_path / "ref", data_dir, ckpt_every_steps=0))
    reference = _records(Path(ref["out_dir"]))
    (out / "checkpoints").mkdir(parents=True)
    (out / "manifest.json").write_text(json.dumps({"config": _cfg(tmp_path, data_dir).to_dict()}))
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reference[:2]) + '{"kind": "st')
    partial = out / "checkpoints" / f".step-00000003.pt.tmp-{_dead_pid()}"
    partial.write_bytes(b"PK\x03\x04 cut short")
    capsys.readouterr()
    train(_cfg(tmp_path, data_dir, resume=True, ckpt_every_steps=0))
    said = [line for line in capsys.readouterr().out.splitlines() if "step 0" in line]
    assert len(said) == 1 and f"only a partial write, left by a process killed while saving: {partial.name}" in said[0]
    assert "the 3 records logged since are removed" in said[0]
    assert not partial.exists()
    assert _untimed(_records(out)) == _untimed(reference)


def test_pruning_counts_only_checkpoints_the_run_wrote_or_read(tmp_path, data_dir, monkeypatch):
    """A file that is only named like a checkpoint (step-99999999.pt) is reported, never counts as one of
    the two newest kept, and is never deleted; the real checkpoints are pruned around it."""
    trainer = Trainer(_cfg(tmp_path, data_dir))
    original, calls = trainer.stepper.method.loss, []

    def stopped_at_step_2(model, x, y, adv, **kw):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)   # honoured at the next step boundary, after step 2's checkpoint
        return original(model, x, y, adv, **kw)

    monkeypatch.setattr(trainer.stepper.method, "loss", stopped_at_step_2)
    with pytest.raises(TrainingInterrupted):
        trainer.fit()
    monkeypatch.undo()
    ckpts = Path(trainer.cfg.out_dir) / "checkpoints"
    bogus = ckpts / "step-99999999.pt"
    bogus.write_text("a file that is only named like a checkpoint\n")
    odd = ckpts / "step-3.pt"   # not a name the trainer writes: never read, never deleted
    odd.write_bytes(b"")
    with pytest.warns(UserWarning, match=r"skipping unusable checkpoint: checkpoint .*step-99999999.pt cannot be "
                                          r"loaded \("):
        Trainer(_cfg(tmp_path, data_dir, resume=True)).fit()
    assert sorted(p.name for p in ckpts.iterdir()) == ["final.pt", "step-00000003.pt", "step-00000004.pt",
                                                        "step-3.pt", "step-99999999.pt"]
    assert bogus.read_text() == "a file that is only named like a checkpoint\n" and odd.read_bytes() == b""
    steps = [r["step"] for r in _records(ckpts.parent) if r["kind"] == "step"]
    assert steps == [1, 2, 3, 4]


def test_the_lock_is_held_for_the_run_and_released_after(tmp_path, data_dir):
    """In one process: a second trainer into a folder whose run is in progress is refused, before it
    writes anything; once fit() returns the folder is free."""
    first = Trainer(_cfg(tmp_path, data_dir))
    seen = {}
    real_step = first.step

    def step_and_try_another(x, y):
        if not seen:
            with pytest.raises(ConfigError, match=rf"is in use by another training process \(PID {os.getpid()} on "):
                Trainer(_cfg(tmp_path, data_dir, resume=True))
            seen["refused"] = True
        return real_step(x, y)

    first.step = step_and_try_another
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first.fit()
    assert seen == {"refused": True}
    assert run_folder.lock_holder(Path(first.cfg.out_dir)) is None
