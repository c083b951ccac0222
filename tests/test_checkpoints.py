"""fastrobust.checkpoint: atomic saves, safe loads (one error naming the file and torch's reason),
architecture checks, plain state dicts from other code (the official TRADES and MART layouts), and
``fastrobust eval`` on all of them: every bad file is one line on stderr and exit status 2, never a
traceback, and nothing in a file is ever executed. Also the faults around checkpoints (moved from tests/test_reliability.py): a
write killed half-way, a full disk, a checkpoint of another model given to train."""
import contextlib
import dataclasses
import errno
import io
import json
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter, OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

import loaders
from fastrobust import checkpoint as ck
from fastrobust import models
from fastrobust.cli import main as cli_main
from fastrobust.config import EvalConfig, TrainConfig
from fastrobust.errors import CheckpointError
from fastrobust.evaluate import evaluate
from fastrobust.models import create_model
from fastrobust.report import write_json
from fastrobust.distributed import resolve_device

REPO = Path(__file__).resolve().parents[1]
set_hypothesis_home_dir(str(Path(tempfile.gettempdir()) / "fastrobust-hypothesis"))


def _save(model, path, **extra):
    state = {"format": ck.FORMAT, "spec": model.spec.to_dict(), "model": model.state_dict(),
             "config": {"dataset": "mnist"}, **extra}
    return ck.atomic_save(state, path)


def _cli(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(argv)
    return code, out.getvalue(), err.getvalue()


def _one_error_line(argv, stdout_empty: bool = True) -> str:
    """Run the CLI; it must fail with exit status 2 and exactly one ``fastrobust: error:`` line (and, for
    commands that fail before doing anything, print nothing else)."""
    code, out, err = _cli(argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("fastrobust: error: "), (code, err)
    assert "Traceback" not in err and (not out or not stdout_empty), (out, err)
    return lines[0]


# ------------------------------------------------------------------------------------------ basics
def test_round_trip_and_no_temporary_left(tmp_path):
    model = create_model("smallcnn", dataset="mnist")
    path = _save(model, tmp_path / "a" / "m.pt")
    loaded, meta = ck.load_model(path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    assert [p.name for p in path.parent.iterdir()] == ["m.pt"]


def test_other_architecture_is_refused_with_the_difference(tmp_path):
    path = _save(create_model("smallcnn", dataset="mnist"), tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="name: checkpoint has 'smallcnn', expected 'vgg16'"):
        ck.load_model(path, expected={"name": "vgg16"})
    with pytest.raises(CheckpointError, match="num_classes"):
        ck.load_model(path, expected={"num_classes": 100})
    other = create_model("smallcnn", dataset="mnist", num_classes=5)
    with pytest.raises(CheckpointError, match="another architecture or class count"):
        ck.load_weights(other, torch.load(path, weights_only=True)["model"], path)


def test_truncated_checkpoint_is_reported(tmp_path):
    path = _save(create_model("smallcnn", dataset="mnist"), tmp_path / "m.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cannot be loaded \(RuntimeError: PytorchStreamReader failed reading zip"):
        ck.load_checkpoint(path)


class _Payload:
    """Unpickling it would create the marker file: the proof that a loader executed file content."""
    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(_Payload.marker),))


def test_malicious_pickle_is_refused_not_executed(tmp_path):
    _Payload.marker = str(tmp_path / "pwned")
    path = tmp_path / "evil.pt"
    torch.save({"format": ck.FORMAT, "spec": {}, "model": {}, "payload": _Payload()}, path)
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(CheckpointError, match="Unsupported global: GLOBAL getattr .*Nothing in it was executed"):
        ck.load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()
    # the payload is real: a plain unpickler runs it (so the tests above prove something)
    pickle.loads(pickle.dumps(_Payload()))
    assert (tmp_path / "pwned").exists()


def test_newest_valid_skips_corrupt(tmp_path):
    model = create_model("smallcnn", dataset="mnist")
    _save(model, tmp_path / "step-00000001.pt", step=1)
    _save(model, tmp_path / "step-00000002.pt", step=2)
    (tmp_path / "step-00000003.pt").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="skipping unusable checkpoint"):
        path, state = ck.newest_valid(tmp_path)
    assert path.name == "step-00000002.pt" and state["step"] == 2


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = create_model("smallcnn", dataset="mnist")
    path = _save(model, tmp_path / "m.pt", step=1)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left"):
        _save(model, path, step=2)
    monkeypatch.undo()
    assert ck.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_ema_weights_are_loaded_or_their_absence_is_an_error(tmp_path):
    """``--weights ema`` loads the AveragedModel copy (its keys under ``module.``, plus ``n_averaged``),
    and a checkpoint without one says so instead of silently evaluating the raw weights."""
    model = create_model("smallcnn", dataset="mnist")
    ema = torch.optim.swa_utils.AveragedModel(model, use_buffers=True)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(1.0)   # make the EMA copy differ from the model
    path = _save(model, tmp_path / "ema.pt", ema=ema.state_dict())
    loaded, _ = ck.load_model(path, weights="ema")
    for k, v in ema.module.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert not torch.equal(loaded.state_dict()["net.classifier.fc1.weight"], model.state_dict()["net.classifier.fc1.weight"])
    plain = _save(model, tmp_path / "plain.pt", ema=None)
    with pytest.raises(CheckpointError, match=r"holds no EMA weights .*--weights model"):
        ck.load_model(plain, weights="ema")


