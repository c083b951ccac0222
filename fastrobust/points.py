"""Per-point outcomes of an evaluation, ``points.npz`` beside ``results.json``: what a paired test needs.

Format ``fastrobust.points/1``, a NumPy ``.npz`` of plain arrays (read with ``allow_pickle=False``):

  index     int64 [n]  the test-set indices of the evaluated points, in evaluation order
  label     int64 [n]  their labels
  natural   bool  [n]  the clean prediction is correct
  <attack>  bool  [m]  one per attack run (e.g. ``fgsm``, ``pgd``, ``autoattack``): the point ``index[i]``,
                       i < m, is still classified correctly under the attack (AutoAttack runs on the first
                       ``aa_samples`` points, so its m can be below n)
  meta      str   []   JSON: ``format``, ``dataset``, ``split``, ``n``, ``eps``, ``norm``, and under
                       ``attacks`` each attack's ``label``, ``n`` and the ``settings`` that decide its
                       outcome (radius, steps, step size, start, version, seed)

Two evaluations are comparable point by point when their indices, radius, threat model and each
compared attack's settings agree; :func:`check_comparable` says which of them differ.
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError
from .report import atomic_write

FORMAT = "fastrobust.points/1"
FILE = "points.npz"


@dataclass
class Points:
    index: np.ndarray
    label: np.ndarray
    natural: np.ndarray
    attacks: dict[str, np.ndarray]
    meta: dict[str, Any]
    path: Path | None = None

    def flags(self, name: str) -> np.ndarray:
        """``natural`` or an attack's robust flags."""
        if name == "natural":
            return self.natural
        if name not in self.attacks:
            raise ConfigError(f"{self.path or 'these points'} hold no outcomes for {name!r}; they hold natural, "
                              f"{', '.join(self.attacks) or 'no attack'}.")
        return self.attacks[name]

    def label_of(self, name: str) -> str:
        return "NA" if name == "natural" else self.meta["attacks"][name]["label"]


def from_evaluation(natural, attacks: dict[str, Any], labels, meta: dict[str, Any]) -> Points:
    """Build the record of one evaluation (flags as tensors or arrays; the first n test points)."""
    natural = np.asarray(natural, dtype=bool)
    return Points(index=np.arange(len(natural), dtype=np.int64), label=np.asarray(labels, dtype=np.int64),
                  natural=natural, attacks={k: np.asarray(v, dtype=bool) for k, v in attacks.items()},
                  meta={"format": FORMAT, "n": int(len(natural)), **meta})


def save(points: Points, path: str | Path) -> Path:
    """Write atomically (a reader never sees half a file)."""
    return atomic_write(path, lambda f: np.savez_compressed(
        f, index=points.index, label=points.label, natural=points.natural,
        meta=np.array(json.dumps(points.meta, sort_keys=True)), **points.attacks))


def load(path: str | Path) -> Points:
    """Read a ``points.npz`` (or the one in a run or evaluation folder). A folder without one, from before
    the file existed, gets an error that says how to make it: evaluate the checkpoint again."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("points*.npz"))
        if not found:
            raise ConfigError(f"{path} holds no per-point outcomes ({FILE}): it was evaluated before they were "
                              f"kept. Evaluate it again: fastrobust eval --checkpoint {path}/checkpoints/final.pt "
                              f"--out {path}")
        if len(found) > 1:
            raise ConfigError(f"{path} holds several per-point files ({', '.join(p.name for p in found)}); name one.")
        path = found[0]
    if not path.is_file():
        raise ConfigError(f"no per-point file at {path}.")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ConfigError(f"{path} is not a readable per-point file ({e}); evaluate the model again.") from e
    missing = [k for k in ("index", "label", "natural", "meta") if k not in arrays]
    if missing:
        raise ConfigError(f"{path} is not a {FORMAT} file: it lacks {', '.join(missing)}.")
    meta = json.loads(str(arrays.pop("meta")))
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{path} has format {meta.get('format')!r}; this version reads {FORMAT!r}.")
    index, label, natural = arrays.pop("index"), arrays.pop("label"), arrays.pop("natural")
    return Points(index=index, label=label, natural=natural.astype(bool),
                  attacks={k: v.astype(bool) for k, v in arrays.items()}, meta=meta, path=path)


def check_comparable(a: Points, b: Points, names: list[str]) -> None:
    """Stop, naming every difference, unless ``a`` and ``b`` evaluated the same points under the same
    threat model and the same settings of each attack in ``names``."""
    problems = differences(a, b, names)
    if problems:
        raise ConfigError(f"{a.path or 'A'} and {b.path or 'B'} are not comparable point by point: "
                          + "; ".join(problems) + ". Evaluate both with the same settings on the same points.")


def differences(a: Points, b: Points, names: list[str], same_points: bool = True) -> list[str]:
    """Every difference in threat model and in the settings of each attack in ``names``, one line each;
    with ``same_points``, also in the evaluated points (two runs of a seed comparison may have been
    evaluated on different numbers of points and still measure the same accuracy)."""
    problems = []
    for key in ("dataset", "split", "norm", "eps"):
        if a.meta.get(key) != b.meta.get(key):
            problems.append(f"{key}: {a.meta.get(key)!r} vs {b.meta.get(key)!r}")
    for name in names:
        fa, fb = a.flags(name), b.flags(name)
        if same_points and (len(fa) != len(fb) or not np.array_equal(a.index[:len(fa)], b.index[:len(fb)])):
            problems.append(f"{a.label_of(name)} points: {len(fa)} vs {len(fb)} points"
                            + ("" if len(fa) != len(fb) else " with other test indices"))
        elif same_points and not np.array_equal(a.label[:len(fa)], b.label[:len(fb)]):
            problems.append(f"{a.label_of(name)} points: the same indices carry other labels (another test set)")
        if name != "natural":
            sa, sb = a.meta["attacks"][name]["settings"], b.meta["attacks"][name]["settings"]
            for key in sorted(set(sa) | set(sb)):
                if sa.get(key) != sb.get(key):
                    problems.append(f"{a.label_of(name)} {key}: {sa.get(key)!r} vs {sb.get(key)!r}")
    return problems
