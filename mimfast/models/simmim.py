"""SimMIM (Xie et al., 2022): a ViT sees every patch, masked ones replaced by a learned mask token, and a
one-layer head (1x1 convolution + pixel shuffle) regresses the raw pixels; L1 loss on the masked pixels."""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from mimfast.models.vit import MIMModel, MIMOutput, check_model_input, clipped_normal_, init_linear_layernorm_
from mimfast.nn.block import Block
from mimfast.nn.patch_embed import PatchEmbed
from mimfast.ops.simmim_pixel_loss import simmim_pixel_loss

__all__ = ["SimMIMEncoder", "SimMIMViT", "simmim_vit_base_patch16", "simmim_vit_small_patch16",
           "simmim_vit_tiny_patch16"]


class SimMIMEncoder(MIMModel):
    """ViT encoder of SimMIM: [N, C, H, W] images and an [N, L] mask -> feature map [N, D, H/p, W/p].

    The mask token replaces the embeddings of masked patches, then the cls token is prepended and the learned
    absolute position embedding added; the blocks are those of MAE (qkv with bias, LayerNorm eps 1e-6).

    Equivalent PyTorch::

        x = patch_embed(imgs); w = mask.reshape(N, L, 1).type_as(x)
        x = torch.cat((cls_token.expand(N, -1, -1), x * (1 - w) + mask_token * w), 1) + pos_embed
        x = norm(blocks(x))[:, 1:].transpose(1, 2).reshape(N, D, H // p, W // p)
    """

    def __init__(
        self,
        img_size: Union[int, tuple[int, int]] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        fused: bool = True,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.num_patches = L = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, L + 1, embed_dim))
        # stochastic depth rising linearly over the blocks, from 0 at the first to drop_path_rate at the last
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist() if depth else []
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.fused = fused

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor,
                drop_noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.patch_embed(imgs)
        N, L, _ = x.shape
        if self.fused and mask.dtype == torch.bool:
            # one select instead of the multiply-add blend, which it equals for a bool mask
            x = torch.where(mask.reshape(N, L, 1), self.mask_token, x)
        else:
            w = mask.reshape(N, L, 1).type_as(x)
            x = x * (1 - w) + self.mask_token * w
        x = torch.cat((self.cls_token.expand(N, -1, -1), x), dim=1) + self.pos_embed
        for i, block in enumerate(self.blocks):
            x = block(x, drop_noise=None if drop_noise is None else drop_noise[:, i])
        x = self.norm(x)[:, 1:, :]
        h, w = self.patch_embed.grid_size
        return x.transpose(1, 2).reshape(N, -1, h, w)


