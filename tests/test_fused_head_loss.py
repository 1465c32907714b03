import pytest
import torch
import torch.nn.functional as F

from mimfast.ops import fused_head_masked_pixel_loss, fused_head_masked_pixel_loss_ref, random_masking
from mimfast.ops.fused_head_loss import fused_head_pixel_loss_op, masked_ids_from_restore
from mimfast.ops.masked_pixel_loss import NORM_PATCH


def assert_by_error_ratio(out, same_dtype, ref64, rel_atol=1e-6):
    """max|out - ref64| <= 2 * max|torch in the same dtype - ref64| + atol (STYLE.md)."""
    out, same_dtype = out.double(), same_dtype.double()
    atol = rel_atol * max(1.0, ref64.abs().max().item())
    err, base = (out - ref64).abs().max().item(), (same_dtype - ref64).abs().max().item()
    assert err <= 2 * base + atol, f"error {err:.3e} > 2 * {base:.3e} + {atol:.1e}"


def make(N, C, H, W, p, D, dtype=torch.float32, ratio=0.75, device="cpu"):
    L, P = (H // p) * (W // p), p * p * C
    imgs = torch.randn(N, C, H, W, device=device)
    info = random_masking(N, L, ratio, device=device)
    hidden = torch.randn(N, L, D, device=device).to(dtype)
    weight = (torch.randn(P, D, device=device) / D**0.5).to(dtype)
    bias = (0.1 * torch.randn(P, device=device)).to(dtype)
    ids = masked_ids_from_restore(info.ids_restore, info.ids_keep.shape[1])
    return imgs, info, hidden, weight, bias, ids


def run_case(hidden, weight, bias, imgs, mask, p, **kw):
    """Fused path vs float64 reference vs torch reference in the inputs' dtype: loss and every gradient."""
    half = hidden.dtype in (torch.float16, torch.bfloat16)
    # half precision: a power-of-two grad_output, since the gradients are rounded in the forward pass
    grad_out = (torch.tensor(0.5) if half else torch.rand(()) + 0.5).to(hidden.device)
    params = [t for t in (hidden, weight, bias) if t is not None]

    def grads(fn, cast, **extra):
        xs = [cast(t).requires_grad_() for t in params]
        h, w, b = xs if bias is not None else (*xs, None)
        m = mask if mask is None or mask.dtype == torch.bool else cast(mask)
        loss = fn(h, w, b, cast(imgs), m, p, **kw, **extra)
        loss.backward(cast(grad_out))
        return loss.detach(), [x.grad for x in xs]

    loss, g = grads(fused_head_masked_pixel_loss, lambda t: t.detach().clone(), backend="triton")
    loss_t, g_t = grads(fused_head_masked_pixel_loss_ref, lambda t: t.detach().clone())
    loss64, g64 = grads(fused_head_masked_pixel_loss_ref, lambda t: t.detach().double())
    assert torch.isfinite(loss)
    assert_by_error_ratio(loss, loss_t, loss64)
    for a, b_, c in zip(g, g_t, g64):
        assert a.shape == c.shape and a.dtype == b_.dtype and torch.isfinite(a).all()
        assert_by_error_ratio(a, b_, c)
    return loss, g


@pytest.mark.parametrize("chunk_size", [1, 10, 10_000], ids=["chunk_1_sample", "chunk_10_rows", "one_chunk"])
@pytest.mark.parametrize("rows", ["ids_masked", "all_rows"])
@pytest.mark.parametrize("norm_pix", [False, True], ids=["raw", "norm_pix"])
def test_matches_float64(norm_pix, rows, chunk_size):
    imgs, info, hidden, weight, bias, ids = make(3, 3, 16, 12, 4, 24)
    kw = {"ids_masked": ids} if rows == "ids_masked" else {}
    _, g = run_case(hidden, weight, bias, imgs, info.mask, 4, norm_pix=norm_pix, chunk_size=chunk_size, **kw)
    visible = info.mask == 0
    assert (g[0][visible] == 0).all()  # hidden rows of visible patches get no gradient


@pytest.mark.filterwarnings("ignore:var\\(\\)")  # the reference's variance over zero rows
@pytest.mark.parametrize("case", ["l1_no_bias", "no_mask_with_ids", "P768", "fp16", "no_masked_patch"])
def test_variants(case):
    if case == "P768":
        imgs, info, hidden, weight, bias, ids = make(2, 3, 32, 16, 16, 32)
    elif case == "fp16":
        imgs, info, hidden, weight, bias, ids = make(2, 3, 16, 16, 4, 32, dtype=torch.float16)
    elif case == "no_masked_patch":
        imgs, info, hidden, weight, bias, ids = make(2, 3, 8, 8, 4, 16, ratio=0.0)
    else:
        imgs, info, hidden, weight, bias, ids = make(2, 3, 16, 16, 4, 16)
    if case == "l1_no_bias":
        run_case(hidden, weight, None, imgs, info.mask, 4, ids_masked=ids, kind="l1", norm_pix=True, chunk_size=5)
    elif case == "no_mask_with_ids":
        run_case(hidden, weight, bias, imgs, None, 4, ids_masked=ids, norm_pix=True, chunk_size=12)
    elif case == "no_masked_patch":
        loss, g = run_case(hidden, weight, bias, imgs, info.mask, 4, ids_masked=ids, norm_pix=True)
        assert ids.shape[1] == 0 and loss.item() == 0.0 and all((x == 0).all() for x in g)
    else:
        run_case(hidden, weight, bias, imgs, info.mask, 16 if case == "P768" else 4, ids_masked=ids, norm_pix=True,
                 chunk_size=20)


def ids_with_mask(N, L, R, first=()):
    """ids_masked [N, R] (the patches in ``first``, then random others, in shuffled order) and its 0/1 mask."""
    first = torch.tensor(first, dtype=torch.long)
    ids = []
    for _ in range(N):
        rest = torch.tensor([l for l in torch.randperm(L).tolist() if l not in first.tolist()])
        row = torch.cat([first, rest[: R - len(first)]])
        ids.append(row[torch.randperm(R)])
    ids = torch.stack(ids)
    return ids, torch.zeros(N, L).scatter_(1, ids, 1.0)


@pytest.mark.parametrize("chunk_size", [6, 10_000], ids=["chunk_1_sample", "one_chunk"])
@pytest.mark.parametrize("rows", ["all_rows", "ids_masked"])
def test_all_patches_masked(rows, chunk_size):
    # mask ratio 1: every row is scored; without ids the hidden gradient is written by the GEMMs alone
    imgs, _, hidden, weight, bias, _ = make(2, 3, 8, 12, 4, 16)  # L = 6
    N, L, _ = hidden.shape
    mask = torch.ones(N, L)
    kw = {"ids_masked": torch.argsort(torch.rand(N, L), dim=1)} if rows == "ids_masked" else {}
    _, g = run_case(hidden, weight, bias, imgs, mask, 4, norm_pix=True, chunk_size=chunk_size, **kw)
    assert (g[0] != 0).all()


@pytest.mark.parametrize("case", ["one_per_sample_ids", "one_per_sample_all_rows", "one_in_batch_all_rows"])
def test_exactly_one_masked_patch(case):
    imgs, _, hidden, weight, bias, _ = make(3, 3, 8, 8, 4, 16)  # L = 4
    N, L, _ = hidden.shape
    where = torch.tensor([0, 2, L - 1])  # first, middle and last patch
    mask = torch.zeros(N, L)
    mask[torch.arange(N), where] = 1.0
    if case == "one_in_batch_all_rows":
        mask[:2] = 0.0  # samples 0 and 1 mask nothing
    kw = {"ids_masked": where[:, None]} if case.endswith("ids") else {}
    _, g = run_case(hidden, weight, bias, imgs, mask, 4, norm_pix=True, chunk_size=1, **kw)
    assert (g[0][mask == 0] == 0).all() and (g[0][mask == 1] != 0).all()


@pytest.mark.parametrize("rows", ["ids_masked", "all_rows"])
def test_constant_patches_norm_pix(rows):
    # zero variance: the normalised target is exactly 0 for those patches (not rounding noise times 1 / sqrt(eps))
    imgs, _, hidden, weight, bias, _ = make(2, 3, 8, 12, 4, 16)  # 2 x 3 patches
    N, L, _ = hidden.shape
    imgs[:, :, :4, :4] = 0.3  # patch 0 of every sample
    imgs[1, :, 4:, 8:] = -1.7  # patch 5 of sample 1
    ids, mask = ids_with_mask(N, L, 3, first=(0, 5))
    kw = {"ids_masked": ids} if rows == "ids_masked" else {}
    run_case(hidden, weight, bias, imgs, mask, 4, norm_pix=True, chunk_size=6, **kw)


@pytest.mark.parametrize("huge", ["imgs", "pred"], ids=["huge_imgs", "huge_pred"])
@pytest.mark.parametrize("norm_pix", [False, True], ids=["raw", "norm_pix"])
def test_huge_values(norm_pix, huge):
    # huge imgs: pixels around 3e4 +- 1e4 and (raw target) predictions at that scale; huge pred: predictions 1e4
    # times the target's scale, from a huge weight and bias
    imgs, info, hidden, weight, bias, ids = make(2, 3, 8, 12, 4, 16)
    if huge == "imgs":
        imgs = imgs * 1e4 + 3e4
        if not norm_pix:
            weight, bias = weight * 1e4, bias + 3e4
    else:
        weight, bias = weight * 1e4, bias * 1e4
    run_case(hidden, weight, bias, imgs, info.mask, 4, ids_masked=ids, norm_pix=norm_pix, chunk_size=5)


def poison_torch_empty(monkeypatch):
    """Every tensor torch.empty allocates from here on starts as NaN (floating) or -1 (integer)."""
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -1)

    monkeypatch.setattr(torch, "empty", poisoned_empty)


