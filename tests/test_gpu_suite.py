"""The GPU suite's CPU dry run, which is what CI can run of it:

    python -m fastrobust.gpu_suite DATA_DIR OUT_DIR --device cpu --quick

It must go through every stage, record a status for each, say "skipped: needs CUDA" for the
CUDA-only ones, and leave at most 8 files at most 2 folders deep (what the remote GPU tool returns).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastrobust import gpu_suite

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("gpu_suite") / "out"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "fastrobust.gpu_suite", str(data_dir), str(out), "--device", "cpu",
                           "--quick"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return proc, out, time.monotonic() - start


def test_dry_run_reports_every_stage(dry_run):
    proc, out, seconds = dry_run
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    report = json.loads((out / "suite.json").read_text())
    assert [s["name"] for s in report["stages"]] == list(gpu_suite.STAGES)
    assert report["overall"] == "ok" and report["device"] == "cpu" and report["quick"] is True
    for stage in report["stages"]:
        assert stage["status"] in gpu_suite.STATUSES, stage
        if stage["name"] in gpu_suite.GPU_ONLY:
            assert stage["status"] == "skipped" and stage["reason"] == "needs CUDA"
        else:
            assert stage["status"] == "ok", stage
            assert isinstance(stage["result"], dict) and stage["seconds"] >= 0
    md = (out / "suite.md").read_text()
    for stage in report["stages"]:
        row = next(line for line in md.splitlines() if line.startswith(f"| {stage['name']} |"))
        assert gpu_suite.status_text(stage) in row
    assert md.count("skipped: needs CUDA") == len(gpu_suite.GPU_ONLY)
    assert "overall: ok" in proc.stdout
    assert seconds < 120, f"the CPU dry run took {seconds:.0f} s"


def test_dry_run_stage_results(dry_run):
    _, out, _ = dry_run
    stages = {s["name"]: s.get("result") for s in json.loads((out / "suite.json").read_text())["stages"]}
    assert stages["environment"]["env"]["torch"] and "gpu" not in stages["environment"]["env"]
    kt = stages["kernel_tests"]
    assert kt["mode"] == "cpu-audit" and kt["passed"] > 20 and kt["failed"] == kt["errors"] == 0
    assert (out / kt["log"]).is_file()
    step = stages["step_bench"]
    assert [r["status"] for r in step["runs"]] == ["ok"] * len(step["runs"])
    variants = {row["variant"] for r in step["runs"] for row in r["report"]["rows"]}
    assert {"standard", "trades", "mart", "faal", "dtrades[exact]", "dtrades[attack]", "trades eager ref"} <= variants
    assert any(r["ratio"] == "dtrades[exact] / trades" for r in step["ratios"])
    (row,) = stages["loaders"]["rows"]
    assert row["backend"] == "gpu" and row["img_per_s"] > 0 and row["loader_over_step"] > 0
    runs = stages["training"]["runs"]
    assert [r["method"] for r in runs] == ["dtrades", "trades"]
    for r in runs:
        assert r["status"] == "ok" and r["steps"] > 0 and r["steps"] == runs[0]["steps"]
        assert 0 <= r["ra"]["pgd"] <= r["na"] <= 1 and r["eval_n"] > 0 and r["step_img_per_s"] > 0


def test_dry_run_output_fits_the_remote_tool(dry_run):
    """At most 8 files, at most 2 folders down, names of letters, digits, '.', '_' and '-'."""
    _, out, _ = dry_run
    files = [p for p in out.rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == sorted(gpu_suite.FILES)
    assert len(files) <= 8
    for p in files:
        rel = p.relative_to(out)
        assert len(rel.parts) <= 3 and all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in rel.parts)


def test_stages_that_do_not_fit_are_recorded_as_skipped(tmp_path, data_dir):
    """No budget at all: every selected stage is listed as skipped for time, nothing is dropped."""
    out = tmp_path / "out"
    rc = gpu_suite.main([str(data_dir), str(out), "--device", "cpu", "--quick", "--budget-s", "0",
                         "--stages", "environment,step_bench,training"])
    assert rc == 0
    report = json.loads((out / "suite.json").read_text())
    assert report["overall"] == "partial"
    reasons = {s["name"]: (s["status"], s.get("reason", "")) for s in report["stages"]}
    assert set(reasons) == set(gpu_suite.STAGES)
    for name in ("environment", "step_bench", "training"):
        assert reasons[name][0] == "skipped" and reasons[name][1].startswith("time budget"), reasons[name]
    for name in ("kernel_tests", "loaders"):
        assert reasons[name] == ("skipped", "not selected (--stages)")
    for name in gpu_suite.GPU_ONLY:
        assert reasons[name] == ("skipped", "needs CUDA")


def test_watchdog_ends_the_run_at_the_hard_limit(tmp_path, data_dir):
    """Past --hard-limit-s the watchdog kills the running stage (here the kernel-test subprocess), marks
    it failed, writes both reports and exits with status 3: nothing outlives the remote tool's limit."""
    out = tmp_path / "out"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run([sys.executable, "-m", "fastrobust.gpu_suite", str(data_dir), str(out), "--device", "cpu",
                           "--quick", "--hard-limit-s", "6", "--stages", "kernel_tests,training"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    report = json.loads((out / "suite.json").read_text())
    status = {s["name"]: (s["status"], s.get("reason", "")) for s in report["stages"]}
    assert status["kernel_tests"][0] == "failed" and status["kernel_tests"][1].startswith("aborted: the hard limit")
    assert status["training"] == ("skipped", "time budget: the hard limit was reached first")
    assert report["overall"] == "failed" and "hard limit" in (out / "suite.md").read_text()


def test_parse_pytest_output():
    serial = ("tests/test_kernels.py::test_a[1] PASSED [ 50%]\ntests/test_kernels.py::test_b FAILED [100%]\n"
              "FAILED tests/test_kernels.py::test_b - AssertionError\n"
              "=================== 1 failed, 1 passed, 2 deselected in 3.21s ===================\n")
    c = gpu_suite.parse_pytest_output(serial)
    assert (c["passed"], c["failed"], c["deselected"]) == (1, 1, 2)
    assert c["failed_tests"] == ["tests/test_kernels.py::test_b"]
    xdist_cut = ("[gw0] [ 10%] PASSED tests/test_kernels.py::test_a[1]\n[gw1] [ 20%] SKIPPED tests/x.py::test_c\n"
                 "[gw1] [ 30%] PASSED tests/test_kernels.py::test_a[2]\n")   # killed before the summary line
    c = gpu_suite.parse_pytest_output(xdist_cut)
    assert (c["passed"], c["skipped"], c["failed"], c["summary"]) == (2, 1, 0, None)
    done = "============ 243 passed in 62.51s (0:01:02) ============"
    assert gpu_suite.parse_pytest_output(done)["passed"] == 243


def test_jsonable():
    assert gpu_suite.jsonable({"a": float("nan"), "b": (1, float("inf")), 3: [2.5]}) == {"a": None, "b": [1, None],
                                                                                       "3": [2.5]}
