"""Benchmarks, with one timer for all of them: ``fastrobust bench {step,kernels,loaders}``.

The timer (:func:`interleaved`) runs every variant once per round, round-robin, so slow phases of a
noisy machine hit all variants alike, and keeps per variant the wall-clock seconds and the process CPU
seconds of each call (medians and interquartile ranges are reported): on a shared CPU the wall clock
swings by 15% between runs, CPU time much less. Warm-up calls (compilation, JIT) are excluded.

    fastrobust bench step --methods trades,dtrades --model resnet18 --batch 32 --device cpu

Step variants, per (model, batch): ``fast`` is the training step (:class:`~fastrobust.step.TrainStep`),
once per step variant its method declares (``Method.bench_variants``: D-TRADES' sensitivity modes);
``eager ref`` is the same step in its official-code shape (the
reference loss ops, fp32, no compile, f(x) recomputed at every attack step and a second clean forward
for the KL target). FLOPs come from ``torch.utils.flop_counter`` on one eager step of each variant.
The kernel and loader cases are defined beside their code (:mod:`kernels.bench`, :mod:`loaders.bench`).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .config import TrainConfig, default_attack
from .errors import ConfigError, unknown_name
from .methods import METHODS, TRADES, Method
from .models import create_model
from .report import atomic_write_text, device_description, markdown_table, versions, write_json
from .distributed import resolve_device
from .step import TrainStep, sync

# Dense peak throughput (TFLOP/s) by GPU name fragment: bf16 tensor cores, and fp32 (non-tensor).
PEAK_TFLOPS = {"H200": (989.4, 66.9), "H100 PCIe": (756.0, 51.2), "H100": (989.4, 66.9), "A100": (312.0, 19.5),
               "L4": (121.0, 30.3)}


@dataclasses.dataclass
class Timing:
    wall: list[float] = dataclasses.field(default_factory=list)
    cpu: list[float] = dataclasses.field(default_factory=list)
    phases: dict[str, list[float]] = dataclasses.field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        def quart(v):
            q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0], v[0], v[0]]
            return q[0], statistics.median(v), q[2]
        (q1, med, q3), (_, cpu, _) = quart(self.wall), quart(self.cpu)
        return {"wall_s": med, "wall_q1_s": q1, "wall_q3_s": q3, "cpu_s": cpu, "calls": len(self.wall),
                **{f"{k}_s": statistics.median(v) for k, v in self.phases.items()}}


def interleaved(variants: dict[str, Callable[[], dict | None]], repeats: int, warmup: int = 1,
                device: torch.device | None = None, deadline: float | None = None,
                progress: Callable[[int], None] | None = None) -> dict[str, Timing]:
    """Time each variant ``repeats`` times, round-robin, after ``warmup`` untimed rounds. A variant may
    return a dict of phase durations (seconds) to keep too. ``deadline`` (time.time()) stops starting
    new rounds after the first."""
    device = device or torch.device("cpu")
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    out = {name: Timing() for name in variants}
    for r in range(repeats):
        if deadline is not None and r > 0 and time.time() > deadline:
            break
        for name, fn in variants.items():
            sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            phases = fn()
            sync(device)
            out[name].wall.append(time.perf_counter() - w0)
            out[name].cpu.append(time.process_time() - c0)
            for k, v in (phases or {}).items():
                out[name].phases.setdefault(k, []).append(v)
        if progress:
            progress(r)
    return out


# ---------------------------------------------------------------------------------------------- step
class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker: its backward hooks break torch.autograd.grad
    on leaf inputs (every attack step), and only the total is needed here."""
    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


def count_flops(fn: Callable[[], Any]) -> float | None:
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    try:
        with counter:
            fn()
        return float(counter.get_total_flops())
    except Exception:  # noqa: BLE001 - a counter failure only loses the FLOP column
        return None


