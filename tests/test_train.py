"""End-to-end training on real MNIST: every method, exact resume after a kill, non-finite steps."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastrobust.checkpoint import load_checkpoint
from fastrobust.config import EvalConfig, TrainConfig
from fastrobust.errors import NumericalError
from fastrobust.train import Trainer, train

REPO = Path(__file__).resolve().parents[1]


def tiny_cfg(tmp_path, method, data_dir, **kw):
    cfg = TrainConfig(dataset="mnist", model="smallcnn", method=method, epochs=1, lr=0.01, lr_schedule="constant",
                      eps=0.3, attack_steps=3, attack_step_size=0.1, train_limit=256, batch_size=64, val_samples=64,
                      out_dir=str(tmp_path / method), progress=False, data_dir=str(data_dir), log_every=1,
                      weight_decay=0.0)
    cfg.eval = EvalConfig(dataset="mnist", num_samples=64, aa_samples=0, sweep_samples=0, attacks=("fgsm", "pgd"),
                          batch_size=64)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.mark.parametrize("method", ["standard", "trades", "mart", "faal", "dtrades"])
def test_every_method_trains_end_to_end(tmp_path, data_dir, method):
    summary = train(tiny_cfg(tmp_path, method, data_dir))
    out = Path(summary["out_dir"])
    for name in ("manifest.json", "log.jsonl", "epochs.csv", "results.md", "results.csv", "results.json",
                 "throughput.json", "throughput.md", "curves.png", "na_ra.png", "checkpoints/final.pt"):
        assert (out / name).is_file(), name
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train_steps = [s for s in steps if s["kind"] == "step"]
    assert len(train_steps) == 4 and all(torch.isfinite(torch.tensor(s["loss"])) for s in train_steps)
    if method == "dtrades":
        assert all(0 <= s["lambda_min"] <= s["lambda_max"] <= 2 for s in train_steps)
        assert all("sensitivity_mean" in s and "entropy_mean" in s for s in train_steps)
    if method == "faal":
        assert all(abs(sum(s["class_weights"]) - 1) < 1e-4 for s in train_steps)
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"config", "versions", "git", "device", "seed"} <= set(manifest)
    tp = json.loads((out / "throughput.json").read_text())
    assert tp["img_per_s"] > 0 and 0 < tp["attack_share"] < 1 or method == "standard"
    ckpt = load_checkpoint(out / "checkpoints" / "final.pt")
    assert ckpt["spec"]["name"] == "smallcnn" and ckpt["epoch"] == 1


def test_training_learns(tmp_path, data_dir):
    cfg = tiny_cfg(tmp_path, "trades", data_dir, train_limit=2048, batch_size=128, lr=0.05, final_eval=False,
                   val_samples=256)
    summary = train(cfg)
    assert summary["history"][-1]["val_na"] > 0.5  # from 10% at initialisation


def test_same_seed_same_weights(tmp_path, data_dir):
    a = Trainer(tiny_cfg(tmp_path / "a", "dtrades", data_dir, final_eval=False))
    a.fit()
    b = Trainer(tiny_cfg(tmp_path / "b", "dtrades", data_dir, final_eval=False))
    b.fit()
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k


def _cli(out, data_dir, *extra):
    return [sys.executable, "-m", "fastrobust", "train", "--dataset", "mnist", "--model", "smallcnn",
            "--method", "dtrades", "--epochs", "2", "--lr", "0.01", "--lr-schedule", "cosine", "--eps", "0.3",
            "--attack-steps", "3", "--attack-step-size", "0.1", "--train-limit", "512", "--batch-size", "64",
            "--val-samples", "32", "--no-final-eval", "--no-progress", "--ckpt-every-steps", "1",
            "--data-dir", str(data_dir), "--out-dir", str(out), "--ema-decay", "0.9", *extra]


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
    ref = tmp_path_factory.mktemp("ref") / "uninterrupted"
    subprocess.run(_cli(ref, data_dir), check=True, env=_env(), cwd=REPO, capture_output=True)
    return load_checkpoint(ref / "checkpoints" / "final.pt")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_stop_at_a_random_step_and_resume_is_bit_identical(uninterrupted, tmp_path, data_dir, sig):
    """SIGKILL: the run dies wherever it is; the newest checkpoint (one per step here) is complete.
    SIGTERM: the run finishes its step, writes a checkpoint there and exits with 143 and one line.
    Either way --resume ends with weights bit-identical to the uninterrupted run's. The step after
    which the signal is sent is drawn at random (FASTROBUST_TEST_SEED fixes it)."""
    seed = int(os.environ.get("FASTROBUST_TEST_SEED", random.SystemRandom().randrange(2**32)))
    after = random.Random(seed).randint(1, 11)
    why = f"signal {sig.name} after step {after} (FASTROBUST_TEST_SEED={seed})"
    run = tmp_path / "stopped"
    proc = subprocess.Popen(_cli(run, data_dir), env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "checkpoints" / f"step-{after:08d}.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.02)
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1].decode()
    stopped_at = max(int(p.stem.split("-")[1]) for p in (run / "checkpoints").glob("step-*.pt"))
    assert after <= stopped_at < 16 and not (run / "checkpoints" / "final.pt").exists(), why
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL, why
    else:
        assert proc.returncode == 143, (why, err)
        lines = err.strip().splitlines()
        assert lines[-1].startswith(f"fastrobust: interrupted: stopped by SIGTERM at epoch") and "Traceback" not in err, err
        assert f"checkpoint written to {run / 'checkpoints' / f'step-{stopped_at:08d}.pt'}" in lines[-1], why
        assert load_checkpoint(run / "checkpoints" / f"step-{stopped_at:08d}.pt")["global_step"] == stopped_at

    done = subprocess.run(_cli(run, data_dir, "--resume"), env=_env(), cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"resumed from {run / 'checkpoints' / f'step-{stopped_at:08d}.pt'}" in done.stdout, why
    b = load_checkpoint(run / "checkpoints" / "final.pt")
    for key in ("model", "ema"):
        for k, v in uninterrupted[key].items():
            assert torch.equal(v, b[key][k]), (why, key, k)
    assert uninterrupted["global_step"] == b["global_step"] == 16


def test_non_finite_steps_are_skipped_then_stop(tmp_path, data_dir, monkeypatch):
    trainer = Trainer(tiny_cfg(tmp_path, "trades", data_dir, max_bad_steps=3, final_eval=False))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    original = trainer.method.loss

    def poisoned(model, x, y, adv):
        out = original(model, x, y, adv)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer.method, "loss", poisoned)
    with pytest.warns(UserWarning, match="step skipped"), pytest.raises(NumericalError, match="consecutive bad steps"):
        trainer.fit()
    ckpts = sorted((Path(trainer.cfg.out_dir) / "checkpoints").glob("step-*.pt"))
    assert ckpts
    saved = load_checkpoint(ckpts[-1])["model"]
    for k, v in before.items():  # no poisoned update reached the weights
        assert torch.equal(saved[k], v), k
