"""Live TensorBoard scalars (fastrobust.tensorboard_log): the event files, read back with TensorBoard's
own reader, hold exactly the numbers of log.jsonl (as float32, TensorBoard's scalar type) and the final
evaluation; a resumed run's curves have no step twice; without the package a run trains, evaluates and
says once how to get it."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastrobust.config import EvalConfig, TrainConfig
from fastrobust.methods import DTRADES, FAAL
from fastrobust.tensorboard_log import scalars
from fastrobust.train import Trainer, train
from conftest import train_config

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
REPO = Path(__file__).resolve().parents[1]


def _cfg(tmp_path, data_dir, **kw) -> TrainConfig:
    """2 epochs of 4 steps of 32 images, one attack step, every step logged, a 32-image validation."""
    cfg = train_config(dataset="mnist", model="smallcnn", method=DTRADES(), epochs=2, lr=0.01, lr_schedule="constant",
                      eps=0.3, attack_steps=1, attack_step_size=0.3, train_limit=128, batch_size=32, val_samples=32,
                      out_dir=str(tmp_path / "run"), progress=False, data_dir=str(data_dir), log_every=1,
                      tensorboard=True)
    cfg.eval = EvalConfig(dataset="mnist", eps=0.3, num_samples=32, aa_samples=0, sweep_samples=0, attacks=("pgd",),
                          pgd_steps=2, batch_size=32)
    return dataclasses.replace(cfg, **kw)


def _events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag's (step, value) events as TensorBoard shows them (orphaned data purged)."""
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _expected(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """log.jsonl's numbers, tag by tag, in float32."""
    out: dict[str, list[tuple[int, float]]] = {}
    for line in (folder / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        for tag, value in scalars(record).items():
            out.setdefault(tag, []).append((record["step"], float(np.float32(value))))
    return out


def _without_eval(events):
    return {k: v for k, v in events.items() if not k.startswith("eval/")}


def test_event_files_hold_log_jsonl_and_the_final_evaluation(tmp_path, data_dir):
    summary = train(_cfg(tmp_path, data_dir))
    out = Path(summary["out_dir"])
    events = _events(out)
    assert _without_eval(events) == _expected(out)
    for tag in ("train/loss", "train/lr", "train/ce_nat_mean", "train/kl_mean", "train/weighted_kl_mean",
                "train/lambda_mean", "train/lambda_min", "train/lambda_max", "train/lambda_std", "train/img_per_s",
                "train/attack_ms", "epoch/val_na", "epoch/val_pgd_ra"):
        assert tag in events, (tag, sorted(events))
    assert [s for s, _ in events["train/loss"]] == list(range(1, 9))
    assert [s for s, _ in events["epoch/val_na"]] == [4, 8]
    result = summary["eval"]
    assert events["eval/na"] == [(8, float(np.float32(result.na)))]
    assert events["eval/ra_pgd"] == [(8, float(np.float32(result.ra["pgd"])))]


def test_faal_class_weights_are_one_curve_per_class(tmp_path, data_dir):
    out = Path(train(_cfg(tmp_path, data_dir, method=FAAL(), epochs=1, val_samples=0, final_eval=False))["out_dir"])
    events = _events(out)
    assert _without_eval(events) == _expected(out)
    assert {f"train/class_weights/{c}" for c in range(10)} <= set(events)


class Killed(Exception):
    pass


def test_a_resumed_run_appends_without_a_step_twice(tmp_path, data_dir, monkeypatch):
    """Killed in step 7 with a checkpoint at step 4 (steps 5-6 logged and in the event file); the
    resume's curves equal its log.jsonl, every step once, and equal an uninterrupted run's."""
    cfg = _cfg(tmp_path, data_dir, ckpt_every_steps=4, final_eval=False)
    _killed_in_step_7(Trainer(cfg), monkeypatch)
    out = Path(cfg.out_dir)
    assert [s for s, _ in _events(out)["train/loss"]] == [1, 2, 3, 4, 5, 6]

    Trainer(dataclasses.replace(cfg, resume=True)).fit()
    assert len(list(out.glob("events.out.tfevents.*"))) == 2   # the first process's file is kept, and appended to
    events = _events(out)
    assert events == _expected(out)
    for tag, points in events.items():
        steps = [s for s, _ in points]
        assert steps == sorted(set(steps)), (tag, steps)
    assert [s for s, _ in events["train/loss"]] == list(range(1, 9))
    ref = Path(train(dataclasses.replace(cfg, out_dir=str(tmp_path / "uninterrupted")))["out_dir"])
    timing = ("img_per_s", "ms_per_step", "attack_ms", "update_ms", "attack_share", "epoch_seconds", "peak_memory_mb",
              "steps_timed")
    untimed = lambda ev: {k: v for k, v in ev.items() if not k.endswith(timing)}  # noqa: E731
    assert untimed(events) == untimed(_events(ref))


def _killed_in_step_7(trainer, monkeypatch):
    original, calls = trainer.stepper.method.loss, []

    def loss(model, x, y, adv, **kw):
        calls.append(1)
        if len(calls) == 7:
            raise Killed
        return original(model, x, y, adv, **kw)

    monkeypatch.setattr(trainer.stepper.method, "loss", loss)
    with pytest.raises(Killed):
        trainer.fit()
    monkeypatch.undo()


def test_tensorboard_switched_on_at_resume_writes_the_whole_kept_log(tmp_path, data_dir, monkeypatch):
    cfg = _cfg(tmp_path, data_dir, ckpt_every_steps=4, final_eval=False, tensorboard=False)
    _killed_in_step_7(Trainer(cfg), monkeypatch)
    out = Path(cfg.out_dir)
    assert not list(out.glob("events.out.tfevents.*"))
    Trainer(dataclasses.replace(cfg, resume=True, tensorboard=True)).fit()
    events = _events(out)
    assert events == _expected(out) and [s for s, _ in events["train/loss"]] == list(range(1, 9))


def test_without_tensorboard_and_robustbench_a_run_trains_evaluates_and_says_so_once(tmp_path, data_dir):
    """In a process where neither optional package imports: the run trains and evaluates, one stderr
    line says how to get TensorBoard scalars; --tensorboard asks for them and is refused in one line."""
    args = ["train", "--dataset", "mnist", "--model", "smallcnn", "--method", "trades", "--epochs", "1",
            "--eps", "0.3", "--attack-steps", "1", "--attack-step-size", "0.3", "--train-limit", "64",
            "--batch-size", "32", "--val-samples", "32", "--no-progress", "--eval-num-samples", "32",
            "--eval-aa-samples", "0", "--eval-sweep-samples", "0", "--eval-attacks", "pgd", "--eval-pgd-steps", "2",
            "--data-dir", str(data_dir), "--out-dir"]
    code = ("import sys; sys.modules['tensorboard'] = None; sys.modules['robustbench'] = None; "
            "from fastrobust.cli import main; sys.exit(main(sys.argv[1:]))")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))

    def run(*extra):
        return subprocess.run([sys.executable, "-c", code, *args, *extra], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=600)

    out = tmp_path / "run"
    done = run(str(out))
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    hints = [line for line in done.stderr.splitlines() if "tensorboard" in line.lower()]
    assert hints == ["TensorBoard scalars are off: tensorboard is not installed (pip install 'fastrobust[tensorboard]'; "
                     "--no-tensorboard silences this line)."], done.stderr
    assert json.loads((out / "results.json").read_text()) and not list(out.glob("events.out.tfevents.*"))

    refused = run(str(tmp_path / "asked"), "--tensorboard")
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert "--tensorboard needs the tensorboard package" in lines[0] and "--no-tensorboard" in lines[0]
    quiet = run(str(tmp_path / "quiet"), "--no-tensorboard")
    assert quiet.returncode == 0 and "tensorboard" not in quiet.stderr.lower(), quiet.stderr[-3000:]
