"""Data for the training engine: the embedded demo digits, image and video folders, synthetic tensors, the
MAE augmentation recipe (PIL + torch, no torchvision), and rank-aware, resumable batch sampling."""

from mimfast.data.datasets import (
    DataError,
    DigitsDemo,
    ImageFolder,
    SyntheticData,
    Unreadable,
    VideoFolder,
    scan_image_folder,
    scan_video_folder,
)
from mimfast.data.loader import Batch, EpochBatchSampler, collate, make_loader
from mimfast.data.transforms import IMAGENET_MEAN, IMAGENET_STD, ClipTransform, ImageTransform

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Batch",
    "ClipTransform",
    "DataError",
    "DigitsDemo",
    "EpochBatchSampler",
    "ImageFolder",
    "ImageTransform",
    "SyntheticData",
    "Unreadable",
    "VideoFolder",
    "collate",
    "make_loader",
    "scan_image_folder",
    "scan_video_folder",
]
