"""Data sets the engine trains on: the embedded digits demo, image folders, video folders, synthetic tensors.

Every data set is indexed by a key ``(epoch, index)`` and returns ``(tensor, label, index)``, or
``Unreadable(path, reason)`` for a file that cannot be decoded (the collate function drops it and counts it;
a corrupt file never stops an epoch). Labels are -1 where the data has none. The random augmentation of a
sample is drawn from a generator seeded by ``(seed, epoch, index)``.
"""

from __future__ import annotations

import os
import random
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mimfast.data.transforms import ClipTransform, ImageTransform

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataError",
    "Unreadable",
    "Item",
    "sample_rng",
    "DigitsDemo",
    "ImageFolder",
    "VideoFolder",
    "SyntheticData",
    "scan_image_folder",
    "scan_video_folder",
    "clip_frame_ids",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")

Key = tuple[int, int]


class DataError(ValueError):
    """The data cannot be used (missing or empty folder, nothing decodable); raised before training starts."""


class Unreadable(NamedTuple):
    path: str
    reason: str


Item = Union[tuple[torch.Tensor, int, int], Unreadable]


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """Generator for one sample's augmentation; string seeds hash with SHA-512, stable across processes."""
    return random.Random(f"mimfast/{seed}/{epoch}/{index}")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _check_dir(root: str) -> None:
    if not os.path.exists(root):
        raise DataError(f"data folder {root!r} does not exist")
    if not os.path.isdir(root):
        raise DataError(f"data path {root!r} is not a folder")


def scan_image_folder(root: str) -> tuple[list[tuple[str, int]], list[str]]:
    """Files of an image folder: ``root/<class>/<img>`` (labels from sorted class names) or flat ``root/<img>``
    (labels -1). Raises :class:`DataError` for a missing folder or one holding no image files."""
    _check_dir(root)
    entries = sorted(os.listdir(root))
    flat = [e for e in entries if _is_image(e) and os.path.isfile(os.path.join(root, e))]
    classes = [e for e in entries if os.path.isdir(os.path.join(root, e)) and not e.startswith(".")]
    samples: list[tuple[str, int]] = [(os.path.join(root, f), -1) for f in flat]
    if not flat:
        for label, cls in enumerate(classes):
            for dirpath, dirnames, filenames in os.walk(os.path.join(root, cls)):
                dirnames.sort()
                samples += [(os.path.join(dirpath, f), label) for f in sorted(filenames) if _is_image(f)]
    else:
        classes = []
    if not samples:
        raise DataError(f"data folder {root!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)}), neither "
                        "directly nor in class sub-folders")
    return samples, classes


def _frames_in(path: str) -> list[str]:
    return sorted(os.path.join(path, f) for f in os.listdir(path) if _is_image(f))


def scan_video_folder(root: str) -> tuple[list[tuple[str, int]], list[str]]:
    """Clips of a video folder: each clip is a ``.npy`` array [T, H, W(, C)] or a folder of frame images, either
    directly in ``root`` (labels -1) or in class sub-folders ``root/<class>/<clip>``."""
    _check_dir(root)

    def clips_in(folder: str) -> list[str]:
        out = []
        for e in sorted(os.listdir(folder)):
            p = os.path.join(folder, e)
            if e.lower().endswith(".npy") and os.path.isfile(p):
                out.append(p)
            elif os.path.isdir(p) and not e.startswith(".") and _frames_in(p):
                out.append(p)
        return out

    flat = clips_in(root)
    samples: list[tuple[str, int]] = [(p, -1) for p in flat]
    classes: list[str] = []
    if not flat:
        classes = [e for e in sorted(os.listdir(root))
                   if os.path.isdir(os.path.join(root, e)) and not e.startswith(".")]
        for label, cls in enumerate(classes):
            samples += [(p, label) for p in clips_in(os.path.join(root, cls))]
    if not samples:
        raise DataError(f"video folder {root!r} holds no clips (.npy arrays or folders of frames), neither "
                        "directly nor in class sub-folders")
    return samples, classes


