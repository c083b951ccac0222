"""The device switch of the kernel tests, and its own tests.

``FASTROBUST_TEST_DEVICE`` picks where the Triton kernels of ``tests/test_kernels*.py`` run:

``cpu`` (default)
    Triton's CPU interpreter on CPU tensors (``TRITON_INTERPRET=1``, set here before triton is
    imported): what CI runs, unchanged.
``cuda``
    The kernels compiled for the GPU and run there (``TRITON_INTERPRET`` removed from the environment
    before triton is imported). Inputs are built on the CPU from the same seeds as on the CPU, moved
    with :func:`to_dev`, and compared against the float64 reference evaluated on the CPU copies, with
    the same tolerances; interpreter-only tests are skipped (:data:`interpreter_only`).
``cpu-audit``
    The ``cpu`` run, with the data flow of the ``cuda`` run checked: :func:`to_dev` tags its output
    as living on a simulated second device, and a test fails when a kernel gets an untagged tensor
    (it would be a CPU tensor beside CUDA ones), a reference op gets a tagged one (the reference must
    run on CPU copies), or one op mixes tagged and untagged tensors (a device mismatch on a GPU):
    ``FASTROBUST_TEST_DEVICE=cpu-audit python -m pytest tests/test_kernels*.py`` before a GPU run
    (``fastrobust check-gpu`` runs these tests with ``cuda`` on the GPU itself).

Every kernel test module imports this module before ``kernels`` / ``triton``, and builds every
kernel input as ``to_dev(<cpu tensor>)``::

    from test_kernels_device import DEVICE, INTERPRETED, interpreter_only, to_dev

Tests that give the kernel ops CPU tensors on purpose (the CPU dispatch rules) use the fixture
:func:`cpu_tensors`.
"""
from __future__ import annotations

import os
from typing import MutableMapping

ENV_VAR = "FASTROBUST_TEST_DEVICE"
DEVICES = ("cpu", "cuda", "cpu-audit")


def parse_device(value: str | None) -> str:
    """The switch's value: unset or empty means ``cpu``; anything else must be one of :data:`DEVICES`."""
    name = (value or "cpu").strip().lower()
    if name not in DEVICES:
        raise ValueError(f"{ENV_VAR}={value!r}: expected one of {', '.join(DEVICES)}")
    return name


