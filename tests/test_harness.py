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


@pytest.mark.gpu
def test_device_time_counts_kernels():
    x = torch.randn(4096, 4096, device="cuda")
    prof = harness.device_time(lambda: (x @ x).relu_(), calls=3)
    assert prof["launches"] == pytest.approx(2, abs=1)
    assert 0 < prof["device_ms"] < 100
