"""Pieces of the training engine on their own: mask noise, schedule, parameter groups, checkpoints, config."""

import dataclasses
import math
import os

import numpy as np
import pytest
import torch

from mimfast.train import checkpoint as ckpt
from mimfast.train.config import PretrainConfig, parse_args, resolve
from mimfast.train.masks import hash_noise, mae_noise, simmim_mask, tube_mask
from mimfast.train.optim import LRSchedule, param_groups, scaled_lr


def test_hash_noise_is_a_function_of_seed_epoch_index_token():
    idx = torch.tensor([5, 17, 3, 5])
    a = hash_noise(0, 2, idx, 196)
    assert a.shape == (4, 196) and a.dtype == torch.float32
    assert torch.equal(a[0], a[3])  # same sample, same noise
    # the same sample in another batch / position / split gives the same row
    b = hash_noise(0, 2, torch.tensor([3]), 196)
    assert torch.equal(a[2], b[0])
    assert not torch.equal(hash_noise(1, 2, idx, 196), a)
    assert not torch.equal(hash_noise(0, 3, idx, 196), a)
    assert not torch.equal(a[0], a[1])
    assert float(a.min()) >= 0.0 and float(a.max()) < 1.0


def test_hash_noise_is_uniform():
    x = hash_noise(7, 0, torch.arange(2000), 196).flatten()
    counts = torch.histc(x, bins=20, min=0, max=1)
    expected = x.numel() / 20
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 45  # 19 dof: p ~ 1e-3
    # the rank of a fixed token is uniform over samples too (no token is favoured by the mask)
    kept = torch.argsort(hash_noise(7, 0, torch.arange(4000), 16), dim=1)[:, :4]
    freq = torch.bincount(kept.flatten(), minlength=16).double()
    assert float(((freq - 1000) ** 2 / 1000).sum()) < 40  # 15 dof


