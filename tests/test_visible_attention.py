import math

import numpy as np
import pytest
import torch
from compile_check import assert_compiles_for_h100

from mimfast.backend import BackendUnavailableError
from mimfast.ops.visible_attention import (
    launch_backward,
    launch_forward,
    visible_attention,
    visible_attention_ref,
)


def cu_of(lengths: list[int], device: str = "cpu") -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32,
                        device=device)


def run(fn, inputs, grad_out, dtype=None):
    """Output and input gradients of fn on fresh leaves (optionally cast to ``dtype``)."""
    leaves = [t.detach().clone().to(dtype or t.dtype).requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def assert_error_ratio(got, same_dtype, ref64, names=("out", "dq", "dk", "dv"), score_scale=1.0):
    """max|kernel - ref64| <= 2 * max|torch in the same dtype - ref64| + atol (STYLE.md).

    atol is the fp32 rounding floor of a d-long accumulation of O(1) terms, 4 * sqrt(d) * eps(fp32): the kernels
    accumulate in fp32 whatever the storage dtype, and where the reference's error vanishes (a one-token
    sequence has dq = 0 exactly in autograd's softmax backward, but dp - rowsum(dO * O) in the tiled backward
    cancels only to rounding) the ratio alone would demand exactness. ``score_scale``: the largest |score| when
    it is far above 1, since a score of magnitude S is itself rounded to S * eps, the floor of every exp of it.
    """
    for name, a, b, r in zip(names, got, same_dtype, ref64):
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        err = (a.double() - r).abs().max().item()
        base = (b.double() - r).abs().max().item()
        atol = 4 * math.sqrt(a.shape[-1]) * torch.finfo(torch.float32).eps * max(1.0, score_scale)
        assert err <= 2 * base + atol, f"{name}: error {err:.3e} vs torch {base:.3e} (+{atol:.1e})"


def check_packed(lengths, H, d, dtype, backend="triton", tail=0, max_seqlen="exact"):
    cu = cu_of(lengths)
    T = sum(lengths) + tail
    q, k, v, g = (torch.randn(T, H, d) for _ in range(4))
    ms = max(lengths, default=0) if max_seqlen == "exact" else max_seqlen

    def ours(a, b, c):
        return visible_attention(a, b, c, cu_seqlens=cu, max_seqlen=ms, backend=backend)

    def ref(a, b, c):
        return visible_attention_ref(a, b, c, cu_seqlens=cu)

    got = run(ours, (q, k, v), g, dtype)
    assert_error_ratio(got, run(ref, (q, k, v), g, dtype), run(ref, (q, k, v), g, torch.float64))
    return got


PACKED_CASES = [
    # (lengths, heads, head dim, dtype)
    ([0, 1, 2, 15, 31, 49, 50], 2, 64, torch.float32),
    ([197], 2, 64, torch.float32),
    ([13, 197, 0, 7], 2, 32, torch.float16),
    ([2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53], 1, 32, torch.float32),
    ([1], 3, 64, torch.float32),
    ([50, 50, 50, 50], 2, 80, torch.float32),
    ([49, 50, 1, 0], 2, 80, torch.float16),
    ([63, 64, 65, 129, 33], 1, 32, torch.float16),
    ([33, 17], 1, 96, torch.float32),
    ([40, 9], 1, 128, torch.float16),
    ([5, 20], 2, 16, torch.float32),
    # every tile of the short path in one batch (16, 32, 64, 128 rows), and the boundaries between them
    ([1, 16, 17, 32, 33, 64, 65, 100, 128], 2, 32, torch.float16),
    # the tiled forward's partial key block at each width (16, 32, 64 of 64-key blocks): 150 and 90 end on 22 and
    # 26 keys, 20 / 16 / 17 on their only block
    ([150, 90, 20, 16, 17, 180], 1, 32, torch.float16),
]


@pytest.mark.parametrize("lengths,H,d,dtype", PACKED_CASES,
                         ids=lambda v: str(v).replace("torch.", "") if not isinstance(v, list) else
                         ("len" + "-".join(map(str, v)) if len(v) <= 7 else f"{len(v)}primes"))
def test_packed_matches_float64_reference(interpret, lengths, H, d, dtype):
    check_packed(lengths, H, d, dtype)


@pytest.mark.parametrize("seed", range(8))
def test_peaked_short_sequences_in_half_precision(interpret, seed):
    # scores of a few units over a handful of tokens: softmax rows near one-hot, where a delta taken from the fp16
    # output (rowsum(dO * O)) instead of the fp32 tiles left dq / dk up to 14x past the error-ratio bound
    gen = torch.Generator().manual_seed(seed)
    lengths = [3, 3]
    cu = cu_of(lengths)
    q, k, v = (3 * torch.randn(sum(lengths), 1, 64, generator=gen) for _ in range(3))
    for g in (torch.ones(sum(lengths), 1, 64), torch.randn(sum(lengths), 1, 64, generator=gen)):
        got = run(lambda a, b, c: visible_attention(a, b, c, cu_seqlens=cu, max_seqlen=3, backend="triton"),
                  (q, k, v), g, torch.float16)
        ref = lambda a, b, c: visible_attention_ref(a, b, c, cu_seqlens=cu)  # noqa: E731
        assert_error_ratio(got, run(ref, (q, k, v), g, torch.float16), run(ref, (q, k, v), g, torch.float64))


def test_max_seqlen_upper_bound_is_bit_equal_to_exact(interpret):
    exact = check_packed([3, 29, 17], 2, 32, torch.float32)
    torch.manual_seed(0)
    bound = check_packed([3, 29, 17], 2, 32, torch.float32, max_seqlen=None)
    for a, b in zip(exact, bound):
        assert torch.equal(a, b)


def test_nan_in_unused_tail_does_not_leak(interpret):
    lengths, H, d, tail = [17, 0, 40], 2, 64, 11
    cu = cu_of(lengths)
    n = sum(lengths)
    q, k, v, g = (torch.randn(n + tail, H, d) for _ in range(4))
    for t in (q, k, v, g):
        t[n:] = float("nan")
    got = run(lambda a, b, c: visible_attention(a, b, c, cu_seqlens=cu, max_seqlen=40, backend="triton"),
              (q, k, v), g)
    clean = [t[:n] for t in (q, k, v, g)]
    ref = run(lambda a, b, c: visible_attention_ref(a, b, c, cu_seqlens=cu), clean[:3], clean[3], torch.float64)
    same = run(lambda a, b, c: visible_attention_ref(a, b, c, cu_seqlens=cu), clean[:3], clean[3])
    for t in got:
        assert torch.isfinite(t).all()
        assert torch.equal(t[n:], torch.zeros_like(t[n:])), "tail rows must be zero"
    assert_error_ratio([t[:n] for t in got], same, ref)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # no overflow anywhere, not even in rows never stored
@pytest.mark.parametrize("lengths,short", [([7, 20], True), ([7, 70], False)], ids=["short-path", "tiled-path"])
def test_very_negative_scores(interpret, lengths, short):
    # every query anti-aligned with its sequence's keys: all real scores near -170, so a padded key (score 0)
    # would dominate, or overflow exp, unless masked (70 tokens: two whole 32-key blocks and a partial one)
    from mimfast.kernels.visible_attention import short_config

    H, d = 1, 32
    assert (short_config(d, max(lengths), True) is not None) == short
    assert (short_config(d, max(lengths), True, backward=True) is not None) == short
    cu = cu_of(lengths)
    key = torch.randn(d) / math.sqrt(d) * 4
    k = key.expand(sum(lengths), H, d) + 0.01 * torch.randn(sum(lengths), H, d)
    q = -60 * key.expand(sum(lengths), H, d).clone()
    v, g = torch.randn(sum(lengths), H, d), torch.randn(sum(lengths), H, d)
    got = run(lambda a, b, c: visible_attention(a, b, c, cu_seqlens=cu, max_seqlen=max(lengths), backend="triton"),
              (q, k, v), g)
    ref = run(lambda a, b, c: visible_attention_ref(a, b, c, cu_seqlens=cu), (q, k, v), g, torch.float64)
    same = run(lambda a, b, c: visible_attention_ref(a, b, c, cu_seqlens=cu), (q, k, v), g)
    # an unmasked padded key would be off by O(1) or overflow; the rounding floor of scores near -170 is not 1e-7
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) / math.sqrt(d)
    assert_error_ratio(got, same, ref, score_scale=scores.abs().max().item())


