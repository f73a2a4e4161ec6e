"""PNG figures people look at instead of reading numbers: mask overlays, captioned grids (PIL + numpy only)
and training curves (a bare matplotlib Figure on the Agg canvas: head-less, no pyplot global state).

Conventions for every helper here: grey images are float arrays in [0, 1] (what `preprocess_pair` returns),
colour images are uint8 (H, W, 3), colours are RGB tuples, and files are written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from .io import atomic_path

# One colour per tumour class (Figshare label ids) and for "the mask", shared by all figures.
CLASS_COLORS = {0: (255, 255, 0), 1: (255, 140, 0), 2: (255, 60, 60), 3: (60, 160, 255)}
MASK_COLOR = (255, 60, 60)
PREDICTION_COLOR = (60, 220, 60)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 3) grey/colour image -> uint8 (H, W, 3). Floats are taken as [0, 1] and clipped;
    a (1, H, W) or (3, H, W) channel-first array is accepted as well."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
        image = np.moveaxis(image, 0, -1)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.dtype != np.uint8:
        image = np.rint(np.clip(np.nan_to_num(image.astype(np.float32)), 0.0, 1.0) * 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W) or (H, W, 3) image, got shape {image.shape}")
    return image


def outline(mask: np.ndarray) -> np.ndarray:
    """The mask's boundary pixels (inside the mask, next to the outside): a 1-pixel contour."""
    mask = np.asarray(mask, dtype=bool)
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def overlay(image: np.ndarray, mask: np.ndarray, color: Sequence[int] = MASK_COLOR, alpha: float = 0.3,
            contour: bool = True) -> np.ndarray:
    """Grey or RGB image with the mask tinted translucently in `color` and, by default, outlined in it.

    Returns uint8 (H, W, 3). Apply it again with another colour to compare two masks on one image.
    """
    rgb = to_rgb(image).astype(np.float32)
    mask = np.asarray(mask).astype(bool)
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {rgb.shape[:2]}")
    color = np.asarray(color, dtype=np.float32)
    rgb[mask] = (1 - alpha) * rgb[mask] + alpha * color
    if contour:
        rgb[outline(mask)] = color
    return np.rint(rgb).astype(np.uint8)


def grid_image(tiles: Sequence[np.ndarray], ncols: int, titles: Sequence[str] | None = None, pad: int = 4,
               background: Sequence[int] = (16, 16, 16), text_color: Sequence[int] = (230, 230, 230),
               font_size: int = 12) -> Image.Image:
    """Tiles (grey or RGB arrays, any sizes) in rows of `ncols`, each under an optional one-line caption."""
    if not tiles:
        raise ValueError("no tiles to arrange")
    if titles is not None and len(titles) != len(tiles):
        raise ValueError(f"{len(titles)} titles for {len(tiles)} tiles")
    rgb = [to_rgb(t) for t in tiles]
    cell_h = max(t.shape[0] for t in rgb)
    cell_w = max(t.shape[1] for t in rgb)
    font = ImageFont.load_default(size=font_size)
    caption_h = font_size + 4 if titles is not None else 0
    ncols = max(1, min(ncols, len(rgb)))
    nrows = -(-len(rgb) // ncols)
    canvas = Image.new("RGB", (ncols * (cell_w + pad) + pad, nrows * (cell_h + caption_h + pad) + pad),
                       tuple(background))
    draw = ImageDraw.Draw(canvas)
    for i, tile in enumerate(rgb):
        left = pad + (i % ncols) * (cell_w + pad)
        top = pad + (i // ncols) * (cell_h + caption_h + pad)
        if titles is not None:
            draw.text((left + 2, top + 1), str(titles[i]), fill=tuple(text_color), font=font)
        canvas.paste(Image.fromarray(tile), (left, top + caption_h))
    return canvas


def save_grid(tiles: Sequence[np.ndarray], path: str | Path, ncols: int, titles: Sequence[str] | None = None,
              **kwargs) -> Path:
    """Write `grid_image(tiles, ncols, titles, **kwargs)` as a PNG (atomically) and return the path."""
    return save_png(grid_image(tiles, ncols, titles, **kwargs), path)


def save_png(image: Image.Image | np.ndarray, path: str | Path) -> Path:
    """Write a PIL image or an array (see `to_rgb`) as an optimised PNG, atomically."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(to_rgb(image))
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", optimize=True)
    return path


def plot_curves(series: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, xlabel: str,
                ylabel: str, title: str = "") -> Path:
    """Line plot of named (x, y) series, e.g. train/val loss per epoch."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and touches no global pyplot state

    many = len(series) > 4  # a legend that would cover the lines goes to the right of the plot
    fig = Figure(figsize=(8 if many else 5, 3.5), dpi=120)
    ax = fig.add_subplot()
    for name, (x, y) in series.items():
        ax.plot(x, y, marker="o", markersize=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if many:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
    else:
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def plot_bars(panels: dict[str, tuple[Sequence[str], dict[str, Sequence[float]]]], path: str | Path,
              ylabel: str = "share of slices", title: str = "") -> Path:
    """Grouped bar charts side by side, one per panel: {panel title: (category names, {series: values})},
    e.g. histograms of synthetic vs real data."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(panels), 3.6), dpi=110)
    for k, (panel, (categories, series)) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), k + 1)
        width = 0.8 / max(1, len(series))
        positions = np.arange(len(categories))
        for j, (name, values) in enumerate(series.items()):
            ax.bar(positions + (j - (len(series) - 1) / 2) * width, values, width, label=name)
        ax.set_xticks(positions, list(categories), rotation=45, ha="right", fontsize=7)
        ax.set_title(panel, fontsize=9)
        ax.set_ylabel(ylabel if k == 0 else "")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)