def test_hash_noise_matches_a_python_integer_reference():
    def mix(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    seed, epoch, index, L = 12345, 3, 987654, 10
    key = mix(((seed * 0x9E3779B1) & 0xFFFFFFFF) ^ 0x6D696D66)
    key = mix(key ^ epoch)
    h = mix(index ^ key)
    expected = [(mix(mix(h ^ ((j * 0x85EBCA6B) & 0xFFFFFFFF)) ^ key) >> 8) / 2**24 for j in range(L)]
    got = hash_noise(seed, epoch, torch.tensor([index]), L)[0].double().tolist()
    assert got == expected


def test_simmim_and_tube_masks():
    idx = torch.arange(6)
    m = simmim_mask(0, 0, idx, input_size=64, mask_patch_size=16, model_patch_size=4, mask_ratio=0.6)
    assert m.shape == (6, 256) and m.dtype == torch.bool
    units = m.view(6, 4, 4, 4, 4)  # [N, unit row, 4, unit col, 4]
    per_unit = units.permute(0, 1, 3, 2, 4).reshape(6, 16, 16)
    assert bool(((per_unit.all(-1)) | (~per_unit).all(-1)).all())  # units masked whole
    assert per_unit.all(-1).sum(1).tolist() == [math.ceil(16 * 0.6)] * 6
    t = tube_mask(0, 0, idx, (4, 3, 3), 0.9)
    assert t.shape == (6, 36)
    spatial = t.view(6, 4, 9)
    assert bool((spatial == spatial[:, :1]).all())  # shared over time
    assert spatial[:, 0].sum(1).tolist() == [int(9 * 0.9)] * 6
    with pytest.raises(ValueError, match="divisible"):
        simmim_mask(0, 0, idx, input_size=60, mask_patch_size=16, model_patch_size=4, mask_ratio=0.6)


def test_mae_noise_gives_masks_independent_of_batch_split():
    from mimfast.ops import random_masking

    idx = torch.arange(8)
    whole = random_masking(8, 64, 0.75, noise=mae_noise(1, 0, idx, 64)).mask
    halves = torch.cat([random_masking(4, 64, 0.75, noise=mae_noise(1, 0, i, 64)).mask for i in idx.split(4)])
    assert torch.equal(whole, halves)


class _Capture:
    """Stands in for a model: returns the mask arguments it was called with."""

    def __call__(self, images, *args, **kwargs):
        return args, kwargs


def _objective(*flags):
    from mimfast.train.objectives import Objective, build_model

    config = resolve(parse_args(["--output-dir", "unused", *flags]))
    torch.manual_seed(0)
    model = build_model(config, 1)
    return Objective(config, model), model


def _kept_by_noise(noise, ratio):
    from mimfast.ops import random_masking

    return random_masking(noise.shape[0], noise.shape[1], ratio, noise=noise).mask


def test_engine_block_masks_are_beit_rectangles_of_each_data_set_index():
    from mimfast.ops import block_masking
    from mimfast.ops.random_masking import fold_seed

    objective, _ = _objective("--mask-strategy", "block", "--block-min-patches", "6", "--seed", "4")
    images = torch.randn(5, 1, 32, 32)
    idx = torch.tensor([17, 3, 900, 17, 5])
    args, kwargs = objective.forward(_Capture(), images, idx, epoch=2, step=0)
    assert kwargs["mask_ratio"] == 0.75
    mask = _kept_by_noise(kwargs["noise"], 0.75)
    for n, i in enumerate(idx.tolist()):
        one = block_masking(1, (8, 8), 48, 6, seed=fold_seed(4, 2), sample_offset=i).mask
        assert torch.equal(mask[n:n + 1], one)
    assert torch.equal(mask[0], mask[3]) and not torch.equal(mask[0], mask[1])
    # kept patches listed in ascending order, like mask_info_from_mask
    keep = torch.argsort(kwargs["noise"], dim=1)[:, :16]
    assert torch.equal(keep, keep.sort(1).values)
    # another epoch, other rectangles
    _, later = objective.forward(_Capture(), images, idx, epoch=3, step=0)
    assert not torch.equal(_kept_by_noise(later["noise"], 0.75), mask)

    simmim, _ = _objective("--model", "simmim_vit_micro_patch4", "--mask-strategy", "block")
    (m,), _ = simmim.forward(_Capture(), images, idx, epoch=0, step=0)
    assert m.dtype == torch.bool and m.sum(1).tolist() == [math.ceil(64 * 0.6)] * 5


@pytest.mark.parametrize("strategy", ["block", "importance"])
def test_engine_simmim_masks_cover_whole_mask_units(strategy):
    # 8-pixel units of 4-pixel patches: a 4 x 4 unit grid, ceil(16 * 0.6) = 10 units masked, each 2 x 2 patches
    from mimfast.ops import block_masking
    from mimfast.ops.random_masking import fold_seed

    block_flags = ["--block-min-patches", "2"] if strategy == "block" else []
    simmim, _ = _objective("--model", "simmim_vit_micro_patch4", "--mask-strategy", strategy, "--mask-patch-size",
                           "8", *block_flags, "--seed", "1")
    images = torch.randn(6, 1, 32, 32)
    (m,), _ = simmim.forward(_Capture(), images, torch.arange(6), epoch=0, step=0)
    units = m.view(6, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(6, 16, 4)
    assert bool((units.all(-1) | (~units).all(-1)).all())
    assert units.all(-1).sum(1).tolist() == [10] * 6
    if strategy == "block":
        want = block_masking(6, (4, 4), 10, 2, seed=fold_seed(1, 0)).mask.bool()
        assert torch.equal(units.all(-1), want)


def test_engine_importance_masks_keep_textured_patches():
    objective, _ = _objective("--mask-strategy", "importance", "--mask-ratio", "0.75")
    images = torch.zeros(64, 1, 32, 32)
    images[:, :, :, 16:] = torch.randn(64, 1, 32, 16)  # right half textured: 32 of 64 patches
    idx = torch.arange(64)
    _, kwargs = objective.forward(_Capture(), images, idx, epoch=0, step=0)
    mask = _kept_by_noise(kwargs["noise"], 0.75).view(64, 8, 8)
    assert bool((mask[:, :, :4] == 1).all())  # flat patches never kept while textured ones are left
    kept_cols = (1 - mask).sum((0, 1))[4:]
    assert bool((kept_cols > 0).all())  # every textured column is sometimes kept
    assert len({tuple(r.flatten().tolist()) for r in mask}) == 64
    # fewer textured patches than K: the flat ones complete the count
    _, few = objective.forward(_Capture(), images[:4] * 0, idx[:4], epoch=0, step=0)
    assert _kept_by_noise(few["noise"], 0.75).sum(1).tolist() == [48.0] * 4


def test_engine_per_sample_ratios_are_host_arrays_of_each_index():
    objective, _ = _objective("--mask-ratio-range", "0.6", "0.9")
    images = torch.randn(6, 1, 32, 32)
    idx = torch.tensor([8, 1, 8, 40, 2, 3])
    _, kwargs = objective.forward(_Capture(), images, idx, epoch=1, step=5)
    ratios = kwargs["mask_ratio"]
    # a NumPy array: the device-moving of DDP / FSDP2 leaves it on the host
    assert isinstance(ratios, np.ndarray) and ratios.dtype == np.float64 and ratios.shape == (6,)
    from torch.distributed.utils import _to_kwargs

    moved = _to_kwargs((), {"mask_ratio": ratios, "noise": torch.zeros(1)}, torch.device("meta"), False)[1][0]
    assert moved["mask_ratio"] is ratios and moved["noise"].device.type == "meta"
    assert bool(((ratios >= 0.6) & (ratios <= 0.9)).all()) and ratios[0] == ratios[2]
    assert len(set(ratios.tolist())) == 5
    many = objective.forward(_Capture(), torch.randn(4000, 1, 32, 32), torch.arange(4000), epoch=1, step=0)[1]
    assert abs(float(many["mask_ratio"].mean()) - 0.75) < 0.01  # uniform on [0.6, 0.9]
    # evaluation masks every sample at --mask-ratio
    assert objective.forward(_Capture(), images, idx, epoch=1, step=None)[1]["mask_ratio"] == 0.75


def test_engine_progressive_ratio():
    objective, _ = _objective("--mask-ratio", "0.5", "--mask-ratio-end", "0.9", "--mask-schedule", "linear")
    objective.total_steps = 100
    assert [objective.ratio_at(s) for s in (0, 50, 100, 150)] == pytest.approx([0.5, 0.7, 0.9, 0.9])
    assert objective.ratio_at(None) == pytest.approx(0.9)
    images = torch.randn(2, 1, 32, 32)
    assert objective.forward(_Capture(), images, torch.arange(2), 0, step=25)[1]["mask_ratio"] == pytest.approx(0.6)
    video, _ = _objective("--model", "videomae_vit_micro_patch4", "--mask-ratio", "0.5", "--mask-ratio-end", "0.8")
    video.total_steps = 10
    for step, ratio in ((0, 0.5), (10, 0.8)):
        (info,), _ = video.forward(_Capture(), torch.randn(2, 1, 4, 32, 32), torch.arange(2), 0, step=step)
        assert info.ids_keep.shape[1] == 2 * (64 - int(64 * ratio))
    with pytest.raises(ValueError, match="mask-ratio-end 0.01 masks no token"):
        _objective("--model", "videomae_vit_micro_patch4", "--mask-ratio-end", "0.01")


def test_masking_flag_checks():
    for flags, message in (
        (["--model", "videomae_vit_micro_patch4", "--mask-strategy", "block"], "videomae masks tubes"),
        (["--model", "simmim_vit_micro_patch4", "--mask-ratio-range", "0.5", "0.7"],
         "needs --method mae with --mask-strategy random"),
        (["--mask-strategy", "block", "--mask-ratio-range", "0.5", "0.7"],
         "needs --method mae with --mask-strategy random"),
        (["--mask-ratio-range", "0.5", "0.7", "--mask-ratio-end", "0.8"], "cannot be combined"),
        (["--mask-ratio-range", "0.8", "0.7"], "LOW <= HIGH"),
        (["--mask-ratio-end", "1.0"], "mask-ratio-end"),
        (["--block-min-patches", "0"], "block-min-patches"),
        (["--importance-temperature", "0"], "importance-temperature"),
        (["--mask-schedule", "cosine"], "--mask-ratio-end, which is not given"),
        (["--block-min-patches", "4"], "block only"),
        (["--mask-strategy", "block", "--importance-temperature", "2"], "importance only"),
        # the default values given explicitly are refused as well: they would be ignored all the same
        (["--mask-schedule", "linear"], "--mask-ratio-end, which is not given"),
        (["--block-min-patches", "16"], "block only"),
        (["--mask-strategy", "block", "--importance-temperature", "1"], "importance only"),
        (["--mask-ratio", "0"], "nothing is masked"),
        (["--mask-ratio", "0", "--mask-ratio-end", "0"], "nothing is masked"),
        (["--mask-ratio-range", "0", "0"], "nothing is masked"),
        (["--num-frames", "8"], "videomae only"),
        (["--sampling-rate", "4"], "videomae only"),
        (["--mask-patch-size", "8"], "simmim only"),
        (["--drop-path", "0.1"], "simmim only"),
        (["--model", "simmim_vit_base_patch16", "--drop-path", "1"], "--drop-path must be in"),
        (["--model", "mae_vit_base_patch16", "--method", "simmim"], "does not train model mae_vit_base_patch16"),
        (["--weight-decay", "-1"], "--weight-decay"),
        (["--min-lr=-1e-5"], "--min-lr"),
        (["--clip-grad", "nan"], "--clip-grad"),
        (["--blr", "nan"], "learning rate"),
        (["--lr", "inf"], "learning rate"),
    ):
        with pytest.raises(ValueError, match=message):
            resolve(parse_args(flags))
    assert parse_args(["--mask-ratio-range", "0.5", "0.7"]).mask_ratio_range == (0.5, 0.7)
    plain = resolve(parse_args([]))
    assert (plain.mask_schedule, plain.block_min_patches, plain.importance_temperature) == (None, None, None)
    assert resolve(parse_args(["--mask-ratio-end", "0.9"])).mask_schedule == "linear"
    assert resolve(parse_args(["--mask-strategy", "block"])).block_min_patches == 16
    assert resolve(parse_args(["--mask-strategy", "importance"])).importance_temperature == 1.0
    assert resolve(PretrainConfig(mask_ratio_range=[0.5, 0.7])).mask_ratio_range == (0.5, 0.7)


def test_read_metrics_skips_a_line_cut_short(tmp_path):
    from mimfast.train.metrics import MetricsLog, read_metrics

    log = MetricsLog(str(tmp_path / "metrics.jsonl"))
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 1.0 / step})
    with open(log.path, "a") as f:
        f.write('{"step": 4, "lo')  # a process killed while writing
    assert [r["step"] for r in read_metrics(log.path)] == [1, 2, 3]
    log.truncate_after(2)
    assert [r["step"] for r in read_metrics(log.path)] == [1, 2]