def test_cli_eval_runs_and_rejects_mismatch(tmp_path, trained_smallcnn, data_dir, capsys):
    path = _save(trained_smallcnn, tmp_path / "run" / "checkpoints" / "final.pt", config={"dataset": "mnist", "eps": 0.3})
    code = cli_main(["eval", "--checkpoint", str(path), "--data-dir", str(data_dir), "--num-samples", "100",
                     "--aa-samples", "10", "--aa-version", "custom", "--aa-attacks", "apgd-ce", "--sweep-samples", "20",
                     "--no-progress", "--out", str(tmp_path / "ev")])
    assert code == 0
    out = capsys.readouterr().out
    assert "Natural" in out and "AutoAttack" in out
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    (only,) = res.values()
    assert only["n"] == 100 and only["na"] > 0.8   # a trained model (conftest: 94-97% measured), chance 10%
    man = json.loads((tmp_path / "ev" / "eval_manifest.json").read_text())
    assert man["checkpoint_sha256"] and man["samples"]["autoattack"] == 10
    assert man["config"]["eps"] == 0.3   # the training radius recorded in the checkpoint

    code = cli_main(["eval", "--checkpoint", str(path), "--model", "resnet18", "--data-dir", str(data_dir)])
    assert code == 2
    assert "trained for another model" in capsys.readouterr().err
    code = cli_main(["eval", "--checkpoint", str(path), "--dataset", "cifar10", "--data-dir", str(data_dir)])
    assert code == 2
    assert "in_chans" in capsys.readouterr().err
    code = cli_main(["eval", "--checkpoint", str(path), "--input-normalization", "none"])
    assert code == 2
    assert "--input-normalization is for plain state dicts" in capsys.readouterr().err


def test_default_eval_folder():
    from fastrobust.cli import default_eval_dir
    assert default_eval_dir("/r/run1/checkpoints/final.pt") == Path("/r/run1/eval")   # a run's checkpoint
    assert default_eval_dir("/downloads/model_cifar.pt") == Path("/downloads/eval")   # anything else: beside it


# ------------------------------------------------------------- faults while writing, and in training
TRAIN = ["train", "--dataset", "mnist", "--model", "smallcnn", "--no-progress"]