def sample_batch(dataset: str, batch: int, device: torch.device, data_dir: str | None, random_images: bool = False):
    """The first ``batch`` test images (repeated if the split is smaller), as the loaders deliver them;
    ``random_images``: uniform random images and labels of the dataset's geometry (no data needed)."""
    import loaders
    from .evaluate import as_float_images
    if random_images:
        info = loaders.dataset_info(dataset)
        g = torch.Generator().manual_seed(0)
        x = torch.rand(batch, info.channels, info.size, info.size, generator=g)
        y = torch.randint(0, info.num_classes, (batch,), generator=g)
        return x.to(device, memory_format=torch.channels_last), y.to(device)
    data = loaders.load_arrays(dataset, "test", data_dir, limit=batch)
    reps = -(-batch // len(data.labels))
    x = as_float_images(data.images).repeat(reps, 1, 1, 1)[:batch]
    y = torch.from_numpy(data.labels.copy()).long().repeat(reps)[:batch]   # copied: the loaders' arrays are read-only
    return x.to(device, memory_format=torch.channels_last), y.to(device)


def bench_methods(names: Sequence[str]) -> list[Method]:
    """``name`` (every variant the method declares) or ``name[variant]`` (that one) -> the methods to time."""
    out = []
    for token in names:
        name, _, variant = token.removesuffix("]").partition("[")
        if name not in METHODS:
            raise unknown_name("method", name, METHODS)
        variants = METHODS[name].bench_variants()
        chosen = [m for m in variants if not variant or m.variant == variant]
        if not chosen:
            raise ConfigError(f"{name} has no step variant {variant!r}; its variants: "
                              f"{', '.join(m.label for m in variants)}")
        out += chosen
    return out


def run_step_bench(methods: Sequence[Method] = (), models: Sequence[str] = (), batches: Sequence[int] = (),
                   device: str = "auto", *, dataset: str = "cifar10", repeats: int = 5, warmup: int = 2,
                   compile: bool | None = None, amp: str = "auto", reference: bool = True, data_dir: str | None = None,
                   attack_steps: int = 10, progress: bool = True, deadline: float | None = None,
                   random_images: bool = False, configs: dict[str, TrainConfig] | None = None) -> dict[str, Any]:
    """Time every step variant per (model, batch) on one batch: the first test images, or random images
    of the dataset's geometry with ``random_images`` (step cost does not depend on the pixels).
    ``configs`` (label -> TrainConfig, all of one model, dataset and batch size: a recipe's compared rows)
    times those steps as configured instead, each with its ratios to the last one (the baseline)."""
    if configs:
        c = list(configs.values())[-1]
        models, batches, dataset, data_dir, device = [c.model], [c.batch_size], c.dataset, c.data_dir, c.device
        compile, amp, attack_steps = c.compile, c.amp, c.attack.steps
    dev = resolve_device(device)
    compile = dev.type == "cuda" if compile is None else compile
    rows, ratios = [], []
    for model_name in models:
        for batch in batches:
            torch.manual_seed(0)
            x, y = sample_batch(dataset, batch, dev, data_dir, random_images)
            cfgs = configs or {m.label: TrainConfig(dataset=dataset, model=model_name, method=m, batch_size=batch,
                                                    compile=compile, amp=amp,
                                                    attack=default_attack(steps=attack_steps),
                                                    device=str(dev)).validate() for m in methods}
            base = create_model(model_name, dataset=dataset, normalization=list(cfgs.values())[-1].input_normalization)
            base = base.to(dev, memory_format=torch.channels_last)   # every variant starts from the same weights
            steps: dict[str, tuple[TrainStep, Method, str]] = {}
            for label, cfg in cfgs.items():
                steps[label] = (TrainStep(cfg, copy.deepcopy(base), dev), cfg.method, "fast")
                if reference:
                    ref_cfg = dataclasses.replace(cfg, compile=False, amp="off")
                    steps[f"{label} eager ref"] = (TrainStep(ref_cfg, copy.deepcopy(base), dev, official_style=True),
                                                   cfg.method, "eager ref")
            flops = {}
            for name, (st, _, _) in steps.items():   # FLOPs from one eager step of the same algorithm
                eager = TrainStep(dataclasses.replace(st.cfg, compile=False), copy.deepcopy(st.model), dev,
                                  official_style=st.official_style)
                flops[name] = count_flops(lambda: eager(x, y))

            def call(st: TrainStep) -> Callable[[], dict]:
                def run() -> dict:
                    r = st(x, y)
                    return {"attack": r.attack_s, "update": r.update_s}
                return run

            peak = peak_tflops(dev, steps[next(iter(steps))][0].amp)
            timings = interleaved({n: call(st) for n, (st, _, _) in steps.items()}, repeats, warmup, dev, deadline,
                                  (lambda r: print(f"  {model_name} batch {batch}: round {r + 1}/{repeats}", flush=True))
                                  if progress else None)
            med = {}
            for name, t in timings.items():
                s = t.summary()
                med[name] = s
                tflops = flops[name] / s["wall_s"] / 1e12 if flops[name] else None
                rows.append({"model": model_name, "batch": batch, "variant": name, "method": steps[name][1].name,
                             "kind": steps[name][2], "ms_median": 1e3 * s["wall_s"], "ms_q1": 1e3 * s["wall_q1_s"],
                             "ms_q3": 1e3 * s["wall_q3_s"], "cpu_ms_median": 1e3 * s["cpu_s"],
                             "img_per_s": batch / s["wall_s"], "attack_ms": 1e3 * s["attack_s"],
                             "update_ms": 1e3 * s["update_s"], "timed_repeats": s["calls"],
                             "gflop_per_step": flops[name] / 1e9 if flops[name] else None, "tflop_per_s": tflops,
                             "mfu": tflops / peak if tflops and peak else None})
            for name, (_, m, kind) in steps.items():
                b = list(cfgs)[-1] if configs else m.extends   # against the baseline, or the step a method extends
                if kind == "fast" and b in med and b != name:
                    a, label = name, f"{name} / {b}"
                elif kind == "eager ref":
                    a, b = name.removesuffix(" eager ref"), name
                    label = f"{a} fast / eager ref"
                else:
                    continue
                ratios.append({"model": model_name, "batch": batch, "ratio": label,
                               "wall": med[a]["wall_s"] / med[b]["wall_s"], "cpu": med[a]["cpu_s"] / med[b]["cpu_s"],
                               "flops": flops[a] / flops[b] if flops[a] and flops[b] else None})
    return {"device": device_description(dev), "versions": versions(), "compile": compile, "amp": amp,
            "dataset": dataset, "inputs": "random images" if random_images else "test images",
            "attack_steps": attack_steps, "repeats": repeats, "warmup": warmup, "rows": rows,
            "ratios": ratios}


def peak_tflops(device: torch.device, amp: torch.dtype | None) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16, f32) in PEAK_TFLOPS.items():
        if key in name:
            return bf16 if amp in (torch.bfloat16, torch.float16) else f32
    return None


