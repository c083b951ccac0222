"""Checkpoints: atomic writes, safe loads (``weights_only=True``), architecture checks, and plain state
dicts from other code (the official TRADES and MART layouts included).

A crash, a SIGKILL or a full disk during a save never leaves a half-written file under a checkpoint's
name: the bytes go to a temporary file in the same folder, are fsynced, and only then renamed over the
target (``os.replace`` is atomic on POSIX). Every file is read by ``torch.load(weights_only=True)``, the
safety boundary: it builds only tensors and plain data, so nothing in a file is ever executed. A file it
cannot read (missing, empty, text, a truncated or foreign archive, a pickled model) is one CheckpointError
naming the file and the loader's own reason; one that loads but is not a checkpoint of this format says
what it holds instead.
"""
from __future__ import annotations

import dataclasses
import os
import random
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError, ConfigError
from .models import ModelSpec, RobustModel, model_from_spec
from .report import atomic_write

FORMAT_NAME = "fastrobust-checkpoint"
FORMAT_VERSION = 1
FORMAT = f"{FORMAT_NAME}/{FORMAT_VERSION}"
# The trainer names rolling checkpoints step-{global_step:08d}.pt; only a name of exactly that form
# (the canonical spelling of its number) is ever read as one, and pruned only once it has loaded.
STEP_FILE = re.compile(r"^step-(\d{8,})\.pt$")
TEMP_FILE = re.compile(r"^\..+\.tmp-(\d+)$")
FIX = "Pass the .pt file written by fastrobust (runs/<name>/checkpoints/final.pt) or a state dict saved by torch.save"
HOW_TO_EVAL_STATE_DICT = ("evaluate it with fastrobust eval --checkpoint FILE --model NAME (and --dataset, and --input-normalization none|cifar10|mnist "
                          "for a model that expects normalised inputs)")


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save through the one atomic writer (report.atomic_write)."""
    try:
        return atomic_write(path, lambda f: torch.save(obj, f))
    except OSError as e:
        raise CheckpointError(f"could not write checkpoint {path}: {e.strerror or e}. The previous checkpoint, "
                              f"if any, is untouched. Free disk space or choose another --out-dir.") from e


def _first_line(e: BaseException) -> str:
    """``e``'s type and the first sentence of its first line that is not torch's banner or advice (torch's
    weights-only errors suggest weights_only=False: the one thing not to do with a file of unknown origin)."""
    line = next((x for x in map(str.strip, str(e).splitlines())
                 if x and not x.startswith("Weights only load failed") and "weights_only" not in x), "")
    sentence = re.split(r"\.\s+(?=[A-Z])", line)[0].rstrip(".")   # the sentences after it are advice too
    return f"{type(e).__name__}: {sentence}" if sentence else type(e).__name__


def read(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> Any:
    """The object stored in ``path``, loaded with ``weights_only=True`` (nothing in the file is executed);
    any failure is one CheckpointError naming the file and the loader's reason. ``mmap``: map the tensors
    of a zip-format file instead of reading them (copy-on-write), for reading a checkpoint's metadata."""
    try:
        # torch (third party) warns on stderr about some legacy files; the outcome alone is what counts
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            zipped = zipfile.is_zipfile(path)   # a legacy (pre-1.6, non-zip) torch file loads, but is not mapped
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and zipped)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files; all mean the same here
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({_first_line(e)}). Nothing in it was executed "
                              f"(torch.load with weights_only=True builds only tensors and plain data). {FIX}, or use "
                              f"an earlier checkpoint.") from e


def state_dict_in(obj: Any) -> dict[str, torch.Tensor] | None:
    """The plain state dict in ``obj`` (itself, or under 'state_dict' / 'model_state_dict'), else None."""
    for candidate in (obj, *(obj.get(k) for k in ("state_dict", "model_state_dict") if isinstance(obj, dict))):
        if isinstance(candidate, dict) and candidate and all(isinstance(k, str) and torch.is_tensor(v)
                                                             for k, v in candidate.items()):
            return candidate
    return None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """A fastrobust checkpoint (format, spec, weights); anything else is a CheckpointError that says what it is."""
    return check_format(read(path, map_location, mmap=mmap), path)