def test_changed_settings_of_a_resumed_run():
    from mimfast.train.config import changed_settings

    config = resolve(parse_args(["--mask-ratio", "0.6"]))
    saved = config.to_dict()
    assert changed_settings(saved, config) == []
    # a checkpoint that recorded the block size of a random-mask run (as older ones did) is not a change
    assert changed_settings(dict(saved, block_min_patches=16, mask_schedule="linear"), config) == []
    assert changed_settings(dict(saved, mask_ratio=0.75, mask_strategy="block", block_min_patches=16), config) == [
        ("mask_ratio", 0.6, 0.75), ("mask_strategy", "random", "block")]
    ranged = resolve(parse_args(["--mask-ratio-range", "0.5", "0.7"]))
    assert changed_settings(dict(ranged.to_dict(), mask_ratio_range=[0.5, 0.7]), ranged) == []
    assert changed_settings(dict(ranged.to_dict(), mask_ratio_range=(0.5, 0.8)), ranged) == [
        ("mask_ratio_range", (0.5, 0.7), (0.5, 0.8))]
    block = resolve(parse_args(["--mask-strategy", "block"]))
    assert changed_settings(dict(block.to_dict(), block_min_patches=8), block) == [("block_min_patches", 16, 8)]
    # a checkpoint from before --drop-path trained without stochastic depth
    simmim = resolve(parse_args(["--model", "simmim_vit_micro_patch4", "--data", "synthetic"]))
    older = {k: v for k, v in simmim.to_dict().items() if k != "drop_path"}
    assert changed_settings(older, simmim) == [("drop_path", 0.1, None)]
    assert changed_settings({k: v for k, v in saved.items() if k != "drop_path"}, config) == []


