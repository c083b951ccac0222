"""The GPU suite: everything fastrobust measures on a CUDA machine, in one command, within a time budget.

    python -m fastrobust.gpu_suite DATA_DIR OUT_DIR [--device cuda|cpu] [--quick] [--budget-s 540]

Stages, in order (each runs only if what is left of the budget, after reserving the minimum of the
stages still to come, covers its own minimum; a stage that does not fit is recorded as skipped with
the reason, never dropped):

  environment   torch, triton, CUDA, GPU name, driver, memory, package versions, git commit
  kernel_tests  tests/test_kernels*.py in a subprocess: on CUDA compiled on the GPU
                (FASTROBUST_TEST_DEVICE=cuda, TRITON_INTERPRET unset); with --quick one case of each
                test function, on the CPU in the interpreter under FASTROBUST_TEST_DEVICE=cpu-audit
                (which checks the CUDA run's data flow, see tests/test_kernels_device.py)
  kernel_bench  kernels.bench.run: Triton kernels against eager and compiled references   (CUDA only)
  step_bench    fastrobust.bench.run_step_bench: the D-TRADES / TRADES ratio with many repeats and the
                eager reference, then methods standard, trades, mart, faal, dtrades x resnet18, vgg16
                (batch 128, torch.compile + bf16 autocast on CUDA), then trades / dtrades on wrn34_10
  loaders       loaders.bench.run, device-resident backend, against the TRADES step's consumption
  memory        the 8 GB goal: peak CUDA memory of one D-TRADES step (bf16, batch 128) for resnet18,
                vgg16, wrn34_10 (wrn34_10 retried with activation checkpointing if over)   (CUDA only)
  training      a short real D-TRADES and TRADES training run (the same number of steps each) with
                the rest of the budget; img/s, NA and FGSM / PGD RA on a held-out slice

DATA_DIR needs CIFAR-10's test split (``cifar10-npz/test.npz``) for the CUDA run, MNIST
(``MNIST/raw``) for the CPU dry run. When a dataset's train split is missing, the loader and training
stages use its test split instead, 90% to train on and the last 10% held out, and say so.

OUT_DIR receives three files: ``suite.json`` (every stage, its status and all its numbers),
``suite.md`` (the same as tables) and ``kernel_tests.log`` (pytest's output). ``suite.json`` and
``suite.md`` are rewritten after every stage, so a run killed from outside leaves what it finished.
A watchdog ends the process at ``--hard-limit-s`` (default: the budget + 30 s), after writing both.

``--device cpu`` (or ``--quick``) sizes everything for a CPU: SmallCNN on MNIST, batch 8, a PGD-1
training attack (PGD-2 evaluation), one repeat, 24 training steps at batch 16; CUDA-only stages are
recorded as "skipped: needs CUDA". That dry run is what CI runs (tests/test_gpu_suite.py). Without
``--quick`` on the CPU the kernel tests stage runs the whole CPU kernel suite instead of the subset.
"""
from __future__ import annotations

# Only the standard library at module level: pytest imports this module as a plugin (for the
# --quick test subset) before the kernel tests decide how triton is imported.
import argparse
import dataclasses
import glob
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

_T_IMPORT = time.monotonic()   # run as a script, the budget counts from here: `import torch` is in the 10 minutes
REPO = Path(__file__).resolve().parents[1]
STAGES = ("environment", "kernel_tests", "kernel_bench", "step_bench", "loaders", "memory", "training")
GPU_ONLY = ("kernel_bench", "memory")
STATUSES = ("ok", "partial", "failed", "skipped")
MEMORY_GOAL_GIB = 8.0
DEFAULT_BUDGET_S = 540.0
FILES = ("suite.json", "suite.md", "kernel_tests.log")
SUBSET_ENV = "FASTROBUST_SUITE_TEST_SUBSET"
METHODS = ("standard", "trades", "mart", "faal", "dtrades")


# ----------------------------------------------------------------------------- pytest plugin
def pytest_collection_modifyitems(config, items):
    """With ``-p fastrobust.gpu_suite`` and $FASTROBUST_SUITE_TEST_SUBSET=1: keep the first case of each
    test function (and leave out the ahead-of-time compile check, a subprocess of its own)."""
    if os.environ.get(SUBSET_ENV) != "1":
        return
    seen, keep, drop = set(), [], []
    for item in items:
        key = (str(item.fspath), getattr(item, "originalname", None) or item.name)
        if key in seen or "test_kernels_gpu_compile" in key[0]:
            drop.append(item)
        else:
            seen.add(key)
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


# ----------------------------------------------------------------------------- the plan
@dataclasses.dataclass
class StageSpec:
    name: str
    min_s: float            # do not start with less than this
    share: float            # at most this fraction of the budget (the last stage takes the rest)
    gpu_only: bool = False


