
import pytest
import torch
from compile_check import assert_compiles_for_h100

from mimfast.backend import BackendUnavailableError
from mimfast.ops import masked_pixel_loss, masked_pixel_loss_ref, random_masking, videomae_pixel_loss
from mimfast.ops.masked_pixel_loss import NORM_NONE, NORM_PATCH, pixel_loss_op


def assert_by_error_ratio(out, same_dtype, ref64, rel_atol=1e-6):
    """max|out - ref64| <= 2 * max|torch in the same dtype - ref64| + atol (STYLE.md)."""
    out, same_dtype = out.double(), same_dtype.double()
    atol = rel_atol * max(1.0, ref64.abs().max().item())
    err, base = (out - ref64).abs().max().item(), (same_dtype - ref64).abs().max().item()
    assert err <= 2 * base + atol, f"error {err:.3e} > 2 * {base:.3e} + {atol:.1e}"


def grad_output_for(dtype):
    """A random grad_output; for half precision a power of two (1 in plain training, a GradScaler scale under
    fp16), since the gradient is rounded to pred's dtype in the forward and any other factor rounds it again."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.tensor(2.0 ** torch.randint(-3, 4, ()).item())
    return torch.rand(()) + 0.5


# Half precision on the CPU interpreter: fp16 only. The interpreter converts fp32 to bf16 by truncation (a GPU
# rounds to nearest even), which alone doubles the rounding error of every stored bf16 gradient; bf16 is checked
# on CUDA.
HALF = [pytest.param(torch.float16, "cpu", id="fp16"),
        pytest.param(torch.bfloat16, "cuda", id="bf16_cuda", marks=pytest.mark.gpu)]


def run_case(pred, imgs, mask, p, rel_atol=1e-6, **kw):
    """Kernel vs float64 reference vs torch in pred's dtype: loss and gradient for pred, same grad_output."""
    grad_out = grad_output_for(pred.dtype).to(pred.device)
    x = pred.detach().clone().requires_grad_()
    loss = masked_pixel_loss(x, imgs, mask, p, backend="triton", **kw)
    loss.backward(grad_out)
    x32 = pred.detach().clone().requires_grad_()
    loss32 = masked_pixel_loss_ref(x32, imgs, mask, p, **kw)
    loss32.backward(grad_out)
    x64 = pred.detach().double().requires_grad_()
    m64 = None if mask is None or mask.dtype == torch.bool else mask.double()
    loss64 = masked_pixel_loss_ref(x64, imgs.double(), mask if m64 is None else m64, p, **kw)
    loss64.backward(grad_out.double())
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert x.grad.shape == pred.shape and x.grad.dtype == pred.dtype
    assert_by_error_ratio(loss, loss32, loss64, rel_atol)
    assert_by_error_ratio(x.grad, x32.grad, x64.grad, rel_atol)
    return loss, x.grad, loss64, x64.grad