def test_schedule_edge_cases_follow_the_published_loops():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    # np.linspace(0, lr, 1) == [0]: a one-step VideoMAE warm-up runs its first step at the start rate
    one = LRSchedule(opt, 1.0, 10, 1, kind="linspace_cosine")
    assert one.lr_at(0) == 0.0 and one.lr_at(1) == 1.0
    # a warm-up longer than the run: the run ends part-way up it (MAE: lr * step / warm-up steps)
    assert [LRSchedule(opt, 1.0, 4, 8).lr_at(s) for s in range(4)] == pytest.approx([0, 0.125, 0.25, 0.375])
    timm = LRSchedule(opt, 1.0, 4, 8, kind="timm_cosine")
    assert [timm.lr_at(s) for s in range(4)] == pytest.approx([0, 0, 0.125, 0.25])
    # SimMIM's milestone lands on a whole epoch: 7/8 of 100 epochs of 10 steps is epoch 88 (87.5 rounded)
    multistep = LRSchedule(opt, 1.0, 1000, 0, kind="timm_multistep", decay_at=(7 / 8,), epoch_steps=10)
    assert multistep.milestones == [880]


def test_noise_from_mask_keeps_the_unmasked_patches_in_order():
    from mimfast.train.masks import noise_from_mask

    rows = [torch.rand(196) < p for p in torch.linspace(0, 1, 50)]  # from nothing to everything masked
    for row in rows:
        noise = noise_from_mask(row[None])
        K = int((~row).sum())
        keep = torch.argsort(noise[0])[:K]
        assert torch.equal(keep, torch.nonzero(~row)[:, 0])


