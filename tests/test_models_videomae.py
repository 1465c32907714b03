"""VideoMAE: key layout, 1-D sinusoid table, independent float64 formulation, fused == reference, mask forms,
errors."""

import math

import pytest
import torch
from test_nn import block64, layer_norm64, randomize_

import mimfast.models as models
from mimfast import backend
from mimfast.backend import get_op
from mimfast.models import MIMOutput, VideoMAE
from mimfast.models.videomae import mask_indices
from mimfast.ops import MaskInfo

# 4 frames of 16x16, tubelet 2, patch 8: grid (2, 2, 2), L = 8, P = 2*8*8*3 = 384
TINY = dict(img_size=16, patch_size=8, num_frames=4, tubelet_size=2, in_chans=3, embed_dim=32, depth=2, num_heads=2,
            decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, mlp_ratio=2.0)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def tiny(fused=False, **overrides):
    return VideoMAE(**{**TINY, "fused": fused, **overrides})


def tube_mask(N, grid=(2, 2, 2), masked_per_frame=3):
    """Bool [N, t*h*w]: one random spatial mask per sample, repeated over time."""
    t, h, w = grid
    spatial = torch.rand(N, h * w).argsort(1).argsort(1) < masked_per_frame
    return spatial[:, None, :].expand(N, t, h * w).reshape(N, -1)


