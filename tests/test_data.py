"""Data sets, transforms and sampling of the training engine."""

import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mimfast.data import (
    ClipTransform,
    DataError,
    DigitsDemo,
    EpochBatchSampler,
    ImageFolder,
    ImageTransform,
    Unreadable,
    VideoFolder,
    collate,
    make_loader,
    scan_image_folder,
    scan_video_folder,
)
from mimfast.data.datasets import clip_frame_ids, sample_rng
from mimfast.data.transforms import center_crop_box, multiscale_crop_box, pil_to_tensor, random_resized_crop_box

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_images(folder, names, size=(40, 30), seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / name)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_split_the_single_process_batches(world):
    n, B = 103, 4
    single = EpochBatchSampler(n, B * world, seed=5)
    ranks = [EpochBatchSampler(n, B, seed=5, world_size=world, rank=r) for r in range(world)]
    for s in [single, *ranks]:
        s.set_epoch(3)
    per_rank = [list(r) for r in ranks]
    assert len(single) == n // (B * world) == len(per_rank[0])
    for step, keys in enumerate(single):
        union = sorted(k for r in per_rank for k in r[step])
        assert union == sorted(keys)
        assert all(e == 3 for e, _ in keys)
    seen = [i for keys in single for _, i in keys]
    assert len(set(seen)) == len(seen)  # no sample twice in an epoch


def test_sampler_epochs_differ_and_resume_mid_epoch():
    s = EpochBatchSampler(50, 5, seed=1)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert [i for _, i in e0[0]] != [i for _, i in e1[0]]
    s.set_epoch(0, start_step=4)
    assert list(s) == e0[4:]
    s.set_epoch(0)
    assert list(s) == e0  # deterministic
    ev = EpochBatchSampler(7, 3, shuffle=False)
    assert [[i for _, i in k] for k in ev] == [[0, 1, 2], [3, 4, 5], [6]]
    with pytest.raises(ValueError, match="rank"):
        EpochBatchSampler(10, 2, world_size=2, rank=2)


def test_random_resized_crop_box_in_bounds_and_seeded():
    for trial in range(200):
        rng = random.Random(trial)
        w, h = rng.randint(1, 300), rng.randint(1, 300)
        box = random_resized_crop_box(w, h, rng)
        assert 0 <= box.left and box.left + box.width <= w and box.width > 0
        assert 0 <= box.top and box.top + box.height <= h and box.height > 0
    a = random_resized_crop_box(500, 400, random.Random(3))
    assert a == random_resized_crop_box(500, 400, random.Random(3))
    # large crops in the (0.2, 1) area range on a big image
    areas = [(lambda b: b.width * b.height / 250000)(random_resized_crop_box(500, 500, random.Random(i)))
             for i in range(300)]
    assert 0.19 <= min(areas) and max(areas) <= 1.0 and 0.5 < np.mean(areas) < 0.7
    assert center_crop_box(50, 30) == type(a)(10, 0, 30, 30)


