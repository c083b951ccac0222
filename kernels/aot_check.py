"""Ahead-of-time compile check: build every Triton kernel for a GPU target without a GPU.

The CPU interpreter that runs the numerical tests is more permissive than Triton's compiler, so
this pushes the same kernel sources through the whole pipeline (TTIR -> TTGIR -> LLVM IR -> PTX ->
cubin, with Triton's bundled ptxas) for the main configurations. Nothing is launched.

Run it in a process where ``TRITON_INTERPRET`` is unset: triton builds its own standard-library
functions for the interpreter when that variable is set at import time, and they cannot be
compiled. ``python -m kernels.aot_check [ARCH]`` prints one line per configuration and exits
non-zero on the first failure.
"""
from __future__ import annotations

import sys

from . import fused_loss_head as H
from . import fused_pgd_step as P
from . import lambda_weights as L


def _fwd_sig(dt):
    return {"z_ptr": f"*{dt}", "za_ptr": f"*{dt}", "y_ptr": "*i64", "stats_ptr": "*fp32", "widx_ptr": "*i64",
            "B": "i32", "C": "i32", "stride_z": "i32", "stride_za": "i32", "entropy_eps": "fp32"}


def _bwd_sig(dt):
    return {"z_ptr": f"*{dt}", "za_ptr": f"*{dt}", "y_ptr": "*i64", "stats_ptr": "*fp32", "widx_ptr": "*i64",
            "w_ptr": "*fp32", "c_ptr": "*fp32", "gout_ptr": "*fp32", "gz_ptr": f"*{dt}", "gza_ptr": f"*{dt}",
            "B": "i32", "C": "i32", "stride_z": "i32", "stride_za": "i32", "stride_gz": "i32",
            "stride_gza": "i32", "w_scalar": "fp32", "beta": "fp32", "mart_eps": "fp32"}


_REDUCE_SIG = {"stats_ptr": "*fp32", "s_ptr": "*fp32", "w_ptr": "*fp32", "c_ptr": "*fp32", "lam_ptr": "*fp32",
               "loss_ptr": "*fp32", "B": "i32", "w_scalar": "fp32", "alpha": "fp32", "beta": "fp32",
               "lambda_scale": "fp32", "mart_eps": "fp32"}
_PGD_SIG = {"xa_ptr": "*fp32", "g_ptr": "*fp32", "xn_ptr": "*fp32", "out_ptr": "*fp32", "gn_ptr": "*fp32",
            "N": "i32", "step_size": "fp32", "eps": "fp32", "tiny": "fp32"}


def configurations():
    """(name, kernel, signature, constexprs, num_warps) for the main launch configurations."""
    out = []
    for dt, single, bb, bc, nw in (("fp32", True, 16, 128, 4), ("fp32", False, 2, 1024, 4),
                                   ("bf16", True, 2, 16, 1), ("fp16", False, 8, 128, 2)):
        out.append((f"head_fwd {dt} single_tile={single} {bb}x{bc} warps={nw}", H._head_fwd_kernel,
                    _fwd_sig(dt), {"BLOCK_B": bb, "BLOCK_C": bc, "SINGLE_TILE": single}, nw))
    for dt, mart, w_tensor in (("fp32", False, False), ("fp32", False, True), ("fp32", True, False),
                               ("bf16", True, False), ("fp16", False, True)):
        out.append((f"head_bwd {dt} mart={mart} w_tensor={w_tensor}", H._head_bwd_kernel, _bwd_sig(dt),
                    {"MART": mart, "W_TENSOR": w_tensor, "HAS_C": w_tensor, "BLOCK_B": 16, "BLOCK_C": 128}, 4))
    for mode in (L.MODE_TRADES, L.MODE_DTRADES, L.MODE_MART):
        for norm in ((0, 1, 2) if mode == L.MODE_DTRADES else (2,)):
            out.append((f"weights_reduce mode={mode} norm={norm}", L._weights_reduce_kernel, _REDUCE_SIG,
                        {"MODE": mode, "NORM": norm, "W_TENSOR": mode == L.MODE_TRADES, "HAS_C": True,
                         "BLOCK": 1024}, 4))
    for l2 in (False, True):
        for single in (True, False):
            out.append((f"pgd_step l2={l2} single_tile={single}", P._pgd_step_kernel, _PGD_SIG,
                        {"L2": l2, "BLOCK": 4096, "SINGLE_TILE": single}, 8))
    return out


def compile_all(arch: int = 90, verbose: bool = True) -> list[str]:
    """Compile every configuration for ``sm_<arch>``; returns their names, raises on a failure."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    done = []
    for name, kernel, signature, constexprs, num_warps in configurations():
        sig = dict(signature)
        sig.update({k: "constexpr" for k in constexprs})
        compiled = triton.compile(ASTSource(kernel.compiler_function(), sig, constexprs), target=target,
                                  options={"num_warps": num_warps})
        if not (compiled.asm.get("ptx") and compiled.asm.get("cubin")):
            raise RuntimeError(f"{name}: no PTX / cubin produced")
        if verbose:
            print(f"ok {name}", flush=True)
        done.append(name)
    return done


if __name__ == "__main__":
    compile_all(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
