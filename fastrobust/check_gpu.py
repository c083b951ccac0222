"""``fastrobust check-gpu``: what a user with a GPU runs first, in about five minutes with the defaults.

A plain sequence, each part sized by its own flags, each writing its results into ``check_gpu.md`` and
``check_gpu.json`` as soon as it ends (a run stopped from outside keeps what it finished):

  1. environment   torch, triton, CUDA, the GPU, its capability and memory
  2. self-check    every Triton kernel against the float64 reference over a sweep of class counts,
                   image shapes and dtypes (the check training runs on first use); from a checkout,
                   also the kernel test suite, compiled for the device
  3. kernels       Triton against the eager and the compiled reference ops
  4. step          TRADES against D-TRADES (attack, exact), fast against the official-style eager step
  5. memory        the peak memory of one D-TRADES step (exact, bf16) per model, against the 8 GB goal
  6. training      a short compiled bf16 D-TRADES run on CIFAR-10 (random images without the data), img/s

It needs torch and triton only (the step and training parts use random images without the data). A
part that fails is recorded as ``error`` with its traceback and the others still run; the exit status
is 1 if any part failed. ``--device cpu --quick`` runs the same sequence sized for a CPU, expected in
well under a minute on 2 cores (tests/test_check_gpu.py runs it); figures that exist only on a GPU
(kernel timings, peak memory, MFU, capability) are marked "CUDA only" there.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

import kernels

from . import report
from .models import INPUT_NORMALIZATIONS

MEMORY_GOAL_GIB = 8.0
CUDA_ONLY = "CUDA only"   # how a figure that exists only on a GPU is marked on other devices
REPO = Path(__file__).resolve().parents[1]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check-gpu", help="check and measure this library on a GPU (about 5 minutes)")
    p.add_argument("--device", default="cuda", help="device to check; default: cuda")
    p.add_argument("--out", default="check_gpu", help="folder for check_gpu.{md,json}; default: check_gpu")
    p.add_argument("--quick", action="store_true", help="everything at the smallest size (CPU dry run: under a minute)")
    p.add_argument("--data-dir", default=None, help="dataset root for the step and training parts (random images without it)")
    p.add_argument("--batch", type=int, default=128, help="batch size of the step, memory and training parts; "
                                                          "default: 128")
    p.add_argument("--step-repeats", type=int, default=10, help="interleaved timed rounds of the step part; default: 10")
    p.add_argument("--train-steps", type=int, default=200, help="steps of the training part; default: 200")
    p.add_argument("--memory-models", default="resnet18,vgg16,wrn34_10", help="models of the memory part; "
                                                                              "default: resnet18,vgg16,wrn34_10")
    p.add_argument("--input-normalization", default="dataset", choices=INPUT_NORMALIZATIONS,
                   help="the models' first layer in the memory and training parts: dataset (its mean/std), or none "
                        "(raw [0, 1] inputs, the official TRADES/MART convention); default: dataset")
    p.add_argument("--test-timeout", type=int, default=120, help="seconds for the kernel test suite; default: 120")


class Report:
    """check_gpu.md and check_gpu.json, rewritten after every part."""

    def __init__(self, out: Path):
        self.out, self.parts = out, []

    def add(self, name: str, started: float, status: str, data: Any, text: str) -> None:
        self.parts.append({"part": name, "status": status, "seconds": round(time.time() - started, 1), "data": data,
                           "text": text})
        report.write_json(self.out / "check_gpu.json", self.parts)
        report.atomic_write_text(self.out / "check_gpu.md", "\n\n".join(
            f"## {p['part']} ({p['status']}, {p['seconds']} s)\n\n{p['text']}" for p in self.parts) + "\n")
        print(f"[{status}] {name} ({self.parts[-1]['seconds']} s)\n{text}\n", flush=True)


def environment(device: torch.device) -> tuple[dict, str]:
    env = {**report.versions(), "device": report.device_description(device), "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1))
    else:
        env.update(capability=CUDA_ONLY, memory_gib=CUDA_ONLY)
    return env, report.markdown_table(["key", "value"], [[k, v] for k, v in env.items()])


def self_check(device: torch.device, quick: bool, timeout: int) -> tuple[dict, str]:
    classes = (10,) if quick else (2, 10, 100, 1000, 1500)
    shapes = ((1, 28, 28),) if quick else ((1, 28, 28), (3, 32, 32), (3, 64, 64))
    dtypes = (torch.float32,) if quick else (torch.float32, torch.bfloat16, torch.float16)
    for dtype in dtypes:
        for i, c in enumerate(classes):
            kernels.self_check(device, dtype, c, shapes[i % len(shapes)], backend="auto")
    verdicts = kernels.self_check_report()
    data: dict[str, Any] = {"verdicts": verdicts}
    if not verdicts:
        data["note"] = f"the Triton kernels do not run for {device.type} tensors here: the reference ops are used"
    tests = REPO / "tests"
    if device.type == "cuda" and tests.is_dir():   # from a checkout: the kernel tests, compiled for the GPU
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["FASTROBUST_TEST_DEVICE"] = "cuda"
        try:
            done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", *sorted(map(str, tests.glob("test_kernels*.py")))],
                                  cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
            data["kernel_tests"] = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
        except subprocess.TimeoutExpired:
            data["kernel_tests"] = f"stopped after --test-timeout {timeout} s"
    rows = [[v["op"], v["dtype"], v["shape_class"], "passed" if v["passed"] else "FAILED", v["detail"]] for v in verdicts]
    text = report.markdown_table(["kernel", "dtype", "shape class", "verdict", "figures"], rows) if rows else data["note"]
    if "kernel_tests" in data:
        text += f"\n\nKernel test suite on the device: {data['kernel_tests']}"
    return data, text


def kernel_part(device: torch.device, quick: bool) -> tuple[dict, str]:
    from .bench import kernel_markdown, run_kernel_bench
    if device.type != "cuda":
        return {"skipped": CUDA_ONLY, "rows": []}, f"skipped: {CUDA_ONLY} (Triton kernels are timed on a GPU)"
    rows = run_kernel_bench(str(device), repeats=3 if quick else 7, iters=5 if quick else 50,
                            **({"batch_sizes": (16,), "num_classes": (10,), "compile_reference": False} if quick else {}))
    return {"rows": rows}, kernel_markdown(rows)


def step_part(device: torch.device, quick: bool, batch: int, repeats: int, data_dir: str | None) -> tuple[dict, str]:
    """Step cost on the first test images, or on random images where there is no data (the cost does not
    depend on the pixels): this part needs no dataset."""
    import loaders
    from .bench import run_step_bench, step_markdown
    from .errors import DataError
    from .methods import DTRADES, TRADES
    model, dataset = ("smallcnn", "mnist") if quick else ("resnet18", "cifar10")
    try:
        loaders.load_arrays(dataset, "test", data_dir, limit=1)
        random_images = False
    except DataError:
        random_images = True
    data = run_step_bench([TRADES(), DTRADES(sensitivity="attack"), DTRADES(sensitivity="exact")], [model],
                          [8 if quick else batch], str(device), dataset=dataset, repeats=1 if quick else repeats,
                          warmup=0 if quick else 1,
                          attack_steps=1 if quick else 10, progress=False, data_dir=data_dir,
                          random_images=random_images)
    text = step_markdown(data)
    if device.type != "cuda":
        text += f"\n\nTFLOP/s and MFU: MFU is {CUDA_ONLY} (a GPU's peak throughput); CPU times are not GPU figures."
    return data, text


def memory_part(device: torch.device, quick: bool, batch: int, models: list[str],
                normalization: str = "dataset") -> tuple[list, str]:
    from .config import TrainConfig, default_attack
    from .methods import DTRADES
    from .models import create_model
    from .step import TrainStep
    rows = []
    for name in (["smallcnn"] if quick else models):
        dataset = "mnist" if name == "smallcnn" else "cifar10"
        m = create_model(name, dataset=dataset, normalization=normalization).to(device, memory_format=torch.channels_last)
        cfg = TrainConfig(dataset=dataset, model=name, method=DTRADES(sensitivity="exact"), amp="bf16",
                          input_normalization=normalization,
                          compile=False, device=str(device),
                          attack=default_attack(steps=1 if quick else 10)).validate()
        step = TrainStep(cfg, m, device)
        x = torch.rand(8 if quick else batch, m.spec.in_chans, m.spec.img_size, m.spec.img_size,
                       device=device).to(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (len(x),), device=device)
        step(x, y)   # optimiser state allocated: the next step is the steady state
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        step(x, y)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        rows.append({"model": name, "batch": len(x), "peak_gib": peak,
                     "within_goal": None if peak is None else peak <= MEMORY_GOAL_GIB})
        del step, m
    text = report.markdown_table(["model", "batch", "peak GiB", f"<= {MEMORY_GOAL_GIB:g} GiB"],
                                 [[r["model"], r["batch"], r["peak_gib"], r["within_goal"]] for r in rows])
    return rows, text + ("" if device.type == "cuda" else f"\n\nPeak memory: {CUDA_ONLY} (not measured on {device.type}).")


def training_part(device: torch.device, quick: bool, batch: int, steps: int, data_dir: str | None,
                  normalization: str = "dataset") -> tuple[dict, str]:
    from .config import TrainConfig, default_attack
    from .methods import DTRADES
    from .models import create_model
    from .step import TrainStep
    model, dataset = ("smallcnn", "mnist") if quick else ("resnet18", "cifar10")
    steps, batch = (4, 8) if quick else (steps, batch)
    cfg = TrainConfig(dataset=dataset, model=model, method=DTRADES(sensitivity="attack"), batch_size=batch,
                      input_normalization=normalization, amp="auto", compile=None, device=str(device),
                      attack=default_attack(steps=1 if quick else 10)).validate()
    try:
        import loaders
        batches = loaders.build(dataset, "train", batch, device, data_dir=data_dir, drop_last=True)
        source = f"{dataset} training images"
    except Exception:  # noqa: BLE001 - no data here: random images measure the same throughput
        m = create_model(model, dataset=dataset)
        batches = [(torch.rand(batch, m.spec.in_chans, m.spec.img_size, m.spec.img_size, device=device),
                    torch.randint(0, 10, (batch,), device=device))]
        source = "random images (no dataset found)"
    net = create_model(model, dataset=dataset, normalization=normalization).to(device, memory_format=torch.channels_last)
    step, done, losses, times = TrainStep(cfg, net, device), 0, [], []
    while done < steps:
        for x, y in batches:
            t0 = time.perf_counter()
            r = step(x.to(memory_format=torch.channels_last), y, step=done)
            times.append(time.perf_counter() - t0)
            losses.append(r.loss)
            done += 1
            if done == steps:
                break
    timed = times[min(5, len(times) - 1):]   # compilation excluded
    data = {"model": model, "data": source, "steps": steps, "batch": batch, "amp": str(step.amp),
            "compiled": step.net is not net, "fallbacks": step.notes, "first_loss": losses[0], "last_loss": losses[-1],
            "img_per_s": batch * len(timed) / sum(timed)}
    return data, report.markdown_table(["key", "value"], [[k, v] for k, v in data.items()])


def run(ns: argparse.Namespace) -> int:
    from .distributed import resolve_device
    device = resolve_device(ns.device)
    rep, failed = Report(Path(ns.out)), 0
    parts: list[tuple[str, Callable[[], tuple[Any, str]]]] = [
        ("environment", lambda: environment(device)),
        ("self-check", lambda: self_check(device, ns.quick, ns.test_timeout)),
        ("kernels", lambda: kernel_part(device, ns.quick)),
        ("step", lambda: step_part(device, ns.quick, ns.batch, ns.step_repeats, ns.data_dir)),
        ("memory", lambda: memory_part(device, ns.quick, ns.batch, ns.memory_models.split(","), ns.input_normalization)),
        ("training", lambda: training_part(device, ns.quick, ns.batch, ns.train_steps, ns.data_dir, ns.input_normalization))]
    for name, part in parts:
        started = time.time()
        try:
            data, text = part()
            bad = name == "self-check" and any(not v["passed"] for v in data["verdicts"])
            skipped = isinstance(data, dict) and "skipped" in data
            rep.add(name, started, "FAILED" if bad else "skipped" if skipped else "ok", data, text)
            failed += bad
        except Exception as e:  # noqa: BLE001 - one part failing must not lose the others
            failed += 1
            rep.add(name, started, "error", {"error": f"{type(e).__name__}: {e}"}, "```\n" + traceback.format_exc()[-3000:]
                    + "```")
    print(f"written to {rep.out}/check_gpu.{{md,json}}")
    return 1 if failed else 0
