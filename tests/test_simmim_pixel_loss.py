import pytest
import torch

from mimfast.backend import BackendUnavailableError
from mimfast.ops import simmim_pixel_loss, simmim_pixel_loss_ref


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


def run_case(pred, imgs, mask, p):
    half = pred.dtype in (torch.float16, torch.bfloat16)
    grad_out = (torch.tensor(2.0) if half else torch.rand(()) + 0.5).to(pred.device)
    x = pred.detach().clone().requires_grad_()
    loss = simmim_pixel_loss(x, imgs, mask, p, backend="triton")
    loss.backward(grad_out)
    x32 = pred.detach().clone().requires_grad_()
    loss32 = simmim_pixel_loss_ref(x32, imgs, mask, p)
    loss32.backward(grad_out)
    x64 = pred.detach().double().requires_grad_()
    m64 = mask if mask.dtype == torch.bool else mask.double()
    loss64 = simmim_pixel_loss_ref(x64, imgs.double(), m64, p)
    loss64.backward(grad_out.double())
    assert torch.isfinite(x.grad).all() and x.grad.shape == pred.shape and x.grad.dtype == pred.dtype
    assert_by_error_ratio(loss, loss32, loss64)
    assert_by_error_ratio(x.grad, x32.grad, x64.grad)
    return loss, x.grad


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.int64], ids=["bool", "float", "int64"])
@pytest.mark.parametrize("shape", [(2, 3, 16, 16, 4), (1, 3, 32, 48, 16), (3, 1, 12, 20, 4)],
                         ids=["tiny", "p16", "C1_prime_grid"])