def test_importance_noise_is_finite_for_every_uniform(monkeypatch):
    from mimfast.train import masks

    top = torch.tensor([[0.0, 2.0**-24, 0.5, 1 - 2.0**-24]])  # every hash_noise value lies in [0, 1 - 2^-24]
    monkeypatch.setattr(masks, "hash_noise", lambda *a, **k: top)
    noise = masks.importance_noise(0, 0, torch.zeros(1, dtype=torch.long), torch.ones(1, 4), 1.0)
    assert torch.isfinite(noise).all()


def test_hash_noise_streams_are_independent_draws():
    idx = torch.arange(1000)
    a, b = hash_noise(3, 0, idx, 8), hash_noise(3, 0, idx, 8, stream=1)
    assert not torch.equal(a, b) and torch.equal(hash_noise(3, 0, idx, 8, stream=0), a)
    assert abs(float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])) < 0.03


def test_warmup_cosine_schedule():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = LRSchedule(opt, lr=0.1, total_steps=100, warmup_steps=10, min_lr=0.001)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(0.05)
    assert lrs[10] == pytest.approx(0.1)
    assert lrs[55] == pytest.approx(0.001 + 0.099 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.001)
    again = LRSchedule(opt, lr=0.1, total_steps=100, warmup_steps=10, min_lr=0.001)
    again.load_state_dict(sched.state_dict())
    assert again.last_step == 100 and again.current_lr() == sched.current_lr()
    # a resumed run given more epochs continues on its own, longer schedule (not at the old one's end, lr 0.001)
    longer = LRSchedule(opt, lr=0.1, total_steps=200, warmup_steps=10, min_lr=0.001)
    longer.load_state_dict(sched.state_dict())
    assert longer.current_lr() == pytest.approx(0.001 + 0.099 * 0.5 * (1 + math.cos(math.pi * 90 / 190)))
    assert opt.param_groups[0]["lr"] == longer.current_lr()
    assert scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)


def test_warm_up_starts_from_warmup_lr():
    p = torch.nn.Parameter(torch.zeros(1))
    sched = LRSchedule(torch.optim.SGD([p], lr=1.0), lr=1.0, total_steps=10, warmup_steps=4, min_lr=0.1,
                         warmup_lr=0.2)
    assert [sched.lr_at(s) for s in (0, 2, 4)] == pytest.approx([0.2, 0.6, 1.0])
    assert sched.lr_at(10) == pytest.approx(0.1)


def test_videomae_schedule_is_its_linspace_warm_up_then_cosine():
    # utils.cosine_scheduler: np.linspace(start, lr, W) (ending on lr), then the cosine over the remaining steps
    lr, floor, W, T = 2.0, 0.01, 5, 23
    published = np.concatenate([np.linspace(0.0, lr, W),
                                floor + 0.5 * (lr - floor) * (1 + np.cos(np.pi * np.arange(T - W) / (T - W)))])
    sched = LRSchedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), lr, T, W, floor,
                       kind="linspace_cosine")
    assert [sched.lr_at(s) for s in range(T)] == pytest.approx(published.tolist(), rel=1e-12)


@pytest.mark.parametrize("accum", [1, 3])
def test_simmim_schedules_step_like_timm_after_each_update(accum):
    # SimMIM's loop counts micro-batches and calls step_update(index of the update's last micro-batch) after the
    # update; timm's warm-up is linear from warmup_lr over W, its cosine spans the whole run (warm-up included)
    lr, start, floor, W, T = 1.0, 0.01, 0.001, 10, 80
    w, total = W * accum, T * accum

    def warm(t):
        return start + t * (lr - start) / w

    def multistep(t):
        return warm(t) if t < w else lr * 0.1 ** (t >= 70 * accum)

    def cosine(t):
        return warm(t) if t < w else floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * t / total))

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    for kind, rule in (("timm_multistep", multistep), ("timm_cosine", cosine)):
        sched = LRSchedule(opt, lr, T, W, floor, start, kind=kind, decay_at=(7 / 8,), accum=accum)
        used = []
        for _ in range(T):
            used.append(opt.param_groups[0]["lr"])
            sched.step()
        assert used == pytest.approx([rule(0)] + [rule(s * accum - 1) for s in range(1, T)], rel=1e-12)
    assert used[1] == used[0] if accum == 1 else used[1] > used[0]  # timm's one-update lag
    with pytest.raises(ValueError, match="unknown schedule"):
        LRSchedule(opt, lr, T, W, kind="step")