def test_multiscale_crop_box_takes_videomae_sizes_and_places():
    # 320 x 240 frames to 224: sides int(240 * f) for f in (1, .875, .75, .66) = 240, 210, 180, 158, with 224 not
    # within 2 of any; width and height at most one scale apart; 13 places on quarter steps of the free space
    sides = [240, 210, 180, 158]
    seen_sizes, seen_places = set(), set()
    for i in range(3000):
        box = multiscale_crop_box(320, 240, 224, random.Random(i))
        assert sides.index(box.width) - sides.index(box.height) in (-1, 0, 1)
        sw, sh = (320 - box.width) // 4, (240 - box.height) // 4
        assert box.left % max(sw, 1) == 0 and box.top % max(sh, 1) == 0
        assert box.left + box.width <= 320 and box.top + box.height <= 240
        seen_sizes.add((box.width, box.height))
        if sw and sh:  # (a full-height crop has one row of places)
            seen_places.add((box.left // sw, box.top // sh))
    assert len(seen_sizes) == 10  # 4 square pairs + 2 x 3 one-step distortions
    assert seen_places == {(0, 0), (4, 0), (0, 4), (4, 4), (2, 2), (0, 2), (4, 2), (2, 4), (2, 0), (1, 1), (3, 1),
                           (1, 3), (3, 3)}
    # a side within 2 pixels of the output size is snapped to it (and kept inside the image)
    assert {multiscale_crop_box(226, 226, 224, random.Random(i)).width for i in range(200)} >= {224}
    assert all(multiscale_crop_box(223, 300, 224, random.Random(i)).width <= 223 for i in range(200))


def test_method_transforms_follow_their_recipes():
    simmim = ImageTransform.simmim(16)
    assert (simmim.scale, simmim.interpolation, simmim.hflip) == ((0.67, 1.0), "bilinear", True)
    assert (ImageTransform(16).scale, ImageTransform(16).interpolation) == ((0.2, 1.0), "bicubic")
    with pytest.raises(ValueError, match="interpolation"):
        ImageTransform(16, interpolation="nearest")
    # VideoMAE: no flip, so a left-right ramp keeps its direction in every draw
    ramp = Image.fromarray(np.tile(np.arange(0, 250, 5, dtype=np.uint8)[None, :, None], (50, 1, 3)))
    clip = ClipTransform(10, 1, mean=(0.0,), std=(1.0,))
    for i in range(50):
        x = clip([ramp, ramp], random.Random(i))
        assert x.shape == (1, 2, 10, 10) and bool((x[0, :, :, 0] < x[0, :, :, -1]).all())


def test_hidden_files_and_folders_are_never_data(tmp_path):
    # hidden entries anywhere: a cache folder inside a class folder, macOS's ._name companions beside clips and at
    # the root of a class-folder video set (which would otherwise read as loose clips beside the class folders)
    _write_images(tmp_path / "img" / "cat", ["a.png", ".b.png"])
    _write_images(tmp_path / "img" / "cat" / ".thumbnails", ["a.png"])
    _write_images(tmp_path / "img" / "dog", ["d.png"])
    samples, classes = scan_image_folder(str(tmp_path / "img"))
    assert classes == ["cat", "dog"]
    assert sorted(os.path.relpath(p, tmp_path / "img") for p, _ in samples) == ["cat/a.png", "dog/d.png"]
    for cls in ("run", "walk"):
        (tmp_path / "vid" / cls).mkdir(parents=True)
        np.save(tmp_path / "vid" / cls / "a.npy", np.zeros((4, 8, 8, 3), np.uint8))
        (tmp_path / "vid" / cls / "._a.npy").write_bytes(b"\x00\x05\x16\x07" + bytes(100))
    (tmp_path / "vid" / "._run.npy").write_bytes(b"\x00\x05\x16\x07" + bytes(100))
    samples, classes = scan_video_folder(str(tmp_path / "vid"))
    assert classes == ["run", "walk"] and [os.path.basename(p) for p, _ in samples] == ["a.npy", "a.npy"]


def test_transforms_need_a_mean_and_std_per_channel():
    # the ImageNet defaults have three values: a grey transform without its own would return 3 channels
    for make in (ImageTransform, ClipTransform):
        with pytest.raises(ValueError, match="one value per channel"):
            make(8, 1)
        with pytest.raises(ValueError, match="one value per channel"):
            make(8, 3, mean=(0.5,), std=(0.5,))
        assert make(8, 1, mean=(0.5,), std=(0.25,)).channels == 1


def test_multiscale_crop_box_of_a_one_pixel_side_is_not_empty():
    for i in range(50):
        box = multiscale_crop_box(8, 1, 4, random.Random(i))
        assert box.width >= 1 and box.height == 1 and box.left + box.width <= 8


def test_image_transform_shapes_and_normalisation():
    img = Image.fromarray(np.full((30, 50, 3), 255, dtype=np.uint8))
    tf = ImageTransform(16, 3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = tf(img, random.Random(0))
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert torch.allclose(x, torch.full_like(x, 2.0))  # (1 - 0.5) / 0.25
    grey = ImageTransform(8, 1, mean=(0.0,), std=(1.0,), train=False)(img, random.Random(0))
    assert grey.shape == (1, 8, 8)
    # one flip decision per sample: a left-right gradient is reversed in about half the draws
    ramp = Image.fromarray(np.tile(np.arange(0, 250, 5, dtype=np.uint8)[None, :, None], (50, 1, 3)))
    flat = ImageTransform(10, 1, mean=(0.0,), std=(1.0,), scale=(1.0, 1.0))
    flips = sum(float(flat(ramp, random.Random(i))[0, 0, 0]) > 0.5 for i in range(200))
    assert 70 < flips < 130


def test_image_folders_follow_linked_folders_once(tmp_path):
    _write_images(tmp_path / "elsewhere", ["1.png", "2.png", "3.png"])
    _write_images(tmp_path / "data" / "a", ["x.png"])
    (tmp_path / "data" / "b").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "data" / "b" / "linked")
    os.symlink(tmp_path / "data" / "a", tmp_path / "data" / "a" / "loop")  # a link back to its own folder
    os.symlink(tmp_path / "data", tmp_path / "data" / "a" / "up")  # to the data root: class b again, as a
    samples, classes = scan_image_folder(str(tmp_path / "data"))
    assert classes == ["a", "b"]
    assert sorted(label for _, label in samples).count(1) == 3
    assert len([p for p, label in samples if label == 0]) == 1  # the loop is not walked again


def test_a_data_folder_that_cannot_be_listed_is_a_data_error(tmp_path, monkeypatch):
    import mimfast.data.datasets as datasets

    _write_images(tmp_path / "d", ["1.png"])
    listdir = os.listdir

    def denied(path="."):
        if os.path.abspath(path) == str(tmp_path / "d"):
            raise PermissionError(13, "Permission denied", path)
        return listdir(path)

    monkeypatch.setattr(datasets.os, "listdir", denied)
    with pytest.raises(DataError, match="cannot be read"):
        scan_image_folder(str(tmp_path / "d"))


def test_scan_image_folder_layouts(tmp_path):
    _write_images(tmp_path / "cls" / "b", ["1.png", "2.jpg"])
    _write_images(tmp_path / "cls" / "a", ["x.png"])
    (tmp_path / "cls" / "a" / "notes.txt").write_text("not an image")
    samples, classes = scan_image_folder(str(tmp_path / "cls"))
    assert classes == ["a", "b"]
    assert [(p.split("/")[-1], y) for p, y in samples] == [("x.png", 0), ("1.png", 1), ("2.jpg", 1)]
    _write_images(tmp_path / "flat", ["z.png", "y.png"])
    samples, classes = scan_image_folder(str(tmp_path / "flat"))
    assert classes == [] and [y for _, y in samples] == [-1, -1]
    with pytest.raises(DataError, match="does not exist"):
        scan_image_folder(str(tmp_path / "missing"))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match="no image files"):
        scan_image_folder(str(tmp_path / "empty"))


def test_corrupt_images_are_skipped_and_counted_in_workers(tmp_path):
    root = tmp_path / "imgs"
    _write_images(root / "a", [f"{i}.png" for i in range(6)])
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "a" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0")
    data = ImageFolder(str(root), ImageTransform(8, 3), seed=0)
    assert len(data) == 8
    broken = [i for i, (p, _) in enumerate(data.samples) if "broken" in p][0]
    assert isinstance(data[(0, broken)], Unreadable)
    sampler = EpochBatchSampler(len(data), 4, seed=0)
    sampler.set_epoch(0)
    batches = list(make_loader(data, sampler, num_workers=1))
    assert sum(len(b.skipped) for b in batches) == 2
    assert sum(b.images.shape[0] for b in batches) == 6
    assert {p.split("/")[-1] for b in batches for p in b.skipped} == {"broken.png", "truncated.jpg"}
    # the same sample decodes to the same tensor in a worker and here (augmentation seeded per sample)
    first = batches[0]
    i = int(first.indices[0])
    assert torch.equal(first.images[0], data[(0, i)][0])
    all_bad = collate([Unreadable("x", "bad")])
    assert all_bad.images.numel() == 0 and all_bad.skipped == ("x",)


def test_augmentation_depends_on_seed_epoch_index_only(tmp_path):
    _write_images(tmp_path / "d", ["a.png", "b.png"], size=(64, 48))
    data = ImageFolder(str(tmp_path / "d"), ImageTransform(16, 3), seed=3)
    assert torch.equal(data[(2, 1)][0], data[(2, 1)][0])
    assert not torch.equal(data[(2, 1)][0], data[(3, 1)][0])
    assert sample_rng(3, 2, 1).random() == sample_rng(3, 2, 1).random()


def test_video_folder_npy_and_frame_folders(tmp_path):
    root = tmp_path / "videos"
    (root / "walk").mkdir(parents=True)
    np.save(root / "walk" / "clip0.npy", np.random.default_rng(0).integers(0, 256, (9, 20, 24, 3), dtype=np.uint8))
    frames = root / "walk" / "clip1"
    _write_images(frames, [f"{i:03d}.png" for i in range(3)], size=(24, 20))
    (root / "run").mkdir()
    np.save(root / "run" / "bad.npy", np.zeros((2, 3)))  # wrong rank: unreadable
    data = VideoFolder(str(root), ClipTransform(16, 3), num_frames=4, stride=2, seed=0)
    assert data.classes == ["run", "walk"] and len(data) == 3
    labels = {p.split("/")[-1]: y for p, y in data.samples}
    assert labels == {"bad.npy": 0, "clip0.npy": 1, "clip1": 1}
    by_name = {p.split("/")[-1]: i for i, (p, _) in enumerate(data.samples)}
    x, y, _ = data[(0, by_name["clip0.npy"])]
    assert x.shape == (3, 4, 16, 16) and y == 1
    x, _, _ = data[(0, by_name["clip1"])]  # 3 frames, 4 wanted: the last repeats
    assert x.shape == (3, 4, 16, 16)
    assert isinstance(data[(0, by_name["bad.npy"])], Unreadable)
    # VideoMAE's sampling: num_frames x stride frames reserved, steps only while before the last frame
    assert clip_frame_ids(10, 4, 2, None) == [1, 3, 5, 7]  # centred in the 2 free positions
    assert clip_frame_ids(3, 4, 2, None) == [0, 0, 0, 0]  # 0 + 2 is the last frame: no step
    assert clip_frame_ids(30, 16, 4, random.Random(0)) == [0, 4, 8, 12, 16, 20, 24, 28] + [28] * 8
    assert clip_frame_ids(16, 16, 1, None) == list(range(15)) + [14]
    starts = {clip_frame_ids(100, 4, 3, random.Random(i))[0] for i in range(2000)}
    assert starts == set(range(89))  # 100 - 4 * 3 + 1 places
    ids = clip_frame_ids(100, 4, 3, random.Random(0))
    assert np.diff(ids).tolist() == [3, 3, 3]
    (tmp_path / "novideo").mkdir()
    with pytest.raises(DataError, match="no clips"):
        VideoFolder(str(tmp_path / "novideo"), ClipTransform(16), 4, 2)


def test_digits_demo_split():
    train, held = DigitsDemo("train"), DigitsDemo("heldout")
    assert len(train) == 1438 and len(held) == 359
    assert train.images.shape == (1438, 1, 32, 32)
    assert abs(float(train.images.mean())) < 1e-4 and abs(float(train.images.std()) - 1) < 1e-4
    assert torch.bincount(held.labels).tolist() == [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]  # stratified
    assert torch.bincount(held.labels[:20], minlength=10).max() <= 5  # a picture of its first images is varied
    images, labels, idx = held.collate_keys([(0, 3), (0, 7)])
    assert torch.equal(images[1], held.images[7]) and idx.tolist() == [3, 7]


_GROUP_SIGTERM_SCRIPT = """
import os, signal, sys, torch
from mimfast.data.loader import EpochBatchSampler, make_loader

class Pids:
    def __len__(self):
        return 8

    def __getitem__(self, key):
        return torch.tensor([float(os.getpid()), float(os.getpgid(0))]), -1, key[1]

stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))  # what the engine's handler does: note it, go on
batches = iter(make_loader(Pids(), EpochBatchSampler(8, 1, shuffle=False), num_workers=1))
pid, pgid = next(batches).images[0].tolist()
assert int(pid) != os.getpid() and int(pgid) != os.getpgid(0), (pid, pgid)  # a worker, in its own group
print("ready", flush=True)
sys.stdin.readline()  # the test signals this process's group, then writes a line
rest = [int(b.indices[0]) for b in batches]
print("stop" if stop else "no-stop", rest, flush=True)
"""


def test_loader_workers_survive_sigterm_sent_to_the_process_group():
    # torchrun / SLURM signal every process of the group; the worker must keep serving the main process, which
    # stops at the next step by itself (here: a process in a session of its own, so the signal reaches no other)
    proc = subprocess.Popen([sys.executable, "-c", _GROUP_SIGTERM_SCRIPT], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, PYTHONPATH=REPO))
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate("go\n", timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.strip() == "stop [1, 2, 3, 4, 5, 6, 7]", err


def _write_grey(path, value, size=(12, 10)):
    Image.fromarray(np.full((size[1], size[0]), value, dtype=np.uint8)).save(path)


def test_frame_folders_are_read_in_numeric_order(tmp_path):
    clips = {
        "ffmpeg": [f"frame{t}.png" for t in range(12)],  # unpadded %d names: frame0 ... frame11
        # digit runs compare as numbers, the rest as text (case first), and the name breaks ties
        "mixed": ["F2.png", "f1.png", "f02.png", "f2.png", "f10.png", "f.png", "g.png"],
    }
    for clip, names in clips.items():
        (tmp_path / "vids" / clip).mkdir(parents=True)
        for t, name in enumerate(names):
            _write_grey(tmp_path / "vids" / clip / name, 20 * t)
    tf = ClipTransform(8, 1, mean=(0.0,), std=(1.0,), train=False)
    for clip, names in clips.items():
        # all but the last frame: VideoMAE's sampling steps only while before the last frame
        n = len(names) - 1
        data = VideoFolder(str(tmp_path / "vids"), tf, num_frames=n, stride=1)
        x, _, _ = data[(0, [p.split("/")[-1] for p, _ in data.samples].index(clip))]
        levels = [round(float(x[0, t].mean()) * 255) for t in range(n)]
        assert levels == [20 * t for t in range(n)], clip


def test_badly_shaped_clips_and_decompression_bombs_are_unreadable(tmp_path, monkeypatch):
    root = tmp_path / "vids"
    root.mkdir()
    rng = np.random.default_rng(0)
    np.save(root / "chw.npy", rng.integers(0, 256, (4, 3, 16, 20), dtype=np.uint8))  # [T, C, H, W]
    np.save(root / "two_channels.npy", rng.integers(0, 256, (4, 16, 20, 2), dtype=np.uint8))
    np.save(root / "int64.npy", rng.integers(0, 256, (4, 16, 20, 3)))  # no agreed range
    np.save(root / "grey.npy", rng.integers(0, 256, (4, 16, 20), dtype=np.uint8))
    np.save(root / "rgba.npy", rng.integers(0, 256, (4, 16, 20, 4), dtype=np.uint8))
    _write_images(root / "frames", [f"{t}.png" for t in range(4)], size=(20, 16))
    data = VideoFolder(str(root), ClipTransform(8, 3), num_frames=4, stride=1)
    items = {p.split("/")[-1]: data[(0, i)] for i, (p, _) in enumerate(data.samples)}
    for name in ("chw.npy", "two_channels.npy", "int64.npy"):
        assert isinstance(items[name], Unreadable), name
    assert "(4, 3, 16, 20)" in items["chw.npy"].reason and "int64" in items["int64.npy"].reason
    for name in ("grey.npy", "rgba.npy", "frames"):
        assert items[name][0].shape == (3, 4, 8, 8), name
    sampler = EpochBatchSampler(len(data), 3, shuffle=False)
    batches = list(make_loader(data, sampler, num_workers=1))
    assert sum(len(b.skipped) for b in batches) == 3 and sum(b.images.shape[0] for b in batches) == 3

    # a .npy header that does not parse reaches Python's tokenizer (TokenError, not a ValueError)
    header = b"{'descr': '|u1', 'fortran_order': False, 'shape': (4, 16, 20, 3, }"
    header += b" " * ((64 - (10 + len(header) + 1) % 64) % 64) + b"\n"
    (tmp_path / "bad_header").mkdir()
    (tmp_path / "bad_header" / "clip.npy").write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little")
                                                       + header + bytes(4 * 16 * 20 * 3))
    item = VideoFolder(str(tmp_path / "bad_header"), ClipTransform(8, 3), num_frames=4, stride=1)[(0, 0)]
    assert isinstance(item, Unreadable) and "TokenError" in item.reason

    # Pillow refuses images over twice MAX_IMAGE_PIXELS outright
    _write_images(tmp_path / "imgs", ["big.png"], size=(40, 30))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    item = ImageFolder(str(tmp_path / "imgs"), ImageTransform(8, 3))[(0, 0)]
    assert isinstance(item, Unreadable) and "DecompressionBombError" in item.reason
    frames = data.samples.index((str(root / "frames"), -1))
    item = data[(0, frames)]
    assert isinstance(item, Unreadable) and "DecompressionBombError" in item.reason


