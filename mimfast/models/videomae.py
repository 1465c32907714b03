"""VideoMAE (Tong et al., 2022): tube-masked video autoencoder. The encoder sees the visible cubes only; the
decoder sees visible tokens and mask tokens, each plus its fixed sinusoid position, and predicts the
per-cube-normalised pixels of the masked cubes.

State-dict keys are those of the MCG-NJU/VideoMAE pretraining checkpoints (``encoder.*``,
``encoder_to_decoder.weight``, ``mask_token``, ``decoder.*``); the position tables are not part of them.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from mimfast.models.vit import (
    MIMModel,
    MIMOutput,
    check_model_input,
    clipped_normal_,
    init_linear_layernorm_,
    sinusoid_table,
)
from mimfast.nn.block import Block
from mimfast.nn.patch_embed import TubeletEmbed
from mimfast.ops.embed_visible import embed_visible
from mimfast.ops.masking import shuffle_from_mask
from mimfast.ops.patchify import patchify
from mimfast.ops.random_masking import MaskInfo
from mimfast.ops.restore_tokens import restore_tokens
from mimfast.ops.videomae_pixel_loss import IMAGENET_MEAN, IMAGENET_STD, videomae_pixel_loss

__all__ = ["VideoMAE", "VideoMAEDecoder", "VideoMAEEncoder", "mask_indices", "videomae_vit_base_patch16",
           "videomae_vit_large_patch16", "videomae_vit_small_patch16"]

class VideoMAEEncoder(nn.Module):
    """Cube embedding (``patch_embed``, Conv3d with bias), the fixed sinusoid table ``pos_embed`` [1, L, D]
    (a non-persistent buffer: not a parameter, not in the state dict), ``blocks`` with qkv without bias plus
    ``q_bias`` / ``v_bias``, and ``norm``. ``forward`` runs the blocks and the norm on visible tokens
    [N, K, D]."""

    def __init__(
        self,
        img_size: Union[int, tuple[int, int]],
        patch_size: int,
        num_frames: int,
        tubelet_size: int,
        in_chans: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
    ) -> None:
        super().__init__()
        self.patch_embed = TubeletEmbed(img_size, patch_size, num_frames, tubelet_size, in_chans, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.register_buffer("pos_embed", sinusoid_table(self.num_patches, embed_dim).float()[None],
                             persistent=False)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class VideoMAEDecoder(nn.Module):
    """``blocks``, ``norm`` and the pixel ``head`` (Linear to P = p_t*p*p*C). ``forward`` runs the blocks on
    [N, S, Dd]; the model applies ``norm`` and ``head`` to the masked tokens only."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float, patch_dim: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, patch_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def mask_indices(mask: torch.Tensor, num_visible: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bool [N, L] mask with ``num_visible`` False entries per row -> (ids_keep [N, K], ids_masked [N, L-K],
    ids_restore [N, L]), visible then masked, each in ascending token order, without a sort or host sync.

    Equivalent PyTorch::

        ids_shuffle = torch.argsort(mask.int(), dim=1, stable=True)
        ids_keep, ids_masked = ids_shuffle[:, :K], ids_shuffle[:, K:]
        ids_restore = torch.argsort(ids_shuffle, dim=1)
    """
    ids_shuffle, ids_restore = shuffle_from_mask(mask, num_visible)
    return ids_shuffle[:, :num_visible], ids_shuffle[:, num_visible:], ids_restore


class VideoMAE(MIMModel):
    """VideoMAE pretraining model.

    ``forward(videos, mask)``: videos [N, C, T, H, W] (normalised with the ImageNet mean/std), mask bool
    [N, L] (1 / True = masked; [N, t, h, w] is flattened) with the same number of masked tokens in every
    sample, as tube masking gives; L = (T/p_t)(H/p)(W/p). A :class:`~mimfast.ops.MaskInfo` is accepted too:
    its ``mask`` is used and its ``ids_keep`` width gives the visible count without a host synchronisation
    (a bool mask needs one, to size the visible batch and check the counts).

    Returns :class:`~mimfast.models.vit.MIMOutput`: loss (MSE over the masked tokens), pred [N, L_masked, P]
    for the masked tokens in token order, P = p_t*p*p*C valued (p_t, row, col, channel), and the bool mask.
    With ``norm_target`` the target of each cube is, per channel, its un-normalised pixels minus their mean
    over the p_t*p*p values, divided by their unbiased std + 1e-6. ``pixel_mean`` / ``pixel_std`` are the
    per-channel statistics the clips were normalised with (un-normalised before the target is built): the
    ImageNet ones by default for 3 channels, none (0 / 1: the input is the target) for other channel counts, as
    Hugging Face's VideoMAE does for non-RGB input.

    Equivalent PyTorch (reference, ``fused=False``)::

        x = encoder.patch_embed(videos) + encoder.pos_embed
        x = encoder_to_decoder(encoder(x[~mask].reshape(N, -1, D)))
        pos = pos_embed.expand(N, -1, -1)
        x = torch.cat((x + pos[~mask].reshape(N, K, -1), mask_token + pos[mask].reshape(N, L - K, -1)), 1)
        pred = decoder.head(decoder.norm(decoder(x)[:, K:]))
    """

    # VideoMAE's pretraining model exempts its mask token (its position table is a buffer, not a parameter)
    NO_WEIGHT_DECAY = frozenset({"mask_token"})

    def __init__(
        self,
        img_size: Union[int, tuple[int, int]] = 224,
        patch_size: int = 16,
        num_frames: int = 16,
        tubelet_size: int = 2,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        decoder_embed_dim: int = 384,
        decoder_depth: int = 4,
        decoder_num_heads: int = 6,
        mlp_ratio: float = 4.0,
        norm_target: bool = True,
        fused: bool = True,
        pixel_mean: Optional[Sequence[float]] = None,
        pixel_std: Optional[Sequence[float]] = None,
    ) -> None:
        super().__init__()
        if pixel_mean is None and pixel_std is None:
            pixel_mean, pixel_std = (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else ((0.0,) * in_chans,
                                                                                         (1.0,) * in_chans)
        if pixel_mean is None or pixel_std is None or len(pixel_mean) != in_chans or len(pixel_std) != in_chans:
            raise ValueError(f"pixel_mean and pixel_std need one value per channel ({in_chans}), got {pixel_mean!r} "
                             f"and {pixel_std!r}")
        self.pixel_mean = tuple(float(v) for v in pixel_mean)
        self.pixel_std = tuple(float(v) for v in pixel_std)
        self.encoder = VideoMAEEncoder(img_size, patch_size, num_frames, tubelet_size, in_chans, embed_dim, depth,
                                       num_heads, mlp_ratio)
        patch_embed = self.encoder.patch_embed
        self.img_size = patch_embed.img_size
        self.grid_size = patch_embed.grid_size
        self.patch_size = patch_size
        self.tubelet_size = tubelet_size
        self.num_frames = num_frames
        self.in_chans = in_chans
        self.num_patches = L = patch_embed.num_patches
        patch_dim = tubelet_size * patch_size * patch_size * in_chans
        self.decoder = VideoMAEDecoder(decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio, patch_dim)
        self.encoder_to_decoder = nn.Linear(embed_dim, decoder_embed_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer("pos_embed", sinusoid_table(L, decoder_embed_dim).float()[None], persistent=False)
        self.norm_target = norm_target
        self.initialize_weights()
        self.fused = fused

    def initialize_weights(self) -> None:
        """As VideoMAE: the encoder's and decoder's Linears xavier-uniform with zero biases and their LayerNorms
        1 / 0; ``encoder_to_decoder`` keeps nn.Linear's default and the cube projection Conv3d's; the mask token
        normal(0.02) clipped at +-0.02; q / v biases start at zero."""
        self.encoder.apply(init_linear_layernorm_)
        self.decoder.apply(init_linear_layernorm_)
        clipped_normal_(self.mask_token)

    def _visible_count(self, mask: Union[torch.Tensor, MaskInfo], N: int) -> tuple[torch.Tensor, int]:
        """Validate the mask; return it as bool [N, L] and the number of visible tokens per sample."""
        L = self.num_patches
        if isinstance(mask, MaskInfo):
            bool_mask, num_visible = mask.mask, mask.ids_keep.shape[1]
        elif isinstance(mask, torch.Tensor):
            bool_mask, num_visible = mask, None
        else:
            raise TypeError(f"mask must be a bool tensor or a MaskInfo, got {type(mask).__name__}")
        if bool_mask.dim() < 2 or bool_mask.shape[0] != N or math.prod(bool_mask.shape[1:]) != L:
            raise ValueError(f"mask must be [N, L] = [{N}, {L}] (or [N, {', '.join(map(str, self.grid_size))}]), "
                             f"got {tuple(bool_mask.shape)}")
        if bool_mask.device != self.mask_token.device:
            raise ValueError(f"mask is on {bool_mask.device} but the model is on {self.mask_token.device}")
        bool_mask = bool_mask.reshape(N, L)
        if bool_mask.dtype != torch.bool:
            bool_mask = bool_mask != 0
        if num_visible is None:
            # the one host synchronisation: the visible batch's shape depends on the mask
            lo, hi = torch.stack(torch.aminmax(bool_mask.sum(1))).tolist() if N else (0, 0)
            if lo != hi:
                raise ValueError(f"every sample must mask the same number of tokens (tube masking), got counts "
                                 f"from {lo} to {hi}")
            num_visible = L - hi
        if num_visible == L and N:
            raise ValueError("the mask hides no token: VideoMAE reconstructs masked tokens only")
        if num_visible == 0:
            raise ValueError("the mask hides every token: the encoder needs at least one visible token")
        return bool_mask, num_visible

    def forward_loss(self, videos: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE between pred [N, L_masked, P] and the (per-cube normalised) pixels of the masked cubes."""
        if self.fused:
            return videomae_pixel_loss(pred, videos, mask, self.patch_size, self.tubelet_size,
                                       norm_target=self.norm_target, mean=self.pixel_mean, std=self.pixel_std)
        # the clips arrive normalised (with the ImageNet statistics by default); the target is built from raw pixels
        shape = (1, -1, 1, 1, 1)
        mean = torch.tensor(self.pixel_mean, dtype=videos.dtype, device=videos.device).view(shape)
        std = torch.tensor(self.pixel_std, dtype=videos.dtype, device=videos.device).view(shape)
        cubes = patchify(videos * std + mean, self.patch_size, self.tubelet_size)  # [N, L, P], channel fastest
        N, L, P = cubes.shape
        if self.norm_target:
            cubes = cubes.view(N, L, -1, self.in_chans)
            cubes = (cubes - cubes.mean(dim=-2, keepdim=True)) / (cubes.var(dim=-2, keepdim=True).sqrt() + 1e-6)
            cubes = cubes.view(N, L, P)
        target = cubes[mask].reshape(N, -1, P)
        return F.mse_loss(pred, target)

    def forward(self, videos: torch.Tensor, mask: Union[torch.Tensor, MaskInfo]) -> MIMOutput:
        check_model_input(videos, name="videos", img_size=self.img_size, patch_size=self.patch_size,
                          in_chans=self.in_chans, device=self.mask_token.device, num_frames=self.num_frames,
                          tubelet_size=self.tubelet_size)
        N = videos.shape[0]
        mask, K = self._visible_count(mask, N)
        if self.fused:
            ids_keep, ids_masked, ids_restore = mask_indices(mask, K)
            proj = self.encoder.patch_embed.proj
            x = embed_visible(videos, ids_keep, proj.weight, proj.bias, self.encoder.pos_embed, self.patch_size,
                              tubelet_size=self.tubelet_size)
            x = self.encoder_to_decoder(self.encoder(x))
            # the decoder is permutation-equivariant over tokens: run it in token order, keep the masked rows
            x = self.decoder(restore_tokens(x, ids_restore, self.mask_token, self.pos_embed, has_cls=False))
            x = torch.gather(x, 1, ids_masked.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        else:
            x = self.encoder.patch_embed(videos) + self.encoder.pos_embed.type_as(videos)
            x = self.encoder(x[~mask].reshape(N, K, -1))
            x = self.encoder_to_decoder(x)
            pos = self.pos_embed.type_as(x).expand(N, -1, -1)
            width = x.shape[-1]
            x = torch.cat((x + pos[~mask].reshape(N, K, width),
                           self.mask_token + pos[mask].reshape(N, -1, width)), dim=1)
            x = self.decoder(x)[:, K:, :]
        pred = self.decoder.head(self.decoder.norm(x))
        return MIMOutput(self.forward_loss(videos, pred, mask), pred, mask)


def _videomae(embed_dim: int, depth: int, num_heads: int, decoder_embed_dim: int, decoder_num_heads: int,
              kwargs: dict) -> VideoMAE:
    config = dict(patch_size=16, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                  decoder_embed_dim=decoder_embed_dim, decoder_depth=4, decoder_num_heads=decoder_num_heads,
                  mlp_ratio=4.0)
    config.update(kwargs)
    return VideoMAE(**config)


def videomae_vit_small_patch16(**kwargs) -> VideoMAE:
    """ViT-S/16 VideoMAE: encoder 384 wide, 12 deep, 6 heads; decoder 192 wide, 4 deep, 3 heads."""
    return _videomae(384, 12, 6, 192, 3, kwargs)


def videomae_vit_base_patch16(**kwargs) -> VideoMAE:
    """ViT-B/16 VideoMAE: encoder 768 wide, 12 deep, 12 heads; decoder 384 wide, 4 deep, 6 heads."""
    return _videomae(768, 12, 12, 384, 6, kwargs)


def videomae_vit_large_patch16(**kwargs) -> VideoMAE:
    """ViT-L/16 VideoMAE: encoder 1024 wide, 24 deep, 16 heads; decoder 512 wide, 4 deep, 8 heads."""
    return _videomae(1024, 24, 16, 512, 8, kwargs)