def test_every_output_element_is_written(interpret):
    lengths, H, d, tail = [5, 0, 31, 1], 3, 80, 6
    cu = cu_of(lengths)
    T = sum(lengths) + tail
    q, k, v, g = (torch.randn(T, H, d) for _ in range(4))
    out = torch.full_like(q, float("nan"))
    lse = torch.full((H, T), float("nan"))
    launch_forward(q, k, v, cu, 31, 1 / math.sqrt(d), out, lse)
    assert torch.isfinite(out).all()
    assert torch.isfinite(lse).all()
    expected = visible_attention_ref(q.double(), k.double(), v.double(), cu_seqlens=cu)
    assert (out.double() - expected).abs().max() < 1e-5
    dq, dk, dv = (torch.full_like(q, float("nan")) for _ in range(3))
    launch_backward(g, q, k, v, out, lse, cu, 31, 1 / math.sqrt(d), dq, dk, dv)
    for t in (dq, dk, dv):
        assert torch.isfinite(t).all()
        assert torch.equal(t[sum(lengths):], torch.zeros_like(t[sum(lengths):]))


def test_forward_and_backward_are_deterministic(interpret):
    cu = cu_of([37, 50, 12])
    q, k, v, g = (torch.randn(99, 2, 64) for _ in range(4))

    def once():
        return run(lambda a, b, c: visible_attention(a, b, c, cu_seqlens=cu, max_seqlen=50, backend="triton"),
                   (q, k, v), g)

    for a, b in zip(once(), once()):
        assert torch.equal(a, b)


def test_dense_equals_packed_and_reference(interpret):
    N, S, H, d = 3, 37, 2, 32
    qkv = torch.randn(N, S, 3, H, d)  # q, k, v as strided views of one projection, as a ViT block makes them
    g = torch.randn(N, S, H, d)
    q, k, v = qkv.unbind(2)

    def dense(a, b, c):
        return visible_attention(a, b, c, backend="triton")

    got = run(dense, (q, k, v), g)
    assert_error_ratio(got, run(visible_attention_ref, (q, k, v), g),
                       run(visible_attention_ref, (q, k, v), g, torch.float64))
    cu = cu_of([S] * N)
    packed = run(lambda a, b, c: visible_attention(a, b, c, cu_seqlens=cu, max_seqlen=S, backend="triton"),
                 [t.reshape(N * S, H, d) for t in (q, k, v)], g.reshape(N * S, H, d))
    for a, b in zip(got, packed):
        assert torch.equal(a.reshape(N * S, H, d), b)


