
import importlib

import pytest
import torch
from compile_check import assert_compiles_for_h100

from mimfast.backend import BackendUnavailableError
from mimfast.ops import embed_visible, embed_visible_ref, random_masking
from mimfast.ops.patchify import grid_size


@pytest.fixture
def poison(monkeypatch):
    """Every floating tensor the op allocates with torch.empty or Tensor.new_empty (the pos_embed gradient buffer)
    starts as NaN: an unwritten element shows."""
    empty, new_empty = torch.empty, torch.Tensor.new_empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def poisoned_new(self, *args, **kwargs):
        t = new_empty(self, *args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)
    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned_new)


def assert_by_error_ratio(out, same_dtype, ref64, rel_atol=1e-6):
    """max|out - ref64| <= 2 * max|torch in the same dtype - ref64| + atol (STYLE.md)."""
    assert out.shape == ref64.shape
    out, same_dtype = out.double(), same_dtype.double()
    atol = rel_atol * max(1.0, ref64.abs().max().item()) if ref64.numel() else 0.0
    err = (out - ref64).abs().max().item() if out.numel() else 0.0
    base = (same_dtype - ref64).abs().max().item() if out.numel() else 0.0
    assert err <= 2 * base + atol, f"error {err:.3e} > 2 * {base:.3e} + {atol:.1e}"


def num_patches(shape, p, t=None):
    L = 1
    for g in grid_size(shape, p, t):
        L *= g
    return L


def make(shape, p, t, D, pos_kind, with_bias, ratio, dtype=torch.float32):
    """Images, kept ids, conv weight (Conv2d/Conv3d layout), bias and pos_embed ([1, 1+L, D], [1, L, D] or None)."""
    C = shape[1]
    L = num_patches(shape, p, t)
    imgs = torch.randn(shape)
    ids_keep = random_masking(shape[0], L, ratio).ids_keep
    kernel = (p, p) if t is None else (t, p, p)
    weight = (torch.randn(D, C, *kernel) / (C * p * p * (t or 1)) ** 0.5).to(dtype)
    bias = torch.randn(D).to(dtype) if with_bias else None
    pos = {"cls": torch.randn(1, 1 + L, D), "nocls": torch.randn(1, L, D), None: None}[pos_kind]
    return imgs, ids_keep, weight, bias, None if pos is None else pos.to(dtype)


@pytest.fixture(params=[False, True], ids=["wgrad_kernel", "wgrad_gemm"])
def wgrad_path(request, monkeypatch):
    """Both weight-gradient paths: the gather-GEMM kernel with fp32 partials, and gather_rows + torch.mm."""
    import importlib

    monkeypatch.setattr(importlib.import_module("mimfast.ops.embed_visible"), "WEIGHT_GRAD_VIA_GEMM", request.param)
    return request.param


def run(fn, imgs, ids_keep, weight, bias, pos, p, t, grad_out, dtype=None):
    """Output and gradients of (imgs, weight, bias, pos) through ``fn``, leaves cast to ``dtype`` if given."""
    leaves = [None if x is None else x.detach().to(dtype or x.dtype).requires_grad_()
              for x in (imgs, weight, bias, pos)]
    out = fn(leaves[0], ids_keep, leaves[1], leaves[2], leaves[3], p, t)
    wrt = [x for x in leaves if x is not None]
    return out, torch.autograd.grad(out, wrt, grad_out.to(out.dtype))


def kernel(*args):
    return embed_visible(*args, backend="triton")


