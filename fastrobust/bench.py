"""Step profiler: the cost of a D-TRADES step against a TRADES step, and of the fast path against
the eager reference users run today.

    fastrobust bench step --methods trades,dtrades --model resnet18 --batch 32 --device cpu

Variants, per (model, batch size):
  fast path      fastrobust's step (TrainStep): clean KL target computed once per batch, loss heads
                 through the kernels, and on a GPU bf16 autocast + channels_last + torch.compile.
                 D-TRADES appears once per sensitivity mode: dtrades[attack|exact|func].
  eager ref      the same algorithm written the way the official TRADES code works, in eager fp32:
                 f(x) recomputed at every attack step, and the clean forward made twice in the loss.

Method: warm-up (and compilation) excluded; all variants measured in the same process, interleaved
round-robin, so slow phases of a noisy machine hit every variant alike; medians with the
interquartile range. FLOPs come from ``torch.utils.flop_counter`` on one eager step of each variant.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .attacks import eval_mode, fp32
from .config import TrainConfig
from .errors import ConfigError
from .models import create_model
from .report import atomic_write_text, device_description, markdown_table, versions, write_json
from .train import StepResult, TrainStep, _sync, peak_memory_mb, resolve_device

# Dense peak throughput (TFLOP/s) by GPU name fragment: bf16 tensor cores, and fp32 (non-tensor).
PEAK_TFLOPS = {"H200": (989.4, 66.9), "H100 SXM": (989.4, 66.9), "H100 80GB HBM3": (989.4, 66.9),
               "H100 PCIe": (756.0, 51.2), "H100": (989.4, 66.9), "A100": (312.0, 19.5), "L4": (121.0, 30.3)}


def peak_tflops(device: torch.device, amp: torch.dtype | None) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16, f32) in PEAK_TFLOPS.items():
        if key in name:
            return bf16 if amp in (torch.bfloat16, torch.float16) else f32
    return None


class EagerReferenceStep:
    """The official TRADES code's structure, eager fp32: f(x) at every attack step, two clean forwards
    in the loss. Covers standard, trades, mart and dtrades (D-TRADES adds its lambda to the TRADES code)."""

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, device: torch.device):
        self.cfg, self.model, self.device = cfg, model, device
        self.opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def _attack(self, x, y, objective):
        cfg, model = self.cfg, self.model
        model.eval()
        x_adv = (x + 0.001 * torch.randn_like(x)).detach()
        grad = None
        for _ in range(cfg.attack_steps):
            x_adv.requires_grad_(True)
            if objective == "kl":
                loss = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1), reduction="sum")
            else:
                loss = F.cross_entropy(model(x_adv), y)
            (grad,) = torch.autograd.grad(loss, [x_adv])
            x_adv = x_adv.detach() + cfg.attack_step_size * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - cfg.eps), x + cfg.eps).clamp(0.0, 1.0)
        model.train()
        return x_adv.detach(), grad

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        cfg, model = self.cfg, self.model
        t0 = time.perf_counter()
        if cfg.method == "standard":
            x_adv = grad = None
            model.train()
        else:
            x_adv, grad = self._attack(x, y, "ce" if cfg.method == "mart" else "kl")
        _sync(self.device)
        t1 = time.perf_counter()
        self.opt.zero_grad()
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if cfg.method in ("trades", "dtrades"):
            logits_adv = model(x_adv)
            kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(model(x), dim=1), reduction="none").sum(1)
            if cfg.method == "trades":
                loss = loss + cfg.beta * kl.mean()
            else:
                p = F.softmax(logits.detach(), dim=1)
                h = -(p * torch.log(p + cfg.entropy_eps)).sum(1)
                if cfg.sensitivity == "attack":
                    s = grad.flatten(1).norm(dim=1)
                else:
                    xa = x_adv.clone().requires_grad_(True)
                    kl_s = F.kl_div(F.log_softmax(model(xa), dim=1), p, reduction="sum")
                    s = torch.autograd.grad(kl_s, xa)[0].flatten(1).norm(dim=1)
                mm = lambda v: (v - v.min()) / (v.max() - v.min()).clamp_min(1e-12)  # noqa: E731
                lam = (cfg.lambda_alpha * mm(h) + cfg.lambda_beta * mm(s)).detach()
                loss = loss + (lam * kl).mean()
        elif cfg.method == "mart":
            logits_adv = model(x_adv)
            q = F.softmax(logits_adv, dim=1)
            top2 = torch.argsort(q, dim=1)[:, -2:]
            wrong = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
            loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - q + 1e-12), wrong)
            p = F.softmax(logits, dim=1)
            p_y = p.gather(1, y[:, None]).squeeze(1)
            kl = (F.kl_div(torch.log(q + 1e-12), p, reduction="none").sum(1) * (1.0000001 - p_y)).mean()
            loss = loss_adv + cfg.beta * kl
        loss.backward()
        self.opt.step()
        _sync(self.device)
        return StepResult(float(loss.detach()), None, t1 - t0, time.perf_counter() - t1)


@dataclasses.dataclass
class Variant:
    name: str
    method: str
    kind: str            # "fast" or "eager ref"
    sensitivity: str | None
    runner: Any
    flops: float | None = None
    attack: list[float] = dataclasses.field(default_factory=list)
    update: list[float] = dataclasses.field(default_factory=list)
    peak_mb: float = 0.0


def _quartiles(v: Sequence[float]) -> tuple[float, float, float]:
    if len(v) < 2:
        return v[0], v[0], v[0]
    q = statistics.quantiles(v, n=4)
    return q[0], statistics.median(v), q[2]


class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker: its backward hooks break torch.autograd.grad
    on leaf inputs (every attack step), and only the total is needed here."""
    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