def configure_environment(name: str, environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set ``TRITON_INTERPRET`` for device ``name`` (before triton is imported); returns whether the
    kernels run in Triton's interpreter."""
    if name == "cuda":
        environ.pop("TRITON_INTERPRET", None)
        return False
    environ["TRITON_INTERPRET"] = "1"
    return True


NAME = parse_device(os.environ.get(ENV_VAR))
INTERPRETED = configure_environment(NAME)   # before triton / kernels are imported
AUDIT = NAME == "cpu-audit"

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils import _pytree as pytree  # noqa: E402

#: Where kernel inputs live (with its index on CUDA, so ``t.device == DEVICE`` holds). The float64
#: references always run on the CPU.
DEVICE = torch.device("cpu")

if NAME == "cuda":
    if not torch.cuda.is_available():
        raise RuntimeError(f"{ENV_VAR}=cuda, but torch sees no CUDA device (torch {torch.__version__}, "
                           f"CUDA build {torch.version.cuda})")
    DEVICE = torch.device("cuda", torch.cuda.current_device())
    import kernels._common as _common
    if _common.TRITON_INTERPRETER_BUILD:
        raise RuntimeError(f"{ENV_VAR}=cuda, but triton was imported with TRITON_INTERPRET=1 (another module "
                           "imported it first), so the kernels cannot be compiled: run the kernel tests on "
                           "their own with TRITON_INTERPRET unset, e.g. FASTROBUST_TEST_DEVICE=cuda "
                           "python -m pytest tests/test_kernels*.py")

interpreter_only = pytest.mark.skipif(not INTERPRETED, reason="Triton interpreter only; "
                                      f"{ENV_VAR}=cuda runs the compiled kernels")
not_audited = pytest.mark.skipif(AUDIT, reason="torch.compile / opcheck of the audit's tensor subclass is not "
                                 "meaningful; the cuda run covers it")


# ----------------------------------------------------------------------------- cpu-audit
class DeviceMixError(AssertionError):
    pass


class SimDev(torch.Tensor):
    """A CPU tensor tagged as living on the simulated second device of the ``cpu-audit`` run.

    Ops propagate the tag; ``.cpu()`` (and ``.to("cpu")``) return an untagged copy, as a device-to-host
    copy would; an op mixing tagged and untagged tensors of one or more dimensions raises, as on a GPU
    (0-dim CPU tensors mix freely with CUDA ones in PyTorch)."""

    _quiet = 0   # > 0 inside autograd: kernels' backward code mixes plain tensors with the upstream gradient

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.autograd.grad, torch.Tensor.backward):
            SimDev._quiet += 1
            try:
                return super().__torch_function__(func, types, args, kwargs)
            finally:
                SimDev._quiet -= 1
        if func is torch.Tensor.cpu or (func is torch.Tensor.to and _to_cpu(args[1:], kwargs)):
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **kwargs)
            return out.as_subclass(torch.Tensor).clone()
        if not SimDev._quiet:
            leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            tagged = any(isinstance(t, SimDev) for t in leaves)
            plain = [t for t in leaves if not isinstance(t, SimDev) and t.dim() > 0]
            if tagged and plain:
                raise DeviceMixError(f"{getattr(func, '__name__', func)} mixes device tensors with CPU tensors of "
                                     f"shapes {[tuple(t.shape) for t in plain]}: on a GPU this is a device mismatch")
        return super().__torch_function__(func, types, args, kwargs)

    @property
    def grad(self):
        """A tagged leaf's gradient lives on its device (autograd stores it untagged)."""
        g = torch._C.TensorBase.grad.__get__(self)
        return g if g is None or isinstance(g, SimDev) else g.as_subclass(SimDev)

    @grad.setter
    def grad(self, value):
        torch._C.TensorBase.grad.__set__(self, value)


def _to_cpu(args, kwargs) -> bool:
    target = kwargs.get("device", args[0] if args else None)
    if isinstance(target, torch.Tensor):
        return not isinstance(target, SimDev)
    return isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu"


def _untag(x):
    return x.as_subclass(torch.Tensor) if isinstance(x, SimDev) else x


def _tag(x):
    return x.as_subclass(SimDev) if type(x) is torch.Tensor else x


_PAUSED = [False]


@pytest.fixture
def cpu_tensors():
    """For tests that give the kernel ops CPU tensors on purpose (the CPU dispatch rules): the audit
    lets them through. No effect in the cpu and cuda runs."""
    _PAUSED[0] = True
    yield
    _PAUSED[0] = False


def _kernel_entry(fn):
    """A public kernel op for the audit: device tensors in (0-dim CPU scalars allowed), device tensors out."""
    def wrapper(*args, **kwargs):
        if _PAUSED[0]:
            return fn(*args, **kwargs)
        for t in pytree.tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and not isinstance(t, SimDev) and t.dim() > 0:
                raise DeviceMixError(f"kernels.{fn.__name__} got a CPU tensor of shape {tuple(t.shape)}: "
                                     "build kernel inputs with to_dev")
        out = fn(*pytree.tree_map(_untag, args), **pytree.tree_map(_untag, kwargs))
        return pytree.tree_map(_tag, out)
    wrapper.__name__ = fn.__name__
    wrapper.audited = True
    return wrapper


def _reference_entry(fn):
    """A reference op for the audit: CPU tensors only."""
    def wrapper(*args, **kwargs):
        for t in pytree.tree_leaves((args, kwargs)):
            if isinstance(t, SimDev):
                raise DeviceMixError(f"reference.{fn.__name__} got a device tensor of shape {tuple(t.shape)}: "
                                     "evaluate the reference on the CPU copies")
        return fn(*args, **kwargs)
    wrapper.__name__ = fn.__name__
    wrapper.audited = True
    return wrapper


