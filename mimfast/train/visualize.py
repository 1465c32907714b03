"""The pictures of a run: ``loss_curve.png`` and ``reconstructions.png`` (matplotlib, Agg backend)."""

from __future__ import annotations

import textwrap
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["save_loss_curve", "save_reconstructions", "MASK_COLOR", "DPI"]

DPI = 100
# Masked patches are painted in a muted blue that no grey-scale digit and few photos contain.
MASK_COLOR = (0.35, 0.42, 0.62)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_loss_curve(records: Sequence[dict[str, Any]], path: str, title: str = "") -> tuple[int, int]:
    """Training loss (and learning rate, right axis) against the optimizer step, and below it the mask ratio when
    the records log one (a progressive schedule); returns the PNG size (width, height) in pixels."""
    plt = _pyplot()
    width, height = 6.4, 4.0
    steps = [r["step"] for r in records if "loss" in r]
    ratios = [r.get("mask_ratio", float("nan")) for r in records if "loss" in r]
    if any(np.isfinite(ratios)):
        fig, (ax, ax_ratio) = plt.subplots(2, 1, figsize=(width, height), dpi=DPI, sharex=True,
                                           gridspec_kw={"height_ratios": (3, 1)})
        ax_ratio.plot(steps, ratios, color="tab:green")
        ax_ratio.set_ylabel("mask ratio", color="tab:green")
        ax_ratio.set_xlabel("optimizer step")
        ax_ratio.grid(alpha=0.3)
    else:
        fig, ax = plt.subplots(figsize=(width, height), dpi=DPI)
        ax.set_xlabel("optimizer step")
    # a window without a readable image logs no loss: a gap in the curve; a point with no neighbour to draw a line
    # to gets a marker to be seen
    curve = [r["loss"] if r["loss"] is not None else float("nan") for r in records if "loss" in r]
    ax.plot(steps, curve, color="tab:blue", label="train loss")
    finite = [bool(np.isfinite(v)) for v in curve]
    lone = [i for i, ok in enumerate(finite)
            if ok and not (i > 0 and finite[i - 1]) and not (i + 1 < len(finite) and finite[i + 1])]
    if lone:
        ax.plot([steps[i] for i in lone], [curve[i] for i in lone], "o", color="tab:blue", markersize=3)
    losses = [v for v in curve if np.isfinite(v)]
    if losses and min(losses) > 0 and max(losses) / min(losses) > 5:
        ax.set_yscale("log")  # the first steps would otherwise flatten the rest of the curve
    ax.set_ylabel("loss", color="tab:blue")
    ax.grid(alpha=0.3)
    if any("lr" in r for r in records):
        ax2 = ax.twinx()
        ax2.plot(steps, [r.get("lr", float("nan")) for r in records if "loss" in r], color="tab:orange",
                 alpha=0.6, label="learning rate")
        ax2.set_ylabel("learning rate", color="tab:orange")
    ax.set_title(title or "training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return int(round(width * DPI)), int(round(height * DPI))


def _to_rgb(img: torch.Tensor) -> np.ndarray:
    """[C, H, W] in [0, 1] -> [H, W, 3]."""
    x = img.detach().float().clamp(0, 1).cpu()
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return x.permute(1, 2, 0).numpy()


def save_reconstructions(original: torch.Tensor, masked_pixels: torch.Tensor, reconstruction: torch.Tensor,
                         path: str, title: str = "", column_labels: Sequence[str] = ()) -> tuple[int, int]:
    """A 3-row grid, one column per image: original | masked input | reconstruction (visible patches pasted back).

    original, reconstruction: [n, C, H, W] pixels in [0, 1] (C = 1 or 3); masked_pixels: [n, H, W] bool, True
    where the model saw nothing. Returns the PNG size (width, height) in pixels.
    """
    plt = _pyplot()
    n = original.shape[0]
    cell, label_w = 1.3, 1.0
    width = label_w + cell * n
    # the title wrapped to the figure's width (about 13 characters an inch at 9 points), each line 0.17 inch
    lines = textwrap.wrap(title, max(20, int(width * 13))) if title else []
    title = "\n".join(lines)
    title_h = 0.33 + 0.17 * max(1, len(lines))
    height = title_h + cell * 3
    fig, axes = plt.subplots(3, n, figsize=(width, height), dpi=DPI, squeeze=False)
    color = torch.tensor(MASK_COLOR).view(3, 1, 1)
    rows = ("original", "masked input", "reconstruction")
    for j in range(n):
        rgb = torch.from_numpy(_to_rgb(original[j])).permute(2, 0, 1)
        masked = torch.where(masked_pixels[j].cpu().unsqueeze(0), color, rgb)
        for i, img in enumerate((original[j], masked, reconstruction[j])):
            ax = axes[i][j]
            ax.imshow(_to_rgb(img), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(rows[i], fontsize=9)
            if i == 0 and j < len(column_labels):
                ax.set_title(column_labels[j], fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=label_w / width, right=0.99, bottom=0.02, top=1 - title_h / height,
                        wspace=0.05, hspace=0.08)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return int(round(width * DPI)), int(round(height * DPI))
