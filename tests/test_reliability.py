"""Faults and bad input: a checkpoint write killed half-way, a corrupt newest checkpoint, an fp16
overflow storm, a full disk, and every kind of bad command line - each ends cleanly, with one clear
line from the CLI (exit status 2) and the last good checkpoint intact.
(Exact resume after SIGKILL / SIGTERM: tests/test_train.py; under DDP: tests/test_distributed.py.)"""
import errno
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from fastrobust import checkpoint as ck
from fastrobust import distributed as dist
from fastrobust.cli import main as cli_main
from fastrobust.config import EvalConfig, TrainConfig
from fastrobust.errors import ConfigError, NumericalError
from fastrobust.models import create_model
from fastrobust.train import Trainer

REPO = Path(__file__).resolve().parents[1]


def tiny_cfg(tmp_path, data_dir, **kw):
    cfg = TrainConfig(dataset="mnist", model="smallcnn", method="trades", epochs=1, lr=0.01, lr_schedule="constant",
                      eps=0.3, attack_steps=1, attack_step_size=0.3, train_limit=128, batch_size=32, val_samples=0,
                      out_dir=str(tmp_path / "run"), progress=False, data_dir=str(data_dir), final_eval=False,
                      ckpt_every_steps=1)
    cfg.eval = EvalConfig(dataset="mnist", num_samples=32, aa_samples=0, sweep_samples=0, attacks=("pgd",), batch_size=32)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _save_model(model, path, **extra):
    return ck.atomic_save({"format": ck.FORMAT, "spec": model.spec.to_dict(), "model": model.state_dict(), **extra}, path)


# -- checkpoints -----------------------------------------------------------------------------------

WRITER = r"""
import sys, time, torch
from fastrobust import checkpoint as ck
folder = sys.argv[1]
ck.atomic_save({"format": ck.FORMAT, "spec": {}, "model": {"w": torch.ones(3)}, "step": 1}, folder + "/step-00000001.pt")

class Stalls:  # the file object atomic_save writes through: stops for good after 32 MB
    def __init__(self, f): self.f, self.n = f, 0
    def write(self, b):
        if self.n > 32 << 20:
            print("stalled", self.n, flush=True)
            time.sleep(600)
        self.n += len(b)
        return self.f.write(b)
    def __getattr__(self, name): return getattr(self.f, name)
    def __enter__(self): return self
    def __exit__(self, *exc): return self.f.__exit__(*exc)

ck.open = lambda *a, **k: Stalls(open(*a, **k))
big = {"format": ck.FORMAT, "spec": {}, "model": {f"w{i}": torch.randn(1 << 20) for i in range(24)}, "step": 2}  # 96 MB
ck.atomic_save(big, folder + "/step-00000002.pt")
print("finished", flush=True)
"""