def test_dense_non_contiguous_head_major_input(interpret):
    N, S, H, d = 2, 19, 3, 64
    q, k, v = (torch.randn(N, H, S, d).transpose(1, 2) for _ in range(3))
    g = torch.randn(N, S, H, d).transpose(1, 2).contiguous().transpose(1, 2)
    got = run(lambda a, b, c: visible_attention(a, b, c, backend="triton"), (q, k, v), g)
    assert_error_ratio(got, run(visible_attention_ref, (q, k, v), g),
                       run(visible_attention_ref, (q, k, v), g, torch.float64))


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "dense"])
def test_torch_backend_matches_reference(packed):
    if packed:
        check_packed([0, 7, 49, 50, 197], 2, 64, torch.float32, backend="torch", tail=3)
        return
    q, k, v, g = (torch.randn(2, 50, 3, 64) for _ in range(4))
    got = run(lambda a, b, c: visible_attention(a, b, c, backend="torch"), (q, k, v), g)
    assert_error_ratio(got, run(visible_attention_ref, (q, k, v), g),
                       run(visible_attention_ref, (q, k, v), g, torch.float64))


def test_real_mae_shapes_torch_backend():
    # ViT-B encoder over ragged visible sets of a 196-patch image (cls included), and the 197-token decoder
    lengths = [1 + int(196 * (1 - r)) for r in (0.6, 0.75, 0.9, 0.83)]
    check_packed(lengths, 12, 64, torch.float32, backend="torch")
    q, k, v = (torch.randn(2, 197, 16, 32) for _ in range(3))
    out = visible_attention(q, k, v, backend="torch")
    assert (out.double() - visible_attention_ref(q, k, v, upcast=True).double()).abs().max() < 1e-5


def test_scale_is_honoured(interpret):
    cu = cu_of([9, 21])
    q, k, v = (torch.randn(30, 2, 32) for _ in range(3))
    got = visible_attention(q, k, v, cu_seqlens=cu, max_seqlen=21, scale=0.3, backend="triton")
    ref = visible_attention_ref(q.double(), k.double(), v.double(), cu_seqlens=cu, scale=0.3)
    assert (got.double() - ref).abs().max() < 1e-5
    assert (visible_attention_ref(q.double(), k.double(), v.double(), cu_seqlens=cu) - ref).abs().max() > 1e-2
    # any real number: NumPy scalars too; a bool or a non-finite value is refused
    assert torch.equal(visible_attention(q, k, v, cu_seqlens=cu, max_seqlen=21, scale=np.float32(0.3),
                                         backend="triton"),
                       visible_attention(q, k, v, cu_seqlens=cu, max_seqlen=21, scale=float(np.float32(0.3)),
                                         backend="triton"))
    for bad in (True, np.bool_(True), float("inf"), "0.3"):
        with pytest.raises(ValueError, match="finite number"):
            visible_attention(q, k, v, cu_seqlens=cu, scale=bad)


@pytest.mark.parametrize("scale", [0.3, -0.45, -4.0, 0.0], ids=["positive", "negative", "negative-large", "zero"])
def test_scale_sign_on_the_tiled_path(interpret, scale):
    # sequences past the short path's limit run the tiled kernels, whose running max is taken of the raw scores
    # and then scaled (a min for a negative scale): whole key blocks (64 = 2 x 32), a partial last block, and one
    # of each in a row
    lengths = [64, 65, 100, 3]
    cu = cu_of(lengths)
    q, k, v, g = (torch.randn(sum(lengths), 2, 32) for _ in range(4))

    def ours(a, b, c):
        return visible_attention(a, b, c, cu_seqlens=cu, max_seqlen=100, scale=scale, backend="triton")

    def ref(a, b, c):
        return visible_attention_ref(a, b, c, cu_seqlens=cu, scale=scale)

    got = run(ours, (q, k, v), g)
    assert_error_ratio(got, run(ref, (q, k, v), g), run(ref, (q, k, v), g, torch.float64))


# --------------------------------------------------------------------------------------------------------------
# The tiled kernels (_attn_fwd, _attn_bwd_delta, _attn_bwd): sequences past the short path's limit. Every case
# asserts that short_config refuses it, so a change of the limits cannot move these tests to the short path.

TILED_CASES = [
    # (lengths, heads, head dim, dtype, packed tail rows, loose max_seqlen: an int, or None for T)
    # fp32's short path stops at 64 tokens; 32-row blocks: one-row-partial (65 = 2 x 32 + 1), whole, an empty
    # sequence and one shorter than a block
    pytest.param([65, 0, 64, 3], 2, 32, torch.float32, 37, None, id="fp32-d32-len65-0-64-3"),
    # fp16 with d > 64 stops at 64 tokens; the bound 200 also grows the forward's query block from 64 to 128 rows
    pytest.param([100, 1, 65], 1, 80, torch.float16, 70, 200, id="fp16-d80-len100-1-65"),
    # fp32 with d > 64 stops at 32 tokens; a tail longer than a whole grid column, so its zeroing loop steps twice
    pytest.param([33, 5, 40, 1], 1, 96, torch.float32, 70, 100, id="fp32-d96-len33-5-40-1"),
]


def assert_tiled(d: int, dtype: torch.dtype, *max_seqlens: int) -> None:
    """Fail unless every max_seqlen runs the tiled kernels, forward and backward."""
    from mimfast.kernels.visible_attention import short_config

    fp32 = dtype == torch.float32
    for ms in max_seqlens:
        assert short_config(d, ms, fp32) is None, f"max_seqlen {ms} would take the short forward"
        assert short_config(d, ms, fp32, backward=True) is None, f"max_seqlen {ms} would take the short backward"


