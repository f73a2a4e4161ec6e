"""Embedded demo data, third kind: real brain anatomy with inserted tumours, in the Figshare layout.

The procedural MRI demo draws its own anatomy, so a recipe tuned on it may have learnt our drawing rather than
brains. This dataset starts from a real head instead: nibabel (a required dependency) ships
`tests/data/example4d.nii.gz`, an EPI scan of one real brain (128 x 96 x 24 voxels of 2 x 2 x 2.2 mm, two
volumes). Each synthetic patient is that head seen differently: 8 consecutive axial levels of either volume,
mirrored or not, turned, zoomed and shifted, with its own gain, gamma and noise. One tumour of a Figshare class is
inserted in 3-D, so it grows and shrinks over the patient's levels and the levels above or below it are
tumour-free:

- meningioma (1): extra-axial, a dome on the brain's outer edge that bulges out of it, homogeneous;
- glioma (2): intra-axial, deep in the tissue, an enhancing rim around a dark core, inside a darker oedema that
  is not part of the mask;
- pituitary (3): small, on the midline in the front half, homogeneous.

How far a tumour stands out of the tissue varies per patient, down to barely visible. The mask is the tumour as
painted (blend weight >= 0.5), moved with the head by the same transform, so every label is exact.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..errors import DataError
from ..io import atomic_path
from .demo import (TUMOUR_CLASSES, DemoSlice, check_out_dir, largest_filled, random_patient_ids,
                   write_figshare_layout)

SOURCE = ("nibabel", "tests/data/example4d.nii.gz")
LEVELS = range(3, 22)  # axial levels that cut through a good share of brain (the lowest and highest hold little)
SCANNER_UNITS = 1000.0  # brain tissue's typical intensity in the written int16 images


def load_head() -> np.ndarray:
    """(2, levels, 128, 128) float32: both volumes of nibabel's example EPI at LEVELS, front of the head up,
    padded to square, scaled so that the brain's 99th percentile is 1."""
    import nibabel

    path = resources.files(SOURCE[0]).joinpath(SOURCE[1])
    if not path.is_file():
        raise DataError(path, "is missing: the anatomy demo needs nibabel's bundled test data (a nibabel "
                              "installed without its tests?)")
    volume = np.asarray(nibabel.load(str(path)).dataobj, dtype=np.float32)   # (x, y, z, t)
    slices = volume[:, :, list(LEVELS), :].transpose(3, 2, 1, 0)[:, :, ::-1]  # (t, z, rows = front first, cols)
    pad = (slices.shape[-1] - slices.shape[-2]) // 2
    square = np.pad(slices, ((0, 0), (0, 0), (pad, slices.shape[-1] - slices.shape[-2] - pad), (0, 0)))
    return (square / np.percentile(square[square > 0.2 * square.max()], 99)).astype(np.float32)


def anatomy_slices(patients: int = 30, slices_per_patient: int = 8, size: int = 256, seed: int = 0):
    """Yield demo.DemoSlice (int16 image, 0/1 mask, label, patient id) patient by patient, level by level;
    deterministic in the arguments. Classes are spread evenly over the patients."""
    if patients < 1 or size < 16 or not 1 <= slices_per_patient <= len(LEVELS):
        raise ValueError(f"need patients >= 1, size >= 16 and 1 <= slices_per_patient <= {len(LEVELS)}")
    head = load_head()
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.resize(TUMOUR_CLASSES, patients))
    pids = random_patient_ids(rng, patients)
    for p in range(patients):
        patient_rng = np.random.default_rng([seed, p])
        volume = head[patient_rng.integers(2)]
        first = patient_rng.integers(0, len(LEVELS) - slices_per_patient + 1)
        canonical = [_upsample(volume[first + k], size) for k in range(slices_per_patient)]
        images, alphas = _insert_tumour(canonical, int(labels[p]), patient_rng)
        transform = _patient_transform(patient_rng, size)
        gain, gamma = patient_rng.uniform(0.8, 1.25, 2)
        noise = patient_rng.uniform(0.01, 0.04)
        for image, alpha in zip(images, alphas):
            moved = np.clip(transform(image, order=1), 0, None)
            mask = (transform(alpha, order=1) >= 0.5).astype(np.uint8)
            noisy = np.hypot(gain * moved ** gamma + noise * patient_rng.standard_normal(moved.shape),
                             noise * patient_rng.standard_normal(moved.shape))
            yield DemoSlice(np.clip(noisy * SCANNER_UNITS, 0, 32767).astype(np.int16), mask, int(labels[p]), pids[p])


def make_anatomy_dataset(out_dir: str | Path, patients: int = 30, slices_per_patient: int = 8, size: int = 256,
                         seed: int = 0, force: bool = False, progress: bool = True) -> dict:
    """Write the real-anatomy dataset to `out_dir` in the Figshare layout (1.mat .. N.mat v7.3, cvind.mat with
    patient-wise folds, README.txt), atomically like demo.make_demo_dataset, and return a summary dict."""
    out_dir = check_out_dir(out_dir, force)
    start, total = time.perf_counter(), patients * slices_per_patient
    with atomic_path(out_dir, is_dir=True) as tmp:
        slices = anatomy_slices(patients, slices_per_patient, size, seed)
        counts = write_figshare_layout(tmp, slices, total, seed, "anatomy slices", progress)
        summary = {"out_dir": str(out_dir), "slices": total, "patients": patients, "size": size, "seed": seed,
                   **counts, "preset": "anatomy"}
        (tmp / "README.txt").write_text(
            f"genseg anatomy demo data: {total} slices of {patients} synthetic patients, {size}x{size}, seed "
            f"{seed}. Real brain anatomy (nibabel's example EPI, {SOURCE[1]}) with inserted tumours; Figshare "
            f"layout (1.mat .. {total}.mat, cvind.mat). Classes: {counts['classes']}; {counts['empty_slices']} "
            f"slices without tumour. Written by genseg.data.demo_anatomy; read with `genseg prepare`.\n")
    summary["seconds"] = round(time.perf_counter() - start, 2)
    return summary


