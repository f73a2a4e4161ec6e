"""BraTS case folders: one NIfTI volume per modality plus a segmentation, cut into axial slices.

A case folder holds `<case>_{t1,t1ce,t2,flair,seg}.nii.gz` (or `.nii`). The binary mask is the whole tumour,
seg labels {1, 2, 4}. Every tumour slice is kept, plus a seeded share of tumour-free brain slices (the model
must learn to predict nothing there); slices outside the brain (constant, usually all zero) are skipped.
Slices are shown the way radiologists view axial images, as in the Figshare set: anterior at the top, the
patient's right on the image's left, whatever the orientation stored in the file.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from ..errors import DataError
from .records import SliceRecord

MODALITIES = ("t1", "t1ce", "t2", "flair")
SEG_LABELS = (0, 1, 2, 4)
WHOLE_TUMOUR = (1, 2, 4)
GLIOMA = 2  # every BraTS case is a glioma; tumour-free slices get 0
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def find_brats_cases(folder: str | Path) -> list[Path]:
    """Folders (at any depth) that hold at least one `*_<modality>.nii[.gz]` or `*_seg.nii[.gz]` file."""
    return sorted({p.parent for p in Path(folder).rglob("*.nii*") if _volume_kind(p) is not None})


def read_brats_case(case: str | Path, modality: str = "t1ce", empty_fraction: float = 0.1,
                    seed: int = 0) -> list[SliceRecord]:
    """All tumour slices of one case plus `empty_fraction` of its tumour-free brain slices, in axial order.

    Which tumour-free slices are kept depends only on `seed` and the case name, so results do not change with
    the order or number of worker processes.
    """
    case = Path(case)
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    image_path, seg_path = _find_volume(case, modality), _find_volume(case, "seg")
    image, seg = _load_volume(image_path), _load_volume(seg_path)
    if image.shape != seg.shape:
        raise DataError(seg_path, f"segmentation shape {seg.shape} differs from the {modality} volume's {image.shape}")
    if not np.isfinite(image).all():
        raise DataError(image_path, "volume contains NaN or infinite values")
    unexpected = [f"{v:g}" for v in np.unique(seg).tolist() if v not in SEG_LABELS]
    if unexpected:
        raise DataError(seg_path, f"unexpected segmentation labels {', '.join(unexpected[:5])}; BraTS uses "
                                  f"{', '.join(map(str, SEG_LABELS))}")

    mask = np.isin(seg, WHOLE_TUMOUR)
    brain = image.max(axis=(0, 1)) > image.min(axis=(0, 1))
    tumour = mask.any(axis=(0, 1)) & brain
    empty = np.flatnonzero(brain & ~tumour)
    rng = np.random.default_rng([seed, zlib.crc32(case.name.encode())])
    kept_empty = rng.choice(empty, size=int(round(empty_fraction * len(empty))), replace=False)
    records = []
    for z in sorted(np.flatnonzero(tumour).tolist() + kept_empty.tolist()):
        record = SliceRecord(_radiological(image[:, :, z]), _radiological(mask[:, :, z]).astype(np.uint8),
                             GLIOMA if tumour[z] else 0, case.name, str(image_path), slice_index=int(z))
        records.append(record.check())
    return records


def _radiological(axial: np.ndarray) -> np.ndarray:
    """RAS voxel slice (x right, y anterior) -> rows anterior to posterior, columns patient's right to left."""
    return np.ascontiguousarray(np.flip(axial.T, axis=(0, 1)))


def _volume_kind(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            kind = name[: -len(suffix)].rsplit("_", 1)[-1]
            return kind if kind in MODALITIES + ("seg",) else None
    return None


def _find_volume(case: Path, kind: str) -> Path:
    found = sorted(p for p in case.iterdir() if _volume_kind(p) == kind)
    if len(found) == 1:
        return found[0]
    expected = case / f"{case.name}_{kind}.nii.gz"
    if found:
        raise DataError(expected, f"BraTS case {case.name} has {len(found)} {kind} volumes: "
                                  f"{', '.join(p.name for p in found)}")
    problem = f"BraTS case {case.name} has no {kind} volume (*_{kind}.nii.gz or *_{kind}.nii)"
    if kind == "seg":
        others = [p.name for p in sorted(case.iterdir()) if p.name.lower().endswith(NIFTI_SUFFIXES)
                  and _volume_kind(p) is None]
        problem += "; validation cases ship without one and cannot be used for training"
        if others:
            problem += (f". Found other NIfTI file(s): {', '.join(others)}. If one is the segmentation (a known "
                        f"re-distribution names case 355's seg 'W39_1998.09.19_Segm.nii'), rename it to "
                        f"{case.name}_seg.nii")
    raise DataError(expected, problem)


def _load_volume(path: Path) -> np.ndarray:
    """float32 volume reoriented to RAS, so slicing the last axis gives axial slices whatever the file's affine."""
    try:
        volume = nib.as_closest_canonical(nib.load(path)).get_fdata(dtype=np.float32)
    except Exception as exc:  # nibabel, gzip and zlib raise many types for damaged files
        raise DataError(path, f"unreadable NIfTI volume ({type(exc).__name__}: {exc})") from None
    if volume.ndim != 3:
        raise DataError(path, f"expected a 3-D volume, got shape {volume.shape}")
    return volume
