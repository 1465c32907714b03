"""Data sets the engine trains on: the embedded digits demo, image folders, video folders, synthetic tensors.

Every data set is indexed by a key ``(epoch, index)`` and returns ``(tensor, label, index)``, or
``Unreadable(path, reason)`` for a file that cannot be decoded (the collate function drops it and counts it;
a corrupt file never stops an epoch). Labels are -1 where the data has none. The random augmentation of a
sample is drawn from a generator seeded by ``(seed, epoch, index)``.
"""

from __future__ import annotations

import os
import random
import re
import tokenize
from typing import Iterator, NamedTuple, Optional, Sequence, Union

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


# what reading a damaged file raises: Pillow's errors, and for .npy clips NumPy's (a header that does not parse
# reaches Python's tokenizer, whose TokenError is not a ValueError)
READ_ERRORS = (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError, SyntaxError,
               tokenize.TokenError)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _check_dir(root: str) -> None:
    if not os.path.exists(root):
        raise DataError(f"data folder {root!r} does not exist")
    if not os.path.isdir(root):
        raise DataError(f"data path {root!r} is not a folder")
    try:
        os.listdir(root)
    except OSError as e:
        raise DataError(f"data folder {root!r} cannot be read ({e.strerror or type(e).__name__})") from e


def _natural_key(name: str) -> tuple[tuple[Union[str, int], ...], str]:
    """Sort key comparing runs of digits as numbers, so unpadded frame numbers (ffmpeg's ``%d``) come in order:
    frame2 before frame10. ``re.split`` with a group alternates text and digits, so equal positions always hold
    the same type; the name itself breaks ties (frame01 / frame1) so the order is total."""
    parts = re.split(r"([0-9]+)", name)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), name


def _sub_folders(root: str) -> list[str]:
    return [e for e in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, e)) and not e.startswith(".")]


def _labelled(root: str, members: dict[str, list[str]],
              classes: Optional[Sequence[str]]) -> list[tuple[str, int]]:
    """``(path, label)`` for the files of each class folder (``members``, in sorted folder order); labels index
    the folder names, or ``classes`` when given."""
    if classes is None:
        labels = {cls: label for label, cls in enumerate(members)}
    else:
        labels = _given_labels(root, [cls for cls, paths in members.items() if paths], classes)
    return [(p, labels[cls]) for cls, paths in members.items() for p in paths]


def _given_labels(root: str, found: Sequence[str], classes: Sequence[str]) -> dict[str, int]:
    if isinstance(classes, str):
        raise TypeError(f"classes must be a sequence of class names, got the string {classes!r}")
    if len(set(classes)) != len(classes):
        raise DataError(f"the class list given for {root!r} repeats a name: {list(classes)}")
    labels = {cls: label for label, cls in enumerate(classes)}
    unknown = [cls for cls in found if cls not in labels]
    if unknown:
        raise DataError(f"data folder {root!r} has class folder(s) {', '.join(map(repr, unknown))} that are not "
                        f"among the {len(classes)} given classes ({', '.join(map(repr, classes))}); their images "
                        "could not be labelled like the other split's")
    return labels


def _images_under(folder: str) -> Iterator[str]:
    """Image files below ``folder``, sorted, following linked folders (as torchvision's ImageFolder does) but
    entering each real folder once and never one that holds ``folder`` (a link back up the tree)."""
    top = os.path.realpath(folder)
    seen = {top}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        fresh = []
        for d in sorted(dirnames):
            if d.startswith("."):  # hidden folders (.thumbnails, .ipynb_checkpoints) hold no training images
                continue
            real = os.path.realpath(os.path.join(dirpath, d))
            # a link to a folder holding this one (the data root, a parent) would walk the other classes again
            holds_top = os.path.commonpath([real, top]) == real
            if real not in seen and not holds_top:
                seen.add(real)
                fresh.append(d)
        dirnames[:] = fresh
        yield from (os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))


