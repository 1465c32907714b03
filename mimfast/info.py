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
        f"requested {backend.requested_backend()} (MIMFAST_BACKEND)",
    ]
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
    lines.append(f"{'op':<30} {'registered':<22} on {device.type}")
    probe = torch.empty(1, device=device)
    for name, op in sorted(backend.registered_ops().items()):
        chosen = []
        for b in backend.BACKENDS:
            if b not in op.impls:
                continue
            generic = backend.device_reasons([probe.device])
            if b == "triton":
                generic += backend.triton_reasons([probe.device])
            if not generic and (device.type != "cpu" or b == "torch"):
                chosen.append(b)
        lines.append(f"{name:<30} {','.join(op.available()):<22} {chosen[0] if chosen else '-'}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
