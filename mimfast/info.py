"""`python -m mimfast.info`: versions, devices, and the backend each op would use."""

from __future__ import annotations

import importlib
import platform
import sys

import torch

import mimfast
from mimfast import backend


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except ImportError:
        return "not installed"


def report() -> str:
    lines = [
        f"mimfast   {mimfast.__version__}",
        f"python    {sys.version.split()[0]} ({platform.platform()})",
        f"torch     {torch.__version__}",
        f"triton    {_version('triton')}",
        f"xformers  {_version('xformers')}",
        f"interpret TRITON_INTERPRET={'1' if backend.triton_interpret() else '0'}",
    ]
    try:
        requested = backend.requested_backend()
        lines.append(f"requested {requested} (MIMFAST_BACKEND)")
    except ValueError as e:
        requested = "auto"
        lines.append(f"requested {e}; showing auto")
    if backend.triton_interpret():
        lines += [f"          {problem}" for problem in backend.interpreter_problem()]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}    {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
        device = torch.device("cuda")
    else:
        lines.append("cuda      not available")
        device = torch.device("cpu")
    lines.append("")
    # what a call on this device would run: the requested backend if it can (the op's own checks on its actual
    # arguments, e.g. dtypes, can still refuse), else auto's first choice
    lines.append(f"{'op':<30} {'registered':<22} on {device.type} ({requested})")
    for name, op in sorted(backend.registered_ops().items()):
        column, why = "-", ""
        for b in backend.BACKENDS if requested == "auto" else (requested,):
            if b not in op.impls:
                why = why or f"no {b} implementation"
                continue
            generic = backend.triton_reasons([device]) if b == "triton" else []
            if requested == "auto" and device.type == "cpu" and b != "torch":
                continue  # auto runs CPU tensors on torch
            if generic:
                why = why or generic[0]
                continue
            column = b
            break
        lines.append(f"{name:<30} {','.join(op.available()):<22} {column if column != '-' else f'- ({why})'}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