@dataclasses.dataclass
class Plan:
    """What each stage runs: sized for a GPU (``full``) or for a CPU / a quick check (``tiny``)."""
    tiny: bool
    dataset: str
    batch: int
    attack_steps: int
    stages: tuple[StageSpec, ...]
    step_runs: tuple[dict, ...]
    memory_models: tuple[str, ...]
    train_model: str
    train_profile: str
    eval_samples: int
    eval_pgd_steps: int
    train_batch: int | None = None         # None: ``batch``
    train_max_steps: int | None = None     # per method; None: as many as the time allows
    train_max_s: float | None = None       # per method; None: an equal share of the stage's time

    @staticmethod
    def make(cuda: bool, quick: bool) -> "Plan":
        tiny = quick or not cuda
        if not tiny:
            stages = (StageSpec("environment", 0, 0.06), StageSpec("kernel_tests", 40, 0.30),
                      StageSpec("kernel_bench", 20, 0.09, True), StageSpec("step_bench", 60, 0.48),
                      StageSpec("loaders", 10, 0.05), StageSpec("memory", 20, 0.11, True),
                      StageSpec("training", 60, 1.0))
            # expected_s: a first guess at each run's wall time on an H100 including torch.compile
            # (the FX graph cache makes later runs of a model cheaper); the suite records the actual.
            step_runs = (
                dict(name="ratio resnet18", models=("resnet18",), methods=("trades", "dtrades"),
                     sensitivities=("attack", "exact"), repeats=15, warmup=2, reference=True, expected_s=100),
                dict(name="matrix resnet18", models=("resnet18",), methods=METHODS, sensitivities=("exact",),
                     repeats=3, warmup=2, reference=False, expected_s=50),
                dict(name="matrix vgg16", models=("vgg16",), methods=METHODS, sensitivities=("exact",),
                     repeats=3, warmup=2, reference=False, expected_s=80),
                dict(name="wrn34_10", models=("wrn34_10",), methods=("trades", "dtrades"), sensitivities=("exact",),
                     repeats=3, warmup=2, reference=False, expected_s=90))
            return Plan(False, "cifar10", 128, 10, stages, step_runs, ("resnet18", "vgg16", "wrn34_10"),
                        "resnet18", "paper", 1000, 20)
        stages = (StageSpec("environment", 0, 0.05), StageSpec("kernel_tests", 5, 0.40),
                  StageSpec("kernel_bench", 5, 0.10, True), StageSpec("step_bench", 5, 0.25),
                  StageSpec("loaders", 2, 0.05), StageSpec("memory", 5, 0.10, True), StageSpec("training", 5, 1.0))
        # One repeat, no warm-up: these runs check the pipeline, their timings mean little.
        step_runs = (
            dict(name="ratio smallcnn", models=("smallcnn",), methods=("trades", "dtrades"),
                 sensitivities=("attack", "exact"), repeats=1, warmup=0, reference=True, expected_s=2),
            dict(name="matrix smallcnn", models=("smallcnn",), methods=METHODS, sensitivities=("exact",),
                 repeats=1, warmup=0, reference=False, expected_s=2))
        return Plan(True, "mnist", 8, 1, stages, step_runs, ("resnet18",), "smallcnn", "smoke", 100, 2,
                    train_batch=16, train_max_steps=24, train_max_s=15.0)


