"""Checkpoints: atomic writes, safe loads (``weights_only=True``) that say what a bad file is, architecture
checks, and plain state dicts from other code (the official TRADES and MART layouts included).

A crash, a SIGKILL or a full disk during a save never leaves a half-written file under a checkpoint's
name: the bytes go to a temporary file in the same folder, are fsynced, and only then renamed over the
target (``os.replace`` is atomic on POSIX). A file that is not a checkpoint (empty, a folder, text,
random bytes, a truncated or foreign zip, a pickle of arbitrary objects) is named as such in a
CheckpointError; nothing in a file is ever executed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
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
# torch's pre-1.6 (non-zip) files start with a pickle of this magic number (LONG1, 10 bytes), after the
# pickle protocol header (and, from protocol 4, a frame header)
TORCH_MAGIC = b"\x8a\nl\xfc\x9cF\xf9 j\xa8"
HEAD_BYTES = 64
EARLIER = "Use an earlier checkpoint"
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


def _decodes_as_text(head: bytes, complete: bool) -> str | None:
    """``head`` as text if it is printable UTF-8 (a multi-byte character cut at the end of an incomplete
    head does not count against it), else None."""
    for cut in ((0,) if complete else (0, 1, 2, 3)):
        try:
            text = head[:len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        return text if all(c.isprintable() or c in "\n\r\t" for c in text) else None
    return None


def _what_is(path: Path, head: bytes) -> str | None:
    """What a file that cannot be a torch checkpoint is, from its first bytes (None: it may be one)."""
    if len(head) < 4 and b"PK\x03\x04".startswith(head):
        return f"corrupt or truncated: {len(head)} byte(s), the start of a zip archive (torch's format). {EARLIER}"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as e:
            return (f"corrupt or truncated: a zip archive (torch's format) that cannot be opened ({e}); its write was "
                    f"cut short or it was damaged. {EARLIER}")
        if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            if any(n.endswith("/version") or "/data/" in n for n in names):   # torch's other entries are there
                return f"corrupt: a torch zip archive whose data.pkl entry is missing or damaged. {EARLIER}"
            return (f"a zip archive that is not a torch file (no data.pkl among its {len(names)} entries, e.g. "
                    f"{sorted(names)[:3]}). {FIX}")
        return None
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        if TORCH_MAGIC in head[:32]:
            return None   # a legacy (pre-1.6, non-zip) torch file
        return (f"a plain Python pickle (protocol {head[1]}), not a torch file. It was not unpickled: unpickling an "
                f"untrusted file can run code. Save tensors with torch.save(model.state_dict(), path)")
    text = _decodes_as_text(head, complete=len(head) < HEAD_BYTES)
    if text is not None:
        kind = "a text file"
        try:
            if path.stat().st_size <= 16 << 20:   # JSON or not only matters for the message
                json.loads(path.read_text())
                kind = "a JSON file"
        except (ValueError, OSError):
            pass
        return f"{kind} (it starts with {text[:40]!r}), not a torch checkpoint. {FIX}"
    return f"not a torch checkpoint (unrecognised binary content, first bytes {head[:8].hex(' ')}). {FIX}"


def _first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def _unpickling_detail(text: str) -> str:
    """The specific line of torch's weights-only error, without its banner and advice."""
    boiler = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(boiler)]
    return lines[0] if lines else "the unpickler stopped"


def read(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> Any:
    """The object stored in ``path``, loaded with ``weights_only=True`` (nothing in the file is executed);
    every failure is a CheckpointError that says what the file is and what to do. ``mmap``: map the tensors
    of a zip-format file instead of reading them (copy-on-write), for reading a checkpoint's metadata."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist. {FIX}.")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, not a file. {FIX}.")
    try:
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {e.strerror or e}. Check the path and its "
                              f"permissions.") from e
    if not head:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): its write never completed. Use an earlier "
                              f"checkpoint.")
    problem = _what_is(path, head)
    if problem:
        raise CheckpointError(f"checkpoint {path} is {problem}.")
    legacy = not head.startswith(b"PK")
    what = "legacy (pre-1.6, non-zip) torch file" if legacy else "torch file"
    try:
        # torch warns on stderr about some legacy files; the outcome (loaded or a CheckpointError) says it all
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and not legacy)
    except pickle.UnpicklingError as e:
        text = str(e)
        blocked = re.search(r"GLOBAL (\S+?)(?:\s|\.?$)", text)
        if blocked or "Can only build" in text or "Can only create new object" in text:
            found = f"refers to the Python global {blocked.group(1)}" if blocked else "builds Python objects"
            # torch's own message suggests weights_only=False: the one thing not to do with a file of unknown origin
            raise CheckpointError(f"refused to load {path}: it is a {what} that {found}, not only tensors and plain "
                                  f"data, and unpickling it could run code; nothing in it was executed. A whole model "
                                  f"saved with torch.save(model) is such a file: where it was made, re-save "
                                  f"model.state_dict() and pass that. A fastrobust checkpoint that reads so is damaged: "
                                  f"use an earlier one.") from e
        if "Unsupported operand" in text:
            raise CheckpointError(f"checkpoint {path} is a {what} that torch's safe loader cannot read "
                                  f"({_unpickling_detail(text)}): it is corrupt, or was saved with "
                                  f"pickle_protocol 4 or higher. Re-save it with torch.save's default protocol, or use "
                                  f"an earlier checkpoint.") from e
        raise CheckpointError(f"checkpoint {path} is a corrupt or truncated {what} ({_unpickling_detail(text)}). "
                              f"Use an earlier checkpoint.") from e
    except Exception as e:  # noqa: BLE001 - torch raises many types for damaged files; all mean the same here
        raise CheckpointError(f"checkpoint {path} is a corrupt or truncated {what} ({type(e).__name__}: "
                              f"{_first_line(e)}). Use an earlier checkpoint.") from e


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
        if not isinstance(value, tp) or isinstance(value, bool):
            return f"spec {key!r} is {value!r}"
        if tp is int and value < 1:
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
        detail = "; ".join(filter(None, [f"missing {missing[:4]}" + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
                                         if missing else "",
                                         f"unexpected {unexpected[:4]}" + (f" and {len(unexpected) - 4} more"
                                                                           if len(unexpected) > 4 else "")
                                         if unexpected else "",
                                         f"shape mismatch {shapes[:3]}" if shapes else ""]))
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
    if not folder.is_dir():
        return []
    found = [(n, p) for p in folder.iterdir() if (n := step_of(p.name)) is not None and p.is_file()]
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


def prune(checkpoints: dict[int, Path], keep: int) -> None:
    """Delete all but the newest ``keep`` of ``checkpoints`` (step -> path, removed from it as they go):
    the rolling checkpoints a run wrote or validated. A file only named like one (damaged, foreign) is
    not among them, so it never takes a kept place and is never deleted."""
    for step in sorted(checkpoints)[:-keep]:
        checkpoints.pop(step).unlink(missing_ok=True)
