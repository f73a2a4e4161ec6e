"""Regions for lesion inpainting (diffusion `mode: inpaint`): the head and brain of a slice, the region around a
lesion, crop windows, and a real lesion mask moved somewhere else inside the brain.

A *region* is the part of a slice an inpainting model repaints; everything outside it stays the real slice's.
Around a lesion it is the lesion grown by a disc of `margin` px, so the model also paints the lesion's boundary
into the tissue around it. The *head* is what a threshold keeps of a prepared slice (normalised to [0, 1], the
background near 0), holes filled, largest component. It includes skull and scalp, so the *brain* is the head with
a rim of BRAIN_INSET of the side peeled off; a placed lesion's whole region, not only the lesion, must lie inside
the brain, so the lesion sits at least `margin` px inside it and never on the skull or outside the head.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torchvision import tv_tensors
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

HEAD_THRESHOLD = 0.1  # prepared intensity above which a pixel is head (air is ~0 after the percentile scaling)
BRAIN_INSET = 0.06  # share of the side peeled off the head's edge for the brain: skull and scalp, no lesion there
PLACEMENT_TRIES = 50  # draws per placed lesion before its slice is skipped
PLACEMENT_SCALE = (0.75, 1.25)  # a placed lesion is zoomed by U(low, high) about its centre ...
PLACEMENT_TURN = 180.0  # ... and turned by U(-turn, turn) degrees (a lesion has no upright orientation)


def head_mask(image: np.ndarray, threshold: float = HEAD_THRESHOLD) -> np.ndarray:
    """(H, W) bool head of a slice (H, W) or (C, H, W) in [0, 1]: the channel mean above `threshold`, holes
    filled, largest connected component only (specks of noise in the air are not head)."""
    grey = np.asarray(image, np.float32)
    grey = grey.mean(0) if grey.ndim == 3 else grey
    filled = ndimage.binary_fill_holes(grey > threshold)
    labels, count = ndimage.label(filled)
    if count <= 1:
        return filled
    return labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))


def brain_mask(image: np.ndarray) -> np.ndarray:
    """(H, W) bool: `head_mask` less a rim of BRAIN_INSET of the side (a disc erosion; at least 1 px)."""
    head = head_mask(image)
    inset = max(1, round(BRAIN_INSET * head.shape[-1]))
    return ~dilate(torch.from_numpy(~head), inset).numpy()


def dilate(masks: torch.Tensor, margin: int) -> torch.Tensor:
    """0/1 masks (..., H, W) grown by a disc of radius `margin` px (0: unchanged), as bool of the same shape."""
    masks = torch.as_tensor(masks)
    if margin == 0:
        return masks > 0
    r = torch.arange(-margin, margin + 1, device=masks.device)
    disc = ((r[:, None] ** 2 + r[None] ** 2) <= margin**2).float()[None, None]
    flat = (masks > 0).float().reshape(-1, 1, *masks.shape[-2:])
    return (F.conv2d(flat, disc, padding=margin) > 0.5).reshape(masks.shape)


def bounding_box(region: torch.Tensor) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), inclusive, of the True pixels of a non-empty (H, W) region."""
    rows, cols = torch.nonzero(torch.as_tensor(region), as_tuple=True)
    return int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())


def window_start(low: int, high: int, crop: int, size: int, position: float) -> int:
    """Start of a `crop`-wide window along an axis of `size` px that holds the span low..high (inclusive): of the
    starts that do, `position` in [0, 1] picks one (0.5: the span centred). A span longer than the crop gets a
    window over its centre; the window always lies inside the axis."""
    first, last = max(0, high - crop + 1), min(low, size - crop)
    if first > last:
        return min(max(0, (low + high + 1) // 2 - crop // 2), size - crop)
    return first + int(round(position * (last - first)))


def ellipse(size: int, centre: tuple[float, float], axes: tuple[float, float], angle: float) -> torch.Tensor:
    """(size, size) bool ellipse around `centre` (row, col) with semi-axes `axes` (px) turned by `angle` (rad)."""
    rows, cols = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                                indexing="ij")
    dy, dx = rows - centre[0], cols - centre[1]
    c, s = float(np.cos(angle)), float(np.sin(angle))
    return ((dx * c + dy * s) / axes[1]) ** 2 + ((dy * c - dx * s) / axes[0]) ** 2 <= 1


def place_lesion(lesion: torch.Tensor, inside: torch.Tensor, keep_clear: torch.Tensor, margin: int, window: int,
                 generator: torch.Generator, tries: int = PLACEMENT_TRIES) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A non-empty (H, W) 0/1 `lesion` turned by PLACEMENT_TURN, zoomed by PLACEMENT_SCALE about its centre
    (nearest, so it stays 0/1) and moved onto a random pixel of `inside` (the brain). A draw is kept when its
    region (the moved lesion grown by `margin`) lies inside `inside`, off the image border (so no part of the
    lesion was cut off), inside a `window`-wide square (the model's crop) and clear of `keep_clear` (the slice's
    own tumour). Returns (moved lesion uint8, region bool), or None when `tries` draws all fail."""
    lesion, inside, keep_clear = (torch.as_tensor(a) for a in (lesion, inside, keep_clear))
    rows, cols = torch.nonzero(lesion, as_tuple=True)
    centre = (float(cols.float().mean()), float(rows.float().mean()))  # (x, y), as torchvision wants it
    targets = torch.nonzero(inside)
    if not len(targets):
        return None
    mask = tv_tensors.Mask(lesion[None].to(torch.uint8))
    for _ in range(tries):
        turn, zoom = torch.rand(2, generator=generator).tolist()
        low, high = PLACEMENT_SCALE
        target = targets[int(torch.randint(len(targets), (1,), generator=generator))]
        moved = TF.affine(mask, angle=PLACEMENT_TURN * (2 * turn - 1), scale=low + zoom * (high - low),
                          translate=[round(float(target[1]) - centre[0]), round(float(target[0]) - centre[1])],
                          shear=[0.0, 0.0], interpolation=InterpolationMode.NEAREST, center=list(centre))
        moved = moved.as_subclass(torch.Tensor)[0]
        if not moved.any():
            continue
        region = dilate(moved, margin)
        top, bottom, left, right = bounding_box(region)
        inside_image = 0 < top and bottom < region.shape[0] - 1 and 0 < left and right < region.shape[1] - 1
        if (bottom - top < window and right - left < window and inside_image
                and not (region & ~inside).any() and not (region & (keep_clear > 0)).any()):
            return moved.to(torch.uint8), region
    return None