def test_method_recipes_fill_their_defaults():
    from mimfast.train.optim import RECIPES

    assert resolve(parse_args(["--model", "simmim_vit_base_patch16"])).clip_grad == RECIPES["simmim"].clip_grad == 5.0
    assert resolve(parse_args(["--model", "simmim_vit_base_patch16", "--clip-grad", "1"])).clip_grad == 1.0
    assert resolve(parse_args(["--model", "mae_vit_base_patch16"])).clip_grad is None
    assert RECIPES["simmim"].betas == (0.9, 0.999) and RECIPES["mae"].betas == RECIPES["videomae"].betas == (0.9, 0.95)
    assert scaled_lr(1e-4, 2048, RECIPES["simmim"].lr_batch) == pytest.approx(4e-4)
    simmim = resolve(parse_args(["--model", "simmim_vit_base_patch16", "--data", "synthetic"]))
    # the published ViT-B recipe
    assert (simmim.blr, simmim.epochs, simmim.warmup_epochs, simmim.drop_path) == (1e-4, 800, 10, 0.1)
    with pytest.raises(ValueError, match="--min-lr applies"):
        resolve(parse_args(["--model", "simmim_vit_base_patch16", "--min-lr", "0"]))


def test_param_groups_exclude_biases_and_1d():
    from mimfast.train.objectives import _mae_micro

    model = _mae_micro(depth=1, decoder_depth=1)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert "blocks.0.attn.qkv.weight" in decayed and "patch_embed.proj.weight" in decayed
    assert "cls_token" in decayed  # 3-D, as in MAE's add_weight_decay
    assert {"blocks.0.attn.qkv.bias", "norm.weight", "norm.bias", "decoder_pred.bias"} <= skipped
    assert "pos_embed" not in decayed | skipped  # frozen
    assert all(p.ndim <= 1 for p in no_decay["params"])


@pytest.mark.parametrize("factory,exempt,decayed", [
    ("simmim_vit_tiny_patch16", {"encoder.pos_embed", "encoder.cls_token"}, "encoder.mask_token"),
    ("videomae_vit_small_patch16", {"mask_token"}, "encoder.patch_embed.proj.weight"),
])
def test_param_groups_follow_each_methods_official_exemptions(factory, exempt, decayed):
    import mimfast.models as models

    model = getattr(models, factory)(depth=1) if "simmim" in factory else getattr(models, factory)(
        depth=1, decoder_depth=1)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert exempt <= skipped and decayed in {names[id(p)] for p in decay["params"]}
    assert skipped - exempt == {n for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith(".bias")}


def test_atomic_save_keeps_old_file_when_the_write_dies(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    ckpt.atomic_save({"model": {"w": torch.ones(3)}, "step": 1}, path)

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip file")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.atomic_save({"model": {"w": torch.zeros(3)}, "step": 2}, path)
    monkeypatch.undo()
    state = ckpt.load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temporary file left behind


def test_atomic_save_removes_temporaries_of_killed_writes(tmp_path):
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)  # a process that has exited: its half-written file is garbage
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".checkpoint.pt.tmp-{dead_pid}"
        busy = tmp_path / f".checkpoint.pt.tmp-{live.pid}"  # another process still writing: left alone
        other = tmp_path / f".other.pt.tmp-{dead_pid}"  # another file's temporary: not this write's business
        for f in (stale, busy, other):
            f.write_bytes(b"PK\x03\x04 half a zip file")
        ckpt.atomic_save({"model": {"w": torch.ones(3)}, "step": 1}, str(tmp_path / "checkpoint.pt"))
        assert sorted(os.listdir(tmp_path)) == sorted(["checkpoint.pt", busy.name, other.name])
    finally:
        live.kill()
        live.wait()


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load_checkpoint(str(tmp_path / "nope.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="cannot read"):
        ckpt.load_checkpoint(str(bad))
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.ones(1)}, other)
    with pytest.raises(ckpt.CheckpointError, match="not a mimfast"):
        ckpt.load_checkpoint(str(other))
    weights_only = {"model": {"w": torch.ones(1)}, "step": 3, "config": {}}
    with pytest.raises(ckpt.CheckpointError, match="holds no optimizer, scheduler, rng: a weights-only file"):
        ckpt.check_resumable(weights_only, "w.pt")