def lse_ref(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, scale: float) -> torch.Tensor:
    """[H, cu_seqlens[-1]] base-2 log-sum-exp of each query's scaled scores, computed in q's dtype."""
    bounds = cu_seqlens.tolist()
    return torch.cat([(torch.einsum("qhd,khd->hqk", q[s:e], k[s:e]) * scale).logsumexp(-1) / math.log(2)
                      for s, e in zip(bounds[:-1], bounds[1:])], dim=1)


@pytest.mark.parametrize("lengths,H,d,dtype,tail,loose", TILED_CASES)
def test_tiled_max_seqlen_upper_bound_matches_exact(interpret, lengths, H, d, dtype, tail, loose):
    from mimfast.kernels.visible_attention import fwd_config

    exact = max(lengths)
    bound = sum(lengths) + tail if loose is None else loose
    assert bound > exact
    assert_tiled(d, dtype, exact, bound)
    torch.manual_seed(0)
    with_exact = check_packed(lengths, H, d, dtype, tail=tail)
    torch.manual_seed(0)
    with_bound = check_packed(lengths, H, d, dtype, tail=tail, max_seqlen=loose)
    fp32 = dtype == torch.float32
    if fwd_config(d, exact, fp32) == fwd_config(d, bound, fp32):
        # the same tiles, the bound only adds idle programs: the same bits
        for name, a, b in zip(("out", "dq", "dk", "dv"), with_exact, with_bound):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("block_m,block_n,stages,narrow", [(64, 32, 2, True), (128, 128, 3, True), (128, 64, 3, False)])
def test_tiled_forward_tilings_of_the_sweep(interpret, monkeypatch, block_m, block_n, stages, narrow):
    # the forward tilings benchmarks/gpu_session.sh's sweep:attention times, on fp16 sequences past the short path
    # with partial query and key blocks; partial key blocks of every width (narrow) or all block_n wide
    import mimfast.kernels.visible_attention as kernels

    monkeypatch.setattr(kernels, "FWD_BLOCK_M", block_m)
    monkeypatch.setattr(kernels, "FWD_BLOCK_N", block_n)
    monkeypatch.setattr(kernels, "FWD_STAGES", stages)
    monkeypatch.setattr(kernels, "FWD_NARROW_TAIL", narrow)
    assert_tiled(32, torch.float16, 197)
    cfg = kernels.fwd_config(32, 197, False)
    assert cfg["BLOCK_N"] == block_n and cfg["TAIL_LEVELS"] == ((block_n // 16).bit_length() if narrow else 1)
    torch.manual_seed(0)
    check_packed([197, 3, 130, 150, 180], 1, 32, torch.float16, tail=5)


@pytest.mark.parametrize("lengths,H,d,dtype,tail,loose", TILED_CASES)
def test_tiled_every_element_written_and_tail_never_read(interpret, lengths, H, d, dtype, tail, loose):
    del loose
    max_seqlen, n = max(lengths), sum(lengths)
    assert_tiled(d, dtype, max_seqlen)
    cu, scale = cu_of(lengths), 1 / math.sqrt(d)
    q, k, v, g = (torch.randn(n + tail, H, d).to(dtype) for _ in range(4))
    for t in (q, k, v, g):
        t[n:] = float("nan")
    out, lse = torch.full_like(q, float("nan")), torch.full((H, n + tail), float("nan"))
    launch_forward(q, k, v, cu, max_seqlen, scale, out, lse)
    for name, t in (("out", out), ("lse", lse.T)):
        assert torch.isfinite(t).all(), f"{name}: NaN left or leaked"
        assert not t[n:].any(), f"{name}: tail rows must be zero"
    # the backward must not read the tail of the forward's results either
    out[n:], lse[:, n:] = float("nan"), float("nan")
    dq, dk, dv = (torch.full_like(q, float("nan")) for _ in range(3))
    launch_backward(g, q, k, v, out, lse, cu, max_seqlen, scale, dq, dk, dv)
    for name, t in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(t).all(), f"{name}: NaN left or leaked"
        assert not t[n:].any(), f"{name}: tail rows must be zero"

    clean = [t[:n] for t in (q, k, v, g)]

    def ref(a, b, c):
        return visible_attention_ref(a, b, c, cu_seqlens=cu)

    assert_error_ratio([out[:n], dq[:n], dk[:n], dv[:n]], run(ref, clean[:3], clean[3]),
                       run(ref, clean[:3], clean[3], torch.float64))
    lse64 = lse_ref(clean[0].double(), clean[1].double(), cu, scale)
    err = (lse[:, :n].double() - lse64).abs().max().item()
    base = (lse_ref(clean[0], clean[1], cu, scale).double() - lse64).abs().max().item()
    # the log-sum-exp is O(log2(n) + scores), not O(1): the fp32 rounding floor scales with it
    atol = 4 * math.sqrt(d) * torch.finfo(torch.float32).eps * lse64.abs().max().item()
    assert err <= 2 * base + atol, f"lse: error {err:.3e} vs torch {base:.3e} (+{atol:.1e})"


@pytest.mark.parametrize("lengths,H,d,dtype,tail,loose", TILED_CASES)
def test_tiled_forward_and_backward_are_deterministic(interpret, lengths, H, d, dtype, tail, loose):
    del loose
    max_seqlen = max(lengths)
    assert_tiled(d, dtype, max_seqlen)
    cu = cu_of(lengths)
    q, k, v, g = (torch.randn(sum(lengths) + tail, H, d) for _ in range(4))

    def once():
        return run(lambda a, b, c: visible_attention(a, b, c, cu_seqlens=cu, max_seqlen=max_seqlen, backend="triton"),
                   (q, k, v), g, dtype)

    first, second = once(), once()
    for name, a, b in zip(("out", "dq", "dk", "dv"), first, second):
        assert torch.isfinite(a).all(), name
        assert torch.equal(a, b), f"{name} differs between two runs"


def test_empty_inputs(interpret):
    q = torch.randn(0, 2, 32)
    assert visible_attention(q, q, q, cu_seqlens=cu_of([]), backend="triton").shape == (0, 2, 32)
    tail_only = torch.randn(4, 2, 32)
    out = visible_attention(tail_only, tail_only, tail_only, cu_seqlens=cu_of([]), backend="triton")
    assert torch.equal(out, torch.zeros_like(out))


def test_custom_op_passes_opcheck(interpret):
    from mimfast.ops.visible_attention import _attention_fwd

    cu = cu_of([3, 0, 20])
    q, k, v = (torch.randn(25, 2, 16, requires_grad=True) for _ in range(3))
    torch.library.opcheck(_attention_fwd, (q, k, v, cu, 20, 0.25))
    qd, kd, vd = (torch.randn(2, 9, 2, 16, requires_grad=True) for _ in range(3))
    torch.library.opcheck(_attention_fwd, (qd, kd, vd, None, 9, 0.25))


def test_compiles_without_graph_breaks(interpret):
    cu = cu_of([7, 30])
    q, k, v = (torch.randn(40, 2, 32) for _ in range(3))

    def f(a, b, c):
        return visible_attention(a, b, c, cu_seqlens=cu, max_seqlen=30, backend="triton").sum()

    # eager calls run an autograd.Function, compiled graphs the custom op: the same kernels, the same bits
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    eager = f(*leaves)
    eager_grads = torch.autograd.grad(eager, leaves)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves)
    assert torch.equal(eager, compiled)
    for a, b in zip(eager_grads, torch.autograd.grad(compiled, leaves)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad,match", [
    (lambda q, cu: dict(cu_seqlens=cu.long()), "int32"),
    (lambda q, cu: dict(cu_seqlens=torch.tensor([0, 9, 4, 12], dtype=torch.int32)), "non-decreasing"),
    (lambda q, cu: dict(cu_seqlens=torch.tensor([1, 4, 12], dtype=torch.int32)), "must be 0"),
    (lambda q, cu: dict(cu_seqlens=torch.tensor([0, 4, 13], dtype=torch.int32)), "<= T"),
    (lambda q, cu: dict(cu_seqlens=cu, max_seqlen=5), "max_seqlen"),
    (lambda q, cu: dict(cu_seqlens=cu, max_seqlen=-1), "max_seqlen"),
    (lambda q, cu: dict(cu_seqlens=cu.view(1, -1)), "1-D"),
    (lambda q, cu: dict(cu_seqlens=cu, scale=float("nan")), "scale"),
    (lambda q, cu: dict(), "dense"),
], ids=["int64", "decreasing", "start", "past-T", "max_seqlen-small", "max_seqlen-negative", "2-D", "nan-scale",
        "packed-without-cu"])
