"""Shared benchmark harness: time providers on cases, count bytes and flops, write JSON + markdown.

A ``bench_<op>.py`` script builds a list of :class:`Case` (shape name, bytes that must move, flops) and, per
case, a dict of providers (``mimfast``, ``reference``, ``reference+compile``, ...) mapping to a zero-argument
callable that runs the measured work once. :func:`run` times every provider on every case and
:func:`write_results` appends the rows to ``benchmarks/results/<name>.json`` and ``.md`` with the GPU name,
versions, commit and date.

On CUDA the timer is ``triton.testing.do_bench`` (median and p20/p80 over repeated runs with the L2 cache
flushed); on CPU, for smoke runs of the scripts only, a wall-clock loop. The flush before each call is a 256 MiB
fill the device runs for about 90 us, while the host already enqueues the call: so the median holds a call's host
work (Python, dispatch, launches) only where it exceeds about 90 us, and then it measures the host rather than
the kernels. Two optional views separate the two (CUDA only), each in its own columns:

- ``--graph``: the call captured in a CUDA graph and replayed, L2 flushed before each call as above, the flush's
  own replay time subtracted: device time with no host in it, which is what the call costs inside a training step
  whose queue the host keeps full. GB/s and the fraction of copy bandwidth are also given at this time.
- ``--profile``: the summed duration of the call's kernels (torch.profiler), their number, and the host time to
  enqueue one call.

The "% copy bw" column divides by the nominal copy bandwidth of the lent H100; cases that also time a ``copy``
provider (a device-to-device copy of their own bytes) get the fraction of that bandwidth, measured in the same
run, in a list of their own (:func:`measured_copy_fractions`).

Each case starts from a fresh ``torch._dynamo`` state (unless the caller warms up its compiled providers itself,
as bench_e2e does), so a ``reference+compile`` provider compiles for its own case's static shapes (a compiled
function reused across cases would otherwise recompile with dynamic shapes).
While :func:`run` times, it appends every row to ``results/<name>.partial.jsonl``; :func:`write_results` removes
that file once the whole run is written, so a run stopped part-way (a time limit) still leaves its rows.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch

# Measured device limits of the lent H100 (PERF_NOTES.md): copy bandwidth counts bytes read + written.
COPY_BW_BYTES_PER_S = 3.0e12
BF16_MATMUL_FLOPS_PER_S = 800e12

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass
class Case:
    name: str
    bytes: float = 0.0  # bytes that must move (read + written) for the measured work
    flops: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Row:
    case: str
    provider: str
    ms_median: float
    ms_p20: float
    ms_p80: float
    gb_per_s: Optional[float]
    frac_copy_bw: Optional[float]
    tflop_per_s: Optional[float]
    frac_matmul_peak: Optional[float]
    peak_mem_mb: Optional[float]
    error: Optional[str] = None
    extra: dict[str, float] = field(default_factory=dict)  # script-specific figures (img/s, ...), own md column
    kernels: list[tuple[str, float, float]] = field(default_factory=list)  # --profile: (name, ms, launches) a call


def common_args(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke run on CPU")
    ap.add_argument("--providers", default=None, help="comma-separated subset of providers")
    ap.add_argument("--cases", default=None, help="comma-separated substrings: run only cases whose name has one")
    ap.add_argument("--profile", action="store_true",
                    help="also record device time and kernel launches per call (torch.profiler, CUDA only): a median "
                         "far above the device time means the call is bound by host overhead")
    ap.add_argument("--graph", action="store_true",
                    help="also time each call replayed from a CUDA graph (device time without host overhead; CUDA "
                         "only): graph_ms, and GB/s and %% of copy bandwidth at that time")
    ap.add_argument("--no-save", action="store_true", help="print only, do not write benchmarks/results/")
    return ap


def time_fn(fn: Callable[[], Any], device: torch.device, warmup_ms: int = 25, rep_ms: int = 100) -> tuple[float, ...]:
    """(median, p20, p80) milliseconds of one call of ``fn``."""
    if device.type == "cuda":
        from triton.testing import do_bench

        q = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return tuple(float(x) for x in q)
    fn()
    times = []
    deadline = time.perf_counter() + rep_ms / 1000
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) >= 5 else [times[0], 0, 0, times[-1]]
    return (statistics.median(times), q[0], q[3])


def _device_activities(fn: Optional[Callable[[], Any]], flush: torch.Tensor, calls: int) -> dict[str, list[float]]:
    """Durations (us) of the device activities of ``calls`` rounds of (L2 flush, ``fn``) by name, from
    torch.profiler (``fn`` None: the flushes alone)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            flush.zero_()
            if fn is not None:
                fn()
        torch.cuda.synchronize()
    by_name: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:  # a device event's span is its duration
            by_name.setdefault(e.name, []).append(e.time_range.elapsed_us())
    return by_name