def scan_image_folder(root: str, classes: Optional[Sequence[str]] = None) -> tuple[list[tuple[str, int]], list[str]]:
    """Files of an image folder: ``root/<class>/<img>`` or flat ``root/<img>`` (labels -1), and the class folder
    names (sorted; [] for a flat folder).

    Labels index the sorted class folder names, or ``classes`` when given (another split's list, so that both
    number a class alike); a class folder of images missing from ``classes`` raises :class:`DataError`, and a
    flat folder ignores ``classes``. Raises :class:`DataError` for a missing folder, one holding no image files,
    and one holding image files both directly and in class sub-folders (the loose files would hide the classes).
    """
    _check_dir(root)
    flat = [e for e in sorted(os.listdir(root)) if _is_image(e) and os.path.isfile(os.path.join(root, e))]
    found = _sub_folders(root)
    if flat:
        filled = [cls for cls in found if next(_images_under(os.path.join(root, cls)), None) is not None]
        if filled:
            raise DataError(f"data folder {root!r} holds {len(flat)} image file(s) directly and {len(filled)} class "
                            f"folder(s) of images; put the images in class folders or remove them (first loose "
                            f"file: {flat[0]!r})")
        return [(os.path.join(root, f), -1) for f in flat], []
    samples = _labelled(root, {cls: list(_images_under(os.path.join(root, cls))) for cls in found}, classes)
    if not samples:
        raise DataError(f"data folder {root!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)}), neither "
                        "directly nor in class sub-folders")
    return samples, found


def _frames_in(path: str) -> list[str]:
    """The frame files of a clip folder in frame order."""
    return [os.path.join(path, f) for f in sorted((f for f in os.listdir(path) if _is_image(f)), key=_natural_key)]


def _clips_in(folder: str) -> list[str]:
    out = []
    for e in sorted(os.listdir(folder)):
        p = os.path.join(folder, e)
        if e.startswith("."):  # hidden entries (macOS's ._clip.npy) are never clips
            continue
        if e.lower().endswith(".npy") and os.path.isfile(p):
            out.append(p)
        elif os.path.isdir(p) and _frames_in(p):
            out.append(p)
    return out


def scan_video_folder(root: str, classes: Optional[Sequence[str]] = None) -> tuple[list[tuple[str, int]], list[str]]:
    """Clips of a video folder: each clip is a ``.npy`` array [T, H, W(, C)] or a folder of frame images, either
    directly in ``root`` (labels -1) or in class sub-folders ``root/<class>/<clip>``; and the class folder names.

    ``classes`` and the errors are as for :func:`scan_image_folder`: clips both directly in ``root`` and in
    class folders raise :class:`DataError`.
    """
    _check_dir(root)
    flat = _clips_in(root)
    if flat:
        flat_set = set(flat)
        filled = [cls for cls in _sub_folders(root)
                  if os.path.join(root, cls) not in flat_set and _clips_in(os.path.join(root, cls))]
        if filled:
            raise DataError(f"video folder {root!r} holds {len(flat)} clip(s) directly and {len(filled)} class "
                            f"folder(s) of clips; put the clips in class folders or remove them (first loose "
                            f"clip: {os.path.basename(flat[0])!r})")
        return [(p, -1) for p in flat], []
    found = _sub_folders(root)
    samples = _labelled(root, {cls: _clips_in(os.path.join(root, cls)) for cls in found}, classes)
    if not samples:
        raise DataError(f"video folder {root!r} holds no clips (.npy arrays or folders of frames), neither "
                        "directly nor in class sub-folders")
    return samples, found


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
    """Images decoded with Pillow (in DataLoader workers) and transformed with :class:`ImageTransform`.

    ``classes``: the class names labels index, e.g. the training split's ``classes`` for a held-out split, so a
    class missing from one split does not renumber the others (see :func:`scan_image_folder`). The attribute
    ``classes`` holds this folder's own class folder names ([] for a flat folder).
    """

    def __init__(self, root: str, transform: ImageTransform, seed: int = 0, *,
                 classes: Optional[Sequence[str]] = None) -> None:
        self.root = root
        self.samples, self.classes = scan_image_folder(root, classes)
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
        except READ_ERRORS as e:
            return Unreadable(path, f"{type(e).__name__}: {e}")
        return x, label, index