def test_input_checks(bad, match):
    q = torch.randn(12, 2, 16)
    cu = torch.tensor([0, 4, 12], dtype=torch.int32)
    with pytest.raises((TypeError, ValueError), match=match):
        visible_attention(q, q, q, **bad(q, cu))


def test_shape_and_dtype_mismatch():
    q = torch.randn(2, 5, 2, 16)
    with pytest.raises(ValueError, match="shape"):
        visible_attention(q, q[:, :4], q)
    with pytest.raises(TypeError, match="dtype"):
        visible_attention(q, q.half(), q)
    with pytest.raises(TypeError, match="floating"):
        visible_attention(q.long(), q.long(), q.long())
    with pytest.raises(ValueError, match="packed"):
        visible_attention(q, q, q, cu_seqlens=torch.tensor([0, 2], dtype=torch.int32))


def test_triton_refusals_are_explained(interpret):
    cu = cu_of([4])
    big = torch.randn(4, 1, 256)
    with pytest.raises(BackendUnavailableError, match="head dim 256"):
        visible_attention(big, big, big, cu_seqlens=cu, backend="triton")
    x = torch.randn(4, 1, 32, dtype=torch.bfloat16)
    with pytest.raises(BackendUnavailableError, match="bfloat16"):
        visible_attention(x, x, x, cu_seqlens=cu, backend="triton")
    x = torch.randn(4, 1, 32, dtype=torch.float64)
    with pytest.raises(BackendUnavailableError, match="float64"):
        visible_attention(x, x, x, cu_seqlens=cu, backend="triton")


_COMPILE_FOR_H100 = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mimfast.kernels import visible_attention as kernels

dtype, packed, d, max_seqlen = sys.argv[1], sys.argv[2] == "packed", int(sys.argv[3]), int(sys.argv[4])
fp32 = dtype == "fp32"
fwd, bwd = kernels.fwd_config(d, max_seqlen, fp32), kernels.bwd_config(d, fp32)
short = kernels.short_config(d, max_seqlen, fp32)
short_bwd = kernels.short_config(d, max_seqlen, fp32, backward=True)
common = {"HEAD_DIM": d, "PACKED": packed, "DOT_PRECISION": "ieee" if fp32 else "tf32"}
if short is None:
    launches = [
        (kernels._attn_fwd, {**common, **fwd, "NEG_SCALE": False}),
        (kernels._attn_bwd_delta, {"HEAD_DIM": d, "BLOCK_D": bwd["BLOCK_D"], "BLOCK_M": 64, "PACKED": packed}),
        (kernels._attn_bwd, {**common, **bwd}),
    ]