# ----------------------------------------------------------------------------- output helpers
def jsonable(obj: Any) -> Any:
    """Plain JSON types: NaN / inf become None, dataclasses dicts, tuples lists, anything else str."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [jsonable(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    if hasattr(obj, "item") and callable(obj.item):   # numpy / torch scalars
        try:
            return jsonable(obj.item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(obj)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fmt(v: Any, spec: str = ".1f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the suite
class Suite:
    def __init__(self, data_dir: Path, out_dir: Path, device: str, quick: bool, budget_s: float,
                 hard_limit_s: float, stages: tuple[str, ...], argv: list[str] | None = None,
                 t0: float | None = None):
        self.t0 = time.monotonic() if t0 is None else t0
        self.deadline = self.t0 + budget_s
        self.data_dir, self.out_dir = data_dir, out_dir
        self.device, self.cuda, self.quick = device, device == "cuda", quick
        self.plan = Plan.make(self.cuda, quick)
        self.selected = stages
        self.hard_limit_s = hard_limit_s
        self.lock = threading.RLock()
        self.proc: subprocess.Popen | None = None
        self.current: dict | None = None   # the record of the stage running now
        self.watchdog: threading.Timer | None = None
        self.tmp = Path(tempfile.mkdtemp(prefix="fastrobust_gpu_suite_"))
        self.data: dict[str, Any] = {}
        self.report: dict[str, Any] = {
            "suite": "fastrobust.gpu_suite",
            "command": " ".join(["python", "-m", "fastrobust.gpu_suite", *(sys.argv[1:] if argv is None else argv)]),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": device, "quick": quick,
            "sized_for": "cpu / quick check (tiny)" if self.plan.tiny else "gpu (full)",
            "budget_s": budget_s, "hard_limit_s": hard_limit_s, "data_dir": str(data_dir), "data": self.data,
            "stages": [{"name": s.name, "status": "pending"} for s in self.plan.stages], "elapsed_s": 0.0}
        out_dir.mkdir(parents=True, exist_ok=True)

    # -- time ---------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self, deadline: float | None = None) -> float:
        return (self.deadline if deadline is None else deadline) - time.monotonic()

    def _will_run(self, spec: StageSpec) -> bool:
        return spec.name in self.selected and (self.cuda or not spec.gpu_only)

    def stage_record(self, name: str) -> dict:
        return next(r for r in self.report["stages"] if r["name"] == name)

    # -- output -------------------------------------------------------------------------------------
    def write(self) -> None:
        with self.lock:
            self.report["elapsed_s"] = round(self.elapsed(), 1)
            self.report["overall"] = overall_status(self.report["stages"])
            _atomic_write(self.out_dir / "suite.json", json.dumps(jsonable(self.report), indent=1) + "\n")
            _atomic_write(self.out_dir / "suite.md", render_markdown(self.report))

    def start_watchdog(self) -> None:
        def fire():
            with self.lock:
                for rec in self.report["stages"]:
                    if rec["status"] == "running":
                        rec.update(status="failed", reason=f"aborted: the hard limit of {self.hard_limit_s:.0f} s "
                                                           f"was reached while it ran")
                    elif rec["status"] == "pending":
                        rec.update(status="skipped", reason="time budget: the hard limit was reached first")
                self._kill_proc()
                self.write()
                shutil.rmtree(self.tmp, ignore_errors=True)
            print(f"\ngpu_suite: hard limit of {self.hard_limit_s:.0f} s reached; results so far are in "
                  f"{self.out_dir}", flush=True)
            os._exit(3)

        self.watchdog = threading.Timer(max(self.hard_limit_s - self.elapsed(), 0.0), fire)
        self.watchdog.daemon = True
        self.watchdog.start()

    def _kill_proc(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # -- running --------------------------------------------------------------------------------------
    def run(self) -> dict:
        self.start_watchdog()
        specs = self.plan.stages
        funcs: dict[str, Callable[[float], dict]] = {
            "environment": self.stage_environment, "kernel_tests": self.stage_kernel_tests,
            "kernel_bench": self.stage_kernel_bench, "step_bench": self.stage_step_bench,
            "loaders": self.stage_loaders, "memory": self.stage_memory, "training": self.stage_training}
        self.write()
        for i, spec in enumerate(specs):
            rec = self.stage_record(spec.name)
            if spec.gpu_only and not self.cuda:
                rec.update(status="skipped", reason="needs CUDA")
            elif spec.name not in self.selected:
                rec.update(status="skipped", reason="not selected (--stages)")
            else:
                reserve = sum(s.min_s for s in specs[i + 1:] if self._will_run(s))
                avail = self.left() - reserve
                if avail < spec.min_s:
                    rec.update(status="skipped",
                               reason=f"time budget: {max(avail, 0):.0f} s left for it after reserving {reserve:.0f} s "
                                      f"for later stages; it needs at least {spec.min_s:.0f} s")
                else:
                    allowed = min(avail, spec.share * (self.deadline - self.t0))
                    self._run_stage(rec, funcs[spec.name], allowed)
            print(f"[{self.elapsed():6.1f} s] {spec.name}: {status_text(rec)}", flush=True)
            self.write()
        self.cleanup()
        return self.report

    def publish(self, partial: dict) -> None:
        """A running stage's results so far, written out at once: they survive a kill from outside."""
        with self.lock:
            if self.current is not None:
                self.current["result"] = partial
        self.write()

    def _run_stage(self, rec: dict, fn: Callable[[float], dict], allowed: float) -> None:
        with self.lock:
            rec.update(status="running", allowed_s=round(allowed, 1), started_at_s=round(self.elapsed(), 1))
            self.current = rec
        self.write()
        start = time.monotonic()
        try:
            out = fn(start + allowed)
            status, reason = out.pop("status", "ok"), out.pop("reason", None)
            with self.lock:
                rec.update(status=status, result=out)
                if reason:
                    rec["reason"] = reason
        except Exception as e:  # noqa: BLE001 - a failing stage is recorded, the suite goes on
            with self.lock:
                rec.update(status="failed", reason=f"{type(e).__name__}: {str(e)[:500]}",
                           traceback=traceback.format_exc()[-4000:])
        with self.lock:
            rec["seconds"] = round(time.monotonic() - start, 1)
            self.current = None

    def cleanup(self) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- data -----------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Pick the dataset and the folders the stages read: ``data_dir`` itself, or (train split
        missing) a folder in the temporary directory whose train split is the first 90% of the test
        split and whose test split is the rest, the held-out slice."""
        import numpy as np

        import loaders
        from fastrobust.errors import FastRobustError

        order = [self.plan.dataset] + [d for d in ("cifar10", "mnist") if d != self.plan.dataset]
        problems = []
        for name in order:
            try:
                test = loaders.load_arrays(name, "test", self.data_dir)
            except FastRobustError as e:
                problems.append(f"{name} test: {str(e).splitlines()[0][:200]}")
                continue
            info = {"dataset": name, "bench_root": str(self.data_dir), "notes": []}
            if name != self.plan.dataset:
                info["notes"].append(f"{self.plan.dataset} not found in {self.data_dir}: using {name} instead")
            try:
                train = loaders.load_arrays(name, "train", self.data_dir)
                info.update(train_root=str(self.data_dir), train_source=f"{name} train ({len(train)} images)",
                            held_out_source=f"{name} test ({len(test)} images)", substitute=False)
            except FastRobustError:
                k = int(0.9 * len(test))
                root = self.tmp / "data"
                folder = root / f"{name}-npz"
                folder.mkdir(parents=True, exist_ok=True)
                np.savez(folder / "train.npz", images=test.images[:k], labels=test.labels[:k])
                np.savez(folder / "test.npz", images=test.images[k:], labels=test.labels[k:])
                info.update(train_root=str(root), substitute=True,
                            train_source=f"{name} test[:{k}] (the train split is missing)",
                            held_out_source=f"{name} test[{k}:] ({len(test) - k} images)")
                info["notes"].append(f"{name} train split not found in {self.data_dir}: the loader and training "
                                     f"stages train on test[:{k}] and hold out test[{k}:]")
            self.data.update(info)
            return
        raise FileNotFoundError(f"no usable dataset in {self.data_dir}: " + "; ".join(problems))

    # -- stages ---------------------------------------------------------------------------------------
    def stage_environment(self, deadline: float) -> dict:
        import torch

        from fastrobust.report import device_description, git_commit, versions

        env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                               "torch_cuda": torch.version.cuda, "host": platform.node(),
                               "cpu_count": os.cpu_count(), "packages": versions(), "git": git_commit(),
                               "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET")}
        try:
            from importlib.metadata import version
            env["triton"] = version("triton")
        except Exception:  # noqa: BLE001
            env["triton"] = None
        import kernels._common as common
        env["triton_interpreter_build"] = common.TRITON_INTERPRETER_BUILD
        env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        env["device"] = device_description(self.device)
        reason = None
        if self.cuda:
            props = torch.cuda.get_device_properties(0)
            free, total = torch.cuda.mem_get_info(0)
            env["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                          "multiprocessors": props.multi_processor_count,
                          "memory_total_gib": round(total / 2**30, 2), "memory_free_gib": round(free / 2**30, 2),
                          "count": torch.cuda.device_count(), "driver": _nvidia_smi_driver()}
            if common.TRITON_INTERPRETER_BUILD:
                reason = "triton was imported in interpreter mode: kernel timings are not compiled-kernel timings"
        env["data"] = dict(self.data)
        out = {"env": env}
        if reason:
            out.update(status="partial", reason=reason)
        return out

    def stage_kernel_tests(self, deadline: float) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env["FASTROBUST_DATA"] = str(self.data_dir)
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--tb=short", "-rfE"]
        files = sorted(str(Path(p).relative_to(REPO)) for p in glob.glob(str(REPO / "tests" / "test_kernels*.py")))
        if self.cuda:
            mode = "cuda"
            env.pop("TRITON_INTERPRET", None)
        else:
            mode = "cpu-audit" if self.quick else "cpu"
            env["TRITON_INTERPRET"] = "1"
        env["FASTROBUST_TEST_DEVICE"] = mode
        if self.quick:
            cmd += ["-p", "fastrobust.gpu_suite"]
            env[SUBSET_ENV] = "1"
        workers = 0
        if self.cuda and not self.quick and _has_module("xdist"):
            workers = max(1, min(8, (os.cpu_count() or 2) // 2))
            cmd += ["-n", str(workers)]
        cmd += files
        log_path = self.out_dir / "kernel_tests.log"
        timed_out = False
        start = time.monotonic()
        with open(log_path, "w") as log:
            log.write("$ FASTROBUST_TEST_DEVICE=" + mode + " " + " ".join(cmd) + "\n\n")
            log.flush()
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
            try:
                rc = self.proc.wait(timeout=max(self.left(deadline), 1.0))
            except subprocess.TimeoutExpired:
                timed_out = True
                self._kill_proc()
                rc = None
            finally:
                self.proc = None
        text = log_path.read_text(errors="replace")
        counts = parse_pytest_output(text)
        result = {"mode": mode, "subset": "first case of each test function" if self.quick else "all",
                  "xdist_workers": workers, "files": files, "returncode": rc,
                  "seconds": round(time.monotonic() - start, 1), "log": log_path.name, **counts}
        if counts["failed"] or counts["errors"] or (rc not in (0, None)):
            result.update(status="failed", reason=f"{counts['failed']} failed, {counts['errors']} errors "
                                                  f"(pytest exit code {rc}); see {log_path.name}")
        elif timed_out:
            result.update(status="partial", reason=f"stopped at the stage's time limit ({result['seconds']:.0f} s); "
                                                   f"counts are for the tests finished by then")
        elif counts["passed"] == 0:
            result.update(status="failed", reason="no test passed; see " + log_path.name)
        return result

    def stage_kernel_bench(self, deadline: float) -> dict:
        from kernels import bench

        if self.plan.tiny:   # --quick on a GPU: one shape, no compiled references
            rows = bench.run("cuda", batch_sizes=(128,), num_classes=(10,), iters=10, repeats=3, warmup=3,
                             compile_reference=False, deadline=deadline - 2)
        else:
            rows = bench.run("cuda", batch_sizes=(128, 512), num_classes=(10, 100), deadline=deadline - 5)
        skipped = [r for r in rows if r.get("status", "ok") != "ok"]
        out = {"rows": rows, "markdown": bench.format_markdown(rows)}
        if skipped:
            out.update(status="partial", reason=f"{len(skipped)} of {len(rows)} cases past the stage's time limit")
        return out

    def stage_step_bench(self, deadline: float) -> dict:
        import torch

        from fastrobust.bench import run_step_bench, step_markdown

        _raise_recompile_limit()
        runs: list[dict] = []
        done = 0
        out: dict[str, Any] = {"compile": self.cuda and not self.quick, "amp": "bf16" if self.cuda else "off",
                               "batch": self.plan.batch, "attack_steps": self.plan.attack_steps, "runs": runs}
        for spec in self.plan.step_runs:
            spec = dict(spec)
            name, expected = spec.pop("name"), spec.pop("expected_s")
            entry: dict[str, Any] = {"name": name, "expected_s": expected, **spec}
            left = self.left(deadline)
            if left < expected:
                entry.update(status="skipped", reason=f"time budget: {left:.0f} s left, expected to take ~{expected} s")
                runs.append(entry)
                continue
            start = time.monotonic()
            try:
                report = run_step_bench(list(spec["methods"]), list(spec["models"]), [self.plan.batch], self.device,
                                        dataset=self.data["dataset"], sensitivities=spec["sensitivities"],
                                        repeats=spec["repeats"], warmup=spec["warmup"], compile=out["compile"],
                                        amp=out["amp"], reference=spec["reference"], data_dir=self.data["bench_root"],
                                        attack_steps=self.plan.attack_steps, progress=False)
                entry.update(status="ok", report=report, markdown=step_markdown(report))
                done += 1
            except Exception as e:  # noqa: BLE001
                entry.update(status="failed", reason=f"{type(e).__name__}: {str(e)[:300]}",
                             traceback=traceback.format_exc()[-3000:])
            entry["seconds"] = round(time.monotonic() - start, 1)
            runs.append(entry)
            out["ratios"] = step_ratios(runs)
            self.publish(out)
            if self.cuda:
                torch.cuda.empty_cache()
        out.update(ratios=step_ratios(runs), dynamo=_dynamo_counters())
        failed = [r["name"] for r in runs if r["status"] == "failed"]
        skipped = [r["name"] for r in runs if r["status"] == "skipped"]
        if failed:
            out.update(status="failed", reason="failed: " + ", ".join(failed))
        elif skipped:
            out.update(status="partial" if done else "skipped", reason="time budget: " + ", ".join(skipped))
        return out

    def trades_rate(self) -> tuple[float | None, str]:
        """Images/s of the fastest TRADES step measured in this run (the loader must outrun it)."""
        step = self.stage_record("step_bench").get("result") or {}
        best = None
        for run in step.get("runs", []):
            for row in (run.get("report") or {}).get("rows", []):
                if row["variant"] == "trades" and row["model"] == self.plan.train_model:
                    if best is None or row["img_per_s"] > best[0]:
                        best = (row["img_per_s"], f"step_bench {run['name']}: {row['model']} "
                                                  f"TRADES-{self.plan.attack_steps} fast path, batch {row['batch']}")
        return best if best else (None, "")

    def stage_loaders(self, deadline: float) -> dict:
        from loaders import bench as loader_bench

        rate, source = self.trades_rate()
        if rate is None and self.data["dataset"] == "cifar10":
            import torch

            from fastrobust.bench import trades_consumption_rate
            rate = trades_consumption_rate(self.plan.train_model, torch.device(self.device), self.data["bench_root"],
                                           batch=self.plan.batch)
            source = f"fastrobust.bench.trades_consumption_rate({self.plan.train_model}, batch {self.plan.batch})"
        tiny = self.plan.tiny
        rows = loader_bench.run(device=self.device, dataset=self.data["dataset"], batch_size=self.plan.batch,
                                backends=("gpu",), num_batches=5 if tiny else 200, warmup_batches=1 if tiny else 20,
                                repeats=1 if tiny else 3, data_dir=self.data["train_root"],
                                limit=512 if tiny else None, consumer_img_per_s=rate)
        out = {"rows": rows, "consumer_img_per_s": rate, "consumer_source": source or None,
               "train_source": self.data.get("train_source"),
               "markdown": loader_bench.format_markdown(rows)}
        bad = [r for r in rows if r.get("img_per_s") is None]
        if bad:
            out.update(status="failed", reason="; ".join(f"{r['backend']}: {r['status']}" for r in bad))
        elif rate is None:
            out.update(status="partial", reason="no TRADES step rate to compare against (step_bench did not run)")
        return out

    def stage_memory(self, deadline: float) -> dict:
        rows = []
        for model_name in self.plan.memory_models:
            if self.left(deadline) < 3:
                rows.append({"model": model_name, "status": "skipped", "reason": "time budget"})
                continue
            row = dtrades_peak_memory(model_name, self.data["bench_root"], 128, checkpointing=False)
            rows.append(row)
            self.publish({"goal_gib": MEMORY_GOAL_GIB, "rows": rows})
            if row.get("passed") is False and model_name == "wrn34_10" and self.left(deadline) > 3:
                rows.append(dtrades_peak_memory(model_name, self.data["bench_root"], 128, checkpointing=True))
                self.publish({"goal_gib": MEMORY_GOAL_GIB, "rows": rows})
        verdict: dict[str, bool] = {}
        for r in rows:
            if "passed" in r:
                verdict[r["model"]] = verdict.get(r["model"], False) or r["passed"]
        out = {"goal_gib": MEMORY_GOAL_GIB, "rows": rows, "verdict": verdict}
        failed = [r["model"] for r in rows if r.get("status") == "failed"]
        skipped = [r["model"] for r in rows if r.get("status") == "skipped"]
        if failed:
            out.update(status="failed", reason="measurement failed: " + ", ".join(failed))
        elif skipped:
            out.update(status="partial", reason="time budget: " + ", ".join(skipped))
        return out

    def stage_training(self, deadline: float) -> dict:
        runs = []
        methods = ("dtrades", "trades")
        eval_reserve = 5.0 if self.plan.tiny else 25.0
        share = (self.left(deadline) - len(methods) * eval_reserve) / len(methods)
        if self.plan.train_max_s is not None:
            share = min(share, self.plan.train_max_s)
        max_steps = self.plan.train_max_steps
        for method in methods:
            if share < (2 if self.plan.tiny else 20):
                runs.append({"method": method, "status": "skipped", "reason": f"time budget: {share:.0f} s per run"})
                continue
            try:
                res = train_run(self, method, steps_deadline=time.monotonic() + share, max_steps=max_steps)
            except Exception as e:  # noqa: BLE001 - recorded; the other method still trains
                res = {"method": method, "status": "failed", "reason": f"{type(e).__name__}: {str(e)[:300]}",
                       "traceback": traceback.format_exc()[-3000:]}
            runs.append(res)
            self.publish({"runs": runs})
            if res.get("status") == "ok" and res["steps"]:
                max_steps = res["steps"]   # the next method trains exactly as many steps
        out: dict[str, Any] = {"runs": runs}
        failed = [r["method"] for r in runs if r.get("status") == "failed"]
        skipped = [r["method"] for r in runs if r.get("status") == "skipped"]
        if failed:
            out.update(status="failed", reason="failed: " + ", ".join(failed))
        elif skipped:
            out.update(status="partial" if len(skipped) < len(runs) else "skipped",
                       reason="time budget: " + ", ".join(skipped))
        return out


# ----------------------------------------------------------------------------- stage helpers
def _has_module(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def _nvidia_smi_driver() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe:
        try:
            out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=20).stdout.strip()
            if out:
                return out.splitlines()[0].strip()
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        import pynvml
        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:  # noqa: BLE001
        return None


def _raise_recompile_limit(limit: int = 64) -> None:
    """The step profiler compiles one copy of a model per variant; dynamo's default limit of 8 graphs per
    code object would send later variants to eager silently."""
    import torch._dynamo.config as cfg
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < limit:
            setattr(cfg, name, limit)


def _dynamo_counters() -> dict:
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {}
    keep = ("stats", "frames", "recompiles", "graph_break")
    return {k: {str(kk): vv for kk, vv in list(v.items())[:30]} for k, v in counters.items() if k in keep and v}


def parse_pytest_output(text: str) -> dict:
    """Counts from pytest's verbose output: the final summary line when there is one, else the per-test
    result lines (a run stopped early)."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "xfailed": 0, "xpassed": 0}
    failed_ids = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", text, flags=re.M)))
    summary = None
    for line in text.splitlines()[::-1]:
        if re.match(r"^=+ .*\b(passed|failed|skipped|error|errors|deselected|no tests ran)\b.* in [\d.]+s", line):
            summary = line
            break
    if summary:
        for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)", summary):
            key = "errors" if word.startswith("error") else word
            counts[key] = int(n)
        counts["summary"] = summary.strip("= ")
    else:
        for word in re.findall(r"(?:\s|^)(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)(?=\s|$)", text, flags=re.M):
            key = {"PASSED": "passed", "FAILED": "failed", "SKIPPED": "skipped", "ERROR": "errors",
                   "XFAIL": "xfailed", "XPASS": "xpassed"}[word]
            counts[key] += 1
        counts["summary"] = None
    counts["failed_tests"] = failed_ids[:50]
    return counts


