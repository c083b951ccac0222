"""Loader throughput benchmark: images/s each backend delivers, training pipeline, augmented.

    python -c "from loaders import bench; print(bench.format_markdown(bench.run('cpu')))"

Each backend is built with ``loaders.build(dataset, 'train', ...)`` (shuffle + the paper's
augmentation, drop_last) and iterated for ``warmup_batches`` (excluded: FFCV's JIT compile, worker
start-up, first-touch allocations) and then ``num_batches`` timed batches, crossing epoch
boundaries as needed. On CUDA the device is synchronised before the clock starts and stops, so
queued kernels are counted. Batches are produced but not consumed, so this is the loader's upper
bound; pass ``consumer_img_per_s`` (the training step's images/s) to get the "loader / step"
ratio and whether loading is at least 10x faster than training.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Iterable, List, Optional

import torch

from fastrobust.errors import FastRobustError

__all__ = ["run", "format_markdown", "measure"]

HEADROOM = 10.0   # loading must be this many times faster than training to be "not a bottleneck"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(loader, num_batches: int, warmup_batches: int, repeats: int = 1) -> dict:
    """Time ``repeats`` windows of ``num_batches`` batches after ``warmup_batches`` untimed ones.

    ``img_per_s`` is the median over the windows (robust to other load on the machine);
    ``img_per_s_windows`` lists them all.
    """
    device = loader.device

    def stream():
        while True:
            yielded = False
            for batch in loader:
                yielded = True
                yield batch
            if not yielded:
                raise RuntimeError("loader yields no batches (batch_size > samples with "
                                   "drop_last?)")

    it = stream()
    t_first = time.perf_counter()
    for _ in range(warmup_batches):
        next(it)
    _sync(device)
    warm_s = time.perf_counter() - t_first
    rates, images, seconds = [], 0, 0.0
    for _ in range(max(1, int(repeats))):
        n = 0
        t0 = time.perf_counter()
        for _ in range(num_batches):
            x, _y = next(it)
            n += x.shape[0]
        _sync(device)
        dt = time.perf_counter() - t0
        rates.append(n / dt)
        images, seconds = images + n, seconds + dt
    it.close()
    return {"images": images, "seconds": seconds, "img_per_s": statistics.median(rates),
            "img_per_s_windows": rates, "warmup_s": warm_s}


def run(device="cpu", dataset: str = "cifar10", batch_size: int = 128,
        backends: Iterable[str] = ("gpu", "torch", "ffcv"), num_batches: int = 300,
        warmup_batches: int = 20, data_dir=None, beton_dir=None, limit: Optional[int] = None,
        num_workers: Optional[int] = None, seed: int = 0, repeats: int = 3,
        consumer_img_per_s: Optional[float] = None) -> List[dict]:
    """One row per backend: images/s on ``dataset`` train with augmentation on ``device``.

    Each backend is timed over ``repeats`` windows of ``num_batches`` batches; ``img_per_s`` is
    their median. A backend that cannot run here (e.g. ffcv not installed) gets a row with ``status`` saying
    why and ``img_per_s`` None. ``num_workers`` None uses each backend's default.
    """
    import loaders
    rows = []
    for backend in backends:
        row = {"backend": backend, "device": str(device), "dataset": dataset,
               "batch_size": batch_size, "num_batches": num_batches,
               "warmup_batches": warmup_batches, "img_per_s": None, "status": "ok"}
        try:
            t0 = time.perf_counter()
            loader = loaders.build(dataset, "train", batch_size, device, backend=backend,
                                   seed=seed, data_dir=data_dir, limit=limit, drop_last=True,
                                   num_workers=num_workers, beton_dir=beton_dir)
            row["build_s"] = time.perf_counter() - t0
            row["num_workers"] = getattr(loader, "num_workers", 0)
            row["device"] = str(loader.device)
            row.update(measure(loader, num_batches, warmup_batches, repeats))
            row["repeats"] = repeats
        except FastRobustError as e:
            row["status"] = f"unavailable: {e}"
        if consumer_img_per_s is not None and row["img_per_s"] is not None:
            ratio = row["img_per_s"] / float(consumer_img_per_s)
            row["consumer_img_per_s"] = float(consumer_img_per_s)
            row["loader_over_step"] = ratio
            row["verdict"] = (f"ok (>= {HEADROOM:g}x)" if ratio >= HEADROOM
                              else f"bottleneck risk (< {HEADROOM:g}x)")
        rows.append(row)
    return rows


def describe_host() -> str:
    gpu = ""
    if torch.cuda.is_available():
        gpu = f", {torch.cuda.get_device_name()}"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores{gpu}, "
            f"torch {torch.__version__}")


def format_markdown(rows: List[dict], consumer_img_per_s: Optional[float] = None) -> str:
    """A markdown table of :func:`run`'s rows (adds the ratio column when a consumer rate is
    given here or was given to :func:`run`)."""
    if consumer_img_per_s is not None:
        for r in rows:
            if r.get("img_per_s") is not None:
                ratio = r["img_per_s"] / float(consumer_img_per_s)
                r.update(consumer_img_per_s=float(consumer_img_per_s), loader_over_step=ratio,
                         verdict=(f"ok (>= {HEADROOM:g}x)" if ratio >= HEADROOM
                                  else f"bottleneck risk (< {HEADROOM:g}x)"))
    with_ratio = any("loader_over_step" in r for r in rows)
    head = ["backend", "device", "dataset", "batch", "workers", "img/s (median)", "min - max",
            "timed batches"]
    if with_ratio:
        head += ["loader / step", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("img_per_s") is not None:
            rate = f"{r['img_per_s']:,.0f}"
            w = r.get("img_per_s_windows") or [r["img_per_s"]]
            spread = f"{min(w):,.0f} - {max(w):,.0f}"
            timed = f"{len(w)} x {r['num_batches']}"
        else:
            rate, spread, timed = r["status"], "-", "-"
        cells = [r["backend"], r["device"], r["dataset"], str(r["batch_size"]),
                 str(r.get("num_workers", "-")), rate, spread, timed]
        if with_ratio:
            if r.get("loader_over_step") is not None:
                cells += [f"{r['loader_over_step']:.1f}x", r["verdict"]]
            else:
                cells += ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
