"""mimfast.nn modules against formulations written out independently here (float64), plus the fused switch.

The ``*64`` helpers below are the element-level math of a ViT block; the model tests import them to build
whole-model formulations that share no code with mimfast.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from mimfast.nn import Attention, Block, Mlp, PatchEmbed, TubeletEmbed, attention_ref


def layer_norm64(x, weight, bias, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def gelu64(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def qkv_bias64(sd, prefix):
    """The qkv bias of a block in either layout: one ``qkv.bias`` or separate ``q_bias`` / ``v_bias``."""
    if prefix + "attn.qkv.bias" in sd:
        return sd[prefix + "attn.qkv.bias"]
    if prefix + "attn.q_bias" in sd:
        q_bias = sd[prefix + "attn.q_bias"]
        return torch.cat([q_bias, torch.zeros_like(q_bias), sd[prefix + "attn.v_bias"]])
    return torch.zeros(sd[prefix + "attn.qkv.weight"].shape[0], dtype=torch.float64)


def attention64(x, qkv_weight, qkv_bias, proj_weight, proj_bias, num_heads):
    """x [N, S, D]: per head, softmax(q k^T / sqrt(d)) v written with exp / sum, heads concatenated, projected."""
    D = x.shape[-1]
    d = D // num_heads
    qkv = x @ qkv_weight.T + qkv_bias
    heads = []
    for h in range(num_heads):
        q = qkv[..., h * d:(h + 1) * d]
        k = qkv[..., D + h * d:D + (h + 1) * d]
        v = qkv[..., 2 * D + h * d:2 * D + (h + 1) * d]
        scores = torch.einsum("nsc,ntc->nst", q, k) / math.sqrt(d)
        weights = torch.exp(scores - scores.amax(-1, keepdim=True))
        weights = weights / weights.sum(-1, keepdim=True)
        heads.append(torch.einsum("nst,ntc->nsc", weights, v))
    return torch.cat(heads, -1) @ proj_weight.T + proj_bias


def block64(x, sd, prefix, num_heads):
    """One pre-norm ViT block from state-dict tensors (keys under ``prefix``)."""
    g = lambda name: sd[prefix + name]
    h = layer_norm64(x, g("norm1.weight"), g("norm1.bias"))
    x = x + attention64(h, g("attn.qkv.weight"), qkv_bias64(sd, prefix), g("attn.proj.weight"), g("attn.proj.bias"),
                        num_heads)
    h = layer_norm64(x, g("norm2.weight"), g("norm2.bias"))
    return x + gelu64(h @ g("mlp.fc1.weight").T + g("mlp.fc1.bias")) @ g("mlp.fc2.weight").T + g("mlp.fc2.bias")


def randomize_(module, scale=0.5):
    """Fresh random values for every parameter (including zero-initialised biases) so no term hides."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return module


def test_patch_embed_is_patch_matmul():
    embed = PatchEmbed(img_size=(12, 20), patch_size=4, in_chans=3, embed_dim=8).double()
    imgs = torch.randn(2, 3, 12, 20, dtype=torch.float64)
    # patch (a, b), value (i, j, c) = imgs[:, c, 4a + i, 4b + j]
    patches = imgs.reshape(2, 3, 3, 4, 5, 4).permute(0, 2, 4, 3, 5, 1).reshape(2, 15, 48)
    weight = embed.proj.weight.permute(0, 2, 3, 1).reshape(8, 48)
    expected = patches @ weight.T + embed.proj.bias
    assert embed.num_patches == 15 and embed.grid_size == (3, 5) and embed.patch_size == (4, 4)
    torch.testing.assert_close(embed(imgs), expected, rtol=1e-12, atol=1e-12)


def test_tubelet_embed_is_cube_matmul():
    embed = TubeletEmbed(img_size=8, patch_size=4, num_frames=6, tubelet_size=2, in_chans=2, embed_dim=5).double()
    videos = torch.randn(3, 2, 6, 8, 8, dtype=torch.float64)
    # token (t, a, b), value (s, i, j, c) = videos[:, c, 2t + s, 4a + i, 4b + j]
    cubes = videos.reshape(3, 2, 3, 2, 2, 4, 2, 4).permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(3, 12, 64)
    weight = embed.proj.weight.permute(0, 2, 3, 4, 1).reshape(5, 64)
    assert embed.num_patches == 12 and embed.grid_size == (3, 2, 2)
    torch.testing.assert_close(embed(videos), cubes @ weight.T + embed.proj.bias, rtol=1e-12, atol=1e-12)


