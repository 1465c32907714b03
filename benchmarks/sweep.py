"""Time mimfast's provider of a benchmark under several kernel settings, to choose the defaults.

    python -m benchmarks.sweep bench_loss --cases mae_vit_b16,videomae \\
        --set mimfast.kernels.pixel_loss.LOSS_TILE=2048,4096,8192 --set mimfast.kernels.pixel_loss.LOSS_WARPS=4,8

A setting is a module attribute the launcher reads at each call; every combination of the values given is timed
on every kept case of the benchmark (its ``all_cases``), the attribute restored afterwards. Each row gives the
device time of one call replayed from a CUDA graph (``graph_ms``, see harness.graph_time) and the summed kernel
time from the profiler (``kernel_ms``); on CPU, a smoke run, the wall-clock median. Results are printed, not saved:
the chosen values become the defaults in the code, and the benchmarks record their times.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import itertools
import json
import os
from typing import Any

import torch

from benchmarks.harness import default_device, device_time, graph_time, time_fn


def parse_setting(text: str) -> tuple[Any, str, list[Any]]:
    """'package.module.ATTR=v1,v2' -> (module, 'ATTR', [v1, v2]); values are Python literals."""
    target, _, values = text.partition("=")
    module_name, _, attr = target.rpartition(".")
    if not module_name or not values:
        raise SystemExit(f"--set wants module.ATTR=v1,v2,..., not {text!r}")
    module = importlib.import_module(module_name)
    if not hasattr(module, attr):
        raise SystemExit(f"{module_name} has no attribute {attr}")
    return module, attr, [ast.literal_eval(v) for v in values.split(",")]


def case_matches(name: str, wanted: str) -> bool:
    """Whether case ``name`` contains ``wanted``; a ``wanted`` ending in ``$`` must end the name ("/fwd$" keeps
    the forward rows, not "/fwd+bwd")."""
    return name.endswith(wanted[:-1]) if wanted.endswith("$") else wanted in name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bench", help="benchmark module with an all_cases(quick, device, dtype) function, e.g. bench_loss")
    ap.add_argument("--set", action="append", default=[], dest="settings", metavar="MODULE.ATTR=V1,V2")
    ap.add_argument("--cases", default=None,
                    help="comma-separated substrings of the case names to keep (ending in $: the name's end)")
    ap.add_argument("--provider", default="mimfast")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke run on CPU")
    ap.add_argument("--out", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args()
    bench = importlib.import_module(f"benchmarks.{args.bench}")
    device = default_device()
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    settings = [parse_setting(s) for s in args.settings]
    wanted = args.cases.split(",") if args.cases else None
    cases = [(case, fns[args.provider]) for case, fns in bench.all_cases(args.quick, device, dtype)
             if args.provider in fns and (wanted is None or any(case_matches(case.name, w) for w in wanted))]
    if not cases:
        raise SystemExit("no case kept")
    defaults = [getattr(module, attr) for module, attr, _ in settings]
    rows = []
    try:
        for values in itertools.product(*(vals for _, _, vals in settings)):
            for (module, attr, _), v in zip(settings, values):
                setattr(module, attr, v)
            label = " ".join(f"{attr}={v}" for (_, attr, _), v in zip(settings, values)) or "defaults"
            for case, fn in cases:
                row: dict[str, Any] = {"settings": label, "case": case.name}
                restart = getattr(fn, "restart", None)  # state kept from a call under another setting
                if restart is not None:
                    restart()
                try:
                    eager = time_fn(fn, device)[0]
                    if device.type == "cuda":
                        row["kernel_ms"] = device_time(fn)["device_ms"]
                        row["graph_ms"] = graph_time(fn, eager)[0]
                    else:
                        row["ms"] = eager
                except Exception as e:  # a setting a kernel cannot take is reported, not fatal
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                rows.append(row)
                figures = "  ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float))
                print(f"{label:<40} {case.name:<40} {figures or row.get('error')}", flush=True)
    finally:
        for (module, attr, _), v in zip(settings, defaults):
            setattr(module, attr, v)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
