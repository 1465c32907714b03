"""SimMIMViT: key layout, independent float64 formulation, fused == reference, init, mask forms, errors."""

import pytest
import torch
import torch.nn.functional as F
from test_nn import block64, layer_norm64, randomize_

import mimfast.models as models
from mimfast import backend
from mimfast.backend import get_op
from mimfast.models import MIMOutput, SimMIMViT

TINY = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


def tiny(fused=False, **overrides):
    return SimMIMViT(**{**TINY, "fused": fused, **overrides})


def random_mask(N, L, ratio=0.6):
    return torch.rand(N, L).argsort(1).argsort(1) < int(L * ratio)


def simmim64(model, imgs, mask):
    """SimMIM from the state dict: unfold-matmul embedding, explicit blend, per-head attention, the 1x1
    convolution as a matmul and pixel shuffle by index arithmetic, L1 over masked pixels. -> (loss, pred)."""
    sd = model.state_dict()
    p, C = model.patch_size, model.in_chans
    N, _, H, W = imgs.shape
    h, w = H // p, W // p
    D = sd["encoder.cls_token"].shape[-1]
    tokens = F.unfold(imgs, p, stride=p).transpose(1, 2) @ sd["encoder.patch_embed.proj.weight"].reshape(D, -1).T
    tokens = tokens + sd["encoder.patch_embed.proj.bias"]
    m = mask.reshape(N, -1, 1).double()
    tokens = tokens * (1 - m) + sd["encoder.mask_token"][0] * m
    x = torch.cat([sd["encoder.cls_token"].expand(N, 1, D), tokens], 1) + sd["encoder.pos_embed"]
    for i in range(len(model.encoder.blocks)):
        x = block64(x, sd, f"encoder.blocks.{i}.", model.encoder.blocks[0].attn.num_heads)
    x = layer_norm64(x, sd["encoder.norm.weight"], sd["encoder.norm.bias"])[:, 1:]
    out = x @ sd["decoder.0.weight"].reshape(-1, D).T + sd["decoder.0.bias"]  # [N, L, C*p*p]
    pred = torch.empty(N, C, H, W, dtype=torch.float64)
    for c in range(C):
        for i in range(p):
            for j in range(p):
                pred[:, c, i::p, j::p] = out[:, :, c * p * p + i * p + j].reshape(N, h, w)
    pixel_mask = m.reshape(N, 1, h, 1, w, 1).expand(N, 1, h, p, w, p).reshape(N, 1, H, W)
    loss = ((imgs - pred).abs() * pixel_mask).sum() / (pixel_mask.sum() + 1e-5) / C
    return loss, pred


def run(model, imgs, mask):
    model.zero_grad()
    out = model(imgs, mask)
    out.loss.backward()
    return out, {k: v.grad.clone() for k, v in model.named_parameters()}