def test_16_bit_images_and_clips_match_their_8_bit_versions(tmp_path):
    ramp8 = (np.arange(64 * 64) // 16).astype(np.uint8).reshape(64, 64)  # every 8-bit level, 16 pixels each
    ramp16 = ramp8.astype(np.uint16) * 257
    Image.fromarray(ramp8).save(tmp_path / "ramp8.png")
    Image.fromarray(ramp16).save(tmp_path / "ramp16.png")
    with Image.open(tmp_path / "ramp16.png") as img:
        assert img.mode.startswith("I")  # Pillow's 16-bit grey
    grey = ImageTransform(32, 1, mean=(0.0,), std=(1.0,), train=False)
    rgb = ImageTransform(32, 3, mean=(0.0,) * 3, std=(1.0,) * 3, train=False)
    for tf in (grey, rgb):
        data = ImageFolder(str(tmp_path), tf)
        x = {p.split("/")[-1]: data[(0, i)][0] for i, (p, _) in enumerate(data.samples)}
        assert float(x["ramp8.png"].max()) > 0.9 and float(x["ramp8.png"].min()) < 0.1
        assert torch.allclose(x["ramp16.png"], x["ramp8.png"], atol=1 / 255)
    reference = pil_to_tensor(Image.fromarray(ramp8), 1)
    assert torch.allclose(pil_to_tensor(Image.fromarray(ramp16.astype(">u2")), 1), reference, atol=1 / 255)
    assert torch.allclose(pil_to_tensor(Image.fromarray(ramp16.astype(np.int32), "I"), 1), reference, atol=1 / 255)
    # 32-bit float images: [0, 1] (a float TIFF), or [0, 255]
    unit = Image.fromarray(ramp8.astype(np.float32) / 255, "F")
    assert torch.allclose(pil_to_tensor(unit, 1), reference, atol=1 / 255)
    assert torch.allclose(pil_to_tensor(Image.fromarray(ramp8.astype(np.float32), "F"), 3), reference, atol=1 / 255)

    clips = tmp_path / "clips"
    clips.mkdir()
    clip8 = np.repeat(np.repeat(ramp8[None, :, :, None], 3, axis=3), 2, axis=0)  # [2, 64, 64, 3]
    np.save(clips / "u8.npy", clip8)
    np.save(clips / "u16.npy", clip8.astype(np.uint16) * 257)
    np.save(clips / "float.npy", clip8.astype(np.float32) / 255)
    data = VideoFolder(str(clips), ClipTransform(32, 3, mean=(0.0,) * 3, std=(1.0,) * 3, train=False), 2, 1)
    x = {p.split("/")[-1]: data[(0, i)][0] for i, (p, _) in enumerate(data.samples)}
    assert torch.allclose(x["u16.npy"], x["u8.npy"], atol=1 / 255)
    assert torch.allclose(x["float.npy"], x["u8.npy"], atol=1 / 255)


def test_loose_files_beside_class_folders_are_refused(tmp_path):
    _write_images(tmp_path / "imgs" / "a", ["1.png"])
    _write_images(tmp_path / "imgs" / "b", ["2.png"])
    _write_images(tmp_path / "imgs", ["preview.png"])
    with pytest.raises(DataError, match=r"1 image file\(s\) directly and 2 class folder"):
        scan_image_folder(str(tmp_path / "imgs"))
    # a flat folder beside a sub-folder without images is still a flat folder
    _write_images(tmp_path / "flat", ["1.png", "2.png"])
    (tmp_path / "flat" / "notes").mkdir()
    samples, classes = scan_image_folder(str(tmp_path / "flat"))
    assert classes == [] and [y for _, y in samples] == [-1, -1]

    (tmp_path / "vids" / "walk").mkdir(parents=True)
    clip = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "vids" / "walk" / "c.npy", clip)
    np.save(tmp_path / "vids" / "loose.npy", clip)
    with pytest.raises(DataError, match=r"1 clip\(s\) directly and 1 class folder"):
        scan_video_folder(str(tmp_path / "vids"))
    # folders of frames directly in the root are clips, not classes
    _write_images(tmp_path / "flatvids" / "clip0", ["0.png", "1.png"])
    np.save(tmp_path / "flatvids" / "clip1.npy", clip)
    samples, classes = scan_video_folder(str(tmp_path / "flatvids"))
    assert classes == [] and [p.split("/")[-1] for p, _ in samples] == ["clip0", "clip1.npy"]