# (shape, patch, tubelet, D, pos_embed kind, bias, mask ratio): small P/D for the interpreter, odd sizes, video
CASES = {
    "16px_p4_D32_cls": ((2, 3, 16, 16), 4, None, 32, "cls", True, 0.75),
    "odd_p3_D40_nocls": ((3, 3, 12, 15), 3, None, 40, "nocls", True, 0.5),
    "D48_no_bias": ((2, 3, 16, 16), 4, None, 48, "cls", False, 0.5),
    "no_pos": ((2, 3, 16, 16), 4, None, 32, None, True, 0.5),
    "L196_p2_D16": ((2, 3, 28, 28), 2, None, 16, "cls", True, 0.75),
    "L256_batch1": ((1, 3, 64, 64), 4, None, 32, "cls", True, 0.75),
    "video_t2_p4": ((2, 3, 4, 8, 8), 4, 2, 32, "nocls", True, 0.5),
    "video_t3_C2_cls": ((1, 2, 3, 8, 12), 4, 3, 24, "cls", True, 0.5),
    "keep_none": ((2, 3, 16, 16), 4, None, 32, "cls", True, 0.99),
    "keep_all": ((2, 3, 16, 16), 4, None, 32, "cls", True, 0.0),
    "D160_three_row_blocks": ((3, 3, 48, 48), 4, None, 160, "cls", True, 0.25),  # 2 x 3 tiles on one grid axis
    # real patch sizes on small grids, narrow D: ViT-H/14 P = 588, ViT-B/16 P = 768, VideoMAE 2x16x16 P = 1536
    "vith_p14_P588_D16": ((2, 3, 28, 42), 14, None, 16, "cls", True, 0.5),
    "vitb_p16_P768_D16_batch1": ((1, 3, 48, 48), 16, None, 16, "nocls", True, 0.75),
    "videomae_t2_p16_P1536_D16": ((1, 3, 4, 32, 48), 16, 2, 16, "cls", True, 0.5),
    "videomae_P1536_ratio09": ((1, 3, 4, 64, 80), 16, 2, 16, "cls", True, 0.9),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_forward_and_gradients_match_float64(case, poison, wgrad_path):
    shape, p, t, D = case[:4]
    imgs, ids_keep, weight, bias, pos = make(*case)
    grad_out = torch.randn(shape[0], ids_keep.shape[1], D)
    args = (imgs, ids_keep, weight, bias, pos, p, t, grad_out)
    out, g = run(kernel, *args)
    out32, g32 = run(embed_visible_ref, *args)
    out64, g64 = run(embed_visible_ref, *args, dtype=torch.float64)
    assert out.shape == (shape[0], ids_keep.shape[1], D) and out.dtype == torch.float32
    assert not out.isnan().any()
    assert_by_error_ratio(out, out32, out64)
    for a, b, c in zip(g, g32, g64):  # imgs, weight, bias, pos_embed
        assert a.dtype == b.dtype
        assert_by_error_ratio(a, b, c)


def test_fp16_weights():
    imgs, ids_keep, weight, bias, pos = make((2, 3, 16, 16), 4, None, 32, "cls", True, 0.5)
    grad_out = torch.randn(2, 8, 32)
    args = (imgs, ids_keep, weight, bias, pos, 4, None, grad_out)
    out, g = run(kernel, *args, dtype=torch.float16)
    out16, g16 = run(embed_visible_ref, *args, dtype=torch.float16)
    out64, g64 = run(embed_visible_ref, *args, dtype=torch.float64)
    assert out.dtype == torch.float16
    assert_by_error_ratio(out, out16, out64, rel_atol=1e-3)
    for a, b, c in zip(g[1:], g16[1:], g64[1:]):  # weight, bias, pos_embed
        assert_by_error_ratio(a, b, c, rel_atol=1e-3)


def test_fp32_images_fp16_weights_promote_with_pos():
    imgs, ids_keep, weight, bias, pos = make((2, 3, 16, 16), 4, None, 32, "cls", True, 0.5)
    out = embed_visible(imgs, ids_keep, weight.half(), bias.half(), pos, 4, backend="triton")
    ref = embed_visible_ref(imgs, ids_keep, weight.half(), bias.half(), pos, 4)
    ref64 = embed_visible_ref(imgs.half().double(), ids_keep, weight.half().double(), bias.half().double(),
                              pos.double(), 4)
    assert out.dtype == ref.dtype == torch.float32  # fp16 conv output + fp32 pos_embed, as in the reference
    assert_by_error_ratio(out, ref, ref64)


def noncontiguous():
    return {
        "channels_last": (torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last), 4, None),
        "sliced": (torch.randn(2, 3, 20, 19)[:, :, 2:18, 1:17], 4, None),
        "video_channels_last_3d": (torch.randn(2, 3, 4, 8, 8).contiguous(memory_format=torch.channels_last_3d),
                                   4, 2),
    }


