"""Live TensorBoard scalars: every number of ``log.jsonl``, and the final evaluation, as event files in
the run folder (``tensorboard --logdir runs/``).

The event files are a view of ``log.jsonl``, written as each record is logged: a step record's
fields appear as ``train/<field>``, an epoch record's as ``epoch/<field>``, both at the record's
global step; list fields (FAAL's class weights) as ``train/<field>/<class>``; the final evaluation as
``eval/na`` and ``eval/ra_<attack>`` at the last step. A resume cuts ``log.jsonl`` back to its
checkpoint (fastrobust.run_folder); the writer then opens with TensorBoard's own purge marker at the
checkpoint's step, so readers drop what the interrupted process logged from there on, and it writes
the records ``log.jsonl`` kept at that step again: the curves equal the log, with no step twice.

``tensorboard`` is an optional dependency (``pip install 'fastrobust[tensorboard]'``): without it a
run trains as before and says so once.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from .errors import ConfigError

INSTALL_HINT = "pip install 'fastrobust[tensorboard]'"
_said_missing = False   # the hint is printed once per process


def available() -> bool:
    try:
        import torch.utils.tensorboard  # noqa: F401  (imports the tensorboard package)
    except ImportError:
        return False
    return True


def wanted(setting: bool | None) -> bool:
    """Whether a run writes event files: ``True`` requires tensorboard, ``None`` uses it when installed
    (and says once how to get it otherwise), ``False`` never."""
    global _said_missing
    if setting is False:
        return False
    if available():
        return True
    if setting:
        raise ConfigError(f"--tensorboard needs the tensorboard package, which is not installed: {INSTALL_HINT}, "
                          f"or pass --no-tensorboard.")
    if not _said_missing:
        print(f"TensorBoard scalars are off: tensorboard is not installed ({INSTALL_HINT}; --no-tensorboard "
              f"silences this line).", file=sys.stderr)
        _said_missing = True
    return False


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The TensorBoard tags and values of one ``log.jsonl`` record."""
    group = "epoch" if record.get("kind") == "epoch" else "train"
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in ("kind", "step"):
            continue
        if isinstance(value, list):
            out.update({f"{group}/{key}/{i}": float(v) for i, v in enumerate(value) if _is_number(v)})
        elif _is_number(value):
            out[f"{group}/{key}"] = float(value)
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class TensorBoardLog:
    """The event-file writer of one run folder (rank 0 only). ``resume_step``: the step of the checkpoint
    a resume continues from (None for a fresh run); ``log.jsonl`` must already be cut back to it."""

    def __init__(self, out: Path, resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        out = Path(out)
        earlier = any(out.glob("events.out.tfevents.*"))
        # With earlier event files, purge from the checkpoint's step and write that step's kept records
        # again; without (a first start, or tensorboard newly switched on), write the whole kept log.
        start = resume_step if earlier and resume_step is not None else None
        self.writer = SummaryWriter(str(out), purge_step=start, flush_secs=30)
        log = out / "log.jsonl"
        if resume_step is not None and log.is_file():
            for line in log.read_text().splitlines():
                record = json.loads(line)
                if start is None or record.get("step", -1) >= start:
                    self.write(record)

    def write(self, record: dict[str, Any]) -> None:
        step = record.get("step")
        if not isinstance(step, int):
            return
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        if record.get("kind") == "epoch":
            self.writer.flush()   # an epoch's curves are on disk when it ends, not up to flush_secs later

    def write_evaluation(self, result: Any, step: int) -> None:
        """The final test-set evaluation (an EvalResult): NA and each attack's RA, as fractions (as in results.json)."""
        self.writer.add_scalar("eval/na", float(result.na), step)
        for attack, ra in result.ra.items():
            self.writer.add_scalar(f"eval/ra_{attack}", float(ra), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
