import pytest
import torch

from mimfast.ops import IMAGENET_MEAN, IMAGENET_STD, videomae_pixel_loss, videomae_pixel_loss_ref
from mimfast.ops.patchify import patchify


def assert_by_error_ratio(out, same_dtype, ref64, rel_atol=1e-6):
    """max|out - ref64| <= 2 * max|torch in the same dtype - ref64| + atol (STYLE.md)."""
    out, same_dtype = out.double(), same_dtype.double()
    atol = rel_atol * max(1.0, ref64.abs().max().item())
    err, base = (out - ref64).abs().max().item(), (same_dtype - ref64).abs().max().item()
    assert err <= 2 * base + atol, f"error {err:.3e} > 2 * {base:.3e} + {atol:.1e}"


# Half precision on the CPU interpreter: fp16 only. The interpreter converts fp32 to bf16 by truncation (a GPU
# rounds to nearest even), which alone doubles the rounding error of every stored bf16 gradient; bf16 is checked
# on CUDA.
HALF = [pytest.param(torch.float16, "cpu", id="fp16"),
        pytest.param(torch.bfloat16, "cuda", id="bf16_cuda", marks=pytest.mark.gpu)]


def tube_mask(N, t, hw, masked_per_slice):
    """VideoMAE tube masking: one spatial mask per sample shared by every time slice."""
    spatial = torch.zeros(N, hw, dtype=torch.bool)
    spatial.scatter_(1, torch.argsort(torch.rand(N, hw), dim=1)[:, :masked_per_slice], True)
    return spatial.repeat(1, t)


def run_case(pred, videos, mask, p, pt, view=lambda t: t, **kw):
    """Kernel vs float64 reference vs torch in pred's dtype, loss and gradient, same grad_output. ``view`` maps
    the leaf ``pred`` to the tensor the loss gets (a strided view, say): the gradients compared are the leaf's."""
    # half precision: a power-of-two grad_output, as the gradient is rounded to pred's dtype in the forward
    half = pred.dtype in (torch.float16, torch.bfloat16)
    grad_out = (torch.tensor(0.5) if half else torch.rand(()) + 0.5).to(pred.device)
    x = pred.detach().clone().requires_grad_()
    loss = videomae_pixel_loss(view(x), videos, mask, p, pt, backend="triton", **kw)
    loss.backward(grad_out)
    x32 = pred.detach().clone().requires_grad_()
    videomae_pixel_loss_ref(view(x32), videos, mask, p, pt, **kw).backward(grad_out)
    x64 = pred.detach().double().requires_grad_()
    loss64 = videomae_pixel_loss_ref(view(x64), videos.double(), mask, p, pt, **kw)
    loss64.backward(grad_out.double())
    loss32 = videomae_pixel_loss_ref(view(pred), videos, mask, p, pt, **kw)
    assert torch.isfinite(x.grad).all() and x.grad.dtype == pred.dtype
    assert_by_error_ratio(loss, loss32, loss64)
    assert_by_error_ratio(x.grad, x32.grad, x64.grad)
    return loss, x.grad


@pytest.mark.parametrize("norm_target", [True, False], ids=["norm_target", "raw_target"])
@pytest.mark.parametrize("shape", [(2, 3, 4, 8, 12, 4, 2), (1, 3, 2, 16, 16, 8, 2), (3, 1, 3, 4, 8, 4, 3),
                                   (1, 3, 4, 32, 32, 16, 2)],
                         ids=["N2_T4_p4", "P768_pt2_p8", "C1_pt3_prime", "P1536_pt2_p16"])
