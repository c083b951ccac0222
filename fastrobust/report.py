"""Reporting: run manifests, hashes, Markdown/CSV/JSON tables and files, and PNG plots.

Everything a run or a benchmark writes goes through here, atomically (a reader never sees half a file).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterable, Sequence

import torch

from . import __version__
from .errors import ConfigError

if TYPE_CHECKING:
    from .evaluate import EvalResult

REPO_ROOT = Path(__file__).resolve().parents[1]


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` whole or not at all: ``write(f)`` fills a hidden temporary beside it (``.NAME.tmp-PID``,
    which checkpoint.clean_stale_temporaries recognises after a kill), synced, renamed over ``path``, and the
    folder entry synced. On an error the temporary is removed and the old file is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def check_output_folder(folder: str | Path, what: str) -> Path:
    """Create ``folder`` (with its parents) and check that it takes files, before any work whose results go
    there: else a ConfigError naming ``what`` (the flag) and why, at once, not a traceback after the work."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{what} {folder} is an existing file, not a folder: choose a folder, or move the file away.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}-{time.time_ns()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        blocking = next((p for p in folder.parents if p.exists() and not p.is_dir()), None)
        why = f"{blocking} is a file, not a folder" if blocking is not None else (e.strerror or str(e))
        raise ConfigError(f"{what} {folder} cannot be created or written to ({why}): choose another path.") from e
    return folder


def check_output_file(path: str | Path, what: str) -> Path:
    """A file to be written: not an existing folder, and its folder usable (:func:`check_output_folder`)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is an existing folder; pass the path of a file to write, e.g. "
                          f"{path / 'tables.md'}.")
    check_output_folder(path.parent, f"the folder of {what} {path}:")
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")


def _jsonable(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def sha256(path: str | Path) -> str | None:
    path = Path(path)
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def git_commit() -> dict[str, Any]:
    def run(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        return {"commit": run("rev-parse", "HEAD") or None,
                "dirty": bool(run("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def device_description(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return f"{torch.cuda.get_device_name(idx)} (CUDA {torch.version.cuda})"
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        cpuinfo = []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
               platform.processor() or platform.machine())
    return (f"CPU: {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"{torch.backends.cpu.get_cpu_capability()}")


def versions() -> dict[str, str | None]:
    # Read from package metadata, not by importing: importing ffcv changes torch's thread count.
    from importlib.metadata import PackageNotFoundError, version
    out: dict[str, str | None] = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("torchvision", "triton", "numpy", "ffcv", "pyautoattack"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    out["fastrobust"] = __version__
    return out


def manifest(config: dict, *, device: str | torch.device, seed: int, **extra: Any) -> dict[str, Any]:
    return {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv),
            "config": config, "seed": seed, "device": device_description(device), "versions": versions(),
            "git": git_commit(), "host": platform.node(), **extra}


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else ("—" if v is None else str(v))
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def csv_text(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerows([headers, *(["" if v is None else v for v in row] for row in rows)])
    return buf.getvalue()


# ---------------------------------------------------------------------------------------- plots
def _plot(path: str | Path, size: tuple[float, float], draw: Callable[[Any], None], legend: bool, **labels: str) -> Path:
    """A figure drawn by ``draw(ax)``, with ``labels`` (xlabel, ylabel, title), written in ``path``'s format."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=size, dpi=120)
    draw(ax)
    ax.set(**labels)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format=path.suffix.lstrip(".") or "png"))
    plt.close(fig)
    return path


def plot_lines(path: str | Path, series: dict[str, tuple[Sequence[float], Sequence[float]]], *, xlabel: str,
               ylabel: str, title: str) -> Path:
    def draw(ax: Any) -> None:
        for label, (xs, ys) in series.items():
            ax.plot(xs, ys, marker="o", ms=3, label=label)
    return _plot(path, (5.5, 3.8), draw, len(series) > 1, xlabel=xlabel, ylabel=ylabel, title=title)


def plot_scatter(path: str | Path, points: dict[str, tuple[float, float]], *, xlabel: str, ylabel: str,
                 title: str) -> Path:
    def draw(ax: Any) -> None:
        for label, (x, y) in points.items():
            ax.scatter([x], [y], s=40)
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    return _plot(path, (5, 4), draw, False, xlabel=xlabel, ylabel=ylabel, title=title)


# ---------------------------------------------------------------------------------------- training
def throughput_markdown(rows: dict[str, dict[str, Any]]) -> str:
    headers = ["Run", "img/s", "ms/step", "attack ms", "update ms", "attack share", "peak MB", "device"]
    body = [[name, r.get("img_per_s"), r.get("ms_per_step"), r.get("attack_ms"), r.get("update_ms"),
             r.get("attack_share"), r.get("peak_memory_mb"), r.get("device")] for name, r in rows.items()]
    return "**Training throughput** (median over timed steps, first 2 excluded)\n\n" + markdown_table(headers, body) + "\n"


HISTORY_COLUMNS = ("epoch", "lr", "val_na", "val_pgd_ra", "val_worst_class_pgd_ra", "img_per_s", "ms_per_step",
                   "attack_ms", "update_ms", "peak_memory_mb", "epoch_seconds")