@pytest.mark.parametrize("name", noncontiguous().keys())
def test_noncontiguous_images(name):
    imgs, p, t = noncontiguous()[name]
    assert not imgs.is_contiguous()
    _, ids_keep, weight, bias, pos = make(imgs.shape, p, t, 32, "cls", True, 0.5)
    grad_out = torch.randn(imgs.shape[0], ids_keep.shape[1], 32)
    args = (imgs, ids_keep, weight, bias, pos, p, t, grad_out)
    out, g = run(kernel, *args)
    out32, g32 = run(embed_visible_ref, *args)
    out64, g64 = run(embed_visible_ref, *args, dtype=torch.float64)
    assert_by_error_ratio(out, out32, out64)
    for a, b, c in zip(g, g32, g64):
        assert_by_error_ratio(a, b, c)


def test_deterministic_forward_and_backward(wgrad_path):
    # M = 128 kept rows: the weight gradient is split over two row chunks, then added up
    imgs, ids_keep, weight, bias, pos = make((4, 3, 32, 32), 4, None, 32, "cls", True, 0.5)
    grad_out = torch.randn(4, 32, 32)
    first = run(kernel, imgs, ids_keep, weight, bias, pos, 4, None, grad_out)
    second = run(kernel, imgs, ids_keep, weight, bias, pos, 4, None, grad_out)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


class _SkippedLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.mark.parametrize("pos_kind", ["cls", "nocls"])
def test_pos_embed_grad_buffer_starts_poisoned_and_is_fully_written(pos_kind, poison, monkeypatch):
    # the launcher allocates the [pos_rows, D] fp32 pos_embed gradient with grad.new_empty, which the fixture fills
    # with NaN: the cls row must come from the zero fill and all L patch rows from the kernel, including the rows
    # no sample kept (ratio 0.75, two samples: most of them), which must be exact zeros
    ev = importlib.import_module("mimfast.ops.embed_visible")  # the module, not the op of the same name
    imgs, ids_keep, weight, bias, pos = make((2, 3, 16, 16), 4, None, 24, pos_kind, True, 0.75)
    L, K, D = 16, ids_keep.shape[1], 24
    pos_rows = pos.shape[1]
    grad_out = torch.randn(2, K, D)
    _, g_pos = ev._backward_grads(grad_out, imgs, ids_keep, weight, 4, 1, None, False, pos_rows)
    # reference gradient: with two samples each pos_embed element sums at most two terms, one rounding whatever
    # the order, so the kernel's sample-order sum is bit-equal to it
    leaf = pos.clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(embed_visible_ref(imgs, ids_keep, weight, bias, leaf, 4), leaf, grad_out)
    assert g_pos.shape == (pos_rows, D) and g_pos.dtype == torch.float32
    assert not g_pos.isnan().any()
    assert torch.equal(g_pos, g_ref[0])
    never_kept = torch.ones(L, dtype=torch.bool)
    never_kept[ids_keep.flatten()] = False
    assert never_kept.any() and (g_pos[pos_rows - L:][never_kept] == 0).all()
    # the poison does reach this buffer: with the kernel's launch skipped, every patch row is left NaN
    monkeypatch.setattr(importlib.import_module("mimfast.kernels.embed_visible"), "embed_visible_bwd_pos_kernel",
                        _SkippedLaunch())
    _, unwritten = ev._backward_grads(grad_out, imgs, ids_keep, weight, 4, 1, None, False, pos_rows)
    assert unwritten[pos_rows - L:].isnan().all() and not unwritten[:pos_rows - L].isnan().any()


def test_frozen_weight_and_images_give_only_bias_and_pos_grads():
    imgs, ids_keep, weight, bias, pos = make((2, 3, 16, 16), 4, None, 32, "cls", True, 0.5)
    b, pe = bias.clone().requires_grad_(), pos.clone().requires_grad_()
    out = embed_visible(imgs, ids_keep, weight, b, pe, 4, backend="triton")
    grad_out = torch.randn_like(out)
    gb, gpe = torch.autograd.grad(out, (b, pe), grad_out)
    assert torch.allclose(gb, grad_out.sum((0, 1)), rtol=1e-6, atol=1e-6)
    expected = torch.zeros_like(pos)
    for n in range(2):
        expected[0, 1 + ids_keep[n]] += grad_out[n]
    assert torch.allclose(gpe, expected, rtol=1e-6, atol=1e-6)
    assert (gpe[0, 0] == 0).all()  # the cls row gets no gradient from patch tokens


