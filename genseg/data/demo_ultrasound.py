"""Embedded demo data, second domain: procedurally generated breast-ultrasound images in the BUSI layout.

A transfer study needs a target domain that looks nothing like the brain MRI demo, yet is read by a real
reader: `benign/`, `malignant/`, `normal/` folders of `benign (k).png` with `benign (k)_mask.png`, as in the
BUSI dataset. Each image is simulated roughly the way a scanner forms it, so the familiar cues appear for the
right reasons:

- anatomy as a reflectivity map in physical coordinates: skin line, subcutaneous fat crossed by Cooper's
  ligaments, streaky fibroglandular tissue, retromammary fat, pectoralis muscle;
- lesions are hypoechoic (weak scatterers). Benign: oval, smooth, wider than tall, low attenuation, so the
  tissue behind them looks brighter (posterior enhancement). Malignant: irregular and spiculated, taller than
  wide, with an echogenic halo and high attenuation, which casts a posterior acoustic shadow;
- speckle: the scatterers (complex Gaussian, scaled by the reflectivity) are blurred by a point-spread
  function that is wider laterally than axially; the magnitude is Rayleigh-distributed;
- attenuation accumulates along each beam, time-gain compensation undoes most of the tissue's share; receiver
  noise grows with the gain; then log compression to 8-bit grey in a linear (rectangular) or convex (fan)
  field of view, black outside it.
The image is computed on a beam grid (scan lines x range samples), so shadows follow the beams, and then
scan-converted onto the pixel grid; the mask is drawn directly on the pixel grid from the same lesion outline.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from ..io import atomic_path
from .demo import check_out_dir, largest_filled, smooth_fields
from .folders import BUSI_CLASSES

CLASS_ORDER = (1, 2, 0)  # benign, malignant, normal: cases are dealt out over the classes in this order
CLASS_FOLDERS = {label: name for name, label in BUSI_CLASSES.items()}

# Reflectivity (backscattered power) relative to glandular tissue.
SKIN, FAT, LIGAMENT, GLAND, MUSCLE, FASCIA, CHEST_WALL = 4.0, 0.12, 1.5, 1.0, 0.12, 2.0, 0.02
NEPER_DB = 20 / np.log(10)  # amplitude ratio in dB per neper
TISSUE_ATTENUATION = 4.5  # round-trip nepers per image height, about 0.5 dB/cm/MHz at 10 MHz over 4 cm


@dataclass
class UltrasoundCase:
    """One generated image: uint8 grey image, 0/1 uint8 mask, BUSI label (0 normal, 1 benign, 2 malignant),
    and the field of view (bool), outside which the image is black."""

    image: np.ndarray
    mask: np.ndarray
    label: int
    field_of_view: np.ndarray


@dataclass
class _Probe:
    convex: bool
    radius: float       # convex probe: radius of the transducer face (linear: unused)
    half_width: float   # linear: half the aperture; convex: half the fan angle (radians)
    depth: float        # imaging depth; physical unit = the image's height
    top: float          # blank band above the skin, in image heights


@dataclass
class _Lesion:
    label: int
    centre: np.ndarray  # (x, z) physical
    axes: np.ndarray    # semi-axes (lateral, depth) before the outline's wobble
    tilt: float
    harmonics: np.ndarray  # (k, 3): order, relative amplitude, phase of the outline's Fourier terms
    spicules: np.ndarray   # (n, 3): angle, length, angular width
    reflectivity: float
    posterior_db: float    # > 0 enhancement (benign), < 0 shadow (malignant), across the lesion's thickest part
    halo: float            # echogenic rim thickness relative to the size (malignant), 0 = none


def ultrasound_cases(cases: int = 30, size: int = 256, seed: int = 0):
    """Yield UltrasoundCase for every case (deterministic in the arguments); the classes benign, malignant and
    normal are dealt out evenly in a random order."""
    if cases < 1 or size < 16:
        raise ValueError("need cases >= 1 and size >= 16")
    labels = np.random.default_rng(seed).permutation(np.resize(CLASS_ORDER, cases))
    for k, label in enumerate(labels):
        rng = np.random.default_rng([seed, k])
        probe = _random_probe(rng)
        lesion = _random_lesion(rng, int(label), probe) if label else None
        yield _render(rng, probe, lesion, int(label), size)


def make_ultrasound_dataset(out_dir: str | Path, cases: int = 30, size: int = 256, seed: int = 0,
                            force: bool = False, progress: bool = True) -> dict:
    """Write the ultrasound demo to `out_dir` in the BUSI layout and return a summary dict.

    `benign/benign (k).png` with `benign/benign (k)_mask.png` (0/255), likewise malignant and normal (empty
    masks), and a README.txt. Written into a temporary sibling folder renamed onto `out_dir` at the end; a
    non-empty `out_dir` is refused unless `force`, which replaces it with everything in it.
    """
    out_dir = check_out_dir(out_dir, force)
    start = time.perf_counter()
    counts = {name: 0 for name in BUSI_CLASSES}
    with atomic_path(out_dir, is_dir=True) as tmp:
        for case in tqdm(ultrasound_cases(cases, size, seed), total=cases, desc="ultrasound images", unit="image",
                         disable=not progress):
            name = CLASS_FOLDERS[case.label]
            counts[name] += 1
            folder = tmp / name
            folder.mkdir(exist_ok=True)
            stem = f"{name} ({counts[name]})"
            Image.fromarray(case.image).save(folder / f"{stem}.png")
            Image.fromarray(case.mask * np.uint8(255)).save(folder / f"{stem}_mask.png")
        summary = {"out_dir": str(out_dir), "images": cases, "size": size, "seed": seed,
                   "classes": {name: counts[name] for name in ("benign", "malignant", "normal")}}
        (tmp / "README.txt").write_text(_readme(summary))
    summary["seconds"] = round(time.perf_counter() - start, 2)
    return summary


def _readme(summary: dict) -> str:
    return (
        "genseg demo data: procedurally generated breast-ultrasound images, NOT patient data.\n"
        "Layout as the BUSI dataset: benign/, malignant/, normal/ with 'name (k).png' (8-bit grey) and\n"
        "'name (k)_mask.png' (0 background, 255 lesion); normal images have empty masks.\n"
        f"Made with: genseg demo-data OUT --domain ultrasound --patients {summary['images']} "
        f"--size {summary['size']} --seed {summary['seed']}\n"
        f"Summary: {json.dumps({k: summary[k] for k in ('images', 'classes')})}\n")


# --- random scene -------------------------------------------------------------------------------------------

def _random_probe(rng: np.random.Generator) -> _Probe:
    """Mostly linear probes (rectangular image), sometimes a convex one (fan); physical unit = image height."""
    top = rng.uniform(0.03, 0.08)
    if rng.random() < 0.3:  # the fan is widest at full depth: its half angle makes it just fit the image
        radius, depth = rng.uniform(0.6, 1.0), 0.97 - top
        return _Probe(True, radius, float(np.arcsin(0.47 / (radius + depth))), depth, top)
    return _Probe(False, 0.0, rng.uniform(0.36, 0.46), 0.98 - top, top)


def _random_lesion(rng: np.random.Generator, label: int, probe: _Probe) -> _Lesion:
    """Class-typical size, shape, echo level and posterior feature, placed inside the glandular layer."""
    radius = rng.uniform(0.07, 0.15)  # of a circle with the same area, in image heights
    if label == 1:  # benign: oval, parallel to the skin, circumscribed; cysts are anechoic
        cyst = rng.random() < 0.3
        ratio = rng.uniform(1.3, 2.0)  # wider than tall
        orders = np.arange(2, 5)
        harmonics = np.column_stack([orders, rng.uniform(0, 0.05, 3), rng.uniform(0, 2 * np.pi, 3)])
        spicules = np.zeros((0, 3))
        reflectivity = rng.uniform(0.003, 0.01) if cyst else rng.uniform(0.03, 0.07)
        posterior, halo, tilt = rng.uniform(6, 10) if cyst else rng.uniform(2, 6), 0.0, rng.normal(0, 0.12)
    else:  # malignant: not parallel (taller than wide), angular margins with spicules, shadowing
        ratio = rng.uniform(0.6, 0.9)
        orders = np.arange(2, 13)
        harmonics = np.column_stack([orders, rng.uniform(0.02, 0.12, orders.size) / orders ** 0.5,
                                     rng.uniform(0, 2 * np.pi, orders.size)])
        n = rng.integers(5, 10)
        spicules = np.column_stack([rng.uniform(0, 2 * np.pi, n), rng.uniform(0.15, 0.45, n),
                                    rng.uniform(0.05, 0.12, n)])
        reflectivity = rng.uniform(0.02, 0.06)
        posterior, halo, tilt = -rng.uniform(12, 20), rng.uniform(0.15, 0.35), rng.normal(0, 0.15)
    axes = np.array([radius * np.sqrt(ratio), radius / np.sqrt(ratio)])
    depth = rng.uniform(0.28, 0.45) * probe.depth
    room = (probe.half_width * (probe.radius + depth) if probe.convex else probe.half_width) - 1.5 * axes[0]
    centre = np.array([rng.uniform(-1, 1) * max(room, 0.0), depth])
    return _Lesion(label, centre, axes, tilt, harmonics, spicules, reflectivity, posterior, halo)


# --- rendering ----------------------------------------------------------------------------------------------

def _render(rng: np.random.Generator, probe: _Probe, lesion: _Lesion | None, label: int,
            size: int) -> UltrasoundCase:
    # Beam grid: rows = range samples from the skin down, columns = scan lines; s = lateral position along the
    # probe face (arc length for a convex probe), r = range; (x, z) = the physical point each sample images.
    lines = np.linspace(-1, 1, size)
    r = (np.arange(size)[:, None] + 0.5) / size * probe.depth
    s, x, z = _beam_points(probe, lines[None, :], r)
    reflect, attenuation = _tissue(rng, probe, s, r, size)
    if lesion is not None:
        inside, rim = _lesion_regions(lesion, x, z)
        reflect = np.where(rim, reflect * 2.5, reflect)
        echo_level = np.full_like(reflect, lesion.reflectivity)
        if lesion.label == 2:  # malignant masses are heterogeneous inside
            echo_level *= np.clip(1 + 0.3 * smooth_fields(rng, size, {"inside": 0.01})["inside"], 0.2, None)
        reflect = np.where(inside, echo_level, reflect)
        thickness = inside.sum(axis=0).max() * (probe.depth / size)
        attenuation = np.where(inside, attenuation - lesion.posterior_db / NEPER_DB / max(thickness, 1e-3),
                               attenuation)
        if lesion.label == 2 and rng.random() < 0.5:  # microcalcifications: a few bright points inside the mass
            rows, cols = np.nonzero(inside)
            spots = rng.choice(rows.size, size=min(rows.size, int(rng.integers(3, 9))), replace=False)
            reflect[rows[spots], cols[spots]] = 40.0
    attenuation = np.clip(attenuation, 0, None)

    psf = (max(0.6, size / 300), max(1.0, size / 130))  # (axial, lateral) sigma in samples at the focus
    away = np.clip(np.abs(r - rng.uniform(0.3, 0.5) * probe.depth) / (0.6 * probe.depth), 0, 1)
    echo = speckle(rng, reflect, psf, away)
    # Round-trip attenuation along each beam (blurred laterally by the beam width), then time-gain compensation
    # that restores most of the tissue's loss; the receiver noise is amplified with it.
    loss = ndimage.gaussian_filter1d(np.cumsum(attenuation, axis=0) * (probe.depth / size), psf[1], axis=1)
    tgc = np.exp(rng.uniform(0.8, 0.95) * TISSUE_ATTENUATION * r)
    noise = rng.standard_normal((2, size, size)) * 10 ** (-rng.uniform(3.6, 3.9))
    echo = np.hypot(echo * np.exp(-loss) * tgc + noise[0] * tgc, noise[1] * tgc)

    # Scan conversion onto the pixel grid, then log compression to 8-bit grey.
    px, pz = _pixel_points(probe, size)
    row, col, fov = _beam_index(probe, px, pz, size)
    envelope = ndimage.map_coordinates(echo, [row, col], order=1, mode="nearest")
    db = 20 * np.log10(np.maximum(envelope, 1e-12) / np.percentile(envelope[fov], 99.5))
    dynamic_range = rng.uniform(48, 58)
    grey = np.clip(1 + db / dynamic_range, 0, 1) ** rng.uniform(1.1, 1.4) * fov
    image = np.rint(255 * grey).astype(np.uint8)
    _depth_marks(image, probe)
    mask = np.zeros((size, size), dtype=bool)
    if lesion is not None:
        mask = largest_filled(_lesion_regions(lesion, px, pz)[0] & fov)
    return UltrasoundCase(image, mask.astype(np.uint8), label, fov)


def speckle(rng: np.random.Generator, reflect: np.ndarray, psf: tuple[float, float],
            defocus: np.ndarray | float = 0.0) -> np.ndarray:
    """Echo envelope of tissue with backscattered power `reflect`: random scatterers (complex Gaussian) blurred
    by the point-spread function with (axial, lateral) sigma `psf`, in samples. The magnitude is Rayleigh
    distributed with a mean proportional to sqrt(reflect): speckle multiplies the echo level. `defocus` in [0, 1]
    blends towards a beam 2.2x wider laterally (away from the focal depth), which coarsens the speckle."""
    scatter = rng.standard_normal((2, *reflect.shape)) * np.sqrt(reflect)
    focused = [ndimage.gaussian_filter(part, psf) for part in scatter]
    # sqrt(2.2) keeps the wider beam's echo level: blurring spreads the same power over 2.2x the samples.
    blurred = [ndimage.gaussian_filter(part, (psf[0], 2.2 * psf[1])) * np.sqrt(2.2) for part in scatter]
    return np.hypot(*((1 - defocus) * f + defocus * b for f, b in zip(focused, blurred)))


def _tissue(rng: np.random.Generator, probe: _Probe, s: np.ndarray, r: np.ndarray, size: int):
    """Reflectivity and attenuation of the layered breast on the beam grid: skin, fat with ligaments, gland,
    retromammary fat, pectoralis muscle with its fascia, chest wall. Layers follow the probe face."""
    fields = smooth_fields(rng, size, {"bounds": (0.3, 0.5), "lobules": 0.05, "ligaments": (0.08, 0.12),
                                       "gland": (0.012, 0.05), "coarse": 0.1, "fibres": (0.004, 0.15)})
    lateral = np.clip((s - s.min()) / max(np.ptp(s), 1e-9), 0, 1) * (size - 1)
    bound = fields["bounds"]  # rows of one smooth field serve as independent smooth curves across the image

    def curve(row: int) -> np.ndarray:
        return ndimage.map_coordinates(bound[row % size], [lateral.ravel()], order=1).reshape(lateral.shape)

    depth = probe.depth
    skin = rng.uniform(0.012, 0.02)
    fat_end = rng.uniform(0.12, 0.22) * depth + 0.025 * curve(0)
    gland_end = fat_end + rng.uniform(0.3, 0.45) * depth + 0.025 * curve(size // 3)
    muscle_start = gland_end + rng.uniform(0.02, 0.05) + 0.01 * curve(2 * size // 3)
    muscle_end = muscle_start + rng.uniform(0.08, 0.14)
    reflect = np.full(np.broadcast(s, r).shape, CHEST_WALL)
    reflect = np.where(r < muscle_end, MUSCLE * np.exp(0.8 * fields["fibres"]), reflect)
    reflect = np.where(np.abs(r - muscle_start) < 0.006, FASCIA, reflect)
    reflect = np.where(r < muscle_start - 0.006, FAT * np.exp(0.3 * fields["lobules"]), reflect)
    gland = r < gland_end
    # Fibroglandular tissue: bright streaks, interspersed with dark fat lobules.
    glandular = GLAND * np.exp(0.6 * fields["gland"] + 0.3 * fields["coarse"])
    reflect = np.where(gland, np.where(fields["lobules"] > 0.8, FAT, glandular), reflect)
    # Subcutaneous fat: dark lobules separated by bright, curved Cooper's ligaments (a field's zero crossings).
    fat = r < fat_end
    ligaments = np.abs(fields["ligaments"]) < 0.12
    reflect = np.where(fat, np.where(ligaments, LIGAMENT, FAT * np.exp(0.3 * fields["lobules"])), reflect)
    reflect = np.where(r < skin, SKIN, reflect)
    attenuation = np.where(gland & ~fat, TISSUE_ATTENUATION * 1.1, TISSUE_ATTENUATION * 0.9)
    return reflect, attenuation


def _lesion_regions(lesion: _Lesion, x: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(inside, echogenic rim) of the lesion at physical points (x, z): an ellipse whose radius wobbles with the
    outline's harmonics and spikes out along spicules."""
    c, s = np.cos(lesion.tilt), np.sin(lesion.tilt)
    du, dv = x - lesion.centre[0], z - lesion.centre[1]
    u, v = (c * du + s * dv) / lesion.axes[0], (-s * du + c * dv) / lesion.axes[1]
    rho, theta = np.hypot(u, v), np.arctan2(v, u)
    outline = 1 + sum(a * np.cos(k * theta + p) for k, a, p in lesion.harmonics)
    for angle, length, width in lesion.spicules:
        outline = outline + length * np.exp(-((np.angle(np.exp(1j * (theta - angle)))) / width) ** 2)
    inside = rho < outline
    rim = (rho < outline * (1 + lesion.halo)) & ~inside if lesion.halo else np.zeros_like(inside)
    return inside, rim