def check_format(obj: Any, path: str | Path) -> dict:
    """``obj`` (what :func:`read` returned) if it is a fastrobust checkpoint of this format, else the error
    that says what it is: another format version, a plain state dict, a damaged checkpoint, something else."""
    if isinstance(obj, dict) and isinstance(obj.get("format"), str):
        name, _, version = obj["format"].partition("/")
        if name == FORMAT_NAME and version.isdigit() and int(version) != FORMAT_VERSION:
            newer = int(version) > FORMAT_VERSION
            raise CheckpointError(f"{path} was written by {'a newer' if newer else 'an older'} fastrobust (checkpoint "
                                  f"format {obj['format']}; this version reads {FORMAT}). "
                                  + ("Upgrade fastrobust." if newer else "Re-save its weights as a plain state dict "
                                     "with the version that wrote it, and " + HOW_TO_EVAL_STATE_DICT + "."))
        if obj["format"] == FORMAT:
            problem = _structure_problem(obj)
            if problem:
                raise CheckpointError(f"{path} is a damaged fastrobust checkpoint ({problem}). Use an earlier "
                                      f"checkpoint.")
            return obj
    state = state_dict_in(obj)
    if state is not None:
        raise CheckpointError(f"{path} holds a plain state dict ({len(state)} tensor{'s' * (len(state) != 1)}) with no "
                              f"model spec: {HOW_TO_EVAL_STATE_DICT}.")
    raise CheckpointError(f"{path} is not a fastrobust checkpoint (expected format {FORMAT!r} with 'spec' and 'model' "
                          f"entries; it holds an object of type {type(obj).__name__}"
                          + (f" with keys {sorted(map(str, obj))[:6]}" if isinstance(obj, dict) else "") + "). "
                          + FIX + ".")


SPEC_TYPES = {"name": str, "num_classes": int, "in_chans": int, "img_size": int, "mean": (list, tuple),
              "std": (list, tuple)}


def _structure_problem(obj: dict) -> str | None:
    """What is wrong with the entries of a checkpoint that claims this format (None: nothing). Checked
    here so that a damaged file fails as one, not later as a KeyError or TypeError."""
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return f"its 'spec' entry is {type(spec).__name__ if 'spec' in obj else 'missing'}, not a model spec"
    for key, tp in SPEC_TYPES.items():
        value = spec.get(key)
        if not isinstance(value, tp) or isinstance(value, bool) or (tp is int and value < 1):
            return f"spec {key!r} is {value!r}"
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (*spec["mean"], *spec["std"])):
        return "spec 'mean'/'std' hold non-numbers"
    for key in ("model", "ema"):
        state = obj.get(key)
        if key == "ema" and state is None:
            continue
        if not isinstance(state, dict) or not state or not all(isinstance(k, str) and torch.is_tensor(v)
                                                              for k, v in state.items() if k != "n_averaged"):
            return f"its {key!r} entry is not a state dict of tensors"
    config = obj.get("config") or {}
    if not isinstance(config, dict):
        return "its 'config' entry is not a mapping"
    from .config import training_radius
    radius = training_radius(config)
    if not isinstance(config.get("dataset", ""), str) or not isinstance(radius, (int, float, type(None))):
        return f"config dataset {config.get('dataset')!r} / eps {radius!r}"   # what eval reads from it
    return None


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
               weights: str = "model", ckpt: dict | None = None) -> tuple[RobustModel, dict]:
    """Rebuild the model a checkpoint describes and load its weights (``weights="ema"`` for the EMA copy);
    ``ckpt``: the checkpoint, when it is loaded already."""
    ckpt = load_checkpoint(path) if ckpt is None else ckpt
    if expected:
        check_spec(ckpt["spec"], expected, path)
    try:
        model = model_from_spec(ckpt["spec"])
    except ConfigError as e:   # a spec this version cannot build (a model it does not have, say)
        raise CheckpointError(f"{path} describes a model this version cannot build: {e}") from e
    if weights == "ema":
        if ckpt.get("ema") is None:
            raise CheckpointError(f"{path} holds no EMA weights (it was trained without --ema-decay): evaluate "
                                  f"--weights model.")
        # an AveragedModel's state dict: the model's keys under "module.", and its update counter
        state = {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k != "n_averaged"}
    elif weights == "model":
        state = ckpt["model"]
    else:
        raise ConfigError(f"weights must be 'model' or 'ema', got {weights!r}")
    load_weights(model, state, path)
    return model.to(device), ckpt