@pytest.mark.parametrize("rows,chunk_size", [("all_rows", 6), ("ids_masked", 10_000)],
                         ids=["all_rows_chunk_1_sample", "ids_masked_one_chunk"])
def test_poisoned_internal_buffers_fully_overwritten(rows, chunk_size, monkeypatch):
    # the op exposes no buffers: its own torch.empty allocations (the hidden gradient when every row is scored, the
    # weight and error partials, the loss) are poisoned instead, and every output must be finite and match
    imgs, info, hidden, weight, bias, ids = make(3, 3, 8, 12, 4, 16)
    kw = {"ids_masked": ids} if rows == "ids_masked" else {}
    poison_torch_empty(monkeypatch)
    assert torch.isnan(torch.empty(2)).all()
    run_case(hidden, weight, bias, imgs, info.mask, 4, norm_pix=True, chunk_size=chunk_size, **kw)


def test_hidden_view_without_cls_row_and_bool_mask():
    imgs, info, hidden, weight, bias, ids = make(2, 3, 12, 12, 4, 16)
    with_cls = torch.randn(2, 1 + hidden.shape[1], 16)
    run_case(with_cls[:, 1:], weight, bias, imgs, info.mask.bool(), 4, ids_masked=ids, chunk_size=9)


@pytest.mark.parametrize("layout", ["cls_row_view", "sample_minor", "batch_expanded"])
@pytest.mark.parametrize("chunk_size", [9, 10_000], ids=["chunks", "one_chunk"])
def test_strided_hidden_is_read_in_place(layout, chunk_size):
    # the decoder's output without its cls row is a strided view read through a row view; a layout whose samples
    # do not stride evenly over rows is copied first. Either way: the values and gradients of the reference.
    imgs, info, hidden, weight, bias, ids = make(3, 3, 12, 12, 4, 16)
    N, L, D = hidden.shape
    if layout == "cls_row_view":
        base = torch.randn(N, 1 + L, D, requires_grad=True)
        view = lambda b: b[:, 1:]  # noqa: E731
    elif layout == "sample_minor":
        base = torch.randn(L, N, D, requires_grad=True)
        view = lambda b: b.transpose(0, 1)  # noqa: E731
    else:  # one sample's features broadcast over the batch: batch stride 0
        base = torch.randn(1, L, D, requires_grad=True)
        view = lambda b: b.expand(N, L, D)  # noqa: E731
    assert not view(base).is_contiguous()
    grads = []
    for fn, kw in ((fused_head_masked_pixel_loss, {"backend": "triton", "chunk_size": chunk_size}),
                   (fused_head_masked_pixel_loss_ref, {})):
        b = base.detach().clone().requires_grad_()
        w, bb = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        loss = fn(view(b), w, bb, imgs, info.mask, 4, ids_masked=ids, norm_pix=True, **kw)
        grads.append([loss.detach()] + list(torch.autograd.grad(loss, (b, w, bb))))
    for a, r in zip(*grads):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