def _clip_array(path: str) -> np.ndarray:
    """The memory-mapped array of a ``.npy`` clip, after checking it is a clip of a dtype the loader can scale;
    anything else raises ValueError, which makes the clip unreadable rather than failing in Pillow."""
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    if not (arr.ndim == 3 or (arr.ndim == 4 and arr.shape[-1] in (1, 3, 4))):
        raise ValueError(f"a clip array must be [T, H, W] or [T, H, W, C] with C = 1, 3 or 4, got shape {arr.shape}")
    if arr.shape[1] == 0 or arr.shape[2] == 0:
        raise ValueError(f"a clip array's frames must not be empty, got shape {arr.shape}")
    # wider integers have no agreed range (an int64 array may hold 8-bit or 16-bit values), so they are refused
    if not (arr.dtype.kind in "bf" or (arr.dtype.kind in "iu" and arr.dtype.itemsize <= 2)):
        raise ValueError(f"a clip array must hold uint8 (0-255), 16-bit integers (scaled by their range) or "
                         f"floats in [0, 1], got {arr.dtype}")
    return arr


def _load_clip_frames(path: str, frame_ids: Sequence[int]) -> list[Image.Image]:
    if os.path.isdir(path):
        files = _frames_in(path)
        out = []
        for i in frame_ids:
            with Image.open(files[i]) as img:
                img.load()
                out.append(img.copy())
        if len({f.size for f in out}) > 1:  # e.g. a class folder of unrelated images taken for a clip
            raise ValueError(f"the frames of one clip differ in size: {sorted({f.size for f in out})}")
        return out
    frames = np.asarray(_clip_array(path)[list(frame_ids)])
    if frames.dtype.kind in "iu" and frames.dtype != np.uint8:
        # by the dtype's range, as transforms.to_8bit scales 16-bit images: v -> round(v / 65535 * 255)
        top = float(np.iinfo(frames.dtype).max)
        frames = (np.clip(frames.astype(np.float64), 0.0, top) * (255.0 / top) + 0.5).astype(np.uint8)
    elif frames.dtype != np.uint8:
        frames = (np.clip(frames.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if frames.ndim == 4 and frames.shape[-1] == 1:
        frames = frames[..., 0]
    return [Image.fromarray(f) for f in frames]


def _num_frames(path: str) -> int:
    if os.path.isdir(path):
        return len(_frames_in(path))
    return int(_clip_array(path).shape[0])


def clip_frame_ids(total: int, num_frames: int, stride: int, rng: Optional[random.Random]) -> list[int]:
    """VideoMAE's frame sampling (its TSN-style loader, one segment, no temporal jitter): the clip reserves
    ``num_frames * stride`` frames and starts uniformly where that span fits (``rng``), centred there (``None``),
    or at frame 0 when it does not fit; then ``num_frames`` frames ``stride`` apart, each step taken only while it
    lands before the last frame, so a short clip repeats the last frame on its stride."""
    room = total - num_frames * stride
    start = 0 if room < 0 else (rng.randint(0, room) if rng is not None else room // 2)
    ids, pos = [], start
    for _ in range(num_frames):
        ids.append(pos)
        if pos + stride < total - 1:
            pos += stride
    return ids


class VideoFolder:
    """Clips of ``num_frames`` frames sampled ``stride`` apart (VideoMAE's temporal sampling), each clip one
    crop and one flip (:class:`ClipTransform`): items are [C, T, size, size]. ``classes`` and the attribute
    ``classes`` are as for :class:`ImageFolder`."""

    def __init__(self, root: str, transform: ClipTransform, num_frames: int, stride: int, seed: int = 0, *,
                 classes: Optional[Sequence[str]] = None) -> None:
        self.root = root
        self.samples, self.classes = scan_video_folder(root, classes)
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
        except (*READ_ERRORS, IndexError) as e:
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