def test_rng_state_round_trip_loads_weights_only(tmp_path):
    import random

    import numpy as np

    state = ckpt.rng_state()
    path = str(tmp_path / "rng.pt")
    torch.save(state, path)
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    ckpt.set_rng_state(torch.load(path, weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == a


def test_config_defaults_and_checks():
    demo = resolve(PretrainConfig())
    assert (demo.model, demo.method, demo.mask_ratio) == ("mae_vit_micro_patch4", "mae", 0.75)
    assert demo.epochs == 30 and demo.blr == 4e-3 and demo.output_dir.startswith("runs/mae_vit_micro_patch4-")
    folder = resolve(parse_args(["--data", "/x", "--model", "simmim_vit_base_patch16"]))
    assert (folder.method, folder.mask_ratio, folder.epochs) == ("simmim", 0.6, 800)
    assert resolve(parse_args(["--data", "/x"])).model == "mae_vit_base_patch16"
    assert parse_args(["--no-norm-pix-loss"]).norm_pix_loss is False
    with pytest.raises(ValueError, match="mask-ratio"):
        resolve(parse_args(["--mask-ratio", "1.0"]))
    with pytest.raises(ValueError, match="batch-size"):
        resolve(parse_args(["--batch-size", "0"]))
    with pytest.raises(ValueError, match="infer the method"):
        resolve(parse_args(["--model", "vit_base"]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        PretrainConfig().seed = 3


def test_train_flops_per_sample_counts_every_matmul_of_mae():
    from mimfast.train.metrics import train_flops_per_sample
    from mimfast.train.objectives import _mae_micro

    D, Dd, depth, dec_depth, p, C, size = 64, 32, 2, 1, 4, 1, 32
    model = _mae_micro(in_chans=C, embed_dim=D, depth=depth, num_heads=4, decoder_embed_dim=Dd,
                       decoder_depth=dec_depth, decoder_num_heads=2, fused=True)
    L, P = (size // p) ** 2, p * p * C
    K = int(L * 0.25)
    x = torch.randn(3, C, size, size)

    def block(T, W):
        return 2 * T * W * 3 * W + 2 * (2 * T * T * W) + 2 * T * W * W + 2 * (2 * T * W * 4 * W)

    forward = (2 * L * P * D + depth * block(K + 1, D) + 2 * (K + 1) * D * Dd + dec_depth * block(L + 1, Dd)
               + 2 * (L + 1) * Dd * P)
    got = train_flops_per_sample(model, lambda: model(x, 0.75), batch=3)
    assert got == pytest.approx(3 * forward, rel=1e-6)
    assert model.fused is True  # restored


@pytest.mark.parametrize("masking", [["--mask-ratio", "0.3", "--mask-ratio-end", "0.9"],
                                     ["--mask-ratio-range", "0.4", "0.8"], ["--mask-ratio", "0.6"]])
def test_flops_follow_the_mask_ratio(masking):
    # three counts fix the quadratic in the visible tokens: every other ratio is exact
    import types

    from mimfast.ops.random_masking import num_kept
    from mimfast.train.engine import Trainer
    from mimfast.train.metrics import train_flops_per_sample

    objective, model = _objective(*masking)
    fake = types.SimpleNamespace(model=model, objective=objective, device=torch.device("cpu"))
    flops_at = Trainer._count_flops(fake)
    x = torch.zeros(1, 1, 32, 32)
    low, high = objective.ratio_span()
    for ratio in (0.3, 0.41, 0.5, 0.6, 0.66, 0.75, 0.9):
        noise = torch.rand(1, 64)
        want = train_flops_per_sample(model, lambda r=ratio, z=noise: model(x, r, z), 1)
        if low < high:
            assert flops_at(ratio) == pytest.approx(want, rel=1e-9), ratio
        elif num_kept(64, ratio) == num_kept(64, low):  # one ratio trained: one count, the training ratio's
            assert flops_at(ratio) == pytest.approx(want, rel=1e-9), ratio
        else:
            assert flops_at(ratio) == flops_at(low) != pytest.approx(want, rel=1e-3)
    if objective.ratio_range is not None:
        # a step's FLOPs average over the ratios the samples draw: between the ends, above the middle's (convex)
        fake.config = types.SimpleNamespace(mask_ratio_range=objective.ratio_range)
        fake.flops_at, fake.range_flops = flops_at, None
        step = Trainer._step_flops(fake, 3)
        assert Trainer._step_flops(fake, 7) == step == fake.range_flops  # computed once
        assert flops_at(0.8) < step < flops_at(0.4) and step > flops_at(0.6)


def test_mfu_and_peaks():
    from mimfast.train.metrics import mfu, peak_flops, peak_memory_mb

    assert peak_flops(torch.device("cpu"), "bf16") is None
    assert mfu(1000.0, 1e9, None, 1) is None
    assert mfu(1000.0, 1e9, 1e13, 2) == pytest.approx(0.05)
    assert peak_memory_mb(torch.device("cpu")) > 10


def test_loss_curve_shows_a_moving_mask_ratio_below_the_loss(tmp_path):
    from PIL import Image

    from mimfast.train.visualize import save_loss_curve

    records = [dict(step=s, loss=1.0 - s / 400, lr=1e-3, mask_ratio=0.4 + s / 400) for s in range(1, 201)]
    for name, recs in (("moving", records), ("fixed", [{k: v for k, v in r.items() if k != "mask_ratio"}
                                                      for r in records])):
        assert save_loss_curve(recs, str(tmp_path / f"{name}.png")) == (640, 400)
    green = []
    for name in ("moving", "fixed"):
        with Image.open(tmp_path / f"{name}.png") as img:
            px = np.asarray(img.convert("RGB")).astype(int)[300:, :, :]  # the bottom quarter
        green.append(int(((px[..., 1] > 120) & (px[..., 0] < 80) & (px[..., 2] < 80)).sum()))
    assert green[0] > 100 and green[1] == 0


def test_loss_curve_marks_a_point_between_gaps(tmp_path):
    from PIL import Image

    from mimfast.train.visualize import save_loss_curve

    blue = []
    for name, losses in (("gaps", [None, 0.5, None]), ("none", [None, None, None])):
        save_loss_curve([dict(step=s + 1, loss=v, lr=1e-3) for s, v in enumerate(losses)],
                        str(tmp_path / f"{name}.png"))
        with Image.open(tmp_path / f"{name}.png") as img:
            px = np.asarray(img.convert("RGB")).astype(int)
        blue.append(int(((px[..., 2] > 150) & (px[..., 0] < 80)).sum()))
    assert blue[0] > blue[1]


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989.4e12), ("NVIDIA H100 PCIe", 756e12),
                                       ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989.4e12),
                                       ("NVIDIA H200 NVL", 835e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                       ("NVIDIA GeForce RTX 4090", None)])
def test_peak_flops_tell_the_boards_of_a_chip_apart(monkeypatch, name, peak):
    from mimfast.train.metrics import peak_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda", 0), "bf16") == peak


def test_reconstruction_title_wraps_to_a_narrow_grid(tmp_path):
    from mimfast.train.visualize import save_reconstructions

    imgs, masked = torch.rand(1, 3, 8, 8), torch.zeros(1, 8, 8, dtype=torch.bool)
    title = "mae_vit_micro_patch4, held-out images, random masks, ratio 0.75; predicted patches shown at the " \
            "original patch's mean and std (normalised targets)"
    _, short = save_reconstructions(imgs, masked, imgs, str(tmp_path / "a.png"), title="one line")
    width, tall = save_reconstructions(imgs, masked, imgs, str(tmp_path / "b.png"), title=title)
    # one column is 2.3 inches: the 140-character title takes several lines, each adding height
    assert width == round(2.3 * 100) and tall > short + 3 * 0.17 * 100 - 1


@pytest.mark.parametrize("norm_target", [True, False], ids=["norm_target", "raw_target"])
def test_videomae_trivial_baseline_uses_the_models_pixel_statistics(norm_target):
    """The per-cube-mean baseline un-normalises clips as the model's loss does (its pixel_mean / pixel_std), so
    it holds for any channel count: a 1-channel VideoMAE's statistics are 0 / 1, not ImageNet's three."""
    from mimfast.ops import patchify, tube_masking

    objective, model = _objective("--model", "videomae_vit_micro_patch4", "--data", "synthetic")
    model.norm_target = norm_target
    T, S = objective.num_frames, objective.img_size[0]
    videos = torch.rand(2, 1, T, S, S)
    grid = (T // objective.tubelet_size, S // objective.patch_size, S // objective.patch_size)
    info = tube_masking(2, grid, 0.75, generator=torch.Generator().manual_seed(0))
    out = model(videos, info)
    got = objective.trivial_loss(model, videos, out)
    cubes = patchify(videos, objective.patch_size, objective.tubelet_size)  # statistics 0 / 1: raw = normalised
    mask = out.mask.reshape(2, -1).bool()
    target = cubes[mask].reshape(2, -1, cubes.shape[-1])
    if norm_target:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True).sqrt() + 1e-6)
        expected = (target ** 2).mean()
    else:
        expected = ((target - target.mean(-1, keepdim=True)) ** 2).mean()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
