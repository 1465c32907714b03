"""Models the engine can build, and per method (MAE, SimMIM, VideoMAE) how a batch becomes masks and a loss,
how a reconstruction is turned back into pixels, which baseline a held-out loss is compared with, and which
features the probes read from the encoder."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mimfast.ops.patchify import patchify, unpatchify
from mimfast.train.config import PretrainConfig
from mimfast.train.masks import (
    DROP_PATH_STREAM,
    block_mask,
    hash_noise,
    importance_noise,
    mae_noise,
    mask_from_noise,
    noise_from_mask,
    patch_variance,
    sample_ratios,
    simmim_mask,
    simmim_units,
    tube_mask,
    units_to_patches,
)

__all__ = ["MICRO_MODELS", "model_factories", "build_model", "Objective", "Reconstruction"]


def _mae_micro(**kwargs: Any) -> nn.Module:
    from mimfast.models import MaskedAutoencoderViT

    config = dict(img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4, decoder_embed_dim=64,
                  decoder_depth=2, decoder_num_heads=4, mlp_ratio=4.0)
    return MaskedAutoencoderViT(**{**config, **kwargs})


def _simmim_micro(**kwargs: Any) -> nn.Module:
    from mimfast.models import SimMIMViT

    config = dict(img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4, mlp_ratio=4.0)
    return SimMIMViT(**{**config, **kwargs})


def _videomae_micro(**kwargs: Any) -> nn.Module:
    from mimfast.models import VideoMAE

    config = dict(img_size=32, patch_size=4, num_frames=4, tubelet_size=2, embed_dim=128, depth=4, num_heads=4,
                  decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4, mlp_ratio=4.0)
    return VideoMAE(**{**config, **kwargs})


# Small models for 32-pixel inputs (the demo digits, tests, CPU runs): 4-pixel patches, 128 wide, 4 deep.
MICRO_MODELS: dict[str, Callable[..., nn.Module]] = {
    "mae_vit_micro_patch4": _mae_micro,
    "simmim_vit_micro_patch4": _simmim_micro,
    "videomae_vit_micro_patch4": _videomae_micro,
}


def model_factories() -> dict[str, Callable[..., nn.Module]]:
    """Every ``--model`` name: the factories of :mod:`mimfast.models` plus :data:`MICRO_MODELS`."""
    import mimfast.models as models

    found = {name: getattr(models, name) for name in models.__all__
             if name.startswith(("mae_vit_", "simmim_vit_", "videomae_vit_"))}
    return {**found, **MICRO_MODELS}


def build_model(config: PretrainConfig, channels: int) -> nn.Module:
    """The model named by ``config.model`` for ``channels``-channel inputs of ``config.input_size`` pixels
    (default: the model's own size), in reference mode when ``config.backend == "reference"``."""
    factories = model_factories()
    if config.model not in factories:
        raise ValueError(f"unknown model {config.model!r}; choose one of: {', '.join(sorted(factories))}")
    kwargs: dict[str, Any] = {"in_chans": channels, "fused": config.backend != "reference"}
    if config.input_size is not None:
        kwargs["img_size"] = config.input_size
    if config.method == "mae":
        kwargs["norm_pix_loss"] = config.norm_pix_loss
    elif config.method == "simmim" and config.drop_path:
        kwargs["drop_path_rate"] = config.drop_path
    elif config.method == "videomae":
        kwargs["norm_target"] = config.norm_pix_loss
        if config.num_frames is not None:
            kwargs["num_frames"] = config.num_frames
    model = factories[config.model](**kwargs)
    patch = model.patch_size
    size = model.img_size[0] if isinstance(model.img_size, (tuple, list)) else model.img_size
    if size % patch:
        raise ValueError(f"--input-size {size} is not divisible by the patch size {patch} of {config.model}")
    return model


class Reconstruction:
    """Pixels in [0, 1] for the picture: original and reconstruction [n, C, H, W], masked [n, H, W] bool, and a
    label per column."""

    def __init__(self, original: torch.Tensor, masked: torch.Tensor, reconstruction: torch.Tensor,
                 labels: Sequence[str] = ()) -> None:
        self.original, self.masked, self.reconstruction, self.labels = original, masked, reconstruction, labels


def _denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    shape = (1, -1) + (1,) * (x.dim() - 2)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(shape)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(shape)
    return x * s + m


def _pixel_mask(mask: torch.Tensor, grid: Sequence[int], patch: int) -> torch.Tensor:
    """[n, h*w] -> [n, h*p, w*p] bool."""
    h, w = grid
    m = mask.reshape(-1, h, w).bool()
    return m.repeat_interleave(patch, 1).repeat_interleave(patch, 2)


class Objective:
    """One method's masks, loss call, reconstruction pictures, trivial baseline and probe features."""

    def __init__(self, config: PretrainConfig, model: nn.Module) -> None:
        self.method = config.method
        self.seed = config.seed
        self.mask_ratio = float(config.mask_ratio)
        self.strategy = config.mask_strategy
        self.ratio_end = config.mask_ratio_end
        self.schedule = config.mask_schedule
        self.ratio_range = config.mask_ratio_range
        self.block_min_patches = config.block_min_patches
        self.temperature = config.importance_temperature
        self.total_steps = 1  # length of the progressive schedule, set by the trainer
        self.patch_size = model.patch_size
        self.grid = tuple(model.grid_size)
        self.num_patches = model.num_patches
        self.channels = model.in_chans
        self.img_size = tuple(model.img_size)
        if self.method == "simmim":
            size = self.img_size[0]
            # SimMIM's 32-pixel units; block-wise masks in BEiT's 16-pixel units
            unit = 16 if self.strategy == "block" else 32
            default = unit if size >= 128 and size % unit == 0 and unit % self.patch_size == 0 else self.patch_size
            self.mask_patch_size = config.mask_patch_size or default
            if self.img_size[0] != self.img_size[1]:
                raise ValueError("SimMIM masking needs square inputs")
        # blocks with stochastic depth: the training forward passes their draws
        self.drop_path_blocks = len(model.encoder.blocks) if self.method == "simmim" and any(
            b.drop_path > 0 for b in model.encoder.blocks) else 0
        if self.method == "videomae":
            self.tubelet_size = model.tubelet_size
            self.num_frames = model.num_frames
            for flag, ratio in (("--mask-ratio", self.mask_ratio), ("--mask-ratio-end", self.ratio_end)):
                if ratio is not None and self._video_num_keep(ratio) == self.num_patches:
                    raise ValueError(f"{flag} {ratio} masks no token of a {self.grid[1]}x{self.grid[2]} frame grid; "
                                     "VideoMAE needs at least one masked tube")

    def _video_num_keep(self, ratio: float) -> int:
        return self.num_patches - self.grid[0] * int(self.grid[1] * self.grid[2] * ratio)

    def ratio_at(self, step: Optional[int]) -> float:
        """The mask ratio at optimizer step ``step``; ``None``: the evaluation ratio (the final one)."""
        if self.ratio_end is None:
            return self.mask_ratio
        if step is None:
            return self.ratio_end
        from mimfast.ops import ratio_schedule

        return ratio_schedule(step, self.total_steps, self.mask_ratio, self.ratio_end, self.schedule)

    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample: (C, H, W), or (C, T, H, W) for VideoMAE."""
        if self.method == "videomae":
            return (self.channels, self.num_frames, *self.img_size)
        return (self.channels, *self.img_size)

    def ratio_span(self) -> tuple[float, float]:
        """The lowest and highest mask ratio training uses."""
        if self.ratio_range is not None:
            return self.ratio_range
        ends = (self.mask_ratio, self.mask_ratio if self.ratio_end is None else self.ratio_end)
        return min(ends), max(ends)

    def visible_tokens(self, ratio: float) -> Optional[int]:
        """Patches (cubes) the encoder sees per sample at ``ratio``; None for SimMIM, whose encoder sees them all."""
        if self.method == "mae":
            from mimfast.ops.random_masking import num_kept

            return num_kept(self.num_patches, ratio)
        if self.method == "videomae":
            return self._video_num_keep(ratio)
        return None

    def forward(self, model: Callable[..., Any], images: torch.Tensor, indices: torch.Tensor, epoch: int,
                step: Optional[int] = None, ratio: Optional[float] = None) -> Any:
        """``MIMOutput`` of ``model`` (possibly wrapped by DDP / FSDP / compile) for data-set samples ``indices``
        [N] int64 (pass them on the CPU: block masks and per-sample ratios are keyed by them on the host) at
        optimizer step ``step`` (``None``: evaluation, the final mask ratio and no per-sample ratios); ``ratio``
        replaces the step's ratio (one for the whole batch).

        Masks are a function of (seed, epoch, index): the same sample gets the same mask whichever rank, batch
        position or micro-step it lands in. Everything goes through ``model.__call__`` so DDP / FSDP hooks run.
        """
        if indices.shape != images.shape[:1]:
            raise ValueError(f"need one data-set index per sample: {images.shape[0]} samples, indices of shape "
                             f"{tuple(indices.shape)}")
        per_sample = ratio is None and self.ratio_range is not None and step is not None
        ratio = self.ratio_at(step) if ratio is None else ratio
        device_indices = indices.to(images.device, non_blocking=True)
        L = self.num_patches
        if self.method == "mae":
            if per_sample:
                # a NumPy array: DDP and FSDP2 move tensor arguments to the device, the counts must stay on the host
                ratios = sample_ratios(self.seed, epoch, indices.cpu(), *self.ratio_range).numpy()
                return model(images, mask_ratio=ratios, noise=mae_noise(self.seed, epoch, device_indices, L))
            if self.strategy == "random":
                noise = mae_noise(self.seed, epoch, device_indices, L)
            elif self.strategy == "importance":
                noise = importance_noise(self.seed, epoch, device_indices, patch_variance(images, self.patch_size),
                                         self.temperature)
            else:
                from mimfast.ops.random_masking import num_kept

                noise = noise_from_mask(block_mask(self.seed, epoch, indices.cpu(), self.grid, L - num_kept(L, ratio),
                                                   self.block_min_patches, images.device))
            return model(images, mask_ratio=ratio, noise=noise)
        if self.method == "simmim":
            if self.strategy == "random":
                mask = simmim_mask(self.seed, epoch, device_indices, self.img_size[0], self.mask_patch_size,
                                   self.patch_size, ratio)
            else:  # over SimMIM's mask units, as its random masks
                side, scale = simmim_units(self.img_size[0], self.mask_patch_size, self.patch_size)
                num_masked = math.ceil(side * side * ratio)
                if self.strategy == "importance":
                    scores = patch_variance(images, self.mask_patch_size)
                    noise = importance_noise(self.seed, epoch, device_indices, scores, self.temperature)
                    units = mask_from_noise(noise, num_masked)
                else:
                    units = block_mask(self.seed, epoch, indices.cpu(), (side, side), num_masked,
                                       self.block_min_patches, images.device)
                mask = units_to_patches(units, side, scale)
            if step is not None and self.drop_path_blocks:
                # stochastic depth drawn like the masks: a function of (seed, epoch, index), whatever the rank
                u = hash_noise(self.seed, epoch, device_indices, 2 * self.drop_path_blocks, stream=DROP_PATH_STREAM)
                return model(images, mask, drop_noise=u.view(-1, self.drop_path_blocks, 2))
            return model(images, mask)
        from mimfast.ops.masking import mask_info_from_mask

        mask = tube_mask(self.seed, epoch, device_indices, self.grid, ratio)
        return model(images, mask_info_from_mask(mask, num_keep=self._video_num_keep(ratio)))

    @torch.no_grad()
    def trivial_loss(self, model: nn.Module, images: torch.Tensor, output: Any) -> torch.Tensor:
        """The loss of predicting every masked patch (cube) by its own mean: with per-patch normalised targets
        that is predicting 0 (loss about 1 on textured patches, 0 on flat ones)."""
        mask = output.mask
        if self.method == "mae":
            if model.norm_pix_loss:
                pred = torch.zeros_like(output.pred)
            else:
                pred = patchify(images.float(), self.patch_size).mean(-1, keepdim=True).expand_as(output.pred)
            return model.forward_loss(images.float(), pred.float(), mask)
        if self.method == "simmim":
            from mimfast.ops import simmim_pixel_loss

            p = self.patch_size
            means = F.avg_pool2d(images.float(), p)
            pred = means.repeat_interleave(p, 2).repeat_interleave(p, 3)
            return simmim_pixel_loss(pred, images.float(), mask, p)
        pred = torch.zeros_like(output.pred, dtype=torch.float32)
        if not model.norm_target:
            cubes = self._video_cubes(model, images.float())
            N, L, P = cubes.shape
            means = cubes.view(N, L, -1, self.channels).mean(-2, keepdim=True).expand(-1, -1, P // self.channels, -1)
            pred = means.reshape(N, L, P)[mask.reshape(N, L)].reshape(N, -1, P)
        return model.forward_loss(images.float(), pred, mask)

    def _video_cubes(self, model: nn.Module, videos: torch.Tensor) -> torch.Tensor:
        """Raw-pixel cubes [N, L, P], un-normalised with the statistics the model's loss uses."""
        return patchify(_denormalize(videos, model.pixel_mean, model.pixel_std), self.patch_size, self.tubelet_size)

    @torch.no_grad()
    def features(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """[N, D] mean of the encoder's output tokens over the whole, unmasked input (cls token excluded)."""
        if self.method == "mae":
            latent, _, _ = model.forward_encoder(images, 0.0)
            return latent[:, 1:].float().mean(1)
        if self.method == "simmim":
            empty = torch.zeros(images.shape[0], self.num_patches, dtype=torch.bool, device=images.device)
            return model.encoder(images, empty).float().mean((2, 3))
        encoder = model.encoder
        x = encoder.patch_embed(images) + encoder.pos_embed.type_as(images)
        return encoder(x).float().mean(1)

    @torch.no_grad()
    def reconstruct(self, model: nn.Module, images: torch.Tensor, indices: torch.Tensor, epoch: int,
                    mean: Sequence[float], std: Sequence[float], max_columns: int = 8) -> Reconstruction:
        """Model reconstruction of ``images`` with the visible patches pasted back, as pixels in [0, 1].

        With per-patch normalised targets the prediction is mapped back with the mean and standard deviation of
        each masked patch of the original (as MAE's own visualisation does): the picture shows the structure
        the model predicted, at the true brightness and contrast of the patch.
        """
        out = self.forward(model, images, indices, epoch)
        x = images.float()
        p = self.patch_size
        if self.method == "mae":
            target = patchify(x, p)
            pred = out.pred.float()
            if model.norm_pix_loss:
                mu, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
                pred = pred * (var + 1e-6).sqrt() + mu
            mask = out.mask.bool()
            merged = torch.where(mask.unsqueeze(-1), pred, target)
            recon = unpatchify(merged, p, self.grid, self.channels)
            masked = _pixel_mask(mask, self.grid, p)
            n = min(max_columns, x.shape[0])
            return Reconstruction(_denormalize(x, mean, std)[:n].clamp(0, 1), masked[:n],
                                  _denormalize(recon, mean, std)[:n].clamp(0, 1))
        if self.method == "simmim":
            masked = _pixel_mask(out.mask, self.grid, p)
            recon = torch.where(masked.unsqueeze(1), out.pred.float(), x)
            n = min(max_columns, x.shape[0])
            return Reconstruction(_denormalize(x, mean, std)[:n].clamp(0, 1), masked[:n],
                                  _denormalize(recon, mean, std)[:n].clamp(0, 1))
        return self._reconstruct_video(model, x, out, max_columns)

    def _reconstruct_video(self, model: nn.Module, videos: torch.Tensor, out: Any, max_columns: int) -> Reconstruction:
        cubes = self._video_cubes(model, videos)  # raw pixels [N, L, P]
        N, L, P = cubes.shape
        mask = out.mask.reshape(N, L).bool()
        pred = out.pred.float()
        if model.norm_target:
            masked_cubes = cubes[mask].reshape(N, -1, P // self.channels, self.channels)
            mu = masked_cubes.mean(-2, keepdim=True)
            sd = masked_cubes.var(-2, keepdim=True).sqrt() + 1e-6
            pred = (pred.view_as(masked_cubes) * sd + mu).reshape(N, -1, P)
        merged = cubes.clone()
        merged[mask] = pred.reshape(-1, P)
        recon = unpatchify(merged, self.patch_size, self.grid, self.channels, self.tubelet_size)  # [N, C, T, H, W]
        original = unpatchify(cubes, self.patch_size, self.grid, self.channels, self.tubelet_size)
        t, h, w = self.grid
        frames_per_clip = max(1, min(self.num_frames, max_columns // min(N, 2)))
        clips = min(N, max(1, max_columns // frames_per_clip))
        step = max(1, self.num_frames // frames_per_clip)
        frame_ids = list(range(0, self.num_frames, step))[:frames_per_clip]
        spatial = mask.reshape(N, t, h * w)
        orig, rec, msk, labels = [], [], [], []
        for c in range(clips):
            for f in frame_ids:
                orig.append(original[c, :, f])
                rec.append(recon[c, :, f])
                msk.append(_pixel_mask(spatial[c, f // self.tubelet_size][None], (h, w), self.patch_size)[0])
                labels.append(f"clip {c} frame {f}")
        return Reconstruction(torch.stack(orig).clamp(0, 1), torch.stack(msk), torch.stack(rec).clamp(0, 1), labels)