def test_autocast_rounds_weight_and_bias_keeps_fp32_grads(wgrad_path):
    # under autocast the kernel rounds weight and bias to the autocast dtype (as the conv's casts do) and hands back
    # fp32 weight/bias gradients straight from its fp32 accumulators
    imgs, ids_keep, weight, bias, pos = make((2, 3, 16, 16), 4, None, 32, "cls", True, 0.5)
    grad_out = torch.randn(2, 8, 32)
    leaves = [x.clone().requires_grad_() for x in (weight, bias)]
    with torch.autocast("cpu", dtype=torch.float16):
        out = embed_visible(imgs, ids_keep, leaves[0], leaves[1], pos, 4, backend="triton")
    g = torch.autograd.grad(out, leaves, grad_out)
    leaves16 = [x.half().requires_grad_() for x in (weight, bias)]
    out16 = embed_visible_ref(imgs.half(), ids_keep, *leaves16, pos.half(), 4)
    g16 = torch.autograd.grad(out16, leaves16, grad_out.half())
    leaves64 = [x.half().double().requires_grad_() for x in (weight, bias)]
    out64 = embed_visible_ref(imgs.half().double(), ids_keep, *leaves64, pos.double(), 4)
    g64 = torch.autograd.grad(out64, leaves64, grad_out.double())
    assert out.dtype == torch.float32 and all(t.dtype == torch.float32 for t in g)
    assert_by_error_ratio(out, out16, out64)
    for a, b, c in zip(g, g16, g64):
        assert_by_error_ratio(a, b, c)


@pytest.mark.parametrize("pos", ["none", "fp16", "fp32"], ids=["no_pos", "fp16_pos", "fp32_pos"])
def test_autocast_result_dtype_is_the_convs_on_every_backend(pos):
    # the official path under autocast: the conv's output in the autocast dtype, promoted by pos_embed's (fp32 only
    # where an fp32 pos_embed is added), on both backends and in the upcast reference
    imgs, ids_keep, weight, bias, pos_embed = make((2, 3, 16, 16), 4, None, 32, "cls", True, 0.5)
    pos_embed = {"none": None, "fp16": pos_embed.half(), "fp32": pos_embed}[pos]
    with torch.autocast("cpu", dtype=torch.float16):
        dtypes = {embed_visible(imgs, ids_keep, weight, bias, pos_embed, 4, backend=b).dtype
                  for b in ("triton", "torch")}
        dtypes.add(embed_visible_ref(imgs, ids_keep, weight, bias, pos_embed, 4, upcast=True).dtype)
    assert dtypes == {torch.float32 if pos == "fp32" else torch.float16}


@pytest.mark.parametrize("pos_grad", [False, True], ids=["frozen_pos", "pos_grad"])
def test_custom_op_path_equals_eager_path(pos_grad):
    # eager calls run an autograd.Function, compiled graphs the custom ops: both launch the same kernels
    imgs, ids_keep, weight, bias, pos = make((3, 3, 16, 16), 4, None, 32, "cls", True, 0.75)
    grad_out = torch.randn(3, 4, 32)
    results = []
    for fn in (lambda *a: embed_visible(*a, 4, backend="triton"),
               lambda *a: torch.ops.mimfast.embed_visible(*a, 4, 1)):
        leaves = [t.clone().requires_grad_(pos_grad or i < 2) for i, t in enumerate((weight, bias, pos))]
        out = fn(imgs, ids_keep, *leaves)
        wrt = leaves if pos_grad else leaves[:2]
        results.append((out, *torch.autograd.grad(out, wrt, grad_out)))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_opcheck():
    imgs, ids_keep, weight, bias, pos = make((2, 3, 8, 8), 4, None, 16, "cls", True, 0.5)
    args = (imgs, ids_keep, weight.requires_grad_(), bias.requires_grad_(), pos.requires_grad_(), 4, 1)
    torch.library.opcheck(torch.ops.mimfast.embed_visible.default, args)


