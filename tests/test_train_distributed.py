"""The engine under torchrun with two CPU processes (gloo): DDP and FSDP2 train the same model as one process
with the same global batch, the same samples and the same masks."""

import json
import os
import subprocess
import sys

import pytest
import torch

from mimfast.train import checkpoint as ckpt
from mimfast.train.config import parse_args
from mimfast.train.engine import train
from mimfast.train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--model", "mae_vit_micro_patch4", "--epochs", "1", "--max-steps", "3", "--log-every", "1", "--no-eval",
         "--num-workers", "0", "--clip-grad", "0.5"]


def torchrun(out_dir, *flags):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mimfast.pretrain", "--output-dir", str(out_dir), *flags]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """One process, global batch 8."""
    out = tmp_path_factory.mktemp("single")
    train(parse_args(["--output-dir", str(out), "--batch-size", "8", *FLAGS]))
    return out


def _compare(single_dir, dist_dir):
    a = ckpt.load_checkpoint(str(single_dir / "checkpoint.pt"))
    b = ckpt.load_checkpoint(str(dist_dir / "checkpoint.pt"))
    assert b["step"] == a["step"] == 3 and b["world_size"] == 2
    assert set(a["model"]) == set(b["model"])
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-4, atol=2e-6, msg=k)
    la = [r["loss"] for r in read_metrics(str(single_dir / "metrics.jsonl"))]
    lb = [r["loss"] for r in read_metrics(str(dist_dir / "metrics.jsonl"))]
    assert lb == pytest.approx(la, rel=1e-5)
    # the first step's loss is computed before any update: equal to float rounding
    assert abs(lb[0] - la[0]) < 1e-5 * abs(la[0])


def test_ddp_matches_one_process_with_the_global_batch(single_process, tmp_path):
    torchrun(tmp_path / "ddp", "--batch-size", "4", *FLAGS)
    _compare(single_process, tmp_path / "ddp")


def test_fsdp2_matches_one_process_with_the_global_batch(single_process, tmp_path):
    pytest.importorskip("torch.distributed.fsdp", reason="this torch build has no FSDP")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch build has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    # with the evaluation, which gathers the sharded weights on every rank
    torchrun(tmp_path / "fsdp", "--batch-size", "4", "--fsdp", *FLAGS, "--eval", "--eval-max-images", "64")
    _compare(single_process, tmp_path / "fsdp")
    result = json.loads((tmp_path / "fsdp" / "eval.json").read_text())
    assert result["probes"]["trained"]["knn_top1"] > 0


def test_ddp_block_masks_of_a_moving_ratio_match_one_process(tmp_path):
    # block masks are drawn from the data-set indices: a sample gets the same rectangles on either rank
    flags = [*FLAGS, "--mask-strategy", "block", "--mask-ratio", "0.4", "--mask-ratio-end", "0.9", "--epochs", "1"]
    train(parse_args(["--output-dir", str(tmp_path / "single"), "--batch-size", "8", *flags]))
    torchrun(tmp_path / "ddp", "--batch-size", "4", *flags)
    _compare(tmp_path / "single", tmp_path / "ddp")


def test_ddp_trains_with_per_sample_ratios(tmp_path):
    # the ragged forward is reached through the DDP wrapper; each rank's loss is its own masked mean, so the run
    # is not the one-process run, but it trains and stays finite
    torchrun(tmp_path / "ddp", "--batch-size", "4", *FLAGS, "--mask-ratio-range", "0.5", "0.9")
    state = ckpt.load_checkpoint(str(tmp_path / "ddp" / "checkpoint.pt"))
    assert state["step"] == 3 and state["world_size"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    losses = [r["loss"] for r in read_metrics(str(tmp_path / "ddp" / "metrics.jsonl"))]
    assert len(losses) == 3 and all(0 < x < 10 for x in losses)


def test_ddp_simmim_recipe_matches_one_process(tmp_path):
    # SimMIM's recipe under accumulation: stochastic depth drawn per sample index, the running gradient clipped
    # after every micro-batch (each reduced over the ranks first), timm's multistep schedule
    flags = ["--model", "simmim_vit_micro_patch4", "--data", "synthetic", "--epochs", "1", "--max-steps", "3",
             "--log-every", "1", "--no-eval", "--num-workers", "0", "--accum-iter", "2", "--clip-grad", "0.05",
             "--drop-path", "0.5"]
    train(parse_args(["--output-dir", str(tmp_path / "single"), "--batch-size", "4", *flags]))
    torchrun(tmp_path / "ddp", "--batch-size", "2", *flags)
    _compare(tmp_path / "single", tmp_path / "ddp")