def test_chunking_does_not_change_the_result_and_runs_are_bit_equal():
    imgs, info, hidden, weight, bias, ids = make(4, 3, 12, 16, 4, 16)

    def once(chunk_size):
        xs = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        loss = fused_head_masked_pixel_loss(*xs, imgs, info.mask, 4, ids_masked=ids, norm_pix=True,
                                            chunk_size=chunk_size, backend="triton")
        loss.backward()
        return [loss.detach()] + [x.grad for x in xs]

    a, b, c = once(9), once(9), once(1000)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    for x, y in zip(a, c):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def test_prediction_never_kept_for_backward():
    # what autograd keeps is the gradients of hidden, weight and bias: no [N, R, P] tensor in any dtype
    imgs, info, hidden, weight, bias, ids = make(2, 3, 16, 16, 4, 8, dtype=torch.float16)
    N, L, _ = hidden.shape
    P = weight.shape[0]
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fused_head_masked_pixel_loss(h, w, b, imgs, None, 4, ids_masked=ids, norm_pix=True, backend="triton")
    assert sorted(saved) == sorted([(tuple(h.shape), torch.float16), (tuple(w.shape), torch.float16),
                                    (tuple(b.shape), torch.float16)]), saved
    assert all(torch.Size(shape).numel() < N * ids.shape[1] * P for shape, _ in saved)