def write_history(out: Path, history: list[dict[str, Any]], steps_per_epoch: int, title: str) -> None:
    """``epochs.csv`` and ``curves.png`` (train loss per logged step, validation NA and RA per epoch)."""
    if not history:
        return
    atomic_write_text(out / "epochs.csv", csv_text(HISTORY_COLUMNS, [[h.get(k) for k in HISTORY_COLUMNS]
                                                                     for h in history]))
    log = out / "log.jsonl"
    steps = [json.loads(line) for line in log.read_text().splitlines() if '"kind": "step"' in line] if log.exists() else []
    series = {}
    if steps:
        series["train loss"] = ([s["step"] / steps_per_epoch for s in steps], [s["loss"] for s in steps])
    epochs = [h["epoch"] for h in history]
    if any("val_na" in h for h in history):
        series["val NA"] = (epochs, [h.get("val_na", float("nan")) for h in history])
        series["val PGD RA"] = (epochs, [h.get("val_pgd_ra", float("nan")) for h in history])
    if series:
        plot_lines(out / "curves.png", series, xlabel="epoch", ylabel="loss / accuracy", title=title)


# ---------------------------------------------------------------------------------------- results
def threat_model_line(r: "EvalResult") -> str:
    cfg = r.config
    return (f"Threat model: {cfg['norm']} eps = {cfg['eps']:.5g}; PGD-{cfg['pgd_steps']} step "
            f"{cfg['pgd_step_size']:.4g} ({cfg['pgd_random_start']} start); {r.n} test points (AutoAttack "
            f"{cfg['aa_version']} on the first {r.n_attacked.get('autoattack', 0)}). All numbers in %.")


def table_rows(results: dict[str, "EvalResult"]) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """The paper's layout, one row per model: accuracy, robustness drop and attack success rate (%).
    Every attack column names its radius, so a number is never read against another threat model's."""
    from .attacks import ATTACKS
    attacks = [a for a in ATTACKS if any(a in r.ra for r in results.values())]
    any_r = next(iter(results.values()))
    labels = [f"{any_r.label(a)} (eps {any_r.config['eps']:.4g})" for a in attacks]
    pct = lambda v: None if v is None else 100.0 * v  # noqa: E731
    acc = [[name, pct(r.na)] + [pct(r.ra.get(a)) for a in attacks] for name, r in results.items()]
    rd = [[name] + [pct(r.rd.get(a)) for a in attacks] for name, r in results.items()]
    asr = [[name] + [pct(r.asr.get(a)) for a in attacks] + [pct(r.conditional_asr.get(a)) for a in attacks]
           for name, r in results.items()]
    return {"accuracy": (["Model", "Natural"] + labels, acc),
            "robustness_drop": (["Model"] + labels, rd),
            "attack_success_rate": (["Model"] + labels + [f"{lab} (cond.)" for lab in labels], asr)}


def results_markdown(results: dict[str, "EvalResult"]) -> str:
    tables = table_rows(results)
    parts = [threat_model_line(next(iter(results.values()))), "", "**Accuracy (NA and RA)**", "",
             markdown_table(*tables["accuracy"]), "", "**Robustness drop RD = NA - RA**", "",
             markdown_table(*tables["robustness_drop"]), "",
             "**Attack success rate: ASR = 1 - RA; conditional = share of clean-correct points flipped**", "",
             markdown_table(*tables["attack_success_rate"]), "", "**Sanity checks**", ""]
    for name, r in results.items():
        parts += [f"- {name}: {c.line()}" for c in r.checks]
        parts += [f"- {name}: warning: {w}" for w in r.warnings]
    return "\n".join(parts) + "\n"


def save_results(results: dict[str, "EvalResult"], out_dir: str | Path, manifest: dict | None = None) -> dict[str, Path]:
    """``results.{md,csv,json}``, ``points.npz`` (:mod:`fastrobust.points`), ``eps_sweep.png``, ``na_ra.png``
    and (given) ``eval_manifest.json``."""
    out = Path(out_dir)
    tables = table_rows(results)
    paths = {"md": atomic_write_text(out / "results.md", results_markdown(results)),
             "json": write_json(out / "results.json", {k: r.to_dict() for k, r in results.items()}),
             "csv": atomic_write_text(out / "results.csv", "".join(
                 csv_text(["table"] + headers, [[name] + row for row in rows]) for name, (headers, rows) in tables.items()))}
    sweeps = {name: ([p["eps"] for p in r.sweep], [100 * p["ra"] for p in r.sweep]) for name, r in results.items() if r.sweep}
    if sweeps:
        paths["sweep_png"] = plot_lines(out / "eps_sweep.png", sweeps, xlabel="eps", ylabel="PGD robust accuracy (%)",
                                        title="Robust accuracy against radius")
    any_r = next(iter(results.values()))   # NA against PGD RA, one point per model (the Pareto view)
    paths["na_ra_png"] = plot_scatter(out / "na_ra.png", {k: (100 * r.na, 100 * r.ra.get("pgd", float("nan")))
                                                          for k, r in results.items()}, xlabel="natural accuracy (%)",
                                      ylabel=f"{any_r.label('pgd')} robust accuracy (%)", title="NA against RA")
    from . import points as points_io
    for name, r in results.items():   # one per-point file per evaluation: points.npz, or points_<name>.npz
        if r.points is not None:
            paths[f"points:{name}"] = points_io.save(
                r.points, out / (points_io.FILE if len(results) == 1 else f"points_{name}.npz"))
    if manifest is not None:
        paths["manifest"] = write_json(out / "eval_manifest.json", manifest)
    return paths