WRITER = r"""
import sys, time, torch
from fastrobust import checkpoint as ck, report
folder = sys.argv[1]
spec = {"name": "smallcnn", "num_classes": 10, "in_chans": 1, "img_size": 28, "mean": [0.0], "std": [1.0]}
ck.atomic_save({"format": ck.FORMAT, "spec": spec, "model": {"w": torch.ones(3)}, "step": 1}, folder + "/step-00000001.pt")

class Stalls:  # the file object atomic_save writes through (report.atomic_write): stops for good after 32 MB
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

report.open = lambda *a, **k: Stalls(open(*a, **k))   # the one atomic writer's open
big = {"format": ck.FORMAT, "spec": spec, "model": {f"w{i}": torch.randn(1 << 20) for i in range(24)}, "step": 2}  # 96 MB
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


def test_every_load_is_weights_only():
    """Audit: every torch.load in the packages refuses pickled code; numpy never unpickles."""
    sources = [p for d in ("fastrobust", "loaders", "recipes", "kernels") for p in (REPO / d).rglob("*.py")]
    loads = [(p, line) for p in sources for line in p.read_text().splitlines() if "torch.load(" in line]
    assert loads and all("weights_only=True" in line for _, line in loads), loads
    np_loads = [(p, line) for p in sources for line in p.read_text().splitlines() if re.search(r"\bnp\.load\(", line)]
    assert all("allow_pickle=False" in line for _, line in np_loads), np_loads


def test_checkpoint_of_another_architecture_or_class_count(tmp_path, data_dir):
    common = TRAIN + ["--data-dir", str(data_dir), "--train-limit", "64", "--batch-size", "32"]
    vgg = _save(create_model("vgg16", dataset="mnist"), tmp_path / "vgg.pt")
    line = _one_error_line(common + ["--init-checkpoint", str(vgg), "--out-dir", str(tmp_path / "a")], stdout_empty=False)
    assert "trained for another model (name: checkpoint has 'vgg16', expected 'smallcnn')" in line
    five = _save(create_model("smallcnn", dataset="mnist", num_classes=5), tmp_path / "five.pt")
    line = _one_error_line(common + ["--init-checkpoint", str(five), "--out-dir", str(tmp_path / "b")], stdout_empty=False)
    assert "num_classes: checkpoint has 5, expected 10" in line
    # --resume in a run folder whose checkpoints belong to another model
    _save(create_model("vgg16", dataset="mnist"), tmp_path / "c" / "checkpoints" / "step-00000003.pt")
    line = _one_error_line(common + ["--resume", "--out-dir", str(tmp_path / "c")], stdout_empty=False)
    assert "step-00000003.pt was trained for another model" in line


def test_disk_full_while_checkpointing(tmp_path, data_dir, monkeypatch):
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
    line = _one_error_line(TRAIN + ["--data-dir", str(data_dir), "--train-limit", "128", "--batch-size", "32",
                                           "--attack-steps", "1", "--ckpt-every-steps", "1", "--no-final-eval",
                                           "--val-samples", "0", "--out-dir", str(out)], stdout_empty=False)
    assert "could not write checkpoint" in line and "No space left on device" in line
    assert "previous checkpoint, if any, is untouched" in line
    monkeypatch.undo()
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-00000001.pt", "step-00000002.pt"]
    assert ck.load_checkpoint(out / "checkpoints" / "step-00000002.pt")["global_step"] == 2


# ------------------------------------------------------------------------ every kind of bad file
def _torch_bytes(obj, **kw) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kw)
    return buf.getvalue()


def _zip_bytes(**entries) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, text in entries.items():
            z.writestr(name, text)
    return buf.getvalue()


def _real_bytes(model=None) -> bytes:
    model = model or create_model("smallcnn", dataset="mnist")
    return _torch_bytes({"format": ck.FORMAT, "spec": model.spec.to_dict(), "model": model.state_dict()})


FIX = "Pass the .pt file written by fastrobust"
EARLIER = "Use an earlier checkpoint"
NOT_RUN = "Nothing in it was executed"


def _unloadable(reason: str) -> tuple[str, str]:
    """What the message says of a file torch's safe loader cannot read: torch's own reason, and the fix."""
    return f"cannot be loaded ({reason}", "state dict saved by torch.save, or use an earlier checkpoint"


# (name, file content (None: a directory), what the message must say the file is, and the fix it must name)
BAD_FILES = [
    ("empty", b"", *_unloadable("EOFError)")),
    ("directory", None, *_unloadable("IsADirectoryError: [Errno 21] Is a directory")),
    ("text", b"epoch 1: loss 0.52\nepoch 2: loss 0.31\n", *_unloadable("IndexError: pop from empty list")),
    ("json", json.dumps({"epochs": 100, "lr": 0.1}).encode(), *_unloadable("UnpicklingError: Unsupported operand 123")),
    ("random", bytes(range(7, 256)) * 3, *_unloadable("UnpicklingError: Unsupported operand 7")),
    ("truncated", _real_bytes()[:4000],
     *_unloadable("RuntimeError: PytorchStreamReader failed reading zip archive: failed finding central directory")),
    ("foreign zip", _zip_bytes(**{"readme.txt": "hi", "a.csv": "1,2"}),
     *_unloadable("RuntimeError: [enforce fail at inline_container.cc:180] . file in archive is not in a subdirectory")),
    ("torch zip without data.pkl", _zip_bytes(**{"archive/version": "3", "archive/data/0": "x"}),
     *_unloadable("RuntimeError: PytorchStreamReader failed locating file data.pkl: file not found")),
    ("legacy truncated", _torch_bytes({"w": torch.randn(500)}, _use_new_zipfile_serialization=False)[:900],
     *_unloadable("RuntimeError: unexpected EOF, expected")),
    ("legacy protocol 4", _torch_bytes({"w": torch.ones(2)}, pickle_protocol=4, _use_new_zipfile_serialization=False),
     *_unloadable("UnpicklingError: Unsupported operand 149")),
    ("whole model", _torch_bytes(create_model("smallcnn", dataset="mnist")),
     *_unloadable("UnpicklingError: WeightsUnpickler error: Unsupported global: GLOBAL fastrobust.models.RobustModel "
                  "was not an allowed global by default)")),
    ("plain pickle", pickle.dumps({"weights": [1.0, 2.0]}), *_unloadable("UnpicklingError: Unsupported operand 149")),
    ("state dict", _torch_bytes(create_model("smallcnn", dataset="mnist").state_dict()),
     "holds a plain state dict (16 tensors) with no model spec", "fastrobust eval --checkpoint FILE --model NAME"),
    ("newer format", _torch_bytes({"format": f"{ck.FORMAT_NAME}/{ck.FORMAT_VERSION + 1}", "spec": {}, "model": {}}),
     "was written by a newer fastrobust", "Upgrade fastrobust"),
    ("older format", _torch_bytes({"format": f"{ck.FORMAT_NAME}/0", "spec": {}, "model": {}}),
     "was written by an older fastrobust", "--model NAME"),
    ("damaged spec", _torch_bytes({"format": ck.FORMAT, "spec": [1, 2], "model": {"w": torch.ones(1)}}),
     "is a damaged fastrobust checkpoint (its 'spec' entry is list", EARLIER),
    ("no weights", _torch_bytes({"format": ck.FORMAT, "spec": create_model("smallcnn").spec.to_dict(), "model": "x"}),
     "is a damaged fastrobust checkpoint (its 'model' entry is not a state dict", EARLIER),
    ("other object", _torch_bytes([1, 2, 3]), "is not a fastrobust checkpoint", FIX),
]


def _no_torch_advice(message: str) -> None:
    """torch's advice to turn the safety off, or to allowlist what the file names, is never passed on."""
    assert "weights_only` set to `False`" not in message and "add_safe_globals" not in message, message


