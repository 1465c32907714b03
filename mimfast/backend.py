"""Backend registry and dispatcher.

Every op in ``mimfast.ops`` is an :class:`Op` holding one implementation per backend (``torch`` is the
pure-PyTorch reference and the CPU path, ``triton`` the fused kernels, ``cuda`` optional C++ extensions).
Each implementation declares what it supports through a ``reasons(*args, **kwargs) -> list[str]`` function;
the dispatcher picks the first backend with no reason in the order cuda > triton > torch, and an explicit
request that cannot be met raises with every reason instead of silently falling back.

The backend is chosen per call by ``backend=``, else by the ``MIMFAST_BACKEND`` environment variable, else
``auto``. On CPU tensors ``auto`` is torch; ``backend="triton"`` on CPU tensors runs the kernels through
Triton's interpreter when ``TRITON_INTERPRET=1`` (how the test suite exercises them).

This module imports neither triton nor CUDA state.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

BACKENDS: tuple[str, ...] = ("cuda", "triton", "torch")
CHOICES: tuple[str, ...] = BACKENDS + ("auto",)
ENV_VAR = "MIMFAST_BACKEND"

ReasonsFn = Callable[..., list[str]]

_override: list[str] = []


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call; the message lists every reason."""


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TRITON_FOUND: Optional[bool] = None


def triton_available() -> bool:
    # looked up once: a module-level answer is also what torch.compile can trace (find_spec is not)
    global _TRITON_FOUND
    if _TRITON_FOUND is None:
        _TRITON_FOUND = importlib.util.find_spec("triton") is not None
    return _TRITON_FOUND


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


_INTERPRETER_PROBLEM: Optional[list[str]] = None


def interpreter_problem() -> list[str]:
    """Why Triton's interpreter cannot run here (empty when it can): before Triton 3.7 it converts one-element
    arrays to Python ints, which NumPy 2.4 made an error, so every kernel with a loop bound from program_id fails.
    Looked up once."""
    global _INTERPRETER_PROBLEM
    if _INTERPRETER_PROBLEM is None:
        _INTERPRETER_PROBLEM = []
        if triton_available():
            from importlib.metadata import PackageNotFoundError, version

            try:
                triton_v, numpy_v = version("triton"), version("numpy")
            except PackageNotFoundError:
                return _INTERPRETER_PROBLEM
            if _version_tuple(triton_v) < (3, 7) and _version_tuple(numpy_v) >= (2, 4):
                _INTERPRETER_PROBLEM.append(
                    f"Triton {triton_v}'s interpreter fails with NumPy {numpy_v}: install 'numpy<2.4' or Triton >= 3.7 "
                    "to run the kernels on CPU tensors")
    return _INTERPRETER_PROBLEM