class SimMIMViT(MIMModel):
    """SimMIM with a ViT encoder and the linear pixel head.

    ``forward(imgs, mask)``: imgs [N, C, H, W], mask [N, L] (or [N, H/p, W/p]) at the model's patch
    granularity, bool or 0/1 (1 = masked). Returns :class:`~mimfast.models.vit.MIMOutput` with loss (L1 on
    masked pixels / (masked pixels + 1e-5) / C), pred [N, C, H, W] (the reconstructed image) and mask [N, L].

    Keys: ``encoder.{cls_token, mask_token, pos_embed, patch_embed.proj.*, blocks.{i}.*, norm.*}`` and
    ``decoder.0.{weight, bias}`` (the 1x1 convolution to p*p*C channels before ``PixelShuffle(p)``).
    Initialisation as SimMIM's ViT: normal(0.02) truncated at +-0.02 (one standard deviation) for the tokens, the
    position embedding, the Linears and the patch projection (zero biases), then each block's output projections
    (``attn.proj``, ``mlp.fc2``) divided by sqrt(2 * layer index) (BEiT's depth scaling); the decoder's
    convolution keeps PyTorch's default. The encoder is the ViT layout of DESIGN (a learned absolute position
    embedding, ``qkv`` biases): SimMIM's published ViT-B uses a shared relative position bias and layer scale
    instead, so its checkpoints do not load here.

    ``drop_path_rate``: stochastic depth rising linearly from 0 at the first block to this rate at the last
    (SimMIM's ViT-B recipe trains with 0.1; the pretraining engine's default for SimMIM), active in training
    mode; ``forward``'s ``drop_noise`` [N, depth, 2] (uniform in [0, 1)) supplies the draws, else torch's
    generator does.

    Equivalent PyTorch (loss)::

        pred = decoder(encoder(imgs, mask))
        m = mask.reshape(N, h, w).repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1).float()
        loss = ((imgs - pred).abs() * m).sum() / (m.sum() + 1e-5) / C
    """

    # SimMIM's ViT exempts its position embedding and cls token (its mask token is decayed)
    NO_WEIGHT_DECAY = frozenset({"encoder.pos_embed", "encoder.cls_token"})

    def __init__(
        self,
        img_size: Union[int, tuple[int, int]] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        fused: bool = True,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.encoder = SimMIMEncoder(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio,
                                     drop_path_rate=drop_path_rate)
        self.decoder = nn.Sequential(
            nn.Conv2d(embed_dim, patch_size * patch_size * in_chans, kernel_size=1), nn.PixelShuffle(patch_size)
        )
        self.img_size = self.encoder.patch_embed.img_size
        self.grid_size = self.encoder.patch_embed.grid_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.num_patches = self.encoder.num_patches
        self.initialize_weights()
        self.fused = fused

    def initialize_weights(self) -> None:
        encoder = self.encoder
        for param in (encoder.cls_token, encoder.mask_token, encoder.pos_embed, encoder.patch_embed.proj.weight):
            clipped_normal_(param)
        nn.init.zeros_(encoder.patch_embed.proj.bias)
        # Linears and LayerNorms; the decoder's 1x1 convolution keeps PyTorch's default, as in SimMIM
        self.apply(lambda m: init_linear_layernorm_(m, linear="trunc_normal"))
        with torch.no_grad():
            for layer, block in enumerate(encoder.blocks, start=1):
                block.attn.proj.weight.div_((2.0 * layer) ** 0.5)
                block.mlp.fc2.weight.div_((2.0 * layer) ** 0.5)

    def _check_mask(self, mask: torch.Tensor, N: int) -> torch.Tensor:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a tensor, got {type(mask).__name__}")
        L = self.num_patches
        if mask.shape not in ((N, L), (N, *self.grid_size)):
            raise ValueError(f"mask must be [N, L] = [{N}, {L}] or [N, h, w] = [{N}, {self.grid_size[0]}, "
                             f"{self.grid_size[1]}] at the model's patch size {self.patch_size}, got "
                             f"{tuple(mask.shape)}")
        if mask.device != self.encoder.cls_token.device:
            raise ValueError(f"mask is on {mask.device} but the model is on {self.encoder.cls_token.device}")
        if mask.is_complex():
            raise TypeError(f"mask must be bool, integer or floating (1 = masked), got {mask.dtype}")
        return mask.reshape(N, L)

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor, drop_noise: Optional[torch.Tensor] = None) -> MIMOutput:
        check_model_input(imgs, name="imgs", img_size=self.img_size, patch_size=self.patch_size,
                          in_chans=self.in_chans, device=self.encoder.cls_token.device)
        mask = self._check_mask(mask, imgs.shape[0])
        depth = len(self.encoder.blocks)
        if drop_noise is not None and tuple(drop_noise.shape) != (imgs.shape[0], depth, 2):
            raise ValueError(f"drop_noise must be [N, depth, 2] = [{imgs.shape[0]}, {depth}, 2], got "
                             f"{tuple(drop_noise.shape)}")
        pred = self.decoder(self.encoder(imgs, mask, drop_noise))
        if self.fused:
            loss = simmim_pixel_loss(pred, imgs, mask, self.patch_size)
        else:
            h, w = self.grid_size
            p = self.patch_size
            pixel_mask = mask.reshape(-1, h, w).repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1)
            errors = F.l1_loss(imgs, pred, reduction="none")
            # mask weights summed in float32 at least, as the official code's integer mask counts them: in pred's
            # dtype under autocast the count rounds (bf16) or overflows 65504 (fp16, a zero loss)
            weights = pixel_mask.to(torch.promote_types(errors.dtype, torch.float32))
            loss = (errors * weights).sum() / (weights.sum() + 1e-5) / self.in_chans
        return MIMOutput(loss, pred, mask)


def _simmim(embed_dim: int, depth: int, num_heads: int, kwargs: dict) -> SimMIMViT:
    config = dict(patch_size=16, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=4.0)
    config.update(kwargs)
    return SimMIMViT(**config)


def simmim_vit_tiny_patch16(**kwargs) -> SimMIMViT:
    """ViT-Ti/16 SimMIM (192 wide, 12 deep, 3 heads)."""
    return _simmim(192, 12, 3, kwargs)


def simmim_vit_small_patch16(**kwargs) -> SimMIMViT:
    """ViT-S/16 SimMIM (384 wide, 12 deep, 6 heads)."""
    return _simmim(384, 12, 6, kwargs)


def simmim_vit_base_patch16(**kwargs) -> SimMIMViT:
    """ViT-B/16 SimMIM (768 wide, 12 deep, 12 heads)."""
    return _simmim(768, 12, 12, kwargs)