def step_ratios(runs: list[dict]) -> list[dict]:
    out = []
    for run in runs:
        for r in (run.get("report") or {}).get("ratios", []):
            out.append({"run": run["name"], "repeats": run.get("repeats"), **r})
    return out


def _bench_batch(dataset: str, data_dir: str, batch: int, device):
    import torch

    import loaders
    data = loaders.load_arrays(dataset, "test", data_dir, limit=batch)
    x = torch.from_numpy(data.images.copy()).permute(0, 3, 1, 2).float().div(255)
    y = torch.from_numpy(data.labels.copy()).long()
    if len(y) < batch:
        reps = -(-batch // len(y))
        x, y = x.repeat(reps, 1, 1, 1)[:batch], y.repeat(reps)[:batch]
    return x.to(device, memory_format=torch.channels_last), y.to(device)


def dtrades_peak_memory(model_name: str, data_dir: str, batch: int, checkpointing: bool,
                        device: str = "cuda") -> dict:
    """Peak CUDA memory of one D-TRADES step (exact sensitivity, bf16 autocast, eager, channels_last),
    after a warm-up step that allocates the optimiser state; memory held before the model was built
    (earlier stages) is subtracted."""
    import gc

    import torch

    from fastrobust.config import TrainConfig
    from fastrobust.models import create_model
    from fastrobust.train import TrainStep

    dev = torch.device(device)
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(dev)
    row: dict[str, Any] = {"model": model_name, "activation_checkpointing": checkpointing, "batch": batch,
                           "method": "dtrades[exact]", "amp": "bf16", "compile": False}
    try:
        cfg = TrainConfig(dataset="cifar10", model=model_name, method="dtrades", sensitivity="exact",
                          batch_size=batch, amp="bf16", compile=False, device=str(dev),
                          activation_checkpointing=checkpointing).validate()
        model = create_model(model_name, dataset="cifar10").to(dev)
        model.activation_checkpointing = checkpointing
        model = model.to(memory_format=torch.channels_last)
        step = TrainStep(cfg, model, dev)
        x, y = _bench_batch("cifar10", data_dir, batch, dev)
        step(x, y)
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        res = step(x, y)
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - before
        reserved = torch.cuda.max_memory_reserved(dev)
        row.update(peak_allocated_mib=peak / 2**20, peak_reserved_mib=reserved / 2**20,
                   step_ms=1000 * (res.attack_s + res.update_s), passed=peak <= MEMORY_GOAL_GIB * 2**30,
                   status="ok")
        del step, model, x, y, res
    except torch.cuda.OutOfMemoryError as e:
        row.update(status="ok", passed=False, peak_allocated_mib=None, note=f"out of memory: {str(e)[:200]}")
    except Exception as e:  # noqa: BLE001 - recorded; the other models are still measured
        row.update(status="failed", note=f"{type(e).__name__}: {str(e)[:300]}",
                   traceback=traceback.format_exc()[-2000:])
    finally:
        gc.collect()
        torch.cuda.empty_cache()
    return row


class _BudgetStop(Exception):
    pass


def train_run(suite: Suite, method: str, steps_deadline: float, max_steps: int | None) -> dict:
    """Train ``method`` with the trainer (fastrobust.train.Trainer) until ``steps_deadline`` or
    ``max_steps``, then evaluate NA and FGSM / PGD RA on the held-out slice."""
    import numpy as np
    import torch

    import loaders
    import recipes
    from fastrobust.config import EvalConfig
    from fastrobust.evaluate import evaluate
    from fastrobust.train import Trainer

    plan, data = suite.plan, suite.data
    dataset = data["dataset"]
    _raise_recompile_limit()
    tiny = plan.tiny
    eval_over = dict(batch_size=250 if tiny else 500, attacks=("fgsm", "pgd"), aa_samples=0, sweep_samples=0,
                     pgd_steps=plan.eval_pgd_steps)
    over: dict[str, Any] = dict(data_dir=data["train_root"], device=suite.device,
                                compile=suite.cuda and not suite.quick, amp="bf16" if suite.cuda else "off",
                                progress=False, final_eval=False, log_every=1000,
                                out_dir=str(suite.tmp / "runs" / method), eval=eval_over)
    if tiny:
        eps = 0.3 if dataset == "mnist" else 0.031
        over.update(train_limit=512, batch_size=plan.train_batch or plan.batch, epochs=1000,
                    attack_steps=plan.attack_steps,
                    attack_step_size=eps / plan.attack_steps, val_samples=0, lr_schedule="constant")
        eval_over["pgd_step_size"] = eps / plan.eval_pgd_steps
    else:
        over.update(val_samples=200)
    model_name = plan.train_model
    cfg = recipes.make_config(dataset, method, model_name, plan.train_profile, root=suite.tmp / "runs", overrides=over)

    class BudgetedTrainer(Trainer):
        """Stops at the suite's deadline (or after max_steps) and times every step."""

        def __init__(self, cfg):
            super().__init__(cfg)
            self.step_s: list[float] = []
            self.images: list[int] = []

        def step(self, x, y):
            if time.monotonic() >= steps_deadline or (max_steps is not None and len(self.step_s) >= max_steps):
                raise _BudgetStop()
            t = time.perf_counter()
            rec = super().step(x, y)
            self.step_s.append(time.perf_counter() - t)
            self.images.append(len(y))
            return rec

    result: dict[str, Any] = {"method": method, "model": model_name, "dataset": dataset,
                              "profile": plan.train_profile, "train_source": data.get("train_source"),
                              "held_out_source": data.get("held_out_source"),
                              "config": {k: getattr(cfg, k) for k in (
                                  "batch_size", "lr", "attack_steps", "attack_step_size", "eps", "compile", "amp",
                                  "sensitivity", "beta", "train_limit")}}
    trainer = BudgetedTrainer(cfg)
    start = time.monotonic()
    stopped_by = "epochs"
    try:
        trainer.fit()
    except _BudgetStop:
        stopped_by = "step limit" if max_steps is not None and len(trainer.step_s) >= max_steps else "time budget"
    train_s = time.monotonic() - start
    steps = len(trainer.step_s)
    timed = trainer.step_s[3:] if steps > 6 else trainer.step_s
    per_step = [n / s for n, s in zip(trainer.images[-len(timed):], timed)] if timed else []
    steps_per_epoch = getattr(trainer, "steps_per_epoch", None) or 1
    history = [{k: h.get(k) for k in ("epoch", "val_na", "val_pgd_ra", "img_per_s", "epoch_seconds")}
               for h in getattr(trainer, "history", [])]
    result.update(steps=steps, images=int(sum(trainer.images)), epochs=round(steps / steps_per_epoch, 2),
                  steps_per_epoch=steps_per_epoch, stopped_by=stopped_by, train_wall_s=round(train_s, 1),
                  step_img_per_s=statistics.median(per_step) if per_step else None,
                  end_to_end_img_per_s=sum(trainer.images) / train_s if train_s > 0 else None,
                  history=history)
    test = loaders.load_arrays(dataset, "test", data["train_root"])
    n = min(plan.eval_samples, len(test))
    ev = EvalConfig(dataset=dataset, num_samples=n, **{k: v for k, v in eval_over.items()})
    t = time.monotonic()
    r = evaluate(trainer.model, test.images, np.asarray(test.labels), ev, suite.device, progress=False)
    result.update(eval_n=r.n, na=r.na, ra=dict(r.ra), checks_passed=bool(r.all_passed),
                  checks=[c.line() for c in r.checks], eval_s=round(time.monotonic() - t, 1),
                  eval_attacks=f"FGSM, PGD-{ev.pgd_steps} (eps {r.config.get('eps')}, "
                               f"step {r.config.get('pgd_step_size')})",
                  status="ok")
    del trainer
    if suite.cuda:
        torch.cuda.empty_cache()
    return result


# ----------------------------------------------------------------------------- report
def status_text(rec: dict) -> str:
    s = rec.get("status", "pending")
    return f"{s}: {rec['reason']}" if rec.get("reason") else s


def budget_skipped(rec: dict) -> bool:
    return rec.get("status") == "skipped" and str(rec.get("reason", "")).startswith("time budget")


def overall_status(stages: list[dict]) -> str:
    """failed > running (the file of a run killed from outside) > partial (a stage cut short or skipped
    for time) > ok. Stages skipped because they need CUDA or were not selected do not count."""
    st = [r.get("status") for r in stages]
    if "failed" in st:
        return "failed"
    if "running" in st or "pending" in st:
        return "running"
    if "partial" in st or any(budget_skipped(r) for r in stages):
        return "partial"
    return "ok"


def stage_summary(rec: dict) -> str:
    res = rec.get("result") or {}
    name = rec["name"]
    try:
        if name == "environment":
            env = res["env"]
            gpu = env.get("gpu") or {}
            return (f"{gpu.get('name', env.get('device'))}, torch {env['torch']}, triton {env.get('triton')}, "
                    f"CUDA {env.get('torch_cuda')}, driver {gpu.get('driver', '-')}")
        if name == "kernel_tests":
            return (f"{res['passed']} passed, {res['failed']} failed, {res['skipped']} skipped, {res['errors']} errors "
                    f"({res['mode']}, {res['subset']})")
        if name == "kernel_bench":
            ok = [r for r in res["rows"] if r.get("status", "ok") == "ok"]
            return f"{len(ok)}/{len(res['rows'])} cases measured"
        if name == "step_bench":
            key = [r for r in res.get("ratios", []) if r["ratio"].startswith("dtrades") and "/ trades" in r["ratio"]
                   and (r["run"].startswith("ratio") or r["model"] == "wrn34_10")]
            bits = [f"{r['model']} {r['ratio']} = {r['value']:.2f}" for r in key]
            ran = f"{sum(r['status'] == 'ok' for r in res['runs'])}/{len(res['runs'])} runs"
            return "; ".join([ran] + bits)
        if name == "loaders":
            r = res["rows"][0]
            ratio = r.get("loader_over_step")
            return f"{_fmt(r.get('img_per_s'), ',.0f')} img/s" + (f", {ratio:.1f}x the TRADES step" if ratio else "")
        if name == "memory":
            return ", ".join(f"{r['model']}{' +ckpt' if r.get('activation_checkpointing') else ''} "
                             f"{_fmt(r.get('peak_allocated_mib'), '.0f')} MiB {'pass' if r.get('passed') else 'FAIL'}"
                             for r in res["rows"] if "passed" in r)
        if name == "training":
            return "; ".join(f"{r['method']}: {r['steps']} steps, NA {100 * r['na']:.1f}%, PGD RA "
                             f"{100 * r['ra'].get('pgd', float('nan')):.1f}%"
                             for r in res["runs"] if r.get("status") == "ok")
    except (KeyError, IndexError, TypeError, ValueError):
        return ""
    return ""


def render_markdown(report: dict) -> str:
    lines = [f"# fastrobust GPU suite", "",
             f"`{report['command']}`, started {report['started']}; device {report['device']}, sized for "
             f"{report['sized_for']}; budget {report['budget_s']:.0f} s (hard limit {report['hard_limit_s']:.0f} s); "
             f"elapsed {report['elapsed_s']:.0f} s; overall **{report.get('overall', '?')}**.", ""]
    data = report.get("data") or {}
    if data:
        lines += [f"Data: {data.get('dataset')} from `{report['data_dir']}`; train: {data.get('train_source')}; "
                  f"held out: {data.get('held_out_source')}."] + [f"- note: {n}" for n in data.get("notes", [])] + [""]
    rows = [[r["name"], status_text(r), r.get("seconds"), r.get("allowed_s"), stage_summary(r)]
            for r in report["stages"]]
    lines += [_table(["stage", "status", "seconds", "allowed s", "summary"], rows), ""]
    for rec in report["stages"]:
        res = rec.get("result")
        if not res and not rec.get("traceback"):
            continue
        lines += [f"## {rec['name']}", ""]
        if rec.get("traceback"):
            lines += ["```", rec["traceback"][-1500:], "```", ""]
        if not res:
            continue
        try:
            lines += _stage_markdown(rec["name"], res)
        except Exception as e:  # noqa: BLE001 - a partial result must never stop the report
            lines += [f"(not rendered: {type(e).__name__}: {e}; see suite.json)", ""]
    return "\n".join(lines) + "\n"


def _stage_markdown(name: str, res: dict) -> list[str]:
    lines: list[str] = []
    if name == "environment":
        env = dict(res["env"])
        gpu = env.pop("gpu", None) or {}
        pkgs = env.pop("packages", {}) or {}
        env.pop("data", None)
        kv = [[k, v] for k, v in env.items()] + [[f"gpu.{k}", v] for k, v in gpu.items()]
        kv += [[f"package {k}", v] for k, v in pkgs.items()]
        lines += [_table(["what", "value"], kv), ""]
    elif name == "kernel_tests":
        lines += [f"`FASTROBUST_TEST_DEVICE={res['mode']}`, {res['subset']}, xdist workers {res['xdist_workers']}: "
                  f"{res.get('summary') or 'no summary line'} (log: `{res['log']}`).", ""]
        lines += [f"- FAILED {t}" for t in res.get("failed_tests", [])] + [""]
    elif name in ("kernel_bench", "loaders"):
        if name == "loaders":
            lines += [f"Consumer: {_fmt(res.get('consumer_img_per_s'), ',.0f')} img/s "
                      f"({res.get('consumer_source') or 'none'}); train data: {res.get('train_source')}.", ""]
        lines += [res.get("markdown", ""), ""]
    elif name == "step_bench":
        lines += [f"compile={res['compile']}, amp={res['amp']}, batch {res['batch']}, "
                  f"PGD-{res['attack_steps']} training attack.", ""]
        for run in res["runs"]:
            lines += [f"### {run['name']} ({status_text(run)}; {_fmt(run.get('seconds'))} s, "
                      f"expected ~{run['expected_s']} s; repeats {run['repeats']}, warm-up {run['warmup']})", ""]
            if run.get("markdown"):
                lines += [run["markdown"], ""]
        if res.get("dynamo"):
            lines += ["dynamo counters: `" + json.dumps(jsonable(res["dynamo"]))[:1500] + "`", ""]
    elif name == "memory":
        mrows = [[r["model"], r.get("activation_checkpointing"), r.get("batch"), r.get("peak_allocated_mib"),
                  r.get("peak_reserved_mib"), r.get("step_ms"),
                  ("pass" if r.get("passed") else "FAIL") if "passed" in r else status_text(r), r.get("note")]
                 for r in res["rows"]]
        lines += [f"One D-TRADES step (exact sensitivity, bf16 autocast, eager, channels_last), after a warm-up "
                  f"step; goal: peak allocated <= {res['goal_gib']:g} GiB.", "",
                  _table(["model", "activation ckpt", "batch", "peak allocated MiB", "peak reserved MiB (process)",
                          "step ms", "goal", "note"], mrows), ""]
    elif name == "training":
        trows = []
        for r in res["runs"]:
            if r.get("status") != "ok":
                trows.append([r["method"], status_text(r)] + [None] * 9)
                continue
            trows.append([r["method"], r["model"], r["steps"], r["epochs"], r["stopped_by"], r["step_img_per_s"],
                          r["end_to_end_img_per_s"], f"{100 * r['na']:.1f}%",
                          f"{100 * r['ra'].get('fgsm', float('nan')):.1f}%",
                          f"{100 * r['ra'].get('pgd', float('nan')):.1f}%",
                          f"{r['eval_n']} ({'passed' if r['checks_passed'] else 'FAILED'})"])
        ok = [r for r in res["runs"] if r.get("status") == "ok"]
        if ok:
            lines += [f"Train: {ok[0]['train_source']}; held out: {ok[0]['held_out_source']}; "
                      f"evaluation {ok[0]['eval_attacks']}.", ""]
        lines += [_table(["method", "model", "steps", "epochs", "stopped by", "step img/s", "end-to-end img/s",
                          "NA", "FGSM RA", "PGD RA", "eval n (checks)"], trows), "",
                  "step img/s: median over the steps after the first three (compilation); end-to-end: images over "
                  "the training wall time, compilation and per-epoch checks included. Both methods train the same "
                  "number of steps on the same data.", ""]
    return lines


# ----------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastrobust.gpu_suite", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", help="folder with cifar10-npz/test.npz (CUDA run) and/or MNIST/raw (CPU dry run)")
    p.add_argument("out_dir", help="where suite.json, suite.md and kernel_tests.log are written")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: cuda when torch sees a GPU, else cpu")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes everywhere and a subset of the kernel tests (implied by --device cpu's sizes)")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help="seconds for all stages together (default 540: a 10-minute remote limit, with slack)")
    p.add_argument("--hard-limit-s", type=float, default=None,
                   help="the watchdog writes the results and exits here (default: budget + 30 s)")
    p.add_argument("--stages", default=",".join(STAGES),
                   help="comma-separated subset of: " + ", ".join(STAGES))
    return p.parse_args(argv)