def test_held_out_labels_follow_the_training_classes(tmp_path):
    for cls in ("cat", "dog", "emu"):
        _write_images(tmp_path / "train" / cls, ["0.png"])
    for cls in ("cat", "emu"):  # no dog in val
        _write_images(tmp_path / "val" / cls, ["0.png"])
    tf = ImageTransform(8, 3, train=False)
    train = ImageFolder(str(tmp_path / "train"), tf)
    assert train.classes == ["cat", "dog", "emu"]
    own = ImageFolder(str(tmp_path / "val"), tf)
    assert [y for _, y in own.samples] == [0, 1]  # numbered on its own, emu would be 1
    val = ImageFolder(str(tmp_path / "val"), tf, classes=train.classes)
    assert val.classes == ["cat", "emu"]
    assert {p.split("/")[-2]: y for p, y in val.samples} == {"cat": 0, "emu": 2}
    assert val[(0, 1)][1] == 2
    _write_images(tmp_path / "val" / "fox", ["0.png"])
    with pytest.raises(DataError, match="'fox'"):
        ImageFolder(str(tmp_path / "val"), tf, classes=train.classes)
    _write_images(tmp_path / "flat", ["0.png"])
    flat = ImageFolder(str(tmp_path / "flat"), tf, classes=train.classes)
    assert flat.classes == [] and flat.samples[0][1] == -1

    clip = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    for split, classes in (("vtrain", ("run", "swim", "walk")), ("vval", ("run", "walk"))):
        for cls in classes:
            (tmp_path / split / cls).mkdir(parents=True)
            np.save(tmp_path / split / cls / "c.npy", clip)
    ctf = ClipTransform(8, 3, train=False)
    vtrain = VideoFolder(str(tmp_path / "vtrain"), ctf, 2, 1)
    vval = VideoFolder(str(tmp_path / "vval"), ctf, 2, 1, classes=vtrain.classes)
    assert vval.classes == ["run", "walk"] and [y for _, y in vval.samples] == [0, 2]
    with pytest.raises(DataError, match="'walk'"):
        VideoFolder(str(tmp_path / "vval"), ctf, 2, 1, classes=["run", "swim"])


