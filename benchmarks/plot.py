"""Pictures of the benchmark results: one PNG per benchmark, one panel per case, one bar per provider.

    python -m benchmarks.plot                          # benchmarks/results/bench_*.json -> bench_*.png beside them
    python -m benchmarks.plot --results DIR --out DIR --only bench_loss,bench_attention

Each panel holds the newest run that measured its case (a run may time some cases only: the JSON files keep every
run, newest first), so the bars of a panel always come from one run; its title names that run's commit and date.
A bar is the CUDA-graph device time where the run took it (``--graph``), else the eager median, hatched: a
provider that reads a value back to the host cannot be captured in a graph. The time axis is logarithmic and each
bar carries its time and, for the other providers, how many times mimfast's it is. The ``copy`` provider, a
device-to-device copy of the case's own bytes, is the floor a bandwidth-bound op is measured against; its panel
subtitle gives the fraction of that copy bandwidth mimfast reaches, measured in the same run.

Needs matplotlib (the ``demo`` and ``dev`` extras); a GPU machine without it sends its JSON back and the pictures
are drawn here.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
from typing import Any, Optional

from benchmarks.harness import COPY_PROVIDER, RESULTS_DIR, Row, measured_copy_fractions

__all__ = ["latest_case_runs", "bar_time", "plot_history", "main"]

OURS = "mimfast"
OURS_COLOR = "tab:blue"
VARIANT_COLOR = "lightsteelblue"  # mimfast/<variant>: another path of ours, timed beside the default
COPY_COLOR = "0.55"
OTHER_COLOR = "tab:orange"
PANEL_WIDTH, PANEL_HEIGHT, COLUMNS = 5.2, 0.36, 3  # inches; a panel's height grows with its providers


def bar_time(row: dict[str, Any]) -> tuple[Optional[float], bool]:
    """(milliseconds, from a CUDA graph) of one result row: graph device time when measured, else the eager
    median; (None, False) for a row that failed or holds no finite positive time."""
    if row.get("error"):
        return None, False
    graph = (row.get("extra") or {}).get("graph_ms")
    for ms, is_graph in ((graph, True), (row.get("ms_median"), False)):
        if isinstance(ms, (int, float)) and math.isfinite(ms) and ms > 0:
            return float(ms), is_graph
    return None, False


def latest_case_runs(history: list[dict[str, Any]]) -> dict[str, tuple[dict[str, Any], list[dict[str, Any]]]]:
    """case -> (env, rows) of the newest run holding a timed row of that case, cases in the order the newest runs
    first list them. ``history`` is a results JSON: runs newest first."""
    out: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    for run in history:
        cases = dict.fromkeys(r["case"] for r in run["rows"])
        for case in cases:
            if case in out:
                continue
            rows = [r for r in run["rows"] if r["case"] == case and bar_time(r)[0] is not None]
            if rows:
                out[case] = (run["env"], rows)
    return out


def _as_row(row: dict[str, Any]) -> Row:
    """A results-JSON row as the harness's Row (a field the file lacks: None; no extra figures: none)."""
    required = [f.name for f in dataclasses.fields(Row)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    return Row(**{name: row.get(name) for name in required}, error=row.get("error"), extra=row.get("extra") or {})


def _copy_fraction(rows: list[dict[str, Any]]) -> Optional[tuple[float, bool]]:
    """(fraction of the measured copy bandwidth mimfast reaches, judged at graph time) of one case's rows, by the
    harness's rule (:func:`benchmarks.harness.measured_copy_fractions`): at graph time where both were graphed,
    else at eager time; None without a copy row."""
    fractions = measured_copy_fractions([_as_row(r) for r in rows])
    if not fractions:
        return None
    (fr,) = fractions.values()
    return (fr["graph"], True) if "graph" in fr else (fr["eager"], False)


def plot_history(name: str, history: list[dict[str, Any]], path: str) -> Optional[tuple[int, int]]:
    """Draw the newest measurement of every case of one benchmark into ``path`` (PNG); returns its size in
    pixels, or None (nothing written) when no run holds a timed row."""
    runs = latest_case_runs(history)
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    cases = list(runs)
    cols = min(COLUMNS, len(cases))
    grid_rows = -(-len(cases) // cols)
    heights = [max(len(runs[c][1]) for c in cases[i * cols:(i + 1) * cols]) for i in range(grid_rows)]
    fig, axes = plt.subplots(grid_rows, cols, squeeze=False, dpi=100, constrained_layout=True,
                             figsize=(PANEL_WIDTH * cols, sum(PANEL_HEIGHT * h + 1.0 for h in heights) + 0.8),
                             gridspec_kw={"height_ratios": [h + 2.8 for h in heights]})
    for ax in axes.flat[len(cases):]:
        ax.set_visible(False)
    devices = dict.fromkeys(env["device"] for env, _ in runs.values())
    for ax, case in zip(axes.flat, cases):
        env, rows = runs[case]
        times = [bar_time(r) for r in rows]
        ours = next((ms for r, (ms, _) in zip(rows, times) if r["provider"] == OURS), None)
        y = list(range(len(rows)))[::-1]  # first provider on top
        colors = [OURS_COLOR if r["provider"] == OURS else VARIANT_COLOR if r["provider"].startswith(OURS + "/")
                  else COPY_COLOR if r["provider"] == COPY_PROVIDER else OTHER_COLOR for r in rows]
        bars = ax.barh(y, [ms for ms, _ in times], color=colors, height=0.7)
        for bar, (ms, is_graph), r in zip(bars, times, rows):
            if not is_graph:
                bar.set_hatch("///")
                bar.set_edgecolor("white")
            label = f" {ms:.3g} ms"
            if ours is not None and r["provider"] not in (OURS, COPY_PROVIDER):
                label += f"  ({ms / ours:.2f}x ours)"
            ax.text(ms, bar.get_y() + bar.get_height() / 2, label, va="center", fontsize=7)
        ax.set_xscale("log")
        lo = min(ms for ms, _ in times)
        hi = max(ms for ms, _ in times)
        ax.set_xlim(lo / 1.6, hi * 12)  # room for the labels right of the longest bar
        ax.set_yticks(y)
        ax.set_yticklabels([r["provider"] for r in rows], fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.xaxis.set_minor_formatter(NullFormatter())  # a narrow range would label every minor tick, overlapping
        ax.grid(axis="x", alpha=0.3, which="both")
        title = f"{case}\n{env.get('commit', '?')} · {str(env.get('date', '?'))[:10]}"
        frac = _copy_fraction(rows)
        if frac is not None:
            title += f" · {100 * frac[0]:.1f}% of copy bw ({'graph' if frac[1] else 'eager'})"
        ax.set_title(title, fontsize=8)
    fig.supxlabel("milliseconds per call (log scale; solid: CUDA-graph device time, hatched: eager median)",
                  fontsize=8)
    fig.suptitle(f"{name} · {', '.join(devices)}", fontsize=10)
    fig.savefig(path)
    size = tuple(int(v) for v in fig.get_size_inches() * fig.dpi)
    plt.close(fig)
    return size[0], size[1]


def main(argv: Optional[list[str]] = None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=RESULTS_DIR, help="folder of bench_*.json (default: %(default)s)")
    ap.add_argument("--out", default=None, help="folder for the PNGs (default: the results folder)")
    ap.add_argument("--only", default=None, help="comma-separated benchmark names, e.g. bench_loss,bench_masking")
    args = ap.parse_args(argv)
    out_dir = args.out or args.results
    os.makedirs(out_dir, exist_ok=True)
    paths = sorted(glob.glob(os.path.join(args.results, "bench_*.json")))
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {os.path.basename(p)[:-5] for p in paths}
        if unknown:
            raise SystemExit(f"no results for {', '.join(sorted(unknown))} in {args.results}")
        paths = [p for p in paths if os.path.basename(p)[:-5] in wanted]
    if not paths:
        raise SystemExit(f"no bench_*.json in {args.results}")
    written = []
    for path in paths:
        name = os.path.basename(path)[:-5]
        with open(path) as f:
            history = json.load(f)
        png = os.path.join(out_dir, f"{name}.png")
        size = plot_history(name, history, png)
        if size is None:
            print(f"{name}: no timed rows, nothing drawn")
            continue
        print(f"{png}: {len(latest_case_runs(history))} cases, {size[0]} x {size[1]} px")
        written.append(png)
    return written


if __name__ == "__main__":
    main()