def test_backward_twice_with_retained_graph():
    """The stored gradients are scaled in place only by a graph's last backward."""
    imgs, info, hidden, weight, bias, ids = make(2, 3, 8, 12, 4, 16)
    xs = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss = fused_head_masked_pixel_loss(*xs, imgs, info.mask, 4, ids_masked=ids, norm_pix=True, backend="triton")
    first = torch.autograd.grad(loss, xs, torch.tensor(0.25), retain_graph=True)
    second = torch.autograd.grad(loss, xs, torch.tensor(2.0))
    plain = torch.autograd.grad(fused_head_masked_pixel_loss(*xs, imgs, info.mask, 4, ids_masked=ids, norm_pix=True,
                                                             backend="triton"), xs)
    for a, b, c in zip(first, second, plain):
        assert torch.equal(a, c * 0.25) and torch.equal(b, c * 2.0)


def test_return_pred_no_grad_and_ids_from_restore():
    imgs, info, hidden, weight, bias, ids = make(2, 3, 8, 12, 4, 16)
    K = info.ids_keep.shape[1]
    assert torch.equal(ids, torch.argsort(info.ids_restore, dim=1)[:, K:])
    assert (info.mask.gather(1, ids) == 1).all()
    loss, pred = fused_head_masked_pixel_loss(hidden, weight, bias, imgs, info.mask, 4, ids_masked=ids,
                                              return_pred=True, backend="triton")
    assert torch.equal(pred, F.linear(hidden, weight, bias)) and not pred.requires_grad
    with torch.no_grad():
        loss_ng = fused_head_masked_pixel_loss(hidden, weight, bias, imgs, info.mask, 4, ids_masked=ids,
                                               backend="triton")
    assert torch.equal(loss, loss_ng)
    out = fused_head_pixel_loss_op(hidden, weight, bias, imgs, info.mask, ids, 4, 1, NORM_PATCH, False, 1e-6, 64,
                                   False)
    assert all(t.numel() == 0 for t in out[1:])