def test_compiles_without_graph_break():
    imgs, ids_keep, weight, bias, pos = make((2, 3, 8, 8), 4, None, 16, "cls", True, 0.5)
    fn = torch.compile(lambda *a: embed_visible(*a, backend="triton") * 2, backend="aot_eager", fullgraph=True)
    out = fn(imgs, ids_keep, weight, bias, pos, 4, None)
    ref = embed_visible_ref(imgs, ids_keep, weight, bias, pos, 4) * 2
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_inputs_raise_clear_errors(backend):
    imgs, ids_keep, weight, bias, pos = make((2, 3, 16, 16), 4, None, 32, "cls", True, 0.5)
    with pytest.raises(ValueError, match=r"conv weight \[D, 3, 4, 4\]"):
        embed_visible(imgs, ids_keep, weight[:, :2], bias, pos, 4, backend=backend)
    with pytest.raises(ValueError, match=r"conv weight \[D, 3, 2, 4, 4\]"):
        embed_visible(imgs.unsqueeze(2).expand(-1, -1, 2, -1, -1), ids_keep, weight, bias, pos, 4, 2,
                      backend=backend)
    with pytest.raises(ValueError, match=r"bias must be \[D\]"):
        embed_visible(imgs, ids_keep, weight, bias[:-1], pos, 4, backend=backend)
    with pytest.raises(ValueError, match="pos_embed must be"):
        embed_visible(imgs, ids_keep, weight, bias, torch.randn(1, 18, 32), 4, backend=backend)
    with pytest.raises(ValueError, match="pos_embed must be"):
        embed_visible(imgs, ids_keep, weight, bias, pos[:, :, :16], 4, backend=backend)
    with pytest.raises(TypeError, match="int64"):
        embed_visible(imgs, ids_keep.int(), weight, bias, pos, 4, backend=backend)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        embed_visible(imgs, ids_keep + 16, weight, bias, pos, 4, backend=backend)
    with pytest.raises(ValueError, match="must not repeat"):
        embed_visible(imgs, ids_keep[:, :1].expand_as(ids_keep), weight, bias, pos, 4, backend=backend)
    with pytest.raises(ValueError, match="meta"):
        embed_visible(imgs, ids_keep, weight.to("meta"), bias, pos, 4, backend=backend)
    with pytest.raises(TypeError, match="weight must be a floating-point"):
        embed_visible(imgs, ids_keep, weight.long(), bias, pos, 4, backend=backend)


def test_triton_refuses_float64_with_reason():
    imgs, ids_keep, weight, bias, pos = make((1, 3, 8, 8), 4, None, 16, "cls", True, 0.5, torch.float64)
    with pytest.raises(BackendUnavailableError, match="float64"):
        embed_visible(imgs, ids_keep, weight, bias, pos, 4, backend="triton")


_COMPILE_FOR_H100 = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mimfast.kernels import embed_visible as k

which, dtype, D, C, PT, PS = sys.argv[1], sys.argv[2], *(int(v) for v in sys.argv[3:])
P = C * PT * PS * PS
geometry = {"C": C, "PT": PT, "PS": PS}
image = {"s_n": "i64", "s_c": "i64", "s_t": "i64", "s_h": "i32", "s_w": "constexpr"}
if which == "fwd":
    fn, cfg = k.embed_visible_fwd_kernel, k.gemm_config(D, P)
    sig = {"x_ptr": "*fp32", "ids_ptr": "*i64", "w_ptr": "*" + dtype, "b_ptr": "*fp32", "pos_ptr": "*fp32",
           "out_ptr": "*fp32", "M": "i32", "K": "i32", "D": "i32", "GH": "i32", "GW": "i32", "POS_OFF": "i32",
           **image}
    consts = {**geometry, "HAS_BIAS": True, "HAS_POS": True, "DOT_PRECISION": "tf32"}
elif which == "wgrad":
    fn, cfg = k.embed_visible_bwd_weight_kernel, k.wgrad_config(D, P)
    sig = {"x_ptr": "*fp32", "ids_ptr": "*i64", "g_ptr": "*fp32", "part_ptr": "*fp32", "M": "i32", "K": "i32",
           "D": "i32", "GH": "i32", "GW": "i32", "M_PER": "i32", **image}
    consts = {**geometry, "DOT_DTYPE": getattr(triton.language, {"bf16": "bfloat16", "fp16": "float16"}[dtype]),
              "DOT_PRECISION": "tf32"}
