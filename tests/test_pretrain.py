"""End-to-end runs of ``python -m mimfast.pretrain`` on CPU: artifacts, learning, exact resume, surviving kills,
and clear errors for bad input. Models are tiny and runs a few steps long."""

import functools
import json
import os
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from mimfast.pretrain import main
from mimfast.train import checkpoint as ckpt
from mimfast.train import objectives
from mimfast.train.config import parse_args
from mimfast.train.engine import train
from mimfast.train.metrics import read_metrics
from mimfast.train.visualize import DPI


@pytest.fixture(autouse=True)
def nano_models(monkeypatch):
    """Smaller-than-micro models, registered for the tests only."""
    monkeypatch.setitem(objectives.MICRO_MODELS, "mae_vit_nano_patch4", functools.partial(
        objectives._mae_micro, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32, decoder_depth=1,
        decoder_num_heads=2))
    monkeypatch.setitem(objectives.MICRO_MODELS, "simmim_vit_nano_patch4", functools.partial(
        objectives._simmim_micro, embed_dim=32, depth=1, num_heads=2))
    monkeypatch.setitem(objectives.MICRO_MODELS, "videomae_vit_nano_patch4", functools.partial(
        objectives._videomae_micro, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
        decoder_num_heads=2))


def run(tmp, *flags):
    return train(parse_args(["--output-dir", str(tmp), *flags]))


def model_state(out_dir):
    return ckpt.load_checkpoint(os.path.join(out_dir, "checkpoint.pt"))["model"]


def test_demo_style_run_writes_artifacts_and_beats_the_trivial_predictor(tmp_path):
    out = tmp_path / "run"
    result = run(out, "--model", "mae_vit_nano_patch4", "--epochs", "2", "--batch-size", "32", "--blr", "8e-3",
                 "--warmup-epochs", "1", "--log-every", "10")
    for name in ("checkpoint.pt", "config.json", "metrics.jsonl", "loss_curve.png", "reconstructions.png",
                 "eval.json"):
        assert (out / name).is_file(), name
    state = ckpt.load_checkpoint(str(out / "checkpoint.pt"))
    assert state["step"] == result.step == 88 and state["epoch"] == 2
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "config"} <= set(state)
    assert json.loads((out / "config.json").read_text())["model"] == "mae_vit_nano_patch4"
    records = read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in records][-2:] == [80, 88]
    for r in records:
        assert {"step", "epoch", "loss", "lr", "img_per_s", "peak_mem_mb"} <= set(r)
        assert np.isfinite(r["loss"]) and r["img_per_s"] > 0
    assert "mfu" not in records[0]  # no GPU, no MFU
    assert records[-1]["loss"] < records[0]["loss"]
    with Image.open(out / "loss_curve.png") as img:
        assert img.size == (640, 400)
        assert np.asarray(img.convert("L")).std() > 10
    with Image.open(out / "reconstructions.png") as img:
        assert img.size == (round((1.0 + 1.3 * 8) * DPI), round((0.5 + 1.3 * 3) * DPI))
        assert np.asarray(img.convert("L")).std() > 10
    ev = json.loads((out / "eval.json").read_text())
    assert ev["split"] == "held-out" and ev["images"] == 359
    # the model learned something the per-patch mean cannot: the held-out loss is clearly below it
    assert ev["reconstruction_loss"] < 0.97 * ev["trivial_loss"]
    for name in ("trained", "random_init"):
        for metric in ("knn_top1", "linear_probe_top1"):
            assert 0.1 < ev["probes"][name][metric] <= 1.0