# where the CLI says more than the library: a state dict is evaluated, given --model
CLI_WORDS = {"state dict": ("holds a plain state dict with no model spec", "pass --model NAME")}


def _write_bad(tmp_path, content) -> Path:
    path = tmp_path / "bad.pt"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize("name,content,what,fix", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_file_is_named_with_its_fix(tmp_path, name, content, what, fix):
    path = _write_bad(tmp_path, content)
    with pytest.raises(CheckpointError) as e:
        ck.load_checkpoint(path)
    msg = str(e.value)
    assert str(path) in msg and what in msg and fix in msg, msg
    if "cannot be loaded" in what:   # the one error of every file torch cannot read: the file, the reason, the fix
        assert msg.startswith(f"checkpoint {path} cannot be loaded (") and NOT_RUN in msg and FIX in msg, msg
    _no_torch_advice(msg)
    # the CLI: the same words, one line, exit status 2, before any data is loaded (no --data-dir needed)
    what, fix = CLI_WORDS.get(name, (what, fix))
    line = _one_error_line(["eval", "--checkpoint", str(path), "--eps", "0.3"])
    assert what in line and fix in line, line
    _no_torch_advice(line)


def test_the_reported_file_etc_passwd(tmp_path):
    """Issue 13: ``fastrobust eval --checkpoint /etc/passwd`` printed a traceback."""
    passwd = Path("/etc/passwd")
    if not passwd.is_file():
        pytest.skip("no /etc/passwd here")
    line = _one_error_line(["eval", "--checkpoint", str(passwd)])
    assert "/etc/passwd cannot be loaded (" in line and NOT_RUN in line and FIX in line, line


def test_missing_and_unreadable_files(tmp_path):
    """The same one error: the OSError's own words say what is wrong with the path."""
    missing = tmp_path / "missing.pt"
    line = _one_error_line(["eval", "--checkpoint", str(missing)])
    assert f"{missing} cannot be loaded (FileNotFoundError: [Errno 2] No such file or directory" in line, line
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.pt"
        locked.write_bytes(_real_bytes())
        locked.chmod(0)
        line = _one_error_line(["eval", "--checkpoint", str(locked)])
        assert f"{locked} cannot be loaded (PermissionError: [Errno 13] Permission denied" in line, line


@pytest.mark.parametrize("container", ["zip", "legacy", "plain pickle"])
def test_code_in_a_file_is_never_executed(tmp_path, container):
    marker = tmp_path / "pwned"
    _Payload.marker = str(marker)
    obj = {"format": ck.FORMAT, "spec": {}, "model": {}, "payload": _Payload()}
    content = {"zip": lambda: _torch_bytes(obj), "legacy": lambda: _torch_bytes(obj, _use_new_zipfile_serialization=False),
               "plain pickle": lambda: pickle.dumps(obj)}[container]()
    path = tmp_path / "evil.pt"
    path.write_bytes(content)
    # Path.touch pickles as getattr(Path, "touch"); a plain pickle stops earlier, at its frame opcode
    reason = ("Unsupported operand 149" if container == "plain pickle"
              else "WeightsUnpickler error: Unsupported global: GLOBAL getattr was not an allowed global")
    with pytest.raises(CheckpointError, match="cannot be loaded") as e:
        ck.load_checkpoint(path)
    line = _one_error_line(["eval", "--checkpoint", str(path)])
    for msg in (str(e.value), line):
        assert reason in msg and NOT_RUN in msg and FIX in msg, msg
        _no_torch_advice(msg)
    assert not marker.exists()


def test_legacy_torch_file_with_plain_data_loads(tmp_path):
    """torch.save(..., _use_new_zipfile_serialization=False) (torch < 1.6's format) holding tensors and
    plain data loads like the zip format."""
    model = create_model("smallcnn", dataset="mnist")
    path = tmp_path / "legacy.pt"
    torch.save({"format": ck.FORMAT, "spec": model.spec.to_dict(), "model": model.state_dict()}, path,
               _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:2] != b"PK"
    loaded, _ = ck.load_model(path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


# -------------------------------------------------------------- property: no bad file gets through
def tiny_net(num_classes: int = 10, in_chans: int = 1, img_size: int = 28) -> nn.Module:
    """A registered model of 94 parameters: its checkpoint is ~6 KB, small enough to truncate at every offset."""
    return nn.Sequential(nn.Conv2d(in_chans, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, num_classes))


@pytest.fixture(scope="module")
def small_files(tmp_path_factory):
    """(folder, real checkpoint bytes, payload checkpoint bytes, the tiny model's spec). The checkpoint
    holds what the trainer writes (model, optimizer with momentum buffers, scaler, config, history,
    counters) except the RNG states, which alone are 15 KB."""
    folder = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)   # the same bytes on every run (torch.save itself is deterministic)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(models._REGISTRY, "tiny_net", tiny_net)
        model = create_model("tiny_net", dataset="mnist")
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model(torch.rand(2, 1, 28, 28)).sum().backward()
        opt.step()
        cfg = TrainConfig.from_dict({"dataset": "mnist", "model": "smallcnn", "eps": 0.3}).to_dict()
        state = {"format": ck.FORMAT, "spec": model.spec.to_dict(), "model": model.state_dict(),
                 "optimizer": opt.state_dict(), "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
                 "ema": None, "epoch": 1, "batch": 0, "global_step": 3, "best": 0.25, "history": "[]",
                 "config": cfg, "bad_steps": 0, "world_size": 1}
        real = ck.atomic_save(state, folder / "real.pt").read_bytes()
        marker = folder / "pwned"
        _Payload.marker = str(marker)
        evil = _torch_bytes({**state, "payload": _Payload()})
        assert ck.load_model(folder / "real.pt", expected=model.spec.to_dict())[0] is not None
    yield folder, real, evil, model.spec.to_dict()   # tests register tiny_net only while they run
    assert not marker.exists()


class Candidates:
    """Writes each candidate file under a fresh name. Rewriting one file in place (O_TRUNC) makes ext4
    flush it to disk (auto_da_alloc), ~5 ms a write: over every offset that alone would take a minute."""

    def __init__(self, folder: Path):
        self.folder, self.count, self.last = folder, 0, None

    def put(self, data: bytes) -> Path:
        if self.last is not None:
            self.last.unlink(missing_ok=True)
        self.count += 1
        self.last = self.folder / f"candidate-{self.count}.pt"
        self.last.write_bytes(data)
        return self.last


# What a bad file can be said to be: every message the loader or the CLI gives names one of these.
OUTCOMES = ("cannot be loaded", "damaged fastrobust checkpoint", "not a fastrobust checkpoint", "holds a plain state dict",
            "written by a newer", "written by an older", "trained for another model", "does not fit this model",
            "describes a model this version cannot build")


def _outcome(message: str, path: Path) -> str:
    assert str(path) in message, message
    found = [o for o in OUTCOMES if o in message]
    assert found, f"a message of no known kind: {message}"
    if found[0] == "cannot be loaded":   # the one error of a file torch cannot read: the reason's type, the fix
        assert NOT_RUN in message and FIX in message and "or use an earlier checkpoint" in message, message
        _no_torch_advice(message)
        return "cannot be loaded: " + re.match(r"[A-Za-z]+", message.split("cannot be loaded (", 1)[1]).group()
    return found[0]


def _check_library(path: Path, spec: dict) -> str:
    """The loader refuses with a CheckpointError naming the file and what it is, or (a flip in tensor data
    or padding) returns a checkpoint whose model loads or is refused the same way."""
    try:
        ckpt = ck.load_checkpoint(path)
    except CheckpointError as e:
        return _outcome(str(e), path)
    try:
        ck.load_model(path, expected=spec, ckpt=ckpt)
    except CheckpointError as e:
        return _outcome(str(e), path)
    return "loaded"


def _check_cli(path: Path) -> str:
    # --model smallcnn: a file that still loads stops at the architecture check, so every outcome is exit 2
    # and no data is read
    line = _one_error_line(["eval", "--checkpoint", str(path), "--model", "smallcnn", "--eps", "0.3",
                            "--data-dir", str(path.parent / "no-data")])
    return _outcome(line, path)


def _timed(label: str, started: tuple[float, float], outcomes: Counter | None = None) -> None:
    wall, cpu = time.perf_counter() - started[0], time.process_time() - started[1]
    print(f"\n{label}: {wall:.1f} s wall, {cpu:.1f} s CPU" + (f"; outcomes {dict(outcomes)}" if outcomes else ""))


def test_truncation_at_every_offset(small_files):
    folder, real, evil, spec = small_files
    files, started = Candidates(folder), (time.perf_counter(), time.process_time())
    for n in range(len(real)):
        path = files.put(real[:n])
        with pytest.raises(CheckpointError, match="cannot be loaded") as e:
            ck.load_checkpoint(path)
        assert _outcome(str(e.value), path).startswith("cannot be loaded: ")
    _timed(f"{len(real)} truncations", started)


FUZZ = settings(max_examples=300, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
# Prefixes that steer random bytes into each of torch's readers: zip, legacy torch (protocol 2 and its magic
# number), pickle, text.
LEGACY_HEAD = _torch_bytes(0, _use_new_zipfile_serialization=False)[:12]
PREFIXES = st.sampled_from([b"", b"PK\x03\x04", b"PK\x05\x06", b"\x80\x02", LEGACY_HEAD, b"\x80\x05",
                            b'{"format": "', b"\xef\xbb\xbf"])


@st.composite
def damaged_files(draw, real: bytes, evil: bytes) -> bytes:
    kind = draw(st.sampled_from(["random", "truncated", "flipped", "flipped and truncated"]))
    if kind == "random":
        return draw(PREFIXES) + draw(st.binary(max_size=600))
    data = bytearray(draw(st.sampled_from([real, evil])))
    if "flipped" in kind:
        for _ in range(draw(st.integers(1, 3))):
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    if "truncated" in kind:
        data = data[:draw(st.integers(0, len(data) - 1))]
    return bytes(data)


def _flip_in_tensor_data(data: bytes) -> bytes:
    """``data`` with one bit flipped inside the first tensor's bytes: a file that still loads."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and not i.filename.endswith("serialization_id"))
    local_header = 30 + len(info.filename) + int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    out = bytearray(data)
    out[info.header_offset + local_header] ^= 1
    return bytes(out)


@pytest.mark.parametrize("through", ["library", "cli"])
def test_damaged_files_property(small_files, through):
    """Random bytes, truncations and byte flips of a real checkpoint (and of one carrying a payload):
    the loader and ``fastrobust eval`` refuse with one line naming the file, torch's reason and the fix (exit
    status 2), or load valid tensors; never a traceback, never the payload."""
    folder, real, evil, spec = small_files
    files, outcomes, started = Candidates(folder), Counter(), (time.perf_counter(), time.process_time())

    @FUZZ
    @given(data=damaged_files(real, evil))
    def run(data):
        path = files.put(data)
        outcomes[_check_library(path, spec) if through == "library" else _check_cli(path)] += 1
        assert not (folder / "pwned").exists()

    # always among the examples, whatever hypothesis draws: a flip that still loads, the payload intact
    run = example(data=_flip_in_tensor_data(real))(example(data=evil)(run))
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(models._REGISTRY, "tiny_net", tiny_net)
        run()
    _timed(f"{through}: {sum(outcomes.values())} damaged files", started, outcomes)
    # the examples reached torch's pickle and archive readers, and files that load (derandomized: the same
    # examples on every run)
    loaded = "loaded" if through == "library" else "trained for another model"
    assert {"cannot be loaded: UnpicklingError", "cannot be loaded: RuntimeError", loaded} <= set(outcomes), outcomes


# -------------------------------------------------------------- plain state dicts from other code
class TradesLayoutSmallCNN(nn.Module):
    """The module names of the official TRADES SmallCNN (yaodongyu/TRADES models/small_cnn.py), written
    here from its published layout: what its checkpoints' keys look like
    (feature_extractor.conv1..conv4, classifier.fc1..fc3)."""

    def __init__(self):
        super().__init__()
        self.feature_extractor = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(1, 32, 3)), ("relu1", nn.ReLU()), ("conv2", nn.Conv2d(32, 32, 3)), ("relu2", nn.ReLU()),
            ("maxpool1", nn.MaxPool2d(2, 2)), ("conv3", nn.Conv2d(32, 64, 3)), ("relu3", nn.ReLU()),
            ("conv4", nn.Conv2d(64, 64, 3)), ("relu4", nn.ReLU()), ("maxpool2", nn.MaxPool2d(2, 2))]))
        self.classifier = nn.Sequential(OrderedDict([
            ("fc1", nn.Linear(64 * 4 * 4, 200)), ("relu1", nn.ReLU()), ("drop", nn.Dropout(0.5)),
            ("fc2", nn.Linear(200, 200)), ("relu2", nn.ReLU()), ("fc3", nn.Linear(200, 10))]))

    def forward(self, x):
        return self.classifier(self.feature_extractor(x).view(-1, 64 * 4 * 4))


def _trades_layout_state(trained) -> dict[str, torch.Tensor]:
    """``trained``'s weights in the official TRADES layout, for raw [0, 1] inputs: the model's MNIST
    normalisation (x - m) / s is folded into conv1 (exact algebra, conv1 has no padding), as a model
    trained without a normalisation layer would hold it."""
    src = trained.state_dict()
    mean, std = float(trained.normalize.mean.flatten()[0]), float(trained.normalize.std.flatten()[0])
    net = TradesLayoutSmallCNN()
    with torch.no_grad():
        for name, module in [*net.feature_extractor.named_children(), *net.classifier.named_children()]:
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                part = "features" if isinstance(module, nn.Conv2d) else "classifier"
                module.weight.copy_(src[f"net.{part}.{name}.weight"])
                module.bias.copy_(src[f"net.{part}.{name}.bias"])
        w = net.feature_extractor.conv1.weight
        net.feature_extractor.conv1.bias.sub_(w.sum(dim=(1, 2, 3)) * mean / std)
        w.div_(std)
    return net.state_dict()


def _by_hand(state: dict[str, torch.Tensor]) -> nn.Module:
    """The same weights loaded without fastrobust.checkpoint: renamed by hand, strict load."""
    model = create_model("smallcnn", dataset="mnist", normalization="none")
    own = {k: v for k, v in model.state_dict().items() if k.startswith("normalize.")}
    renamed = {k.replace("feature_extractor.", "net.features.", 1).replace("classifier.", "net.classifier.", 1): v
               for k, v in state.items()}
    model.load_state_dict({**own, **renamed}, strict=True)
    return model


def test_trades_layout_state_dict_evaluates_identically_through_the_cli(tmp_path, trained_smallcnn, data_dir):
    """Issue 13: the official TRADES SmallCNN layout, evaluated with ``--model smallcnn --dataset mnist
    --input-normalization none``, gives numbers IDENTICAL to the same weights loaded by hand and evaluated
    with the same EvalConfig and seed. Exact by construction on any CPU: the same model class, the same
    bits of weights, the same evaluation code and seed, in one process."""
    state = _trades_layout_state(trained_smallcnn)
    path = tmp_path / "model_mnist_smallcnn.pt"
    torch.save(state, path)
    flags = ["--num-samples", "100", "--attacks", "fgsm,pgd", "--pgd-steps", "5", "--sweep-samples", "20",
             "--eps", "0.3", "--seed", "3"]
    code, out, err = _cli(["eval", "--checkpoint", str(path), "--model", "smallcnn", "--dataset", "mnist",
                           "--input-normalization", "none", "--data-dir", str(data_dir), "--no-progress",
                           "--out", str(tmp_path / "cli"), *flags])
    assert code == 0, err
    (cli,) = json.loads((tmp_path / "cli" / "results.json").read_text()).values()
    assert "smallcnn (state dict, trades_smallcnn layout)" in out

    cfg = EvalConfig(dataset="mnist", num_samples=100, attacks=("fgsm", "pgd"), pgd_steps=5, sweep_samples=20,
                     eps=0.3, seed=3).resolved()
    manifest = json.loads((tmp_path / "cli" / "eval_manifest.json").read_text())
    assert manifest["config"] == json.loads(json.dumps(dataclasses.asdict(cfg)))   # the CLI evaluated exactly this
    data = loaders.load_arrays("mnist", "test", data_dir)
    device = resolve_device("auto")
    hand = evaluate(_by_hand(state).to(device), data.images, data.labels, cfg, device, progress=False)
    write_json(tmp_path / "hand.json", hand.to_dict())
    assert cli == json.loads((tmp_path / "hand.json").read_text())
    assert cli["na"] > 0.8 and cli["ra"]["pgd"] <= cli["na"]   # the folded weights are the trained model's


def test_trades_layout_with_dataparallel_prefix_and_a_mismatch(tmp_path):
    model = create_model("smallcnn", dataset="mnist", normalization="none")
    state = TradesLayoutSmallCNN().state_dict()
    assert ck.load_state_dict({f"module.{k}": v for k, v in state.items()}, model) == "trades_smallcnn"
    for k, v in state.items():
        assert torch.equal(model.state_dict()[k.replace("feature_extractor.", "net.features.")
                                              .replace("classifier.", "net.classifier.")], v), k
    # one layer renamed, one missing: the diff names just those keys, in this project's names, on one line
    bad = {k.replace("fc3.bias", "fc4.bias"): v for k, v in state.items() if k != "classifier.fc2.weight"}
    path = tmp_path / "bad.pt"
    torch.save(bad, path)
    line = _one_error_line(["eval", "--checkpoint", str(path), "--model", "smallcnn", "--dataset", "mnist", "--eps", "0.3"])
    assert ("(read in the trades_smallcnn layout) does not fit this model (missing ['net.classifier.fc2.weight', "
            "'net.classifier.fc3.bias']; unexpected ['net.classifier.fc4.bias'])") in line, line
    assert "pass the --model and --num-classes it was trained with" in line
    # another class count: the shapes
    wrong = dict(state, **{"classifier.fc3.weight": torch.zeros(5, 200), "classifier.fc3.bias": torch.zeros(5)})
    torch.save(wrong, path)
    line = _one_error_line(["eval", "--checkpoint", str(path), "--model", "smallcnn", "--dataset", "mnist", "--eps", "0.3"])
    assert "shape mismatch ['net.classifier.fc3.weight: (5, 200) vs (10, 200)'" in line, line
    # no --model: how to evaluate it
    torch.save(state, path)
    line = _one_error_line(["eval", "--checkpoint", str(path)])
    assert "holds a plain state dict with no model spec: pass --model NAME" in line and "--input-normalization" in line
    line = _one_error_line(["eval", "--checkpoint", str(path), "--model", "smallcnn", "--weights", "ema"])
    assert "--weights ema is for fastrobust checkpoints" in line


# kuangliu/pytorch-cifar's block has the same parameter names as ours (conv1, bn1, conv2, bn2, shortcut);
# the layouts differ above it (layer1..4 and linear against our stages and head), which is what is mapped.
_KuangliuBlock = models.BasicBlock


class KuangliuLayoutResNet18(nn.Module):
    """The CIFAR ResNet-18 of kuangliu/pytorch-cifar, as MART and FAAL use it, written here from its
    published layout: conv1, bn1, layer1..4 of two blocks, linear; 4x4 average pooling at the end."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (cout, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), 1):
            setattr(self, f"layer{i}", nn.Sequential(_KuangliuBlock(cin, cout, stride), _KuangliuBlock(cout, cout, 1)))
            cin = cout
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.avg_pool2d(out, 4).flatten(1))


