"""The one record every reader returns, and the per-slice preprocessing shared by prepare, segment and serve."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError

CLASS_NAMES = {-1: "unknown", 0: "none", 1: "meningioma", 2: "glioma", 3: "pituitary"}


@dataclass
class SliceRecord:
    """One 2-D slice as read from any source, before resizing and normalisation.

    image: float32, (H, W) for grey-scale or (C, H, W); scanner units, any range.
    mask: uint8 (H, W), 1 = tumour.
    label: -1 unknown, 0 no tumour, 1 meningioma, 2 glioma, 3 pituitary (or a source's own class ids).
    """

    image: np.ndarray
    mask: np.ndarray
    label: int
    patient: str
    source: str
    slice_index: int = -1

    def check(self) -> "SliceRecord":
        """Raise DataError naming the source when the slice cannot be used: readers call this before returning.

        Catches what `preprocess_pair` would otherwise trip over later, far from the file at fault.
        """
        shape = np.shape(self.image)
        if len(shape) not in (2, 3) or 0 in shape:
            raise DataError(self.source, f"image has shape {shape}, expected (H, W) or (C, H, W)")
        if np.shape(self.mask) != shape[-2:]:
            raise DataError(self.source, f"image shape {shape[-2:]} and mask shape {np.shape(self.mask)} differ")
        if not np.isfinite(self.image).all():
            raise DataError(self.source, "image contains NaN or infinite values")
        low, high = float(np.min(self.image)), float(np.max(self.image))
        if low == high:
            raise DataError(self.source, "image is constant", f"every pixel is {low:g}")
        return self


def sample_slices(tumour: np.ndarray, usable: np.ndarray, empty_fraction: float, seed: int, name: str) -> list[int]:
    """Indices of every usable tumour slice plus a seeded `empty_fraction` of the usable tumour-free ones, in order.

    Which tumour-free slices are kept depends only on `seed` and `name` (a case's), so results do not change with
    the order or number of worker processes.
    """
    tumour = tumour & usable
    empty = np.flatnonzero(usable & ~tumour)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    kept = rng.choice(empty, size=int(round(empty_fraction * len(empty))), replace=False)
    return sorted(np.flatnonzero(tumour).tolist() + kept.tolist())


def normalize_intensity(image: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Robust per-slice min-max: clip to the [low, high] percentiles and map to [0, 1].

    Percentiles are taken over all channels together so colour balance is kept. Raises ValueError on NaN or
    infinite values and on constant images, which carry no information to normalise.
    """
    image = np.asarray(image, dtype=np.float32)
    if not np.isfinite(image).all():
        raise ValueError("image contains NaN or infinite values")
    lo, hi = np.percentile(image, [low, high])
    if hi <= lo:
        lo, hi = float(image.min()), float(image.max())
        if hi <= lo:
            raise ValueError(f"image is constant (every pixel is {lo:g})")
    return np.clip((image - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def resize_pair(image: np.ndarray, mask: np.ndarray | None, size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize to size x size: the image antialiased bilinear, the mask nearest (it stays binary)."""
    img = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    if img.ndim == 2:
        img = img[None]
    if img.shape[-2:] != (size, size):
        img = F.interpolate(img[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    out_mask = None
    if mask is not None:
        m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.uint8))
        if m.shape != (size, size):
            m = F.interpolate(m[None, None].float(), size=(size, size), mode="nearest-exact")[0, 0].to(torch.uint8)
        out_mask = m.numpy()
    return img.numpy(), out_mask


def preprocess_pair(image: np.ndarray, mask: np.ndarray | None, size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The exact transform every model input goes through (prepare, segment, serve): normalise, then resize.

    Returns the image as float32 (C, size, size) in [0, 1] and the mask as uint8 (size, size) or None.
    """
    if mask is not None and np.shape(mask) != np.shape(image)[-2:]:
        raise ValueError(f"image shape {np.shape(image)} and mask shape {np.shape(mask)} differ")
    resized, resized_mask = resize_pair(normalize_intensity(image), mask, size)
    return np.clip(resized, 0.0, 1.0), resized_mask


def preprocess_image(image: np.ndarray, size: int) -> np.ndarray:
    return preprocess_pair(image, None, size)[0]


def check_images(images: np.ndarray | torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """float32 (N, channels, size, size) in [0, 1], or ValueError: what every segmenter's predict accepts."""
    x = torch.as_tensor(images, dtype=torch.float32)
    expected = (channels, size, size)
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
        raise ValueError(f"expected images of shape (N, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("images contain NaN or infinite values")
    if len(x) and (x.min() < -1e-3 or x.max() > 1 + 1e-3):
        raise ValueError(f"images must be preprocessed to [0, 1] (genseg.data.records.preprocess_image), "
                         f"got values in [{x.min():.3g}, {x.max():.3g}]")
    return x

