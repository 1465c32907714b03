import math
import sys

import numpy as np
import pytest
import torch

from mimfast.backend import get_op
from mimfast.ops import (
    block_masking,
    importance_masking,
    mask_info_from_mask,
    ragged_random_masking,
    random_masking,
    ratio_schedule,
    seeded_noise,
    simmim_masking,
    tube_masking,
)
from mimfast.ops.random_masking import MaskInfo, philox4x32, random_keys_ref

masking_module = sys.modules["mimfast.ops.masking"]


def assert_valid(info, N, L, K):
    ids_keep, ids_restore, mask = info
    assert ids_keep.shape == (N, K) and ids_keep.dtype == torch.int64
    assert ids_restore.shape == (N, L) and ids_restore.dtype == torch.int64
    assert mask.shape == (N, L) and mask.dtype == torch.float32
    assert torch.equal(ids_restore.sort(1).values, torch.arange(L).expand(N, L))
    assert torch.equal(torch.argsort(ids_restore, dim=1)[:, :K], ids_keep)
    assert torch.equal(mask, torch.ones(N, L).scatter_(1, ids_keep, 0.0))


def assert_natural_order(info):
    """Kept ids ascending and ids_restore = argsort(cat(kept ascending, removed ascending)), like random masking."""
    ids_shuffle = torch.argsort(info.mask, dim=1, stable=True)
    assert torch.equal(info.ids_restore, torch.argsort(ids_shuffle, dim=1))
    assert torch.equal(info.ids_keep, ids_shuffle[:, : info.ids_keep.shape[1]])


def assert_same(a, b):
    assert type(a) is type(b)
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y)
        else:
            assert x == y


def _poisoned_empty(shape, dtype, device):
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, -987654321, dtype=dtype, device=device)


def chi2_critical(df: int) -> float:
    """Upper 0.1% point of chi-square with ``df`` degrees of freedom (Wilson-Hilferty)."""
    z = 3.090232
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_ops_registered():
    for name in ("simmim_masking", "tube_masking", "block_masking", "importance_masking", "ragged_random_masking"):
        assert get_op(name).available() == ["triton", "torch"]


# ------------------------------------------------------------------------------------------ mask_info_from_mask


@pytest.mark.parametrize("as_bool", [True, False], ids=["bool", "float"])
def test_mask_info_from_mask(as_bool):
    N, L, K = 4, 23, 9
    mask = torch.ones(N, L)
    for n in range(N):
        mask[n, torch.randperm(L)[:K]] = 0
    info = mask_info_from_mask(mask.bool() if as_bool else mask)
    assert_valid(info, N, L, K)
    assert_natural_order(info)
    assert torch.equal(mask_info_from_mask(mask, K).ids_restore, info.ids_restore)


