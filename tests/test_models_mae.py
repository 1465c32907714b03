"""MaskedAutoencoderViT: official layout, sin-cos tables, init, reference math, fused == reference, errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_nn import block64, layer_norm64, randomize_

import mimfast.models as models
from mimfast import backend
from mimfast.backend import get_op
from mimfast.models import MaskedAutoencoderViT, MIMOutput
from mimfast.nn import Attention

TINY = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16,
            decoder_depth=1, decoder_num_heads=2, mlp_ratio=2.0)
FUSED_OPS = ("random_masking", "embed_visible", "restore_tokens", "masked_pixel_loss", "visible_attention")


def tiny(fused=False, **overrides):
    return MaskedAutoencoderViT(**{**TINY, "fused": fused, **overrides})


def needs_fused_ops():
    for name in FUSED_OPS:
        pytest.importorskip(f"mimfast.ops.{name}")


def official_keys(depth, decoder_depth):
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
             "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    keys += [f"blocks.{i}.{k}" for i in range(depth) for k in block]
    keys += ["norm.weight", "norm.bias", "decoder_embed.weight", "decoder_embed.bias", "mask_token",
             "decoder_pos_embed"]
    keys += [f"decoder_blocks.{j}.{k}" for j in range(decoder_depth) for k in block]
    keys += ["decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"]
    return keys


def official_shapes(L, D, depth, Dd, decoder_depth, P, mlp_hidden, decoder_mlp_hidden, C, p):
    def block(width, hidden):
        return {"norm1.weight": (width,), "norm1.bias": (width,), "attn.qkv.weight": (3 * width, width),
                "attn.qkv.bias": (3 * width,), "attn.proj.weight": (width, width), "attn.proj.bias": (width,),
                "norm2.weight": (width,), "norm2.bias": (width,), "mlp.fc1.weight": (hidden, width),
                "mlp.fc1.bias": (hidden,), "mlp.fc2.weight": (width, hidden), "mlp.fc2.bias": (width,)}

    shapes = {"cls_token": (1, 1, D), "pos_embed": (1, L + 1, D), "patch_embed.proj.weight": (D, C, p, p),
              "patch_embed.proj.bias": (D,), "norm.weight": (D,), "norm.bias": (D,), "decoder_embed.weight": (Dd, D),
              "decoder_embed.bias": (Dd,), "mask_token": (1, 1, Dd), "decoder_pos_embed": (1, L + 1, Dd),
              "decoder_norm.weight": (Dd,), "decoder_norm.bias": (Dd,), "decoder_pred.weight": (P, Dd),
              "decoder_pred.bias": (P,)}
    for i in range(depth):
        shapes.update({f"blocks.{i}.{k}": v for k, v in block(D, mlp_hidden).items()})
    for j in range(decoder_depth):
        shapes.update({f"decoder_blocks.{j}.{k}": v for k, v in block(Dd, decoder_mlp_hidden).items()})
    return shapes


def sincos_2d_by_formula(D, h, w):
    """Row r*w + c of the table: [sin(c w_i), cos(c w_i), sin(r w_i), cos(r w_i)], w_i = 10000^(-i / (D/4))."""
    quarter = D // 4
    rows = [[0.0] * D]
    for r in range(h):
        for c in range(w):
            omegas = [1.0 / 10000 ** (i / quarter) for i in range(quarter)]
            rows.append([math.sin(c * o) for o in omegas] + [math.cos(c * o) for o in omegas]
                        + [math.sin(r * o) for o in omegas] + [math.cos(r * o) for o in omegas])
    return torch.tensor(rows, dtype=torch.float64)


def pixel_targets(imgs, p):
    """[N, L, p*p*C] with value (i, j, c) of patch (a, b) = imgs[n, c, a*p + i, b*p + j], set one value at a time."""
    N, C, H, W = imgs.shape
    out = torch.empty(N, (H // p) * (W // p), p * p * C, dtype=imgs.dtype)
    for i in range(p):
        for j in range(p):
            for c in range(C):
                out[:, :, (i * p + j) * C + c] = imgs[:, c, i::p, j::p].reshape(N, -1)
    return out


def mae_loss64(model, imgs, noise, mask_ratio):
    """MAE written independently from the state dict: unfold-matmul embedding, python-sorted masking, per-head
    attention, per-position decoder assembly, element-wise targets. Returns (loss, pred, mask)."""
    sd = model.state_dict()
    p = model.patch_size
    N, L = imgs.shape[0], model.num_patches
    K = int(L * (1 - mask_ratio))
    heads, decoder_heads = model.blocks[0].attn.num_heads, model.decoder_blocks[0].attn.num_heads
    D = sd["cls_token"].shape[-1]
    tokens = F.unfold(imgs, p, stride=p).transpose(1, 2) @ sd["patch_embed.proj.weight"].reshape(D, -1).T
    tokens = tokens + sd["patch_embed.proj.bias"] + sd["pos_embed"][0, 1:]
    keep = [sorted(range(L), key=lambda j: (noise[n, j].item(), j))[:K] for n in range(N)]
    x = torch.stack([tokens[n, keep[n]] for n in range(N)])
    cls = (sd["cls_token"][0, 0] + sd["pos_embed"][0, 0]).expand(N, 1, D)
    x = torch.cat([cls, x], 1)
    for i in range(len(model.blocks)):
        x = block64(x, sd, f"blocks.{i}.", heads)
    x = layer_norm64(x, sd["norm.weight"], sd["norm.bias"])
    y = x @ sd["decoder_embed.weight"].T + sd["decoder_embed.bias"]
    rows = []
    for n in range(N):
        seq = [y[n, 0]]
        for j in range(L):
            seq.append(y[n, 1 + keep[n].index(j)] if j in keep[n] else sd["mask_token"][0, 0])
        rows.append(torch.stack(seq))
    x = torch.stack(rows) + sd["decoder_pos_embed"][0]
    for j in range(len(model.decoder_blocks)):
        x = block64(x, sd, f"decoder_blocks.{j}.", decoder_heads)
    x = layer_norm64(x, sd["decoder_norm.weight"], sd["decoder_norm.bias"])
    pred = (x @ sd["decoder_pred.weight"].T + sd["decoder_pred.bias"])[:, 1:]
    target = pixel_targets(imgs, p)
    if model.norm_pix_loss:
        P = target.shape[-1]
        mean = target.sum(-1, keepdim=True) / P
        var = ((target - mean) ** 2).sum(-1, keepdim=True) / (P - 1)
        target = (target - mean) / torch.sqrt(var + 1e-6)
    mask = torch.ones(N, L, dtype=torch.float64)
    for n in range(N):
        mask[n, keep[n]] = 0.0
    per_patch = ((pred - target) ** 2).mean(-1)
    return (per_patch * mask).sum() / mask.sum(), pred, mask


def run(model, imgs, mask_ratio, noise):
    """Loss, pred, mask and every gradient of one forward/backward."""
    model.zero_grad()
    out = model(imgs, mask_ratio=mask_ratio, noise=noise)
    out.loss.backward()
    grads = {k: v.grad.clone() for k, v in model.named_parameters() if v.requires_grad}
    return out, grads


@pytest.mark.parametrize("norm_pix", [False, True], ids=["pixels", "norm_pix"])
def test_reference_matches_independent_formulation(norm_pix):
    model = randomize_(tiny(norm_pix_loss=norm_pix).double(), scale=0.2)
    imgs = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    noise = torch.rand(3, 16)
    out = model(imgs, mask_ratio=0.75, noise=noise)
    loss, pred, mask = mae_loss64(model, imgs, noise, 0.75)
    torch.testing.assert_close(out.mask.double(), mask, rtol=0, atol=0)
    torch.testing.assert_close(out.pred, pred, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.loss, loss, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("norm_pix,mask_ratio", [(False, 0.75), (True, 0.5), (True, 0.0)],
                         ids=["pixels-0.75", "norm_pix-0.5", "norm_pix-nothing_masked"])
def test_fused_equals_reference_float64(norm_pix, mask_ratio):
    needs_fused_ops()
    model = randomize_(tiny(norm_pix_loss=norm_pix).double(), scale=0.2)
    imgs = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    noise = torch.rand(2, 16)
    model.fused = False
    ref, ref_grads = run(model, imgs, mask_ratio, noise)
    model.fused = True
    fused, fused_grads = run(model, imgs, mask_ratio, noise)
    assert torch.equal(fused.mask, ref.mask)
    torch.testing.assert_close(fused.pred, ref.pred, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fused.loss, ref.loss, rtol=1e-10, atol=1e-12)
    if mask_ratio == 0.0:  # nothing masked: 0 in both modes, where the official formula divides 0 by 0
        assert ref.loss.item() == 0.0
    assert set(fused_grads) == set(ref_grads)
    for name in ref_grads:
        torch.testing.assert_close(fused_grads[name], ref_grads[name], rtol=1e-9, atol=1e-10, msg=name)


def test_fused_triton_backend_error_ratio():
    """Every fused op on its Triton kernel (interpreter on CPU), fp32, against a float64 reference run:
    max|triton - ref64| <= 2 max|torch fp32 - ref64| + atol, for loss, pred and gradients."""
    needs_fused_ops()
    if not backend.triton_interpret():
        pytest.skip("needs TRITON_INTERPRET=1 to run the Triton kernels on CPU")
    missing = [name for name in FUSED_OPS if "triton" not in get_op(name).available()]
    if missing:
        pytest.skip(f"no triton implementation yet for {missing}")
    model = randomize_(tiny(norm_pix_loss=True), scale=0.2)
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    model64 = tiny(norm_pix_loss=True).double()
    model64.load_state_dict(model.state_dict())
    ref64, grads64 = run(model64, imgs.double(), 0.75, noise)
    model.fused = False
    ref32, grads32 = run(model, imgs, 0.75, noise)
    model.fused = True
    with backend.use("triton"):
        tri, grads_tri = run(model, imgs, 0.75, noise)
    assert torch.equal(tri.mask, ref64.mask.float())
    pairs = [("loss", tri.loss, ref32.loss, ref64.loss), ("pred", tri.pred, ref32.pred, ref64.pred)]
    pairs += [(k, grads_tri[k], grads32[k], grads64[k]) for k in grads64]
    for name, got, same_dtype, exact in pairs:
        err = (got.double() - exact).abs().max().item()
        # atol relative to the tensor's own size: the encoder's gradients are ~1e-4, an absolute 1e-5 hid 10% errors
        budget = 2 * (same_dtype.double() - exact).abs().max().item() + 1e-5 * exact.abs().max().item()
        assert err <= budget, f"{name}: error {err:.3g} > {budget:.3g}"


def test_official_unpacking_and_shapes():
    model = tiny()
    imgs = torch.randn(4, 3, 32, 32)
    loss, pred, mask = model(imgs)
    out = model(imgs, mask_ratio=0.5)
    assert isinstance(out, MIMOutput) and out._fields == ("loss", "pred", "mask")
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert pred.shape == (4, 16, 192) and mask.shape == (4, 16)
    assert mask.sum(1).tolist() == [12.0] * 4 and out.mask.sum(1).tolist() == [8.0] * 4
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    latent, mask_e, ids_restore = model.forward_encoder(imgs, 0.75)
    assert latent.shape == (4, 1 + 4, 32) and ids_restore.shape == (4, 16)
    assert sorted(ids_restore[0].tolist()) == list(range(16))
    assert model.forward_decoder(latent, ids_restore).shape == (4, 16, 192)


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_same_noise_same_mask_and_loss(fused):
    if fused:
        needs_fused_ops()
    model = tiny(fused=fused)
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    a = model(imgs, noise=noise)
    b = model(imgs, noise=noise)
    c = model(imgs, noise=torch.rand(2, 16))
    assert torch.equal(a.mask, b.mask) and torch.equal(a.loss, b.loss) and torch.equal(a.pred, b.pred)
    assert not torch.equal(a.mask, c.mask)
    kept = noise.argsort(1)[:, :4]
    assert (a.mask.gather(1, kept) == 0).all() and a.mask.sum().item() == 2 * 12


def test_state_dict_is_official_layout():
    model = tiny()
    sd = model.state_dict()
    assert sorted(sd) == sorted(official_keys(2, 1))
    shapes = official_shapes(16, 32, 2, 16, 1, 192, 64, 32, 3, 8)
    assert {k: tuple(v.shape) for k, v in sd.items()} == shapes
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    with torch.device("meta"):
        base = models.mae_vit_base_patch16()
    base_shapes = official_shapes(196, 768, 12, 512, 8, 768, 3072, 2048, 3, 16)
    assert {k: tuple(v.shape) for k, v in base.state_dict().items()} == base_shapes
    # the encoder keys are timm's VisionTransformer keys (its classifier head aside)
    timm_prefixes = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
    assert all(k.startswith(timm_prefixes) for k in official_keys(12, 0)[:4 + 12 * 12 + 2])


def test_mae_vit_base_patch16_parameter_count():
    with torch.device("meta"):
        model = models.mae_vit_base_patch16()
    assert sum(p.numel() for p in model.parameters()) == 111_907_840


@pytest.mark.parametrize("name,width,depth,heads,patch", [
    ("mae_vit_tiny_patch16", 192, 12, 3, 16), ("mae_vit_tiny_patch14", 192, 12, 3, 14),
    ("mae_vit_small_patch16", 384, 12, 6, 16), ("mae_vit_small_patch14", 384, 12, 6, 14),
    ("mae_vit_base_patch16", 768, 12, 12, 16), ("mae_vit_base_patch14", 768, 12, 12, 14),
    ("mae_vit_large_patch16", 1024, 24, 16, 16), ("mae_vit_large_patch14", 1024, 24, 16, 14),
    ("mae_vit_huge_patch14", 1280, 32, 16, 14), ("mae_vit_huge_patch16", 1280, 32, 16, 16),
])
def test_factories(name, width, depth, heads, patch):
    with torch.device("meta"):
        model = getattr(models, name)(norm_pix_loss=True)
    L = (224 // patch) ** 2
    assert model.patch_size == patch and model.num_patches == L and model.in_chans == 3 and model.norm_pix_loss
    assert model.cls_token.shape[-1] == width and len(model.blocks) == depth
    assert model.blocks[0].attn.num_heads == heads
    assert model.mask_token.shape[-1] == 512 and len(model.decoder_blocks) == 8
    assert model.decoder_blocks[0].attn.num_heads == 16
    assert model.decoder_pred.out_features == patch * patch * 3 and model.fused


def test_sincos_position_tables():
    model = tiny(img_size=(16, 32), patch_size=8, embed_dim=32, decoder_embed_dim=16)
    assert model.grid_size == (2, 4)
    torch.testing.assert_close(model.pos_embed[0].double(), sincos_2d_by_formula(32, 2, 4), rtol=0, atol=1e-7)
    torch.testing.assert_close(model.decoder_pos_embed[0].double(), sincos_2d_by_formula(16, 2, 4), rtol=0,
                               atol=1e-7)
    assert torch.equal(model.pos_embed[0, 0], torch.zeros(32))
    with pytest.raises(ValueError, match="divisible by 4"):
        tiny(embed_dim=30, num_heads=3)


def test_initialisation():
    torch.manual_seed(1)
    model = tiny(embed_dim=64, decoder_embed_dim=32)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            bound = math.sqrt(6.0 / (module.in_features + module.out_features))
            assert module.weight.abs().max() <= bound, name
            assert module.weight.abs().max() > 0.9 * bound, name  # xavier, not nn.Linear's smaller default
            assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
        elif isinstance(module, torch.nn.LayerNorm):
            assert module.eps == 1e-6, name
            assert torch.equal(module.weight, torch.ones_like(module.weight)), name
            assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
    proj = model.patch_embed.proj.weight
    bound = math.sqrt(6.0 / (proj.shape[0] + proj[0].numel()))
    assert bound * 0.9 < proj.abs().max() <= bound
    for token in (model.cls_token, model.mask_token):
        assert 0.005 < token.std().item() < 0.05 and token.abs().max() < 0.2


def test_patchify_unpatchify():
    model = tiny(img_size=(16, 24))
    imgs = torch.randn(2, 3, 16, 24)
    x = model.patchify(imgs)
    assert torch.equal(x, pixel_targets(imgs, 8))
    assert torch.equal(model.unpatchify(x), imgs)


def test_backward_reaches_trainable_parameters_only():
    model = tiny()
    model(torch.randn(2, 3, 32, 32)).loss.backward()
    for name, param in model.named_parameters():
        if name in ("pos_embed", "decoder_pos_embed"):
            assert param.grad is None
        else:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name


def test_fused_switch_reaches_every_attention():
    model = tiny(fused=True)
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    assert len(attns) == 3 and all(a.fused for a in attns)
    model.fused = False
    assert not model.fused and not any(a.fused for a in attns)


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_clear_errors(fused):
    model = tiny(fused=fused)
    imgs = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        tiny(img_size=36)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model(torch.randn(2, 3, 36, 36))
    with pytest.raises(ValueError, match="does not match the model"):
        model(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(TypeError, match="floating"):
        model(torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8))
    for ratio in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="mask_ratio"):
            model(imgs, mask_ratio=ratio)
    with pytest.raises(ValueError, match="noise must have shape"):
        model(imgs, noise=torch.rand(2, 15))
    with pytest.raises(ValueError, match="noise is on meta"):
        model(imgs, noise=torch.rand(2, 16, device="meta"))
    with pytest.raises(ValueError, match="imgs is on meta"):
        model(imgs.to("meta"))
    with pytest.raises(ValueError, match="empty batch"):
        model(imgs[:0])


@pytest.mark.gpu
def test_gpu_bf16_fused_matches_reference():
    """On CUDA with bf16 autocast: the fused model (Triton kernels via auto) is as close to a float64 run as
    the reference model under the same autocast, for loss and gradients."""
    torch.manual_seed(0)
    model = models.mae_vit_tiny_patch16(img_size=64, norm_pix_loss=True).cuda()
    imgs = torch.randn(8, 3, 64, 64, device="cuda")
    noise = torch.rand(8, 16, device="cuda")
    model64 = models.mae_vit_tiny_patch16(img_size=64, norm_pix_loss=True).cuda().double()
    model64.load_state_dict(model.state_dict())
    model64.fused = False
    ref64, grads64 = run(model64, imgs.double(), 0.75, noise)
    results = {}
    for fused in (False, True):
        model.fused = fused
        with torch.autocast("cuda", dtype=torch.bfloat16):
            results[fused] = run(model, imgs, 0.75, noise)
    (ref, ref_grads), (tri, tri_grads) = results[False], results[True]
    assert torch.equal(tri.mask, ref.mask)
    checks = [("loss", tri.loss, ref.loss, ref64.loss)] + [(k, tri_grads[k], ref_grads[k], grads64[k]) for k in grads64]
    for name, got, same_dtype, exact in checks:
        err = (got.double() - exact).abs().max().item()
        budget = 2 * (same_dtype.double() - exact).abs().max().item() + 1e-3 * exact.abs().max().item()
        assert err <= budget, f"{name}: error {err:.3g} > {budget:.3g}"


def test_compiled_triton_model_draws_its_masks_in_the_graph():
    # no noise, triton backend, one graph: the mask is drawn inside it (a seed read at trace time would repeat the
    # same mask on every call); a smaller last batch recompiles instead of failing
    torch._dynamo.reset()
    model = randomize_(tiny(norm_pix_loss=True), scale=0.2)
    model.fused = True
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with backend.use("triton"):
        masks = [compiled(torch.randn(n, 3, 32, 32), mask_ratio=0.75).mask for n in (2, 2, 1)]
    assert not torch.equal(masks[0], masks[1]) and masks[2].shape == (1, 16)
    assert all(int(m.sum()) == 12 * m.shape[0] for m in masks)


@pytest.mark.slow
@pytest.mark.parametrize("with_noise", [False, True], ids=["fullgraph_drawn_mask", "given_noise"])
def test_compiled_fused_model_matches_eager(with_noise):
    """torch.compile traces the fused model (custom ops with fake kernels and autograd): without ``noise`` as one
    graph (fullgraph=True), with ``noise`` allowing the input checks to break the graph; same numbers as eager."""
    model = randomize_(tiny(norm_pix_loss=True).double(), scale=0.2)
    model.fused = True
    imgs = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    noise = torch.rand(2, 16) if with_noise else None
    compiled = torch.compile(model, fullgraph=not with_noise, backend="aot_eager")
    torch.manual_seed(5)
    eager, eager_grads = run(model, imgs, 0.75, noise)
    torch.manual_seed(5)
    model.zero_grad()
    out = compiled(imgs, mask_ratio=0.75, noise=noise)
    out.loss.backward()
    grads = {k: v.grad for k, v in model.named_parameters() if v.requires_grad}
    assert torch.equal(out.mask, eager.mask)
    torch.testing.assert_close(out.loss, eager.loss, rtol=1e-10, atol=1e-12)
    for name in eager_grads:
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-9, atol=1e-10, msg=name)
