"""The engine on a CUDA device: bf16 autocast, fused AdamW, torch.compile, NVTX ranges, MFU in the log, and
the fused (Triton) ops against the reference formulation over a short run."""

import json

import pytest
import torch

from mimfast.train import checkpoint as ckpt
from mimfast.train.config import parse_args
from mimfast.train.engine import train
from mimfast.train.metrics import read_metrics

pytestmark = pytest.mark.gpu


def _run(out, *flags):
    return train(parse_args(["--output-dir", str(out), "--device", "cuda", *flags]))


def test_bf16_compiled_run_logs_mfu_and_memory(tmp_path):
    r = _run(tmp_path / "run", "--model", "mae_vit_micro_patch4", "--data", "synthetic", "--epochs", "1",
             "--max-steps", "6", "--batch-size", "64", "--log-every", "2", "--compile", "--nvtx", "--backend",
             "triton", "--eval-max-images", "128")
    assert r.step == 6
    records = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    assert all(torch.isfinite(torch.tensor(rec["loss"])) for rec in records)
    assert all(rec["peak_mem_mb"] > 0 for rec in records)
    name = torch.cuda.get_device_name()
    if any(k in name for k in ("H100", "H200", "A100")):
        assert all(0 < rec["mfu"] < 1 for rec in records)
    state = ckpt.load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))
    assert state["optimizer"]["param_groups"][0]["fused"] is True
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["images"] == 128


@pytest.mark.parametrize("steps,masking", [
    ("20", []),
    ("8", ["--mask-strategy", "block", "--mask-ratio", "0.5", "--mask-ratio-end", "0.9"]),
    ("8", ["--mask-strategy", "importance"]),
    ("8", ["--mask-ratio-range", "0.5", "0.9"]),
], ids=["random", "block-progressive", "importance", "per-sample-ratios"])
def test_triton_backend_follows_the_reference_trajectory(tmp_path, steps, masking):
    flags = ["--model", "mae_vit_micro_patch4", "--epochs", "1", "--max-steps", steps, "--batch-size", "64",
             "--log-every", "1", "--no-eval", "--precision", "fp32", *masking]
    _run(tmp_path / "ref", *flags, "--backend", "reference")
    _run(tmp_path / "tri", *flags, "--backend", "triton")
    a = [r["loss"] for r in read_metrics(str(tmp_path / "ref" / "metrics.jsonl"))]
    b = [r["loss"] for r in read_metrics(str(tmp_path / "tri" / "metrics.jsonl"))]
    assert b[0] == pytest.approx(a[0], rel=1e-4)
    assert b == pytest.approx(a, rel=2e-2)


def test_mae_base_224_runs_with_fused_ops(tmp_path):
    r = _run(tmp_path / "base", "--model", "mae_vit_base_patch16", "--data", "synthetic", "--epochs", "1",
             "--max-steps", "4", "--batch-size", "64", "--log-every", "2", "--no-eval", "--backend", "auto",
             "--grad-checkpointing")
    assert r.step == 4
    records = read_metrics(str(tmp_path / "base" / "metrics.jsonl"))
    assert records[-1]["img_per_s"] > 0