def test_mask_info_from_mask_errors():
    with pytest.raises(ValueError, match="same number"):
        mask_info_from_mask(torch.tensor([[0, 1, 1], [0, 0, 1]]))
    with pytest.raises(ValueError, match="only 0 and 1"):
        mask_info_from_mask(torch.tensor([[0.0, 0.5], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="2-D"):
        mask_info_from_mask(torch.zeros(3))


# ---------------------------------------------------------------------------------------------------- SimMIM


@pytest.mark.parametrize("input_size,mask_patch,model_patch,ratio", [
    (192, 32, 4, 0.6),  # SimMIM ViT/Swin default: 36 units, 22 masked, 8x8 tokens per unit
    (224, 32, 16, 0.75),  # 49 units, ceil(36.75) = 37 masked, 2x2 tokens per unit
    ((64, 96), 32, 8, 0.5),  # non-square, 6 units, 3 masked
    (32, 16, 16, 0.0),  # nothing masked
    (40, 8, 8, 0.6),  # 25 units, 0.6 * 25 = 15.000000000000002 in float: ceil gives 16, as SimMIM computes it
], ids=lambda v: str(v))
def test_simmim_count_and_units(input_size, mask_patch, model_patch, ratio):
    H, W = (input_size, input_size) if isinstance(input_size, int) else input_size
    gh, gw, s = H // mask_patch, W // mask_patch, mask_patch // model_patch
    units = gh * gw
    count = math.ceil(units * ratio)
    N, L = 3, units * s * s
    info = simmim_masking(N, input_size, mask_patch, model_patch, ratio, seed=4, backend="torch")
    assert_valid(info, N, L, (units - count) * s * s)
    assert_natural_order(info)
    blocks = info.mask.view(N, gh, s, gw, s)
    assert torch.equal(blocks, blocks[:, :, :1, :, :1].expand_as(blocks)), "a mask unit is split"
    assert blocks[:, :, 0, :, 0].sum((1, 2)).tolist() == [float(count)] * N
    triton = simmim_masking(N, input_size, mask_patch, model_patch, ratio, seed=4, backend="triton")
    assert_same(triton, info)


def test_simmim_reproducible_and_distinct():
    a = simmim_masking(4, 192, 32, 4, 0.6, seed=1)
    assert_same(a, simmim_masking(4, 192, 32, 4, 0.6, seed=1))
    assert not torch.equal(a.mask, simmim_masking(4, 192, 32, 4, 0.6, seed=2).mask)
    assert len({tuple(r.tolist()) for r in a.mask}) == 4
    tail = simmim_masking(2, 192, 32, 4, 0.6, seed=1, sample_offset=2)
    assert torch.equal(tail.mask, a.mask[2:])
    g = simmim_masking(4, 192, 32, 4, 0.6, generator=torch.Generator().manual_seed(8))
    assert_same(g, simmim_masking(4, 192, 32, 4, 0.6, generator=torch.Generator().manual_seed(8)))


def test_simmim_errors():
    with pytest.raises(ValueError, match="not divisible by mask_patch_size"):
        simmim_masking(2, 200, 32, 4, 0.6)
    with pytest.raises(ValueError, match="not divisible by model_patch_size"):
        simmim_masking(2, 192, 32, 6, 0.6)
    with pytest.raises(ValueError, match="mask_ratio"):
        simmim_masking(2, 192, 32, 4, 1.2)
    with pytest.raises(ValueError, match="input_size"):
        simmim_masking(2, (192, 0), 32, 4, 0.6)


# ------------------------------------------------------------------------------------------------------ tube


@pytest.mark.parametrize("grid,ratio", [((8, 14, 14), 0.9), ((3, 5, 7), 0.5), ((2, 3, 3), 0.0), ((1, 4, 4), 0.95)],
                         ids=lambda v: str(v))
def test_tube_shared_across_time(grid, ratio):
    T, h, w = grid
    N, HW = 2, h * w
    kept_per_frame = HW - int(ratio * HW)
    info = tube_masking(N, grid, ratio, seed=6, backend="torch")
    assert_valid(info, N, T * HW, T * kept_per_frame)
    assert_natural_order(info)
    frames = info.mask.view(N, T, HW)
    assert torch.equal(frames, frames[:, :1].expand_as(frames))
    assert frames[:, 0].sum(1).tolist() == [float(HW - kept_per_frame)] * N
    assert_same(tube_masking(N, grid, ratio, seed=6, backend="triton"), info)


def test_tube_videomae_count_and_spatial_uniformity():
    # VideoMAE-B: 8x14x14 tokens at ratio 0.9 keeps 196 - int(176.4) = 20 per frame, K = 160
    info = tube_masking(3000, (8, 14, 14), 0.9, seed=3, backend="torch")
    assert info.ids_keep.shape == (3000, 160)
    counts = (1 - info.mask.view(3000, 8, 196)[:, 0]).sum(0).double()
    expected = 3000 * 20 / 196
    assert float(((counts - expected) ** 2 / expected).sum()) < chi2_critical(195)


def test_tube_errors():
    with pytest.raises(ValueError, match="grid_thw"):
        tube_masking(2, (8, 14), 0.9)
    with pytest.raises(ValueError, match="mask_ratio"):
        tube_masking(2, (8, 14, 14), -0.5)


# ------------------------------------------------------------------------------------------------ block-wise


def _masked_neighbour_pairs(mask, h, w):
    m = mask.view(-1, h, w)
    return ((m[:, 1:, :] * m[:, :-1, :]).sum((1, 2)) + (m[:, :, 1:] * m[:, :, :-1]).sum((1, 2))).double()


@pytest.mark.parametrize("grid,num,min_num,max_num", [
    ((14, 14), 75, 16, None),  # BEiT ViT-B/16 at 224 px
    ((4, 4), 12, 4, None),  # rectangles get stuck: random patches complete the count
    ((7, 9), 1, 4, None),
    ((14, 14), 0, 4, None),
    ((6, 6), 36, 4, 8),
], ids=lambda v: str(v))
def test_block_exact_counts(grid, num, min_num, max_num):
    N = 6
    info = block_masking(N, grid, num, min_num, max_num, seed=2)
    L = grid[0] * grid[1]
    assert_valid(info, N, L, L - num)
    assert_natural_order(info)
    assert info.mask.sum(1).tolist() == [float(num)] * N


@pytest.mark.parametrize("N,grid,num,min_num,max_num,min_aspect,seed,offset", [
    (2, (14, 14), 75, 16, None, 0.3, 2, 0),  # BEiT ViT-B/16 at 224 px
    (2, (4, 4), 12, 4, None, 0.3, 7, 0),  # rectangles get stuck: single patches complete the count
    (2, (7, 9), 1, 4, None, 0.3, 2**62 + 11, 2**33),  # one patch; 64-bit seed and sample index
    (1, (6, 6), 36, 4, 8, 0.3, 5, 0),  # every patch, rectangles of at most 8
    (3, (1, 8), 3, 1, None, 0.3, 1, 0),  # one row: no rectangle is strictly smaller, all single patches
    (2, (5, 1), 2, 1, None, 0.3, 1, 9),  # one column
    (2, (3, 4), 5, 1, 1, 0.3, 6, 0),  # rectangles of one patch
    (1, (9, 5), 20, 2, 6, 1.0, 3, 0),  # squares only
    (3, (14, 14), 0, 4, None, 0.3, 2, 0),  # nothing masked
    (1, (3, 3), 4, 50, None, 0.3, 4, 0),  # min_num_patches above L
], ids=lambda v: str(v))
def test_block_triton_equals_torch(monkeypatch, N, grid, num, min_num, max_num, min_aspect, seed, offset):
    monkeypatch.setattr(masking_module, "_empty", _poisoned_empty)
    args = (N, grid, num, min_num, max_num, min_aspect)
    got = block_masking(*args, seed=seed, sample_offset=offset, backend="triton")
    L = grid[0] * grid[1]
    assert_valid(got, N, L, L - num)
    assert_natural_order(got)
    assert_same(got, block_masking(*args, seed=seed, sample_offset=offset, backend="torch"))


def test_block_triton_reproducible_and_distinct():
    a = block_masking(3, (6, 6), 12, 4, seed=1, backend="triton")
    assert_same(a, block_masking(3, (6, 6), 12, 4, seed=1, backend="triton"))
    assert len({tuple(r.tolist()) for r in a.mask}) == 3
    assert not torch.equal(a.mask[:1], block_masking(1, (6, 6), 12, 4, seed=2, backend="triton").mask)
    assert torch.equal(block_masking(1, (6, 6), 12, 4, seed=1, sample_offset=2, backend="triton").mask, a.mask[2:])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_block_sample_ids_give_each_row_its_global_sample(monkeypatch, backend):
    # a shuffled batch of data-set indices: row n is the mask of sample ids[n], whatever its batch position
    monkeypatch.setattr(masking_module, "_empty", _poisoned_empty)
    ids = torch.tensor([7, 0, 2**40 + 3, 7, 5])
    got = block_masking(5, (6, 7), 15, 4, seed=3, sample_ids=ids, backend=backend)
    assert_valid(got, 5, 42, 27)
    for n, i in enumerate(ids.tolist()):
        one = block_masking(1, (6, 7), 15, 4, seed=3, sample_offset=i, backend="torch")
        assert_same(MaskInfo(*(t[n:n + 1] for t in got)), one)
    small = torch.tensor([7, 0, 9, 7, 5])
    assert_same(block_masking(5, (6, 7), 15, 4, seed=3, sample_ids=small, backend=backend),
                block_masking(5, (6, 7), 15, 4, seed=3, sample_ids=small.to(torch.int32), backend=backend))
    contiguous = block_masking(4, (6, 7), 15, 4, seed=3, sample_offset=2, backend=backend)
    assert_same(block_masking(4, (6, 7), 15, 4, seed=3, sample_ids=torch.arange(2, 6), backend=backend), contiguous)


def test_block_host_sample_ids_with_outputs_on_another_device():
    # the engine passes the data-set indices on the host and asks for masks on the GPU; "meta" stands in for it
    info = block_masking(3, (4, 4), 5, seed=1, sample_ids=torch.arange(3), device="meta", backend="torch")
    assert [(t.device.type, tuple(t.shape)) for t in info] == [("meta", (3, 11)), ("meta", (3, 16)), ("meta", (3, 16))]
    assert get_op("block_masking").which(3, (4, 4), 5, seed=1, sample_ids=(0, 1, 2), device="meta") == "torch"
    # host ids reach the implementations as ints, a tuple or a list
    op = get_op("block_masking")
    for backend in ("torch", "triton"):
        assert_same(op(3, (4, 4), 5, seed=1, sample_ids=[4, 0, 9], backend=backend),
                    block_masking(3, (4, 4), 5, seed=1, sample_ids=torch.tensor([4, 0, 9]), backend="torch"))


def test_block_sample_ids_errors():
    ids = torch.arange(3)
    with pytest.raises(ValueError, match="seed"):
        block_masking(3, (4, 4), 5, sample_ids=ids)
    with pytest.raises(ValueError, match="not both"):
        block_masking(3, (4, 4), 5, seed=1, sample_offset=2, sample_ids=ids)
    with pytest.raises(ValueError, match=r"\[N\]"):
        block_masking(2, (4, 4), 5, seed=1, sample_ids=ids)
    with pytest.raises(TypeError, match="integers"):
        block_masking(3, (4, 4), 5, seed=1, sample_ids=ids.float())
    with pytest.raises(TypeError, match="integers"):  # no unsigned 64-bit kernels in torch to check it with
        block_masking(3, (4, 4), 5, seed=1, sample_ids=ids.to(torch.uint64))
    with pytest.raises(ValueError, match=">= 0"):
        block_masking(3, (4, 4), 5, seed=1, sample_ids=torch.tensor([0, -1, 2]))


def test_block_custom_op_opcheck():
    # the op torch.compile traces: (N, height, width, num_masking_patches, min, max, log aspect range, seed,
    # sample_offset, device)
    op = torch.ops.mimfast.block_masking.default
    lo, hi = math.log(0.3), math.log(1 / 0.3)
    torch.library.opcheck(op, (2, 4, 5, 8, 2, 8, lo, hi, 2**40 + 3, 7, torch.device("cpu")))
    torch.library.opcheck(op, (3, 4, 5, 8, 2, 8, lo, hi, 5, 0, torch.device("cpu"), torch.tensor([9, 2**35, 0])))


@pytest.mark.slow
def test_block_compiles_without_graph_break():
    def f(ids=None):
        if ids is None:
            info = block_masking(2, (5, 6), 12, 4, seed=9, sample_offset=1, backend="triton")
        else:
            info = block_masking(2, (5, 6), 12, 4, seed=9, sample_ids=ids, backend="triton")
        return info.mask * 2, info.ids_restore

    for ids in (None, torch.tensor([4, 1])):
        got, want = torch.compile(f, fullgraph=True)(ids), f(ids)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_philox_of_python_ints_equals_the_tensor_words():
    # the host rule of block masking draws its words from Python-int counters
    counters = torch.randint(0, 2**32, (4, 32), dtype=torch.int64)
    for seed in (0, 1, 2**32 + 5, 2**63 - 1):
        words = philox4x32(seed, *counters)
        for j in range(counters.shape[1]):
            assert philox4x32(seed, *(int(c[j]) for c in counters)) == tuple(int(w[j]) for w in words)


def test_block_rectangle_sides_round_half_up():
    table = masking_module.aspect_table((math.log(0.3), math.log(1 / 0.3)))
    assert len(table[0]) == 2 ** masking_module.ASPECT_BITS
    g = torch.Generator().manual_seed(0)
    for _ in range(2000):
        area_q = int(torch.randint(1, 400 << 16, (1,), generator=g))
        aspect_q = table[0][int(torch.randint(0, len(table[0]), (1,), generator=g))]
        exact = math.sqrt(area_q * aspect_q / 2.0**32)
        if abs(exact - math.floor(exact) - 0.5) > 1e-9:  # away from the halfway points, floats decide reliably
            assert masking_module._rectangle_side(area_q, aspect_q) == math.floor(exact + 0.5)


def test_block_masks_are_blocky_and_reproducible():
    N, h, w, num = 48, 14, 14, 75
    info = block_masking(N, (h, w), num, 16, seed=5)
    # a uniform random mask of 75 of 196 patches has about 364 * (75/196) * (74/195) = 52.9 adjacent masked pairs
    assert _masked_neighbour_pairs(info.mask, h, w).mean() > 85
    assert_same(info, block_masking(N, (h, w), num, 16, seed=5))
    assert_same(block_masking(8, (h, w), num, 16, seed=5, sample_offset=40), block_masking(8, (h, w), num, 16,
                                                                                          seed=5, sample_offset=40))
    tail = block_masking(N - 10, (h, w), num, 16, seed=5, sample_offset=10)
    assert torch.equal(tail.mask, info.mask[10:])
    assert len({tuple(r.tolist()) for r in info.mask}) == N


def test_block_errors():
    with pytest.raises(ValueError, match="num_masking_patches"):
        block_masking(2, (4, 4), 17)
    with pytest.raises(ValueError, match="min_aspect"):
        block_masking(2, (4, 4), 5, min_aspect=0.0)
    with pytest.raises(ValueError, match="max_num_patches"):
        block_masking(2, (4, 4), 5, min_num_patches=4, max_num_patches=0)
    with pytest.raises(ValueError, match="grid"):
        block_masking(2, (4, 0), 5)
    with pytest.raises(ValueError, match="max_aspect"):
        block_masking(2, (4, 4), 5, max_aspect=float("inf"))
    with pytest.raises(RuntimeError, match="2\\^30"):
        block_masking(2, (4, 4), 5, min_num_patches=2**30, backend="triton")
    # a bool is not a count or an aspect ratio (True would pass as 1)
    with pytest.raises(ValueError, match="num_masking_patches"):
        block_masking(2, (4, 4), True)
    for name in ("min_num_patches", "max_num_patches", "min_aspect"):
        with pytest.raises(ValueError, match=name):
            block_masking(2, (4, 4), 5, **{name: True})


# ------------------------------------------------------------------------------------------------ importance


def test_importance_first_draw_proportional_to_scores():
    # Gumbel-top-k: the first kept patch is drawn with probability scores / sum(scores)
    N, L = 6000, 12
    weights = torch.arange(1, L + 1, dtype=torch.float32)
    info = importance_masking(weights.expand(N, L), 0.5, seed=17, backend="torch")
    counts = torch.bincount(info.ids_keep[:, 0], minlength=L).double()
    expected = N * weights.double() / weights.sum()
    assert float(((counts - expected) ** 2 / expected).sum()) < chi2_critical(L - 1)
    # temperature 2: weights ** 0.5
    soft = importance_masking(weights.expand(N, L), 0.5, temperature=2.0, seed=17, backend="torch")
    counts = torch.bincount(soft.ids_keep[:, 0], minlength=L).double()
    expected = N * weights.double().sqrt() / weights.double().sqrt().sum()
    assert float(((counts - expected) ** 2 / expected).sum()) < chi2_critical(L - 1)


def test_importance_prefers_high_scores():
    N, L = 400, 16
    scores = torch.ones(N, L)
    scores[:, ::2] = 10.0
    info = importance_masking(scores, 0.75, seed=3)
    kept_high = (info.ids_keep % 2 == 0).double().mean()
    assert kept_high > 0.8 and kept_high < 1.0
    greedy = importance_masking(scores + torch.rand(N, L) * 1e-3, 0.5, temperature=1e-4, seed=3)
    assert (greedy.ids_keep % 2 == 0).all()
    flat = importance_masking(scores, 0.75, temperature=1e6, seed=3)
    assert abs(float((flat.ids_keep % 2 == 0).double().mean()) - 0.5) < 0.05
    zeros = torch.rand(N, L) + 0.1
    zeros[:, :4] = 0.0
    assert (importance_masking(zeros, 0.5, seed=3).ids_keep >= 4).all()


@pytest.mark.parametrize("N,L,ratio", [(2, 196, 0.75), (3, 9, 0.0), (2, 5, 0.9)], ids=lambda v: str(v))
def test_importance_triton_equals_torch(N, L, ratio):
    scores = torch.rand(N, L)
    info = importance_masking(scores, ratio, seed=21, sample_offset=4, backend="torch")
    assert_valid(info, N, L, int(L * (1 - ratio)))
    assert_same(importance_masking(scores, ratio, seed=21, sample_offset=4, backend="triton"), info)


def test_importance_errors():
    with pytest.raises(ValueError, match="NaN"):
        importance_masking(torch.tensor([[1.0, float("nan")]]), 0.5)
    with pytest.raises(ValueError, match="non-negative"):
        importance_masking(torch.tensor([[1.0, -1.0]]), 0.5)
    with pytest.raises(ValueError, match="non-negative"):
        importance_masking(torch.tensor([[1.0, float("inf")]]), 0.5)
    with pytest.raises(ValueError, match=r"\[N, L\]"):
        importance_masking(torch.rand(4), 0.5)
    with pytest.raises(ValueError, match="temperature"):
        importance_masking(torch.rand(2, 4), 0.5, temperature=0.0)
    with pytest.raises(TypeError, match="floating"):
        importance_masking(torch.ones(2, 4, dtype=torch.int64), 0.5)
    with pytest.raises(ValueError, match="temperature"):
        importance_masking(torch.rand(2, 4), 0.5, temperature=True)
    with pytest.raises(TypeError, match="torch.Generator"):
        importance_masking(torch.rand(2, 4), 0.5, generator=3)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_importance_depends_on_relative_scores_only(backend):
    # float64 scores outside float32's range are keep weights like any others: scaled by 1e-50 or 1e50 they give
    # the draw of the unscaled ones (cast to float32 before the log, every key was -inf or inf: ties by index)
    scores = torch.rand(4, 16, dtype=torch.float64) + 0.05
    info = importance_masking(scores, 0.75, seed=5, backend=backend)
    assert len({tuple(row) for row in info.ids_keep.tolist()}) > 1
    for scale in (1e-50, 1e50):
        assert_same(importance_masking(scores * scale, 0.75, seed=5, backend=backend), info)
    # temperature -> 0 keeps the top score even where log(score) / temperature leaves float32
    greedy = importance_masking(torch.tensor([[0.25, 0.5, 0.1, 0.05]]), 0.75, temperature=1e-40, seed=0,
                                backend=backend)
    assert greedy.ids_keep.tolist() == [[1]]
    # a row of zeros has no largest weight to shift by: its patches still tie, in index order
    zeros = importance_masking(torch.zeros(2, 6), 0.5, seed=0, backend=backend)
    assert zeros.ids_keep.tolist() == [[0, 1, 2], [0, 1, 2]]


# -------------------------------------------------------------------------------------------------- schedule


def test_ratio_schedule():
    assert ratio_schedule(0, 100, 0.5, 0.9) == 0.5
    assert ratio_schedule(50, 100, 0.5, 0.9) == pytest.approx(0.7)
    assert ratio_schedule(100, 100, 0.5, 0.9) == pytest.approx(0.9)
    assert ratio_schedule(250, 100, 0.5, 0.9) == pytest.approx(0.9)
    assert ratio_schedule(0, 100, 0.5, 0.9, "cosine") == pytest.approx(0.5)
    assert ratio_schedule(50, 100, 0.5, 0.9, "cosine") == pytest.approx(0.7)
    assert ratio_schedule(25, 100, 0.5, 0.9, "cosine") == pytest.approx(0.9 - 0.4 * (1 + math.cos(math.pi / 4)) / 2)
    assert ratio_schedule(100, 100, 0.5, 0.9, "cosine") == pytest.approx(0.9)
    values = [ratio_schedule(s, 40, 0.9, 0.4, "cosine") for s in range(41)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError, match="mask_ratio"):
        ratio_schedule(0, 10, 0.5, 1.0)
    with pytest.raises(ValueError, match="kind"):
        ratio_schedule(0, 10, 0.5, 0.6, "step")
    with pytest.raises(ValueError, match="total_steps"):
        ratio_schedule(0, 0, 0.5, 0.6)
    with pytest.raises(ValueError, match="total_steps"):
        ratio_schedule(0, True, 0.5, 0.6)
    with pytest.raises(ValueError, match="step"):
        ratio_schedule(True, 10, 0.5, 0.6)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_ratio_schedule_ends_exactly_at_its_ratios(kind):
    # 0.3 + (0.85 - 0.3) * 1 is 0.8500000000000001: K = int(100 * (1 - r)) would be 14, not the 15 of 0.85
    for start, end in ((0.3, 0.85), (0.85, 0.3), (0.2, 0.9), (0.9, 0.2), (0.75, 0.75)):
        assert ratio_schedule(0, 100, start, end, kind) == start
        assert ratio_schedule(100, 100, start, end, kind) == end
        assert ratio_schedule(101, 100, start, end, kind) == end
        r = ratio_schedule(100, 100, start, end, kind)
        assert random_masking(1, 100, r, seed=0).ids_keep.shape[1] == int(100 * (1 - end))


def test_philox_uniform_extreme_words_stay_inside_the_unit_interval(monkeypatch):
    # the largest and smallest Philox words map strictly inside (0, 1) in float32: a uniform of exactly 1 would give
    # an infinite Gumbel key (a patch kept whatever its score)
    words = torch.tensor([[0, 1, 2**32 - 1, 2**32 - 2, 2**31]], dtype=torch.int64)
    monkeypatch.setattr(masking_module, "philox4x32", lambda seed, c0, *rest: (words.expand_as(c0),) * 4)
    u = masking_module.philox_uniform(1, 5, seed=0)
    assert u.dtype == torch.float32 and bool(((u > 0) & (u < 1)).all())
    assert torch.isfinite(-torch.log(-torch.log(u))).all()


def test_seeded_noise():
    noise = seeded_noise(6, 196, seed=9, sample_offset=100)
    assert noise.dtype == torch.float32 and noise.shape == (6, 196)
    assert (noise > 0).all() and (noise < 1).all()
    assert torch.equal(noise, seeded_noise(6, 196, seed=9, sample_offset=100))
    assert torch.equal(noise[4:], seeded_noise(2, 196, seed=9, sample_offset=104))
    assert not torch.equal(noise, seeded_noise(6, 196, seed=10, sample_offset=100))
    big = seeded_noise(200, 196, seed=1)
    assert abs(float(big.double().mean()) - 0.5) < 0.01 and abs(float(big.double().var()) - 1 / 12) < 0.002
    info = random_masking(6, 196, 0.75, noise=noise)
    assert_valid(info, 6, 196, 49)
    with pytest.raises(ValueError, match="seed"):
        seeded_noise(2, 4, seed=-3)


# ---------------------------------------------------------------------------------------------------- ragged


def assert_ragged_valid(r, N, L, ratios):
    counts = [int(L * (1 - x)) for x in ratios]
    assert r.num_kept.tolist() == counts and r.num_kept.dtype == torch.int64
    assert r.cu_seqlens.dtype == torch.int32 and r.cu_seqlens.tolist() == [sum(counts[:i]) for i in range(N + 1)]
    assert torch.equal(r.cu_seqlens.diff().long(), r.num_kept)
    assert r.max_seqlen == max(counts, default=0)
    assert r.ids_keep_packed.shape == (sum(counts),) and r.ids_keep_packed.dtype == torch.int64
    assert torch.equal(r.ids_restore.sort(1).values, torch.arange(L).expand(N, L))
    ids_shuffle = torch.argsort(r.ids_restore, dim=1)
    for n in range(N):
        seg = r.ids_keep_packed[r.cu_seqlens[n]:r.cu_seqlens[n + 1]]
        assert torch.equal(seg, ids_shuffle[n, :counts[n]])
        assert torch.equal(r.mask[n], torch.ones(L).scatter_(0, seg, 0.0))


RAGGED_CASES = [
    (2, 196, [0.75, 0.9]),
    (4, 31, [0.75, 0.5, 0.9, 0.0]),
    (3, 10, [0.95, 0.0, 0.3]),  # K = 0 and K = L side by side
    (1, 49, [0.6]),
]


@pytest.mark.parametrize("N,L,ratios", RAGGED_CASES, ids=lambda v: str(v))
def test_ragged_layout_and_backends(N, L, ratios):
    r = ragged_random_masking(N, L, ratios, seed=8, sample_offset=2, backend="torch")
    assert_ragged_valid(r, N, L, ratios)
    keys = random_keys_ref(N, L, 8, 2)
    assert torch.equal(torch.argsort(r.ids_restore, dim=1), torch.argsort(keys, dim=1))
    assert_same(ragged_random_masking(N, L, ratios, seed=8, sample_offset=2, backend="triton"), r)
    noise = torch.rand(N, L)
    rn = ragged_random_masking(N, L, torch.tensor(ratios), noise=noise, backend="torch")
    assert_ragged_valid(rn, N, L, ratios)
    assert torch.equal(torch.argsort(rn.ids_restore, dim=1), torch.argsort(noise, dim=1, stable=True))
    assert_same(ragged_random_masking(N, L, ratios, noise=noise, backend="triton"), rn)


def test_ragged_equal_ratios_is_random_masking():
    for backend in ("torch", "triton"):
        r = ragged_random_masking(3, 50, [0.75] * 3, seed=12, backend=backend)
        m = random_masking(3, 50, 0.75, seed=12, backend=backend)
        assert torch.equal(r.ids_keep_packed.view(3, -1), m.ids_keep)
        assert torch.equal(r.ids_restore, m.ids_restore) and torch.equal(r.mask, m.mask)


def test_ragged_triton_overwrites_poisoned_outputs(monkeypatch):
    monkeypatch.setattr(masking_module, "_empty", _poisoned_empty)
    ratios = [0.5, 0.9, 0.25]
    got = ragged_random_masking(3, 21, ratios, seed=5, backend="triton")
    assert not torch.isnan(got.mask).any()
    assert_same(got, ragged_random_masking(3, 21, ratios, seed=5, backend="torch"))


def test_ragged_reproducible_and_empty():
    a = ragged_random_masking(3, 20, [0.5, 0.2, 0.7], generator=torch.Generator().manual_seed(1))
    assert_same(a, ragged_random_masking(3, 20, [0.5, 0.2, 0.7], generator=torch.Generator().manual_seed(1)))
    empty = ragged_random_masking(0, 20, [], seed=1, backend="triton")
    assert empty.ids_keep_packed.shape == (0,) and empty.cu_seqlens.tolist() == [0] and empty.max_seqlen == 0


def test_ragged_errors():
    with pytest.raises(ValueError, match="N = 3"):
        ragged_random_masking(3, 10, [0.5, 0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ragged_random_masking(2, 10, [0.5, 1.0])
    with pytest.raises(ValueError, match="NaN"):
        ragged_random_masking(2, 10, torch.tensor([0.5, float("nan")]))
    with pytest.raises(ValueError, match="1-D"):
        ragged_random_masking(2, 10, torch.rand(2, 1))
    with pytest.raises(ValueError, match="noise"):
        ragged_random_masking(2, 10, [0.5, 0.5], noise=torch.rand(2, 9))
    # only real numbers, in an ordered container: no set, dict, strings, bools, None or complex values
    for bad in ({0.5, 0.25}, {0: 0.5, 1: 0.5}, "0.5", ["0.5", "0.25"], [0.5, None], [True, False],
                torch.tensor([0.5, 0.25], dtype=torch.complex64), np.array(["0.5", "0.25"])):
        with pytest.raises(TypeError, match="real"):
            ragged_random_masking(2, 10, bad)
    assert ragged_random_masking(2, 10, np.array([0.5, 0.25], dtype=">f4"), seed=0).num_kept.tolist() == [5, 7]


def test_ragged_counts_do_not_depend_on_the_container():
    # float32 ratios are read as their shortest decimal (0.3, not 0.30000001192...) whether they come as a tensor,
    # an array or a list of NumPy scalars: int(10 * (1 - 0.3)) = 7 each time
    ratios = [0.3, 0.7, 0.9]
    expected = [int(10 * (1 - r)) for r in ratios]
    for given in (ratios, torch.tensor(ratios), np.array(ratios, dtype=np.float32),
                  [np.float32(r) for r in ratios], [np.float16(r) for r in ratios], [np.float64(r) for r in ratios]):
        assert ragged_random_masking(3, 10, given, seed=0).num_kept.tolist() == expected, given


def test_ragged_masking_compiles_for_new_ratio_sets():
    # the same compiled function takes ratio sets it has not seen, without a trace of Python's max(default=)
    fn = torch.compile(lambda ratios, noise: ragged_random_masking(2, 16, ratios, noise=noise, backend="torch").mask,
                       backend="eager", fullgraph=True)
    noise = torch.rand(2, 16)
    for ratios in ([0.5, 0.25], [0.75, 0.125], [0.0, 0.5]):
        assert torch.equal(fn(ratios, noise), ragged_random_masking(2, 16, ratios, noise=noise).mask)


@pytest.mark.gpu
def test_gpu_generators_match_torch():
    dev = "cuda"
    assert_same(simmim_masking(64, 192, 32, 4, 0.6, seed=3, device=dev, backend="triton"),
                simmim_masking(64, 192, 32, 4, 0.6, seed=3, device=dev, backend="torch"))
    assert_same(tube_masking(64, (8, 14, 14), 0.9, seed=3, device=dev, backend="triton"),
                tube_masking(64, (8, 14, 14), 0.9, seed=3, device=dev, backend="torch"))
    scores = torch.rand(256, 196, device=dev)
    assert_same(importance_masking(scores, 0.75, seed=3, backend="triton"),
                importance_masking(scores, 0.75, seed=3, backend="torch"))
    ratios = torch.rand(256).mul(0.5).add(0.4).tolist()
    assert_same(ragged_random_masking(256, 196, ratios, seed=3, device=dev, backend="triton"),
                ragged_random_masking(256, 196, ratios, seed=3, device=dev, backend="torch"))
    assert_same(block_masking(256, (14, 14), 75, 16, seed=3, device=dev, backend="triton"),
                block_masking(256, (14, 14), 75, 16, seed=3, device=dev, backend="torch"))
    sample_ids = torch.randperm(10_000)[:256]
    assert_same(block_masking(256, (14, 14), 75, 16, seed=3, sample_ids=sample_ids, device=dev, backend="triton"),
                block_masking(256, (14, 14), 75, 16, seed=3, sample_ids=sample_ids, device=dev, backend="torch"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:  # device-side generators never wait for the device
        ragged_random_masking(256, 196, ratios, device=dev, backend="triton")
        tube_masking(64, (8, 14, 14), 0.9, device=dev, backend="triton")
        simmim_masking(64, 192, 32, 4, 0.6, device=dev, backend="triton")
        importance_masking(scores, 0.75, backend="triton")
        block_masking(256, (14, 14), 75, 16, device=dev, backend="triton")
        block_masking(256, (14, 14), 75, 16, seed=3, sample_ids=sample_ids, device=dev, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode(0)
