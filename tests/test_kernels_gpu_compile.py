"""Compile every Triton kernel for a real GPU target (sm_90) without a GPU: see :mod:`kernels.aot_check`.

The numerical tests run the kernels in Triton's CPU interpreter, which accepts some programs the
compiler rejects; this check catches those. It runs in a subprocess because triton must be imported
without TRITON_INTERPRET for its compiler to work.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # the convention of the kernel test modules; lifted for the subprocess

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]


def test_all_kernels_compile_for_sm90():
    from kernels.aot_check import configurations

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run([sys.executable, "-m", "kernels.aot_check", "90"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"compile failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"
    compiled = [line[3:] for line in proc.stdout.splitlines() if line.startswith("ok ")]
    assert compiled == [name for name, *_ in configurations()]
