"""A run folder holds one run, written by one process, with one history: README "Run folders" states
the rules (resume continues only the run it was, a fresh run never silently replaces another, one
writer per folder, resume leaves a clean history) and this module enforces them.

Everything that decides whether a start may proceed (:func:`inspect`) only reads; :func:`prepare`
changes the folder, under the lock (:class:`FolderLock`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from . import checkpoint as ckpt_io
from . import report
from .errors import CheckpointError, ConfigError

LOCK_FILE = ".lock"
# What a run writes into its folder (the trainer, its final evaluation, and `fastrobust eval` of its
# checkpoints into eval/): the files an overwrite removes. Anything else is left where it is.
RUN_FILES = ("manifest.json", "log.jsonl", "epochs.csv", "curves.png", "results.md", "results.csv", "results.json",
             "eval_manifest.json", "eps_sweep.png", "na_ra.png", "throughput.md", "throughput.json", "run_time.json")
RUN_FILE_PATTERNS = ("points*.npz", "events.out.tfevents.*")
EVAL_FILES = ("results.md", "results.csv", "results.json", "eval_manifest.json", "eps_sweep.png", "na_ra.png")
NAMED_CHECKPOINTS = ("best.pt", "final.pt")

# The TrainConfig fields (eval's as "eval.<field>") that may differ when a run is resumed, and why
# they do not change the trained model. Deny by default: every field not listed here (one added to
# TrainConfig later included) must be equal.
MAY_DIFFER: dict[str, str] = {
    "device": "where the run computes (a pre-empted job resumes on another node); what a device changes "
              "beyond rounding, the autocast precision and the dropped partial batch, is checked separately",
    "loader": "the gpu and torch backends yield the same batches for the same seed (ffcv augments with its "
              "own RNG, so a change to or from ffcv counts)",
    "data_dir": "where the dataset is read from",
    "beton_dir": "where FFCV files are cached",
    "out_dir": "the folder's own path (a moved folder still resumes)",
    "resume": "how this start treats the folder",
    "overwrite": "how this start treats the folder",
    "progress": "progress bars",
    "tensorboard": "whether the logged statistics are also written as TensorBoard events",
    "log_every": "how often statistics are logged (computing them draws no random numbers)",
    "ckpt_every_steps": "how often state is saved; resuming from any checkpoint is exact",
    "max_bad_steps": "when a series of skipped non-finite steps stops the run; a step is skipped or taken "
                     "the same way whatever it is",
    "final_eval": "the test-set evaluation after training",
    # the final evaluation only: the per-epoch validation that picks best.pt uses PGD at the run's seed,
    # so the PGD settings, eps, norm and batch size (each batch's random start) stay fixed
    **{f"eval.{key}": "the final evaluation only" for key in (
        "attacks", "num_samples", "aa_samples", "aa_version", "aa_attacks", "sweep_samples", "sweep_multipliers")},
    "eval.seed": "the final evaluation only (validation uses the run's seed)",
}
# allowed only between some values
MAY_DIFFER_IF: dict[str, Callable[[Any, Any], bool]] = {
    "loader": lambda old, new: "ffcv" not in (old, new),
}
START_OPTIONS = ("resume", "overwrite")   # always differ on a resume: not recorded as changes
_MISSING = object()


# ----------------------------------------------------------------------------------------- config
def _flat(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{"eval": {"seed": 0}}`` -> ``{"eval.seed": 0}``, values as JSON reads them (tuples as lists)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = json.loads(json.dumps(value, default=str))
    return out


def _defaults(method_name: Any) -> dict[str, Any]:
    """The flat default config (with ``method_name``'s default options): what a field that a checkpoint
    does not record meant when it was written, since a field is added with the old behaviour as default."""
    from .config import TrainConfig
    from .methods import METHODS
    cfg = TrainConfig(method=METHODS[method_name]()) if method_name in METHODS else TrainConfig()
    return _flat(cfg.to_dict())


def _show(value: Any) -> str:
    if value is _MISSING:
        return "(not recorded)"
    return "none" if value is None else value if isinstance(value, str) else json.dumps(value)


def compare_configs(old: dict, new: dict) -> tuple[list[str], dict[str, list]]:
    """``(training, allowed)``: the differences that change the trained model, as ``field: old -> new``
    lines, and the others as ``{field: [old, new]}`` (:data:`START_OPTIONS` left out). A record of an
    older layout (flat training-attack keys, a method option renamed since) compares in today's names."""
    from .config import upgraded
    old_flat, new_flat = _flat(upgraded(old)), _flat(upgraded(new))
    defaults = _defaults(old_flat.get("method.name"))
    method_changed = old_flat.get("method.name") != new_flat.get("method.name")
    training, allowed = [], {}
    for key in [*new_flat, *(k for k in old_flat if k not in new_flat)]:
        if method_changed and key.startswith("method.") and key != "method.name":
            continue   # another method's options are not comparable: the name says it all
        a, b = old_flat.get(key, defaults.get(key, _MISSING)), new_flat.get(key, _MISSING)
        if a == b:
            continue
        if key in MAY_DIFFER and MAY_DIFFER_IF.get(key, lambda x, y: True)(a, b):
            if key not in START_OPTIONS:
                allowed[key] = [None if a is _MISSING else a, None if b is _MISSING else b]
        else:
            training.append(f"{key}: {_show(a)} -> {_show(b)}")
    return training, allowed


def merged_changes(resumes: list[dict]) -> dict[str, list]:
    """``{field: [value before the first resume that changed it, value now]}`` over a run's resumes."""
    merged: dict[str, list] = {}
    for resume in resumes:
        for key, (old, new) in (resume.get("changes") or {}).items():
            merged[key] = [merged[key][0] if key in merged else old, new]
    return merged


def describe_changes(changes: dict[str, list]) -> str:
    return "; ".join(f"{key}: {_show(old)} -> {_show(new)}" for key, (old, new) in changes.items())


def compare_resolved(old: dict | None, new: dict) -> list[str]:
    """What the device resolved the settings to (checkpoints from before it was recorded: nothing)."""
    if not isinstance(old, dict):
        return []
    return [f"{key} (as resolved on the device): {_show(old[key])} -> {_show(new.get(key, _MISSING))}"
            for key in old if old[key] != new.get(key, _MISSING)]


# ----------------------------------------------------------------------------------------- folder
def run_files(out: Path) -> list[Path]:
    """The files of a run present in ``out``: what makes it hold a run, and what an overwrite removes."""
    if not out.is_dir():
        return []
    found = [out / n for n in RUN_FILES if (out / n).is_file()]
    found += sorted(p for pattern in RUN_FILE_PATTERNS for p in out.glob(pattern) if p.is_file())
    ckpts = out / "checkpoints"
    if ckpts.is_dir():
        found += sorted(p for p in ckpts.iterdir() if p.is_file() and (
            p.name in NAMED_CHECKPOINTS or ckpt_io.step_of(p.name) is not None or ckpt_io.TEMP_FILE.match(p.name)))
    ev = out / "eval"
    if ev.is_dir():
        found += sorted(p for p in ev.iterdir() if p.is_file() and (
            p.name in EVAL_FILES or p.match("points*.npz")))
    return found


def _describe(files: list[Path], out: Path) -> str:
    names = [str(p.relative_to(out)) for p in files]
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


@dataclasses.dataclass
class Plan:
    """What a start does with its folder (small and picklable: rank 0 hands it to every rank)."""
    action: str                                # "new", "overwrite", "resume", or "restart": a resume with nothing saved
    checkpoint: str | None = None              # the checkpoint a resume continues from
    step: int = 0                              # its global step and completed epochs: where history is cut
    epoch: int = 0
    changes: dict[str, list] = dataclasses.field(default_factory=dict)   # allowed differences
    valid: list[tuple[int, str]] = dataclasses.field(default_factory=list)     # resumable checkpoints (prunable)
    rejected: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # unusable ones, and why
    history: list[dict] = dataclasses.field(default_factory=list)        # the checkpoint's per-epoch records
    resumes: list[dict] = dataclasses.field(default_factory=list)        # earlier resumes it records
    note: str = ""                             # the one line said at the start, if any


def _refuse_differences(out: Path, where: str, lines: list[str]) -> None:
    if lines:
        raise ConfigError(f"--resume continues only the run in {out}, and this command describes another one: "
                          f"{'; '.join(lines)} ({where} -> this command). Resume with the run's own settings "
                          f"(manifest.json records them), or pass --overwrite to replace the run, or choose "
                          f"another --out-dir.")


def inspect(cfg, resolved: dict, expected_spec: dict | None = None, check_lock: bool = True) -> Plan:
    """Decide what a start with ``cfg`` does with its folder, reading only, or refuse with a ConfigError
    (CheckpointError: nothing usable to resume from) that names the problem and the ways out.

    ``resolved``: what the device makes of the settings (``amp``, ``drop_last``), compared with the
    checkpoint's; ``expected_spec``: the model's architecture, checked against the checkpoint's;
    ``check_lock``: refuse a folder another process holds (off once this process holds it)."""
    out = Path(cfg.out_dir)
    ckpts = out / "checkpoints"
    if cfg.resume and cfg.overwrite:
        raise ConfigError(f"--resume continues the run in {out} and --overwrite deletes it: pass one of them.")
    holder = lock_holder(out) if check_lock else None
    if holder is not None:
        raise ConfigError(_in_use(out, holder))
    present = run_files(out)
    if cfg.overwrite:
        return Plan("overwrite" if present else "new")
    if not cfg.resume:
        if present:
            raise ConfigError(f"{out} already holds a run ({_describe(present, out)}): pass --resume to continue "
                              f"it, or --overwrite to delete its files and train a new run there, or choose another "
                              f"--out-dir.")
        return Plan("new")

    scan = ckpt_io.scan_step_checkpoints(ckpts, expected_spec)
    rejected = [(str(p), why) for p, why in scan.rejected]
    ckpt, path = scan.newest, scan.valid[-1][1] if scan.valid else None
    if ckpt is None and (ckpts / "final.pt").is_file():
        # a finished run whose rolling checkpoints were deleted (to save space): final.pt holds its end state
        path = ckpts / "final.pt"
        try:
            ckpt = ckpt_io.load_checkpoint(path, mmap=True)
        except CheckpointError as e:
            rejected.append((str(path), str(e)))
        if ckpt is not None:
            if expected_spec is not None:
                ckpt_io.check_spec(ckpt["spec"], expected_spec, path)
            problem = ckpt_io.resume_problem(ckpt, ckpt.get("global_step"))
            if problem:
                rejected.append((str(path), f"checkpoint {path} cannot be resumed from: {problem}."))
                ckpt = None
    if ckpt is None:
        if (ckpts / "best.pt").is_file():
            rejected.append((str(ckpts / "best.pt"), f"{ckpts / 'best.pt'} is the epoch chosen on validation, not "
                                                     f"where training stopped: a resume does not continue from it"))
        if rejected:
            raise CheckpointError(f"--resume found no usable checkpoint in {ckpts}: "
                                  + "; ".join(why.rstrip(".") for _, why in rejected)
                                  + ". Move the unusable files away, or pass --overwrite to train the run again.")
        manifest = _read_json(out / "manifest.json")
        if isinstance(manifest.get("config"), dict):   # nothing saved yet: still only this run may start here
            training, _ = compare_configs(manifest["config"], cfg.to_dict())
            _refuse_differences(out, "manifest.json", training)
        partial = [p.name for p in ckpts.iterdir() if ckpt_io.TEMP_FILE.match(p.name)] if ckpts.is_dir() else []
        where = "no checkpoint in " + str(ckpts) + (" (only a partial write, left by a process killed while saving: "
                                                    + ", ".join(sorted(partial)) + ")" if partial else "")
        return Plan("restart", note=f"--resume: {where}, so the run starts from step 0.")
    training, allowed = compare_configs(ckpt["config"], cfg.to_dict())
    training += compare_resolved(ckpt.get("resolved"), resolved)
    _refuse_differences(out, path.name, training)
    history = json.loads(ckpt["history"]) if isinstance(ckpt["history"], str) else list(ckpt["history"])
    return Plan("resume", checkpoint=str(path), step=ckpt["global_step"], epoch=ckpt["epoch"], changes=allowed,
                valid=[(s, str(p)) for s, p in scan.valid], rejected=rejected, history=history,
                resumes=list(ckpt.get("resumes") or []))


def prepare(plan: Plan, out: Path) -> str:
    """Make the folder what ``plan`` starts from (under the lock): delete a replaced run's files, or cut
    the history back to the checkpoint a resume continues from. Returns what to say (one line), if any."""
    ckpt_io.clean_stale_temporaries(out / "checkpoints")
    if plan.action == "overwrite":
        files = run_files(out)
        for p in files:
            p.unlink(missing_ok=True)
        for folder in (out / "checkpoints", out / "eval"):
            with contextlib.suppress(OSError):   # left in place when it holds files that are no run's
                folder.rmdir()
        return f"--overwrite: deleted the {len(files)} files of the run that was in {out}."
    if plan.action in ("resume", "restart"):
        dropped = cut_history(out, plan.step, plan.epoch, plan.history)
        if dropped and plan.action == "restart":
            return f"{plan.note[:-1]}; the {dropped} records logged since are removed from log.jsonl."
        if dropped:
            return (f"log.jsonl cut back to {Path(plan.checkpoint).name}: the {dropped} records logged after it are "
                    f"removed (they are logged again).")
    return plan.note


def cut_history(out: Path, step: int, epoch: int, history: list[dict]) -> int:
    """Cut ``log.jsonl`` to its longest prefix of whole records not past ``step`` (step records) and
    ``epoch`` (epoch records), and rewrite ``epochs.csv``, if any, from ``history``. Returns how many
    log records were removed."""
    log = out / "log.jsonl"
    dropped = 0
    if log.is_file():
        lines = log.read_text(errors="replace").splitlines(keepends=True)
        keep = 0
        for line in lines:
            try:
                record = json.loads(line) if line.endswith("\n") else None
            except ValueError:
                record = None
            if not isinstance(record, dict) or _past(record, step, epoch):
                break
            keep += 1
        if keep < len(lines):
            dropped = len(lines) - keep
            report.atomic_write_text(log, "".join(lines[:keep]))
    table = out / "epochs.csv"
    if table.is_file():
        text = report.csv_text(report.HISTORY_COLUMNS, [[h.get(k) for k in report.HISTORY_COLUMNS] for h in history])
        if not history:
            table.unlink()
        elif table.read_text() != text:
            report.atomic_write_text(table, text)
    return dropped


def _past(record: dict, step: int, epoch: int) -> bool:
    if record.get("kind") == "epoch":
        return not isinstance(record.get("epoch"), int) or record["epoch"] > epoch
    return not isinstance(record.get("step"), int) or record["step"] > step


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


# ------------------------------------------------------------------------------------------- lock
def _holder_text(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
        return f"PID {int(info['pid'])} on {info.get('host', 'an unknown host')}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its PID yet"


def _in_use(out: Path, holder: str) -> str:
    return (f"{out} is in use by another training process ({holder}), which holds {out / LOCK_FILE}: a run folder "
            f"has one writer. Wait for that run to end or stop it (a process that exits, however it ends, "
            f"releases the folder; --resume then continues the run), or choose another --out-dir.")


def lock_holder(out: Path) -> str | None:
    """Who holds ``out``'s lock now (``PID n on host``), or None; only reads."""
    try:
        fd = os.open(out / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return _holder_text(fd)
    except OSError:
        return None   # a filesystem without locks: FolderLock.acquire says so
    finally:
        os.close(fd)


class FolderLock:
    """An exclusive ``flock`` on ``<out>/.lock`` (created if missing; its content: the holder's PID and
    host). The lock file stays after the run: removing it would let a process that opened it just before
    lock a file no longer in the folder."""

    ATTEMPTS, WAIT_S = 5, 0.05   # another start's read-only probe holds a shared lock for microseconds

    def __init__(self, out: str | Path):
        self.out, self.fd = Path(out), None

    def acquire(self) -> None:
        path = self.out / LOCK_FILE
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"output folder {self.out} is not writable ({e.strerror or e}). Choose another "
                              f"--out-dir.") from e
        for attempt in range(self.ATTEMPTS):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt + 1 == self.ATTEMPTS:
                    holder = _holder_text(fd)
                    os.close(fd)
                    raise ConfigError(_in_use(self.out, holder)) from None
                time.sleep(self.WAIT_S)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise ConfigError(f"cannot lock {path}: {e.strerror or e}. Choose another --out-dir.") from e
                warnings.warn(f"{path} cannot be locked on this filesystem ({e.strerror}): nothing stops a second "
                              f"process from training into {self.out}; make sure only one does.", stacklevel=2)
                return
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n").encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