def test_reference_matches_independent_formulation():
    model = randomize_(tiny().double(), scale=0.2)
    imgs = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    mask = random_mask(3, 16)
    out = model(imgs, mask)
    loss, pred = simmim64(model, imgs, mask)
    torch.testing.assert_close(out.pred, pred, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.loss, loss, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mask_form", ["bool", "float", "grid", "int64", "fractional"])
def test_fused_equals_reference_float64(mask_form):
    model = randomize_(tiny().double(), scale=0.2)
    imgs = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    mask = random_mask(2, 16)
    if mask_form == "float":
        mask = mask.double()
    elif mask_form == "grid":
        mask = mask.reshape(2, 4, 4)
    elif mask_form == "int64":  # what a default collate of SimMIM's mask generator arrays gives
        mask = mask.long()
    elif mask_form == "fractional":  # blended tokens and weighted pixels, as SimMIM computes them
        mask = mask.double() * torch.rand(2, 16, dtype=torch.float64)
    model.fused = False
    ref, ref_grads = run(model, imgs, mask)
    model.fused = True
    fused, fused_grads = run(model, imgs, mask)
    assert fused.mask.shape == (2, 16) and torch.equal(fused.mask, ref.mask)
    torch.testing.assert_close(fused.pred, ref.pred, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fused.loss, ref.loss, rtol=1e-10, atol=1e-12)
    for name in ref_grads:
        torch.testing.assert_close(fused_grads[name], ref_grads[name], rtol=1e-9, atol=1e-10, msg=name)


def test_fused_triton_backend_error_ratio():
    """Triton kernels (interpreter on CPU), fp32, against float64: error <= 2 x the torch fp32 error + atol."""
    if not backend.triton_interpret():
        pytest.skip("needs TRITON_INTERPRET=1 to run the Triton kernels on CPU")
    missing = [n for n in ("visible_attention", "simmim_pixel_loss") if "triton" not in get_op(n).available()]
    if missing:
        pytest.skip(f"no triton implementation yet for {missing}")
    model = randomize_(tiny(), scale=0.2)
    imgs = torch.randn(2, 3, 32, 32)
    mask = random_mask(2, 16)
    model64 = tiny().double()
    model64.load_state_dict(model.state_dict())
    ref64, grads64 = run(model64, imgs.double(), mask)
    ref32, grads32 = run(model, imgs, mask)
    model.fused = True
    with backend.use("triton"):
        tri, grads_tri = run(model, imgs, mask)
    pairs = [("loss", tri.loss, ref32.loss, ref64.loss), ("pred", tri.pred, ref32.pred, ref64.pred)]
    pairs += [(k, grads_tri[k], grads32[k], grads64[k]) for k in grads64]
    for name, got, same_dtype, exact in pairs:
        err = (got.double() - exact).abs().max().item()
        # atol relative to the tensor's own size: the encoder's gradients are ~1e-4, an absolute 1e-5 hid 10% errors
        budget = 2 * (same_dtype.double() - exact).abs().max().item() + 1e-5 * exact.abs().max().item()
        assert err <= budget, f"{name}: error {err:.3g} > {budget:.3g}"


def test_reference_loss_under_autocast_counts_masked_pixels_exactly():
    # 29 images of 16 patches of 8 x 8, 9 masked: 16704 masked pixels, a count bf16 cannot hold (it rounds to
    # 16640 or 16768); the official code counts them on its integer mask and divides in float32
    model = tiny()
    imgs = torch.randn(29, 3, 32, 32)
    mask = random_mask(29, 16, ratio=0.6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(imgs, mask)
    pixel_mask = mask.reshape(29, 4, 4).repeat_interleave(8, 1).repeat_interleave(8, 2).unsqueeze(1).long()
    official = (F.l1_loss(imgs, out.pred.float(), reduction="none") * pixel_mask).sum() / \
        (pixel_mask.sum() + 1e-5) / 3
    count = int(pixel_mask.sum())
    assert count == 16704 and float(torch.tensor(float(count)).bfloat16()) != count
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, official, rtol=1e-6, atol=0)


def test_official_unpacking_and_shapes():
    model = tiny(fused=True)
    mask = random_mask(4, 16)
    loss, pred, out_mask = model(torch.randn(4, 3, 32, 32), mask)
    assert isinstance(model(torch.randn(4, 3, 32, 32), mask), MIMOutput)
    assert loss.dim() == 0 and torch.isfinite(loss) and pred.shape == (4, 3, 32, 32)
    assert torch.equal(out_mask, mask)


def test_mask_changes_only_masked_embeddings():
    """A masked patch's pixels do not reach the model: changing them leaves pred unchanged."""
    model = tiny()
    imgs = torch.randn(1, 3, 32, 32)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, 5] = True
    edited = imgs.clone()
    edited[:, :, 8:16, 8:16] += 1.0  # patch (1, 1) = token 5
    torch.testing.assert_close(model(edited, mask).pred, model(imgs, mask).pred, rtol=0, atol=0)
    mask[0, 5] = False
    assert not torch.allclose(model(edited, mask).pred, model(imgs, mask).pred)


def test_state_dict_layout():
    model = tiny()
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
             "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    expected = {"encoder.cls_token": (1, 1, 32), "encoder.mask_token": (1, 1, 32), "encoder.pos_embed": (1, 17, 32),
                "encoder.patch_embed.proj.weight": (32, 3, 8, 8), "encoder.patch_embed.proj.bias": (32,),
                "encoder.norm.weight": (32,), "encoder.norm.bias": (32,), "decoder.0.weight": (192, 32, 1, 1),
                "decoder.0.bias": (192,)}
    shapes = dict(zip(block, [(32,), (32,), (96, 32), (96,), (32, 32), (32,), (32,), (32,), (64, 32), (64,),
                              (32, 64), (32,)]))
    for i in range(2):
        expected.update({f"encoder.blocks.{i}.{k}": v for k, v in shapes.items()})
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert model.encoder.pos_embed.requires_grad


@pytest.mark.parametrize("name,width,heads", [("simmim_vit_tiny_patch16", 192, 3),
                                              ("simmim_vit_small_patch16", 384, 6),
                                              ("simmim_vit_base_patch16", 768, 12)])
def test_factories(name, width, heads):
    with torch.device("meta"):
        model = getattr(models, name)()
    assert model.patch_size == 16 and model.num_patches == 196 and model.in_chans == 3 and model.fused
    assert model.encoder.cls_token.shape[-1] == width and len(model.encoder.blocks) == 12
    assert model.encoder.blocks[0].attn.num_heads == heads
    assert model.decoder[0].out_channels == 16 * 16 * 3 and model.decoder[1].upscale_factor == 16


