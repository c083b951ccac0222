import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastrobust import checkpoint as ck
from fastrobust.cli import main as cli_main
from fastrobust.errors import CheckpointError
from fastrobust.models import create_model

REPO = Path(__file__).resolve().parents[1]


def _save(model, path, **extra):
    state = {"format": ck.FORMAT, "spec": model.spec.to_dict(), "model": model.state_dict(),
             "config": {"dataset": "mnist"}, **extra}
    return ck.atomic_save(state, path)


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
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        ck.load_checkpoint(path)


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(_Payload.marker),))


def test_malicious_pickle_is_refused_not_executed(tmp_path):
    _Payload.marker = str(tmp_path / "pwned")
    path = tmp_path / "evil.pt"
    torch.save({"format": ck.FORMAT, "spec": {}, "model": {}, "payload": _Payload()}, path)
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(CheckpointError, match="refused"):
        ck.load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


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


def test_cli_eval_runs_and_rejects_mismatch(tmp_path, trained_smallcnn, data_dir, capsys):
    path = _save(trained_smallcnn, tmp_path / "run" / "checkpoints" / "final.pt")
    code = cli_main(["eval", "--checkpoint", str(path), "--data-dir", str(data_dir), "--num-samples", "100",
                     "--aa-samples", "10", "--sweep-samples", "20", "--no-progress", "--out", str(tmp_path / "ev")])
    assert code == 0
    out = capsys.readouterr().out
    assert "Natural" in out and "AutoAttack" in out
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    (only,) = res.values()
    assert only["n"] == 100 and only["na"] > 0.9
    man = json.loads((tmp_path / "ev" / "eval_manifest.json").read_text())
    assert man["checkpoint_sha256"] and man["samples"]["autoattack"] == 10

    code = cli_main(["eval", "--checkpoint", str(path), "--model", "resnet18", "--data-dir", str(data_dir)])
    assert code == 2
    assert "trained for another model" in capsys.readouterr().err
    code = cli_main(["eval", "--checkpoint", str(path), "--dataset", "cifar10", "--data-dir", str(data_dir)])
    assert code == 2
    assert "in_chans" in capsys.readouterr().err
