"""Test hooks for the Triton kernels (no effect on the reference ops)."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from ._common import override
from . import dispatch


@contextlib.contextmanager
def poison_outputs() -> Iterator[None]:
    """Every kernel output allocated inside the block starts as NaN (floats) / -1 (integers), so an
    element a kernel leaves unwritten shows up in the results."""
    with override(poison=True):
        yield


@contextlib.contextmanager
def block_sizes(block_b: Optional[int] = None, block_c: Optional[int] = None,
                block_n: Optional[int] = None) -> Iterator[None]:
    """Force the tiles of the logit kernels (``block_b`` rows x ``block_c`` columns, powers of two) and
    of the PGD kernel (``block_n`` elements): small tiles exercise the multi-tile (looping) code paths
    and multi-program grids."""
    with override(block_b=block_b, block_c=block_c, block_n=block_n):
        yield


@contextlib.contextmanager
def self_check(enabled: bool = True) -> Iterator[None]:
    """Turn the kernels' first-use self-check on or off inside the block, starting from no verdicts
    (the kernel tests compare against the references themselves; the self-check's own tests inject
    wrong kernels)."""
    saved = dict(dispatch._VERDICTS), dispatch._CHECKING["enabled"]
    dispatch._VERDICTS.clear()
    dispatch._CHECKING["enabled"] = enabled
    try:
        yield
    finally:
        dispatch._VERDICTS.clear()
        dispatch._VERDICTS.update(saved[0])
        dispatch._CHECKING["enabled"] = saved[1]
