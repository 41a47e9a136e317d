"""Pictures people would rather look at than read: image grids with captions, and metric curves."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

__all__ = ["save_image_grid", "save_curves"]


def save_image_grid(
    images: torch.Tensor,
    path: str | os.PathLike,
    captions: Sequence[str] | None = None,
    ncols: int | None = None,
    min_cell: int = 192,
) -> str:
    """Save ``[B, 3, H, W]`` float images in ``[0, 1]`` as one PNG grid, a caption under each image.

    Small images are upscaled (nearest) to at least ``min_cell`` pixels wide so they can be seen.
    """
    from PIL import Image, ImageDraw, ImageFont

    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    batch, _, height, width = images.shape
    if captions is not None and len(captions) != batch:
        raise ValueError(f"got {len(captions)} captions for {batch} images")
    scale = max(1, math.ceil(min_cell / width))
    cell_w, cell_h = width * scale, height * scale
    caption_h = 16 * (1 + max((c.count("\n") for c in captions), default=0)) if captions else 0
    ncols = ncols or min(batch, 8)
    nrows = math.ceil(batch / ncols)
    grid = Image.new("RGB", (ncols * cell_w, nrows * (cell_h + caption_h)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i in range(batch):
        r, c = divmod(i, ncols)
        tile = Image.fromarray(pixels[i]).resize((cell_w, cell_h), Image.NEAREST)
        x0, y0 = c * cell_w, r * (cell_h + caption_h)
        grid.paste(tile, (x0, y0))
        if captions:
            draw.text((x0 + 3, y0 + cell_h + 1), captions[i], fill="black", font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.save(path)
    return str(path)


def save_curves(
    series: dict[str, Sequence[float]],
    path: str | os.PathLike,
    title: str = "",
    xlabel: str = "step",
    bands: dict[str, Sequence[float]] | None = None,
    steps: Sequence[int] | None = None,
) -> str:
    """Plot one or more named series against ``steps`` (default: 1, 2, ...) and save a PNG; ``bands`` adds a ±std
    shade."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    for name, values in series.items():
        xs = list(steps) if steps is not None else list(range(1, len(values) + 1))
        ax.plot(xs, values, marker="o", markersize=3, label=name)
        if bands and name in bands:
            lo = [v - s for v, s in zip(values, bands[name])]
            hi = [v + s for v, s in zip(values, bands[name])]
            ax.fill_between(xs, lo, hi, alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return str(path)