def test_training_crop_is_cropped_then_resized_in_the_output_mode():
    # RandomResizedCrop's order: the image as RGB, the crop cut out, the crop alone resized (bicubic); a palette
    # image resamples like its RGB version, not by Pillow's nearest neighbour for palettes
    from mimfast.data.transforms import ImageTransform

    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8))
    palette = rgb.quantize(64)
    tf = ImageTransform(24, 3, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), hflip=False)
    box = random_resized_crop_box(80, 60, random.Random(5))
    expected = pil_to_tensor(rgb.crop(box.as_pil_box()).resize((24, 24), Image.BICUBIC), 3)
    assert torch.equal(tf(rgb, random.Random(5)), expected)
    as_rgb = palette.convert("RGB")
    assert torch.equal(tf(palette, random.Random(5)),
                       pil_to_tensor(as_rgb.crop(box.as_pil_box()).resize((24, 24), Image.BICUBIC), 3))


def test_frame_folders_of_unequal_frames_are_unreadable(tmp_path):
    # a class folder of unrelated photographs is no clip: frames of several sizes are skipped and counted
    _write_images(tmp_path / "vids" / "clip", ["0.png", "2.png"], size=(40, 30))
    _write_images(tmp_path / "vids" / "clip", ["1.png"], size=(30, 40))
    data = VideoFolder(str(tmp_path / "vids"), ClipTransform(8, 3, train=False), num_frames=2, stride=1)
    from mimfast.data.datasets import Unreadable

    item = data[(0, 0)]
    assert isinstance(item, Unreadable) and "differ in size" in item.reason