def table_by_formula(n, d):
    return torch.tensor([[math.sin(pos / 10000 ** (2 * (j // 2) / d)) if j % 2 == 0 else
                          math.cos(pos / 10000 ** (2 * (j // 2) / d)) for j in range(d)] for pos in range(n)],
                        dtype=torch.float64)


def cubes_of(videos, p, pt):
    """[N, L, pt*p*p*C], value (s, i, j, c) of cube (a, b, e) = videos[n, c, a*pt + s, b*p + i, e*p + j]."""
    N, C, T, H, W = videos.shape
    out = torch.empty(N, (T // pt) * (H // p) * (W // p), pt * p * p * C, dtype=videos.dtype)
    for s in range(pt):
        for i in range(p):
            for j in range(p):
                for c in range(C):
                    out[:, :, ((s * p + i) * p + j) * C + c] = videos[:, c, s::pt, i::p, j::p].reshape(N, -1)
    return out


def videomae64(model, videos, mask):
    """VideoMAE from the state dict with python index lists for the visible / masked tokens. -> (loss, pred)."""
    sd = model.state_dict()
    p, pt, C = model.patch_size, model.tubelet_size, model.in_chans
    N, L = videos.shape[0], model.num_patches
    D = sd["encoder.norm.weight"].shape[0]
    Dd = sd["mask_token"].shape[-1]
    weight = sd["encoder.patch_embed.proj.weight"].permute(0, 2, 3, 4, 1).reshape(D, -1)
    # the tables are stored in float32, like the official ones: round the formula's values the same way
    tokens = cubes_of(videos, p, pt) @ weight.T + sd["encoder.patch_embed.proj.bias"]
    tokens = tokens + table_by_formula(L, D).float().double()
    visible = [[j for j in range(L) if not mask[n, j]] for n in range(N)]
    masked = [[j for j in range(L) if mask[n, j]] for n in range(N)]
    x = torch.stack([tokens[n, visible[n]] for n in range(N)])
    for i in range(len(model.encoder.blocks)):
        x = block64(x, sd, f"encoder.blocks.{i}.", model.encoder.blocks[0].attn.num_heads)
    x = layer_norm64(x, sd["encoder.norm.weight"], sd["encoder.norm.bias"]) @ sd["encoder_to_decoder.weight"].T
    table = table_by_formula(L, Dd).float().double()
    x = torch.stack([torch.cat([x[n] + table[visible[n]], sd["mask_token"][0] + table[masked[n]]])
                     for n in range(N)])
    for j in range(len(model.decoder.blocks)):
        x = block64(x, sd, f"decoder.blocks.{j}.", model.decoder.blocks[0].attn.num_heads)
    x = layer_norm64(x[:, len(visible[0]):], sd["decoder.norm.weight"], sd["decoder.norm.bias"])
    pred = x @ sd["decoder.head.weight"].T + sd["decoder.head.bias"]
    raw = videos * torch.tensor(model.pixel_std, dtype=torch.float64).view(1, C, 1, 1, 1) + \
        torch.tensor(model.pixel_mean, dtype=torch.float64).view(1, C, 1, 1, 1)
    cubes = cubes_of(raw, p, pt)
    if model.norm_target:
        per_channel = cubes.reshape(N, L, -1, C)
        n_values = per_channel.shape[2]
        mean = per_channel.sum(2, keepdim=True) / n_values
        std = torch.sqrt(((per_channel - mean) ** 2).sum(2, keepdim=True) / (n_values - 1))
        cubes = ((per_channel - mean) / (std + 1e-6)).reshape(N, L, -1)
    target = torch.stack([cubes[n, masked[n]] for n in range(N)])
    return ((pred - target) ** 2).mean(), pred


def run(model, videos, mask):
    model.zero_grad()
    out = model(videos, mask)
    out.loss.backward()
    return out, {k: v.grad.clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("norm_target", [True, False], ids=["norm_target", "raw_target"])
def test_reference_matches_independent_formulation(norm_target):
    model = randomize_(tiny(norm_target=norm_target).double(), scale=0.2)
    videos = torch.randn(2, 3, 4, 16, 16, dtype=torch.float64)
    mask = tube_mask(2)
    out = model(videos, mask)
    loss, pred = videomae64(model, videos, mask)
    assert torch.equal(out.mask, mask) and out.pred.shape == (2, 6, 384)
    torch.testing.assert_close(out.pred, pred, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.loss, loss, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("in_chans,stats", [(1, None), (4, None), (3, ((0.5, 0.4, 0.3), (0.2, 0.3, 0.4)))],
                         ids=["grey", "4-channel", "own-stats"])
def test_other_channel_counts_and_pixel_statistics(in_chans, stats):
    # without ImageNet's three channels the clips are their own targets (statistics 0 / 1), as Hugging Face's
    # VideoMAE treats non-RGB input; given statistics un-normalise the clips in both modes
    kwargs = dict(in_chans=in_chans) if stats is None else dict(in_chans=in_chans, pixel_mean=stats[0],
                                                                 pixel_std=stats[1])
    model = randomize_(tiny(**kwargs).double(), scale=0.2)
    assert model.pixel_mean == (stats[0] if stats else (0.0,) * in_chans)
    videos = torch.randn(2, in_chans, 4, 16, 16, dtype=torch.float64)
    mask = tube_mask(2)
    ref, ref_grads = run(model, videos, mask)
    loss, pred = videomae64(model, videos, mask)
    torch.testing.assert_close(ref.loss, loss, rtol=1e-10, atol=1e-12)
    model.fused = True
    fused, fused_grads = run(model, videos, mask)
    torch.testing.assert_close(fused.loss, ref.loss, rtol=1e-10, atol=1e-12)
    for name in ref_grads:
        torch.testing.assert_close(fused_grads[name], ref_grads[name], rtol=1e-9, atol=1e-10, msg=name)
    assert (tiny().pixel_mean, tiny().pixel_std) == (MEAN, STD)  # RGB: ImageNet's, as VideoMAE's data pipeline
    with pytest.raises(ValueError, match="one value per channel"):
        tiny(in_chans=2, pixel_mean=(0.5,), pixel_std=(0.5,))
    with pytest.raises(ValueError, match="one value per channel"):
        tiny(pixel_mean=(0.5, 0.5, 0.5))


@pytest.mark.parametrize("mask_form", ["bool", "int_grid", "maskinfo"])
def test_fused_equals_reference_float64(mask_form):
    model = randomize_(tiny().double(), scale=0.2)
    videos = torch.randn(2, 3, 4, 16, 16, dtype=torch.float64)
    mask = tube_mask(2)
    given = mask
    if mask_form == "int_grid":
        given = mask.long().reshape(2, 2, 2, 2)
    elif mask_form == "maskinfo":
        # visible indices in any order: only the count is read from ids_keep
        ids_keep = torch.stack([(~m).nonzero()[:, 0].flip(0) for m in mask])
        given = MaskInfo(ids_keep, torch.zeros(2, 8, dtype=torch.int64), mask.float())
    model.fused = False
    ref, ref_grads = run(model, videos, mask)
    model.fused = True
    fused, fused_grads = run(model, videos, given)
    assert torch.equal(fused.mask, mask)
    torch.testing.assert_close(fused.pred, ref.pred, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fused.loss, ref.loss, rtol=1e-10, atol=1e-12)
    for name in ref_grads:
        torch.testing.assert_close(fused_grads[name], ref_grads[name], rtol=1e-9, atol=1e-10, msg=name)


def test_fused_triton_backend_error_ratio():
    """Triton kernels (interpreter on CPU), fp32, against float64: error <= 2 x the torch fp32 error + atol."""
    ops = ("embed_visible", "restore_tokens", "visible_attention", "videomae_pixel_loss")
    if not backend.triton_interpret():
        pytest.skip("needs TRITON_INTERPRET=1 to run the Triton kernels on CPU")
    missing = [n for n in ops if "triton" not in get_op(n).available()]
    if missing:
        pytest.skip(f"no triton implementation yet for {missing}")
    model = randomize_(tiny(), scale=0.2)
    videos = torch.randn(2, 3, 4, 16, 16)
    mask = tube_mask(2)
    model64 = tiny().double()
    model64.load_state_dict(model.state_dict())
    ref64, grads64 = run(model64, videos.double(), mask)
    ref32, grads32 = run(model, videos, mask)
    model.fused = True
    with backend.use("triton"):
        tri, grads_tri = run(model, videos, mask)
    pairs = [("loss", tri.loss, ref32.loss, ref64.loss), ("pred", tri.pred, ref32.pred, ref64.pred)]
    pairs += [(k, grads_tri[k], grads32[k], grads64[k]) for k in grads64]
    for name, got, same_dtype, exact in pairs:
        err = (got.double() - exact).abs().max().item()
        # atol relative to the tensor's own size: the encoder's gradients are ~1e-4, an absolute 1e-5 hid 10% errors
        budget = 2 * (same_dtype.double() - exact).abs().max().item() + 1e-5 * exact.abs().max().item()
        assert err <= budget, f"{name}: error {err:.3g} > {budget:.3g}"


@pytest.mark.parametrize("N,L,K", [(1, 8, 2), (3, 1568, 156), (2, 7, 0), (2, 5, 4)], ids=str)
def test_mask_indices_equal_stable_argsort(N, L, K):
    mask = torch.rand(N, L).argsort(1).argsort(1) >= K
    ids_keep, ids_masked, ids_restore = mask_indices(mask, K)
    ids_shuffle = torch.argsort(mask.int(), dim=1, stable=True)
    assert torch.equal(ids_keep, ids_shuffle[:, :K]) and torch.equal(ids_masked, ids_shuffle[:, K:])
    assert torch.equal(ids_restore, torch.argsort(ids_shuffle, dim=1))


def test_official_unpacking_and_shapes():
    model = tiny(fused=True)
    mask = tube_mask(3)
    loss, pred, out_mask = model(torch.randn(3, 3, 4, 16, 16), mask)
    assert isinstance(model(torch.randn(3, 3, 4, 16, 16), mask), MIMOutput)
    assert loss.dim() == 0 and torch.isfinite(loss) and pred.shape == (3, 6, 384) and torch.equal(out_mask, mask)


def test_sinusoid_tables_are_fixed_buffers():
    model = tiny()
    torch.testing.assert_close(model.encoder.pos_embed[0].double(), table_by_formula(8, 32), rtol=0, atol=1e-7)
    torch.testing.assert_close(model.pos_embed[0].double(), table_by_formula(8, 16), rtol=0, atol=1e-7)
    names = {n for n, _ in model.named_parameters()}
    assert "pos_embed" not in names and "encoder.pos_embed" not in names
    assert model.double().pos_embed.dtype == torch.float64


def test_state_dict_is_official_layout():
    model = tiny()
    block = ["norm1.weight", "norm1.bias", "attn.q_bias", "attn.v_bias", "attn.qkv.weight", "attn.proj.weight",
             "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
             "mlp.fc2.bias"]

    def block_shapes(d):
        return [(d,), (d,), (d,), (d,), (3 * d, d), (d, d), (d,), (d,), (d,), (2 * d, d), (2 * d,), (d, 2 * d), (d,)]

    expected = {"encoder.patch_embed.proj.weight": (32, 3, 2, 8, 8), "encoder.patch_embed.proj.bias": (32,),
                "encoder.norm.weight": (32,), "encoder.norm.bias": (32,), "encoder_to_decoder.weight": (16, 32),
                "mask_token": (1, 1, 16), "decoder.norm.weight": (16,), "decoder.norm.bias": (16,),
                "decoder.head.weight": (384, 16), "decoder.head.bias": (384,)}
    for i in range(2):
        expected.update({f"encoder.blocks.{i}.{k}": s for k, s in zip(block, block_shapes(32))})
    expected.update({f"decoder.blocks.0.{k}": s for k, s in zip(block, block_shapes(16))})
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected


@pytest.mark.parametrize("name,width,depth,heads,dec_width,dec_heads", [
    ("videomae_vit_small_patch16", 384, 12, 6, 192, 3),
    ("videomae_vit_base_patch16", 768, 12, 12, 384, 6),
    ("videomae_vit_large_patch16", 1024, 24, 16, 512, 8),
])
def test_factories(name, width, depth, heads, dec_width, dec_heads):
    with torch.device("meta"):
        model = getattr(models, name)()
    assert model.num_patches == 1568 and model.patch_size == 16 and model.tubelet_size == 2 and model.fused
    assert model.encoder.norm.normalized_shape == (width,) and len(model.encoder.blocks) == depth
    assert model.encoder.blocks[0].attn.num_heads == heads and model.encoder.blocks[0].attn.qkv.bias is None
    assert model.mask_token.shape[-1] == dec_width and len(model.decoder.blocks) == 4
    assert model.decoder.blocks[0].attn.num_heads == dec_heads and model.decoder.head.out_features == 1536
    assert model.encoder_to_decoder.bias is None and model.norm_target


def test_initialisation():
    torch.manual_seed(3)
    model = tiny(embed_dim=64, decoder_embed_dim=32)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "encoder_to_decoder":
            bound = math.sqrt(6.0 / (module.in_features + module.out_features))
            assert 0.9 * bound < module.weight.abs().max() <= bound, name
            if module.bias is not None:
                assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
        elif isinstance(module, torch.nn.LayerNorm):
            assert module.eps == 1e-6 and torch.equal(module.weight, torch.ones_like(module.weight)), name
    for block in list(model.encoder.blocks) + list(model.decoder.blocks):
        assert not block.attn.q_bias.any() and not block.attn.v_bias.any()
    # as VideoMAE: encoder_to_decoder keeps nn.Linear's default (uniform within 1/sqrt(fan_in)), the mask token is
    # normal(0.02) truncated at +-0.02
    bound = 1 / math.sqrt(model.encoder_to_decoder.in_features)
    assert 0.9 * bound < model.encoder_to_decoder.weight.abs().max() <= bound
    assert 0.005 < model.mask_token.std().item() < 0.016 and model.mask_token.abs().max() <= 0.02


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_clear_errors(fused):
    model = tiny(fused=fused)
    videos = torch.randn(2, 3, 4, 16, 16)
    mask = tube_mask(2)
    unequal = mask.clone()
    unequal[0, ~mask[0]] = True
    with pytest.raises(ValueError, match="same number of tokens"):
        model(videos, unequal)
    with pytest.raises(ValueError, match="hides no token"):
        model(videos, torch.zeros(2, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="hides every token"):
        model(videos, torch.ones(2, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="empty batch"):
        model(videos[:0], mask[:0])
    with pytest.raises(ValueError, match="mask must be"):
        model(videos, mask[:, :7])
    with pytest.raises(TypeError, match="mask must be"):
        model(videos, mask.tolist())
    with pytest.raises(ValueError, match="mask is on meta"):
        model(videos, mask.to("meta"))
    with pytest.raises(ValueError, match="frames"):
        model(torch.randn(2, 3, 6, 16, 16), mask)
    with pytest.raises(ValueError, match="not divisible by the tubelet"):
        model(torch.randn(2, 3, 5, 16, 16), mask)
    with pytest.raises(ValueError, match=r"\[N, C, T, H, W\]"):
        model(torch.randn(2, 3, 16, 16), mask)
    with pytest.raises(ValueError, match="does not match the model"):
        model(torch.randn(2, 3, 4, 24, 24), mask)
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(2, 1, 4, 16, 16), mask)
    with pytest.raises(TypeError, match="floating"):
        model(torch.zeros(2, 3, 4, 16, 16, dtype=torch.uint8), mask)
    with pytest.raises(ValueError, match="videos is on meta"):
        model(videos.to("meta"), mask)


@pytest.mark.gpu
def test_gpu_bf16_fused_matches_reference():
    torch.manual_seed(0)
    model = models.videomae_vit_small_patch16(img_size=64, num_frames=4).cuda()
    videos = torch.randn(2, 3, 4, 64, 64, device="cuda")
    mask = tube_mask(2, grid=(2, 4, 4), masked_per_frame=14).cuda()
    model64 = models.videomae_vit_small_patch16(img_size=64, num_frames=4, fused=False).cuda().double()
    model64.load_state_dict(model.state_dict())
    ref64, grads64 = run(model64, videos.double(), mask)
    results = {}
    for fused in (False, True):
        model.fused = fused
        with torch.autocast("cuda", dtype=torch.bfloat16):
            results[fused] = run(model, videos, mask)
    (ref, ref_grads), (tri, tri_grads) = results[False], results[True]
    checks = [("loss", tri.loss, ref.loss, ref64.loss)] + [(k, tri_grads[k], ref_grads[k], grads64[k]) for k in grads64]
    for name, got, same_dtype, exact in checks:
        err = (got.double() - exact).abs().max().item()
        budget = 2 * (same_dtype.double() - exact).abs().max().item() + 1e-3 * exact.abs().max().item()
        assert err <= budget, f"{name}: error {err:.3g} > {budget:.3g}"
