import pytest
import torch

from mimfast.backend import BackendUnavailableError
from mimfast.ops import gather_patches, gather_patches_ref, random_masking
from mimfast.ops.patchify import grid_size, patchify


@pytest.fixture
def poison(monkeypatch):
    """Every floating tensor the op allocates with torch.empty starts as NaN: an unwritten element shows."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)


def num_patches(shape, p, t=None):
    L = 1
    for g in grid_size(shape, p, t):
        L *= g
    return L


def kept(shape, p, ratio, t=None):
    return random_masking(shape[0], num_patches(shape, p, t), ratio).ids_keep


# (shape, patch, tubelet, mask ratio): real 196/256-patch grids, odd sizes, video cubes, K = 0 and K = L
CASES = {
    "vit_224px_p16_L196": ((2, 3, 224, 224), 16, None, 0.75),
    "64px_p4_L256_batch1": ((1, 3, 64, 64), 4, None, 0.75),
    "odd_p3_C5": ((3, 5, 9, 12), 3, None, 0.5),
    "p14_C1": ((2, 1, 28, 42), 14, None, 0.5),
    "video_t2_p8": ((2, 3, 4, 32, 32), 8, 2, 0.9),
    "video_t3_p4_C2": ((1, 2, 6, 8, 12), 4, 3, 0.5),
    "keep_none": ((2, 3, 16, 16), 4, None, 0.99),
    "keep_all": ((2, 3, 16, 16), 4, None, 0.0),
    # real patch sizes on small grids: ViT-H/14 P = 588, ViT-B/16 P = 768, VideoMAE 2x16x16 P = 1536
    "vith_p14_P588": ((2, 3, 42, 56), 14, None, 0.75),
    "vitb_p16_P768_batch1": ((1, 3, 48, 64), 16, None, 0.5),
    "videomae_t2_p16_P1536": ((2, 3, 4, 32, 48), 16, 2, 0.5),
    "videomae_P1536_ratio09": ((1, 3, 4, 64, 80), 16, 2, 0.9),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_reference_exactly(case, poison, gather_transpose):
    shape, p, t, ratio = case
    imgs = torch.randn(shape)
    ids_keep = kept(shape, p, ratio, t)
    out = gather_patches(imgs, ids_keep, p, t, backend="triton")
    ref = gather_patches_ref(imgs, ids_keep, p, t)
    assert out.shape == ref.shape == (shape[0], ids_keep.shape[1], ref.shape[-1])
    assert torch.equal(out, ref)  # a copy: bit-equal, and no NaN left from the poisoned buffer


def test_chunk_size_pads_rows_least():
    from mimfast.kernels.gather_patches import GATHER_TILE, chunk_size, tile_config

    # P 768 and 1536 split exactly; P 588 (ViT-H/14) in 5 chunks of 128 (640 values) rather than 1024; small P whole;
    # a big patch in chunks of at most GATHER_TILE values (a C 4, p 64 patch: 16384 values)
    assert [chunk_size(P) for P in (768, 1536, 588, 48, 27, 128, 4096)] == [256, 512, 128, 64, 32, 128, 4096]
    assert chunk_size(6144) == 2048 and chunk_size(16384) == chunk_size(2**21) == GATHER_TILE
    for contiguous in (False, True):  # too big a patch to take whole: chunks either way
        programs, cfg = tile_config(1, 2**21, 3, contiguous)
        assert cfg["BLOCK_P"] * cfg["ROWS"] <= GATHER_TILE and programs == 3 * 2**21 // GATHER_TILE
        assert not cfg["TRANSPOSE"]


def test_whole_patches_transposed_where_the_image_allows():
    from mimfast.kernels.gather_patches import HAS_TL_GATHER, tile_config

    for C, S in ((3, 256), (3, 196), (3, 512), (5, 9)):  # ViT-B, ViT-H/14, VideoMAE-B cubes, an odd patch
        programs, cfg = tile_config(C, S, 1000, pixels_contiguous=True)
        assert cfg["TRANSPOSE"] == HAS_TL_GATHER
        if HAS_TL_GATHER:  # whole rows, and a tile of whole padded patches in the image's order
            assert cfg["BLOCK_P"] >= C * S and programs == -(-1000 // cfg["ROWS"])
            assert cfg["ROWS"] * cfg["BLOCK_C"] * cfg["BLOCK_S"] <= 4096
    assert not tile_config(3, 256, 1000, pixels_contiguous=False)[1]["TRANSPOSE"]  # channels last
    assert not tile_config(1, 256, 1000, pixels_contiguous=True)[1]["TRANSPOSE"]  # one channel: already in order


@pytest.mark.parametrize("tile", [128, 512, 4096])
@pytest.mark.parametrize("shape,p,t", [((3, 3, 48, 64), 16, None), ((2, 3, 42, 56), 14, None),
                                       ((1, 3, 4, 32, 48), 16, 2)], ids=["P768", "P588", "P1536"])
def test_tiles_of_several_rows_and_chunks(monkeypatch, poison, tile, shape, p, t, gather_transpose):
    # a tile smaller than a row (several chunks a row), of a few rows with a part-filled last tile, and of more
    # rows than there are: forward and backward equal the reference exactly
    import mimfast.kernels.gather_patches as kernels

    monkeypatch.setattr(kernels, "GATHER_TILE", tile)
    imgs = torch.randn(shape, requires_grad=True)
    L = num_patches(shape, p, t)
    ids_keep = torch.stack([torch.randperm(L)[: L // 2 + 1] for _ in range(shape[0])])  # odd row counts
    out = gather_patches(imgs, ids_keep, p, t, backend="triton")
    assert torch.equal(out, gather_patches_ref(imgs, ids_keep, p, t))
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, imgs, g)
    ref = imgs.detach().clone().requires_grad_()
    (gref,) = torch.autograd.grad(gather_patches_ref(ref, ids_keep, p, t), ref, g)
    assert torch.equal(gx, gref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_copy(dtype, gather_transpose):
    imgs = torch.randn(2, 3, 32, 32).to(dtype)
    ids_keep = kept(imgs.shape, 8, 0.5)
    out = gather_patches(imgs, ids_keep, 8, backend="triton")
    assert out.dtype == dtype and torch.equal(out, gather_patches_ref(imgs, ids_keep, 8))


def test_patch_order_is_row_col_channel():
    imgs = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    ids_keep = torch.tensor([[3], [0]])
    out = gather_patches(imgs, ids_keep, 4, backend="triton")
    # sample 0, patch 3 = grid (1, 1): pixel (4, 4) first, channels fastest
    assert out[0, 0, :3].tolist() == [imgs[0, c, 4, 4].item() for c in range(3)]
    assert out[0, 0, 3:6].tolist() == [imgs[0, c, 4, 5].item() for c in range(3)]
    assert out[1, 0, 12:15].tolist() == [imgs[1, c, 1, 0].item() for c in range(3)]


def noncontiguous():
    base = torch.randn(2, 3, 40, 36)
    video = torch.randn(2, 3, 4, 16, 16)
    return {
        "channels_last": (base[:, :, :32, :32].contiguous(memory_format=torch.channels_last), 8, None),
        "sliced": (base[:, :, 3:35, 2:34], 8, None),
        "channel_subset": (torch.randn(2, 5, 16, 16)[:, 1:4], 4, None),
        "video_channels_last_3d": (video.contiguous(memory_format=torch.channels_last_3d), 4, 2),
        "video_frame_stride": (torch.randn(2, 3, 8, 16, 16)[:, :, ::2], 8, 2),
    }


@pytest.mark.parametrize("name", noncontiguous().keys())
def test_noncontiguous_images(name, gather_transpose):
    imgs, p, t = noncontiguous()[name]
    assert not imgs.is_contiguous()
    ids_keep = kept(imgs.shape, p, 0.5, t)
    assert torch.equal(gather_patches(imgs, ids_keep, p, t, backend="triton"), gather_patches_ref(imgs, ids_keep, p, t))


@pytest.mark.parametrize("case", ["vit_224px_p16_L196", "odd_p3_C5", "video_t2_p8", "keep_none", "vith_p14_P588",
                                  "videomae_P1536_ratio09"])
def test_backward_scatters_into_zero_image(case, gather_transpose):
    shape, p, t, ratio = CASES[case]
    imgs = torch.randn(shape, requires_grad=True)
    ids_keep = kept(shape, p, ratio, t)
    out = gather_patches(imgs, ids_keep, p, t, backend="triton")
    grad = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, imgs, grad)
    (g_ref,) = torch.autograd.grad(gather_patches_ref(imgs, ids_keep, p, t), imgs, grad)
    assert torch.equal(g, g_ref)
    # pixels of removed patches get exactly zero
    removed = torch.ones(shape[0], num_patches(shape, p, t), dtype=torch.bool)
    removed.scatter_(1, ids_keep, False)
    assert (patchify(g, p, t)[removed] == 0).all()


def test_deterministic_forward_and_backward():
    imgs = torch.randn(2, 3, 4, 16, 16, requires_grad=True)
    ids_keep = kept(imgs.shape, 4, 0.75, 2)
    runs = []
    for _ in range(2):
        out = gather_patches(imgs, ids_keep, 4, 2, backend="triton")
        (g,) = torch.autograd.grad(out, imgs, torch.ones_like(out))
        runs.append((out, g))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_opcheck():
    imgs = torch.randn(2, 3, 8, 12, requires_grad=True)
    ids_keep = kept(imgs.shape, 4, 0.5)
    torch.library.opcheck(torch.ops.mimfast.gather_patches.default, (imgs, ids_keep, 4, 1))


def test_compiles_without_graph_break():
    imgs = torch.randn(2, 3, 8, 8)
    ids_keep = kept(imgs.shape, 4, 0.5)
    fn = torch.compile(lambda x, i: gather_patches(x, i, 4, backend="triton") * 2, backend="aot_eager", fullgraph=True)
    assert torch.equal(fn(imgs, ids_keep), 2 * gather_patches_ref(imgs, ids_keep, 4))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_inputs_raise_clear_errors(backend):
    imgs = torch.randn(2, 3, 16, 16)
    ids = kept(imgs.shape, 4, 0.5)
    with pytest.raises(TypeError, match="int64"):
        gather_patches(imgs, ids.int(), 4, backend=backend)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        gather_patches(imgs, ids + 16, 4, backend=backend)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        gather_patches(imgs, ids - 16, 4, backend=backend)
    with pytest.raises(ValueError, match="sample 1 does"):  # one image's gradient row would be lost, not summed
        gather_patches(imgs, torch.stack((ids[0], ids[1].index_fill(0, torch.tensor([1]), int(ids[1, 0])))), 4,
                       backend=backend)
    with pytest.raises(ValueError, match="N = 2"):
        gather_patches(imgs, ids[:1], 4, backend=backend)
    with pytest.raises(ValueError, match="keeps 17 patches of 16"):
        gather_patches(imgs, torch.zeros(2, 17, dtype=torch.int64), 4, backend=backend)
    with pytest.raises(ValueError, match="meta"):
        gather_patches(imgs, ids.to("meta"), 4, backend=backend)
    with pytest.raises(ValueError, match="not divisible"):
        gather_patches(imgs, ids, 5, backend=backend)
    with pytest.raises(ValueError, match=r"\[N, C, T, H, W\]"):
        gather_patches(imgs, ids, 4, 2, backend=backend)
    with pytest.raises(TypeError, match="floating"):
        gather_patches(imgs.long(), ids, 4, backend=backend)


def test_triton_refuses_float64_with_reason():
    imgs = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(BackendUnavailableError, match="float64"):
        gather_patches(imgs, kept(imgs.shape, 4, 0.5), 4, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,p,t", [((64, 3, 224, 224), 16, None), ((8, 3, 16, 224, 224), 16, 2),
                                       ((16, 3, 224, 224), 14, None)], ids=["vitb", "videomae", "vith_p14"])
def test_gpu_real_shapes(shape, p, t, dtype, gather_transpose):
    imgs = torch.randn(shape, device="cuda").to(dtype).requires_grad_()
    ids_keep = random_masking(shape[0], num_patches(shape, p, t), 0.75, device="cuda").ids_keep
    out = gather_patches(imgs, ids_keep, p, t, backend="triton")
    ref = gather_patches_ref(imgs, ids_keep, p, t)
    assert torch.equal(out, ref)
    grad = torch.randn_like(out)
    assert torch.equal(torch.autograd.grad(out, imgs, grad)[0], torch.autograd.grad(ref, imgs, grad)[0])


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,p,t", [((64, 3, 224, 224), 16, None), ((8, 3, 16, 224, 224), 16, 2),
                                       ((16, 3, 224, 224), 14, None)], ids=["vitb", "videomae", "vith_p14"])
def test_gpu_runs_twice_bit_identical(shape, p, t, dtype, layout, gather_transpose):
    # compiled kernels: the same call twice gives the same bits, forward and backward (each output element is one
    # copy, each image-gradient element at most one write, so nothing may depend on scheduling)
    imgs = torch.randn(shape, device="cuda").to(dtype)
    if layout == "channels_last":
        imgs = imgs.contiguous(memory_format=torch.channels_last if t is None else torch.channels_last_3d)
    imgs.requires_grad_()
    ids_keep = random_masking(shape[0], num_patches(shape, p, t), 0.75, device="cuda").ids_keep
    grad = torch.randn(*ids_keep.shape, shape[1] * (t or 1) * p * p, device="cuda").to(dtype)
    runs = []
    for _ in range(2):
        out = gather_patches(imgs, ids_keep, p, t, backend="triton")
        runs.append((out, torch.autograd.grad(out, imgs, grad)[0]))
    (out, g), (out_again, g_again) = runs
    assert out.shape == grad.shape and not out.isnan().any()
    assert torch.equal(out, out_again) and torch.equal(g, g_again)


def test_indices_from_the_masking_op_skip_the_value_check_until_changed(monkeypatch):
    import importlib

    from mimfast.ops import random_masking

    module = importlib.import_module("mimfast.ops.gather_patches")  # the module, not the op of the same name

    calls = []
    real_aminmax = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda t: calls.append(t) or real_aminmax(t))
    imgs = torch.randn(2, 3, 16, 16)
    info = random_masking(2, 16, 0.5)
    gather_patches(imgs, info.ids_keep, 4)
    assert calls == []  # straight from random_masking: known to be in [0, 16)
    ids = info.ids_keep.clone()
    gather_patches(imgs, ids, 4)
    assert len(calls) == 1  # a copy is checked
    info.ids_keep[0, 0] = 16  # an in-place change brings the check back
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        gather_patches(imgs, info.ids_keep, 4)
    # valid for [0, 16) says nothing about [0, 8)
    module.mark_valid_index(ids, 16)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        module.check_index(ids, 2, 4, ids.device, "ids")
    # the registry stays small however many masks are made
    for _ in range(3 * module._VALID_KEPT):
        random_masking(2, 16, 0.5)
    assert len(module._VALID) <= module._VALID_KEPT + 1


def test_numpy_integer_sizes_reach_the_kernels():
    import numpy as np

    from mimfast.ops import masked_pixel_loss, videomae_pixel_loss

    imgs = torch.rand(2, 3, 8, 8)
    ids = torch.stack([torch.randperm(16)[:4] for _ in range(2)])
    p = np.int64(2)
    assert torch.equal(gather_patches(imgs, ids, p, backend="triton"), gather_patches_ref(imgs, ids, 2))
    pred, mask = torch.randn(2, 16, 12), torch.ones(2, 16)
    torch.testing.assert_close(masked_pixel_loss(pred, imgs, mask, p, backend="triton"),
                               masked_pixel_loss(pred, imgs, mask, 2, backend="torch"))
    video, tubes, vpred = torch.randn(2, 3, 2, 4, 4), torch.tensor([[1, 1, 0, 0]] * 2).bool(), torch.randn(2, 2, 24)
    torch.testing.assert_close(videomae_pixel_loss(vpred, video, tubes, p, np.int32(2), backend="triton"),
                               videomae_pixel_loss(vpred, video, tubes, 2, 2, backend="torch"))


def test_tl_gather_only_from_the_triton_that_compiles_it(monkeypatch):
    # Triton 3.3 has tl.gather but lowers it with warp shuffles over the whole tile (or fails to compile it): the
    # TRANSPOSE path needs 3.4
    import triton
    import triton.language as tl

    from mimfast.kernels import gather_patches as kernels

    for version, parsed in (("3.3.1", (3, 3)), ("3.4.0", (3, 4)), ("3.10.0+git1a2b3c", (3, 10)), ("dev", (0, 0))):
        monkeypatch.setattr(triton, "__version__", version)
        assert kernels._triton_version() == parsed
    monkeypatch.undo()
    assert kernels.HAS_TL_GATHER == (hasattr(tl, "gather") and kernels._triton_version() >= (3, 4))
    if not kernels.HAS_TL_GATHER:
        assert not kernels.transposes(3, 256, True, True, 1024)
