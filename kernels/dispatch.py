"""Backend selection, the public entry points of :mod:`kernels`, and the kernels' self-check.

Backends (:data:`BACKENDS`): ``"reference"`` (plain PyTorch, :mod:`kernels.reference`), ``"triton"``
(the fused kernels through the custom ops of :mod:`kernels.ops`) and ``"auto"`` (Triton for CUDA
tensors, the reference for everything else). ``backend=None`` means the process default:
:func:`set_backend`, else the environment variable ``FASTROBUST_KERNELS``, else ``"auto"``. Triton on
CPU tensors runs only in Triton's interpreter (``TRITON_INTERPRET=1``).

Self-check. Nothing guarantees that Triton's compiler gives on a real GPU what its CPU interpreter
gives in the tests, so the first time a kernel runs for a (device, dtype, shape class) it is checked
against the float64 reference on a small probe batch, forward and gradients, at the test suite's
tolerances. Under ``"auto"`` a kernel that fails (wrong numbers, or an error while compiling) is
replaced by the reference ops for the rest of the process, with one warning; under an explicit
``"triton"`` the failure raises :class:`KernelCheckError`. :func:`self_check_report` lists every
verdict, for run manifests. The check runs eagerly, outside any ``torch.compile`` trace.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import reference
from ._common import HAS_TRITON, interpreter_enabled, interpreter_requested
from .reference import LossHead, LossOutput

BACKENDS = ("auto", "triton", "reference")
ENV_VAR = "FASTROBUST_KERNELS"
_default: Optional[str] = None

try:
    from . import ops as _ops
except ImportError:  # pragma: no cover - triton missing: reference only
    _ops = None


class KernelCheckError(RuntimeError):
    """An explicitly requested Triton kernel disagrees with its reference (or failed to build)."""


@dataclass(frozen=True)
class Kernel:
    """A fused kernel beside its definition: ``fused(*args)`` must equal ``reference(*args)`` within the tests'
    tolerances. ``shape_class(*args)`` names what selects the compiled variant (the self-check runs once per
    class); ``probe(*args)`` compares fused and reference on a probe call like ``args`` and returns the worst
    error / tolerance (above 1: failed); ``examples(device, dtype, num_classes, sample_shape, batch_size)``
    gives the calls a training run will make, for :func:`self_check`."""
    reference: Callable
    fused: Optional[Callable]
    shape_class: Callable[..., tuple]
    probe: Callable[..., float]
    examples: Callable[..., list[tuple]]


#: The one list of fused kernels: name -> :class:`Kernel`. :func:`run` dispatches any of them.
KERNELS: dict[str, Kernel] = {}


def register_kernel(name: str, kernel: Kernel) -> Kernel:
    KERNELS[name] = kernel
    return kernel


def _validate(name) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; valid backends: {', '.join(BACKENDS)}")
    return name


def set_backend(name: Optional[str]) -> None:
    """Set the process-wide default backend (``None`` restores the environment / "auto" default)."""
    global _default
    _default = None if name is None else _validate(name)


def get_backend() -> str:
    """The process default: :func:`set_backend`'s value, else ``$FASTROBUST_KERNELS``, else ``"auto"``."""
    if _default is not None:
        return _default
    env = os.environ.get(ENV_VAR, "").strip()
    if not env:
        return "auto"
    try:
        return _validate(env)
    except ValueError as e:
        raise ValueError(f"{ENV_VAR}={env!r}: {e}") from None


