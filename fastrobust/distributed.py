"""Process groups for multi-GPU / multi-node runs launched by ``torchrun``, and the few collectives
fastrobust needs.

``torchrun`` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` for
each process it starts. :func:`init_from_env` joins that process group once per process: NCCL when
training on CUDA (process ``LOCAL_RANK`` on ``cuda:LOCAL_RANK``), gloo on the CPU. Without those
variables nothing is initialised and every helper here answers as a single process would (rank 0
of 1, collectives return their input), so callers never branch on "am I distributed".

The helpers only ever move small tensors (flags, per-class sums, evaluation flags) and pickled
objects (RNG states, a checkpoint path, an error); gradients are all-reduced by DDP itself.
"""
from __future__ import annotations

import builtins
import hashlib
import os
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from .errors import ConfigError, FastRobustError

T = TypeVar("T")

TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


def launched_by_torchrun() -> bool:
    """True when this process was started by torchrun (or any launcher setting its variables)."""
    return all(v in os.environ for v in TORCHRUN_ENV)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def backend() -> str | None:
    """The process group's backend ("nccl", "gloo"), or None without one."""
    return str(dist.get_backend()) if is_initialized() else None


def is_main() -> bool:
    """Rank 0: the process that writes files and prints (also before the group is joined, from
    torchrun's RANK)."""
    if is_initialized():
        return dist.get_rank() == 0
    return not launched_by_torchrun() or os.environ["RANK"] == "0"


def resolve_device(device: str = "auto") -> torch.device:
    """The one device resolver. Outside torchrun: "auto" is CUDA when available, else the CPU; a CUDA device
    without CUDA is an error. Under torchrun: :func:`init_from_env`."""
    if launched_by_torchrun():
        return init_from_env(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return dev


def init_from_env(device: str = "auto") -> torch.device:
    """Join torchrun's process group (idempotent) and return the device this process computes on.

    ``device``: "auto" (CUDA if available, else the CPU), "cuda" (``cuda:LOCAL_RANK``) or "cpu".
    An explicit "cuda:N" is refused with several processes: each process owns ``cuda:LOCAL_RANK``.
    Backend: NCCL for CUDA, gloo for the CPU."""
    if not launched_by_torchrun():
        raise ConfigError("init_from_env needs the variables torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE); "
                          "launch with `torchrun --nproc_per_node N ...`.")
    try:
        local, world = int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    except ValueError as e:
        raise ConfigError(f"malformed torchrun environment (LOCAL_RANK={os.environ.get('LOCAL_RANK')!r}, "
                          f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}).") from e
    name = device.strip().lower()
    use_cuda = name.startswith("cuda") or (name == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available; use --device cpu "
                              f"(gloo) or run on GPU nodes.")
        if name in ("auto", "cuda"):
            dev = torch.device("cuda", local)
        else:
            dev = torch.device(name)
            if world > 1 and dev.index != local:
                raise ConfigError(f"--device {device} under torchrun with {world} processes: each process uses "
                                  f"cuda:LOCAL_RANK (here cuda:{local}). Pass --device cuda or auto.")
        if dev.index >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local} has no GPU: only {torch.cuda.device_count()} visible. Start at "
                              f"most that many processes per node (--nproc_per_node).")
        torch.cuda.set_device(dev)
        backend = "nccl"
    elif name in ("auto", "cpu"):
        dev, backend = torch.device("cpu"), "gloo"
    else:
        raise ConfigError(f"device {device!r} is not supported under torchrun; use auto, cuda or cpu.")
    if not is_initialized():
        dist.init_process_group(backend=backend, device_id=dev if backend == "nccl" else None)
    elif dist.get_backend() != backend:
        raise ConfigError(f"the process group already uses {dist.get_backend()}, but device {dev} needs {backend}.")
    return dev


def shutdown() -> None:
    """Leave the process group (end of a torchrun job); a no-op when none was joined."""
    if is_initialized():
        dist.destroy_process_group()


# -- collectives ---------------------------------------------------------------------------------

def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """A reduced copy of ``t`` (``op``: sum, max or min over ranks), on ``t``'s device; ``t`` itself is
    not modified. Single process: ``t``."""
    if world_size() == 1:
        return t
    buf = t.detach().to(_comm_device(), copy=True)
    dist.all_reduce(buf, op=getattr(dist.ReduceOp, _OPS[op]))
    return buf.to(t.device)


def any_flag(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (e.g. a non-finite loss, a stop signal)."""
    if world_size() == 1:
        return bool(flag)
    return bool(all_reduce(torch.tensor([int(bool(flag))], dtype=torch.int32), "max").item())


def barrier() -> None:
    if world_size() == 1:
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` from rank ``src`` on every rank (pickled; keep it small)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """One entry per rank, in rank order."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (batch-norm running statistics) into every rank's module."""
    if world_size() == 1:
        return
    dev = _comm_device()
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for b in module.buffers():
        by_dtype.setdefault(b.dtype, []).append(b)
    for group in by_dtype.values():  # one collective per dtype, not one per buffer
        flat = torch.cat([b.detach().reshape(-1).to(dev) for b in group])
        dist.broadcast(flat, src=src)
        offset = 0
        for b in group:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()


def on_main(fn: Callable[..., T], *args, **kwargs) -> T:
    """Run ``fn`` on rank 0 only and hand its result to every rank. If it fails there, every rank
    raises (rank 0 its own exception, the others the same fastrobust error type and message), so no
    rank waits forever for a file that will not come. Acts as a barrier."""
    if world_size() == 1:
        return fn(*args, **kwargs)
    result, failure, error = None, None, None
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            error = e
            failure = (type(e) if isinstance(e, FastRobustError) else None, f"{type(e).__name__}: {e}")
    result, failure = broadcast_object((result, failure))
    if error is not None:
        raise error
    if failure is not None:
        cls, message = failure
        if cls is not None:
            raise cls(message.split(": ", 1)[1])
        raise RuntimeError(f"rank 0 failed: {message}")
    return result


def print0(*args, **kwargs) -> None:
    """print on rank 0 only."""
    if is_main():
        builtins.print(*args, **kwargs)


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a key such as (seed, step) or (seed, "eval", batch index): random numbers
    drawn from it depend on the key only, not on how work is split across ranks."""
    h = hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)