def step_markdown(report: dict[str, Any]) -> str:
    headers = ["model", "batch", "variant", "ms/step (median)", "IQR ms", "CPU ms", "img/s", "attack ms",
               "update ms", "GFLOP/step", "TFLOP/s", "MFU"]
    body = [[r["model"], r["batch"], r["variant"], r["ms_median"], f"{r['ms_q1']:.1f}–{r['ms_q3']:.1f}",
             r["cpu_ms_median"], r["img_per_s"], r["attack_ms"], r["update_ms"], r["gflop_per_step"], r["tflop_per_s"],
             None if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"] for r in report["rows"]]
    ratio_rows = [[r["model"], r["batch"], r["ratio"], f"{r['wall']:.3f}", f"{r['cpu']:.3f}",
                   "—" if r["flops"] is None else f"{r['flops']:.3f}"] for r in report["ratios"]]
    return (f"Device: {report['device']}; compile={report['compile']}, amp={report['amp']}, PGD-{report['attack_steps']} "
            f"training attack on {report.get('inputs', 'test images')}, {report['repeats']} interleaved repeats after {report['warmup']} warm-up.\n\n"
            + markdown_table(headers, body) + "\n\n**Ratios** (median wall-clock step time, median process CPU time, "
            "FLOPs)\n\n" + markdown_table(["model", "batch", "ratio", "wall", "CPU", "FLOPs"], ratio_rows) + "\n")


# ---------------------------------------------------------------------------------------------- kernels, loaders
def run_kernel_bench(device: str = "cuda", repeats: int = 7, iters: int = 50, **case_options) -> list[dict]:
    """Each kernel case (:func:`kernels.bench.cases`), every implementation timed ``iters`` calls at a time."""
    from kernels import bench as kb
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        print(kb.CPU_NOTICE)
        return []
    rows = []
    for case in kb.cases(dev, **case_options):
        loops = {impl: _repeated(fn, iters) for impl, fn in case.impls.items() if fn is not None}
        t = {k: v.summary() for k, v in interleaved(loops, repeats, warmup=1, device=dev).items()}
        row = {"op": case.op, "shape": case.shape, "dtype": case.dtype, "bytes": case.nbytes}
        for impl in ("triton", "eager", "compiled"):
            us = 1e6 * t[impl]["wall_s"] / iters if impl in t else None
            row[f"{impl}_us"], row[f"{impl}_gbps"] = us, case.nbytes / us / 1e3 if us else None
        row["speedup_vs_eager"] = row["eager_us"] / row["triton_us"] if row["eager_us"] else None
        row["speedup_vs_compiled"] = row["compiled_us"] / row["triton_us"] if row["compiled_us"] else None
        rows.append(row)
    return rows


def _repeated(fn: Callable[[], Any], n: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(n):
            fn()
    return run


def kernel_markdown(rows: list[dict]) -> str:
    keys = ["triton_us", "eager_us", "compiled_us", "triton_gbps", "eager_gbps", "compiled_gbps", "speedup_vs_eager",
            "speedup_vs_compiled"]
    return markdown_table(["op", "shape", "dtype", "triton us", "eager us", "compiled us", "triton GB/s", "eager GB/s",
                           "compiled GB/s", "x eager", "x compiled"],
                          [[r["op"], r["shape"], r["dtype"]] + [r.get(k) for k in keys] for r in rows])


def run_loader_bench(device: str = "auto", batch_size: int = 128, backends: Sequence[str] | None = None,
                     repeats: int = 3, data_dir: str | None = None, consumer: float | None = None, **opts) -> list[dict]:
    """Images/s of each loader backend (:func:`loaders.bench.window`), windows interleaved across backends."""
    import loaders
    from loaders import bench as lb
    dev = resolve_device(device)
    windows, rows = {}, {}
    for backend in backends or [b for b in loaders.BACKENDS if b != "auto"]:
        rows[backend] = {"backend": backend, "device": str(dev), "batch_size": batch_size, "img_per_s": None}
        try:
            windows[backend] = lb.window(backend, dev, batch_size=batch_size, data_dir=data_dir, **opts)
        except Exception as e:  # noqa: BLE001 - e.g. ffcv not installed: reported in the row
            rows[backend]["status"] = f"unavailable: {type(e).__name__}: {e}"[:200]
    for backend, t in interleaved({b: w for b, w in windows.items()}, repeats, warmup=1, device=dev).items():
        s = t.summary()
        images = windows[backend].images
        rows[backend].update(status="ok", img_per_s=images / s["wall_s"], img_per_cpu_s=images / s["cpu_s"],
                             windows=len(t.wall), batches_per_window=windows[backend].batches)
        if consumer:
            rows[backend]["loader_over_step"] = rows[backend]["img_per_s"] / consumer
    return list(rows.values())


# ---------------------------------------------------------------------------------------------- CLI
def add_bench_parsers(p_bench: argparse.ArgumentParser) -> None:
    sub = p_bench.add_subparsers(dest="bench_command", required=True)
    p = sub.add_parser("step", help="D-TRADES vs TRADES step cost; fast path vs the official-style eager step")
    p.add_argument("--methods", default="trades,dtrades", help="comma-separated methods, each NAME (every step variant "
                   "it declares, e.g. D-TRADES' sensitivity modes) or NAME[VARIANT] (e.g. dtrades[attack]); default: "
                   "trades,dtrades")
    p.add_argument("--model", "--models", dest="models", default="resnet18", help="comma-separated; default: resnet18")
    p.add_argument("--batch", "--batches", dest="batches", default="128", help="comma-separated; default: 128")
    p.add_argument("--dataset", default="cifar10", help="whose test images feed the step; default: cifar10")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds; default: 5")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first; default: 2")
    p.add_argument("--attack-steps", type=int, default=10, help="training attack steps; default: 10")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the fast path; default: on for CUDA")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"), help="autocast; default: auto")
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the official-style eager step; default: on")
    k = sub.add_parser("kernels", help="Triton kernels against the eager and compiled references (CUDA)")
    k.add_argument("--repeats", type=int, default=7, help="timed rounds; default: 7")
    k.add_argument("--iters", type=int, default=50, help="calls per timed round; default: 50")
    lo = sub.add_parser("loaders", help="images/s of each loader backend against the TRADES step's consumption")
    lo.add_argument("--backends", default=None, help="comma-separated; default: every backend but auto")
    lo.add_argument("--batch-size", type=int, default=128, help="default: 128")
    lo.add_argument("--repeats", type=int, default=3, help="interleaved windows per backend; default: 3")
    lo.add_argument("--step-model", default="resnet18", help="whose TRADES step the loaders are compared with")
    for q in (p, k, lo):
        q.add_argument("--device", default="auto" if q is not k else "cuda", help="device; default: %(default)s")
        q.add_argument("--data-dir", default=None, help="dataset root (default: $FASTROBUST_DATA, else ./data)")
        q.add_argument("--out", default=f"bench_out/{q.prog.split()[-1]}", help="report folder; default: %(default)s")


