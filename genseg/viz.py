"""PNG figures people look at instead of reading numbers: mask overlays, captioned grids (PIL + numpy only)
and training curves (a bare matplotlib Figure on the Agg canvas: head-less, no pyplot global state).

Conventions for every helper here: grey images are float arrays in [0, 1] (what `preprocess_pair` returns),
colour images are uint8 (H, W, 3), colours are RGB tuples, and files are written atomically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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
CAPTION_MARGIN = 2  # pixels between a caption and its cell's sides


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


@dataclass(frozen=True)
class GridLayout:
    """Where `grid_image` puts things: the canvas size, each tile's top-left corner, each caption's wrapped lines
    (top-left corner, text) and the box its ink covers (left, top, right, bottom; None without a caption)."""

    size: tuple[int, int]
    tiles: list[tuple[int, int]]
    lines: list[list[tuple[tuple[int, int], str]]]
    caption_boxes: list[tuple[int, int, int, int] | None]


def grid_layout(shapes: Sequence[tuple[int, int]], ncols: int, titles: Sequence[str] | None = None, pad: int = 4,
                font_size: int = 12) -> GridLayout:
    """Cells for tiles of (height, width) `shapes` in rows of `ncols`, each caption word-wrapped to its cell.

    Every caption gets as many lines as the longest needs, so captions never run into each other, a tile or the
    edge at any number of tiles or tile size; a cell is widened only when a single word is wider than the tile.
    """
    if not shapes:
        raise ValueError("no tiles to arrange")
    if titles is not None and len(titles) != len(shapes):
        raise ValueError(f"{len(titles)} titles for {len(shapes)} tiles")
    font = _font(font_size)
    cell_h = max(h for h, _ in shapes)
    cell_w = max(w for _, w in shapes)
    words = [str(t).split() for t in titles] if titles is not None else []
    cell_w = max([cell_w] + [math.ceil(font.getlength(w)) + 2 * CAPTION_MARGIN for ws in words for w in ws])
    wrapped = [_wrap(ws, font, cell_w - 2 * CAPTION_MARGIN) for ws in words]
    line_h = font_size + 4
    caption_h = line_h * max((len(w) for w in wrapped), default=0) if titles is not None else 0
    ncols = max(1, min(ncols, len(shapes)))
    nrows = -(-len(shapes) // ncols)
    size = (ncols * (cell_w + pad) + pad, nrows * (cell_h + caption_h + pad) + pad)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    tiles, lines, boxes = [], [], []
    for i, (h, w) in enumerate(shapes):
        left = pad + (i % ncols) * (cell_w + pad)
        top = pad + (i // ncols) * (cell_h + caption_h + pad)
        tiles.append((left + (cell_w - w) // 2, top + caption_h))
        placed = [((left + CAPTION_MARGIN, top + 1 + k * line_h), text) for k, text in enumerate(wrapped[i])] \
            if titles is not None else []
        ink = [measure.textbbox(xy, text, font=font) for xy, text in placed if text]
        lines.append(placed)
        boxes.append((min(b[0] for b in ink), min(b[1] for b in ink), max(b[2] for b in ink), max(b[3] for b in ink))
                     if ink else None)
    return GridLayout(size, tiles, lines, boxes)


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _wrap(words: list[str], font, width: float) -> list[str]:
    """Greedy word wrap to lines no wider than `width` (a word wider than that gets a line of its own)."""
    lines: list[str] = []
    for word in words:
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines or [""]


def grid_image(tiles: Sequence[np.ndarray], ncols: int, titles: Sequence[str] | None = None, pad: int = 4,
               background: Sequence[int] = (16, 16, 16), text_color: Sequence[int] = (230, 230, 230),
               font_size: int = 12) -> Image.Image:
    """Tiles (grey or RGB arrays, any sizes) in rows of `ncols`, each under an optional caption (`grid_layout`)."""
    rgb = [to_rgb(t) for t in tiles]
    layout = grid_layout([t.shape[:2] for t in rgb], ncols, titles, pad, font_size)
    canvas = Image.new("RGB", layout.size, tuple(background))
    draw = ImageDraw.Draw(canvas)
    font = _font(font_size)
    for tile, corner, lines in zip(rgb, layout.tiles, layout.lines):
        for xy, text in lines:
            draw.text(xy, text, fill=tuple(text_color), font=font)
        canvas.paste(Image.fromarray(tile), corner)
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