def _count_flops(runner, x, y) -> float | None:
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    try:
        with counter:
            runner(x, y)
        return float(counter.get_total_flops())
    except Exception:  # noqa: BLE001 - a counter failure only loses the FLOP column
        return None


def _batch(dataset: str, batch: int, device: torch.device, data_dir: str | None):
    import loaders
    data = loaders.load_arrays(dataset, "test", data_dir, limit=batch)
    x = torch.from_numpy(data.images.copy()).permute(0, 3, 1, 2).float().div(255)
    if len(x) < batch:  # fewer test images than the batch: repeat them
        reps = -(-batch // len(x))
        x, y = x.repeat(reps, 1, 1, 1)[:batch], torch.from_numpy(data.labels.copy()).repeat(reps)[:batch]
    else:
        y = torch.from_numpy(data.labels.copy())
    return x.to(device), y.long().to(device)


def run_step_bench(methods: Sequence[str], models: Sequence[str], batches: Sequence[int], device: str = "auto", *,
                   dataset: str = "cifar10", sensitivities: Sequence[str] = ("attack", "exact", "func"),
                   repeats: int = 5, warmup: int = 2, compile: bool | None = None, amp: str = "auto",
                   channels_last: bool | None = None, reference: bool = True, data_dir: str | None = None,
                   profile_dir: str | None = None, attack_steps: int = 10, progress: bool = True,
                   deadline: float | None = None) -> dict[str, Any]:
    """``deadline`` (a time.time() value): stop starting new repeats past it; what was measured is kept."""
    dev = resolve_device(device)
    compile = dev.type == "cuda" if compile is None else compile
    channels_last = True if channels_last is None else channels_last
    rows, ratios = [], []
    for model_name in models:
        for batch in batches:
            torch.manual_seed(0)
            x, y = _batch(dataset, batch, dev, data_dir)
            base = create_model(model_name, dataset=dataset).to(dev)
            variants: list[Variant] = []
            for method in methods:
                modes = sensitivities if method == "dtrades" else (None,)
                for mode in modes:
                    cfg = TrainConfig(dataset=dataset, model=model_name, method=method, batch_size=batch,
                                      attack_steps=attack_steps, compile=compile, amp=amp, device=str(dev),
                                      channels_last=channels_last, **({"sensitivity": mode} if mode else {})).validate()
                    fast_model = copy.deepcopy(base)
                    if channels_last:
                        fast_model = fast_model.to(memory_format=torch.channels_last)
                    name = f"{method}[{mode}]" if mode else method
                    variants.append(Variant(name, method, "fast", mode, TrainStep(cfg, fast_model, dev)))
                    if reference and method != "faal":
                        ref_cfg = dataclasses.replace(cfg, compile=False, amp="off")
                        variants.append(Variant(f"{name} eager ref", method, "eager ref", mode,
                                                EagerReferenceStep(ref_cfg, copy.deepcopy(base), dev)))
            xs = x.to(memory_format=torch.channels_last) if channels_last else x
            for v in variants:  # FLOPs from one eager step of the same algorithm
                runner = v.runner
                if isinstance(runner, TrainStep) and (runner.net is not runner.model):
                    eager = TrainStep(dataclasses.replace(runner.cfg, compile=False), copy.deepcopy(runner.model), dev)
                    v.flops = _count_flops(eager, xs, y)
                else:
                    v.flops = _count_flops(runner, xs if v.kind == "fast" else x, y)
            for _ in range(warmup):
                for v in variants:
                    v.runner(xs if v.kind == "fast" else x, y)
            for r in range(repeats):
                if deadline is not None and r > 0 and time.time() > deadline:
                    break
                for v in variants:
                    resident = 0.0
                    if dev.type == "cuda":  # the step's own peak: above what is resident before it starts
                        torch.cuda.synchronize(dev)
                        resident = torch.cuda.memory_allocated(dev) / 2**20
                        torch.cuda.reset_peak_memory_stats(dev)
                    res = v.runner(xs if v.kind == "fast" else x, y)
                    v.attack.append(res.attack_s)
                    v.update.append(res.update_s)
                    v.peak_mb = max(v.peak_mb, peak_memory_mb(dev) - resident)
                if progress:
                    print(f"  {model_name} batch {batch}: round {r + 1}/{repeats}", flush=True)
            if profile_dir:
                write_profiles(variants, xs, x, y, Path(profile_dir) / f"{model_name}_b{batch}", dev)
            peak = peak_tflops(dev, variants[0].runner.amp if isinstance(variants[0].runner, TrainStep) else None)
            medians = {}
            for v in variants:
                totals = [a + u for a, u in zip(v.attack, v.update)]
                q1, med, q3 = _quartiles(totals)
                medians[v.name] = med
                tflops = v.flops / med / 1e12 if v.flops else None
                rows.append({"model": model_name, "batch": batch, "variant": v.name, "method": v.method, "kind": v.kind,
                             "ms_median": 1000 * med, "ms_q1": 1000 * q1, "ms_q3": 1000 * q3, "img_per_s": batch / med,
                             "attack_ms": 1000 * statistics.median(v.attack), "update_ms": 1000 * statistics.median(v.update),
                             "peak_memory_mb": v.peak_mb, "timed_repeats": len(v.attack), "gflop_per_step": v.flops / 1e9 if v.flops else None,
                             "tflop_per_s": tflops, "mfu": tflops / peak if tflops and peak else None,
                             "repeats": repeats})
            for v in variants:
                if v.method == "dtrades" and v.kind == "fast" and "trades" in medians:
                    ratios.append({"model": model_name, "batch": batch, "ratio": f"{v.name} / trades",
                                   "value": medians[v.name] / medians["trades"]})
                if v.kind == "eager ref" and v.name.replace(" eager ref", "") in medians:
                    fast = v.name.replace(" eager ref", "")
                    ratios.append({"model": model_name, "batch": batch, "ratio": f"{fast} fast / eager ref",
                                   "value": medians[fast] / medians[v.name]})
            del variants
    return {"device": device_description(dev), "versions": versions(), "compile": compile, "amp": amp,
            "channels_last": channels_last, "dataset": dataset, "attack_steps": attack_steps, "repeats": repeats,
            "warmup": warmup, "rows": rows, "ratios": ratios}


def write_profiles(variants: list[Variant], xs, x, y, out: Path, dev: torch.device) -> None:
    from torch.profiler import ProfilerActivity, profile
    out.mkdir(parents=True, exist_ok=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    for v in variants:
        with profile(activities=acts, record_shapes=False) as prof:
            v.runner(xs if v.kind == "fast" else x, y)
        safe = v.name.replace("[", "_").replace("]", "").replace(" ", "_")
        prof.export_chrome_trace(str(out / f"trace_{safe}.json"))
        sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        atomic_write_text(out / f"top_ops_{safe}.txt", prof.key_averages().table(sort_by=sort, row_limit=20))


def step_markdown(report: dict[str, Any]) -> str:
    headers = ["model", "batch", "variant", "ms/step (median)", "IQR ms", "img/s", "attack ms", "update ms",
               "peak MB", "GFLOP/step", "TFLOP/s", "MFU"]
    body = [[r["model"], r["batch"], r["variant"], r["ms_median"], f"{r['ms_q1']:.1f}–{r['ms_q3']:.1f}", r["img_per_s"],
             r["attack_ms"], r["update_ms"], r["peak_memory_mb"], r["gflop_per_step"], r["tflop_per_s"],
             None if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"] for r in report["rows"]]
    ratio_rows = [[r["model"], r["batch"], r["ratio"], f"{r['value']:.3f}"] for r in report["ratios"]]
    return (f"Device: {report['device']}; compile={report['compile']}, amp={report['amp']}, "
            f"channels_last={report['channels_last']}, PGD-{report['attack_steps']} training attack, "
            f"{report['repeats']} interleaved repeats after {report['warmup']} warm-up. Peak MB: on CUDA the "
            f"memory a step allocates above what is resident before it; on the CPU the process's peak RSS.\n\n"
            + markdown_table(headers, body) + "\n\n**Ratios** (median step time)\n\n"
            + markdown_table(["model", "batch", "ratio", "value"], ratio_rows) + "\n")


def add_step_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("step", help="D-TRADES vs TRADES step cost; fast path vs eager reference")
    p.add_argument("--methods", default="trades,dtrades")
    p.add_argument("--model", "--models", dest="models", default="resnet18")
    p.add_argument("--batch", "--batches", dest="batches", default="128")
    p.add_argument("--device", default="auto")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--sensitivities", default="attack,exact,func")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--attack-steps", type=int, default=10)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the fast path (default: on for CUDA)")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"))
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--profile", action="store_true", help="write a torch.profiler trace of one step per variant")
    p.add_argument("--out", default="bench_out/step")


def step_command(ns: argparse.Namespace) -> tuple[dict, str]:
    split = lambda s: [v for v in s.split(",") if v]  # noqa: E731
    batches = [int(b) for b in split(ns.batches)]
    if any(b < 1 for b in batches):
        raise ConfigError(f"batch sizes must be >= 1, got {batches}")
    report = run_step_bench(split(ns.methods), split(ns.models), batches, ns.device, dataset=ns.dataset,
                            sensitivities=split(ns.sensitivities), repeats=ns.repeats, warmup=ns.warmup,
                            compile=ns.compile, amp=ns.amp, channels_last=ns.channels_last, reference=ns.reference,
                            data_dir=ns.data_dir, profile_dir=(ns.out if ns.profile else None),
                            attack_steps=ns.attack_steps)
    text = step_markdown(report)
    out = Path(ns.out)
    write_json(out / "bench_step.json", report)
    atomic_write_text(out / "bench_step.md", text)
    return report, text


def trades_consumption_rate(model_name: str, device: torch.device, data_dir: str | None, batch: int = 128,
                            steps: int = 2, dataset: str = "cifar10") -> float:
    """Images/s a TRADES-10 training step of ``model_name`` consumes on ``device`` (after one warm-up step)."""
    cfg = TrainConfig(dataset=dataset, model=model_name, method="trades", batch_size=batch,
                      device=str(device)).validate()
    model = create_model(model_name, dataset=dataset).to(device, memory_format=torch.channels_last)
    step = TrainStep(cfg, model, device)
    x, y = _batch(dataset, batch, device, data_dir)
    x = x.to(memory_format=torch.channels_last)
    step(x, y)
    times = []
    for _ in range(steps):
        r = step(x, y)
        times.append(r.attack_s + r.update_s)
    return batch / statistics.median(times)


def loader_report(ns: argparse.Namespace) -> tuple[list[dict], str]:
    from loaders import bench as loader_bench
    dev = resolve_device(ns.device)
    batch = 32 if dev.type == "cpu" else ns.batch_size  # keep the CPU consumption probe short
    consumer = trades_consumption_rate(ns.step_model, dev, ns.data_dir, batch=batch)
    rows = loader_bench.run(device=str(dev), batch_size=ns.batch_size, backends=tuple(ns.backends.split(",")),
                            data_dir=ns.data_dir, consumer_img_per_s=consumer)
    text = (f"Device: {device_description(dev)}. TRADES-10 {ns.step_model} step consumes {consumer:.1f} img/s "
            f"(batch {batch}).\n\n" + loader_bench.format_markdown(rows, consumer_img_per_s=consumer))
    return rows, text