def device_time(fn: Callable[[], Any], calls: int = 5, top: int = 0) -> dict[str, Any]:
    """Per call of ``fn`` on CUDA: summed duration of its device activities (kernels, copies, memsets; one stream,
    so no overlap) and their count, from torch.profiler, each call after an L2 flush as the other timers do (a
    warm cache would flatter a call whose data fits in it); the flushes are profiled alone too and their share
    taken out, by name. With ``top``, also ``kernels``: the ``top`` longest activities by total time, as (name,
    ms per call, launches per call)."""
    flush = torch.empty(_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    fn()
    with_call = _device_activities(fn, flush, calls)
    flushes = _device_activities(None, flush, calls)
    ours: dict[str, tuple[float, float]] = {}  # name -> (us, activities) of the calls, the flushes' taken out
    for name, times in with_call.items():
        alone = flushes.get(name, [])
        us = sum(times) - sum(alone)
        n = len(times) - len(alone)
        if n > 0:
            ours[name] = (max(us, 0.0), n)
    out: dict[str, Any] = {"device_ms": sum(us for us, _ in ours.values()) / 1000 / calls,
                           "launches": sum(n for _, n in ours.values()) / calls}
    if top:
        ranked = sorted(ours.items(), key=lambda kv: -kv[1][0])[:top]
        out["kernels"] = [(name, us / 1000 / calls, n / calls) for name, (us, n) in ranked]
    return out


COPY_PROVIDER = "copy"


def copy_provider(nbytes: float, device: torch.device) -> Callable[[], Any]:
    """A device-to-device copy moving ``nbytes`` in all (half read, half written): the measured copy bandwidth at
    a case's own size, as a provider beside the others. Its row's speed-up over mimfast, below 1, is the fraction
    of that bandwidth mimfast reaches."""
    half = max(1, int(nbytes) // 2)
    src = torch.empty(half, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def host_time(fn: Callable[[], Any], calls: int = 20) -> float:
    """Median milliseconds the host spends issuing one call of ``fn`` on CUDA (no synchronisation inside the timed
    span; the device is idle at the start, so a short queue never blocks the host)."""
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    torch.cuda.synchronize()
    return statistics.median(times)


_FLUSH_BYTES = 256 * 2**20  # the size triton.testing.do_bench zeroes to flush the L2 cache


def graph_time(fn: Callable[[], Any], eager_ms: float, replays: int = 30) -> tuple[float, float, float]:
    """(median, p20, p80) device milliseconds of one call of ``fn``, replayed from a CUDA graph.

    The graph holds ``copies`` rounds of (L2 flush, call) so one replay lasts about a millisecond; a second graph
    holds the flushes alone, and its median is subtracted. Warm-up runs on a side stream first, as whole-step
    capture requires (autograd and the allocator set up their state there), and the capture runs on that stream too.
    A call that synchronises with the host cannot be captured and raises. A ``fn`` that keeps state from its first
    call (a saved forward whose backward is timed) has a ``restart`` attribute that drops it: it is called before
    the warm-up, so the state is made again on the capture stream (autograd runs a backward on its forward's
    stream, and any other stream breaks the capture).
    """
    restart = getattr(fn, "restart", None)
    if restart is not None:
        restart()
    copies = max(1, min(16, round(1.0 / max(eager_ms, 1e-3))))
    flush = torch.empty(_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            flush.zero_()
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graphs = []
    for with_call in (True, False):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=side):
            for _ in range(copies):
                flush.zero_()
                if with_call:
                    fn()
        graphs.append(g)
    torch.cuda.synchronize()
    quantiles = []
    for g in graphs:
        for _ in range(3):
            g.replay()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(replays)]
        for start, end in events:
            start.record()
            g.replay()
            end.record()
        torch.cuda.synchronize()
        times = sorted(s.elapsed_time(e) / copies for s, e in events)
        q = statistics.quantiles(times, n=5)
        quantiles.append((statistics.median(times), q[0], q[3]))
    del graphs
    (med, p20, p80), (flush_ms, _, _) = quantiles
    return (max(med - flush_ms, 0.0), max(p20 - flush_ms, 0.0), max(p80 - flush_ms, 0.0))


def measure(case: Case, provider: str, fn: Callable[[], Any], device: torch.device, warmup_ms: int = 25,
            rep_ms: int = 100, profile: bool = False, graph: bool = False) -> Row:
    try:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()  # peak memory of one call, before the timer allocates its cache-flush buffer
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            peak = None
        med, p20, p80 = time_fn(fn, device, warmup_ms, rep_ms)
    except Exception as e:  # a provider that cannot run a shape is reported, not fatal
        return Row(case.name, provider, float("nan"), float("nan"), float("nan"), None, None, None, None, None,
                   error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    s = med / 1000
    gbs = case.bytes / s / 1e9 if case.bytes else None
    tfs = case.flops / s / 1e12 if case.flops else None
    row = Row(
        case.name, provider, med, p20, p80,
        gbs, (case.bytes / s / COPY_BW_BYTES_PER_S) if case.bytes else None,
        tfs, (case.flops / s / BF16_MATMUL_FLOPS_PER_S) if case.flops else None,
        peak,
    )
    if profile and device.type == "cuda":
        try:
            prof = device_time(fn, top=6)
            row.kernels = prof.pop("kernels")  # where the device time goes: the JSON and the log, not the table
            row.extra.update(prof)
            row.extra["host_ms"] = host_time(fn)
        except Exception as e:  # the timing row stands without its profile
            print(f"profile of {case.name} / {provider} failed: {type(e).__name__}: {e}", flush=True)
    if graph and device.type == "cuda":
        try:
            g_med, g_p20, g_p80 = graph_time(fn, med)
            row.extra.update(graph_ms=g_med, graph_p20=g_p20, graph_p80=g_p80)
            if case.bytes and g_med > 0:
                row.extra["graph_gb_s"] = case.bytes / (g_med / 1000) / 1e9
                row.extra["graph_pct_copy_bw"] = 100 * case.bytes / (g_med / 1000) / COPY_BW_BYTES_PER_S
            if case.flops and g_med > 0:
                row.extra["graph_tflop_s"] = case.flops / (g_med / 1000) / 1e12
        except Exception as e:  # e.g. a call that reads a value back to the host cannot be captured
            print(f"graph timing of {case.name} / {provider} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        finally:
            torch.cuda.synchronize()
            gc.collect()  # a failed capture's graph and pool, held by the exception's frames until now
            torch.cuda.empty_cache()
    return row


def partial_path(name: str) -> str:
    return os.path.join(RESULTS_DIR, f"{name}.partial.jsonl")


def run(cases: list[tuple[Case, dict[str, Callable[[], Any]]]], device: torch.device,
        providers: Optional[str] = None, only_cases: Optional[str] = None, warmup_ms: int = 25,
        rep_ms: int = 100, profile: bool = False, graph: bool = False, name: Optional[str] = None,
        reset_dynamo: bool = True) -> list[Row]:
    """Time every kept provider on every kept case; ``warmup_ms`` / ``rep_ms`` are the timer's budgets per row
    (raise them for calls of tens of milliseconds, where the defaults give only a few repetitions). With ``name``
    every row is also appended to :func:`partial_path` as it is measured (the environment first).
    ``reset_dynamo=False`` keeps compiled graphs across cases, for callers that compile and warm up a provider
    themselves before timing it."""
    keep = set(providers.split(",")) if providers else None
    wanted = only_cases.split(",") if only_cases else None
    if (profile or graph) and device.type != "cuda":
        print("--profile / --graph time CUDA devices only: not applied on", device.type, flush=True)
    partial = None
    if name is not None:
        os.makedirs(RESULTS_DIR, exist_ok=True)
        partial = partial_path(name)
        with open(partial, "w") as f:
            f.write(json.dumps({"env": environment(device)}) + "\n")
    rows = []
    for case, fns in cases:
        if wanted is not None and not any(w in case.name for w in wanted):
            continue
        if reset_dynamo:
            torch._dynamo.reset()  # this case's compiled providers compile for its own static shapes
        for provider, fn in fns.items():
            if keep is not None and provider not in keep:
                continue
            row = measure(case, provider, fn, device, warmup_ms, rep_ms, profile, graph)
            rows.append(row)
            if partial is not None:
                with open(partial, "a") as f:
                    f.write(json.dumps(asdict(row)) + "\n")
            print(format_row(row), flush=True)
            if row.extra and (profile or graph):
                print(f"{'':<34} {provider:<22} {format_extra(row.extra)}", flush=True)
            for kernel, ms, n in row.kernels:
                print(f"{'':<34} {provider:<22}   {ms:8.4f} ms  x{n:<4g} {kernel[:110]}", flush=True)
    return rows


def format_row(r: Row) -> str:
    if r.error:
        return f"{r.case:<34} {r.provider:<22} error: {r.error}"
    extra = []
    if r.gb_per_s is not None:
        extra.append(f"{r.gb_per_s:8.1f} GB/s ({100 * r.frac_copy_bw:5.1f}% copy bw)")
    if r.tflop_per_s is not None:
        extra.append(f"{r.tflop_per_s:7.1f} TFLOP/s ({100 * r.frac_matmul_peak:5.1f}% peak)")
    if r.peak_mem_mb is not None:
        extra.append(f"peak {r.peak_mem_mb:8.1f} MB")
    return f"{r.case:<34} {r.provider:<22} {r.ms_median:9.4f} ms [{r.ms_p20:.4f}, {r.ms_p80:.4f}]  " + "  ".join(extra)


def format_extra(extra: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" if k.endswith(("_ms", "_p20", "_p80")) else f"{k} {v:.1f}"
                     for k, v in extra.items())


def environment(device: torch.device) -> dict[str, Any]:
    # MIMFAST_COMMIT names the commit where the tree was copied without its git history (a remote GPU machine)
    commit = os.environ.get("MIMFAST_COMMIT", "")
    if not commit:
        repo = os.path.dirname(os.path.dirname(RESULTS_DIR))
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=repo).stdout.strip() or "unknown"
            # tracked files edited since that commit: the numbers are not that commit's
            changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "mimfast",
                                      "benchmarks/*.py", "csrc"], capture_output=True, text=True, cwd=repo).stdout
            if commit != "unknown" and changed.strip():
                commit += "-dirty"
        except OSError:
            commit = "unknown"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": commit,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def speedups(rows: list[Row], ours: str = "mimfast", key: str = "ms_median") -> dict[str, dict[str, float]]:
    """Per case: time of every other provider divided by ours (``key``: ms_median, or an ``extra`` time such as
    graph_ms; providers without it are left out)."""
    out: dict[str, dict[str, float]] = {}
    for case in dict.fromkeys(r.case for r in rows):
        by = {r.provider: (r.ms_median if key == "ms_median" else r.extra.get(key)) for r in rows
              if r.case == case and r.error is None}
        by = {p: t for p, t in by.items() if t is not None and t > 0}
        if ours in by:
            out[case] = {p: t / by[ours] for p, t in by.items() if p != ours}
    return out


def measured_copy_fractions(rows: list[Row], ours: str = "mimfast") -> dict[str, dict[str, float]]:
    """Per case with a ``copy`` row: the fraction of the copy bandwidth measured in the same run at the case's own
    bytes that ours reaches (the copy's time / ours): ``eager``; where both were profiled, ``kernels`` (summed
    kernel durations, no host time and no graph-node overhead); and where both were graph-timed, ``graph``. A
    graph replays the copy as a memcpy node, which ran up to a third slower than the same copy as a kernel: at
    graph time ours is held to the faster of the copy's graph time and its profiled kernel time."""
    out: dict[str, dict[str, float]] = {}
    for key, label in (("ms_median", "eager"), ("device_ms", "kernels"), ("graph_ms", "graph")):
        for case, sp in speedups(rows, ours, key).items():
            if COPY_PROVIDER in sp:
                out.setdefault(case, {})[label] = sp[COPY_PROVIDER]
    for case, fr in out.items():
        copy = next(r for r in rows if r.case == case and r.provider == COPY_PROVIDER)
        kernel_ms, graph_ms = copy.extra.get("device_ms"), copy.extra.get("graph_ms")
        if "graph" in fr and kernel_ms and graph_ms and kernel_ms < graph_ms:
            fr["graph"] *= kernel_ms / graph_ms
    return out


def write_results(name: str, rows: list[Row], device: torch.device, extra: Optional[dict[str, Any]] = None) -> str:
    """Append a run to results/<name>.json and rewrite results/<name>.md with the newest run first (a run without
    rows, e.g. a --cases filter that matched nothing, is not recorded); the run's partial file is removed."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    if os.path.exists(partial_path(name)):
        os.remove(partial_path(name))
    if not rows:
        return os.path.join(RESULTS_DIR, f"{name}.md")
    env = environment(device)
    run_record = {"env": env, "rows": [asdict(r) for r in rows], "speedups": speedups(rows), **(extra or {})}
    graph_speedups = speedups(rows, key="graph_ms")
    if graph_speedups:
        run_record["speedups_graph"] = graph_speedups
    copy_fractions = measured_copy_fractions(rows)
    if copy_fractions:
        run_record["measured_copy_fraction"] = copy_fractions
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    history = []
    if os.path.exists(path):
        with open(path) as f:
            history = json.load(f)
    history.insert(0, run_record)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(history, f, indent=1)
    os.replace(tmp, path)
    write_md(name, history)
    return path


def write_md(name: str, history: list[dict[str, Any]]) -> str:
    """Rewrite results/<name>.md from the runs of results/<name>.json, newest first."""
    md = [f"# {name}", ""]
    for rec in history:
        e = rec["env"]
        extras = any(r.get("extra") for r in rec["rows"])  # the column appears only for scripts that fill it
        md += [f"## {e['date']} · {e['device']} · torch {e['torch']} · triton {e['triton']} · commit {e['commit']}",
               "", "| case | provider | median ms | p20 | p80 | GB/s | % copy bw | TFLOP/s | % peak | peak MB |"
               + (" extra |" if extras else ""),
               "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if extras else "")]
        for r in rec["rows"]:
            def f(v: Optional[float], scale: float = 1.0, fmt: str = "{:.1f}") -> str:
                return "" if v is None or v != v else fmt.format(v * scale)
            md.append(f"| {r['case']} | {r['provider']} | {f(r['ms_median'], fmt='{:.4f}')} | "
                      f"{f(r['ms_p20'], fmt='{:.4f}')} | {f(r['ms_p80'], fmt='{:.4f}')} | {f(r['gb_per_s'])} | "
                      f"{f(r['frac_copy_bw'], 100)} | {f(r['tflop_per_s'])} | {f(r['frac_matmul_peak'], 100)} | "
                      f"{f(r['peak_mem_mb'])} |"
                      + (f" {format_extra(r.get('extra', {}))} |" if extras else "")
                      + (f" error: {r['error']}" if r.get("error") else ""))
        if rec.get("speedups"):
            md += ["", "Speed-up of mimfast over each provider (their time / ours):", ""]
            for case, sp in rec["speedups"].items():
                md.append(f"- {case}: " + ", ".join(f"{p} {v:.2f}x" for p, v in sp.items()))
        if rec.get("speedups_graph"):
            md += ["", "The same at device time (graph_ms: CUDA-graph replay, no host overhead):", ""]
            for case, sp in rec["speedups_graph"].items():
                md.append(f"- {case}: " + ", ".join(f"{p} {v:.2f}x" for p, v in sp.items()))
        if rec.get("measured_copy_fraction"):
            md += ["", "Fraction of the copy bandwidth measured in this run at each case's bytes (the `copy` row's "
                   "time / mimfast's; the table's % copy bw is against the nominal "
                   f"{COPY_BW_BYTES_PER_S / 1e12:.1f} TB/s):", ""]
            for case, fr in rec["measured_copy_fraction"].items():
                md.append(f"- {case}: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in fr.items()))
        md.append("")
    out = os.path.join(RESULTS_DIR, f"{name}.md")
    with open(out, "w") as f:
        f.write("\n".join(md))
    return out


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