class DigitsDemo:
    """scikit-learn's 1797 handwritten digits (8x8, 16 grey levels), bilinearly upscaled to ``size`` pixels.

    Shipped inside scikit-learn (no network). A fixed, stratified held-out split: a fifth of each class (359
    images), chosen by a fixed random permutation; the other 1438 train. Pixels are scaled to
    [0, 1], upscaled, and normalised with the training split's mean and standard deviation.
    """

    channels = 1
    classes = [str(d) for d in range(10)]

    def __init__(self, split: str = "train", size: int = 32) -> None:
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:  # the demo extra is missing
            raise DataError("the demo data set needs scikit-learn: pip install 'mimfast[demo]'") from e
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        digits = load_digits()
        x = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)  # [1797, 1, 8, 8]
        y = torch.from_numpy(digits.target).long()
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        # stratified: in a fixed random order, the first fifth of each class is held out
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        heldout = torch.zeros(len(y), dtype=torch.bool)
        for c in range(10):
            members = order[y[order] == c]
            heldout[members[: round(0.2 * len(members))]] = True
        mean, std = x[~heldout].mean().item(), x[~heldout].std().item()
        keep = heldout if split == "heldout" else ~heldout
        self.images = (x[keep] - mean) / std
        self.labels = y[keep]
        self.mean: tuple[float, ...] = (mean,)
        self.std: tuple[float, ...] = (std,)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: Key) -> Item:
        index = key[1]
        return self.images[index], int(self.labels[index]), index

    def collate_keys(self, keys: Sequence[Key]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A whole batch at once (the data is in memory, so no DataLoader workers are needed)."""
        idx = torch.tensor([k[1] for k in keys], dtype=torch.long)
        return self.images[idx], self.labels[idx], idx


class ImageFolder:
    """Images decoded with Pillow (in DataLoader workers) and transformed with :class:`ImageTransform`."""

    def __init__(self, root: str, transform: ImageTransform, seed: int = 0) -> None:
        self.root = root
        self.samples, self.classes = scan_image_folder(root)
        self.transform = transform
        self.seed = seed
        self.channels = transform.channels
        self.mean, self.std = transform.mean, transform.std

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: Key) -> Item:
        epoch, index = key
        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                img.load()
                x = self.transform(img, sample_rng(self.seed, epoch, index))
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            return Unreadable(path, f"{type(e).__name__}: {e}")
        return x, label, index


def _load_clip_frames(path: str, frame_ids: Sequence[int]) -> list[Image.Image]:
    if os.path.isdir(path):
        files = _frames_in(path)
        out = []
        for i in frame_ids:
            with Image.open(files[i]) as img:
                img.load()
                out.append(img.copy())
        return out
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    if arr.ndim not in (3, 4):
        raise ValueError(f"a clip array must be [T, H, W] or [T, H, W, C], got shape {arr.shape}")
    frames = np.asarray(arr[list(frame_ids)])
    if frames.dtype != np.uint8:
        frames = (np.clip(frames.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if frames.ndim == 4 and frames.shape[-1] == 1:
        frames = frames[..., 0]
    return [Image.fromarray(f) for f in frames]


def _num_frames(path: str) -> int:
    if os.path.isdir(path):
        return len(_frames_in(path))
    return int(np.load(path, mmap_mode="r", allow_pickle=False).shape[0])


def clip_frame_ids(total: int, num_frames: int, stride: int, rng: Optional[random.Random]) -> list[int]:
    """``num_frames`` indices ``stride`` apart from a random start (``rng``) or the centred start (``None``);
    clips shorter than the span repeat their last frame."""
    span = (num_frames - 1) * stride + 1
    room = max(0, total - span)
    start = rng.randint(0, room) if rng is not None else room // 2
    return [min(start + i * stride, total - 1) for i in range(num_frames)]


class VideoFolder:
    """Clips of ``num_frames`` frames sampled ``stride`` apart (VideoMAE's temporal sampling), each clip one
    crop and one flip (:class:`ClipTransform`): items are [C, T, size, size]."""

    def __init__(self, root: str, transform: ClipTransform, num_frames: int, stride: int, seed: int = 0) -> None:
        self.root = root
        self.samples, self.classes = scan_video_folder(root)
        self.transform = transform
        self.num_frames, self.stride, self.seed = num_frames, stride, seed
        self.channels = transform.channels
        self.mean, self.std = transform.mean, transform.std

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: Key) -> Item:
        epoch, index = key
        path, label = self.samples[index]
        rng = sample_rng(self.seed, epoch, index)
        try:
            total = _num_frames(path)
            if total == 0:
                raise ValueError("clip has no frames")
            ids = clip_frame_ids(total, self.num_frames, self.stride, rng if self.transform.train else None)
            x = self.transform(_load_clip_frames(path, ids), rng)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError, IndexError) as e:
            return Unreadable(path, f"{type(e).__name__}: {e}")
        return x, label, index


class SyntheticData:
    """Random tensors for benchmarks: a pool of 64 fixed random samples made on ``device``; sample i is pool
    entry i mod 64, so a batch costs one on-device gather and never waits on decoding or host copies."""

    classes: list[str] = []

    def __init__(self, shape: Sequence[int], num_samples: int = 1_281_167, seed: int = 0,
                 device: Union[str, torch.device] = "cpu") -> None:
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.pool = torch.randn((64, *shape), generator=g).to(device)
        self.num_samples = num_samples
        self.channels = int(shape[0])
        self.mean: tuple[float, ...] = (0.0,) * self.channels
        self.std: tuple[float, ...] = (1.0,) * self.channels

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, key: Key) -> Item:
        return self.pool[key[1] % len(self.pool)], -1, key[1]

    def collate_keys(self, keys: Sequence[Key]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = torch.tensor([k[1] for k in keys], dtype=torch.long)
        return self.pool[(idx % len(self.pool)).to(self.pool.device)], torch.full_like(idx, -1), idx