def test_embed_errors():
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        PatchEmbed(img_size=30, patch_size=8)
    with pytest.raises(ValueError, match="tubelet"):
        TubeletEmbed(img_size=16, patch_size=8, num_frames=5, tubelet_size=2)
    with pytest.raises(ValueError, match="square"):
        PatchEmbed(img_size=32, patch_size=(8, 4))
    embed = PatchEmbed(img_size=32, patch_size=(8, 8), embed_dim=4)  # timm's pair form
    assert embed.patch_size == (8, 8) and embed.num_patches == 16
    with pytest.raises(ValueError, match="does not match"):
        embed(torch.randn(1, 3, 48, 48))
    # a convolution takes an unbatched input too, and the tokens would come out as [D, w, h]
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        embed(torch.randn(3, 32, 32))
    tubelets = TubeletEmbed(img_size=8, patch_size=(4, 4), num_frames=4, tubelet_size=2, embed_dim=4)
    assert tubelets.patch_size == (4, 4) and tubelets.num_patches == 8
    with pytest.raises(ValueError, match=r"\[N, C, T, H, W\]"):
        tubelets(torch.randn(3, 4, 8, 8))
    for size in ((1, 3, 4, 12, 12), (1, 3, 6, 8, 8)):  # 18 or 12 tokens for a table of 8 positions
        with pytest.raises(ValueError, match="does not match"):
            tubelets(torch.randn(size))


@pytest.mark.parametrize("layout", ["qkv_bias", "qv_bias", "no_bias"])
def test_attention_reference_matches_per_head_math(layout):
    attn = Attention(24, num_heads=3, qkv_bias=layout == "qkv_bias", qv_bias=layout == "qv_bias", fused=False)
    randomize_(attn.double(), scale=0.3)
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    sd = {"attn." + k: v for k, v in attn.state_dict().items()}
    expected = attention64(x, sd["attn.qkv.weight"], qkv_bias64(sd, ""), sd["attn.proj.weight"],
                           sd["attn.proj.bias"], 3)
    torch.testing.assert_close(attn(x), expected, rtol=1e-12, atol=1e-12)
    if layout == "qv_bias":
        assert attn.qkv.bias is None
        assert set(sd) == {"attn.qkv.weight", "attn.q_bias", "attn.v_bias", "attn.proj.weight", "attn.proj.bias"}