else:
    launches = [(kernels._attn_fwd_short, {**common, **short}), (kernels._attn_bwd_short, {**common, **short_bwd})]
for fn, config in launches:
    options = {k: config.pop(k) for k in ("num_warps", "num_stages") if k in config}
    signature = {}
    for name in fn.arg_names:
        if name in config:
            signature[name] = "constexpr"
        elif name in ("lse_ptr", "delta_ptr"):
            signature[name] = "*fp32"
        elif name == "cu_ptr":
            signature[name] = "*i32"
        elif name.endswith("_ptr"):
            signature[name] = "*" + dtype
        else:
            signature[name] = "fp32" if name == "scale" else "i32"
    src = ASTSource(fn=fn, signature=signature, constexprs=config)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    assert kernel.asm["cubin"] and kernel.metadata.shared <= 227 * 1024, kernel.metadata.shared
print("compiled")
"""


@pytest.mark.slow
@pytest.mark.parametrize("config", ["bf16 packed 64 80", "bf16 dense 64 50", "fp16 packed 128 64", "fp16 packed 96 128",
                                    "fp16 dense 128 1568", "bf16 dense 64 1568", "bf16 packed 80 197",
                                    "fp32 dense 96 50", "fp32 packed 64 100"])
def test_kernels_compile_for_h100(config):
    # full compilation to sm_90 cubins without a GPU (no interpreter, in a subprocess): catches what the interpreter
    # accepts and the compiler rejects (a loop-carried name changing shape did), and shared memory over the limit
    assert_compiles_for_h100(_COMPILE_FOR_H100, *config.split())


# --------------------------------------------------------------------------------------------------------------
# GPU: compiled kernels in half precision, real shapes.


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d", [32, 64, 80, 96, 128])
def test_gpu_packed_half_precision(dtype, d):
    lengths = [0, 1, 2, 15, 31, 49, 50, 197, 64, 128, 129, 255, 513]
    cu = cu_of(lengths, "cuda")
    T = sum(lengths) + 5
    q, k, v, g = (torch.randn(T, 4, d, device="cuda") for _ in range(4))

    def ours(a, b, c):
        return visible_attention(a, b, c, cu_seqlens=cu, max_seqlen=max(lengths), backend="triton")

    def ref(a, b, c):
        return visible_attention_ref(a, b, c, cu_seqlens=cu)

    assert_error_ratio(run(ours, (q, k, v), g, dtype), run(ref, (q, k, v), g, dtype),
                       run(ref, (q, k, v), g, torch.float64))


@pytest.mark.gpu
@pytest.mark.parametrize("S", [50, 197, 1568])
def test_gpu_dense_bf16_against_sdpa_and_reference(S):
    N, H, d = 2, 12, 64
    q, k, v, g = (torch.randn(N, S, H, d, device="cuda") for _ in range(4))
    ours = run(lambda a, b, c: visible_attention(a, b, c, backend="triton"), (q, k, v), g, torch.bfloat16)
    ref64 = run(visible_attention_ref, (q, k, v), g, torch.float64)
    assert_error_ratio(ours, run(visible_attention_ref, (q, k, v), g, torch.bfloat16), ref64)
    sdpa = run(lambda a, b, c: visible_attention(a, b, c, backend="torch"), (q, k, v), g, torch.bfloat16)
    assert_error_ratio(sdpa, run(visible_attention_ref, (q, k, v), g, torch.bfloat16), ref64)


@pytest.mark.gpu
def test_gpu_mae_encoder_batch_deterministic_and_tail_safe():
    gen = torch.Generator().manual_seed(1)
    ratios = torch.empty(256).uniform_(0.6, 0.9, generator=gen)
    lengths = [1 + int(196 * (1 - r)) for r in ratios.tolist()]
    cu = cu_of(lengths, "cuda")
    n = sum(lengths)
    q, k, v, g = (torch.randn(n + 64, 12, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    for t in (q, k, v, g):
        t[n:] = float("nan")

    def once():
        return run(lambda a, b, c: visible_attention(a, b, c, cu_seqlens=cu, max_seqlen=max(lengths),
                                                     backend="triton"), (q, k, v), g)

    first, second = once(), once()
    for a, b in zip(first, second):
        assert torch.equal(a, b)
        assert torch.isfinite(a).all() and not a[n:].any()


@pytest.mark.gpu
def test_gpu_auto_sends_dense_to_sdpa_and_packed_to_kernels():
    q, k, v = (torch.randn(2, 50, 12, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    assert torch.equal(visible_attention(q, k, v), visible_attention(q, k, v, backend="torch"))
    cu = cu_of([50, 50], "cuda")
    packed = [t.reshape(100, 12, 64) for t in (q, k, v)]
    ours = visible_attention(*packed, cu_seqlens=cu, max_seqlen=50, backend="triton")
    assert torch.equal(visible_attention(*packed, cu_seqlens=cu, max_seqlen=50), ours)


@pytest.mark.gpu
def test_gpu_cu_seqlens_checked_once_per_version():
    import importlib

    module = importlib.import_module("mimfast.ops.visible_attention")  # the package exports the function by name
    cu = cu_of([3, 9], "cuda")
    q = torch.randn(12, 2, 16, device="cuda", dtype=torch.float16)
    before = len([1 for ref, _ in module._CHECKED if ref() is cu])
    visible_attention(q, q, q, cu_seqlens=cu, max_seqlen=9)
    visible_attention(q, q, q, cu_seqlens=cu, max_seqlen=9)
    assert len([1 for ref, _ in module._CHECKED if ref() is cu]) == before + 1
    cu.copy_(cu_of([9, 3], "cuda"))  # an in-place write: checked again
    visible_attention(q, q, q, cu_seqlens=cu, max_seqlen=9)
    assert len([1 for ref, _ in module._CHECKED if ref() is cu]) == before + 2


@pytest.mark.gpu
def test_gpu_torch_compile_inductor():
    cu = cu_of([49, 50, 17], "cuda")
    q, k, v = (torch.randn(116, 12, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

    def f(a, b, c):
        return visible_attention(a, b, c, cu_seqlens=cu, max_seqlen=50, backend="triton").float().square().sum()

    eager = torch.autograd.grad(f(q, k, v), (q, k, v))
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True)(q, k, v), (q, k, v))
    for a, b in zip(eager, compiled):
        # the kernels are the same; inductor may round the fused square-sum around them differently
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("lengths,short", [([50, 1, 0, 49, 37], True), ([197, 129, 3, 0, 64], False)],
                         ids=["short-path", "tiled-path"])
def test_gpu_packed_bf16_forward_backward_without_host_sync(lengths, short):
    from mimfast.kernels.visible_attention import short_config

    max_seqlen = max(lengths)
    for backward in (False, True):
        assert (short_config(64, max_seqlen, False, backward=backward) is not None) == short
    seen = cu_of(lengths, "cuda")
    unseen = seen.clone()  # never checked yet: its values are checked on the device, by an asynchronous assertion
    q, k, v, g = (torch.randn(sum(lengths) + 5, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4))

    def step(cu):
        return run(lambda a, b, c: visible_attention(a, b, c, cu_seqlens=cu, max_seqlen=max_seqlen, backend="triton"),
                   (q, k, v), g)

    first = step(seen)  # compiles the kernels and checks `seen` outside the sync check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = step(seen)
        checked = step(unseen)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), first, again, checked):
        assert torch.isfinite(a).all(), name
        assert torch.equal(a, b) and torch.equal(a, c), name


# --------------------------------------------------------------------------------------------------------------
# End to end: MAE with one mask ratio per sample (packed encoder, dense decoder).

RAGGED_MAE = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16,
                  decoder_depth=1, decoder_num_heads=2, mlp_ratio=2.0)
RAGGED_RATIOS = [0.0, 0.5, 0.75, 0.9, 0.6]  # K = 16, 8, 4, 1, 6 of L = 16 patches


def per_sample_reference(model, imgs, noise, ratios=RAGGED_RATIOS):
    """The official single-ratio model run on one sample at a time, with that sample's ratio and noise row."""
    model.fused = False
    outs = [model(imgs[n:n + 1], mask_ratio=r, noise=noise[n:n + 1]) for n, r in enumerate(ratios)]
    pred, mask = torch.cat([o.pred for o in outs]), torch.cat([o.mask for o in outs])
    return model.forward_loss(imgs, pred, mask), pred, mask


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_ragged_mae_equals_per_sample_loop_float64(fused):
    from mimfast.models import MaskedAutoencoderViT

    model = MaskedAutoencoderViT(**RAGGED_MAE).double()
    N = len(RAGGED_RATIOS)
    imgs = torch.randn(N, 3, 16, 16, dtype=torch.float64)
    noise = torch.rand(N, 16)
    loss_ref, pred_ref, mask_ref = per_sample_reference(model, imgs, noise)
    grads_ref = torch.autograd.grad(loss_ref, [p for p in model.parameters() if p.requires_grad])
    model.fused = fused
    loss, pred, mask = model.forward_ragged(imgs, RAGGED_RATIOS, noise=noise)
    assert torch.equal(mask, mask_ref)
    assert mask.sum(1).tolist() == [16 - int(16 * (1 - r)) for r in RAGGED_RATIOS]
    assert (pred - pred_ref).abs().max() < 1e-12
    assert abs(loss.item() - loss_ref.item()) < 1e-12
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    for g, r in zip(grads, grads_ref):
        assert (g - r).abs().max() < 1e-12


