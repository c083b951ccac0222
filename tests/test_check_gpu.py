"""``fastrobust check-gpu``: its CPU dry run (``--device cpu --quick``), which is what CI can run of it.

It must go through all six parts, write check_gpu.md and check_gpu.json, mark the figures that exist
only on a GPU as such, and rewrite both files after every part, so that a run that fails or is stopped
half-way keeps what it finished. The dry run is expected to take well under a minute on 2 cores; only
a generous bound is asserted (a loaded CI machine is slower, and timings do not decide a test here).
Run with no dataset anywhere: the step and training parts fall back to random images, as the command
promises ("it needs torch and triton only").
"""
import json
import math
import time

import pytest

from fastrobust import check_gpu
from fastrobust.cli import main as cli_main

PARTS = ["environment", "self-check", "kernels", "step", "memory", "training"]


def _no_data(monkeypatch, folder):
    monkeypatch.delenv("FASTROBUST_DATA", raising=False)
    monkeypatch.chdir(folder)   # no ./data either


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("check_gpu") / "out"
    with pytest.MonkeyPatch.context() as mp:
        _no_data(mp, out.parent)
        start = time.monotonic()
        code = cli_main(["check-gpu", "--device", "cpu", "--quick", "--out", str(out)])
        seconds = time.monotonic() - start
    return code, out, seconds


def _parts(out):
    return {p["part"]: p for p in json.loads((out / "check_gpu.json").read_text())}


def test_quick_cpu_run_reports_all_six_parts(dry_run):
    code, out, seconds = dry_run
    assert code == 0
    parts = json.loads((out / "check_gpu.json").read_text())
    assert [p["part"] for p in parts] == PARTS
    assert {p["part"]: p["status"] for p in parts} == {**dict.fromkeys(PARTS, "ok"), "kernels": "skipped"}
    assert all(p["seconds"] >= 0 and p["text"] for p in parts)
    md = (out / "check_gpu.md").read_text()
    headings = [line for line in md.splitlines() if line.startswith("## ")]
    assert [h.split(" ")[1] for h in headings] == PARTS
    assert seconds < 300, f"the CPU dry run took {seconds:.0f} s (expected: well under 60 s on 2 idle cores)"


def test_cuda_only_figures_are_marked_as_such(dry_run):
    _, out, _ = dry_run
    parts = _parts(out)
    env = parts["environment"]["data"]
    assert env["torch"] and env["capability"] == env["memory_gib"] == check_gpu.CUDA_ONLY
    assert parts["kernels"]["data"] == {"skipped": check_gpu.CUDA_ONLY, "rows": []}
    assert "skipped: CUDA only" in parts["kernels"]["text"]
    (memory,) = parts["memory"]["data"]
    assert memory["model"] == "smallcnn" and memory["peak_gib"] is None and memory["within_goal"] is None
    assert "Peak memory: CUDA only" in parts["memory"]["text"]
    assert all(r["mfu"] is None for r in parts["step"]["data"]["rows"]) and "MFU is CUDA only" in parts["step"]["text"]
    assert parts["self-check"]["data"]["verdicts"] == [] and "do not run for cpu tensors" in parts["self-check"]["text"]


def test_step_and_training_parts_measure_something(dry_run):
    _, out, _ = dry_run
    parts = _parts(out)
    step = parts["step"]["data"]
    assert step["inputs"] == "random images"   # no dataset: random images of MNIST's geometry
    variants = {r["variant"] for r in step["rows"]}
    assert {"trades", "trades eager ref", "dtrades[attack]", "dtrades[exact]"} <= variants
    assert all(r["ms_median"] > 0 and r["gflop_per_step"] > 0 for r in step["rows"])
    assert {"trades fast / eager ref", "dtrades[attack] / trades", "dtrades[exact] / trades"} <= {
        r["ratio"] for r in step["ratios"]}
    train = parts["training"]["data"]
    assert train["data"] == "random images (no dataset found)" and train["steps"] == 4 and train["batch"] == 8
    assert math.isfinite(train["first_loss"]) and math.isfinite(train["last_loss"]) and train["img_per_s"] > 0
    assert train["compiled"] is False and train["fallbacks"] == []


def test_reports_are_rewritten_after_each_part_and_a_failing_part_is_an_error(tmp_path, monkeypatch):
    """The memory part raises; the training part, which runs after it, finds the files already holding
    the five parts before it (the failure included); the run goes on and exits with status 1."""
    _no_data(monkeypatch, tmp_path)
    out = tmp_path / "out"
    seen_by_training = {}

    def failing_memory(*args):
        raise RuntimeError("injected: the memory part broke")

    def training(*args):
        seen_by_training["json"] = json.loads((out / "check_gpu.json").read_text())
        seen_by_training["md"] = (out / "check_gpu.md").read_text()
        return {"stub": True}, "training stub"

    monkeypatch.setattr(check_gpu, "step_part", lambda *args: ({"stub": True}, "step stub"))   # fast
    monkeypatch.setattr(check_gpu, "memory_part", failing_memory)
    monkeypatch.setattr(check_gpu, "training_part", training)
    assert cli_main(["check-gpu", "--device", "cpu", "--quick", "--out", str(out)]) == 1

    before = seen_by_training["json"]
    assert [p["part"] for p in before] == PARTS[:5]
    assert before[4]["status"] == "error" and before[4]["data"] == {"error": "RuntimeError: injected: the memory part broke"}
    assert "injected: the memory part broke" in before[4]["text"] and "Traceback" in before[4]["text"]
    assert "## memory (error" in seen_by_training["md"] and "## training" not in seen_by_training["md"]
    final = _parts(out)
    assert list(final) == PARTS
    assert final["memory"]["status"] == "error" and final["training"]["status"] == "ok"
    assert final["step"]["text"] == "step stub" and final["environment"]["status"] == "ok"