def triton_usable(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of ``device`` in this process."""
    if not HAS_TRITON or _ops is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreter_enabled()


def _resolve(device_type: str, name: Optional[str]) -> str:
    name = get_backend() if name is None else _validate(name)
    if name == "reference":
        return "reference"
    device = torch.device(device_type)
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_usable(device) else "reference"
    if triton_usable(device):
        return "triton"
    if not HAS_TRITON or _ops is None:
        raise ValueError("backend 'triton' needs the triton package, which is not importable; "
                         "use backend='reference'")
    if device.type == "cpu":
        when = ("triton was imported before TRITON_INTERPRET=1 was set: set it before importing triton / kernels"
                if interpreter_requested() else
                "set the environment variable TRITON_INTERPRET=1 (before importing triton / kernels)")
        raise ValueError(f"backend 'triton' on CPU tensors needs Triton's interpreter: {when}, or use "
                         f"backend='reference'")
    raise ValueError(f"backend 'triton' does not support {device.type} tensors; use backend='reference'")


def resolve_backend(tensor: torch.Tensor, backend: Optional[str] = None) -> str:
    """The backend that will run for ``tensor``: ``"triton"`` or ``"reference"``.

    Raises ValueError for an unknown name, and for ``"triton"`` where it cannot run (CPU tensors
    without ``TRITON_INTERPRET=1``, no triton installed)."""
    return _resolve(tensor.device.type, backend)


# ----------------------------------------------------------------------------- self-check
_VERDICTS: dict[tuple, dict] = {}
_CHECKING = {"enabled": True}
RTOL, ATOL = 1e-5, 1e-6            # the kernel tests' fp32 tolerances (tests/test_kernels.py)
LOW_PRECISION_UNIT = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}   # one stored ulp, relative


def self_check_report() -> list[dict]:
    """Every self-check verdict of this process (op, device, dtype, shape class, passed, figures)."""
    return [dict(v) for v in _VERDICTS.values()]


def _excess(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> float:
    """max |a - e| / (atol + rtol |e|): above 1 means out of tolerance (inf for non-finite values)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.shape != e.shape or not torch.isfinite(a).all():
        return float("inf")
    return float(((a - e).abs() / (atol + rtol * e.abs()).clamp_min(1e-300)).max())


def _row_excess(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> float:
    """max over rows of ||a_i - e_i|| / (atol + rtol ||e_i||): the kernel tests' gradient criterion."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.shape != e.shape or not torch.isfinite(a).all():
        return float("inf")
    return float(((a - e).norm(dim=1) / (atol + rtol * e.norm(dim=1)).clamp_min(1e-300)).max())


def _probe_losses(op: str, dtype: torch.dtype, C: int, device: torch.device, fused: Callable, B: int = 16) -> float:
    """Worst error / tolerance of one fused loss op against the float64 reference: loss, per-sample
    statistics (wrong_idx exactly) and the gradients w.r.t. both logit tensors, on a B-row probe batch
    with C classes (the caller's B: the compiled variant depends on it, see :func:`_launch_class`). It runs
    twice, without and with per-sample weights (a (B,) KL weight for TRADES,
    sample weights for all three: FAAL, D-TRADES' global lambda), as the weighted launches are
    separately compiled kernel variants."""
    g = torch.Generator().manual_seed(C)
    z = (torch.randn(B, C, generator=g) * (0.2 + 4 * torch.rand(B, 1, generator=g))).to(dtype)
    za = (z.float() + 0.7 * torch.randn(B, C, generator=g)).to(dtype)
    y = torch.randint(0, C, (B,), generator=g)
    s = 2 * torch.rand(B, generator=g)
    w = 0.5 + 6 * torch.rand(B, generator=g)
    c = 0.2 + torch.rand(B, generator=g)
    runs = {"trades_loss": ((6.0, None), (w, c)), "mart_loss": ((5.0, None), (5.0, c)),
            "dtrades_loss": ((s, 1.0, 0.5, "minmax", 2.0, 1e-12, None), (s, 1.0, 0.5, "minmax", 2.0, 1e-12, c))}[op]
    unit = LOW_PRECISION_UNIT.get(dtype, 0.0)
    worst = 0.0
    for args in runs:
        outs = []
        for run, dev, cast in ((fused, device, lambda t: t), (getattr(reference, op), "cpu", torch.Tensor.double)):
            zz, zza = (cast(t).to(dev).requires_grad_(True) for t in (z, za))
            out = run(zz, zza, y.to(dev), *[a.to(dev) if torch.is_tensor(a) else a for a in args])
            outs.append((out, torch.autograd.grad(out.loss, (zz, zza))))
        (got, g_got), (want, g_want) = outs
        if not torch.equal(got.head.wrong_idx.cpu(), want.head.wrong_idx):
            return float("inf")
        # the absolute floors: a sample adds c (1 + w) unit terms (c the sample weight, at most 1.2; w the KL
        # weight, at most 6.5; MART: 2 + beta = 7) to the loss, each with the statistics' ATOL; a gradient row
        # is a sum of such terms / B, which can cancel, leaving fp32 rounding of ~1e-7 of their size; the
        # stored dtype's rounding comes on top (as in tests/test_kernels.py)
        terms = 7.5 * (1.0 if args[-1] is None else 1.2)
        worst = max(worst, _excess(got.loss, want.loss, RTOL + unit, ATOL * terms))
        for name in ("ce_nat", "ce_adv", "kl", "entropy", "p_y", "q_y", "q_wrong"):
            worst = max(worst, _excess(getattr(got.head, name), getattr(want.head, name), RTOL, ATOL))
        if want.lam is not None:
            worst = max(worst, _excess(got.lam, want.lam, RTOL, ATOL))
        for a, e in zip(g_got, g_want):
            worst = max(worst, _row_excess(a, e, RTOL + unit, ATOL * terms / B))
    return worst


def _probe_pgd(dtype: torch.dtype, sample_shape: tuple, norm: str, device: torch.device) -> float:
    g = torch.Generator().manual_seed(len(sample_shape))
    x = torch.rand((4,) + sample_shape, generator=g).to(dtype)
    xa = (x.float() + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1).to(dtype)
    grad = torch.randn(x.shape, generator=g).to(dtype)
    got, g_norm = _ops.pgd_step(xa.to(device), grad.to(device), x.to(device), 0.01, 0.03, norm)
    want, w_norm = reference.pgd_step(xa.double(), grad.double(), x.double(), 0.01, 0.03, norm)
    unit = LOW_PRECISION_UNIT.get(dtype, 2.0 ** -23)
    return max(_excess(got, want, unit, 1e-6), _excess(g_norm, w_norm, RTOL + unit, ATOL))


def _checked(op: str, t: torch.Tensor, shape_class: tuple, explicit: bool, probe: Callable[[], float],
             stacklevel: int = 4) -> bool:
    """Whether the Triton ``op`` may run for ``t``: its self-check verdict for this device, dtype and shape
    class (run once per process). Failing under "auto": warn once and use the reference. ``stacklevel``
    makes the warning point at the caller of the public op (the default: public op -> helper -> here)."""
    key = (op, str(t.device), str(t.dtype), shape_class)
    verdict = _VERDICTS.get(key)
    if verdict is None:
        if not _CHECKING["enabled"] or torch.compiler.is_compiling():
            return True
        try:
            with torch.no_grad() if op == "pgd_step" else torch.enable_grad():
                excess = probe()
            passed, error = excess <= 1, None
            detail = f"worst error / test tolerance {excess:.3g}"
        except Exception as e:  # noqa: BLE001 - a compile or launch failure is a failed check
            passed, error = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            detail = f"error {error}"
        verdict = _VERDICTS[key] = {"op": op, "device": str(t.device), "dtype": str(t.dtype).replace("torch.", ""),
                                    "shape_class": list(shape_class), "passed": passed, "detail": detail}
        if not passed and not explicit:
            warnings.warn(f"kernels: the Triton {op} kernel failed its self-check against the float64 reference on "
                          f"{verdict['device']} {verdict['dtype']} {shape_class} ({detail}); using the PyTorch "
                          f"reference ops for it in this process.", RuntimeWarning, stacklevel=stacklevel)
    if not verdict["passed"] and explicit:
        raise KernelCheckError(f"the Triton {op} kernel failed its self-check against the float64 reference on "
                               f"{verdict['device']} {verdict['dtype']} {shape_class} ({verdict['detail']}); "
                               f"use --kernels reference (or auto, which falls back by itself).")
    return verdict["passed"]


def self_check(device: str | torch.device, dtype: torch.dtype, num_classes: int, sample_shape: tuple,
               backend: Optional[str] = None, batch_size: int = 16) -> list[dict]:
    """Run now the self-checks a training run on ``device`` will need (every registered kernel on the calls
    its ``examples`` give for ``batch_size`` x ``num_classes`` logits in ``dtype`` and ``sample_shape``
    images), so that their verdicts are known before the run's manifest is written. Returns
    :func:`self_check_report`."""
    for name, kernel in KERNELS.items():
        for args in kernel.examples(torch.device(device), dtype, num_classes, tuple(sample_shape), batch_size):
            _uses_fused(name, args, backend, stacklevel=4)
    return self_check_report()


def _launch_class(B: int, C: int) -> tuple:
    """What selects a loss kernel's compiled variant: C and the tiles its launch picks for (B, C) (the head
    kernels' row and column blocks, the reduction's block). Batches with the same tiles share a verdict."""
    from .fused_loss_head import _blocks
    from .lambda_weights import reduce_block
    return (C,) + _blocks(B, C) + (reduce_block(B),)


def _uses_fused(name: str, args: tuple, backend: Optional[str], stacklevel: int = 5) -> bool:
    """Whether kernel ``name`` runs fused for these arguments: Triton is the backend for their device, the
    kernel exists, and it passed its self-check for their shape class (run now, the first time)."""
    kernel, t = KERNELS[name], args[0]
    if kernel.fused is None or resolve_backend(t, backend) != "triton":
        return False
    explicit = (get_backend() if backend is None else backend) == "triton"
    return _checked(name, t, kernel.shape_class(*args), explicit, lambda: kernel.probe(*args), stacklevel)


def run(name: str, *args, backend: Optional[str] = None):
    """Kernel ``name`` of :data:`KERNELS` on ``args``: fused where it can run and passed its self-check,
    else its reference."""
    kernel = KERNELS[name]
    return (kernel.fused if _uses_fused(name, args, backend) else kernel.reference)(*args)


# ----------------------------------------------------------------------------- public ops
def trades_loss(z: torch.Tensor, z_adv: torch.Tensor, y: torch.Tensor, kl_weight,
                sample_weight: Optional[torch.Tensor] = None, *, backend: Optional[str] = None) -> LossOutput:
    """TRADES-family loss ``(1/B) sum_i c_i (ce_nat_i + w_i kl_i)`` and its per-sample statistics.

    ``kl_weight`` w: python float or (B,) tensor (constant); ``sample_weight`` c: optional (B,) tensor
    (constant). TRADES: w = beta; D-TRADES with a fixed lambda: w = lambda; FAAL: c. The loss is float32
    (float64 for float64 logits on the reference backend), differentiable w.r.t. ``z`` and ``z_adv``."""
    return run("trades_loss", z, z_adv, y, kl_weight, sample_weight, backend=backend)


def dtrades_loss(z: torch.Tensor, z_adv: torch.Tensor, y: torch.Tensor, sensitivity: torch.Tensor,
                 alpha: float, beta: float, normalize: str = "minmax", lambda_scale: float = 1.0,
                 entropy_eps: float = 1e-12, sample_weight: Optional[torch.Tensor] = None, *,
                 reduce: Optional[Callable] = None, backend: Optional[str] = None) -> LossOutput:
    """D-TRADES: the TRADES loss with the per-sample KL weight ``lam = lambda_scale (alpha norm(H) +
    beta norm(s))`` (detached; :func:`kernels.reference.dtrades_weight`); ``normalize`` in
    {"minmax", "mean", "none"}. ``reduce(t, op)``, an all-reduce, normalises H and s over the global batch
    instead of this process's: lam is then formed from the head's entropy and the fused TRADES loss
    takes it as its KL weight (the in-kernel normalisation sees only the local batch), so that path runs,
    and is self-checked as, the TRADES kernels."""
    if reduce is None:
        return run("dtrades_loss", z, z_adv, y, sensitivity, alpha, beta, normalize, lambda_scale, entropy_eps,
                   sample_weight, backend=backend)
    if not _uses_fused("trades_loss", (z, z_adv, y, 1.0, sample_weight), backend, stacklevel=4):
        return reference.dtrades_loss(z, z_adv, y, sensitivity, alpha, beta, normalize, lambda_scale,
                                      entropy_eps, sample_weight, reduce)
    head = _ops.loss_head(z, z_adv, y, entropy_eps)
    lam = reference.dtrades_weight(head.entropy, sensitivity, alpha, beta, normalize, lambda_scale, reduce)
    return LossOutput(_ops.trades_loss(z, z_adv, y, lam, sample_weight).loss, head, lam)


def mart_loss(z: torch.Tensor, z_adv: torch.Tensor, y: torch.Tensor, beta: float,
              sample_weight: Optional[torch.Tensor] = None, *, backend: Optional[str] = None) -> LossOutput:
    """MART loss ``(1/B) sum_i c_i (ce_adv_i - log(1.0001 - q_wrong_i) + beta kl_i (1 - p_y_i))`` and its
    per-sample statistics; differentiable w.r.t. ``z`` and ``z_adv``."""
    return run("mart_loss", z, z_adv, y, beta, sample_weight, backend=backend)


def loss_head(z: torch.Tensor, z_adv: torch.Tensor, y: torch.Tensor, entropy_eps: float = 1e-12, *,
              backend: Optional[str] = None) -> LossHead:
    """Per-sample statistics (no autograd) -> :class:`kernels.LossHead` of (B,) tensors: ce_nat, ce_adv,
    kl, entropy, p_y, q_y, q_wrong (float32) and wrong_idx (int64)."""
    if _uses_fused("trades_loss", (z, z_adv, y, 1.0), backend, stacklevel=4):   # the losses' forward kernel
        return _ops.loss_head(z, z_adv, y, entropy_eps)
    return reference.loss_head(z, z_adv, y, entropy_eps)


def pgd_step(x_adv: torch.Tensor, grad: torch.Tensor, x_nat: torch.Tensor, step_size: float, eps: float,
             norm: str = "linf", *, backend: Optional[str] = None):
    """One PGD step -> ``(x_new, grad_norm)``: x_new like ``x_adv`` (dtype, memory format), grad_norm (B,)
    float32 ``||grad_i||_2``. ``norm`` in {"linf", "l2"}; no autograd."""
    if norm not in reference.PGD_NORMS:
        return reference.pgd_step(x_adv, grad, x_nat, step_size, eps, norm)   # its error names the valid norms
    return run("pgd_step", x_adv, grad, x_nat, step_size, eps, norm, backend=backend)


# ----------------------------------------------------------------------------- the registered kernels
def _loss_examples(device, dtype, num_classes, sample_shape, batch_size) -> list[tuple]:
    z = torch.empty((batch_size, num_classes), dtype=dtype, device=device)
    return [(z,)]


def _pgd_examples(device, dtype, num_classes, sample_shape, batch_size) -> list[tuple]:
    x = torch.empty((1,) + sample_shape, device=device)
    return [(x, x, x, 0.0, 0.0, norm) for norm in reference.PGD_NORMS]


def _fused(op: str) -> Optional[Callable]:
    """The custom op's wrapper in kernels.ops, looked up at each call (tests substitute wrong kernels there)."""
    return None if _ops is None else (lambda *args: getattr(_ops, op)(*args))


def _register_builtin() -> None:
    for op in ("trades_loss", "dtrades_loss", "mart_loss"):
        register_kernel(op, Kernel(
            reference=getattr(reference, op), fused=_fused(op), shape_class=lambda z, *rest: _launch_class(*z.shape),
            probe=lambda z, *rest, op=op: _probe_losses(op, z.dtype, z.shape[1], z.device, getattr(_ops, op),
                                                        z.shape[0]),
            examples=_loss_examples))
    register_kernel("pgd_step", Kernel(
        reference=reference.pgd_step, fused=_fused("pgd_step"),
        shape_class=lambda x, *rest: (rest[-1], tuple(x.shape[1:])),
        probe=lambda x, *rest: _probe_pgd(x.dtype, tuple(x.shape[1:]), rest[-1], x.device), examples=_pgd_examples))


_register_builtin()
