"""Shared plumbing of the Triton kernels: lazy JIT, launch context, block sizes, output allocation.

Kernels are wrapped with :func:`lazy_jit` instead of ``triton.jit``, so importing :mod:`kernels`
builds nothing: each kernel is built on its first launch, for the compiler or for the CPU interpreter.
Which one works is fixed when *triton* is imported: with ``TRITON_INTERPRET=1`` set at that point,
triton builds its own standard library (tl.max, tl.sum, ...) for the interpreter, otherwise for the
compiler (see :func:`interpreter_enabled`).
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

import torch

try:  # triton is optional: without it only the reference backend is available
    import triton
    import triton.language as tl  # noqa: F401  (re-exported for the kernel modules)
    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    triton = None
    tl = None
    HAS_TRITON = False

_TRUE = ("1", "true", "yes", "on")


def _triton_imported_for_interpreter() -> bool:
    """Whether triton was imported with TRITON_INTERPRET set: triton builds its own ``@jit`` standard
    library (tl.max, tl.sum, ...) for the interpreter or for the compiler at import time, and only
    interpreter-built kernels can run on CPU tensors."""
    if not HAS_TRITON:
        return False
    try:
        from triton.language import standard
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - other triton layouts: trust the environment
        return True
    return isinstance(getattr(standard, "max", None), InterpretedFunction)


#: Fixed when triton is imported (see above); a module constant, so torch.compile traces it freely.
TRITON_INTERPRETER_BUILD = _triton_imported_for_interpreter()


def interpreter_requested() -> bool:
    """``TRITON_INTERPRET`` is set to 1/true/yes/on now."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def interpreter_enabled() -> bool:
    """Whether the Triton kernels run in the CPU interpreter: ``TRITON_INTERPRET=1`` now, and triton
    was imported with it (it is read from ``os.environ`` at each call, so torch.compile can trace it)."""
    return interpreter_requested() and TRITON_INTERPRETER_BUILD


class LazyJIT:
    """``triton.jit`` applied on first launch, separately for compiled and interpreted mode."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._built: dict = {}

    def get(self):
        if not HAS_TRITON:
            raise RuntimeError("triton is not installed; use backend='reference'")
        mode = interpreter_enabled()
        kernel = self._built.get(mode)
        if kernel is None:
            kernel = self._built[mode] = triton.jit(self.fn)
        return kernel

    def __getitem__(self, grid):
        return self.get()[grid]

    def compiler_function(self):
        """The kernel as a compiler ``JITFunction`` whatever ``TRITON_INTERPRET`` says, for
        ahead-of-time compile checks (``triton.compile``) on machines without a GPU."""
        if not HAS_TRITON:
            raise RuntimeError("triton is not installed")
        from triton.runtime.jit import JITFunction
        kernel = self._built.get("compiler")
        if kernel is None:
            kernel = self._built["compiler"] = JITFunction(self.fn)
        return kernel


def lazy_jit(fn: Callable) -> LazyJIT:
    return LazyJIT(fn)


def device_ctx(t: torch.Tensor):
    """Make ``t``'s GPU current for the launch (Triton launches on the current device)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# ----------------------------------------------------------------------------- testing hooks
_STATE = {"poison": False, "block_b": None, "block_c": None, "block_n": None}


def new_empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Allocate a kernel output; under :func:`kernels.testing.poison_outputs` it is pre-filled with
    NaN (floats) or -1 (integers), so an element a kernel forgets to write shows up in the result."""
    if _STATE["poison"]:
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def maybe_poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a freshly allocated output with NaN / -1 under :func:`kernels.testing.poison_outputs`."""
    if _STATE["poison"]:
        t.fill_(float("nan") if t.dtype.is_floating_point else -1)
    return t


def block_c_for(C: int, cap: int = 1024) -> int:
    """Column tile of the logit kernels: the whole row up to ``cap`` (overridable for tests)."""
    forced = _STATE["block_c"]
    if forced is not None:
        return int(forced)
    return min(next_pow2(max(C, 2)), cap)


def block_n_for(N: int, cap: int = 4096) -> int:
    forced = _STATE["block_n"]
    if forced is not None:
        return int(forced)
    return min(next_pow2(max(N, 16)), cap)


@contextlib.contextmanager
def override(**kwargs) -> Iterator[None]:
    old = {k: _STATE[k] for k in kwargs}
    unknown = set(kwargs) - set(_STATE)
    if unknown:
        raise KeyError(f"unknown testing knob(s) {sorted(unknown)}")
    _STATE.update(kwargs)
    try:
        yield
    finally:
        _STATE.update(old)