def test_initialisation():
    torch.manual_seed(2)
    model = tiny(embed_dim=128, num_heads=4, depth=3)
    # normal(0.02) truncated at +-0.02: standard deviation 0.02 * 0.5398 (a unit normal cut at +-1)
    clipped_std = 0.02 * 0.5398
    proj = model.encoder.patch_embed.proj
    for token in (model.encoder.cls_token, model.encoder.mask_token, model.encoder.pos_embed, proj.weight):
        assert 0.9 * clipped_std < token.std().item() < 1.1 * clipped_std and token.abs().max() <= 0.02
    assert torch.equal(proj.bias, torch.zeros_like(proj.bias))
    for layer, block in enumerate(model.encoder.blocks, start=1):
        assert 0.95 * clipped_std < block.attn.qkv.weight.std().item() < 1.05 * clipped_std
        assert block.attn.qkv.weight.abs().max() <= 0.02
        for linear in (block.attn.proj, block.mlp.fc2):
            scaled = clipped_std / (2 * layer) ** 0.5
            assert 0.9 * scaled < linear.weight.std().item() < 1.1 * scaled
            assert torch.equal(linear.bias, torch.zeros_like(linear.bias))
        assert block.norm1.eps == 1e-6 and torch.equal(block.norm1.weight, torch.ones(128))


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_clear_errors(fused):
    model = tiny(fused=fused)
    imgs = torch.randn(2, 3, 32, 32)
    mask = random_mask(2, 16)
    with pytest.raises(ValueError, match="mask must be"):
        model(imgs, mask[:, :15])
    with pytest.raises(ValueError, match="mask must be"):
        model(imgs, mask.reshape(2, 2, 8))
    with pytest.raises(ValueError, match="mask must be"):
        model(imgs, mask[:1])
    with pytest.raises(TypeError, match="mask must be a tensor"):
        model(imgs, mask.tolist())
    with pytest.raises(ValueError, match="mask is on meta"):
        model(imgs, mask.to("meta"))
    with pytest.raises(ValueError, match="does not match the model"):
        model(torch.randn(2, 3, 16, 16), mask)
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(2, 4, 32, 32), mask)
    with pytest.raises(TypeError, match="floating"):
        model(torch.zeros(2, 3, 32, 32, dtype=torch.int64), mask)
    with pytest.raises(ValueError, match="imgs is on meta"):
        model(imgs.to("meta"), mask)
    with pytest.raises(ValueError, match="empty batch"):
        model(imgs[:0], mask[:0])
    with pytest.raises(TypeError, match="bool, integer or floating"):
        model(imgs, mask.to(torch.complex64))


@pytest.mark.gpu
def test_gpu_bf16_fused_matches_reference():
    torch.manual_seed(0)
    model = models.simmim_vit_tiny_patch16(img_size=64).cuda()
    imgs = torch.randn(4, 3, 64, 64, device="cuda")
    mask = (torch.rand(4, 16, device="cuda").argsort(1) < 10)
    model64 = models.simmim_vit_tiny_patch16(img_size=64, fused=False).cuda().double()
    model64.load_state_dict(model.state_dict())
    ref64, grads64 = run(model64, imgs.double(), mask)
    results = {}
    for fused in (False, True):
        model.fused = fused
        with torch.autocast("cuda", dtype=torch.bfloat16):
            results[fused] = run(model, imgs, mask)
    (ref, ref_grads), (tri, tri_grads) = results[False], results[True]
    checks = [("loss", tri.loss, ref.loss, ref64.loss)] + [(k, tri_grads[k], ref_grads[k], grads64[k]) for k in grads64]
    for name, got, same_dtype, exact in checks:
        err = (got.double() - exact).abs().max().item()
        budget = 2 * (same_dtype.double() - exact).abs().max().item() + 1e-3 * exact.abs().max().item()
        assert err <= budget, f"{name}: error {err:.3g} > {budget:.3g}"


@pytest.mark.parametrize("fused", [False, True])
def test_stochastic_depth_drops_or_rescales_whole_branches(fused):
    rate = 0.5  # the last of two blocks (rates linspace(0, 0.5, 2) = [0, 0.5])
    model = randomize_(tiny(fused=fused, drop_path_rate=rate).double(), scale=0.2).train()
    assert [b.drop_path for b in model.encoder.blocks] == [0.0, 0.5]
    imgs, mask = torch.randn(3, 3, 32, 32, dtype=torch.float64), random_mask(3, 16)
    noise = torch.zeros(3, 2, 2, dtype=torch.float64)
    noise[0, 1] = 0.9  # sample 0 keeps both branches of block 1 (u >= rate), the others drop them
    out = model(imgs, mask, drop_noise=noise)
    # dropped: as a one-block model; kept: as the plain model with block 1's branch outputs scaled by 1 / (1 - rate)
    short = tiny(fused=fused, depth=1).double()
    short.load_state_dict({k: v for k, v in model.state_dict().items() if "blocks.1." not in k})
    scaled = tiny(fused=fused).double()
    scaled.load_state_dict(model.state_dict())
    with torch.no_grad():
        for layer in (scaled.encoder.blocks[1].attn.proj, scaled.encoder.blocks[1].mlp.fc2):
            layer.weight.div_(1 - rate)
            layer.bias.div_(1 - rate)
    torch.testing.assert_close(out.pred[1:], short(imgs[1:], mask[1:]).pred, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.pred[:1], scaled(imgs[:1], mask[:1]).pred, rtol=1e-10, atol=1e-10)
    # evaluation mode: no drop
    plain = tiny(fused=fused).double()
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(model.eval()(imgs, mask, drop_noise=noise).pred, plain(imgs, mask).pred)
    with pytest.raises(ValueError, match="drop_noise must be"):
        model.train()(imgs, mask, drop_noise=noise[:, :1])
