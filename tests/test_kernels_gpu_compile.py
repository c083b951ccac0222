"""Compile every Triton kernel for a real GPU target (sm_90) without a GPU: see :mod:`kernels.aot_check`.

The numerical tests run the kernels in Triton's CPU interpreter, which accepts some programs the
compiler rejects; this check catches those. It runs in a subprocess because triton must be imported
without TRITON_INTERPRET for its compiler to work. With FASTROBUST_TEST_DEVICE=cuda it targets the
GPU's own architecture (sm_90 on an H100 / H200).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from test_kernels_device import DEVICE  # sets TRITON_INTERPRET per the switch; lifted for the subprocess

import pytest
import torch

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]


def target_arch() -> int:
    if DEVICE.type == "cuda":
        major, minor = torch.cuda.get_device_capability(DEVICE)
        return 10 * major + minor
    return 90


def test_all_kernels_compile_for_sm90():
    from kernels.aot_check import configurations

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run([sys.executable, "-m", "kernels.aot_check", str(target_arch())], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"compile failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"
    compiled = [line[3:] for line in proc.stdout.splitlines() if line.startswith("ok ")]
    assert compiled == [name for name, *_ in configurations()]