num_warps = cfg.pop("num_warps")
consts.update(cfg, s_w=1)
sig.update({name: "constexpr" for name in consts})
# what a launch specialises: 16-byte aligned tensors, D and the image strides multiples of 16
aligned = [n for n in sig if n.endswith("_ptr") or n in ("D", "s_n", "s_c", "s_t", "s_h")]
attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                        target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
assert kernel.asm["cubin"]
print("compiled")
"""


@pytest.mark.slow
@pytest.mark.parametrize("config", ["fwd bf16 768 3 1 16", "wgrad bf16 768 3 1 16", "fwd bf16 1280 3 1 14",
                                    "wgrad bf16 1280 3 1 14", "fwd bf16 768 3 2 16", "wgrad fp16 768 3 2 16"],
                         ids=["fwd-vit-b16", "wgrad-vit-b16", "fwd-vit-h14", "wgrad-vit-h14", "fwd-videomae",
                              "wgrad-videomae-fp16"])
def test_kernels_compile_for_h100(config):
    # full compilation to an sm_90 cubin without a GPU (and without the interpreter, in a subprocess): catches what
    # the interpreter accepts but the compiler rejects, and shared-memory overflows of the tile configurations
    assert_compiles_for_h100(_COMPILE_FOR_H100, *config.split())


@pytest.mark.gpu
@pytest.mark.parametrize("shape,p,t,D,ratio", [((64, 3, 224, 224), 16, None, 768, 0.75),
                                               ((32, 3, 224, 224), 14, None, 1280, 0.75),
                                               ((4, 3, 16, 224, 224), 16, 2, 768, 0.9)],
                         ids=["mae_b", "mae_h_p14", "videomae_b"])
def test_gpu_bf16_autocast_real_shapes(shape, p, t, D, ratio, wgrad_path):
    imgs, ids_keep, weight, bias, pos = make(shape, p, t, D, "cls", True, ratio)
    imgs, ids_keep = imgs.cuda(), ids_keep.cuda()
    leaves = [x.cuda().requires_grad_() for x in (weight, bias, pos)]
    grad_out = torch.randn(shape[0], ids_keep.shape[1], D, device="cuda")
    results = []
    for fn in (kernel, kernel, embed_visible_ref):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fn(imgs, ids_keep, *leaves, p, t)
        results.append((out, torch.autograd.grad(out, leaves, grad_out.to(out.dtype))))
    leaves64 = [x.detach().to(torch.bfloat16).double().requires_grad_() for x in leaves]
    out64 = embed_visible_ref(imgs.to(torch.bfloat16).double(), ids_keep, *leaves64, p, t)
    g64 = torch.autograd.grad(out64, leaves64, grad_out.double())
    (out, g), (out_again, g_again), (out_ref, g_ref) = results
    assert out.dtype == out_ref.dtype == torch.float32
    assert_by_error_ratio(out, out_ref, out64, rel_atol=1e-3)
    for a, b, c in zip(g, g_ref, g64):
        assert_by_error_ratio(a, b, c, rel_atol=1e-3)
    assert torch.equal(out, out_again) and all(torch.equal(a, b) for a, b in zip(g, g_again))


def test_patches_spanning_past_int32_offsets_are_refused_by_the_kernels():
    import mimfast.ops  # noqa: F401  (registers every op)

    # a batch sliced channel-planar out of a [3, 30000, 224, 224] buffer (meta tensors: nothing is allocated):
    # two channels of one patch lie over 2^31 elements apart
    from mimfast.backend import get_op

    imgs = torch.empty(30000, 3, 224, 224, device="meta").transpose(0, 1).contiguous().transpose(0, 1)[:8]
    ids_keep = torch.zeros(8, 49, dtype=torch.long, device="meta")
    weight = torch.empty(768, 3, 16, 16, device="meta")
    pred, mask = torch.empty(8, 196, 768, device="meta"), torch.empty(8, 196, device="meta")
    for name, args in (("gather_patches", (imgs, ids_keep, 16)),
                       ("embed_visible", (imgs, ids_keep, weight, None, None, 16)),
                       ("masked_pixel_loss", (pred, imgs, mask, 16)),
                       ("simmim_pixel_loss", (imgs, imgs, mask, 16))):
        reasons = get_op(name).reasons("triton", *args)
        assert any("int32 offsets inside a patch" in r for r in reasons), (name, reasons)
    fine = torch.empty(8, 3, 224, 224, device="meta")
    assert not any("int32" in r for r in get_op("gather_patches").reasons("triton", fine, ids_keep, 16))