def test_matches_float64(shape, norm_target, channel_sums, loss_transpose):
    N, C, T, H, W, p, pt = shape
    videos = torch.randn(N, C, T, H, W)
    t, hw = T // pt, (H // p) * (W // p)
    mask = tube_mask(N, t, hw, max(1, hw * 3 // 4))
    Lm = int(mask[0].sum())
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if C == 3 else ((0.5,), (0.25,))
    pred = torch.randn(N, Lm, pt * p * p * C)
    run_case(pred, videos, mask, p, pt, norm_target=norm_target, mean=mean, std=std)


@pytest.mark.parametrize("dtype,device", HALF)
def test_half_precision_pred(dtype, device):
    videos = torch.randn(2, 3, 4, 8, 8, device=device)
    mask = tube_mask(2, 2, 4, 3).to(device)
    pred = torch.randn(2, 6, 96, device=device).to(dtype)
    for norm_target in (True, False):
        run_case(pred, videos, mask, 4, 2, norm_target=norm_target)


def test_random_non_tube_mask_constant_cubes_and_all_masked(channel_sums, loss_transpose):
    N, C, T, H, W, p, pt = 2, 3, 4, 8, 8, 4, 2
    videos = torch.randn(N, C, T, H, W)
    videos[:, :, :2, :4, :4] = 0.3  # the first cube of each sample is constant: std 0
    L = (T // pt) * (H // p) * (W // p)
    mask = torch.zeros(N, L, dtype=torch.bool)
    mask.scatter_(1, 1 + torch.argsort(torch.rand(N, L - 1), dim=1)[:, :4], True)  # 4 random cubes, not cube 0
    mask[:, 0] = True  # + the constant one: 5 per sample
    run_case(torch.randn(N, 5, 96), videos, mask, p, pt)
    run_case(torch.randn(N, L, 96), videos, torch.ones(N, L, dtype=torch.bool), p, pt)


@pytest.mark.parametrize("huge", ["videos", "pred"], ids=["huge_videos", "huge_pred"])
@pytest.mark.parametrize("norm_target", [True, False], ids=["norm_target", "raw_target"])
def test_huge_values(norm_target, huge, channel_sums):
    # huge videos: un-normalised values around 7e3 +- 2e3 (per-channel statistics of a large offset), predictions at
    # the target's scale; huge pred: predictions 1e4 times the target's scale
    N, C, T, H, W, p, pt = 2, 3, 4, 8, 8, 4, 2
    videos = torch.randn(N, C, T, H, W)
    mask = tube_mask(N, T // pt, 4, 3)
    pred = torch.randn(N, int(mask[0].sum()), pt * p * p * C)
    if huge == "videos":
        videos = videos * 1e4 + 3e4
        if not norm_target:
            pred = pred * 2e3 + 7e3
    else:
        pred = pred * 1e4
    run_case(pred, videos, mask, p, pt, norm_target=norm_target)


@pytest.mark.parametrize("norm_target", [True, False], ids=["norm_target", "raw_target"])
def test_one_masked_token_per_sample(norm_target):
    # 3 rows in all, fewer than one program's rows; the masked token is the first, a middle and the last one
    N, C, T, H, W, p, pt = 3, 3, 4, 8, 12, 4, 2
    L = (T // pt) * (H // p) * (W // p)
    mask = torch.zeros(N, L, dtype=torch.bool)
    mask[torch.arange(N), torch.tensor([0, 7, L - 1])] = True
    run_case(torch.randn(N, 1, pt * p * p * C), torch.randn(N, C, T, H, W), mask, p, pt, norm_target=norm_target)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_masked_token_gives_zero(backend):
    # pred [N, 0, P]: both backends 0 with a zero gradient (an empty mean would be NaN), as masked_pixel_loss
    N, C, T, H, W, p, pt = 2, 3, 2, 8, 8, 4, 2
    pred = torch.randn(N, 0, pt * p * p * C, requires_grad=True)
    mask = torch.zeros(N, (T // pt) * (H // p) * (W // p), dtype=torch.bool)
    loss = videomae_pixel_loss(pred, torch.randn(N, C, T, H, W), mask, p, pt, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and pred.grad.shape == pred.shape


@pytest.mark.parametrize("layout", ["pred_transposed", "pred_element_stride_2", "pred_sample_minor",
                                    "videos_channels_last_strided_frames"])
def test_non_contiguous_inputs(layout):
    N, C, T, H, W, p, pt = 2, 3, 4, 8, 8, 4, 2
    mask = tube_mask(N, T // pt, 4, 2)
    R, P = int(mask[0].sum()), pt * p * p * C
    videos = torch.randn(N, C, T, H, W)
    view = lambda t: t  # noqa: E731
    if layout == "pred_transposed":  # element stride R
        base, view = torch.randn(N, P, R), lambda t: t.transpose(1, 2)
    elif layout == "pred_element_stride_2":  # not dense: half of the leaf's gradient must stay 0
        base, view = torch.randn(N, R, 2 * P), lambda t: t[..., ::2]
    elif layout == "pred_sample_minor":
        base, view = torch.randn(R, N, P), lambda t: t.transpose(0, 1)
    else:
        base = torch.randn(N, R, P)
        videos = torch.randn(N, C, 2 * T, H, W).to(memory_format=torch.channels_last_3d)[:, :, ::2]
        assert not videos.is_contiguous()
    assert view(base).shape == (N, R, P)
    assert layout.startswith("videos") or not view(base).is_contiguous()
    run_case(base, videos, mask, p, pt, view=view)


@pytest.mark.parametrize("in_place", [False, True], ids=["separate_grad", "grad_in_pred"])
def test_poisoned_buffers_fully_overwritten(in_place, monkeypatch):
    """At the launcher level, with the per-channel normalisation and the un-normalisation: the token list, the
    flags, the partial sums and the gradient start as poison and every element is written."""
    from mimfast.kernels.pixel_loss import launch_loss_finalize, launch_masked_ids, launch_pixel_loss, num_partials
    from mimfast.ops.masked_pixel_loss import NORM_CHANNEL
    from mimfast.ops.videomae_pixel_loss import STD_EPS, masked_ids

    N, C, T, H, W, p, pt = 3, 3, 2, 8, 12, 4, 2
    videos = torch.randn(N, C, T, H, W)
    mask = tube_mask(N, T // pt, 6, 3)
    R, P = int(mask[0].sum()), pt * p * p * C  # 9 rows: not a multiple of the rows per program
    pred = torch.randn(N, R, P)
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -1)

    short = mask.clone()
    short[1, int(short[1].nonzero()[0])] = False  # sample 1 masks R - 1 tokens
    # launch_masked_ids allocates its outputs itself: poison every torch.empty for its calls only
    with monkeypatch.context() as patch:
        patch.setattr(torch, "empty", poisoned_empty)
        ids, bad = launch_masked_ids(mask, R)
        short_ids, short_bad = launch_masked_ids(short, R)
    assert torch.equal(ids, masked_ids(mask, R)) and torch.equal(bad, torch.zeros(N, dtype=torch.int32))
    assert torch.equal(short_bad, torch.tensor([0, 1, 0], dtype=torch.int32))
    # the row past sample 1's count still holds a valid token index
    assert torch.equal(short_ids[:, :R - 1], masked_ids(short, R - 1)) and short_ids[1, R - 1] == 0

    stats = torch.tensor(IMAGENET_MEAN + IMAGENET_STD, dtype=torch.float32).view(2, C)
    partials = torch.full((num_partials(N * R, pred.shape[-1], NORM_CHANNEL),), float("nan"))
    buf = pred.clone()
    grad = buf if in_place else torch.full_like(pred, float("nan"))
    launch_pixel_loss(buf, videos, ids, None, None, N * R, partials, grad, p, pt, NORM_CHANNEL, False, STD_EPS, stats)
    assert torch.isfinite(partials).all() and torch.isfinite(grad).all()
    x = pred.clone().requires_grad_()
    loss = videomae_pixel_loss(x, videos, mask, p, pt, backend="triton")
    loss.backward()
    assert torch.equal(grad, x.grad)
    assert torch.equal(launch_loss_finalize(partials, None, N * R, P, torch.float32, bad), loss.detach())
    assert torch.isnan(launch_loss_finalize(partials, None, N * R, P, torch.float32, short_bad))
    x32, x64 = pred.clone().requires_grad_(), pred.double().requires_grad_()
    loss32 = videomae_pixel_loss_ref(x32, videos, mask, p, pt)
    loss32.backward()
    loss64 = videomae_pixel_loss_ref(x64, videos.double(), mask, p, pt)
    loss64.backward()
    assert_by_error_ratio(loss.detach(), loss32.detach(), loss64.detach())
    assert_by_error_ratio(grad, x32.grad, x64.grad)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_unequal_counts_raise_on_cpu(backend):
    videos = torch.randn(2, 3, 2, 8, 8)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, :2] = True
    mask[1, :3] = True
    pred = torch.randn(2, 2, 96)
    with pytest.raises(ValueError, match=r"as many tokens as pred has rows \(2\); the mask masks \[2, 3\]"):
        videomae_pixel_loss(pred, videos, mask, 4, 2, backend=backend)
    mask[1, 2] = False  # equal counts, but not pred's rows
    with pytest.raises(ValueError, match=r"masks \[2, 2\]"):
        videomae_pixel_loss(pred[:, :1], videos, mask, 4, 2, backend=backend)


@pytest.mark.gpu
def test_unequal_counts_give_nan_on_the_device_without_a_sync():
    videos = torch.randn(2, 3, 2, 8, 8, device="cuda")
    mask = torch.zeros(2, 4, dtype=torch.bool, device="cuda")
    mask[0, :2] = True
    mask[1, :3] = True
    pred = torch.randn(2, 2, 96, device="cuda")
    assert torch.isnan(videomae_pixel_loss(pred, videos, mask, 4, 2, backend="triton"))


def test_reference_against_explicit_formula():
    """The reference, against a formulation written cube by cube and channel by channel."""
    N, C, T, H, W, p, pt = 1, 2, 2, 4, 4, 2, 2
    videos = torch.randn(N, C, T, H, W, dtype=torch.float64)
    mean, std = (0.4, 0.6), (0.2, 0.3)
    mask = torch.tensor([[True, False, False, True]])
    pred = torch.randn(N, 2, pt * p * p * C, dtype=torch.float64)
    x = videos * torch.tensor(std, dtype=torch.float64).view(1, C, 1, 1, 1) + torch.tensor(mean).view(1, C, 1, 1, 1)
    total, count = 0.0, 0
    for j, l in enumerate([0, 3]):
        gh, gw = divmod(l, W // p)
        cube = torch.stack([x[0, c, :pt, gh * p:(gh + 1) * p, gw * p:(gw + 1) * p] for c in range(C)], dim=-1)
        cube = cube.reshape(-1, C)  # (t, row, col) x channel
        cube = (cube - cube.mean(0)) / (cube.std(0, unbiased=True) + 1e-6)
        total += ((pred[0, j] - cube.reshape(-1)) ** 2).sum().item()
        count += cube.numel()
    ref = videomae_pixel_loss_ref(pred, videos, mask, p, pt, mean=mean, std=std)
    assert abs(ref.item() - total / count) < 1e-12
    assert patchify(videos, p, pt).shape == (N, 4, pt * p * p * C)


def test_bit_equality_and_input_errors():
    videos = torch.randn(2, 3, 4, 8, 8)
    mask = tube_mask(2, 2, 4, 2)
    pred = torch.randn(2, 4, 96)
    outs = []
    for _ in range(2):
        x = pred.clone().requires_grad_()
        loss = videomae_pixel_loss(x, videos, mask, 4, 2, backend="triton")
        loss.backward()
        outs.append((loss.detach(), x.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    with pytest.raises(TypeError, match="bool"):
        videomae_pixel_loss(pred, videos, mask.float(), 4, 2)
    with pytest.raises(ValueError, match="mean and std"):
        videomae_pixel_loss(pred, videos, mask, 4, 2, mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match="frames"):
        videomae_pixel_loss(pred, videos[:, :, :3], mask, 4, 2)


@pytest.mark.gpu
def test_gpu_bf16_videomae_b_shape(loss_transpose):
    torch.manual_seed(1)
    N, T, p, pt = 2, 16, 16, 2
    videos = torch.randn(N, 3, T, 224, 224, device="cuda")
    mask = tube_mask(N, T // pt, 196, 176).cuda()
    pred = torch.randn(N, int(mask[0].sum()), 1536, device="cuda").bfloat16()
    for norm_target in (True, False):
        run_case(pred, videos, mask, p, pt, norm_target=norm_target)


@pytest.mark.slow
def test_real_videomae_b_shape_interpreter():
    # 16 frames of 224 x 224, cubes 2 x 16 x 16 (P = 1536, L = 1568), tube masking at ratio 0.9
    N, T, p, pt = 1, 16, 16, 2
    videos = torch.randn(N, 3, T, 224, 224)
    mask = tube_mask(N, T // pt, 196, 176)
    pred = torch.randn(N, int(mask[0].sum()), 1536)
    run_case(pred, videos, mask, p, pt)


def two_runs(pred, videos, mask, p, pt, **kw):
    """(loss, d loss / d pred) of two identical calls."""
    outs = []
    for _ in range(2):
        x = pred.clone().requires_grad_()
        loss = videomae_pixel_loss(x, videos, mask, p, pt, backend="triton", **kw)
        loss.backward()
        outs.append((loss.detach(), x.grad))
    return outs


@pytest.mark.gpu
@pytest.mark.parametrize("videos_dtype", [torch.float32, torch.bfloat16], ids=["videos_fp32", "videos_bf16"])
@pytest.mark.parametrize("norm_target", [True, False], ids=["norm_target", "raw_target"])
def test_gpu_bf16_run_to_run_bit_equality(norm_target, videos_dtype, loss_transpose):
    torch.manual_seed(2)
    N, T, p, pt = 4, 16, 16, 2
    videos = torch.randn(N, 3, T, 224, 224, device="cuda").to(videos_dtype)
    mask = tube_mask(N, T // pt, 196, 176).cuda()
    pred = torch.randn(N, int(mask[0].sum()), 1536, device="cuda").bfloat16()
    (loss_a, grad_a), (loss_b, grad_b) = two_runs(pred, videos, mask, p, pt, norm_target=norm_target)
    assert torch.isfinite(loss_a) and torch.isfinite(grad_a).all() and grad_a.dtype == torch.bfloat16
    assert torch.equal(loss_a, loss_b) and torch.equal(grad_a, grad_b)


def test_reference_compiles_into_one_graph():
    # the boolean selection of the masked tubes has a data-dependent size: compiled, the reference gathers them
    torch._dynamo.reset()
    videos = torch.randn(2, 3, 4, 8, 8)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, [1, 2, 5]] = mask[1, [0, 6, 7]] = True
    pred = torch.randn(2, 3, 2 * 4 * 4 * 3)
    compiled = torch.compile(videomae_pixel_loss_ref, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(pred, videos, mask, 4, 2), videomae_pixel_loss_ref(pred, videos, mask, 4, 2))
    uneven = mask.clone()
    uneven[1, 0] = False  # two masked tubes in sample 1, three in sample 0: NaN, where eager fails to reshape
    assert torch.isnan(compiled(pred, videos, uneven, 4, 2))