def _kuangliu_key_to_ours(key: str) -> str:
    """This test's own reading of the layout (not the library's rules)."""
    head, _, rest = key.partition(".")
    if head.startswith("layer"):
        block, _, rest = rest.partition(".")
        return f"net.layers.{2 * (int(head[5:]) - 1) + int(block)}.{rest}"
    return {"conv1": "net.stem", "bn1": "net.stem_bn", "linear": "net.fc"}[head] + "." + rest


@pytest.mark.parametrize("prefix", ["", "module."])
def test_kuangliu_resnet18_layout_round_trip(prefix):
    torch.manual_seed(0)
    theirs = KuangliuLayoutResNet18()
    with torch.no_grad():   # random batch-norm statistics and affine parameters, so a misplaced one shows
        for m in theirs.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.num_batches_tracked.fill_(7)
    state = {prefix + k: v for k, v in theirs.state_dict().items()}
    ours = create_model("resnet18", dataset="cifar10", normalization="none")
    assert ck.load_state_dict(state, ours) == "cifar_resnet18"
    mine = ours.state_dict()
    assert set(mine) == {_kuangliu_key_to_ours(k) for k in theirs.state_dict()} | {"normalize.mean", "normalize.std"}
    for k, v in theirs.state_dict().items():
        assert torch.equal(mine[_kuangliu_key_to_ours(k)], v), k
    # and back: our weights in their layout load strictly into their module
    back = KuangliuLayoutResNet18()
    back.load_state_dict({k: mine[_kuangliu_key_to_ours(k)] for k in theirs.state_dict()}, strict=True)
    x = torch.rand(4, 3, 32, 32)
    theirs.eval(), ours.eval(), back.eval()
    with torch.no_grad():
        a, b, c = theirs(x), ours(x), back(x)
    assert torch.equal(a, c)
    # Same process, same conv/bn kernels on the same inputs; the only different kernel is the final 4x4
    # mean (avg_pool2d(4) vs adaptive_avg_pool2d(1)): a 16-term float32 sum in another order, a few ulp
    # (~1e-6 relative) on any instruction set, far inside this tolerance.
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert a.std() > 0.01   # not a degenerate comparison