# --- geometry -----------------------------------------------------------------------------------------------

def _beam_points(probe: _Probe, line: np.ndarray, r: np.ndarray):
    """(s, x, z) of beam-grid samples: line in [-1, 1] across the aperture, r = range below the skin."""
    if probe.convex:
        angle = line * probe.half_width
        s = probe.radius * angle
        return np.broadcast_arrays(s, (probe.radius + r) * np.sin(angle),
                                   (probe.radius + r) * np.cos(angle) - probe.radius)
    s = line * probe.half_width
    return np.broadcast_arrays(s, s, r)


def _pixel_points(probe: _Probe, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Physical (x, z) of every pixel centre: the image is one unit high, the skin at the top of the window."""
    grid = (np.arange(size) + 0.5) / size
    x, y = np.meshgrid(grid - 0.5, grid)
    return x, y - probe.top


def _depth_marks(image: np.ndarray, probe: _Probe) -> None:
    """Scanner depth-scale ticks right of the field of view, one per centimetre (the view is about 4 cm deep)."""
    size = image.shape[0]
    edge = np.sin(probe.half_width) * (probe.radius + probe.depth) if probe.convex else probe.half_width
    col = min(int((0.5 + edge + 0.02) * size), size - 2)
    for depth in np.arange(0, probe.depth, probe.depth / 4):
        row = int((probe.top + depth) * size)
        image[row:row + max(1, size // 128), col:col + max(1, size // 128)] = 200


def _beam_index(probe: _Probe, x: np.ndarray, z: np.ndarray, size: int):
    """Fractional (row, column) on the beam grid of physical points, and whether they are in the field of view."""
    if probe.convex:
        rho = np.hypot(x, z + probe.radius)
        angle = np.arctan2(x, z + probe.radius)
        r, line = rho - probe.radius, angle / probe.half_width
    else:
        r, line = z, x / probe.half_width
    fov = (np.abs(line) <= 1) & (r >= 0) & (r <= probe.depth)
    return r / probe.depth * size - 0.5, (line + 1) / 2 * (size - 1), fov