def load_weights(model: torch.nn.Module, state: dict, path: str | Path = "checkpoint") -> None:
    """Strict load, with a diff of missing, unexpected and mis-shaped keys when ``state`` does not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        detail = "; ".join(f"{label} {keys[:n]}" + (f" and {len(keys) - n} more" if len(keys) > n else "")
                           for label, keys, n in (("missing", missing, 4), ("unexpected", unexpected, 4),
                                                  ("shape mismatch", shapes, 3)) if keys)
        raise CheckpointError(f"{path} does not fit this model ({detail}). It was saved from another "
                              f"architecture or class count.")
    model.load_state_dict(state)


# ------------------------------------------------------------------------------- foreign state dicts
# Key renames from other code's layouts into this project's modules (``net.`` inside RobustModel).
# TRADES' SmallCNN (yaodongyu/TRADES models/small_cnn.py): feature_extractor.* / classifier.*;
# the CIFAR ResNet-18 of MART (YisenWang/MART resnet.py) and FAAL, the kuangliu/pytorch-cifar layout:
# conv1, bn1, layer1..4 of two blocks, linear.
FOREIGN_LAYOUTS: dict[str, list[tuple[str, str]]] = {
    "fastrobust": [(r"^", "net.")],
    "trades_smallcnn": [(r"^feature_extractor\.", "net.features."), (r"^classifier\.", "net.classifier.")],
    "cifar_resnet18": [(r"^conv1\.", "net.stem."), (r"^bn1\.", "net.stem_bn."), (r"^linear\.", "net.fc."),
                       (r"^layer([1-4])\.([01])\.",
                        lambda m: f"net.layers.{2 * (int(m.group(1)) - 1) + int(m.group(2))}.")],
}


def _renamed(state: dict[str, torch.Tensor], rules: list) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        for pattern, repl in rules:   # the first rule that matches renames the key
            new = re.sub(pattern, repl, k, count=1)
            if new != k or pattern == r"^":
                k = new
                break
        out[k] = v
    return out


def adapt_state_dict(state: dict[str, torch.Tensor], model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """``state`` renamed into ``model``'s keys: as it is, or from one of :data:`FOREIGN_LAYOUTS` (after
    dropping a DataParallel ``module.`` prefix). The input normalisation buffers come from ``model``
    unless ``state`` has its own. Returns the state and the layout's name. A state that fits no layout
    exactly comes back in the layout that names most of ``model``'s keys, so that the diff
    :func:`load_weights` reports is about the few keys that really differ."""
    own = model.state_dict()
    norm_keys = {k: v for k, v in own.items() if k.startswith("normalize.")}
    state = {re.sub(r"^module\.", "", k): v for k, v in state.items()}
    candidates = [("as saved", dict(state))] + [(name, _renamed(state, rules)) for name, rules in FOREIGN_LAYOUTS.items()]
    scored = []
    for name, cand in candidates:
        if not any(k.startswith("normalize.") for k in cand):
            cand = {**norm_keys, **cand}
        if set(cand) == set(own) and all(tuple(cand[k].shape) == tuple(own[k].shape) for k in own):
            return cand, name
        scored.append((len(set(cand) & set(own)) - len(norm_keys), name, cand))
    best = max(scored, key=lambda t: t[0])   # max keeps the first of equals: "as saved" unless a layout names more
    return best[2], best[1]


def load_state_dict(state: dict[str, torch.Tensor], model: torch.nn.Module, path: str | Path = "state dict") -> str:
    """Load a plain state dict into ``model`` (strict, foreign layouts mapped); returns the layout's name.
    A state dict that does not fit is a CheckpointError with the diff of keys (in ``model``'s names)."""
    state, layout = adapt_state_dict(state, model)
    try:
        load_weights(model, state, path if layout == "as saved" else f"{path} (read in the {layout} layout)")
    except CheckpointError as e:
        raise CheckpointError(f"{e} For a state dict, pass the --model and --num-classes it was trained with.") from e
    return layout


# ------------------------------------------------------------------------------- resume bookkeeping
def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
             "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_name(step: int) -> str:
    return f"step-{step:08d}.pt"


def step_of(name: str) -> int | None:
    """The step a rolling checkpoint's file name stands for; None for any name the trainer does not
    write (step-1.pt, step-000000001.pt, step-00000001.pt.bak)."""
    m = STEP_FILE.match(name)
    return int(m.group(1)) if m and name == step_name(int(m.group(1))) else None


def step_checkpoints(folder: str | Path) -> list[Path]:
    """The files in ``folder`` named as rolling checkpoints, oldest first (not yet read)."""
    folder = Path(folder)
    found = [(n, p) for p in (folder.iterdir() if folder.is_dir() else ()) if (n := step_of(p.name)) is not None
             and p.is_file()]
    return [p for _, p in sorted(found)]


# what a checkpoint must hold to continue training from it (a weights-only file is not one)
TRAINING_STATE = ("optimizer", "scaler", "rng", "epoch", "batch", "global_step", "history", "config")


def resume_problem(ckpt: dict, step: int) -> str | None:
    """Why a loaded rolling checkpoint cannot be resumed from (None: it can)."""
    missing = [k for k in TRAINING_STATE if k not in ckpt]
    if missing:
        return (f"it holds weights but no training state ({', '.join(missing)} missing); to start from these "
                f"weights use --init-checkpoint")
    if not isinstance(ckpt["config"], dict) or not isinstance(ckpt["global_step"], int):
        return "its config or step entry is damaged"
    if ckpt["global_step"] != step:
        return f"it holds step {ckpt['global_step']}, not the step {step} its name says"
    return None


@dataclasses.dataclass
class StepScan:
    """The rolling checkpoints of a folder after a metadata read of each."""
    valid: list[tuple[int, Path]]         # resumable, oldest first: the only ones pruning may delete
    rejected: list[tuple[Path, str]]      # named like one but unusable, and why (never deleted)
    newest: dict | None = None            # the newest valid one's content, its tensors memory-mapped


def scan_step_checkpoints(folder: str | Path, expected_spec: dict | ModelSpec | None = None) -> StepScan:
    """Read every rolling checkpoint in ``folder`` (memory-mapped: the metadata, not the tensors). A file
    that does not load, holds no training state, or whose step is not the one in its name is rejected
    with the reason. The newest loadable one must be for ``expected_spec`` (a CheckpointError names the
    difference); an older one that is not is rejected."""
    scan = StepScan([], [])
    for path in reversed(step_checkpoints(folder)):
        try:
            ckpt = load_checkpoint(path, mmap=True)
        except CheckpointError as e:
            scan.rejected.append((path, str(e)))
            continue
        if expected_spec is not None:
            try:
                check_spec(ckpt["spec"], expected_spec, path)
            except CheckpointError as e:
                if scan.newest is None:   # the checkpoint a resume would continue from
                    raise
                scan.rejected.append((path, str(e)))
                continue
        problem = resume_problem(ckpt, step_of(path.name))
        if problem:
            scan.rejected.append((path, f"checkpoint {path} cannot be resumed from: {problem}."))
            continue
        if scan.newest is None:
            scan.newest = ckpt
        scan.valid.insert(0, (step_of(path.name), path))
    return scan


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
    folder, removed = Path(folder), []
    for p in (folder.iterdir() if folder.is_dir() else ()):
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


def prune(checkpoints: dict[int, Path], keep: int) -> None:
    """Delete all but the newest ``keep`` of ``checkpoints`` (step -> path, removed from it as they go):
    the rolling checkpoints a run wrote or validated. A file only named like one (damaged, foreign) is
    not among them, so it never takes a kept place and is never deleted."""
    for step in sorted(checkpoints)[:-keep]:
        checkpoints.pop(step).unlink(missing_ok=True)