def test_mae_forward_with_per_sample_ratios_is_forward_ragged():
    # one ratio per sample through __call__ (so DDP / FSDP wrappers see it): list, CPU tensor, 0-d tensor
    from mimfast.models import MaskedAutoencoderViT

    model = MaskedAutoencoderViT(**RAGGED_MAE).double()
    imgs = torch.randn(len(RAGGED_RATIOS), 3, 16, 16, dtype=torch.float64)
    noise = torch.rand(len(RAGGED_RATIOS), 16)
    want = model.forward_ragged(imgs, RAGGED_RATIOS, noise=noise)
    for ratios in (RAGGED_RATIOS, torch.tensor(RAGGED_RATIOS, dtype=torch.float64), np.array(RAGGED_RATIOS),
                   np.array(RAGGED_RATIOS, dtype=np.float32)):
        got = model(imgs, mask_ratio=ratios, noise=noise)
        assert torch.equal(got.mask, want.mask) and torch.equal(got.pred, want.pred) and got.loss == want.loss
    odd = np.array(RAGGED_RATIOS[::-1], dtype=">f8")[::-1]  # big-endian, negative stride
    for ratios in (odd, np.broadcast_to(np.array(RAGGED_RATIOS), (len(RAGGED_RATIOS),))):  # read-only
        got = model(imgs, mask_ratio=ratios, noise=noise)
        assert torch.equal(got.mask, want.mask) and torch.equal(got.pred, want.pred)
    # a ratio keeps as many patches whatever its type: float32 0.3 counts as the decimal 0.3 (at L = 100: 70 kept,
    # where its binary value 0.30000001192... would keep 69)
    from mimfast.models.mae import _scalar_ratio

    for scalar in (torch.tensor(0.3), np.float32(0.3), np.array(0.3, dtype=np.float32), np.float64(0.3),
                   torch.tensor(0.3, dtype=torch.float64)):
        assert _scalar_ratio(scalar) == 0.3 and int(100 * (1 - _scalar_ratio(scalar))) == 70
        one = model(imgs, mask_ratio=scalar, noise=noise)
        assert torch.equal(one.mask, model(imgs, mask_ratio=0.3, noise=noise).mask)

    with pytest.raises(ValueError):
        model(imgs, mask_ratio=[0.5, 0.5], noise=noise)


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_ragged_mae_with_the_compiled_length_bound_is_unchanged(monkeypatch, fused):
    # compiled graphs run the packed encoder with max_seqlen rounded up to a power of two (an upper bound)
    from mimfast.models import MaskedAutoencoderViT

    model = MaskedAutoencoderViT(**RAGGED_MAE).double()
    model.fused = fused
    ratios = [0.9, 0.75, 0.6]  # K = 1, 4, 6: the bound is 8, the embedding reads 8 rows of each sample
    imgs = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    noise = torch.rand(3, 16)
    want = model.forward_ragged(imgs, ratios, noise=noise)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    got = model.forward_ragged(imgs, ratios, noise=noise)
    assert torch.equal(got.mask, want.mask)
    assert (got.pred - want.pred).abs().max() < 1e-12 and abs(got.loss.item() - want.loss.item()) < 1e-12