def main(argv: list[str] | None = None, t0: float | None = None) -> int:
    """The command line; ``t0`` (a ``time.monotonic()`` value) is when the budget started (default now)."""
    ns = parse_args(argv)
    stages = tuple(s.strip() for s in ns.stages.split(",") if s.strip())
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        print(f"gpu_suite: unknown stage(s) {unknown}; valid: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    device = ns.device
    if device in ("auto", "cuda"):
        # Before anything imports triton: kernels must be compiled, not interpreted, on the GPU.
        import torch
        if torch.cuda.is_available():
            device = "cuda"
            os.environ.pop("TRITON_INTERPRET", None)
        elif device == "cuda":
            print("gpu_suite: --device cuda, but torch sees no CUDA device; the CPU dry run is "
                  "--device cpu --quick", file=sys.stderr)
            return 2
        else:
            device = "cpu"
    data_dir, out_dir = Path(ns.data_dir).resolve(), Path(ns.out_dir).resolve()
    if not data_dir.is_dir():
        print(f"gpu_suite: data folder {data_dir} does not exist", file=sys.stderr)
        return 2
    hard = ns.hard_limit_s if ns.hard_limit_s is not None else ns.budget_s + 30.0
    suite = Suite(data_dir, out_dir, device, ns.quick, ns.budget_s, hard, stages, argv, t0)
    print(f"gpu_suite: device {device}, sized for {suite.report['sized_for']}, budget {ns.budget_s:.0f} s, "
          f"hard limit {hard:.0f} s, output {out_dir}", flush=True)
    try:
        suite.prepare_data()
    except Exception as e:  # noqa: BLE001 - every stage then reports what it lacks
        suite.data.update(error=f"{type(e).__name__}: {e}")
        print(f"gpu_suite: data: {e}", flush=True)
    for note in suite.data.get("notes", []):
        print(f"gpu_suite: note: {note}", flush=True)
    report = suite.run()
    print()
    print(_table(["stage", "status", "seconds", "summary"],
                 [[r["name"], status_text(r), r.get("seconds"), stage_summary(r)] for r in report["stages"]]))
    print(f"\noverall: {report['overall']} in {report['elapsed_s']:.0f} s; wrote "
          f"{', '.join(f for f in FILES if (out_dir / f).exists())} to {out_dir}", flush=True)
    return 1 if report["overall"] == "failed" else 0


if __name__ == "__main__":
    sys.exit(main(t0=_T_IMPORT))
