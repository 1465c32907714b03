"""Image and clip transforms of the methods' recipes, written with PIL and torch only (no torchvision).

Images (:class:`ImageTransform`): RandomResizedCrop (aspect ratio (3/4, 4/3); MAE: scale (0.2, 1.0), bicubic;
SimMIM: scale (0.67, 1.0), bilinear), horizontal flip with probability 0.5, conversion to float in [0, 1],
per-channel normalisation. Clips (:class:`ClipTransform`, VideoMAE): one multi-scale corner crop for the whole
clip (:func:`multiscale_crop_box`), bilinear resize, no flip, the same normalisation. Every random draw comes from a
``random.Random`` the caller seeds per sample, so an augmented sample is a function of (seed, epoch, index)
whatever worker, rank or batch it lands in; that is what makes resumed and data-parallel runs reproduce an
uninterrupted single-process run.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CropBox",
    "random_resized_crop_box",
    "center_crop_box",
    "multiscale_crop_box",
    "pil_to_tensor",
    "to_8bit",
    "to_mode",
    "ImageTransform",
    "ClipTransform",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class CropBox:
    left: int
    top: int
    width: int
    height: int

    def as_pil_box(self) -> tuple[int, int, int, int]:
        return (self.left, self.top, self.left + self.width, self.top + self.height)


def random_resized_crop_box(
    width: int,
    height: int,
    rng: random.Random,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> CropBox:
    """A crop covering a uniform fraction ``scale`` of the area with a log-uniform aspect ratio.

    Ten tries at a box that fits; if none does, the largest centred box whose aspect ratio is within
    ``ratio`` (the usual RandomResizedCrop fallback).
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return CropBox(rng.randint(0, width - w), rng.randint(0, height - h), w, h)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return CropBox((width - w) // 2, (height - h) // 2, w, h)


def multiscale_crop_box(
    width: int,
    height: int,
    size: int,
    rng: random.Random,
    scales: Sequence[float] = (1.0, 0.875, 0.75, 0.66),
    max_distort: int = 1,
) -> CropBox:
    """VideoMAE's training crop (the multi-scale crop of TSN): each side is a fraction ``scales`` of the shorter
    image side (snapped to ``size`` when within 2 pixels of it), the two fractions at most ``max_distort`` places
    apart in ``scales``, and the box sits at one of 13 fixed places, drawn uniformly: the corners, the centre,
    the middles of the edges and the centres of the four quarters (on a grid of quarter steps of the free
    space)."""
    base = min(width, height)
    sides = [max(1, int(base * f)) for f in scales]  # a 1-pixel side would otherwise give an empty box
    snapped = [size if abs(x - size) < 3 else x for x in sides]
    pairs = [(w, h) for i, h in enumerate(snapped) for j, w in enumerate(snapped) if abs(i - j) <= max_distort]
    w, h = rng.choice(pairs)
    # a side snapped up to ``size`` can pass the image's: it keeps to the image, as a crop box past the border
    # would read padding
    w, h = min(w, width), min(h, height)
    sw, sh = (width - w) // 4, (height - h) // 4
    places = [(0, 0), (4, 0), (0, 4), (4, 4), (2, 2), (0, 2), (4, 2), (2, 4), (2, 0), (1, 1), (3, 1), (1, 3), (3, 3)]
    gx, gy = rng.choice(places)
    return CropBox(gx * sw, gy * sh, w, h)


def center_crop_box(width: int, height: int) -> CropBox:
    """The largest centred square."""
    side = min(width, height)
    return CropBox((width - side) // 2, (height - side) // 2, side, side)


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit ("I;16*") and 32-bit integer ("I") grey images -> 8-bit grey "L", scaled by their value range
    (32-bit float "F" images: [0, 1], or [0, 255] when a value passes 1); other images are returned as they are.

    Pillow's own conversion to "L" or "RGB" clips these modes at 255, which turns a 16-bit photograph almost
    white. A 16-bit PNG loads as "I;16" or "I", so an "I" image whose values stay within [0, 65535] is read as
    16-bit; wider "I" data is scaled by the int32 range. Negative values become 0. A 16-bit value v maps to
    round(v / 65535 * 255), so a 16-bit image of 8-bit values times 257 gives back exactly those 8-bit values.
    """
    if img.mode == "F":
        # 32-bit float images (float TIFFs) hold [0, 1] like float clips, or [0, 255] when any value passes 1;
        # Pillow's own conversion reads them as [0, 255], so a [0, 1] image would turn black
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        top = 1.0 if arr.size == 0 or float(arr.max()) <= 1.0 else 255.0
        return Image.fromarray((np.clip(arr, 0.0, top) * (255.0 / top) + 0.5).astype(np.uint8), "L")
    if not (img.mode == "I" or img.mode.startswith("I;16")):
        return img
    arr = np.asarray(img)
    top = 65535.0 if int(arr.max()) <= 65535 else float(np.iinfo(np.int32).max)
    scaled = np.clip(arr.astype(np.float64), 0.0, top) * (255.0 / top) + 0.5
    return Image.fromarray(scaled.astype(np.uint8), "L")


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """The image in 8-bit grey (C = 1) or RGB (C = 3), as an image-folder loader gives it before any transform:
    resampling then happens on those values (Pillow resamples palette images by nearest neighbour and RGBA ones
    with premultiplied alpha)."""
    return to_8bit(img).convert("L" if channels == 1 else "RGB")


_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def _crop_resize(img: Image.Image, box: CropBox, size: int, interpolation: str) -> Image.Image:
    # crop, then resize the crop alone (RandomResizedCrop's resized_crop): Pillow's resize(box=) would draw on
    # pixels around the box for the border rows and columns
    return img.crop(box.as_pil_box()).resize((size, size), _RESAMPLE[interpolation])


def pil_to_tensor(img: Image.Image, channels: int) -> torch.Tensor:
    """PIL image -> float [C, H, W] in [0, 1], converted to grey (C = 1) or RGB (C = 3); 16-bit and 32-bit
    integer images are scaled by their range first (:func:`to_8bit`)."""
    img = to_8bit(img).convert("L" if channels == 1 else "RGB")
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def check_stats(channels: int, mean: Sequence[float], std: Sequence[float]) -> None:
    """Raise unless ``mean`` and ``std`` hold one value per channel (the ImageNet defaults have three: a
    1-channel transform needs its own, or each grey pixel would come out as three differently normalised copies)."""
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean and std need one value per channel ({channels}), got {len(mean)} and {len(std)} "
                         f"values")


def _normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    shape = (-1,) + (1,) * (x.dim() - 1)
    m = torch.tensor(mean, dtype=x.dtype).view(shape)
    s = torch.tensor(std, dtype=x.dtype).view(shape)
    return (x - m) / s


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> normalised [C, size, size].

    ``train=True``: random resized crop + horizontal flip (the defaults are MAE's; SimMIM's is
    :meth:`simmim`); ``train=False``: centred square crop resized to ``size`` (evaluation, reconstructions).
    """

    size: int
    channels: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    train: bool = True
    scale: tuple[float, float] = (0.2, 1.0)
    hflip: bool = True
    interpolation: str = "bicubic"  # or "bilinear"

    def __post_init__(self) -> None:
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {', '.join(_RESAMPLE)}, got {self.interpolation!r}")
        check_stats(self.channels, self.mean, self.std)

    @classmethod
    def simmim(cls, size: int, channels: int = 3, mean: tuple[float, ...] = IMAGENET_MEAN,
               std: tuple[float, ...] = IMAGENET_STD, train: bool = True) -> "ImageTransform":
        """SimMIM's SimMIMTransform: RandomResizedCrop with scale (0.67, 1.0) and torchvision's default bilinear
        resampling, then the flip."""
        return cls(size, channels, mean, std, train, scale=(0.67, 1.0), interpolation="bilinear")

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        img = to_mode(img, self.channels)
        if self.train:
            box = random_resized_crop_box(img.width, img.height, rng, self.scale)
        else:
            box = center_crop_box(img.width, img.height)
        out = _crop_resize(img, box, self.size, self.interpolation)
        if self.train and self.hflip and rng.random() < 0.5:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return _normalize(pil_to_tensor(out, self.channels), self.mean, self.std)


@dataclass(frozen=True)
class ClipTransform:
    """List of T PIL frames -> normalised [C, T, size, size], one crop (and flip decision) for the whole clip.

    ``train=True``: VideoMAE's pre-training augmentation, :func:`multiscale_crop_box` with ``scales`` then a
    bilinear resize, no flip unless ``hflip``; ``train=False``: centred square crop, bilinear resize.
    """

    size: int
    channels: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    train: bool = True
    scales: tuple[float, ...] = (1.0, 0.875, 0.75, 0.66)
    hflip: bool = False

    def __post_init__(self) -> None:
        check_stats(self.channels, self.mean, self.std)

    def __call__(self, frames: Sequence[Image.Image], rng: random.Random) -> torch.Tensor:
        frames = [to_mode(f, self.channels) for f in frames]
        first = frames[0]
        if self.train:
            box = multiscale_crop_box(first.width, first.height, self.size, rng, self.scales)
        else:
            box = center_crop_box(first.width, first.height)
        flip = self.train and self.hflip and rng.random() < 0.5
        out = []
        for f in frames:
            g = _crop_resize(f, box, self.size, "bilinear")
            if flip:
                g = g.transpose(Image.FLIP_LEFT_RIGHT)
            out.append(pil_to_tensor(g, self.channels))
        return _normalize(torch.stack(out, dim=1), self.mean, self.std)