# --- one patient ------------------------------------------------------------------------------------------------

def _upsample(level: np.ndarray, size: int) -> np.ndarray:
    return np.clip(ndimage.zoom(level, size / level.shape[-1], order=3), 0, None).astype(np.float64)


def _brain(image: np.ndarray) -> np.ndarray:
    """The head's tissue: the largest filled region of the smoothed image above a fifth of its brain level."""
    return largest_filled(ndimage.gaussian_filter(image, image.shape[-1] / 128) > 0.2)


def _insert_tumour(levels: list[np.ndarray], label: int, rng: np.random.Generator
                   ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Paint one tumour of class `label` through the patient's levels (canonical frame): images with the tumour
    and each level's blend weight in [0, 1]."""
    size, n = levels[0].shape[-1], len(levels)
    z_centre = rng.uniform(0.3 * (n - 1), 0.7 * (n - 1))
    z_radius = rng.uniform(2.5, 4.5) if n > 1 else 1.0
    radius = size * {1: rng.uniform(0.045, 0.11), 2: rng.uniform(0.05, 0.11), 3: rng.uniform(0.025, 0.045)}[label]
    contrast = rng.uniform(0.35, 1.2)
    harmonics = np.stack([rng.uniform(0, 0.12, 3), rng.uniform(0, 2 * np.pi, 3)], 1)
    centre_level = levels[int(round(z_centre))]
    brain = _brain(centre_level)
    centre = _tumour_centre(brain, label, radius, rng)
    tissue = float(np.median(centre_level[brain]))
    rows, cols = np.mgrid[:size, :size].astype(np.float64)
    rho, theta = np.hypot(rows - centre[0], cols - centre[1]), np.arctan2(rows - centre[0], cols - centre[1])
    outline = 1 + sum(a * np.cos((k + 2) * theta + phase) for k, (a, phase) in enumerate(harmonics))
    texture = 1 + 0.05 * ndimage.gaussian_filter(rng.standard_normal((size, size)), size / 100)
    images, alphas = [], []
    for z, image in enumerate(levels):
        shrink = 1 - ((z - z_centre) / z_radius) ** 2
        r = radius * np.sqrt(max(shrink, 0.0))
        if r < size / 128:
            images.append(image)
            alphas.append(np.zeros_like(image))
            continue
        edge = r * outline
        alpha = np.clip((edge - rho) / (size / 170) + 0.5, 0, 1)
        if label == 1:  # a dome on the brain's edge: within a quarter radius outside the brain, never further
            alpha *= ndimage.distance_transform_edt(~_brain(image)) <= 0.25 * radius
        lesion = tissue * (1 + contrast * rng.uniform(0.35, 0.6)) * texture
        if label == 2:  # dark necrotic core inside an enhancing rim, in a darker oedema outside the mask
            core = np.clip((0.6 * edge - rho) / (size / 170) + 0.5, 0, 1)
            lesion = lesion * (1 - core) + tissue * (1 - 0.45 * contrast) * core
            oedema = np.clip((1.6 * edge - rho) / (0.3 * edge), 0, 1) * (1 - alpha) * _brain(image)
            image = image * (1 - 0.2 * contrast * oedema)
        images.append(image * (1 - alpha) + lesion * alpha)
        alphas.append(alpha)
    return images, alphas


def _tumour_centre(brain: np.ndarray, label: int, radius: float, rng: np.random.Generator) -> np.ndarray:
    """Meningioma: just inside the brain's edge (about half its radius deep), so it bulges out; glioma: deep
    enough for the whole tumour and its oedema to lie in tissue; pituitary: the midline, front half."""
    depth = ndimage.distance_transform_edt(brain)
    if label == 3:
        rows = np.flatnonzero(brain.any(1))
        cols = np.flatnonzero(brain.any(0))
        middle = (cols[0] + cols[-1]) / 2
        row = rows[0] + rng.uniform(0.25, 0.4) * (rows[-1] - rows[0])
        return np.array([row, middle + rng.normal(0, radius / 4)])
    if label == 1:
        candidates = np.argwhere((depth > 0.35 * radius) & (depth <= 0.6 * radius))
        if not len(candidates):  # tiny images: the brain's edge itself
            candidates = np.argwhere((depth > 0) & (depth <= 1.5))
    else:
        candidates = np.argwhere(depth >= min(1.7 * radius, 0.8 * depth.max()))
    return candidates[rng.integers(len(candidates))].astype(np.float64)


def _patient_transform(rng: np.random.Generator, size: int):
    """One patient's pose: a mirror (half of them), a turn of up to 15 degrees, a zoom of 1.25-1.5 (the EPI's
    field of view is wide: the brain then fills the frame about as in clinical T1-CE slices) and a shift of up to
    4 % of the image, as a function (image, order) -> moved image, the same for every level."""
    turn = np.deg2rad(rng.uniform(-15, 15))
    zoom, shift = rng.uniform(1.25, 1.5), rng.uniform(-0.04, 0.04, 2) * size
    mirror = -1.0 if rng.random() < 0.5 else 1.0
    rotation = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
    matrix = rotation @ np.diag([1.0, mirror]) / zoom  # output (row, col) -> input, about the centre
    centre = np.full(2, (size - 1) / 2)
    offset = centre - matrix @ (centre + shift)
    return lambda image, order: ndimage.affine_transform(image, matrix, offset, order=order, mode="constant")
