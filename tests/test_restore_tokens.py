
import pytest
import torch
from compile_check import assert_compiles_for_h100

from mimfast.backend import BackendUnavailableError
from mimfast.ops import random_masking, restore_tokens, restore_tokens_ref


@pytest.fixture
def poison(monkeypatch):
    """Every floating tensor the op allocates with torch.empty starts as NaN: an unwritten element shows."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)


def assert_by_error_ratio(out, same_dtype, ref64, rel_atol=1e-6):
    """max|out - ref64| <= 2 * max|torch in the same dtype - ref64| + atol (STYLE.md)."""
    out, same_dtype = out.double(), same_dtype.double()
    atol = rel_atol * max(1.0, ref64.abs().max().item())
    err, base = (out - ref64).abs().max().item(), (same_dtype - ref64).abs().max().item()
    assert err <= 2 * base + atol, f"error {err:.3e} > 2 * {base:.3e} + {atol:.1e}"


def make(N, L, ratio, D, has_cls, with_pos, dtype=torch.float32, param_dtype=None):
    info = random_masking(N, L, ratio)
    K = info.ids_keep.shape[1]
    off = int(has_cls)
    x_vis = torch.randn(N, off + K, D).to(dtype)
    mask_token = torch.randn(1, 1, D).to(param_dtype or dtype)
    pos = torch.randn(1, off + L, D).to(param_dtype or dtype) if with_pos else None
    return x_vis, info.ids_restore, mask_token, pos


# (N, L, mask ratio, D, has_cls, pos_embed): MAE decoder grids, VideoMAE's 1568 tokens, K = 0 / K = L, prime D
CASES = {
    "mae_L196_D40": (3, 196, 0.75, 40, True, True),
    "L256_batch1": (1, 256, 0.75, 32, True, True),
    "no_cls_L196": (2, 196, 0.75, 24, False, True),
    "no_pos_L49": (2, 49, 0.5, 16, True, False),
    "video_L1568_no_cls": (1, 1568, 0.9, 16, False, True),
    "keep_none": (2, 16, 0.99, 8, True, True),
    "keep_none_no_cls": (2, 16, 0.99, 8, False, True),
    "keep_all": (2, 16, 0.0, 8, True, True),
    "prime_D37_9_samples": (9, 13, 0.5, 37, True, True),
    "D200_two_column_blocks": (2, 16, 0.5, 200, True, True),  # a second, partial block of 128 columns
}


def grads(out_fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_() if t is not None and t.is_floating_point() else t for t in inputs]
    out = out_fn(*leaves)
    wrt = [t for t in (leaves[0], leaves[2], leaves[3]) if t is not None]
    return out, torch.autograd.grad(out, wrt, grad_out)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_forward_and_backward_match_reference(case, poison):
    N, L, ratio, D, has_cls, with_pos = case
    x_vis, ids_restore, mask_token, pos = make(*case)
    grad_out = torch.randn(N, int(has_cls) + L, D)

    def kernel(x, i, m, p):
        return restore_tokens(x, i, m, p, has_cls=has_cls, backend="triton")

    def ref(x, i, m, p):
        return restore_tokens_ref(x, i, m, p, has_cls=has_cls)

    out, g = grads(kernel, (x_vis, ids_restore, mask_token, pos), grad_out)
    out32, g32 = grads(ref, (x_vis, ids_restore, mask_token, pos), grad_out)
    to64 = [t.double() if t is not None else None for t in (x_vis, ids_restore, mask_token, pos)]
    to64[1] = ids_restore
    out64, g64 = grads(ref, to64, grad_out.double())
    # a copy plus one add in fp32 each way: bit-equal, and no NaN left from the poisoned buffer
    assert torch.equal(out, out32)
    assert torch.equal(g[0], g32[0])  # the x_vis gradient is a pure gather
    for a, b, c in zip(g[1:], g32[1:], g64[1:]):  # mask token and pos_embed: sums over the batch and positions
        assert a.shape == c.shape
        assert_by_error_ratio(a, b, c)


@pytest.mark.parametrize("case", [CASES[k] for k in ("mae_L196_D40", "no_cls_L196", "keep_none", "keep_all",
                                                     "prime_D37_9_samples", "D200_two_column_blocks")],
                         ids=["mae_L196_D40", "no_cls_L196", "keep_none", "keep_all", "prime_D37_9_samples",
                              "D200_two_column_blocks"])
@pytest.mark.parametrize("prefetch", [False, True], ids=["tile_by_tile", "prefetch"])
@pytest.mark.parametrize("programs_per_sm", [1, 3])
def test_frozen_pos_backward_matches_reference(case, poison, monkeypatch, prefetch, programs_per_sm):
    # MAE's decoder_pos_embed is a fixed table: the backward then takes the flat-row path (no sum over the batch),
    # whose programs walk several row tiles each (one program per SM: every program more than one tile; the
    # interpreter's 4 SMs) with and without loading the next tile ahead
    import importlib

    import mimfast.kernels.restore_tokens as kernels

    ops = importlib.import_module("mimfast.ops.restore_tokens")  # the module, not the function mimfast.ops exports
    monkeypatch.setattr(kernels, "BWD_PREFETCH", prefetch)
    monkeypatch.setattr(kernels, "FLAT_BLOCK_R", 16)
    monkeypatch.setattr(ops, "BWD_PROGRAMS_PER_SM", programs_per_sm)
    N, L, ratio, D, has_cls, _ = case
    x_vis, ids_restore, mask_token, pos = make(*case)
    grad_out = torch.randn(N, int(has_cls) + L, D)
    x, m = x_vis.clone().requires_grad_(), mask_token.clone().requires_grad_()
    g = torch.autograd.grad(restore_tokens(x, ids_restore, m, pos, has_cls=has_cls, backend="triton"), (x, m),
                            grad_out)
    g32 = torch.autograd.grad(restore_tokens_ref(x, ids_restore, m, pos, has_cls=has_cls), (x, m), grad_out)
    x64, m64 = x_vis.double().requires_grad_(), mask_token.double().requires_grad_()
    g64 = torch.autograd.grad(restore_tokens_ref(x64, ids_restore, m64, pos.double(), has_cls=has_cls), (x64, m64),
                              grad_out.double())
    assert torch.equal(g[0], g32[0])
    assert_by_error_ratio(g[1], g32[1], g64[1])


@pytest.mark.parametrize("pos_grad", [False, True], ids=["frozen_pos", "pos_grad"])
def test_custom_op_path_equals_eager_path(pos_grad):
    # eager calls run an autograd.Function, compiled graphs the custom ops: both launch the same kernels
    x_vis, ids_restore, mask_token, pos = make(3, 40, 0.75, 24, True, True)
    grad_out = torch.randn(3, 41, 24)
    results = []
    for fn in (lambda *a: restore_tokens(*a, backend="triton"),
               lambda *a: torch.ops.mimfast.restore_tokens(*a, True)):
        leaves = [t.clone().requires_grad_(pos_grad or i < 2) for i, t in enumerate((x_vis, mask_token, pos))]
        out = fn(leaves[0], ids_restore, leaves[1], leaves[2])
        wrt = leaves if pos_grad else leaves[:2]
        results.append((out, *torch.autograd.grad(out, wrt, grad_out)))
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("dtype,param_dtype", [(torch.bfloat16, None), (torch.float16, None),
                                               (torch.bfloat16, torch.float32)], ids=["bf16", "fp16", "bf16_fp32"])
def test_dtypes_follow_promotion(dtype, param_dtype):
    x_vis, ids_restore, mask_token, pos = make(2, 49, 0.75, 24, True, True, dtype, param_dtype)
    out = restore_tokens(x_vis, ids_restore, mask_token, pos, backend="triton")
    ref = restore_tokens_ref(x_vis, ids_restore, mask_token, pos)
    assert out.dtype == ref.dtype == torch.promote_types(dtype, param_dtype or dtype)
    if out.dtype == torch.bfloat16:
        # Triton's interpreter converts fp32 to bf16 by truncation, not round-to-nearest: allow that one ulp here;
        # test_gpu_real_shapes checks bit-equality where the conversion is the hardware's
        torch.testing.assert_close(out, ref, rtol=2**-7, atol=0)
    else:
        assert torch.equal(out, ref)  # one rounding of an exact sum each way
    x = x_vis.clone().requires_grad_()
    m = mask_token.clone().requires_grad_()
    p = pos.clone().requires_grad_()
    gx, gm, gp = torch.autograd.grad(restore_tokens(x, ids_restore, m, p, backend="triton"), (x, m, p),
                                     torch.randn_like(out))
    assert (gx.dtype, gm.dtype, gp.dtype) == (x.dtype, m.dtype, p.dtype)


def test_noncontiguous_x_vis():
    x_vis, ids_restore, mask_token, pos = make(3, 49, 0.75, 16, True, True)
    wide = torch.randn(3, x_vis.shape[1], 48)[:, :, ::3]
    transposed = torch.randn(16, 3, x_vis.shape[1]).permute(1, 2, 0)
    for x in (wide, transposed):
        assert not x.is_contiguous()
        assert torch.equal(restore_tokens(x, ids_restore, mask_token, pos, backend="triton"),
                           restore_tokens_ref(x, ids_restore, mask_token, pos))


def test_deterministic_forward_and_backward():
    x_vis, ids_restore, mask_token, pos = make(9, 17, 0.5, 24, True, True)  # several batch chunks
    grad_out = torch.randn(9, 18, 24)
    runs = []
    for _ in range(2):
        out, g = grads(lambda x, i, m, p: restore_tokens(x, i, m, p, backend="triton"),
                       (x_vis, ids_restore, mask_token, pos), grad_out)
        runs.append((out, *g))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_mask_token_only_and_frozen_pos():
    x_vis, ids_restore, mask_token, pos = make(2, 16, 0.5, 8, True, True)
    m = mask_token.clone().requires_grad_()
    out = restore_tokens(x_vis, ids_restore, m, pos, backend="triton")
    (gm,) = torch.autograd.grad(out, m, torch.ones_like(out))
    # every masked position of every sample contributes 1
    assert torch.equal(gm, torch.full_like(m, 2 * (16 - 8)))


def test_opcheck():
    x_vis, ids_restore, mask_token, pos = make(2, 16, 0.5, 8, True, True)
    args = (x_vis.requires_grad_(), ids_restore, mask_token.requires_grad_(), pos.requires_grad_(), True)
    torch.library.opcheck(torch.ops.mimfast.restore_tokens.default, args)


def test_compiles_without_graph_break():
    x_vis, ids_restore, mask_token, pos = make(2, 16, 0.5, 8, True, True)
    fn = torch.compile(lambda *a: restore_tokens(*a, backend="triton") + 1, backend="aot_eager", fullgraph=True)
    assert torch.equal(fn(x_vis, ids_restore, mask_token, pos), restore_tokens_ref(x_vis, ids_restore, mask_token,
                                                                                    pos) + 1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_inputs_raise_clear_errors(backend):
    x_vis, ids_restore, mask_token, pos = make(2, 16, 0.5, 8, True, True)
    with pytest.raises(TypeError, match="int64"):
        restore_tokens(x_vis, ids_restore.int(), mask_token, pos, backend=backend)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        restore_tokens(x_vis, ids_restore + 1, mask_token, pos, backend=backend)
    with pytest.raises(ValueError, match="must not repeat"):  # not a permutation
        restore_tokens(x_vis, torch.zeros_like(ids_restore), mask_token, pos, backend=backend)
    with pytest.raises(ValueError, match="N = 2"):
        restore_tokens(x_vis, ids_restore[:1], mask_token, pos, backend=backend)
    with pytest.raises(ValueError, match="mask_token must be"):
        restore_tokens(x_vis, ids_restore, mask_token[0, 0], pos, backend=backend)
    with pytest.raises(ValueError, match=r"pos_embed must be \[1, 1 \+ L, D\]"):
        restore_tokens(x_vis, ids_restore, mask_token, pos[:, 1:], backend=backend)
    with pytest.raises(ValueError, match=r"pos_embed must be \[1, L, D\]"):
        restore_tokens(x_vis[:, 1:], ids_restore, mask_token, pos, has_cls=False, backend=backend)
    with pytest.raises(ValueError, match="only 16 positions"):
        restore_tokens(torch.randn(2, 18, 8), ids_restore, mask_token, pos, backend=backend)
    with pytest.raises(ValueError, match="cls row first"):
        restore_tokens(x_vis[0], ids_restore, mask_token, pos, backend=backend)
    with pytest.raises(ValueError, match="meta"):
        restore_tokens(x_vis, ids_restore, mask_token.to("meta"), pos, backend=backend)


def test_triton_refuses_float64_with_reason():
    x_vis, ids_restore, mask_token, pos = make(2, 16, 0.5, 8, True, True, torch.float64)
    with pytest.raises(BackendUnavailableError, match="float64"):
        restore_tokens(x_vis, ids_restore, mask_token, pos, backend="triton")


_COMPILE_FOR_H100 = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mimfast.kernels import restore_tokens as k

which, dtype, D = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = k.flat_config(D) if which != "bwd_pos" else k.pos_config(197, D)
num_warps = cfg.pop("num_warps")
if which == "fwd":
    fn = k.restore_tokens_fwd_kernel
    sig = {"x_ptr": "*" + dtype, "ids_ptr": "*i64", "mt_ptr": "*fp32", "pos_ptr": "*fp32", "out_ptr": "*fp32",
           "NR": "i32", "L": "i32", "K": "i32", "D": "i32", "s_xn": "i32", "s_xr": "i32", "s_xd": "constexpr",
           "s_idn": "i32"}
    consts = {"HAS_CLS": True, "HAS_POS": True, "s_xd": 1}
elif which in ("bwd", "bwd_prefetch"):
    fn = k.restore_tokens_bwd_kernel
    sig = {"g_ptr": "*fp32", "ids_ptr": "*i64", "gx_ptr": "*" + dtype, "part_mt_ptr": "*fp32", "NR": "i32",
           "L": "i32", "K": "i32", "D": "i32", "s_idn": "i32"}
    consts = {"HAS_CLS": True, "PREFETCH": which == "bwd_prefetch"}
else:
    fn = k.restore_tokens_bwd_pos_kernel
    sig = {"g_ptr": "*fp32", "ids_ptr": "*i64", "gx_ptr": "*" + dtype, "part_mt_ptr": "*fp32",
           "part_pos_ptr": "*fp32", "N": "i32", "L": "i32", "K": "i32", "D": "i32", "N_PER": "i32", "s_idn": "i32"}
    consts = {"HAS_CLS": True}
consts.update(cfg)
sig.update({name: "constexpr" for name in consts})
# what a launch specialises: 16-byte aligned tensors, and D, N * R and the x_vis strides multiples of 16
aligned = [n for n in sig if n.endswith("_ptr") or n in ("D", "NR", "s_xn", "s_xr")]
attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                        target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
assert kernel.asm["cubin"]
print("compiled")
"""


