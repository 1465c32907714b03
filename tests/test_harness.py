import json

import pytest
import torch

from benchmarks import harness
from benchmarks.harness import Case, run, write_results


def test_rows_counts_and_results_files(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS_DIR", str(tmp_path))
    x = torch.randn(256, 256)
    mm = Case("mm", bytes=3 * x.numel() * 4, flops=2.0 * 256**3)
    cases = [(mm, {"mimfast": lambda: x @ x, "reference": lambda: x @ x.t()}),
             (Case("skipped"), {"mimfast": lambda: None})]
    rows = run(cases, torch.device("cpu"), providers="mimfast,reference", only_cases="mm")
    assert [(r.case, r.provider) for r in rows] == [("mm", "mimfast"), ("mm", "reference")]
    r = rows[0]
    assert r.error is None and r.ms_p20 <= r.ms_median <= r.ms_p80
    assert r.gb_per_s == pytest.approx(mm.bytes / (r.ms_median / 1000) / 1e9)
    assert r.frac_matmul_peak == pytest.approx(r.tflop_per_s * 1e12 / harness.BF16_MATMUL_FLOPS_PER_S)
    broken = run([(Case("bad"), {"mimfast": lambda: 1 / 0})], torch.device("cpu"))[0]
    assert broken.error.startswith("ZeroDivisionError")
    monkeypatch.setenv("MIMFAST_COMMIT", "abc1234")
    write_results("bench_x", rows, torch.device("cpu"))
    write_results("bench_x", rows[:1], torch.device("cpu"))
    history = json.loads((tmp_path / "bench_x.json").read_text())
    assert len(history) == 2 and len(history[0]["rows"]) == 1 and history[0]["env"]["commit"] == "abc1234"
    md = (tmp_path / "bench_x.md").read_text()
    assert md.count("## ") == 2 and "| mm | reference |" in md


def test_rows_stream_to_a_partial_file_that_outlives_a_stopped_run(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS_DIR", str(tmp_path))
    monkeypatch.setenv("MIMFAST_COMMIT", "abc1234")

    def stopped() -> None:
        raise SystemExit("time limit")  # not an error of the provider: it ends the run

    cases = [(Case("first"), {"mimfast": lambda: None}), (Case("second"), {"mimfast": stopped})]
    with pytest.raises(SystemExit):
        run(cases, torch.device("cpu"), name="bench_p")
    lines = [json.loads(line) for line in (tmp_path / "bench_p.partial.jsonl").read_text().splitlines()]
    assert lines[0]["env"]["commit"] == "abc1234" and [r["case"] for r in lines[1:]] == ["first"]
    rows = run(cases[:1], torch.device("cpu"), name="bench_p")
    write_results("bench_p", rows, torch.device("cpu"))
    assert not (tmp_path / "bench_p.partial.jsonl").exists() and (tmp_path / "bench_p.json").exists()
    # a run without rows (a --cases filter matching nothing) is not recorded
    write_results("bench_p", [], torch.device("cpu"))
    assert len(json.loads((tmp_path / "bench_p.json").read_text())) == 1


def test_compiled_reference_of_each_case_compiles_for_its_own_static_shapes():
    frames = []

    def backend(gm, example_inputs):
        frames.append([tuple(t.shape) if isinstance(t, torch.Tensor) else t for t in example_inputs])
        return gm.forward

    compiled = torch.compile(lambda x: x * 2 + 1, backend=backend)  # automatic dynamic shapes, the default
    cases = [(Case(f"n{n}"), {"reference+compile": lambda n=n: compiled(torch.ones(n))}) for n in (3, 5, 7)]
    rows = run(cases, torch.device("cpu"))
    assert all(r.error is None for r in rows)
    # one static graph per case: no symbolic sizes, and no case reusing another's cache entry
    assert frames == [[(3,)], [(5,)], [(7,)]]
    # a caller that warmed its compiled provider up keeps it: no second compilation when timed
    torch._dynamo.reset()
    frames.clear()
    compiled(torch.ones(4))
    run([(Case("warm"), {"reference+compile": lambda: compiled(torch.ones(4))})], torch.device("cpu"),
        reset_dynamo=False)
    assert frames == [[(4,)]]


@pytest.mark.gpu
def test_device_time_counts_kernels():
    x = torch.randn(4096, 4096, device="cuda")
    prof = harness.device_time(lambda: (x @ x).relu_(), calls=3, top=5)
    assert prof["launches"] == pytest.approx(2, abs=1)
    assert 0 < prof["device_ms"] < 100
    # the matmul dominates, and the listed kernels add up to the total
    name, ms, launches = prof["kernels"][0]
    assert launches == 1 and ms > 0.5 * prof["device_ms"]
    assert sum(k[1] for k in prof["kernels"]) == pytest.approx(prof["device_ms"], rel=1e-6)


def test_speedups_at_graph_time_and_md_lists_them(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS_DIR", str(tmp_path))

    def row(provider: str, ms: float, graph_ms=None) -> harness.Row:
        extra = {} if graph_ms is None else {"graph_ms": graph_ms}
        return harness.Row("c", provider, ms, ms, ms, None, None, None, None, None, extra=extra)

    rows = [row("mimfast", 0.4, 0.1), row("reference", 0.8, 0.5), row("reference+compile", 0.6)]
    assert harness.speedups(rows) == {"c": {"reference": pytest.approx(2.0), "reference+compile": pytest.approx(1.5)}}
    # a provider without a graph time (its capture failed) is left out rather than compared with the eager time
    assert harness.speedups(rows, key="graph_ms") == {"c": {"reference": pytest.approx(5.0)}}
    write_results("bench_g", rows, torch.device("cpu"))
    record = json.loads((tmp_path / "bench_g.json").read_text())[0]
    assert record["speedups_graph"] == {"c": {"reference": pytest.approx(5.0)}}
    md = (tmp_path / "bench_g.md").read_text()
    assert "graph_ms 0.1000" in md and "- c: reference 5.00x" in md


def test_fraction_of_the_measured_copy_bandwidth(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS_DIR", str(tmp_path))

    def row(case: str, provider: str, ms: float, graph_ms=None, device_ms=None) -> harness.Row:
        extra = {k: v for k, v in (("graph_ms", graph_ms), ("device_ms", device_ms)) if v is not None}
        return harness.Row(case, provider, ms, ms, ms, None, None, None, None, None, extra=extra)

    rows = [row("gather", "mimfast", 0.5, 0.25, 0.3), row("gather", harness.COPY_PROVIDER, 0.4, 0.2, 0.15),
            row("loss", "mimfast", 1.0), row("loss", harness.COPY_PROVIDER, 0.25),
            row("embed", "mimfast", 1.0), row("embed", "reference", 2.0)]
    fractions = harness.measured_copy_fractions(rows)
    # at graph time against the faster copy: its kernel time 0.15 ms, not its graph time 0.2 (a memcpy node)
    assert fractions == {"gather": {"eager": pytest.approx(0.8), "kernels": pytest.approx(0.5),
                                    "graph": pytest.approx(0.6)},
                         "loss": {"eager": pytest.approx(0.25)}}
    write_results("bench_c", rows, torch.device("cpu"))
    assert json.loads((tmp_path / "bench_c.json").read_text())[0]["measured_copy_fraction"]["loss"] == {
        "eager": pytest.approx(0.25)}
    md = (tmp_path / "bench_c.md").read_text()
    assert "- gather: eager 80.0%, kernels 50.0%, graph 60.0%" in md and "- loss: eager 25.0%" in md
    assert "- embed:" not in md.split("Fraction of the copy bandwidth")[1]


@pytest.mark.gpu
def test_graph_time_is_device_time_of_a_copy():
    # a 512 MiB copy by a kernel: long enough that the profiler's kernel time and the graph replay time must agree
    # (a plain copy_ is a memcpy, which a graph replays as a memcpy node: 20% slower than eager on the H100)
    src = torch.randint(-100, 100, (2**28,), dtype=torch.int16, device="cuda")
    dst = torch.empty_like(src)
    fn = lambda: torch.neg(src, out=dst)  # noqa: E731
    profiled = harness.device_time(fn)
    assert profiled["launches"] == 1  # the L2 flush before each call is not counted
    kernel_ms = profiled["device_ms"]
    med, p20, p80 = harness.graph_time(fn, eager_ms=kernel_ms)
    assert p20 <= med <= p80
    assert med == pytest.approx(kernel_ms, rel=0.2)
    assert 0 < harness.host_time(fn) < 10


@pytest.mark.gpu
def test_graph_time_removes_host_overhead():
    # many tiny launches: the eager median is host time, the graph replay only the kernels
    x = torch.zeros(1024, device="cuda")

    def fn() -> None:
        for _ in range(50):
            x.add_(1)

    eager_ms = harness.time_fn(fn, torch.device("cuda"))[0]
    graph_ms = harness.graph_time(fn, eager_ms)[0]
    assert 0 < graph_ms < eager_ms
    assert harness.host_time(fn) > 0


def test_gpu_session_stages_expand_to_benchmark_commands(tmp_path):
    # a stand-in python3 prints its arguments, so the script's commands can be read without running them
    import os
    import subprocess

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text('#!/bin/sh\necho "python3 $*"\n')
    (fake / "python3").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", OUT=str(tmp_path / "out"))
    stages = ["masking:mae_vit_b16,videomae", "loss", "e2e:mae_vit_l16", "tests:test_visible_attention.py",
              "sweep:restore"]
    out = subprocess.run(["bash", "benchmarks/gpu_session.sh", *stages], cwd=repo, env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    commands = [line for line in out.stdout.splitlines() if line.startswith("python3 ")]
    # the sweep's rows go to the staging folder that is packed into $OUT
    assert commands[-1].endswith("/sweep_restore.json")
    commands[-1] = commands[-1].rsplit(" ", 1)[0]
    assert commands == [
        "python3 -m benchmarks.bench_masking --cases mae_vit_b16,videomae --graph --profile",
        "python3 -m benchmarks.bench_loss --graph --profile",
        "python3 -m benchmarks.bench_e2e --cases mae_vit_l16 --profile",
        "python3 -m pytest -q -m gpu tests/test_visible_attention.py -p no:cacheprovider",
        "python3 -m benchmarks.sweep bench_masking --cases /restore --set mimfast.kernels.restore_tokens.FLAT_BLOCK_R="
        "32,64 --set mimfast.ops.restore_tokens.BWD_PROGRAMS_PER_SM=3,6 "
        "--set mimfast.kernels.restore_tokens.BWD_PREFETCH=False,True --out",
    ]
    # every stage's whole log, in the one archive that comes back from $OUT, and the commit the results will name
    import tarfile

    assert [p.name for p in (tmp_path / "out").iterdir()] == ["gpu_session.tar.gz"]
    with tarfile.open(tmp_path / "out" / "gpu_session.tar.gz") as tar:
        tar.extractall(tmp_path / "unpacked")
    logs = sorted(p.name for p in (tmp_path / "unpacked").glob("*.log"))
    assert logs == ["e2e_mae_vit_l16.log", "loss.log", "masking_mae_vit_b16_videomae.log", "sweep_restore.log",
                    "tests_test_visible_attention.py.log"]
    assert "python3 -m benchmarks.bench_loss" in (tmp_path / "unpacked" / "loss.log").read_text()
    assert out.stdout.splitlines()[0].startswith("commit ") and "unknown" not in out.stdout.splitlines()[0]
    bad = subprocess.run(["bash", "benchmarks/gpu_session.sh", "nonsense"], cwd=repo, env=env, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "unknown stage nonsense" in bad.stdout
    bad = subprocess.run(["bash", "benchmarks/gpu_session.sh", "sweep:nothing"], cwd=repo, env=env, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "unknown sweep 'nothing'" in bad.stdout


def test_sweep_times_each_setting_and_restores_the_default(tmp_path, monkeypatch):
    # in-process, interpreted kernels on the quick shapes: every combination timed, each row named by its settings,
    # the attribute back at its default afterwards
    import sys

    from benchmarks import sweep
    from mimfast.kernels import pixel_loss

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    default = pixel_loss.LOSS_TILE
    seen = []
    real_time_fn = sweep.time_fn

    def spy(fn, device):
        seen.append(pixel_loss.LOSS_TILE)
        return real_time_fn(fn, device, rep_ms=1)

    monkeypatch.setattr(sweep, "time_fn", spy)
    out = tmp_path / "sweep.json"
    monkeypatch.setattr(sys, "argv", ["sweep", "bench_loss", "--quick", "--cases", "quick_mae/full",
                                      "--set", "mimfast.kernels.pixel_loss.LOSS_TILE=64,512", "--out", str(out)])
    sweep.main()
    rows = json.loads(out.read_text())
    assert [r["settings"] for r in rows] == ["LOSS_TILE=64", "LOSS_TILE=512"]
    assert all(r["case"] == "quick_mae/full/P48/fwd+bwd" and r["ms"] > 0 and "error" not in r for r in rows)
    assert seen == [64, 512] and pixel_loss.LOSS_TILE == default


def test_sweep_refuses_a_malformed_setting():
    from benchmarks import sweep

    # and a case filter ending in $ matches the end of the name only
    assert sweep.case_matches("dec_197/H12/fwd", "/fwd$") and not sweep.case_matches("dec_197/H12/fwd+bwd", "/fwd$")
    assert sweep.case_matches("dec_197/H12/fwd+bwd", "H12/fwd")

    with pytest.raises(SystemExit, match="module.ATTR"):
        sweep.parse_setting("LOSS_TILE=1,2")
    with pytest.raises(SystemExit, match="no attribute"):
        sweep.parse_setting("mimfast.kernels.pixel_loss.NO_SUCH=1")