def test_ragged_mae_triton_kernels(interpret):
    from mimfast import backend
    from mimfast.models import MaskedAutoencoderViT

    model = MaskedAutoencoderViT(**RAGGED_MAE)
    N = len(RAGGED_RATIOS)
    imgs = torch.randn(N, 3, 16, 16)
    noise = torch.rand(N, 16)
    loss64, pred64, _ = per_sample_reference(model.double(), imgs.double(), noise)
    loss32, pred32, _ = per_sample_reference(model.float(), imgs, noise)
    model.fused = True
    with backend.use("triton"):
        loss, pred, mask = model.forward_ragged(imgs, RAGGED_RATIOS, noise=noise)
    atol = 4 * math.sqrt(8) * torch.finfo(torch.float32).eps
    assert (pred.double() - pred64).abs().max() <= 2 * (pred32.double() - pred64).abs().max() + atol
    assert abs(loss.item() - loss64.item()) <= 2 * abs(loss32.item() - loss64.item()) + atol


def test_ragged_mae_triton_kernels_gradients(interpret):
    # fused fp32 model on the Triton kernels (packed encoder attention, dense decoder attention, the fused
    # embedding, restore and loss ops) against the per-sample reference model in float64; the reference model in
    # fp32 sets each parameter's error budget
    from mimfast import backend
    from mimfast.models import MaskedAutoencoderViT

    ratios = [0.0, 0.9, 0.6]  # K = L, K = 1 and between (three samples: the interpreter's pixel loss is slow)
    model = MaskedAutoencoderViT(**RAGGED_MAE)
    N = len(ratios)
    imgs = torch.randn(N, 3, 16, 16)
    noise = torch.rand(N, 16)
    names = [name for name, p in model.named_parameters() if p.requires_grad]

    def grads(loss):
        return torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])

    loss64, _, _ = per_sample_reference(model.double(), imgs.double(), noise, ratios)
    grads64 = grads(loss64)
    loss32, _, _ = per_sample_reference(model.float(), imgs, noise, ratios)
    grads32 = grads(loss32)
    model.fused = True
    with backend.use("triton"):
        loss = model.forward_ragged(imgs, ratios, noise=noise).loss
        got = grads(loss)
    eps = torch.finfo(torch.float32).eps
    head_dim = RAGGED_MAE["embed_dim"] // RAGGED_MAE["num_heads"]
    assert abs(loss.item() - loss64.item()) <= 2 * abs(loss32.item() - loss64.item()) + 4 * math.sqrt(head_dim) * eps
    for name, g, g32, g64 in zip(names, got, grads32, grads64):
        assert torch.isfinite(g).all(), f"{name}: non-finite gradient"
        err = (g.double() - g64).abs().max().item()
        base = (g32.double() - g64).abs().max().item()
        # gradients here are O(1e-2), not O(1): the fp32 rounding floor of assert_error_ratio scaled to their size
        atol = 4 * math.sqrt(head_dim) * eps * g64.abs().max().item()
        assert err <= 2 * base + atol, f"{name}: error {err:.3e} vs reference fp32 {base:.3e} (+{atol:.1e})"


def test_strided_cu_seqlens_view_and_no_second_derivative():
    lengths = [3, 4]
    q, k, v = (torch.randn(7, 2, 32, requires_grad=True) for _ in range(3))
    spaced = torch.zeros(6, dtype=torch.int32)
    spaced[::2] = cu_of(lengths)  # [0, x, 3, x, 7, x]: the view [0, 3, 7] has stride 2
    out = visible_attention(q, k, v, cu_seqlens=spaced[::2], max_seqlen=4, backend="triton")
    torch.testing.assert_close(out, visible_attention_ref(q, k, v, cu_seqlens=cu_of(lengths)), rtol=1e-4, atol=1e-4)
    # the kernels' backward is first order: a second derivative raises instead of being silently dropped
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(out.square().sum(), q, create_graph=True)