@pytest.mark.parametrize("masking", [
    [],
    ["--mask-strategy", "block", "--mask-ratio", "0.3", "--mask-ratio-end", "0.9"],  # K moves every few steps
    ["--mask-ratio-range", "0.5", "0.9"],  # ragged: packed encoder
], ids=["random", "block-progressive", "per-sample-ratios"])
def test_resume_reproduces_an_uninterrupted_run(tmp_path, masking):
    flags = ["--model", "mae_vit_nano_patch4", "--epochs", "1", "--batch-size", "8", "--accum-iter", "2",
             "--log-every", "1", "--no-eval", "--clip-grad", "1.0", *masking]
    run(tmp_path / "straight", *flags, "--max-steps", "6")
    run(tmp_path / "split", *flags, "--max-steps", "3")
    assert ckpt.load_checkpoint(str(tmp_path / "split" / "checkpoint.pt"))["step"] == 3
    run(tmp_path / "split", *flags, "--max-steps", "6", "--resume", "auto")
    a = read_metrics(str(tmp_path / "straight" / "metrics.jsonl"))
    b = read_metrics(str(tmp_path / "split" / "metrics.jsonl"))
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    sa, sb = model_state(tmp_path / "straight"), model_state(tmp_path / "split")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_in_the_middle_of_a_logging_window_repeats_its_records(tmp_path):
    # the checkpoint of step 7 carries the open window (steps 6 and 7): the resumed run's record of step 10 is the
    # mean over steps 6 to 10, as the uninterrupted run's, and no record of step 7 appears
    flags = ["--model", "mae_vit_nano_patch4", "--epochs", "1", "--batch-size", "8", "--log-every", "5",
             "--no-eval"]
    run(tmp_path / "straight", *flags, "--max-steps", "10")
    run(tmp_path / "split", *flags, "--max-steps", "7")
    assert ckpt.load_checkpoint(str(tmp_path / "split" / "checkpoint.pt"))["window"]["steps"] == 2
    # a resume with nothing left to train keeps the record of the last step
    run(tmp_path / "split", *flags, "--max-steps", "7", "--resume", "auto")
    assert [r["step"] for r in read_metrics(str(tmp_path / "split" / "metrics.jsonl"))] == [5, 7]
    run(tmp_path / "split", *flags, "--max-steps", "10", "--resume", "auto")
    a = read_metrics(str(tmp_path / "straight" / "metrics.jsonl"))
    b = read_metrics(str(tmp_path / "split" / "metrics.jsonl"))
    assert [r["step"] for r in a] == [r["step"] for r in b] == [5, 10]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_weights_gone_nan_never_replace_the_last_good_checkpoint(tmp_path):
    # an absurd learning rate: the weights blow up between two logging steps, where only a save would see them
    out = tmp_path / "run"
    flags = ["--model", "mae_vit_nano_patch4", "--epochs", "1", "--batch-size", "8", "--max-steps", "8",
             "--no-eval", "--lr", "1e6", "--warmup-epochs", "0", "--save-every", "1", "--log-every", "4"]
    with pytest.raises(FloatingPointError, match="checkpoint of step (\\d+) is kept|no checkpoint was written"):
        run(out, *flags)
    if (out / "checkpoint.pt").exists():
        state = ckpt.load_checkpoint(str(out / "checkpoint.pt"))
        assert all(torch.isfinite(v).all() for v in state["model"].values())
        assert state["step"] < 4 and np.isfinite(state["window"]["loss_sum"])


def test_exit_status_says_a_signal_stopped_the_run(tmp_path, monkeypatch):
    from mimfast import pretrain
    from mimfast.train.engine import RunResult

    assert [pretrain.exit_status(s) for s in (None, "SIGINT", "SIGTERM", "signal on another rank")] == \
        [0, 130, 143, 1]
    monkeypatch.setattr("mimfast.train.engine.train",
                        lambda config: RunResult(str(tmp_path), 3, "SIGTERM", None))
    with pytest.raises(SystemExit) as stopped:
        main(["--output-dir", str(tmp_path / "run")])
    assert stopped.value.code == 143
    monkeypatch.setattr("mimfast.train.engine.train", lambda config: RunResult(str(tmp_path), 3, None, None))
    main(["--output-dir", str(tmp_path / "run")])  # a finished run returns normally: status 0