def run_bench(ns: argparse.Namespace) -> int:
    split = lambda s: [v for v in s.split(",") if v]  # noqa: E731
    out = Path(ns.out)
    if ns.bench_command == "step":
        batches = [int(b) for b in split(ns.batches)]
        if any(b < 1 for b in batches) or ns.repeats < 1:
            raise ConfigError(f"batch sizes and --repeats must be >= 1, got {batches} and {ns.repeats}")
        data = run_step_bench(bench_methods(split(ns.methods)), split(ns.models), batches, ns.device, dataset=ns.dataset,
                              repeats=ns.repeats, warmup=ns.warmup,
                              compile=ns.compile, amp=ns.amp, reference=ns.reference, data_dir=ns.data_dir,
                              attack_steps=ns.attack_steps)
        text = step_markdown(data)
    elif ns.bench_command == "kernels":
        data = run_kernel_bench(ns.device, ns.repeats, ns.iters)
        text = kernel_markdown(data) if data else ""
    else:
        dev = resolve_device(ns.device)
        step = run_step_bench([TRADES()], [ns.step_model], [32 if dev.type == "cpu" else ns.batch_size], str(dev),
                              repeats=2, warmup=1, reference=False, data_dir=ns.data_dir, progress=False)
        consumer = step["rows"][0]["img_per_s"]
        data = run_loader_bench(str(dev), ns.batch_size, split(ns.backends) if ns.backends else None, ns.repeats,
                                ns.data_dir, consumer)
        text = (f"Device: {device_description(dev)}. TRADES-10 {ns.step_model} step consumes {consumer:.1f} img/s.\n\n"
                + markdown_table(["backend", "img/s (median)", "img per CPU s", "loader / step", "status"],
                                 [[r["backend"], r["img_per_s"], r.get("img_per_cpu_s"), r.get("loader_over_step"),
                                   r.get("status")] for r in data]))
    if text:
        print(text)
        write_json(out / f"bench_{ns.bench_command}.json", data)
        atomic_write_text(out / f"bench_{ns.bench_command}.md", text + "\n")
        print(f"written to {out}/bench_{ns.bench_command}.{{json,md}}")
    return 0