def tensors_in(values: Sequence[Any]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out.extend(tensors_in(v))
    return out


def call_devices(args: Sequence[Any], kwargs: dict[str, Any]) -> list[torch.device]:
    """Devices of a call: those of its tensor arguments, plus an explicit ``device=`` keyword."""
    devices = [t.device for t in tensors_in(list(args) + list(kwargs.values()))]
    if kwargs.get("device") is not None:
        devices.append(torch.device(kwargs["device"]))
    return devices


def device_reasons(devices: Sequence[torch.device]) -> list[str]:
    """Reasons common to every op: all tensor arguments on one device type."""
    if len({d.type for d in devices}) > 1:
        return [f"tensors are on different devices: {sorted({str(d) for d in devices})}"]
    return []


def triton_reasons(devices: Sequence[torch.device]) -> list[str]:
    """Reasons the triton backend refuses a call, whatever the op."""
    reasons: list[str] = []
    if not triton_available():
        reasons.append("triton is not installed")
    for d in devices:
        if d.type == "cuda":
            continue
        if d.type == "cpu" and triton_interpret():
            if interpreter_problem():
                reasons += interpreter_problem()
                break
            continue
        reasons.append(f"triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {d}")
        break
    return reasons


def cuda_ext_reasons(devices: Sequence[torch.device], module: str) -> list[str]:
    reasons: list[str] = []
    if importlib.util.find_spec(module) is None:
        reasons.append(f"CUDA extension {module} is not built")
    if any(d.type != "cuda" for d in devices):
        reasons.append("cuda backend needs CUDA tensors")
    return reasons


@dataclass(frozen=True)
class Impl:
    backend: str
    fn: Callable[..., Any]
    reasons: ReasonsFn


def requested_backend(backend: Optional[str] = None) -> str:
    """Resolve the backend a call asks for: argument, then ``use()`` context, then $MIMFAST_BACKEND, then auto."""
    name = backend
    if name is None and _override:
        name = _override[-1]
    source = ""
    if name is None:
        name = os.environ.get(ENV_VAR, "auto").strip() or "auto"
        source = f" (from ${ENV_VAR})"
    if not isinstance(name, str) or name.lower() not in CHOICES:
        raise ValueError(f"unknown backend {name!r}{source}; choose one of {', '.join(CHOICES)}")
    return name.lower()


@contextlib.contextmanager
def use(backend: str) -> Iterator[None]:
    """Context manager making ``backend`` the default for op calls (``backend=`` still wins).

    The setting is process-wide, not per thread: while several ``use()`` blocks are open, from one thread or
    several, calls take the most recently entered one still open."""
    requested_backend(backend)
    _override.append(backend)
    try:
        yield
    finally:
        # this block's own entry, which need not be the last when blocks of several threads interleave
        del _override[len(_override) - 1 - _override[::-1].index(backend)]


class Op:
    """One public op with an implementation per backend."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.impls: dict[str, Impl] = {}

    def register(self, backend: str, reasons: Optional[ReasonsFn] = None) -> Callable[[Callable], Callable]:
        """Decorator registering ``fn`` as this op's implementation for ``backend``.

        ``reasons(*args, **kwargs)`` returns why the implementation cannot run a call (empty when it can);
        the generic device checks for the backend are always added.
        """
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}")

        def deco(fn: Callable) -> Callable:
            self.impls[backend] = Impl(backend, fn, reasons or (lambda *a, **k: []))
            return fn

        return deco

    def available(self) -> list[str]:
        return [b for b in BACKENDS if b in self.impls]

    def reasons(self, backend: str, *args: Any, **kwargs: Any) -> list[str]:
        """Why ``backend`` cannot run this call (empty list: it can)."""
        return self._reasons(backend, call_devices(args, kwargs), args, kwargs)

    def _reasons(self, backend: str, devices: list[torch.device], args: tuple, kwargs: dict[str, Any]) -> list[str]:
        if backend not in self.impls:
            return [f"{self.name} has no {backend} implementation"]
        mixed = device_reasons(devices)
        reasons = mixed + (triton_reasons(devices) if backend == "triton" else [])
        if mixed:  # the op's own checks compare its tensors, which assumes one device
            return reasons
        return reasons + list(self.impls[backend].reasons(*args, **kwargs))

    def select(self, backend: Optional[str], *args: Any, **kwargs: Any) -> Impl:
        name = requested_backend(backend)
        devices = call_devices(args, kwargs)
        if name != "auto":
            reasons = self._reasons(name, devices, args, kwargs)
            if reasons:
                raise BackendUnavailableError(
                    f"mimfast.ops.{self.name}: backend {name!r} cannot run this call:\n  - " + "\n  - ".join(reasons)
                )
            return self.impls[name]
        on_cpu = all(d.type == "cpu" for d in devices)
        collected: list[str] = []
        for b in BACKENDS:
            if on_cpu and b != "torch":
                continue
            reasons = self._reasons(b, devices, args, kwargs)
            if not reasons:
                return self.impls[b]
            collected += [f"{b}: {r}" for r in reasons]
        raise BackendUnavailableError(
            f"mimfast.ops.{self.name}: no backend can run this call:\n  - " + "\n  - ".join(collected)
        )

    def __call__(self, *args: Any, backend: Optional[str] = None, **kwargs: Any) -> Any:
        return self.select(backend, *args, **kwargs).fn(*args, **kwargs)

    def which(self, *args: Any, backend: Optional[str] = None, **kwargs: Any) -> str:
        """Name of the backend a call with these arguments would run on."""
        return self.select(backend, *args, **kwargs).backend


def eager_autograd(name: str, forward: Callable[..., Any], setup: Callable[[Any, tuple, Any], None],
                   backward: Callable[..., Any]) -> type[torch.autograd.Function]:
    """An autograd.Function running an op's launchers directly, for eager calls: the same ``forward``,
    ``setup(ctx, inputs, output)`` and ``backward(ctx, *grads)`` a custom op registers for torch.compile, without
    the custom op's per-call dispatch, which at these sizes costs more host time than the kernels take."""

    def fwd(ctx: Any, *inputs: Any) -> Any:
        output = forward(*inputs)
        setup(ctx, inputs, output)
        return output

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd),
                                                   "backward": staticmethod(first_order_only(backward))})


def first_order_only(backward: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap an autograd.Function's kernel backward so that a backward pass building a graph (create_graph=True,
    for a second derivative) raises: the kernels' gradients are not themselves differentiable, and would
    otherwise come out silently detached (a gradient penalty on them adding nothing)."""

    @functools.wraps(backward)
    def wrapped(ctx: Any, *grads: Any) -> Any:
        if torch.is_grad_enabled():
            raise RuntimeError("the triton backend computes first derivatives only: a backward pass with "
                               "create_graph=True (double backward) needs backend='torch'")
        return backward(ctx, *grads)

    return wrapped


_REGISTRY: dict[str, Op] = {}


def get_op(name: str) -> Op:
    """The op called ``name``, created on first request; ops register themselves at import of their module."""
    if name not in _REGISTRY:
        _REGISTRY[name] = Op(name)
    return _REGISTRY[name]


def registered_ops() -> dict[str, Op]:
    return dict(_REGISTRY)