@pytest.mark.slow
@pytest.mark.parametrize("config", ["fwd bf16 512", "bwd bf16 512", "fwd fp16 384", "bwd fp32 384",
                                    "bwd_prefetch bf16 512", "bwd_pos bf16 512"])
def test_kernels_compile_for_h100(config):
    # full compilation to an sm_90 cubin without a GPU (and without the interpreter, in a subprocess): catches what
    # the interpreter accepts but the compiler rejects
    assert_compiles_for_h100(_COMPILE_FOR_H100, *config.split())


@pytest.mark.gpu
@pytest.mark.parametrize("N,L,ratio,D", [(256, 196, 0.75, 512), (64, 1568, 0.9, 384)], ids=["mae_b", "videomae_b"])
def test_gpu_real_shapes(N, L, ratio, D):
    info = random_masking(N, L, ratio, device="cuda")
    K = info.ids_keep.shape[1]
    x = torch.randn(N, 1 + K, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    m = torch.randn(1, 1, D, device="cuda", requires_grad=True)
    p = torch.randn(1, 1 + L, D, device="cuda", requires_grad=True)
    out = restore_tokens(x, info.ids_restore, m, p, backend="triton")
    ref = restore_tokens_ref(x, info.ids_restore, m, p)
    assert torch.equal(out, ref)
    grad_out = torch.randn_like(out)
    g = torch.autograd.grad(out, (x, m, p), grad_out)
    g32 = torch.autograd.grad(ref, (x, m, p), grad_out)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, m, p)]
    g64 = torch.autograd.grad(restore_tokens_ref(leaves64[0], info.ids_restore, *leaves64[1:]), leaves64,
                              grad_out.double())
    assert torch.equal(g[0], g32[0])
    for a, b, c in zip(g[1:], g32[1:], g64[1:]):
        assert_by_error_ratio(a, b, c)
    again = torch.autograd.grad(restore_tokens(x, info.ids_restore, m, p, backend="triton"), (x, m, p), grad_out)
    assert all(torch.equal(a, b) for a, b in zip(g, again))


def test_videomae_benchmark_reference_is_the_same_decoder_input():
    # bench_masking times restore_tokens (token order, no cls row) against VideoMAE's own formulation (visible tokens
    # then mask tokens, each plus its positions): the same rows, in another order
    from benchmarks.bench_masking import reference_restore_video
    from mimfast.ops import mask_info_from_mask

    N, L, K, D = 2, 12, 3, 8
    mask = torch.ones(N, L, dtype=torch.bool)
    for n in range(N):
        mask[n, torch.randperm(L)[:K]] = False
    info = mask_info_from_mask(mask)
    x_vis, mask_token, pos = torch.randn(N, K, D), torch.randn(1, 1, D), torch.randn(1, L, D)
    got = restore_tokens(x_vis, info.ids_restore, mask_token, pos, has_cls=False, backend="triton")
    ref = reference_restore_video(x_vis, mask, mask_token, pos)
    assert torch.equal(got[~mask].view(N, K, D), ref[:, :K]) and torch.equal(got[mask].view(N, L - K, D), ref[:, K:])
