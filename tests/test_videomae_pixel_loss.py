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


def run_case(pred, videos, mask, p, pt, **kw):
    # half precision: a power-of-two grad_output, as the gradient is rounded to pred's dtype in the forward
    half = pred.dtype in (torch.float16, torch.bfloat16)
    grad_out = (torch.tensor(0.5) if half else torch.rand(()) + 0.5).to(pred.device)
    x = pred.detach().clone().requires_grad_()
    loss = videomae_pixel_loss(x, videos, mask, p, pt, backend="triton", **kw)
    loss.backward(grad_out)
    x32 = pred.detach().clone().requires_grad_()
    videomae_pixel_loss_ref(x32, videos, mask, p, pt, **kw).backward(grad_out)
    x64 = pred.detach().double().requires_grad_()
    loss64 = videomae_pixel_loss_ref(x64, videos.double(), mask, p, pt, **kw)
    loss64.backward(grad_out.double())
    loss32 = videomae_pixel_loss_ref(pred, videos, mask, p, pt, **kw)
    assert torch.isfinite(x.grad).all() and x.grad.dtype == pred.dtype
    assert_by_error_ratio(loss, loss32, loss64)
    assert_by_error_ratio(x.grad, x32.grad, x64.grad)
    return loss, x.grad


@pytest.mark.parametrize("norm_target", [True, False], ids=["norm_target", "raw_target"])
@pytest.mark.parametrize("shape", [(2, 3, 4, 8, 12, 4, 2), (1, 3, 2, 16, 16, 8, 2), (3, 1, 3, 4, 8, 4, 3)],
                         ids=["N2_T4_p4", "P768_pt2_p8", "C1_pt3_prime"])
def test_matches_float64(shape, norm_target):
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


def test_random_non_tube_mask_constant_cubes_and_all_masked():
    N, C, T, H, W, p, pt = 2, 3, 4, 8, 8, 4, 2
    videos = torch.randn(N, C, T, H, W)
    videos[:, :, :2, :4, :4] = 0.3  # the first cube of each sample is constant: std 0
    L = (T // pt) * (H // p) * (W // p)
    mask = torch.zeros(N, L, dtype=torch.bool)
    mask.scatter_(1, 1 + torch.argsort(torch.rand(N, L - 1), dim=1)[:, :4], True)  # 4 random cubes, not cube 0
    mask[:, 0] = True  # + the constant one: 5 per sample
    run_case(torch.randn(N, 5, 96), videos, mask, p, pt)
    run_case(torch.randn(N, L, 96), videos, torch.ones(N, L, dtype=torch.bool), p, pt)


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
def test_gpu_bf16_videomae_b_shape():
    torch.manual_seed(1)
    N, T, p, pt = 2, 16, 16, 2
    videos = torch.randn(N, 3, T, 224, 224, device="cuda")
    mask = tube_mask(N, T // pt, 196, 176).cuda()
    pred = torch.randn(N, int(mask[0].sum()), 1536, device="cuda").bfloat16()
    for norm_target in (True, False):
        run_case(pred, videos, mask, p, pt, norm_target=norm_target)