def test_resume_with_more_epochs_follows_the_new_schedule(tmp_path):
    flags = ["--model", "mae_vit_nano_patch4", "--batch-size", "4", "--log-every", "1", "--no-eval",
             "--warmup-epochs", "0"]
    run(tmp_path / "fresh", *flags, "--epochs", "3", "--max-steps", "3")
    run(tmp_path / "longer", *flags, "--epochs", "1", "--max-steps", "2")
    run(tmp_path / "longer", *flags, "--epochs", "3", "--max-steps", "3", "--resume", "auto")
    fresh = read_metrics(str(tmp_path / "fresh" / "metrics.jsonl"))
    longer = read_metrics(str(tmp_path / "longer" / "metrics.jsonl"))
    # the logged rate is the one each step used: the first step of a cosine without warm-up runs at the full rate
    assert fresh[0]["lr"] == pytest.approx(4e-3 * 4 / 256)
    assert longer[2]["step"] == 3 and longer[2]["lr"] == fresh[2]["lr"]
    assert longer[1]["lr"] != fresh[1]["lr"]  # the first two steps ran on the one-epoch schedule


def test_resume_keeps_this_versions_recipe_and_says_what_changed(tmp_path, capsys):
    flags = ["--model", "simmim_vit_nano_patch4", "--data", "synthetic", "--epochs", "1", "--batch-size", "4",
             "--no-eval", "--log-every", "1"]
    run(tmp_path / "run", *flags, "--max-steps", "1")
    # a checkpoint of an earlier recipe: other betas and decay, another peak rate
    path = tmp_path / "run" / "checkpoint.pt"
    state = ckpt.load_checkpoint(str(path))
    for group in state["optimizer"]["param_groups"]:
        group["betas"], group["weight_decay"] = (0.9, 0.95), 0.05
    state["scheduler"]["lr"] *= 2
    ckpt.atomic_save(state, str(path))
    capsys.readouterr()
    run(tmp_path / "run", *flags, "--max-steps", "2", "--resume", "auto")
    out = capsys.readouterr().out
    assert "other betas and weight_decay" in out and "schedule differs from the checkpoint's (lr" in out
    resumed = ckpt.load_checkpoint(str(path))
    assert [tuple(g["betas"]) for g in resumed["optimizer"]["param_groups"]] == [(0.9, 0.999)] * 2
    assert [g["weight_decay"] for g in resumed["optimizer"]["param_groups"]] == [0.05, 0.0]
    # a rate below the recipe's floors lowers them instead of failing
    run(tmp_path / "small", *flags, "--max-steps", "1", "--lr", "1e-9")  # warm-up start 3.9e-9 at batch 4
    schedule = ckpt.load_checkpoint(str(tmp_path / "small" / "checkpoint.pt"))["scheduler"]
    assert schedule["lr"] == schedule["warmup_lr"] == 1e-9


def test_killed_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    out = tmp_path / "run"
    flags = ["--model", "mae_vit_nano_patch4", "--epochs", "1", "--batch-size", "8", "--save-every", "1",
             "--no-eval", "--log-every", "1"]
    real_save = torch.save
    calls = []

    def save_then_die(obj, f, *args, **kwargs):
        calls.append(obj["step"])
        if len(calls) == 3:
            f.write(b"PK\x03\x04 the first bytes of a zip")
            raise KeyboardInterrupt("killed mid-write")
        real_save(obj, f, *args, **kwargs)

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(ckpt.torch, "save", save_then_die)
        run(out, *flags, "--max-steps", "5")
    assert calls == [1, 2, 3]
    assert ckpt.load_checkpoint(str(out / "checkpoint.pt"))["step"] == 2
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "config.json", "metrics.jsonl"]
    result = run(out, *flags, "--max-steps", "5", "--resume", "auto")
    assert result.step == 5
    assert [r["step"] for r in read_metrics(str(out / "metrics.jsonl"))] == [1, 2, 3, 4, 5]