def test_attention_packed_reference_equals_dense_per_sequence():
    attn = randomize_(Attention(16, num_heads=2, qkv_bias=True, fused=False).double(), scale=0.3)
    lengths = [3, 1, 6]
    seqs = [torch.randn(1, n, 16, dtype=torch.float64) for n in lengths]
    cu_seqlens = torch.tensor([0, 3, 4, 10], dtype=torch.int32)
    packed = attn(torch.cat(seqs, 1)[0], cu_seqlens=cu_seqlens, max_seqlen=6)
    torch.testing.assert_close(packed, torch.cat([attn(s)[0] for s in seqs]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_attention_fused_equals_reference_float64(packed):
    attn = randomize_(Attention(32, num_heads=4, qv_bias=True, fused=False).double(), scale=0.3)
    if packed:
        x = torch.randn(9, 32, dtype=torch.float64, requires_grad=True)
        kwargs = dict(cu_seqlens=torch.tensor([0, 5, 9], dtype=torch.int32), max_seqlen=5)
    else:
        x = torch.randn(2, 6, 32, dtype=torch.float64, requires_grad=True)
        kwargs = {}
    grad_out = torch.randn(x.shape, dtype=torch.float64)
    results = []
    for fused in (False, True):
        attn.fused = fused
        attn.zero_grad()
        x.grad = None
        out = attn(x, **kwargs)
        out.backward(grad_out)
        results.append([out.detach(), x.grad.clone()] + [p.grad.clone() for p in attn.parameters()])
    for ref, fused in zip(*results):
        torch.testing.assert_close(fused, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_packed_rows_past_the_last_sequence_are_zero(fused):
    attn = randomize_(Attention(16, num_heads=2, qkv_bias=True, fused=fused).double(), scale=0.3)
    x = torch.randn(9, 16, dtype=torch.float64)
    out = attn(x, cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32), max_seqlen=3)
    # the tail rows attend to nothing: their attention output is 0, so the block gives the projection's bias
    torch.testing.assert_close(out[6:], attn.proj.bias.expand(3, 16), rtol=0, atol=1e-12)


def test_attention_ref_function_layout():
    q, k, v = (torch.randn(2, 5, 3, 4, dtype=torch.float64) for _ in range(3))
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(attention_ref(q, k, v, 0.5), expected, rtol=1e-12, atol=1e-12)


def test_attention_errors():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        Attention(30, num_heads=4)
    with pytest.raises(ValueError, match="bias layout"):
        Attention(32, num_heads=4, qkv_bias=True, qv_bias=True)
    attn = Attention(32, num_heads=4)
    with pytest.raises(ValueError, match=r"\[N, S, D\]"):
        attn(torch.randn(5, 32))
    with pytest.raises(ValueError, match="cu_seqlens"):
        attn(torch.randn(1, 5, 32), cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_block_matches_element_math(fused):
    block = randomize_(Block(24, num_heads=2, mlp_ratio=2.0, qkv_bias=True, fused=fused).double(), scale=0.3)
    assert block.norm1.eps == 1e-6 and block.norm2.eps == 1e-6
    assert block.mlp.act.approximate == "none"
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    expected = block64(x, block.state_dict(), "", 2)
    torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-10)


def test_mlp_shapes_and_keys():
    mlp = Mlp(8, 32, 4)
    assert set(mlp.state_dict()) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert mlp(torch.randn(2, 3, 8)).shape == (2, 3, 4)


def test_loss_modules_forward_their_configuration():
    from mimfast.nn import MaskedPixelLoss, SimMIMPixelLoss, VideoMAEPixelLoss
    from mimfast.ops import masked_pixel_loss_ref, simmim_pixel_loss_ref, videomae_pixel_loss_ref

    imgs = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    pred = torch.randn(2, 4, 48, dtype=torch.float64)
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    for norm_pix, kind in ((False, "mse"), (True, "l1")):
        got = MaskedPixelLoss(4, norm_pix=norm_pix, kind=kind)(pred, imgs, mask)
        torch.testing.assert_close(got, masked_pixel_loss_ref(pred, imgs, mask, 4, norm_pix=norm_pix, kind=kind))
    pred_imgs = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(SimMIMPixelLoss(4)(pred_imgs, imgs, mask),
                               simmim_pixel_loss_ref(pred_imgs, imgs, mask, 4))
    videos = torch.randn(2, 3, 4, 8, 8, dtype=torch.float64)
    video_mask = torch.tensor([[True] * 3 + [False] * 5, [False] * 5 + [True] * 3])
    video_pred = torch.randn(2, 3, 96, dtype=torch.float64)
    for norm_target in (True, False):
        got = VideoMAEPixelLoss(4, 2, norm_target=norm_target)(video_pred, videos, video_mask)
        expected = videomae_pixel_loss_ref(video_pred, videos, video_mask, 4, 2, norm_target=norm_target)
        torch.testing.assert_close(got, expected)
    # clips normalised with other statistics than ImageNet's
    stats = dict(mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))
    got = VideoMAEPixelLoss(4, 2, norm_target=False, **stats)(video_pred, videos, video_mask)
    expected = videomae_pixel_loss_ref(video_pred, videos, video_mask, 4, 2, norm_target=False, **stats)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, videomae_pixel_loss_ref(video_pred, videos, video_mask, 4, 2, norm_target=False))
    with pytest.raises(ValueError, match="kind"):  # at construction, not at the first call
        MaskedPixelLoss(4, kind="huber")


def test_drop_path_decides_in_full_precision():
    from mimfast.nn.block import drop_path

    # just below the rate drops, at the rate keeps, in bf16 too (keep + u rounded in bf16 would reach 1 and keep)
    x = torch.ones(4, 3, dtype=torch.bfloat16)
    u = torch.tensor([0.1 - 1e-4, 0.1, 0.05, 0.9])
    out = drop_path(x, 0.1, u)
    assert out.dtype == torch.bfloat16
    assert out[:, 0].tolist() == [0.0, torch.tensor(1 / 0.9, dtype=torch.bfloat16).item(), 0.0,
                                  torch.tensor(1 / 0.9, dtype=torch.bfloat16).item()]