def test_sigkill_while_writing_a_large_checkpoint_leaves_the_previous_one(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("stalled"), line + proc.stderr.read()
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".step-00000002.pt.tmp-")]
    assert len(partial) == 1 and partial[0].stat().st_size > 32 << 20   # killed in the middle of the write
    proc.kill()
    proc.wait()
    assert [p.name for p in ck.step_checkpoints(tmp_path)] == ["step-00000001.pt"]
    path, state = ck.newest_valid(tmp_path)
    assert path.name == "step-00000001.pt" and state["step"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    # the dead writer's temporary is cleaned on resume; a live writer's is left alone
    live = tmp_path / f".step-00000003.pt.tmp-{os.getpid()}"
    live.write_bytes(b"in progress")
    assert ck.clean_stale_temporaries(tmp_path) == partial
    assert live.exists() and not partial[0].exists()


def test_resume_reports_and_skips_a_truncated_newest_checkpoint(tmp_path, data_dir):
    trainer = Trainer(tiny_cfg(tmp_path, data_dir))
    trainer.fit()
    ckpts = Path(trainer.cfg.out_dir) / "checkpoints"
    final = ck.load_checkpoint(ckpts / "final.pt")
    newest = ckpts / "step-00000004.pt"
    newest.write_bytes(newest.read_bytes()[:5000])                          # truncated mid-write by a crash
    (ckpts / ".step-00000005.pt.tmp-999999999").write_bytes(b"partial")     # a dead writer's leftover
    (ckpts / "final.pt").unlink()
    resumed = Trainer(tiny_cfg(tmp_path, data_dir, resume=True))
    with pytest.warns(UserWarning, match=r"skipping unusable checkpoint: checkpoint .*step-00000004.pt is corrupt"):
        resumed.fit()
    assert not (ckpts / ".step-00000005.pt.tmp-999999999").exists()
    again = ck.load_checkpoint(ckpts / "final.pt")
    for k, v in final["model"].items():  # the redone step 4 gives the same weights
        assert torch.equal(v, again["model"][k]), k


class _InfGradient(torch.autograd.Function):
    """Identity forward, infinite gradient: an fp16 overflow that no loss scale can fix."""
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def test_fp16_overflow_storm_stops_with_a_valid_checkpoint(tmp_path, data_dir, monkeypatch):
    """The grad scaler halves its scale at each overflow; overflows above scale 1 are calibration
    (skipped, not counted), at or below 1 they count, and max_bad_steps in a row stop the run."""
    trainer = Trainer(tiny_cfg(tmp_path, data_dir, amp="fp16", max_bad_steps=3, train_limit=48, batch_size=8,
                               ckpt_every_steps=0))
    assert trainer.scaler.is_enabled() and trainer.stepper.amp is torch.float16
    trainer.scaler.load_state_dict({"scale": 4.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                    "growth_interval": 2000, "_growth_tracker": 0})
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    original = trainer.method.loss

    def overflowing(model, x, y, adv):
        out = original(model, x, y, adv)
        out.loss = _InfGradient.apply(out.loss)   # finite loss, infinite gradients
        return out

    monkeypatch.setattr(trainer.method, "loss", overflowing)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(NumericalError) as err:
        warnings.simplefilter("always")
        trainer.fit()
    messages = [str(w.message) for w in caught]
    assert sum("still calibrating" in m for m in messages) == 2          # scales 4 and 2
    assert sum("in a row)" in m for m in messages) == 3                  # scales 1, 0.5, 0.25
    assert "3 consecutive bad steps (fp16 gradients overflowed at loss scale 0.25" in str(err.value)
    assert "bf16" in str(err.value)
    path = Path(re.search(r"last good state is in (\S+\.pt)", str(err.value)).group(1))
    saved = ck.load_checkpoint(path)
    assert saved["global_step"] == 4 and saved["bad_steps"] == 3
    for k, v in before.items():  # no overflowed update reached the weights
        assert torch.equal(saved["model"][k], v), k


def test_every_load_is_weights_only():
    """Audit: every torch.load in the packages refuses pickled code; numpy never unpickles."""
    sources = [p for d in ("fastrobust", "loaders", "recipes", "kernels") for p in (REPO / d).rglob("*.py")]
    loads = [(p, line) for p in sources for line in p.read_text().splitlines() if "torch.load(" in line]
    assert loads and all("weights_only=True" in line for _, line in loads), loads
    np_loads = [(p, line) for p in sources for line in p.read_text().splitlines() if re.search(r"\bnp\.load\(", line)]
    assert all("allow_pickle=False" in line for _, line in np_loads), np_loads


# -- bad input through the CLI: exit status 2, one line, no traceback ------------------------------

def _one_error_line(capsys, argv) -> str:
    code = cli_main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("fastrobust: error: "), (code, err)
    assert "Traceback" not in err
    return lines[0]


BASE = ["train", "--dataset", "mnist", "--model", "smallcnn", "--no-progress"]


@pytest.mark.parametrize("flags,expected", [
    (["--method", "dtrade"], "unknown method 'dtrade'. Did you mean 'dtrades'"),
    (["--model", "resnet19"], "unknown model 'resnet19'. Did you mean 'resnet18'"),
    (["--dataset", "cifar100"], "unknown dataset 'cifar100'. Did you mean 'cifar10'?"),
    (["--eval-attacks", "pgd,autoatack"], "unknown attack 'autoatack'. Did you mean 'autoattack'?"),
    (["--eval-aa-attacks", "apgd-cd", "--eval-aa-version", "custom"], "Did you mean 'apgd-ce'"),
    (["--lambda-sync", "globl"], "unknown lambda sync mode 'globl'. Did you mean 'global'"),
    (["--eps", "-0.1"], "eps must be a finite number >= 0, got -0.1"),
    (["--eval-eps", "nan"], "eval eps must be a finite number >= 0, got nan"),
    (["--attack-steps", "0"], "attack_steps must be an integer >= 1, got 0"),
    (["--eval-pgd-steps", "-3"], "pgd_steps must be an integer >= 1, got -3"),
    (["--batch-size", "0"], "batch_size must be an integer >= 1, got 0"),
    (["--eval-batch-size", "0"], "eval batch_size must be an integer >= 1, got 0"),
    (["--lr", "0"], "lr must be a finite number > 0"),
    (["--seed", "-1"], "seed must be an integer in [0, 2**63)"),
    (["--dropout", "1"], "dropout must lie in [0, 1)"),
    (["--device", "gpu0"], "invalid device 'gpu0'"),
    (["--out-dir", ""], "out_dir must not be an empty string"),
])
def test_bad_values_are_one_clear_line(capsys, flags, expected):
    assert expected in _one_error_line(capsys, BASE + flags)


def test_bad_eval_options_fail_before_loading_anything(capsys, tmp_path):
    line = _one_error_line(capsys, ["eval", "--checkpoint", str(tmp_path / "missing.pt"), "--attacks", "fgsm,pgdd"])
    assert "unknown attack 'pgdd'. Did you mean 'pgd'?" in line
    assert "does not exist" in _one_error_line(capsys, ["eval", "--checkpoint", str(tmp_path / "missing.pt")])


def test_malformed_flags_are_argparse_usage_errors(capsys):
    for argv in (BASE + ["--epochs", "two"], BASE + ["--no-such-flag"], BASE + ["--eps"]):
        with pytest.raises(SystemExit) as e:
            cli_main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("usage: fastrobust") and "error:" in err and "Traceback" not in err


def test_wrong_data_layout(capsys, tmp_path):
    (tmp_path / "data" / "MNIST").mkdir(parents=True)   # torchvision's folder, but no raw/ files
    line = _one_error_line(capsys, BASE + ["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "run")])
    assert "no mnist 'train' data found under" in line and "MNIST/raw/train-images-idx3-ubyte" in line
    assert "--data-dir" in line  # the fix


def test_checkpoint_of_another_architecture_or_class_count(capsys, tmp_path, data_dir):
    common = BASE + ["--data-dir", str(data_dir), "--train-limit", "64", "--batch-size", "32"]
    vgg = _save_model(create_model("vgg16", dataset="mnist"), tmp_path / "vgg.pt")
    line = _one_error_line(capsys, common + ["--init-checkpoint", str(vgg), "--out-dir", str(tmp_path / "a")])
    assert "trained for another model (name: checkpoint has 'vgg16', expected 'smallcnn')" in line
    five = _save_model(create_model("smallcnn", dataset="mnist", num_classes=5), tmp_path / "five.pt")
    line = _one_error_line(capsys, common + ["--init-checkpoint", str(five), "--out-dir", str(tmp_path / "b")])
    assert "num_classes: checkpoint has 5, expected 10" in line
    # --resume in a run folder whose checkpoints belong to another model
    _save_model(create_model("vgg16", dataset="mnist"), tmp_path / "c" / "checkpoints" / "step-00000003.pt")
    line = _one_error_line(capsys, common + ["--resume", "--out-dir", str(tmp_path / "c")])
    assert "step-00000003.pt was trained for another model" in line


def test_unwritable_output_folder(capsys, tmp_path, data_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    line = _one_error_line(capsys, BASE + ["--data-dir", str(data_dir), "--out-dir", str(blocker / "run")])
    assert f"output folder {blocker / 'run'} is not writable" in line and "--out-dir" in line
    if os.geteuid() != 0:  # root ignores permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert "is not writable" in _one_error_line(capsys, BASE + ["--data-dir", str(data_dir), "--out-dir",
                                                                     str(locked / "run")])


def test_disk_full_while_checkpointing(capsys, tmp_path, data_dir, monkeypatch):
    """The third checkpoint write fails with ENOSPC: one clear line, the two earlier checkpoints load,
    and no temporary file is left behind."""
    real_save = torch.save
    calls = []

    def fills_up(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            f.write(b"partial bytes")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fills_up)
    out = tmp_path / "run"
    line = _one_error_line(capsys, BASE + ["--data-dir", str(data_dir), "--train-limit", "128", "--batch-size", "32",
                                           "--attack-steps", "1", "--ckpt-every-steps", "1", "--no-final-eval",
                                           "--val-samples", "0", "--out-dir", str(out)])
    assert "could not write checkpoint" in line and "No space left on device" in line
    assert "previous checkpoint, if any, is untouched" in line
    monkeypatch.undo()
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-00000001.pt", "step-00000002.pt"]
    assert ck.load_checkpoint(out / "checkpoints" / "step-00000002.pt")["global_step"] == 2


def test_global_batch_must_divide_by_the_world_size(tmp_path, data_dir, monkeypatch):
    monkeypatch.setattr(dist, "world_size", lambda: 3)
    monkeypatch.setattr(dist, "rank", lambda: 0)
    with pytest.raises(ConfigError, match=r"batch_size 128 is the global batch and must be divisible by the number "
                                          r"of processes \(3\); use 129 or 126"):
        Trainer(tiny_cfg(tmp_path, data_dir, batch_size=128))


def test_sync_bn_needs_cuda_under_ddp(monkeypatch):
    from fastrobust.train import TrainStep
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "rank", lambda: 0)
    cfg = TrainConfig(dataset="mnist", model="vgg16", method="trades", sync_bn=True).validate()
    with pytest.raises(ConfigError, match="sync_bn needs CUDA"):
        TrainStep(cfg, create_model("vgg16", dataset="mnist"), torch.device("cpu"))


def test_sigterm_mid_step_is_honoured_at_the_next_step_boundary(tmp_path, data_dir, monkeypatch):
    """In-process: SIGTERM arrives in the middle of step 2 (index 1); that step completes, the next
    boundary writes step-2 and raises TrainingInterrupted naming it; the previous handler is restored."""
    import signal

    from fastrobust.train import TrainingInterrupted
    trainer = Trainer(tiny_cfg(tmp_path, data_dir, ckpt_every_steps=0))
    original, calls = trainer.method.loss, []

    def signalled(model, x, y, adv):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(model, x, y, adv)

    monkeypatch.setattr(trainer.method, "loss", signalled)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match=r"stopped by SIGTERM at epoch 0, batch 2 \(step 2\); "
                                                  r"checkpoint written to .*step-00000002.pt"):
        trainer.fit()
    assert signal.getsignal(signal.SIGTERM) is before and len(calls) == 2
    assert ck.load_checkpoint(Path(trainer.cfg.out_dir) / "checkpoints" / "step-00000002.pt")["global_step"] == 2