def mae_inputs(N, C, H, W, p, ratio=0.75, dtype=torch.float32):
    imgs = torch.randn(N, C, H, W)
    L, P = (H // p) * (W // p), p * p * C
    info = random_masking(N, L, ratio)
    return torch.randn(N, L, P).to(dtype), imgs, info


SHAPES = {
    "tiny_16px_p4": (2, 3, 16, 16, 4),
    "P768_p16": (1, 3, 32, 32, 16),
    "P588_p14": (2, 3, 28, 14, 14),
    "prime_L5_C1": (3, 1, 20, 4, 4),
    "C5_L6": (2, 5, 8, 12, 4),
}


@pytest.mark.parametrize("kind", ["mse", "l1"])
@pytest.mark.parametrize("norm_pix", [False, True], ids=["raw", "norm_pix"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_full_pred_matches_float64(shape, norm_pix, kind, loss_transpose):
    pred, imgs, info = mae_inputs(*SHAPES[shape])
    run_case(pred, imgs, info.mask, SHAPES[shape][-1], norm_pix=norm_pix, kind=kind)


@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no_mask"])
@pytest.mark.parametrize("kind", ["mse", "l1"])
@pytest.mark.parametrize("norm_pix", [False, True], ids=["raw", "norm_pix"])
def test_masked_rows_only(norm_pix, kind, with_mask, loss_transpose):
    N, C, H, W, p = 3, 3, 16, 20, 4
    _, imgs, info = mae_inputs(N, C, H, W, p)
    L, K = info.mask.shape[1], info.ids_keep.shape[1]
    ids_masked = torch.argsort(info.ids_restore, dim=1)[:, K:]  # the removed patches, in shuffle order
    pred = torch.randn(N, L - K, p * p * C)
    loss, grad, *_ = run_case(pred, imgs, info.mask if with_mask else None, p, ids_masked=ids_masked,
                              norm_pix=norm_pix, kind=kind)
    # equal to the full-pred loss with the same rows scattered back and anything on the visible rows
    full = torch.randn(N, L, p * p * C)
    full.scatter_(1, ids_masked[..., None].expand(-1, -1, p * p * C), pred)
    full.requires_grad_()
    loss_full = masked_pixel_loss(full, imgs, info.mask, p, norm_pix=norm_pix, kind=kind, backend="triton")
    torch.testing.assert_close(loss_full, loss.detach(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype,device", HALF)
@pytest.mark.parametrize("img_dtype", [torch.float32, "same"], ids=["imgs_fp32", "imgs_same"])
def test_half_precision(dtype, device, img_dtype, loss_transpose):
    pred, imgs, info = mae_inputs(2, 3, 16, 24, 4, dtype=dtype)
    imgs = imgs.to(dtype if img_dtype == "same" else img_dtype)
    for norm_pix in (False, True):
        run_case(pred.to(device), imgs.to(device), info.mask.to(device), 4, norm_pix=norm_pix)


def test_video_cubes_with_tubelet(loss_transpose):
    N, C, T, H, W, p, pt = 2, 3, 4, 8, 8, 4, 2
    videos = torch.randn(N, C, T, H, W)
    L = (T // pt) * (H // p) * (W // p)
    info = random_masking(N, L, 0.5)
    pred = torch.randn(N, L, pt * p * p * C)
    run_case(pred, videos, info.mask, p, tubelet_size=pt, norm_pix=True)


@pytest.mark.parametrize("case", ["all_masked", "one_masked", "fractional_weights", "bool_mask", "int64_mask"])
def test_mask_edge_cases(case):
    pred, imgs, info = mae_inputs(2, 3, 12, 16, 4)
    mask = {
        "all_masked": torch.ones_like(info.mask),
        "one_masked": torch.zeros_like(info.mask).index_put_((torch.tensor([1]), torch.tensor([5])),
                                                             torch.tensor(1.0)),
        "fractional_weights": torch.rand_like(info.mask),
        "bool_mask": info.mask.bool(),
        "int64_mask": info.mask.long(),
    }[case]
    _, grad, *_ = run_case(pred, imgs, mask, 4, norm_pix=True)
    unmasked = (mask == 0)
    assert (grad[unmasked] == 0).all()


@pytest.mark.filterwarnings("ignore:var\\(\\)")
@pytest.mark.parametrize("ids", [False, True], ids=["full", "ids_masked_empty"])
def test_no_masked_patch_gives_zero_not_nan(ids):
    pred, imgs, info = mae_inputs(2, 3, 8, 8, 4)
    mask = torch.zeros_like(info.mask)
    kw = {}
    if ids:
        pred, kw = pred[:, :0], {"ids_masked": torch.zeros(2, 0, dtype=torch.long)}
    for backend in ("torch", "triton"):
        x = pred.clone().requires_grad_()
        loss = masked_pixel_loss(x, imgs, mask, 4, norm_pix=True, backend=backend, **kw)
        loss.backward()
        assert loss.item() == 0.0 and (x.grad == 0).all(), backend


def test_patch_base_offsets_past_int32():
    # a clip viewed out of a large buffer: the time stride times the tubelet passes 2^31 while the offsets inside
    # a patch stay below it, so the kernel takes the view, and its patch base offset must be an int64 product
    # (6 GiB of untouched, lazily mapped fp16 storage; only the viewed values are written)
    s_t = 2**30 + 2**16
    try:
        storage = torch.empty(3 * s_t + 512, dtype=torch.float16)
    except RuntimeError as e:
        pytest.skip(f"cannot map a 6 GiB buffer here: {e}")
    video = storage.as_strided((1, 1, 4, 16, 16), (256, 256, s_t, 16, 1))
    video.copy_(torch.randn(1, 1, 4, 16, 16))
    pred, mask = torch.randn(1, 2, 512, dtype=torch.float16), torch.ones(1, 2)
    for patch in (0, 1):  # the second temporal patch starts 2 * s_t > 2^31 elements in
        m = torch.zeros(1, 2).index_fill_(1, torch.tensor([patch]), 1.0)
        torch.testing.assert_close(masked_pixel_loss(pred, video, m, 16, tubelet_size=2, backend="triton"),
                                   masked_pixel_loss(pred, video, m, 16, tubelet_size=2, backend="torch"),
                                   rtol=2e-3, atol=2e-3)
    assert torch.isfinite(masked_pixel_loss(pred, video, mask, 16, tubelet_size=2, backend="triton"))


def test_final_sums_past_one_block_of_partials():
    # the loss's final pass reads its partials _FINAL_BLOCK at a time and the row weights' first pass runs several
    # programs past 1024 rows: sizes the small shapes above never reach
    from mimfast.kernels.pixel_loss import _FINAL_BLOCK, launch_loss_finalize, launch_weight_sums

    partials = torch.rand(2 * _FINAL_BLOCK + 5)
    loss = launch_loss_finalize(partials, None, 20000, 8, torch.float32)
    torch.testing.assert_close(loss.double(), partials.double().sum() / (8 * 20000), rtol=1e-6, atol=0)
    mask = torch.rand(3, 1500)
    wparts = launch_weight_sums(mask, None, 1500)
    assert wparts.numel() > 1
    torch.testing.assert_close(wparts.double().sum(), mask.double().sum(), rtol=1e-6, atol=0)
    loss = launch_loss_finalize(partials, wparts, 4500, 8, torch.float32)
    torch.testing.assert_close(loss.double(), partials.double().sum() / (8 * mask.double().sum()), rtol=1e-6, atol=0)


def test_unscored_rows_are_not_read_on_triton(loss_transpose):
    """The documented difference: a NaN in a row of weight 0 (prediction or image patch) leaves the kernel's loss
    finite, where the reference's loss * mask gives NaN; a NaN in a scored row gives NaN on both backends."""
    pred, imgs, info = mae_inputs(2, 3, 8, 8, 4)
    kept, removed = (info.mask[0] == 0).nonzero()[0, 0].item(), (info.mask[0] == 1).nonzero()[0, 0].item()
    for where, row, finite_on_triton in (("pred", kept, True), ("pred", removed, False), ("imgs", kept, True)):
        p, x = pred.clone(), imgs.clone()
        if where == "pred":
            p[0, row, 5] = float("nan")
        else:
            x[0, 1, (row // 2) * 4, (row % 2) * 4] = float("nan")
        assert torch.isnan(masked_pixel_loss(p, x, info.mask, 4, norm_pix=True, backend="torch"))
        loss = masked_pixel_loss(p, x, info.mask, 4, norm_pix=True, backend="triton")
        assert torch.isfinite(loss) == finite_on_triton, (where, row)


def test_transposed_reads_where_the_image_allows(monkeypatch):
    # with the setting on, contiguous multi-channel images are read in their own order; channels-last ones and
    # single-channel ones value by value (where patchify order is already close to the image's)
    import mimfast.kernels.pixel_loss as K
    from mimfast.kernels.gather_patches import HAS_TL_GATHER

    monkeypatch.setattr(K, "TRANSPOSE", True)
    seen = []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs["TRANSPOSE"])
                return real[grid](*args, **kwargs)
            return launch

    real = K.pixel_loss_kernel
    monkeypatch.setattr(K, "pixel_loss_kernel", Spy())
    for C, channels_last in ((3, False), (3, True), (1, False)):
        pred, imgs, info = mae_inputs(2, C, 8, 8, 4)
        if channels_last:
            imgs = imgs.contiguous(memory_format=torch.channels_last)
        loss = masked_pixel_loss(pred, imgs, info.mask, 4, norm_pix=True, backend="triton")
        assert torch.allclose(loss, masked_pixel_loss_ref(pred, imgs, info.mask, 4, norm_pix=True), rtol=1e-5)
    assert seen == [HAS_TL_GATHER, False, False]
    # the default (None): transposed only with per-channel statistics, VideoMAE's
    monkeypatch.setattr(K, "TRANSPOSE", None)
    seen.clear()
    pred, imgs, info = mae_inputs(2, 3, 8, 8, 4)
    masked_pixel_loss(pred, imgs, info.mask, 4, norm_pix=True, backend="triton")
    videos, mask = torch.randn(2, 3, 2, 8, 8), torch.zeros(2, 4, dtype=torch.bool)
    mask[:, ::2] = True
    videomae_pixel_loss(torch.randn(2, 2, 96), videos, mask, 4, 2, backend="triton")
    assert seen == [False, HAS_TL_GATHER]


def test_constant_patches_and_huge_values(loss_transpose):
    pred, imgs, info = mae_inputs(2, 3, 16, 16, 4)
    imgs[:, :, :8, :8] = 0.25  # four patches per sample with zero variance
    imgs[:, :, 8:, 8:] *= 1e4
    pred[:, ::3] *= 1e4
    for kind in ("mse", "l1"):
        run_case(pred, imgs, torch.ones_like(info.mask), 4, norm_pix=True, kind=kind)
        run_case(pred, imgs, info.mask, 4, norm_pix=False, kind=kind)


def test_non_contiguous_inputs(loss_transpose):
    N, C, H, W, p = 2, 3, 12, 16, 4
    L, P = (H // p) * (W // p), p * p * C
    pred = torch.randn(N, P, L).transpose(1, 2)  # element stride L
    imgs = torch.randn(N, C, H, W).to(memory_format=torch.channels_last)
    mask = torch.rand(N, 2 * L).round()[:, ::2]
    assert not pred.is_contiguous() and not imgs.is_contiguous() and not mask.is_contiguous()
    run_case(pred, imgs, mask, p, norm_pix=True)
    ids = torch.argsort(torch.rand(N, L), dim=1)[:, : L // 2]
    run_case(pred[:, : L // 2], imgs, mask, p, ids_masked=ids, kind="l1")


@pytest.mark.parametrize("in_place", [False, True], ids=["separate_grad", "grad_in_pred"])
def test_poisoned_buffers_fully_overwritten(in_place):
    from mimfast.kernels.pixel_loss import launch_loss_finalize, launch_pixel_loss, launch_weight_sums, num_partials

    pred, imgs, info = mae_inputs(2, 3, 12, 20, 4)
    N, L, P = pred.shape
    wparts = launch_weight_sums(info.mask, None, L)
    partials = torch.full((num_partials(N * L, P, NORM_PATCH),), float("nan"))
    buf = pred.clone()
    grad = buf if in_place else torch.full_like(pred, float("nan"))
    launch_pixel_loss(buf, imgs, None, info.mask, wparts, N * L, partials, grad, 4, 1, NORM_PATCH, False, 1e-6)
    assert torch.isfinite(wparts).all() and torch.isfinite(partials).all() and torch.isfinite(grad).all()
    x = pred.clone().requires_grad_()
    loss = masked_pixel_loss(x, imgs, info.mask, 4, norm_pix=True, backend="triton")
    loss.backward()
    assert torch.equal(grad, x.grad)
    assert torch.equal(launch_loss_finalize(partials, wparts, N * L, P, torch.float32), loss.detach())


@pytest.mark.parametrize("case", ["mae_full", "mae_masked_rows_l1", "video"])
def test_tile_sizes_agree(case, monkeypatch):
    """One row per program, a few, or many, and pred loaded early or late: the same per-row arithmetic, so the
    same gradients, and the loss up to the order of its fp32 sum. Rows of weight 0 hold NaN (never read), and the
    row count is not a multiple of the rows per program."""
    from mimfast.kernels import pixel_loss as kernels
    from mimfast.kernels.sizes import next_pow2
    from mimfast.ops import IMAGENET_MEAN, IMAGENET_STD, videomae_pixel_loss

    torch.manual_seed(0)
    if case == "video":
        videos = torch.randn(3, 2, 4, 8, 8)
        mask = torch.zeros(3, 8, dtype=torch.bool)
        mask[:, torch.tensor([0, 3, 5])] = True  # 3 masked cubes per sample: 9 rows
        pred = torch.randn(3, 3, 2 * 4 * 4 * 2)

        def run():
            x = pred.clone().requires_grad_()
            loss = videomae_pixel_loss(x, videos, mask, 4, 2, mean=IMAGENET_MEAN[:2], std=IMAGENET_STD[:2],
                                       backend="triton")
            loss.backward()
            return loss.detach(), x.grad
    else:
        pred, imgs, info = mae_inputs(3, 3, 12, 12, 4)  # 27 rows
        kw = {"norm_pix": True}
        if case == "mae_masked_rows_l1":
            ids = torch.argsort(torch.rand(3, 9), dim=1)[:, :5]  # 15 rows
            pred, kw = pred[:, :5].contiguous(), {"ids_masked": ids, "kind": "l1"}
        else:
            pred[info.mask == 0] = float("nan")

        def run():
            x = pred.clone().requires_grad_()
            loss = masked_pixel_loss(x, imgs, info.mask, 4, backend="triton", **kw)
            loss.backward()
            return loss.detach(), x.grad

    P = pred.shape[-1]
    results = []
    norm = 2 if case == "video" else 1 if case == "mae_full" else 0
    for rows, late in ((1, False), (4, False), (16, False), (4, True)):
        monkeypatch.setattr(kernels, "LOSS_TILE", rows * next_pow2(P) * (2 if norm == 2 else 1))
        monkeypatch.setattr(kernels, "LATE_PRED", late)
        assert kernels.rows_per_program(P, norm) == rows
        results.append(run())
    for loss, grad in results:
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        torch.testing.assert_close(loss, results[0][0], rtol=1e-6, atol=0)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-6, atol=1e-9)


def saved_for_backward(fn):
    """Run ``fn`` and return (shape, dtype) of every tensor autograd saves for its backward."""
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


@pytest.mark.parametrize("rows", ["all_rows", "masked_rows"])
def test_no_full_size_fp32_tensor_saved_for_backward(rows):
    # half-precision pred: the only [N, R, P] tensor kept for backward is the gradient, in pred's dtype
    pred, imgs, info = mae_inputs(2, 3, 16, 16, 4, dtype=torch.float16)
    N, L, P = pred.shape
    ids = torch.argsort(torch.rand(N, L), dim=1)[:, : L // 2] if rows == "masked_rows" else None
    x = (pred if ids is None else pred[:, : L // 2]).clone().requires_grad_()
    saved = saved_for_backward(lambda: masked_pixel_loss(x, imgs, None if ids is not None else info.mask, 4,
                                                         norm_pix=True, ids_masked=ids, backend="triton"))
    big = [(shape, dtype) for shape, dtype in saved if torch.Size(shape).numel() >= x.numel()]
    assert big == [(tuple(x.shape), torch.float16)], saved


@pytest.mark.parametrize("grad_out", [1.0, 0.25], ids=["grad_out_1", "grad_out_quarter"])
def test_backward_twice_with_retained_graph(grad_out):
    """The stored gradient is scaled in place only by a graph's last backward: retain_graph keeps it intact."""
    pred, imgs, info = mae_inputs(2, 3, 8, 12, 4)
    x = pred.clone().requires_grad_()
    loss = masked_pixel_loss(x, imgs, info.mask, 4, norm_pix=True, backend="triton")
    (first,) = torch.autograd.grad(loss, x, torch.tensor(grad_out), retain_graph=True)
    (second,) = torch.autograd.grad(loss, x, torch.tensor(0.5))
    (third,) = torch.autograd.grad(masked_pixel_loss(x, imgs, info.mask, 4, norm_pix=True, backend="triton"), x)
    assert torch.equal(first, third * grad_out) and torch.equal(second, third * 0.5)


def test_scale_kernel_in_place_and_skipped_at_one():
    from mimfast.kernels.pixel_loss import launch_scale_

    x = torch.randn(3, 5000)
    y = x.clone()
    assert launch_scale_(y, torch.tensor(1.0)) is y and torch.equal(y, x)
    launch_scale_(y, torch.tensor(-0.375))
    assert torch.equal(y, x * -0.375)
    h = x.half()
    launch_scale_(h, torch.tensor(3.0))
    assert torch.equal(h, (x.half().float() * 3.0).half())


def test_run_to_run_bit_equality(loss_transpose):
    pred, imgs, info = mae_inputs(3, 3, 16, 16, 4)
    outs = []
    for _ in range(2):
        x = pred.clone().requires_grad_()
        loss = masked_pixel_loss(x, imgs, info.mask, 4, norm_pix=True, backend="triton")
        loss.backward()
        outs.append((loss.detach(), x.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_no_grad_skips_gradient():
    pred, imgs, info = mae_inputs(2, 3, 8, 8, 4)
    with torch.no_grad():
        loss = masked_pixel_loss(pred, imgs, info.mask, 4, backend="triton")
    ref = masked_pixel_loss_ref(pred.double(), imgs.double(), info.mask.double(), 4)
    assert not loss.requires_grad
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-7)
    _, grad = pixel_loss_op(pred, imgs, info.mask, None, 4, 1, NORM_NONE, False, 1e-6, None, False)
    assert grad.numel() == 0


def test_reference_against_explicit_loops():
    """The reference itself, against a formulation that indexes pixels one by one."""
    N, C, H, W, p = 2, 2, 4, 6, 2
    imgs = torch.randn(N, C, H, W, dtype=torch.float64)
    L, P = (H // p) * (W // p), p * p * C
    pred = torch.randn(N, L, P, dtype=torch.float64)
    mask = torch.tensor([[1.0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1]])
    num, den = 0.0, 0.0
    for n in range(N):
        for l in range(L):
            gh, gw = divmod(l, W // p)
            t = [imgs[n, c, gh * p + r, gw * p + q].item() for r in range(p) for q in range(p) for c in range(C)]
            t = torch.tensor(t, dtype=torch.float64)
            t = (t - t.mean()) / (t.var(unbiased=True) + 1e-6).sqrt()
            num += mask[n, l].item() * ((pred[n, l] - t) ** 2).mean().item()
            den += mask[n, l].item()
    ref = masked_pixel_loss_ref(pred, imgs, mask, p, norm_pix=True)
    assert abs(ref.item() - num / den) < 1e-12


@pytest.mark.parametrize("dtype,masked", [(torch.bfloat16, 257), (torch.float16, 69632)], ids=["bf16", "fp16"])
def test_reference_sums_in_float32_for_half_inputs(dtype, masked):
    """A count of masked patches that bf16 rounds (257 -> 256), or that passes fp16's 65504: the half-precision
    reference sums over patches in float32, as MAE's float32 loss does, and still returns the inputs' dtype."""
    L = 69632
    imgs = torch.zeros(1, 1, 256, L // 256, dtype=dtype)
    pred = torch.full((1, L, 1), 3.0, dtype=dtype)  # |error| 3 in every patch, exact in both dtypes
    mask = torch.zeros(1, L)
    mask[0, :masked] = 1
    loss = masked_pixel_loss_ref(pred, imgs, mask, 1, kind="l1")
    assert loss.dtype == dtype and loss.item() == 3.0


def test_backend_refusals_and_input_errors():
    pred, imgs, info = mae_inputs(1, 3, 8, 8, 4)
    with pytest.raises(BackendUnavailableError, match="float64"):
        masked_pixel_loss(pred.double(), imgs, info.mask, 4, backend="triton")
    with pytest.raises(BackendUnavailableError, match="constants"):
        masked_pixel_loss(pred, imgs.clone().requires_grad_(), info.mask, 4, backend="triton")
    with pytest.raises(ValueError, match="ids_masked"):
        masked_pixel_loss(pred[:, :2], imgs, info.mask, 4)
    with pytest.raises(ValueError, match="mask is required"):
        masked_pixel_loss(pred, imgs, None, 4)
    with pytest.raises(ValueError, match="kind"):
        masked_pixel_loss(pred, imgs, info.mask, 4, kind="huber")
    with pytest.raises(ValueError, match="does not match"):
        masked_pixel_loss(pred[..., :-1], imgs, info.mask, 4)
    with pytest.raises(TypeError, match="bool, integer or floating"):
        masked_pixel_loss(pred, imgs, info.mask.to(torch.complex64), 4)
    # the imgs gradient exists on the reference path
    x = imgs.clone().requires_grad_()
    masked_pixel_loss(pred, x, info.mask, 4, norm_pix=True, backend="torch").backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_opcheck():
    pred, imgs, info = mae_inputs(2, 3, 8, 8, 4)
    ids = torch.argsort(info.ids_restore, dim=1)[:, 1:]
    pred = pred.requires_grad_()
    torch.library.opcheck(pixel_loss_op, (pred, imgs, info.mask, None, 4, 1, NORM_PATCH, False, 1e-6, None, True))
    torch.library.opcheck(pixel_loss_op, (pred[:, :3], imgs, None, ids, 4, 1, NORM_NONE, True, 1e-6, None, True))


_COMPILE_FOR_H100 = '''
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mimfast.kernels import pixel_loss as K

which = sys.argv[1]
if which == "simmim":
    sig = {"pred_ptr": "*bf16", "grad_ptr": "*bf16", "img_ptr": "*fp32", "mask_ptr": "*u8", "inv_denom_ptr": "*fp32",
           "partial_ptr": "*fp32", "L": "i32", "GH": "i32", "GW": "i32"}
    sig.update({k: "i32" for k in ("s_pn", "s_pc", "s_ph", "s_pw", "s_gn", "s_gc", "s_gh", "s_gw", "s_n", "s_c", "s_h",
                                   "s_w", "s_mn", "s_ml")})
    const = {"C": 3, "PS": 16, "BLOCK_S": 256, "BLOCK_C": 4, "COMPUTE_GRAD": True}
    fn, warps = K.simmim_loss_kernel, 4
elif which == "weight_sum":
    sig = {"ids_ptr": "*i64", "mask_ptr": "*fp32", "wpart_ptr": "*fp32", "total_rows": "i32", "R": "i32",
           "s_in": "i32", "s_ir": "i32", "s_mn": "i32", "s_ml": "i32"}
    const = {"s_ir": 1, "s_ml": 1, "HAS_IDS": True, "BLOCK": K._WEIGHT_BLOCK}
    fn, warps = K.weight_sum_kernel, 4
elif which == "finalize":
    sig = {"partial_ptr": "*fp32", "wpart_ptr": "*fp32", "bad_ptr": "*i32", "loss_ptr": "*fp32", "num_partials": "i32",
           "num_wparts": "i32", "row_count": "fp32", "num_bad": "i32"}
    const = {"P": 768, "HAS_MASK": True, "HAS_BAD": True, "BLOCK": K._FINAL_BLOCK, "BLOCK_G": K.MAX_WPARTS}
    fn, warps = K.loss_finalize_kernel, K._FINAL_WARPS
elif which == "scale":
    sig = {"x_ptr": "*bf16", "scale_ptr": "*fp32", "numel": "i64"}
    const = {"BLOCK": 4096}
    fn, warps = K.scale_inplace_kernel, 8
elif which == "masked_ids":
    sig = {"mask_ptr": "*u8", "ids_ptr": "*i64", "bad_ptr": "*i32", "L": "i32", "R": "i32", "s_mn": "i32",
           "s_ml": "i32"}
    const = {"s_ml": 1, "BLOCK_L": 2048}
    fn, warps = K.masked_ids_kernel, 4
else:
    video = which.startswith("video")
    sig = {"pred_ptr": "*bf16", "grad_ptr": "*bf16", "img_ptr": "*fp32", "ids_ptr": "*i64", "mask_ptr": "*fp32",
           "stats_ptr": "*fp32", "wpart_ptr": "*fp32", "partial_ptr": "*fp32", "total_rows": "i32", "R": "i32",
           "GH": "i32", "GW": "i32", "num_wparts": "i32", "row_count": "fp32"}
    sig.update({k: "i32" for k in ("s_pn", "s_pr", "s_pe", "s_gn", "s_gr", "s_n", "s_c", "s_t", "s_h", "s_w", "s_in",
                                   "s_ir", "s_mn", "s_ml")})
    sig["eps"] = "fp32"
    # the strides a contiguous launch specialises to 1
    const = {"s_pe": 1, "s_w": 1, "s_ir": 1, "s_ml": 1}
    P = 1536 if video else 588
    const.update({"C": 3, "PT": 2 if video else 1, "PS": 16 if video else 14, "BLOCK_P": 2048 if video else 1024,
                  "ROWS": K.rows_per_program(P, 2 if video else 1), "BLOCK_G": K.MAX_WPARTS, "NORM": 2 if video else 1,
                  "L1": which == "mae_l1", "UNNORM": video, "HAS_IDS": which != "mae_full", "HAS_MASK": not video,
                  "COMPUTE_GRAD": True, "LATE_PRED": K.LATE_PRED, "CHANNEL_SUMS": K.CHANNEL_SUMS,
                  "TRANSPOSE": which.endswith("transposed"), "BLOCK_C": 4, "BLOCK_S": 512 if video else 256,
                  "ROW_ALIGN": 4})
    fn, warps = K.pixel_loss_kernel, K.LOSS_WARPS
for k in const:
    sig[k] = "constexpr"
kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": warps})
assert kernel.asm["cubin"]
print("compiled")
'''


@pytest.mark.slow
@pytest.mark.parametrize("config", ["mae_full", "mae_l1", "mae_transposed", "video", "video_transposed", "simmim",
                                    "weight_sum", "finalize", "scale", "masked_ids"])
def test_kernels_compile_for_h100(config):
    # a real compilation to an sm_90 cubin without a GPU (no interpreter, in a subprocess): catches what the
    # interpreter accepts but the compiler rejects
    assert_compiles_for_h100(_COMPILE_FOR_H100, config)


@pytest.mark.slow
def test_real_mae_shape_interpreter():
    pred, imgs, info = mae_inputs(2, 3, 224, 224, 16)
    run_case(pred, imgs, info.mask, 16, norm_pix=True)


@pytest.mark.gpu
@pytest.mark.parametrize("norm_pix", [False, True], ids=["raw", "norm_pix"])
@pytest.mark.parametrize("patch", [16, 14])
def test_gpu_bf16_real_shapes(norm_pix, patch, loss_transpose):
    torch.manual_seed(1)
    imgs = torch.randn(8, 3, 224, 224, device="cuda")
    L = (224 // patch) ** 2
    info = random_masking(8, L, 0.75, device="cuda")
    pred = torch.randn(8, L, patch * patch * 3, device="cuda").bfloat16()
    run_case(pred, imgs, info.mask, patch, norm_pix=norm_pix)
    ids = torch.argsort(info.ids_restore, dim=1)[:, info.ids_keep.shape[1]:]
    run_case(pred[:, : ids.shape[1]], imgs, info.mask, patch, ids_masked=ids, norm_pix=norm_pix)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ids_masked_out_of_range_raise(backend):
    pred, imgs, info = mae_inputs(2, 3, 8, 8, 4)  # L = 4
    rows = pred[:, :2]
    for bad in (torch.tensor([[0, 4], [1, 2]]), torch.tensor([[0, -1], [1, 2]], dtype=torch.int32)):
        with pytest.raises(ValueError, match=r"ids_masked values must be in \[0, 4\)"):
            masked_pixel_loss(rows, imgs, None, 4, ids_masked=bad, backend=backend)
    with pytest.raises(TypeError, match=r"int64 \(or int32\)"):
        masked_pixel_loss(rows, imgs, None, 4, ids_masked=torch.zeros(2, 2), backend=backend)


def test_no_silent_second_derivative():
    imgs = torch.randn(2, 3, 8, 8)
    mask = random_masking(2, 4, 0.5).mask
    pred = torch.randn(2, 4, 48, requires_grad=True)
    loss = masked_pixel_loss(pred, imgs, mask, 4, norm_pix=True, backend="triton")
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(loss, pred, create_graph=True)
    assert torch.autograd.grad(loss, pred)[0].shape == pred.shape  # a plain backward as before


@pytest.mark.parametrize("weights", [[1.0, -1.0, 0.0, 0.0], [0.5, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
def test_weights_summing_to_zero_or_below_match_the_reference(weights):
    # the reference divides by the weight sum, or by 1 when it is 0: so does the kernel
    imgs = torch.rand(1, 1, 4, 4)
    pred = torch.randn(1, 4, 4, requires_grad=True)
    mask = torch.tensor([weights])
    got = masked_pixel_loss(pred, imgs, mask, 2, backend="triton")
    ref = masked_pixel_loss_ref(pred, imgs, mask, 2)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(torch.autograd.grad(got, pred)[0], torch.autograd.grad(ref, pred)[0])


def test_row_align_divides_every_row_stride():
    from mimfast.kernels.pixel_loss import row_align

    assert row_align(196 * 768, 768) == 16  # ViT-B rows: 16-byte vectors of bf16 either way
    assert row_align(256 * 588, 588, 256 * 588, 588) == 4  # ViT-H/14: 8-byte vectors of bf16
    assert row_align(49 * 588, 588, 196 * 588, 588) == 4
    assert row_align(48, 6) == 2 and row_align(27, 27) == 1


def test_loss_warps_keep_a_thread_within_32_values():
    from mimfast.kernels import pixel_loss as K

    assert K.loss_warps(4096) == K.LOSS_WARPS == 4  # ViT-B: 4 rows of 1024, as swept on the H100
    assert K.loss_warps(2048) == 4  # VideoMAE-B: one row of 2048
    assert K.loss_warps(8192) == 8  # one row of a 2 x 32 x 32 x 3 cube: 32 values a thread, not 64
    assert K.loss_warps(64) == 1