def test_matches_float64(shape, mask_dtype):
    N, C, H, W, p = shape
    L = (H // p) * (W // p)
    mask = (torch.rand(N, L) < 0.6).to(mask_dtype)
    _, grad = run_case(torch.randn(N, C, H, W), torch.randn(N, C, H, W), mask, p)
    pixel_mask = mask.reshape(N, H // p, W // p).repeat_interleave(p, 1).repeat_interleave(p, 2)
    assert (grad.permute(1, 0, 2, 3)[:, ~pixel_mask.bool()] == 0).all()


@pytest.mark.parametrize("dtype,device", HALF)
def test_half_precision(dtype, device):
    imgs = torch.randn(2, 3, 16, 24, device=device)
    mask = torch.rand(2, 24, device=device) < 0.5
    run_case(torch.randn(2, 3, 16, 24, device=device).to(dtype), imgs, mask, 4)
    run_case(torch.randn(2, 3, 16, 24, device=device).to(dtype), imgs.to(dtype), mask, 4)


@pytest.mark.parametrize("case", ["none_masked", "all_masked", "one_masked", "grid_mask_3d"])
def test_mask_edge_cases(case):
    N, C, H, W, p = 2, 3, 8, 12, 4
    mask = {"none_masked": torch.zeros(N, 6), "all_masked": torch.ones(N, 6),
            "one_masked": torch.zeros(N, 6).index_fill_(1, torch.tensor([4]), 1.0),
            "grid_mask_3d": (torch.rand(N, 2, 3) < 0.5).float()}[case]
    loss, grad = run_case(torch.randn(N, C, H, W), torch.randn(N, C, H, W), mask, p)
    if case == "none_masked":
        assert loss.item() == 0.0 and (grad == 0).all()


@pytest.mark.parametrize("dtype,masked", [(torch.bfloat16, 257), (torch.float16, 69632)], ids=["bf16", "fp16"])
def test_reference_sums_in_float32_for_half_inputs(dtype, masked):
    """A masked-pixel count that bf16 rounds (257 -> 256), or that passes fp16's 65504 (an infinite denominator):
    the half-precision reference sums in float32, as SimMIM's float32 loss and integer mask do."""
    imgs = torch.zeros(1, 1, 256, 272, dtype=dtype)
    pred = torch.full_like(imgs, 3.0)  # |error| 3 at every pixel, exact in both dtypes
    mask = torch.zeros(1, 256 * 272)
    mask[0, :masked] = 1
    loss = simmim_pixel_loss_ref(pred, imgs, mask, 1)
    assert loss.dtype == dtype and loss.item() == 3.0


def test_non_contiguous_and_huge_values():
    pred = torch.randn(2, 12, 16, 3).permute(0, 3, 1, 2) * 1e4
    imgs = torch.randn(2, 3, 12, 16).transpose(2, 3).contiguous().transpose(2, 3)
    mask = (torch.rand(2, 24) < 0.5).float()[:, :12]
    assert not pred.is_contiguous() and not imgs.is_contiguous()
    run_case(pred, imgs, mask, 4)


def test_poisoned_grad_and_bit_equality():
    from mimfast.kernels.pixel_loss import launch_simmim_loss

    N, C, H, W, p = 2, 3, 8, 8, 4
    pred, imgs = torch.randn(N, C, H, W), torch.randn(N, C, H, W)
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 0, 1, 1]])
    grad = torch.full_like(pred, float("nan"))
    partials = torch.full((N * 4,), float("nan"))
    launch_simmim_loss(pred, imgs, mask, torch.ones(1), partials, grad, p)
    assert torch.isfinite(grad).all() and torch.isfinite(partials).all()
    outs = []
    for _ in range(2):
        x = pred.clone().requires_grad_()
        loss = simmim_pixel_loss(x, imgs, mask, p, backend="triton")
        loss.backward()
        outs.append((loss.detach(), x.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_refusals_and_errors():
    pred, imgs, mask = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8), torch.ones(1, 4)
    with pytest.raises(BackendUnavailableError, match="float64"):
        simmim_pixel_loss(pred.double(), imgs, mask, 4, backend="triton")
    with pytest.raises(ValueError, match="shaped like imgs"):
        simmim_pixel_loss(pred[:, :2], imgs, mask, 4)
    with pytest.raises(ValueError, match="model-patch granularity"):
        simmim_pixel_loss(pred, imgs, torch.ones(1, 64), 4)
    with pytest.raises(ValueError, match="model-patch granularity"):
        simmim_pixel_loss(pred, imgs, torch.ones(1, 4, 1), 4)
    with pytest.raises(TypeError, match="bool, integer or floating"):
        simmim_pixel_loss(pred, imgs, torch.ones(1, 4, dtype=torch.complex64), 4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch(backend):
    pred = torch.randn(0, 3, 8, 8, requires_grad=True)
    loss = simmim_pixel_loss(pred, torch.randn(0, 3, 8, 8), torch.zeros(0, 4, dtype=torch.bool), 4, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and pred.grad.shape == pred.shape


def test_unscored_pixels_are_not_read_on_triton():
    """The documented difference: a NaN in a patch of weight 0 leaves the kernel's loss finite (the reference's
    loss * mask gives NaN); a NaN in a scored patch gives NaN on both backends."""
    pred, imgs = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    unscored, scored = pred.clone(), pred.clone()
    unscored[0, :, 0, 4] = float("nan")  # patch 1
    scored[0, :, 4, 4] = float("nan")  # patch 3
    assert torch.isfinite(simmim_pixel_loss(unscored, imgs, mask, 4, backend="triton"))
    assert torch.isnan(simmim_pixel_loss(unscored, imgs, mask, 4, backend="torch"))
    assert torch.isnan(simmim_pixel_loss(scored, imgs, mask, 4, backend="triton"))
    assert torch.isnan(simmim_pixel_loss(scored, imgs, mask, 4, backend="torch"))


@pytest.mark.gpu
def test_gpu_bf16_simmim_shape():
    torch.manual_seed(1)
    imgs = torch.randn(8, 3, 192, 192, device="cuda")
    mask = torch.rand(8, 144, device="cuda") < 0.6
    run_case(torch.randn(8, 3, 192, 192, device="cuda").bfloat16(), imgs, mask, 16)
