import json
import struct

import pytest

from benchmarks import plot


def _row(case, provider, ms, graph_ms=None, error=None):
    return {"case": case, "provider": provider, "ms_median": ms, "ms_p20": ms, "ms_p80": ms, "error": error,
            "extra": {} if graph_ms is None else {"graph_ms": graph_ms}}


def _run(commit, rows):
    return {"env": {"device": "NVIDIA H100 80GB HBM3", "commit": commit, "date": "2026-11-23T07:00:00+00:00"},
            "rows": rows}


# newest first, as harness.write_results keeps them: the newest run timed case "a" only
HISTORY = [
    _run("new", [_row("a", "mimfast", 0.5, graph_ms=0.2), _row("a", "reference", 2.0),
                 _row("a", "copy", 0.2, graph_ms=0.1)]),
    _run("old", [_row("a", "mimfast", 9.0), _row("b", "mimfast", 1.0, graph_ms=0.4),
                 _row("b", "reference", 3.0, error="RuntimeError: out of memory"),
                 _row("c", "mimfast", float("nan"))]),
]


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_bar_time_prefers_graph_time_and_skips_failed_rows():
    assert plot.bar_time(_row("a", "mimfast", 0.5, graph_ms=0.2)) == (0.2, True)
    assert plot.bar_time(_row("a", "mimfast", 0.5)) == (0.5, False)
    assert plot.bar_time(_row("a", "mimfast", 0.5, graph_ms=float("nan"))) == (0.5, False)
    assert plot.bar_time(_row("a", "mimfast", 0.5, error="boom")) == (None, False)
    assert plot.bar_time(_row("a", "mimfast", float("nan"))) == (None, False)


def test_each_case_comes_from_the_newest_run_that_timed_it():
    runs = plot.latest_case_runs(HISTORY)
    assert list(runs) == ["a", "b"]  # "c" has no finite time anywhere
    env, rows = runs["a"]
    assert env["commit"] == "new" and [r["provider"] for r in rows] == ["mimfast", "reference", "copy"]
    env, rows = runs["b"]
    assert env["commit"] == "old" and [r["provider"] for r in rows] == ["mimfast"]  # the failed row is left out
    # copy time / ours at graph time where both were graphed, else at eager time (the harness's rule)
    assert plot._copy_fraction(runs["a"][1]) == pytest.approx((0.5, True))
    assert plot._copy_fraction([_row("a", "mimfast", 0.5, graph_ms=0.2), _row("a", "copy", 0.1)]) == \
        pytest.approx((0.2, False))
    assert plot._copy_fraction(runs["b"][1]) is None


def test_main_draws_one_png_per_benchmark(tmp_path, capsys):
    (tmp_path / "bench_x.json").write_text(json.dumps(HISTORY))
    (tmp_path / "bench_empty.json").write_text(json.dumps([_run("z", [_row("a", "mimfast", 1.0, error="x")])]))
    out = tmp_path / "png"
    written = plot.main(["--results", str(tmp_path), "--out", str(out)])
    assert written == [str(out / "bench_x.png")]
    width, height = _png_size(out / "bench_x.png")
    assert width == int(plot.PANEL_WIDTH * 2 * 100) and height > 200  # two cases side by side at 100 dpi
    assert "bench_empty: no timed rows, nothing drawn" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no results for bench_missing"):
        plot.main(["--results", str(tmp_path), "--only", "bench_missing"])
    with pytest.raises(SystemExit, match="no bench_"):
        plot.main(["--results", str(out)])
