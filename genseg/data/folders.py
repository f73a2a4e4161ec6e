"""Image + mask folders: the BUSI layout and a generic `images/` + `masks/` layout.

BUSI: `benign/`, `malignant/`, `normal/`, each with `x.png`, its mask `x_mask.png` and sometimes extra masks
`x_mask_1.png`, `x_mask_2.png` that are OR-ed in. Labels come from the folder: normal 0 (no tumour),
benign 1, malignant 2. BUSI publishes no patient ids, so each image counts as its own patient.
Generic: `images/x.png` with `masks/x.png` (same stem, any image suffix); label -1 (unknown), patient = stem.

Images are read as grey (1 channel) by default: BUSI ultrasound is grey even where the PNG is RGB, and the brain
models take one channel. `channels=3` keeps colour. A mask pixel is tumour where any channel is above half the
mask's maximum, so 0/1, 0/255 and 16-bit masks, grey or RGB, all work.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from .decode import MAX_SLICE_PIXELS, read_picture
from .records import SliceRecord

BUSI_CLASSES = {"normal": 0, "benign": 1, "malignant": 2}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_MASK_NAME = re.compile(r"^(?P<base>.+)_mask(?:_\d+)?$")


@dataclass(frozen=True)
class ImagePair:
    """One image and the mask files that together mark its tumour (none found = a bad file)."""

    image: Path
    masks: tuple[Path, ...]
    label: int
    patient: str


def find_layout_root(folder: str | Path) -> tuple[str, Path] | None:
    """('busi' | 'folder', root) for `folder` or one of its direct subfolders (zips often add one level)."""
    folder = Path(folder)
    for root in [folder] + sorted(p for p in folder.iterdir() if p.is_dir()):
        names = {p.name.lower() for p in root.iterdir() if p.is_dir()}
        if names & set(BUSI_CLASSES):
            return "busi", root
        if {"images", "masks"} <= names:
            return "folder", root
    return None


def find_busi_pairs(root: str | Path) -> list[ImagePair]:
    """Every image of the class folders with its masks; a mask without its image becomes a pair to report."""
    pairs = []
    for class_dir in sorted(p for p in Path(root).iterdir() if p.is_dir() and p.name.lower() in BUSI_CLASSES):
        label = BUSI_CLASSES[class_dir.name.lower()]
        images, masks = {}, {}
        for path in sorted(_image_files(class_dir)):
            match = _MASK_NAME.match(path.stem)
            if match:
                masks.setdefault(match["base"], []).append(path)
            else:
                images[path.stem] = path
        for stem in sorted(set(images) | set(masks)):
            image = images.get(stem, class_dir / f"{stem}.png")
            pairs.append(ImagePair(image, tuple(masks.get(stem, ())), label, f"{class_dir.name}/{stem}"))
    return pairs


def find_folder_pairs(root: str | Path) -> list[ImagePair]:
    """`images/x.*` with `masks/x.*`, matched by stem."""
    root = Path(root)
    subdirs = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    masks = {p.stem: p for p in _image_files(subdirs["masks"])}
    return [ImagePair(p, (masks[p.stem],) if p.stem in masks else (), -1, p.stem)
            for p in sorted(_image_files(subdirs["images"]))]


def read_image_pair(pair: ImagePair, channels: int = 1) -> SliceRecord:
    """The image (float32, (H, W) grey or (3, H, W) colour) with the OR of its masks."""
    if not pair.image.exists():
        raise DataError(pair.image, f"missing: mask {pair.masks[0].name} has no image")
    if not pair.masks:
        raise DataError(pair.image, "no mask found for this image")
    image = _read_image(pair.image, channels)
    mask = np.zeros(image.shape[-2:], dtype=bool)
    for path in pair.masks:
        part = _read_mask(path)
        if part.shape != mask.shape:
            raise DataError(path, f"mask is {part.shape[1]}x{part.shape[0]} pixels but image {pair.image.name} "
                                  f"is {mask.shape[1]}x{mask.shape[0]}")
        mask |= part
    return SliceRecord(image, mask.astype(np.uint8), pair.label, pair.patient, str(pair.image)).check()


def _image_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]


def _read_image(path: Path, channels: int) -> np.ndarray:
    image = read_picture(path, path, MAX_SLICE_PIXELS)
    if channels == 3:
        return np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)
    if channels != 1:
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if image.mode not in ("L", "I", "I;16", "F"):  # keep 16-bit and float grey at full depth
        image = image.convert("L")
    return np.asarray(image, dtype=np.float32)


def _read_mask(path: Path) -> np.ndarray:
    image = read_picture(path, path, MAX_SLICE_PIXELS)
    if image.mode in ("P", "PA", "RGBA", "LA", "CMYK", "YCbCr"):  # palette colours and alpha are not tumour
        image = image.convert("RGB")
    mask = np.asarray(image)
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    peak = float(mask.max()) if mask.size else 0.0
    return mask > peak / 2 if peak > 0 else np.zeros(mask.shape, dtype=bool)
