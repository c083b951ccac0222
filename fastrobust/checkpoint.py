"""Checkpoints: atomic writes, safe loads (``weights_only=True``), architecture checks.

A crash, a SIGKILL or a full disk during a save never leaves a half-written file under a
checkpoint's name: the bytes go to a temporary file in the same folder, are fsynced, and only then
renamed over the target (``os.replace`` is atomic on POSIX).
"""
from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .models import ModelSpec, RobustModel, model_from_spec

FORMAT = "fastrobust-checkpoint/1"
STEP_FILE = re.compile(r"^step-(\d+)\.pt$")
TEMP_FILE = re.compile(r"^\..+\.tmp-(\d+)$")


def atomic_save(obj: Any, path: str | Path) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create checkpoint folder {path.parent}: {e.strerror}. "
                              f"Choose a writable --out-dir.") from e
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"could not write checkpoint {path}: {e.strerror or e}. The previous checkpoint, "
                              f"if any, is untouched. Free disk space or choose another --out-dir.") from e
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load with ``weights_only=True``: a pickle that wants to run code is refused, never executed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist. Pass the path of a .pt file written by "
                              f"fastrobust (runs/<name>/checkpoints/final.pt).")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refused to load {path}: it holds objects other than tensors and plain data "
                              f"(weights_only=True rejected it: {str(e).splitlines()[0]}). Only load checkpoints "
                              f"you trust, and re-save them as plain state dicts.") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'no detail'}). Delete it and resume from an "
                              f"earlier checkpoint.") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "model" not in ckpt or "spec" not in ckpt:
        raise CheckpointError(f"{path} is not a fastrobust checkpoint (expected format {FORMAT!r} with 'spec' and "
                              f"'model' entries).")
    return ckpt


def check_spec(ckpt_spec: dict | ModelSpec, expected: dict | ModelSpec, path: str | Path = "checkpoint") -> None:
    """Compare architecture, class count and input geometry; raise naming every mismatch."""
    a = ckpt_spec.to_dict() if isinstance(ckpt_spec, ModelSpec) else dict(ckpt_spec)
    b = expected.to_dict() if isinstance(expected, ModelSpec) else dict(expected)
    diffs = [f"{k}: checkpoint has {a.get(k)!r}, expected {b.get(k)!r}"
             for k in ("name", "num_classes", "in_chans", "img_size") if k in b and a.get(k) != b.get(k)]
    if diffs:
        raise CheckpointError(f"{path} was trained for another model ({'; '.join(diffs)}). Build the model the "
                              f"checkpoint describes (fastrobust.checkpoint.load_model) or pass the matching "
                              f"--model/--dataset.")


def load_model(path: str | Path, device: str | torch.device = "cpu", expected: dict | None = None,
               weights: str = "model") -> tuple[RobustModel, dict]:
    """Rebuild the model a checkpoint describes and load its weights (``weights="ema"`` for the EMA copy)."""
    ckpt = load_checkpoint(path)
    if expected:
        check_spec(ckpt["spec"], expected, path)
    model = model_from_spec(ckpt["spec"])
    state = ckpt.get(weights) if weights == "ema" and ckpt.get("ema") is not None else ckpt["model"]
    load_weights(model, state, path)
    return model.to(device), ckpt


def load_weights(model: torch.nn.Module, state: dict, path: str | Path = "checkpoint") -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        detail = "; ".join(filter(None, [f"missing {missing[:4]}" if missing else "",
                                         f"unexpected {unexpected[:4]}" if unexpected else "",
                                         f"shape mismatch {shapes[:3]}" if shapes else ""]))
        raise CheckpointError(f"{path} does not fit this model ({detail}). It was saved from another "
                              f"architecture or class count.")
    model.load_state_dict(state)


def step_checkpoints(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def newest_valid(folder: str | Path) -> tuple[Path, dict] | None:
    """The newest step checkpoint that loads; corrupt ones are reported and skipped."""
    for path in reversed(step_checkpoints(folder)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            warnings.warn(f"skipping unusable checkpoint: {e}", stacklevel=2)
    return None


def clean_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files of writers that died mid-save (SIGKILL, power loss): their process
    no longer exists. They never carry a checkpoint's name, so nothing ever loads them; this only
    frees the space. Returns what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = TEMP_FILE.match(p.name)
        if m and not _process_alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prune(folder: str | Path, keep: int) -> None:
    for path in step_checkpoints(folder)[:-keep]:
        path.unlink(missing_ok=True)