KERNEL_OPS = ("trades_loss", "dtrades_loss", "mart_loss", "loss_head", "pgd_step")

if AUDIT:
    import kernels
    from kernels import reference as _reference
    for _name in KERNEL_OPS:
        if not getattr(getattr(kernels, _name), "audited", False):
            setattr(kernels, _name, _kernel_entry(getattr(kernels, _name)))
        if not getattr(getattr(_reference, _name), "audited", False):
            setattr(_reference, _name, _reference_entry(getattr(_reference, _name)))


def to_dev(t):
    """A kernel input on :data:`DEVICE` (``None`` passes through). On the CPU it is ``t`` itself, so the
    ``cpu`` run is the interpreter run it always was; under ``cpu-audit`` a tagged copy."""
    if t is None:
        return None
    if AUDIT:
        return t.clone().as_subclass(SimDev)
    return t.to(DEVICE)


# ----------------------------------------------------------------------------- the switch's tests
def test_parse_device():
    assert parse_device(None) == parse_device("") == parse_device(" CPU ") == "cpu"
    assert parse_device("cuda") == "cuda" and parse_device("cpu-audit") == "cpu-audit"
    with pytest.raises(ValueError, match="cpu, cuda, cpu-audit"):
        parse_device("gpu")


def test_configure_environment():
    env = {"TRITON_INTERPRET": "1", "OTHER": "x"}
    assert configure_environment("cuda", env) is False and env == {"OTHER": "x"}
    assert configure_environment("cuda", env) is False and env == {"OTHER": "x"}
    for name in ("cpu", "cpu-audit"):
        env = {}
        assert configure_environment(name, env) is True and env == {"TRITON_INTERPRET": "1"}


def test_this_process_matches_the_switch():
    import kernels._common as common

    assert NAME == parse_device(os.environ.get(ENV_VAR))
    assert INTERPRETED == (DEVICE.type == "cpu")
    assert common.interpreter_enabled() == INTERPRETED
    if DEVICE.type == "cuda":
        assert "TRITON_INTERPRET" not in os.environ and not common.TRITON_INTERPRETER_BUILD
    else:
        assert os.environ["TRITON_INTERPRET"] == "1"


def test_to_dev():
    t = torch.arange(6.0).reshape(2, 3)
    d = to_dev(t)
    assert to_dev(None) is None
    assert d.device == DEVICE and torch.equal(d.cpu(), t)
    if NAME == "cpu":
        assert d is t   # the cpu run is exactly the interpreter run it always was


def test_audit_catches_device_mixing():
    t = torch.rand(3, 4)
    d = t.clone().as_subclass(SimDev)
    assert isinstance(d * 2 + 1, SimDev) and isinstance(d.double().sum(), SimDev)
    assert type(d.cpu()) is torch.Tensor and type(d.to("cpu")) is torch.Tensor
    assert isinstance(d + torch.tensor(2.0), SimDev)             # a 0-dim CPU scalar mixes freely
    with pytest.raises(DeviceMixError):
        d + t
    with pytest.raises(DeviceMixError):
        torch.equal(d, t)
    leaf = t.clone().as_subclass(SimDev).requires_grad_(True)
    (leaf * t.as_subclass(SimDev)).sum().backward()
    assert isinstance(leaf.grad, SimDev)
    (g,) = torch.autograd.grad((leaf * 3).sum(), leaf)
    assert isinstance(g, SimDev)
    ref = _reference_entry(lambda x: x)
    ref(t)
    with pytest.raises(DeviceMixError, match="CPU copies"):
        ref(d)
    kern = _kernel_entry(lambda x, s: x * s)
    assert isinstance(kern(d, torch.tensor(2.0)), SimDev)
    with pytest.raises(DeviceMixError, match="to_dev"):
        kern(t, 2.0)
