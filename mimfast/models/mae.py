"""Masked autoencoder (He et al., 2021): a ViT encoder over the visible patches and a light decoder that
reconstructs the pixels of the masked ones.

Numbers, initialisation and state-dict keys are those of the official MAE ``MaskedAutoencoderViT``, so its
checkpoints load with ``strict=True`` and the encoder keys match timm's ``VisionTransformer``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from mimfast.kernels.sizes import next_pow2
from mimfast.models.vit import (
    MIMModel,
    MIMOutput,
    check_model_input,
    check_noise,
    init_linear_layernorm_,
    sincos_2d_pos_embed,
)
from mimfast.nn.block import Block
from mimfast.nn.patch_embed import PatchEmbed
from mimfast.ops.embed_visible import embed_visible
from mimfast.ops.fused_head_loss import fused_head_masked_pixel_loss, masked_ids_from_restore
from mimfast.ops.masked_pixel_loss import masked_pixel_loss
from mimfast.ops.masking import RaggedMaskInfo, ragged_random_masking, ratios_from_numpy
from mimfast.ops.patchify import patchify, unpatchify
from mimfast.ops.random_masking import check_mask_ratio, random_masking, random_masking_ref
from mimfast.ops.restore_tokens import restore_tokens

__all__ = [
    "MaskedAutoencoderViT",
    "mae_vit_base_patch14",
    "mae_vit_base_patch16",
    "mae_vit_huge_patch14",
    "mae_vit_huge_patch16",
    "mae_vit_large_patch14",
    "mae_vit_large_patch16",
    "mae_vit_small_patch14",
    "mae_vit_small_patch16",
    "mae_vit_tiny_patch14",
    "mae_vit_tiny_patch16",
]


class MaskedAutoencoderViT(MIMModel):
    """MAE with a ViT backbone.

    Shapes: imgs [N, C, H, W]; L = (H/p)(W/p) patches; K = int(L * (1 - mask_ratio)) visible; P = p*p*C.
    ``forward(imgs, mask_ratio, noise)`` returns :class:`~mimfast.models.vit.MIMOutput` with loss (scalar),
    pred [N, L, P] (pixels of every patch, in :func:`~mimfast.ops.patchify` order) and mask [N, L] (1 = masked).

    ``fused=False`` is the published formulation in plain PyTorch (convolution over every patch, argsort
    masking, gather, concat-and-gather unshuffle); ``fused=True`` calls the :mod:`mimfast.ops` fused ops
    (``random_masking``, ``embed_visible``, ``visible_attention``, ``restore_tokens``, ``masked_pixel_loss``).
    Both give the same numbers for the same ``noise``. With ``fused_head = True`` (fused mode only; default False)
    ``forward`` runs ``decoder_pred`` and the loss as one op on the masked rows only
    (``fused_head_masked_pixel_loss``), which never keeps the [N, L, P] prediction for backward: less memory, but
    on an H100 at ViT-B shapes it measured slower than ``decoder_pred`` followed by the fused loss
    (benchmarks/results/bench_loss.md). pred is then an extra GEMM done only while ``return_pred`` is True (the
    official ``loss, pred, mask`` contract; set it to False in training loops, pred is then None).

    Equivalent PyTorch (``forward``)::

        latent, mask, ids_restore = model.forward_encoder(imgs, mask_ratio, noise)
        pred = model.forward_decoder(latent, ids_restore)
        loss = model.forward_loss(imgs, pred, mask)
    """

    def __init__(
        self,
        img_size: Union[int, tuple[int, int]] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = False,
        fused: bool = True,
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.img_size = self.patch_embed.img_size
        self.grid_size = self.patch_embed.grid_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.num_patches = L = self.patch_embed.num_patches

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # fixed sin-cos tables, kept as frozen parameters so the official checkpoints' keys match
        self.pos_embed = nn.Parameter(torch.zeros(1, L + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, L + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size * patch_size * in_chans)

        self.norm_pix_loss = norm_pix_loss
        self.initialize_weights()
        self.fused = fused
        # opt-in: saves the [N, L, P] activation but measured slower than linear + fused loss (see the docstring)
        self.fused_head = False
        self.return_pred = True

    def initialize_weights(self) -> None:
        """MAE initialisation: sin-cos position tables, xavier-uniform Linears and patch projection (viewed as
        [D, P]), normal(0.02) cls / mask tokens, LayerNorm 1 / 0. The projection bias keeps Conv2d's default."""
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d_pos_embed(self.pos_embed.shape[-1], self.grid_size, cls_token=True)[None])
            self.decoder_pos_embed.copy_(
                sincos_2d_pos_embed(self.decoder_pos_embed.shape[-1], self.grid_size, cls_token=True)[None]
            )
        weight = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(init_linear_layernorm_)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, L, p*p*C]."""
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L, p*p*C] -> [N, C, H, W]."""
        return unpatchify(x, self.patch_size, self.grid_size, channels=self.in_chans)

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs [N, C, H, W] -> (latent [N, 1+K, D] with the cls token first, mask [N, L], ids_restore [N, L]).

        ``noise`` [N, L] fixes the mask (the patches with the K smallest values stay visible); without it the
        mask is drawn at random on the images' device.
        """
        check_model_input(imgs, name="imgs", img_size=self.img_size, patch_size=self.patch_size,
                          in_chans=self.in_chans, device=self.cls_token.device)
        check_mask_ratio(mask_ratio)
        N, L = imgs.shape[0], self.num_patches
        check_noise(noise, N, L, imgs.device)
        if self.fused:
            info = random_masking(N, L, mask_ratio, noise=noise, device=imgs.device)
            proj = self.patch_embed.proj
            x = embed_visible(imgs, info.ids_keep, proj.weight, proj.bias, self.pos_embed, self.patch_size)
        else:
            x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
            info = random_masking_ref(N, L, mask_ratio, noise=noise, device=imgs.device)
            x = torch.gather(x, 1, info.ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls.expand(N, -1, -1), x), dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), info.mask, info.ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [N, 1+K, D], ids_restore [N, L] -> pred [N, L, P] for every patch (cls row dropped)."""
        return self.decoder_pred(self.forward_decoder_features(x, ids_restore))[:, 1:, :]

    def forward_decoder_features(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [N, 1+K, D], ids_restore [N, L] -> decoder_norm output [N, 1+L, D_dec] (cls row first)."""
        x = self.decoder_embed(x)
        if self.fused:
            x = restore_tokens(x, ids_restore, self.mask_token, self.decoder_pos_embed, has_cls=True)
        else:
            N, visible_plus_cls, width = x.shape
            mask_tokens = self.mask_token.expand(N, ids_restore.shape[1] + 1 - visible_plus_cls, -1)
            shuffled = torch.cat((x[:, 1:, :], mask_tokens), dim=1)
            unshuffled = torch.gather(shuffled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, width))
            x = torch.cat((x[:, :1, :], unshuffled), dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_norm(x)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over masked patches of the per-patch mean squared error against the (optionally per-patch
        normalised) pixels: imgs [N, C, H, W], pred [N, L, P], mask [N, L] -> scalar."""
        if self.fused:
            return masked_pixel_loss(pred, imgs, mask, self.patch_size, norm_pix=self.norm_pix_loss)
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        # the published formula, but 0 instead of 0 / 0 when nothing is masked, as masked_pixel_loss gives
        total = mask.sum()
        return (loss * mask).sum() / torch.where(total == 0, torch.ones_like(total), total)

    def forward(self, imgs: torch.Tensor,
                mask_ratio: Union[float, torch.Tensor, np.ndarray, Sequence[float]] = 0.75,
                noise: Optional[torch.Tensor] = None) -> MIMOutput:
        """``mask_ratio`` one float for the batch, or one ratio per sample: the latter is :meth:`forward_ragged`,
        reached through ``__call__`` so DDP / FSDP wrappers see it. Per-sample ratios as a NumPy array [N] keep the
        kept counts on the host without a device sync even under DDP and FSDP2, which move tensor arguments to
        the device (a CPU tensor or a list does too, without such a wrapper)."""
        if isinstance(mask_ratio, np.ndarray) and mask_ratio.ndim > 0:
            mask_ratio = ratios_from_numpy(mask_ratio)
        elif isinstance(mask_ratio, (np.ndarray, np.generic)) or (
                isinstance(mask_ratio, torch.Tensor) and mask_ratio.dim() == 0):
            mask_ratio = _scalar_ratio(mask_ratio)
        if not isinstance(mask_ratio, (int, float)):
            return self.forward_ragged(imgs, mask_ratio, noise)
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        if self.fused and self.fused_head:
            hidden = self.forward_decoder_features(latent, ids_restore)[:, 1:, :]
            ids_masked = masked_ids_from_restore(ids_restore, latent.shape[1] - 1)
            head = self.decoder_pred
            # ids_masked lists exactly the removed patches (mask 1): no mask to read, every scored row weighs 1
            loss = fused_head_masked_pixel_loss(hidden, head.weight, head.bias, imgs, None, self.patch_size,
                                                ids_masked=ids_masked, norm_pix=self.norm_pix_loss)
            return MIMOutput(loss, head(hidden) if self.return_pred else None, mask)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return MIMOutput(loss, pred, mask)

    def forward_encoder_packed(
        self,
        imgs: torch.Tensor,
        mask_ratios: Union[torch.Tensor, Sequence[float]],
        noise: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor, RaggedMaskInfo]:
        """Per-sample mask ratios: sample n keeps K_n = int(L * (1 - mask_ratios[n])) patches and the encoder runs
        on the packed visible tokens, no padding (``visible_attention`` with ``cu_seqlens``).

        imgs [N, C, H, W], mask_ratios [N] -> (latent [N + T, D], every sample's cls row first, then its K_n
        visible tokens in the masking order; cu_seqlens [N+1] int32 of the latent; the
        :class:`~mimfast.ops.masking.RaggedMaskInfo`), T = sum K_n. Equals ``forward_encoder`` run on each sample
        alone with its own ratio and the same ``noise`` row.
        """
        check_model_input(imgs, name="imgs", img_size=self.img_size, patch_size=self.patch_size,
                          in_chans=self.in_chans, device=self.cls_token.device)
        N, L = imgs.shape[0], self.num_patches
        check_noise(noise, N, L, imgs.device)
        info = ragged_random_masking(N, L, mask_ratios, noise=noise, device=imgs.device,
                                     backend=None if self.fused else "torch")
        T, dev = info.ids_keep_packed.shape[0], imgs.device
        sample = torch.repeat_interleave(torch.arange(N, device=dev), info.num_kept, output_size=T)
        # an upper bound is enough (max_seqlen may exceed the longest sequence); compiled graphs get a power of two
        # so changing lengths do not recompile them at every step
        bound = min(L, next_pow2(info.max_seqlen)) if torch.compiler.is_compiling() else info.max_seqlen
        if self.fused:
            # embed only the first max(K_n) patches of each sample's shuffled order (distinct ids, kept ones first),
            # then keep each sample's own K_n rows: no convolution over the removed patches
            ids_shuffle = torch.empty_like(info.ids_restore).scatter_(
                1, info.ids_restore, torch.arange(L, device=dev).expand(N, L))
            proj = self.patch_embed.proj
            x = embed_visible(imgs, ids_shuffle[:, :bound].contiguous(), proj.weight, proj.bias,
                              self.pos_embed, self.patch_size)
            within = torch.arange(T, device=dev) - info.cu_seqlens[:-1].long()[sample]
            patches = x[sample, within]  # [T, D]
        else:
            x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
            patches = x[sample, info.ids_keep_packed]  # [T, D]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).reshape(1, -1).expand(N, -1)
        cu_seqlens = info.cu_seqlens + torch.arange(N + 1, device=dev, dtype=torch.int32)
        # packed row of each token: sample n's cls at cu_seqlens[n], its j-th patch after the n + 1 cls rows so far
        source = torch.empty(N + T, dtype=torch.int64, device=dev)
        source[cu_seqlens[:-1].long()] = torch.arange(N, device=dev)
        source[torch.arange(T, device=dev) + sample + 1] = torch.arange(N, N + T, device=dev)
        x = torch.cat((cls, patches))[source]
        for block in self.blocks:
            x = block(x, cu_seqlens=cu_seqlens, max_seqlen=bound + 1)
        return self.norm(x), cu_seqlens, info

    def forward_decoder_packed(self, latent: torch.Tensor, cu_seqlens: torch.Tensor,
                               info: RaggedMaskInfo) -> torch.Tensor:
        """Packed latent [N + T, D] (from ``forward_encoder_packed``) -> pred [N, L, P]. The decoder is dense: every
        sample has all 1 + L tokens, the visible ones at their patch positions and the mask token elsewhere."""
        x = self.decoder_embed(latent)
        N, L = info.mask.shape
        T, dev = info.ids_keep_packed.shape[0], latent.device
        sample = torch.repeat_interleave(torch.arange(N, device=dev), info.num_kept, output_size=T)
        # row of the table [mask_token; packed decoder tokens] feeding each dense position (0: the mask token)
        source = torch.zeros(N, 1 + L, dtype=torch.int64, device=dev)
        source[:, 0] = cu_seqlens[:-1].long() + 1
        source[sample, 1 + info.ids_keep_packed] = torch.arange(T, device=dev) + sample + 2
        x = torch.cat((self.mask_token.reshape(1, -1).to(x.dtype), x))[source] + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def forward_ragged(
        self,
        imgs: torch.Tensor,
        mask_ratios: Union[torch.Tensor, Sequence[float]],
        noise: Optional[torch.Tensor] = None,
    ) -> MIMOutput:
        """``forward`` with one mask ratio per sample: packed encoder, dense decoder, and the loss averaged over
        every masked patch of the batch (sum(loss * mask) / sum(mask), whatever each sample's count)."""
        latent, cu_seqlens, info = self.forward_encoder_packed(imgs, mask_ratios, noise)
        pred = self.forward_decoder_packed(latent, cu_seqlens, info)
        return MIMOutput(self.forward_loss(imgs, pred, info.mask), pred, info.mask)


def _scalar_ratio(value: Union[np.ndarray, np.generic, torch.Tensor]) -> float:
    """A 0-d tensor or NumPy value as a Python float; below float64, its shortest decimal (0.3, not
    0.30000001192...), the rule per-sample ratios follow, so a ratio keeps as many patches whatever its type. A device
    tensor is read back."""
    if isinstance(value, torch.Tensor):
        double = value.dtype == torch.float64
        value = value.item()
    else:
        double = value.dtype == np.float64
        value = value.item()
    if isinstance(value, float) and not double:
        return float(str(np.float32(value)))
    return float(value)


def _mae(patch_size: int, embed_dim: int, depth: int, num_heads: int, kwargs: dict) -> MaskedAutoencoderViT:
    config = dict(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                  decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0)
    config.update(kwargs)
    return MaskedAutoencoderViT(**config)


def mae_vit_tiny_patch16(**kwargs) -> MaskedAutoencoderViT:
    """ViT-Ti/16 encoder (192 wide, 12 deep, 3 heads), decoder 512 wide, 8 deep, 16 heads."""
    return _mae(16, 192, 12, 3, kwargs)


def mae_vit_tiny_patch14(**kwargs) -> MaskedAutoencoderViT:
    """ViT-Ti/14 encoder (192 wide, 12 deep, 3 heads), decoder 512 wide, 8 deep, 16 heads."""
    return _mae(14, 192, 12, 3, kwargs)


def mae_vit_small_patch16(**kwargs) -> MaskedAutoencoderViT:
    """ViT-S/16 encoder (384 wide, 12 deep, 6 heads), decoder 512 wide, 8 deep, 16 heads."""
    return _mae(16, 384, 12, 6, kwargs)


def mae_vit_small_patch14(**kwargs) -> MaskedAutoencoderViT:
    """ViT-S/14 encoder (384 wide, 12 deep, 6 heads), decoder 512 wide, 8 deep, 16 heads."""
    return _mae(14, 384, 12, 6, kwargs)


def mae_vit_base_patch16(**kwargs) -> MaskedAutoencoderViT:
    """ViT-B/16 encoder (768 wide, 12 deep, 12 heads), decoder 512 wide, 8 deep, 16 heads (official
    ``mae_vit_base_patch16_dec512d8b``)."""
    return _mae(16, 768, 12, 12, kwargs)


def mae_vit_base_patch14(**kwargs) -> MaskedAutoencoderViT:
    """ViT-B/14 encoder (768 wide, 12 deep, 12 heads), decoder 512 wide, 8 deep, 16 heads."""
    return _mae(14, 768, 12, 12, kwargs)


def mae_vit_large_patch16(**kwargs) -> MaskedAutoencoderViT:
    """ViT-L/16 encoder (1024 wide, 24 deep, 16 heads), decoder 512 wide, 8 deep, 16 heads (official
    ``mae_vit_large_patch16_dec512d8b``)."""
    return _mae(16, 1024, 24, 16, kwargs)


def mae_vit_large_patch14(**kwargs) -> MaskedAutoencoderViT:
    """ViT-L/14 encoder (1024 wide, 24 deep, 16 heads), decoder 512 wide, 8 deep, 16 heads."""
    return _mae(14, 1024, 24, 16, kwargs)


def mae_vit_huge_patch14(**kwargs) -> MaskedAutoencoderViT:
    """ViT-H/14 encoder (1280 wide, 32 deep, 16 heads), decoder 512 wide, 8 deep, 16 heads (official
    ``mae_vit_huge_patch14_dec512d8b``)."""
    return _mae(14, 1280, 32, 16, kwargs)


def mae_vit_huge_patch16(**kwargs) -> MaskedAutoencoderViT:
    """ViT-H/16 encoder (1280 wide, 32 deep, 16 heads), decoder 512 wide, 8 deep, 16 heads."""
    return _mae(16, 1280, 32, 16, kwargs)