def test_opcheck_and_errors():
    imgs, info, hidden, weight, bias, ids = make(2, 3, 8, 8, 4, 8)
    args = (hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), imgs, info.mask, ids, 4, 1,
            NORM_PATCH, False, 1e-6, 3, True)
    torch.library.opcheck(fused_head_pixel_loss_op, args)
    with pytest.raises(ValueError, match="weight must be"):
        fused_head_masked_pixel_loss(hidden, weight[:, :-1], bias, imgs, info.mask, 4)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_head_masked_pixel_loss(hidden, weight, bias, imgs, info.mask, 4, chunk_size=0)
    with pytest.raises(ValueError, match="ids_masked"):
        fused_head_masked_pixel_loss(hidden, weight, bias, imgs, info.mask, 4, ids_masked=ids[:1])
    # the decoder output with its cls row still in: every row would be one patch off
    with_cls = torch.cat((hidden[:, :1], hidden), dim=1)
    for mask in (None, info.mask):
        with pytest.raises(ValueError, match="one row per patch"):
            fused_head_masked_pixel_loss(with_cls, weight, bias, imgs, mask, 4, ids_masked=ids)
    with pytest.raises(ValueError, match="rows"):
        fused_head_masked_pixel_loss(with_cls, weight, bias, imgs, info.mask, 4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("rows", ["ids_masked", "all_rows"])
def test_empty_batch(backend, rows):
    imgs, info, hidden, weight, bias, ids = make(2, 3, 8, 8, 4, 8)
    params = [t[:0] if t is hidden else t for t in (hidden, weight, bias)]
    params = [t.clone().requires_grad_() for t in params]
    kw = {"ids_masked": ids[:0]} if rows == "ids_masked" else {}
    loss = fused_head_masked_pixel_loss(*params, imgs[:0], info.mask[:0], 4, backend=backend, **kw)
    loss.backward()
    assert loss.item() == 0.0
    assert [t.grad.shape for t in params] == [t.shape for t in params]
    assert all((t.grad == 0).all() for t in params)


@pytest.mark.gpu
@pytest.mark.parametrize("norm_pix", [False, True], ids=["raw", "norm_pix"])
def test_gpu_bf16_mae_b_decoder_shape(norm_pix, loss_transpose):
    torch.manual_seed(1)
    imgs, info, hidden, weight, bias, ids = make(16, 3, 224, 224, 16, 512, dtype=torch.bfloat16, device="cuda")
    run_case(hidden, weight, bias, imgs, info.mask, 16, ids_masked=ids, norm_pix=norm_pix, chunk_size=1024)


def _mae_run(model, imgs, noise):
    model.zero_grad()
    out = model(imgs, mask_ratio=0.75, noise=noise)
    out.loss.backward()
    return out, {k: v.grad.clone() for k, v in model.named_parameters() if v.requires_grad}


@pytest.mark.parametrize("norm_pix", [False, True], ids=["pixels", "norm_pix"])
def test_mae_fused_head_equals_reference_mode(norm_pix):
    from mimfast import backend
    from mimfast.models import MaskedAutoencoderViT

    model = MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16,
                                 decoder_depth=1, decoder_num_heads=2, mlp_ratio=2.0, norm_pix_loss=norm_pix).double()
    with torch.no_grad():
        for prm in model.parameters():
            prm.copy_(torch.randn_like(prm) * 0.2)
    imgs, noise = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.rand(2, 16)
    model.fused = False
    ref, ref_grads = _mae_run(model, imgs, noise)
    model.fused = True
    assert not model.fused_head and model.return_pred
    model.fused_head = True
    fused, fused_grads = _mae_run(model, imgs, noise)
    assert torch.equal(fused.mask, ref.mask) and fused.pred.requires_grad
    torch.testing.assert_close(fused.pred, ref.pred, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused.loss, ref.loss, rtol=1e-12, atol=0)
    assert set(fused_grads) == set(ref_grads)
    for name in ref_grads:
        torch.testing.assert_close(fused_grads[name], ref_grads[name], rtol=1e-10, atol=1e-12, msg=name)
    # the Triton head (fp32, interpreter) against the unfused fused-mode path, and pred skipped on request
    model = model.float()
    model.return_pred = False
    with backend.use("triton"):
        tri, tri_grads = _mae_run(model, imgs.float(), noise)
    assert tri.pred is None
    model.fused_head = False
    plain, plain_grads = _mae_run(model, imgs.float(), noise)
    torch.testing.assert_close(tri.loss, plain.loss, rtol=1e-5, atol=1e-6)
    for name in plain_grads:
        torch.testing.assert_close(tri_grads[name], plain_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def two_runs(hidden, weight, bias, imgs, mask, p, **kw):
    """[loss, d/dhidden, d/dweight, d/dbias] of two identical calls."""
    outs = []
    for _ in range(2):
        xs = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        loss = fused_head_masked_pixel_loss(*xs, imgs, mask, p, backend="triton", **kw)
        loss.backward()
        outs.append([loss.detach()] + [x.grad for x in xs])
    return outs


@pytest.mark.gpu
@pytest.mark.parametrize("chunk_size", [1024, 65536], ids=["chunks", "one_chunk"])
@pytest.mark.parametrize("rows", ["ids_masked", "all_rows"])
def test_gpu_bf16_run_to_run_bit_equality(rows, chunk_size):
    torch.manual_seed(2)
    imgs, info, hidden, weight, bias, ids = make(16, 3, 224, 224, 16, 512, dtype=torch.bfloat16, device="cuda")
    kw = {"ids_masked": ids} if rows == "ids_masked" else {}
    first, second = two_runs(hidden, weight, bias, imgs, info.mask, 16, norm_pix=True, chunk_size=chunk_size, **kw)
    assert torch.isfinite(first[0]) and all(torch.isfinite(g).all() and g.dtype == torch.bfloat16 for g in first[1:])
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_repeated_masked_ids_are_refused():
    imgs, info, hidden, weight, bias, ids = make(2, 3, 8, 8, 4, 8)
    ids = ids.clone()
    ids[1, 1] = ids[1, 0]  # row 0 twice: its gradient would be written back once
    with pytest.raises(ValueError, match="ids_masked must not repeat"):
        fused_head_masked_pixel_loss(hidden, weight, bias, imgs, None, 4, ids_masked=ids, backend="triton")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("rows", ["masked", "all"])
def test_autocast_casts_the_head_like_nn_linear(rows, device):
    # fp32 decoder features and head under autocast (as in the MAE decoder): the GEMMs run in the autocast dtype
    # and the gradients come back in fp32, as for nn.Linear + the reference loss
    imgs, info, hidden, weight, bias, ids = make(2, 3, 8, 8, 4, 16, device=device)
    kw = dict(ids_masked=ids) if rows == "masked" else {}
    mask = None if rows == "masked" else info.mask

    def grads(backend):
        xs = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = fused_head_masked_pixel_loss(*xs, imgs, mask, 4, norm_pix=True, backend=backend, **kw)
        loss.backward()
        return [loss.detach().float()] + [x.grad for x in xs]

    got, ref = grads("triton"), grads("torch")
    assert all(g.dtype == torch.float32 for g in got[1:])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=2e-2, atol=2e-2 * float(b.abs().max()))