def test_sigterm_saves_and_stops_cleanly(tmp_path):
    out = tmp_path / "run"
    metrics = out / "metrics.jsonl"

    done = threading.Event()

    def send_sigterm_after_first_log():
        # never signals a process whose run already ended (the test process itself would die)
        while not done.is_set():
            if metrics.exists() and metrics.read_text().strip():
                os.kill(os.getpid(), 15)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=send_sigterm_after_first_log, daemon=True)
    thread.start()
    try:
        result = run(out, "--model", "mae_vit_nano_patch4", "--epochs", "50", "--batch-size", "8", "--log-every",
                     "1")
    finally:
        done.set()
        thread.join()
    assert result.stopped_by == "SIGTERM" and result.eval is None
    assert 1 <= result.step < 50 * (1438 // 8)
    assert ckpt.load_checkpoint(str(out / "checkpoint.pt"))["step"] == result.step
    assert (out / "loss_curve.png").is_file()


def test_backends_and_grad_checkpointing_give_the_same_run(tmp_path):
    flags = ["--model", "mae_vit_nano_patch4", "--epochs", "1", "--batch-size", "8", "--max-steps", "2",
             "--log-every", "1", "--no-eval"]
    run(tmp_path / "ref", *flags, "--backend", "reference")
    run(tmp_path / "torch", *flags, "--backend", "torch", "--grad-checkpointing")
    a = [r["loss"] for r in read_metrics(str(tmp_path / "ref" / "metrics.jsonl"))]
    b = [r["loss"] for r in read_metrics(str(tmp_path / "torch" / "metrics.jsonl"))]
    assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    sa, sb = model_state(tmp_path / "ref"), model_state(tmp_path / "torch")
    assert all(torch.allclose(sa[k], sb[k], rtol=1e-4, atol=1e-5) for k in sa)


def _save_clips(root, count):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        np.save(root / f"clip{i}.npy", rng.integers(0, 256, (8, 36, 40, 3), dtype=np.uint8))


def test_simmim_and_videomae_runs(tmp_path):
    r = run(tmp_path / "simmim", "--model", "simmim_vit_nano_patch4", "--data", "synthetic", "--epochs", "1",
            "--max-steps", "2", "--batch-size", "4", "--eval-max-images", "8")
    assert r.step == 2 and r.eval["method"] == "simmim" and r.eval["split"] == "train"
    assert r.eval["probes"] is None and (tmp_path / "simmim" / "reconstructions.png").is_file()
    assert np.isfinite(r.eval["reconstruction_loss"]) and np.isfinite(r.eval["trivial_loss"])
    # SimMIM's ViT recipe: AdamW betas (0.9, 0.999), rates per 512 images, warm-up from 5e-7 per 512, timm's
    # multistep schedule, clip 5
    state = ckpt.load_checkpoint(str(tmp_path / "simmim" / "checkpoint.pt"))
    assert tuple(state["optimizer"]["param_groups"][0]["betas"]) == (0.9, 0.999)
    assert state["scheduler"]["lr"] == pytest.approx(1e-4 * 4 / 512)
    assert state["scheduler"]["warmup_lr"] == pytest.approx(5e-7 * 4 / 512)
    assert state["scheduler"]["kind"] == "timm_multistep"
    assert json.loads((tmp_path / "simmim" / "config.json").read_text())["clip_grad"] == 5.0
    _save_clips(tmp_path / "clips", 6)
    r = run(tmp_path / "video", "--model", "videomae_vit_nano_patch4", "--data", str(tmp_path / "clips"),
            "--epochs", "1", "--batch-size", "3", "--num-workers", "0", "--sampling-rate", "2")
    assert r.step == 2 and r.eval["method"] == "videomae" and r.eval["mask_ratio"] == 0.9
    # per-cube normalised targets: the mean predictor scores about 1
    assert 0.8 < r.eval["trivial_loss"] < 1.1
    with Image.open(tmp_path / "video" / "reconstructions.png") as img:
        assert img.size[0] > img.size[1]


def test_mask_strategies_run_and_report(tmp_path):
    r = run(tmp_path / "importance", "--model", "mae_vit_nano_patch4", "--epochs", "1", "--max-steps", "3",
            "--batch-size", "8", "--log-every", "1", "--eval-max-images", "16", "--mask-strategy", "importance",
            "--mask-ratio", "0.6", "--mask-ratio-end", "0.8", "--mask-schedule", "cosine")
    assert (r.eval["mask_strategy"], r.eval["mask_ratio"]) == ("importance", 0.8)
    ratios = [m["mask_ratio"] for m in read_metrics(str(tmp_path / "importance" / "metrics.jsonl"))]
    assert ratios[0] == 0.6 and ratios == sorted(ratios) and ratios[-1] < 0.61  # step 2 of 179
    assert (tmp_path / "importance" / "reconstructions.png").is_file()
    r = run(tmp_path / "block", "--model", "simmim_vit_nano_patch4", "--data", "synthetic", "--epochs", "1",
            "--max-steps", "2", "--batch-size", "4", "--eval-max-images", "8", "--mask-strategy", "block",
            "--block-min-patches", "4")
    assert r.step == 2 and r.eval["mask_strategy"] == "block" and np.isfinite(r.eval["reconstruction_loss"])


def _error_of(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_clear_errors_for_bad_input(tmp_path, capsys):
    base = ["--model", "mae_vit_nano_patch4", "--epochs", "1", "--batch-size", "4", "--no-eval", "--output-dir"]
    assert "does not exist" in _error_of(capsys, *base, str(tmp_path / "o1"), "--data", str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    assert "no image files" in _error_of(capsys, *base, str(tmp_path / "o2"), "--data", str(tmp_path / "empty"))
    assert "not divisible by the patch size" in _error_of(capsys, *base, str(tmp_path / "o3"), "--data",
                                                          "synthetic", "--input-size", "30")
    assert "demo digits are 1-channel 32x32" in _error_of(capsys, *base, str(tmp_path / "o4"), "--input-size", "48")
    err = _error_of(capsys, *base, str(tmp_path / "o5"), "--batch-size", "2000")
    assert "cannot fill one optimizer step" in err
    assert "unknown model" in _error_of(capsys, *base, str(tmp_path / "o6"), "--model", "mae_vit_gigantic_patch3")
    assert "is not a device" in _error_of(capsys, *base, str(tmp_path / "o7"), "--device", "foo")
    if not torch.cuda.is_available():
        assert "CUDA is not available" in _error_of(capsys, *base, str(tmp_path / "o8"), "--device", "cuda")
    assert "demo data are still images" in _error_of(capsys, *base, str(tmp_path / "o9"), "--model",
                                                     "videomae_vit_nano_patch4")
    assert "--min-lr 5 is above the learning rate" in _error_of(capsys, *base, str(tmp_path / "o10"), "--min-lr", "5")
    # a checkpoint from another model
    run(tmp_path / "mae", "--model", "mae_vit_nano_patch4", "--epochs", "1", "--max-steps", "1", "--batch-size", "4",
        "--no-eval")
    err = _error_of(capsys, "--model", "mae_vit_micro_patch4", "--epochs", "1", "--batch-size", "4", "--no-eval",
                    "--output-dir", str(tmp_path / "mae"), "--resume", "auto")
    assert "written for model 'mae_vit_nano_patch4'" in err
    assert json.loads((tmp_path / "mae" / "config.json").read_text())["model"] == "mae_vit_nano_patch4"  # untouched
    err = _error_of(capsys, "--model", "simmim_vit_nano_patch4", "--data", "synthetic", "--epochs", "1",
                    "--batch-size", "4", "--no-eval", "--output-dir", str(tmp_path / "s"), "--resume",
                    str(tmp_path / "mae" / "checkpoint.pt"))
    assert "written for model" in err and "simmim_vit_nano_patch4" in err


def test_more_set_up_problems_get_one_line_errors(tmp_path, capsys, monkeypatch):
    base = ["--model", "mae_vit_nano_patch4", "--epochs", "1", "--batch-size", "4", "--no-eval", "--output-dir"]
    (tmp_path / "a_file").write_text("not a folder")
    assert "cannot write the run folder" in _error_of(capsys, *base, str(tmp_path / "a_file"))
    assert "cannot write the run folder" in _error_of(capsys, *base, str(tmp_path / "a_file" / "below"))
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    err = _error_of(capsys, *base, str(tmp_path / "o1"), "--resume", str(tmp_path / "notes.txt"))
    assert "cannot read checkpoint" in err and "weights_only" not in err and len(err.strip().splitlines()) == 1
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors: no Triton without the interpreter
    err = _error_of(capsys, *base, str(tmp_path / "o2"), "--backend", "triton")
    assert "--backend triton cannot run on cpu" in err
    assert not (tmp_path / "o2" / "metrics.jsonl").exists()


def test_runs_started_together_get_their_own_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("time.strftime", lambda *a: "20260101-000000")  # the same second
    flags = ["--model", "mae_vit_nano_patch4", "--epochs", "1", "--max-steps", "1", "--batch-size", "4", "--no-eval"]
    first, second = (train(parse_args(flags)) for _ in range(2))
    assert first.output_dir == "runs/mae_vit_nano_patch4-20260101-000000"
    assert second.output_dir == first.output_dir + "-2"
    assert all(os.path.isfile(os.path.join(r.output_dir, "checkpoint.pt")) for r in (first, second))
    # a start refused at set-up, or by its --resume file, leaves no empty folder behind
    with pytest.raises(ValueError):
        train(parse_args(flags + ["--input-size", "30", "--data", "synthetic"]))
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ckpt.CheckpointError):
        train(parse_args(flags + ["--resume", str(tmp_path / "notes.txt")]))
    assert sorted(os.listdir("runs")) == [os.path.basename(first.output_dir), os.path.basename(second.output_dir)]
    # a folder of runs that cannot be made is named as such
    os.rename("runs", "kept")
    open("runs", "w").close()
    with pytest.raises(ValueError, match="cannot create the folder of the runs"):
        train(parse_args(flags))


def test_resume_warns_about_a_changed_loss_or_clipping(tmp_path, capsys):
    flags = ["--model", "mae_vit_nano_patch4", "--epochs", "1", "--batch-size", "4", "--no-eval"]
    run(tmp_path / "run", *flags, "--max-steps", "1")
    capsys.readouterr()
    run(tmp_path / "run", *flags, "--max-steps", "2", "--resume", "auto", "--no-norm-pix-loss", "--clip-grad", "1")
    out = capsys.readouterr().out
    assert "--norm-pix-loss False" in out and "--clip-grad 1.0" in out


def test_a_fresh_run_never_overwrites_another_runs_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["--model", "mae_vit_nano_patch4", "--epochs", "1", "--batch-size", "4", "--no-eval", "--log-every", "1"]
    run(out, *flags, "--max-steps", "2")
    before = {name: (out / name).read_bytes() for name in ("checkpoint.pt", "config.json", "metrics.jsonl")}
    err = _error_of(capsys, *flags, "--max-steps", "1", "--blr", "1e-3", "--output-dir", str(out))
    assert "already holds a run's checkpoint" in err and "--resume auto" in err
    assert before == {name: (out / name).read_bytes() for name in before}
    # a folder whose run stopped before its first checkpoint starts a fresh log
    (out / "checkpoint.pt").unlink()
    run(out, *flags, "--max-steps", "1")
    assert [r["step"] for r in read_metrics(str(out / "metrics.jsonl"))] == [1]


def test_a_value_error_during_training_keeps_its_traceback(tmp_path, monkeypatch):
    # only set-up problems become one-line messages: an error inside a training step is a bug to be shown whole
    from mimfast.train.engine import Trainer

    def broken_step(self, it, epoch):
        raise ValueError("shape bug inside a step")

    monkeypatch.setattr(Trainer, "train_step", broken_step)
    with pytest.raises(ValueError, match="shape bug inside a step"):
        main(["--model", "mae_vit_nano_patch4", "--epochs", "1", "--batch-size", "4", "--no-eval", "--output-dir",
              str(tmp_path / "o")])


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    root = tmp_path / "imgs"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            arr = np.random.default_rng(i).integers(0, 256, (40, 44, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")
    (root / "a" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "b" / "empty.png").write_bytes(b"")
    r = run(tmp_path / "run", "--model", "mae_vit_nano_patch4", "--data", str(root), "--input-size", "16",
            "--epochs", "1", "--batch-size", "5", "--num-workers", "1", "--log-every", "1", "--eval-max-images", "4")
    assert r.step == 2
    records = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    assert records[-1]["skipped_files"] == 2


def test_unreadable_batches_neither_count_in_the_loss_nor_update(tmp_path, capsys, monkeypatch):
    updates = []
    step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: updates.append(1) or step(self, *a, **k))
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"{i}.png")
    for name in ("x.png", "y.png", "z.png"):
        (root / name).write_bytes(b"not an image")
    flags = ["--model", "mae_vit_nano_patch4", "--data", str(root), "--input-size", "16", "--epochs", "1",
             "--batch-size", "1", "--num-workers", "0", "--no-eval"]
    losses = {}
    for every in ("1", "6"):
        run(tmp_path / every, *flags, "--log-every", every)
        losses[every] = [r["loss"] for r in read_metrics(str(tmp_path / every / "metrics.jsonl"))]
    # step by step: three steps with a loss, three without; the 6-step window averages the three readable ones
    assert sum(v is None for v in losses["1"]) == 3 and len(losses["6"]) == 1
    assert len(updates) == 2 * 3  # an optimizer update for each readable step of the two runs
    assert losses["6"][0] == pytest.approx(np.mean([v for v in losses["1"] if v is not None]), rel=1e-5)
    # a folder of which nothing can be read stops with a one-line error, not a run of zero losses
    for f in root.glob("*.png"):
        f.write_bytes(b"not an image")
    err = _error_of(capsys, *flags, "--output-dir", str(tmp_path / "none"))
    assert "no file of the training data could be read in epoch 1" in err


def _colour_folder(root, classes, per_class=4):
    """Solid-colour images, one colour per class name (so a probe separates them exactly)."""
    colours = {"a_red": (220, 30, 30), "b_green": (30, 200, 40), "c_blue": (40, 50, 230)}
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((20, 20, 3), colours[cls], dtype=np.uint8)).save(root / cls / f"{i}.png")


def test_probes_label_the_held_out_split_with_the_training_classes(tmp_path):
    # val/ lacks a class: its images keep the training split's labels, so the probes still read them right
    _colour_folder(tmp_path / "data" / "train", ("a_red", "b_green", "c_blue"))
    _colour_folder(tmp_path / "data" / "val", ("b_green", "c_blue"))
    r = run(tmp_path / "run", "--model", "mae_vit_nano_patch4", "--data", str(tmp_path / "data"), "--input-size",
            "16", "--epochs", "1", "--batch-size", "4", "--num-workers", "0")
    assert r.eval["probes"]["trained"]["knn_top1"] == 1.0
    assert r.eval["probes"]["random_init"]["knn_top1"] == 1.0


def test_probes_with_one_held_out_class_and_eval_without_readable_images(tmp_path):
    data = tmp_path / "data"
    _colour_folder(data / "train", ("a_red", "b_green", "c_blue"))
    _colour_folder(data / "val", ("b_green",))
    flags = ["--model", "mae_vit_nano_patch4", "--input-size", "16", "--epochs", "1", "--batch-size", "4",
             "--num-workers", "0"]
    r = run(tmp_path / "run", "--data", str(data), *flags)
    assert r.eval["probes"]["trained"]["knn_top1"] == 1.0
    for f in (data / "val" / "b_green").iterdir():
        f.write_bytes(b"not an image")
    r = run(tmp_path / "unreadable", "--data", str(data), *flags)
    assert r.eval["images"] == 0 and r.eval["reconstruction_loss"] is None and r.eval["probes"] is None
    assert "no readable image" in r.eval["probes_skipped"]
    assert json.loads((tmp_path / "unreadable" / "eval.json").read_text())["reconstruction_loss"] is None


def test_unlabelled_training_images_skip_the_probes(tmp_path):
    data = tmp_path / "data"
    _colour_folder(data / "val", ("a_red", "b_green"))
    (data / "train").mkdir()
    for i in range(8):
        Image.fromarray(np.full((20, 20, 3), 10 * i, dtype=np.uint8)).save(data / "train" / f"{i}.png")
    r = run(tmp_path / "run", "--model", "mae_vit_nano_patch4", "--data", str(data), "--input-size", "16",
            "--epochs", "1", "--batch-size", "4", "--num-workers", "0")
    assert r.eval["probes"] is None and "labelled" in r.eval["probes_skipped"]
    assert os.path.isfile(tmp_path / "run" / "eval.json")


def test_resume_auto_without_output_dir_continues_the_newest_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags = ["--model", "mae_vit_nano_patch4", "--epochs", "1", "--batch-size", "8", "--no-eval"]
    first = train(parse_args([*flags, "--max-steps", "2"]))
    assert first.output_dir.startswith("runs/mae_vit_nano_patch4-") and first.step == 2
    again = train(parse_args([*flags, "--max-steps", "3", "--resume", "auto"]))
    assert again.output_dir == first.output_dir and again.step == 3


@pytest.mark.slow
@pytest.mark.parametrize("masking", [[], ["--mask-ratio-range", "0.5", "0.9", "--max-steps", "10"],
                                     ["--mask-ratio", "0.5", "--mask-ratio-end", "0.9", "--max-steps", "12"]],
                         ids=["random", "per-sample-ratios", "progressive"])
def test_compiled_run_matches_eager(tmp_path, masking):
    # a moving or per-sample ratio compiles the blocks (a compiled whole model would meet a new ratio constant at
    # every step and give up recompiling after 8): packed lengths turn dynamic after the first recompile
    import torch._dynamo.utils

    flags = ["--model", "mae_vit_nano_patch4", "--epochs", "1", "--batch-size", "8", "--max-steps", "3",
             "--log-every", "1", "--no-eval", *masking]
    run(tmp_path / "eager", *flags)
    torch._dynamo.reset()
    run(tmp_path / "compiled", *flags, "--compile")
    assert not torch._dynamo.utils.counters["stats"].get("recompile_limit_hit", 0)
    a = [r["loss"] for r in read_metrics(str(tmp_path / "eager" / "metrics.jsonl"))]
    b = [r["loss"] for r in read_metrics(str(tmp_path / "compiled" / "metrics.jsonl"))]
    assert b == pytest.approx(a, rel=1e-4)


def test_probes_skipped_when_the_encoder_features_are_not_finite(tmp_path, monkeypatch):
    from mimfast.train.engine import Trainer

    _colour_folder(tmp_path / "data" / "train", ("a_red", "b_green"))
    _colour_folder(tmp_path / "data" / "val", ("a_red", "b_green"))
    features = Trainer._features

    def diverged(self, model, data, limit):
        x, y = features(self, model, data, limit)
        return x.fill_(float("nan")), y

    monkeypatch.setattr(Trainer, "_features", diverged)
    r = run(tmp_path / "run", "--model", "mae_vit_nano_patch4", "--data", str(tmp_path / "data"), "--input-size",
            "16", "--epochs", "1", "--batch-size", "4", "--num-workers", "0")
    assert r.eval["probes"] is None and "features are not finite" in r.eval["probes_skipped"]


@pytest.mark.parametrize("model, per_step", [("simmim_vit_nano_patch4", 3), ("mae_vit_nano_patch4", 1)])
def test_simmim_clips_after_every_micro_batch(tmp_path, monkeypatch, model, per_step):
    # SimMIM's loop clips the accumulating gradient after each backward; MAE's clips once, before the update
    calls = []
    clip = torch.nn.utils.clip_grad_norm_

    def counting(params, max_norm, *args, **kwargs):
        calls.append(max_norm)
        return clip(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", counting)
    r = run(tmp_path / "run", "--model", model, "--data", "synthetic", "--epochs", "1", "--max-steps", "2",
            "--batch-size", "2", "--accum-iter", "3", "--clip-grad", "0.5", "--no-eval")
    assert r.step == 2 and calls == [0.5] * (2 * per_step)
