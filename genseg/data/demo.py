"""Embedded demo data: procedurally generated T1 contrast-enhanced axial brain slices in the Figshare layout.

Demos and tests should go through the same reader as the real dataset (v7.3 `.mat` files plus `cvind.mat`)
without a download, so this module draws a small, deterministic look-alike of it. Each patient is one
synthetic head; its slices are consecutive axial levels through that head, and the tumour is a 3-D object, so
neighbouring slices agree and the slices at the top or bottom of a stack can miss it (empty mask). The anatomy
is drawn in head coordinates (u lateral, v anterior-to-posterior, z = 0 skull base .. 1 vertex) from a few
ellipses, curves and smooth random fields; then the head is rotated, given a bias field, blurred by a
point-spread function and Rician noise, and stored as int16 scanner units like the real files.

Intensities below are relative to white matter (1.0) on T1 with gadolinium: fat and enhancing tissue bright,
CSF dark, cortical bone black.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import fft, ndimage
from tqdm import tqdm

from ..errors import DataError
from ..io import atomic_path
from .figshare import write_figshare_mat, write_cvind_mat
from .prepared import assign_patient_folds
from .records import CLASS_NAMES

TUMOUR_CLASSES = (1, 2, 3)  # meningioma, glioma, pituitary: the Figshare label ids

# Relative T1-CE intensities (white matter = 1).
WM, GM, CSF, FAT, SKIN, BONE, MARROW, ENHANCING_VESSEL = 1.0, 0.7, 0.2, 1.18, 0.5, 0.06, 0.5, 1.25
MENINGIOMA, GLIOMA_RIM, NECROSIS, OEDEMA, PITUITARY = 1.45, 1.45, 0.38, 0.7, 1.38


@dataclass(frozen=True)
class DemoSettings:
    """How hard the demo's segmentation task is. The defaults draw the standard demo data bit for bit (tests and
    shipped checkpoints depend on it); the presets below make held-out datasets a recipe was never tuned on."""

    lesion_contrast: float = 1.0  # tumour intensities' distance from white matter, as a multiple of the default's
    lesion_scale: float = 1.0     # tumour radii as a multiple of the default's
    skull_contact: bool = False   # meningiomas pressed flat against the inner table, without the CSF cleft
    meningioma_share: float | None = None  # share of patients with a meningioma; None spreads classes evenly
    bias_strength: float = 1.0    # multiple of the coil bias field's coefficients
    inhomogeneity: float = 0.0    # amplitude of an extra smooth random multiplicative field, one per patient

    def __post_init__(self):
        if not (self.lesion_contrast > 0 and self.lesion_scale > 0 and self.bias_strength >= 0
                and self.inhomogeneity >= 0):
            raise ValueError(f"lesion_contrast and lesion_scale must be > 0, bias_strength and inhomogeneity >= 0: "
                             f"{self}")
        if self.meningioma_share is not None and not 0 <= self.meningioma_share <= 1:
            raise ValueError(f"meningioma_share must be in [0, 1], got {self.meningioma_share}")


# Harder datasets (issue 14): each with its own default seed, so none shares a patient with the standard demo.
PRESETS: dict[str, tuple[DemoSettings, int]] = {
    "skull": (DemoSettings(skull_contact=True, meningioma_share=0.5), 101),
    "low-contrast": (DemoSettings(lesion_contrast=0.3), 102),
    "small": (DemoSettings(lesion_scale=0.5), 103),
    "bias": (DemoSettings(bias_strength=3.0, inhomogeneity=0.35), 104),
}


def preset_settings(preset: str | None) -> tuple[DemoSettings, int]:
    """(settings, default seed) of a preset name; None is the standard demo data (seed 0)."""
    if preset is None:
        return DemoSettings(), 0
    if preset not in PRESETS:
        raise ValueError(f"unknown demo preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]


@dataclass
class DemoSlice:
    """One generated slice: int16 image in scanner units, 0/1 uint8 tumour mask, class label, patient id."""

    image: np.ndarray
    mask: np.ndarray
    label: int
    patient: str


@dataclass
class _Tumour:
    label: int
    centre: np.ndarray     # (u, v) in unit-head coordinates (fractions of the brain's semi-axes)
    radius: float          # in-plane radius at the widest level, in image half-widths
    z_centre: float
    z_radius: float
    harmonics: np.ndarray  # (k, 2): relative amplitude and phase of the outline's Fourier terms
    rim: float             # glioma: enhancing rim thickness; pituitary: > 0 gives a cystic part
    oedema: float          # glioma: oedema radius as a multiple of the tumour radius


@dataclass
class _Head:
    half_axes: np.ndarray  # head semi-axes (lateral, antero-posterior) at the widest level
    rotation: float
    shift: np.ndarray
    egg: float             # the head is wider at the back than at the front
    scalp: float
    bone: float
    ventricles: float      # ventricle size factor
    wm_units: float        # white matter in scanner units
    noise: float           # Rician noise sigma relative to white matter
    bias: np.ndarray       # linear (x, y), cross and radial coefficients of the coil bias field
    levels: np.ndarray     # z of each slice, consecutive
    tumour: _Tumour


def demo_slices(patients: int = 30, slices_per_patient: int = 8, size: int = 256, seed: int = 0,
                empty_share: float = 0.125, settings: DemoSettings = DemoSettings()):
    """Yield DemoSlice for every slice, patient by patient, level by level (deterministic in the arguments).

    Classes are spread evenly over patients. About `empty_share` of all slices lie above or below the tumour
    and have an empty mask; each keeps its patient's class label, because the Figshare format has no
    "no tumour" label (the real dataset has no tumour-free slices). `settings` make the task harder.
    """
    if patients < 1 or slices_per_patient < 1 or size < 16:
        raise ValueError("need patients >= 1, slices_per_patient >= 1 and size >= 16")
    if not 0.0 <= empty_share < 1.0:
        raise ValueError(f"empty_share must be in [0, 1), got {empty_share}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(_class_spread(patients, settings.meningioma_share))
    pids = random_patient_ids(rng, patients)
    empties = _spread_empty_slices(rng, patients, slices_per_patient, empty_share)
    for p in range(patients):
        head_rng = np.random.default_rng([seed, p])
        head = _random_head(head_rng, int(labels[p]), slices_per_patient, int(empties[p]), settings)
        field = _inhomogeneity(seed, p, size, settings.inhomogeneity)
        for z in head.levels:
            image, mask = _render(head, float(z), size, head_rng, settings, field)
            yield DemoSlice(image, mask, int(labels[p]), pids[p])


def make_demo_dataset(out_dir: str | Path, patients: int = 30, slices_per_patient: int = 8, size: int = 256,
                      seed: int | None = None, empty_share: float = 0.125, force: bool = False,
                      progress: bool = True, preset: str | None = None) -> dict:
    """Write the demo dataset to `out_dir` in the Figshare layout and return a summary dict.

    Files: `1.mat` .. `N.mat` (v7.3, struct `cjdata` with label, PID, image int16, tumorMask, tumorBorder),
    `cvind.mat` (patient-wise folds 1..5) and a `README.txt`. Everything is written into a temporary sibling
    folder that is renamed onto `out_dir` at the end, so an interrupted run never looks like a dataset.
    A non-empty `out_dir` is refused unless `force`, which replaces it with everything in it. `preset` (PRESETS)
    draws a harder dataset; `seed` None takes the preset's own seed (0 for the standard demo data).
    """
    settings, preset_seed = preset_settings(preset)
    seed = preset_seed if seed is None else seed
    out_dir = check_out_dir(out_dir, force)
    start = time.perf_counter()
    total = patients * slices_per_patient
    slices = demo_slices(patients, slices_per_patient, size, seed, empty_share, settings)
    with atomic_path(out_dir, is_dir=True) as tmp:
        counts = write_figshare_layout(tmp, slices, total, seed, "demo slices", progress)
        summary = {"out_dir": str(out_dir), "slices": total, "patients": patients, "size": size, "seed": seed,
                   **counts, "preset": preset}
        (tmp / "README.txt").write_text(_readme(summary))
    summary["seconds"] = round(time.perf_counter() - start, 2)
    return summary


def write_figshare_layout(folder: Path, slices, total: int, seed: int, desc: str, progress: bool) -> dict:
    """DemoSlices as `1.mat` .. `N.mat` and `cvind.mat` (patient-wise folds drawn with `seed`) in `folder`;
    returns the class counts and the number of tumour-free slices."""
    pids, labels, empty = [], [], 0
    for i, s in enumerate(tqdm(slices, total=total, desc=desc, unit="slice", disable=not progress)):
        write_figshare_mat(folder / f"{i + 1}.mat", s.image, s.mask, s.label, s.patient, border_polygon(s.mask))
        pids.append(s.patient)
        labels.append(s.label)
        empty += not s.mask.any()
    write_cvind_mat(folder / "cvind.mat", assign_patient_folds(pids, num_folds=5, seed=seed))
    return {"classes": {CLASS_NAMES[c]: labels.count(c) for c in TUMOUR_CLASSES}, "empty_slices": empty}


def check_out_dir(out_dir: str | Path, force: bool) -> Path:
    """Refuse to write a dataset over a file or, unless `force`, over a folder that holds anything."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(out_dir, "exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise DataError(out_dir, "folder is not empty; pass --force (force=True) to replace it and everything in it")
    return out_dir


def _readme(summary: dict) -> str:
    return (
        "genseg demo data: procedurally generated T1 contrast-enhanced axial brain slices, NOT patient data.\n"
        "Layout as the Figshare brain tumour dataset (Cheng et al.): one MATLAB v7.3 file per slice with the\n"
        "struct cjdata (label 1 meningioma / 2 glioma / 3 pituitary, PID, image int16, tumorMask, tumorBorder\n"
        "as x,y 1-based interleaved) and cvind.mat with patient-wise folds 1..5.\n"
        "Slices whose tumorMask is all zero lie above or below the tumour; they keep the patient's label.\n"
        f"Made with: genseg demo-data OUT --patients {summary['patients']} --slices-per-patient "
        f"{summary['slices'] // summary['patients']} --size {summary['size']} --seed {summary['seed']}"
        f"{'' if summary['preset'] is None else ' --preset ' + summary['preset']}\n"
        f"Summary: {json.dumps({k: summary[k] for k in ('slices', 'patients', 'classes', 'empty_slices')})}\n")


# --- patients ---------------------------------------------------------------------------------------------

def random_patient_ids(rng: np.random.Generator, patients: int) -> list[str]:
    """Unique ids in the real dataset's two styles: plain numbers ("107480") and "MR04xxxx"."""
    numbers = rng.choice(900_000, size=patients, replace=False) + 100_000
    styles = rng.random(patients) < 0.3
    return [f"MR04{n % 10_000:04d}" if mr else str(n) for n, mr in zip(numbers, styles)]


def _class_spread(patients: int, meningioma_share: float | None) -> np.ndarray:
    """Each patient's class before shuffling: evenly spread, or that share of meningiomas and the rest even."""
    if meningioma_share is None:
        return np.resize(TUMOUR_CLASSES, patients)
    meningiomas = round(meningioma_share * patients)
    return np.concatenate([np.full(meningiomas, 1), np.resize(TUMOUR_CLASSES[1:], patients - meningiomas)])


def _inhomogeneity(seed: int, patient: int, size: int, amplitude: float) -> np.ndarray | None:
    """A smooth multiplicative field exp(amplitude * N(0, 1) field) for one patient's slices (None for 0), drawn
    from its own generator so that the anatomy's random stream stays that of the standard data."""
    if amplitude == 0:
        return None
    rng = np.random.default_rng([seed, patient, 1])
    return np.exp(amplitude * smooth_fields(rng, size, {"bias": 0.4})["bias"])


def _spread_empty_slices(rng: np.random.Generator, patients: int, per_patient: int, share: float) -> np.ndarray:
    """How many tumour-free slices each patient gets: round(share * total) overall, at most all but one each."""
    capacity = np.full(patients, per_patient - 1)
    counts = np.zeros(patients, dtype=int)
    for _ in range(min(round(share * patients * per_patient), int(capacity.sum()))):
        open_ = np.flatnonzero(counts < capacity)
        counts[rng.choice(open_)] += 1
    return counts


def _random_head(rng: np.random.Generator, label: int, n_slices: int, n_empty: int,
                 settings: DemoSettings) -> _Head:
    """Draw one patient: head shape and pose, scanner scaling, the tumour, and the slice levels through it."""
    tumour = _random_tumour(rng, label)
    tumour.radius *= settings.lesion_scale
    # Slices are evenly spaced; the tumour spans exactly the n_slices - n_empty middle ones.
    n_tumour = n_slices - n_empty
    spacing = rng.uniform(0.022, 0.03) if label == 3 else rng.uniform(0.035, 0.05)
    tumour.z_radius = n_tumour / 2 * spacing
    below = rng.integers(0, n_empty + 1)
    first = tumour.z_centre - ((n_tumour - 1) / 2 + below) * spacing
    return _Head(
        half_axes=np.array([rng.uniform(0.66, 0.74), rng.uniform(0.82, 0.9)]),
        rotation=rng.normal(0, 0.09), shift=rng.normal(0, 0.02, size=2), egg=rng.uniform(0.03, 0.08),
        scalp=rng.uniform(0.03, 0.045), bone=rng.uniform(0.035, 0.05), ventricles=rng.uniform(0.75, 1.3),
        wm_units=rng.uniform(450, 800), noise=rng.uniform(0.02, 0.04),
        bias=np.array([*rng.normal(0, 0.06, 2), rng.normal(0, 0.05), rng.uniform(0.0, 0.15)]) * settings.bias_strength,
        levels=first + spacing * np.arange(n_slices), tumour=tumour)


def _random_tumour(rng: np.random.Generator, label: int) -> _Tumour:
    """Class-typical size, place and shape (unit-head coordinates: the brain outline is the unit circle)."""
    if label == 1:  # meningioma: extra-axial, sits on the dura of the convexity; centre set per level
        radius, z_centre = rng.uniform(0.12, 0.21), rng.uniform(0.38, 0.72)
        angle = rng.uniform(0, 2 * np.pi)
        centre = np.array([np.cos(angle), np.sin(angle)])  # a direction; the depth follows the radius
        harmonics = np.column_stack([rng.uniform(0, 0.06, 4), rng.uniform(0, 2 * np.pi, 4)])
        rim, oedema = 0.0, 0.0
    elif label == 2:  # glioma: intra-axial, deep in one hemisphere, irregular, ring-enhancing
        radius, z_centre = rng.uniform(0.13, 0.23), rng.uniform(0.36, 0.62)
        side = rng.choice([-1.0, 1.0])
        centre = np.array([side * rng.uniform(0.3, 0.5), rng.uniform(-0.45, 0.45)])
        harmonics = np.column_stack([rng.uniform(0.03, 0.14, 5) / np.arange(1, 6) ** 0.3,
                                     rng.uniform(0, 2 * np.pi, 5)])
        rim, oedema = rng.uniform(0.04, 0.07), rng.uniform(1.5, 2.1)
    else:  # pituitary: small, midline, in the sella at the skull base
        radius, z_centre = rng.uniform(0.075, 0.115), rng.uniform(0.13, 0.17)
        centre = np.array([rng.normal(0, 0.02), rng.uniform(-0.2, -0.14)])
        harmonics = np.column_stack([rng.uniform(0, 0.05, 3), rng.uniform(0, 2 * np.pi, 3)])
        rim, oedema = (rng.uniform(0.25, 0.35) if rng.random() < 0.25 else 0.0), 0.0
    return _Tumour(label, centre, radius, z_centre, 0.0, harmonics, rim, oedema)


# --- rendering --------------------------------------------------------------------------------------------

def _render(head: _Head, z: float, size: int, rng: np.random.Generator, settings: DemoSettings,
            inhomogeneity: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Draw one axial slice at level z: (int16 image, uint8 mask)."""
    pixel = 2.0 / size
    grid = (np.arange(size) + 0.5) * pixel - 1.0
    x, y = np.meshgrid(grid, grid)  # image coordinates: x to the right, y down (anterior is up)
    c, s = np.cos(head.rotation), np.sin(head.rotation)
    u = c * (x - head.shift[0]) + s * (y - head.shift[1])
    v = -s * (x - head.shift[0]) + c * (y - head.shift[1])

    # The head's cross-section shrinks towards the vertex; depth = distance inwards from the skin.
    level = np.sqrt(np.clip(1 - ((z - 0.42) / 0.72) ** 2, 0.1, 1))
    a, b = head.half_axes * level
    a_eff = a * (1 + head.egg * v / b)
    rho = np.sqrt((u / a_eff) ** 2 + (v / b) ** 2)
    depth = (1 - rho) / np.maximum(np.hypot(u / a_eff ** 2, v / b ** 2) / np.maximum(rho, 1e-3), 1e-3)
    inner = head.scalp + head.bone           # depth of the inner table of the skull
    brain_depth = depth - inner - 0.01       # a thin CSF space lies between skull and cortex
    brain_a, brain_b = a - inner - 0.01, b - inner - 0.01

    fields = smooth_fields(rng, size, {"gyri": 0.04, "texture": 0.006, "fine": 0.004, "shape": 0.05,
                                       "rim": 0.03, "oedema": 0.06})
    lesion = _tumour(head.tumour, z, u, v, brain_a, brain_b, brain_depth, fields, pixel, settings)
    # Internal anatomy is drawn in warped unit-brain coordinates so a large tumour pushes it aside.
    un, vn = (u - lesion.push[0]) / brain_a, (v - lesion.push[1]) / brain_b

    image = np.zeros((size, size))
    scalp = (depth >= 0) & (depth < head.scalp)
    image[scalp] = np.where(depth[scalp] < 0.3 * head.scalp, SKIN, FAT * (1 + 0.06 * fields["texture"][scalp]))
    bone = (depth >= head.scalp) & (depth < inner)
    diploe = np.abs(depth - head.scalp - head.bone / 2) < head.bone * 0.22 * (1 + 0.3 * fields["gyri"])
    image[bone] = np.where(diploe[bone], MARROW * (1 + 0.2 * fields["texture"][bone]), BONE)
    intracranial = depth >= inner
    image[intracranial] = CSF
    tissue = _brain_tissue(z, un, vn, brain_depth, fields, pixel, rng)
    brain = intracranial & (brain_depth > 0)
    image[brain] = tissue[brain]

    # Vasogenic oedema darkens white matter around a glioma and spares the cortex.
    white = brain & (image > 0.93)
    image = np.where(white, image * (1 - (1 - OEDEMA) * lesion.oedema), image)
    if lesion.image is not None:
        image = np.where(lesion.cleft & intracranial, CSF, image)
        image = np.where(lesion.mask, lesion.image, image)

    # Coil bias (slow, multiplicative), point-spread blur, then complex Gaussian noise -> Rician magnitude.
    bx, by, bxy, brad = head.bias
    image *= 1 + bx * x + by * y + bxy * x * y + brad * (x ** 2 + y ** 2)
    if inhomogeneity is not None:
        image *= inhomogeneity
    image = ndimage.gaussian_filter(image, 0.6)
    noise = rng.standard_normal((2, size, size)) * head.noise
    image = np.hypot(image + noise[0], noise[1]) * head.wm_units
    return np.clip(np.rint(image), 0, np.iinfo(np.int16).max).astype(np.int16), lesion.mask.astype(np.uint8)


def _brain_tissue(z: float, un: np.ndarray, vn: np.ndarray, depth: np.ndarray, fields: dict, pixel: float,
                  rng: np.random.Generator) -> np.ndarray:
    """Grey/white matter with gyri, midline, ventricles, deep grey nuclei and skull-base structures at level z.

    un, vn: unit-brain coordinates (the brain outline is about the unit circle); depth: below the brain surface.
    """
    theta = np.arctan2(vn, un)
    # Sulci run inwards from the surface: zero crossings of a field that varies fast around the brain and
    # slowly with depth. A ribbon of cortex lines the surface and both banks of every sulcus; white matter
    # fills the gyral cores and everything deeper.
    sulcal = _polar_field(rng, theta, depth, along=0.02, inwards=0.08)
    gy, gx = np.gradient(sulcal, pixel)
    to_sulcus = np.abs(sulcal) / np.maximum(np.hypot(gx, gy), 1e-6)
    sulcal_depth = 0.1 + 0.04 * fields["gyri"]
    ribbon = 0.024 * (1 + 0.15 * fields["texture"])
    in_folds = depth < sulcal_depth
    fundus = (np.abs(depth - sulcal_depth) < ribbon) & (to_sulcus < 2 * ribbon)
    grey = (in_folds & (to_sulcus < ribbon)) | (depth < ribbon) | fundus
    tissue = np.where(grey, GM * (1 + 0.05 * fields["texture"]),
                      WM * (1 + 0.03 * fields["texture"] + 0.03 * fields["oedema"]))
    sulcus = in_folds & (to_sulcus < 0.004 + 0.006 * (depth < 0.03))
    tissue = np.where(sulcus, np.where(fields["fine"] > 2.4, ENHANCING_VESSEL, CSF), tissue)

    mid = _bump(z, 0.46, 0.1)  # lateral ventricles and deep grey nuclei are mid-level structures
    low = float(np.clip((0.3 - z) / 0.12, 0, 1))  # skull-base structures fade in below z = 0.3

    # Interhemispheric fissure with the enhancing falx; the corpus callosum interrupts it at mid levels.
    midline = un - 0.015 * np.sin(3 * vn)
    callosum = (vn > -0.42 * mid) & (vn < 0.5 * mid) & (mid > 0.2)
    posterior_fossa = (vn > -0.25) & (low > 0.3)  # no falx behind the sella at the skull base
    fissure = (np.abs(midline) < 0.012 + 0.012 * np.abs(vn)) & ~callosum & ~posterior_fossa
    tissue = np.where(fissure, np.where(np.abs(midline) < 0.004, ENHANCING_VESSEL * 0.9, CSF), tissue)

    if mid > 0.05:
        for (cu, cv, ru, rv), value in (((0.17, -0.22, 0.07, 0.1), 0.8), ((0.33, -0.03, 0.07, 0.16), 0.84),
                                        ((0.12, 0.12, 0.09, 0.11), 0.87)):  # caudate, lentiform, thalamus
            for side in (-1, 1):
                nucleus = ((un - side * cu) / ru) ** 2 + ((vn - cv) / rv) ** 2 < min(1.0, 2.2 * mid)
                tissue = np.where(nucleus, value * (1 + 0.03 * fields["texture"]), tissue)
        ventricle = np.zeros(un.shape, dtype=bool)
        plexus = np.zeros(un.shape, dtype=bool)
        for side in (-1, 1):
            path = np.array([(0.06, -0.36), (0.09, -0.22), (0.1, -0.06), (0.15, 0.12), (0.24, 0.27), (0.26, 0.4)])
            path[:, 0] *= side
            width = np.array([0.05, 0.07, 0.045, 0.05, 0.07, 0.03]) * min(1.0, 1.6 * mid)
            ventricle |= _near_polyline(un, vn, path, width)
            plexus |= ((un - side * 0.22) / 0.04) ** 2 + ((vn - 0.26) / 0.05) ** 2 < 1
        tissue = np.where(ventricle, np.where(plexus, ENHANCING_VESSEL, CSF), tissue)
        third = (np.abs(un) < 0.015) & (vn > -0.05) & (vn < 0.14) & (z < 0.45)
        tissue = np.where(third, CSF, tissue)
        for side in (-1, 1):  # the Sylvian fissure, deep and curved, at and below the ventricles
            path = np.array([(1.0, -0.02), (0.8, 0.02), (0.62, -0.06), (0.5, -0.02)]) * [side, 1]
            sylvian = _near_polyline(un, vn, path, np.array([0.03, 0.02, 0.015, 0.008]))
            tissue = np.where(sylvian & (z < 0.5), CSF, tissue)

    if low > 0:
        # Skull base: the cerebellum fills the posterior fossa behind the petrous ridges, the pons sits in
        # front of it, the sphenoid wings divide frontal from temporal lobes, and the cavernous sinuses
        # (enhancing, with the dark carotid flow void) flank the pituitary fossa.
        folia = _polar_field(rng, np.arctan2(vn - 0.2, un), np.hypot(un, vn - 0.2), along=0.1, inwards=0.012)
        for side in (-1, 1):
            hemisphere = ((un - side * 0.33) / 0.42) ** 2 + ((vn - 0.72) / 0.4) ** 2 < low
            tissue = np.where(hemisphere, np.where(np.abs(folia) < 0.35, GM * 0.85, 0.9 + 0.03 * fields["texture"]),
                              tissue)
        vermis_cleft = (np.abs(un) < 0.015) & (vn > 0.45)
        tissue = np.where(vermis_cleft & (low > 0.4), CSF, tissue)
        for side in (-1, 1):
            for path, widths in ((((0.12, -0.22), (0.3, -0.36), (0.55, -0.38), (0.8, -0.2)), (0.03, 0.04, 0.035, 0.01)),
                                 (((0.1, 0.0), (0.35, 0.2), (0.6, 0.38), (0.75, 0.5)), (0.035, 0.075, 0.06, 0.015))):
                ridge, w = np.array(path) * [side, 1], np.array(widths) * low
                rough = 1 + 0.25 * fields["shape"]
                tissue = np.where(_near_polyline(un, vn, ridge, w, rough), BONE, tissue)
                tissue = np.where(_near_polyline(un, vn, ridge, w * 0.4, rough), MARROW, tissue)
            sinus = ((un - side * 0.14) / 0.06) ** 2 + ((vn + 0.17) / 0.08) ** 2 < low
            carotid = ((un - side * 0.14) / 0.022) ** 2 + ((vn + 0.15) / 0.022) ** 2 < low
            tissue = np.where(sinus, np.where(carotid, BONE, 1.12), tissue)
        cistern = (un / 0.16) ** 2 + ((vn + 0.06) / 0.07) ** 2 < low
        tissue = np.where(cistern, CSF, tissue)
        pons = (un / 0.2) ** 2 + ((vn - 0.2) / 0.15) ** 2
        tissue = np.where(pons < 1.3 * low, CSF, tissue)
        tissue = np.where(pons < low, 0.9 * (1 + 0.03 * fields["texture"]), tissue)
        fourth = (un / 0.07) ** 2 + ((vn - 0.39) / 0.035) ** 2 < low
        tissue = np.where(fourth, CSF, tissue)
    return tissue


@dataclass
class _Lesion:
    mask: np.ndarray            # bool, the outlined tumour
    image: np.ndarray | None    # its intensities (None when the slice misses the tumour)
    oedema: np.ndarray          # 0..1 weight of the oedema's darkening
    cleft: np.ndarray           # bool, CSF cleft around an extra-axial tumour
    push: tuple                 # displacement of the surrounding anatomy (mass effect)


def _tumour(t: _Tumour, z, u, v, brain_a, brain_b, brain_depth, fields, pixel, settings: DemoSettings) -> _Lesion:
    """The tumour's cross-section at level z, with its class-typical appearance."""
    none = np.zeros(u.shape, dtype=bool)
    lesion = _Lesion(none, None, np.zeros(u.shape), none, (0.0, 0.0))
    distance = abs(z - t.z_centre) / t.z_radius
    # Every level within the tumour's span shows it, at least a few pixels wide even in small images.
    radius = max(t.radius * max(0.0, 1 - distance ** 2.5) ** (1 / 2.5), 1.5 * pixel)
    if t.label == 1:  # meningioma: the centre lies inside the inner table so the base abuts the dura
        direction = t.centre / np.hypot(*t.centre)
        surface = direction / np.hypot(direction[0] / brain_a, direction[1] / brain_b)
        # skull_contact: the centre near the surface, so a broad base is cut flat by the inner table
        cu, cv = surface - direction * (0.15 if settings.skull_contact else 0.55) * t.radius
    else:
        cu, cv = t.centre[0] * brain_a, t.centre[1] * brain_b
    du, dv = u - cu, v - cv
    r, phi = np.hypot(du, dv), np.arctan2(dv, du)
    if t.label == 2:  # oedema reaches further than the enhancing lesion, also above and below it
        reach = t.radius * t.oedema * max(0.0, 1 - (distance / 1.6) ** 2) ** 0.5 * (1 + 0.25 * fields["oedema"])
        lesion.oedema = np.clip((1 - r / np.maximum(reach, 1e-6)) / 0.3, 0, 1)
    if distance >= 1:
        return lesion
    k = np.arange(1, len(t.harmonics) + 1)[:, None, None]
    wobble = (t.harmonics[:, 0, None, None] * np.cos(k * phi + t.harmonics[:, 1, None, None] + 3 * z)).sum(0)
    outline = radius * (1 + wobble + (0.07 * fields["shape"] if t.label == 2 else 0))
    inside = r < outline
    if t.label == 1:
        inside &= brain_depth > -0.01  # extra-axial, but inside the skull
    lesion.mask = largest_filled(inside)
    if not lesion.mask.any():
        return lesion

    tex = fields["texture"]
    if t.label == 1:  # homogeneous avid enhancement, a thin CSF cleft around it
        lesion.image = MENINGIOMA * (1 + 0.04 * tex + 0.03 * fields["shape"])
        lesion.cleft = (r < outline + 0.012) & ~lesion.mask & (not settings.skull_contact)
    elif t.label == 2:  # irregular enhancing rim around a dark necrotic core
        rim = t.rim * np.clip(1 + 0.3 * fields["rim"], 0.5, None)
        core = r < outline - rim
        lesion.image = np.where(core, NECROSIS * (1 + 0.15 * fields["rim"]), GLIOMA_RIM * (1 + 0.08 * tex))
    else:  # bright adenoma, sometimes with a small cystic part
        cyst = np.hypot(du + 0.35 * radius, dv) < t.rim * radius
        lesion.image = np.where(cyst, 0.55, PITUITARY * (1 + 0.05 * tex))
    if settings.lesion_contrast != 1:
        lesion.image = WM + settings.lesion_contrast * (lesion.image - WM)
    # Mass effect: anatomy near the lesion is sampled from closer to its centre, i.e. pushed outwards.
    push = 0.5 * np.exp(-(r / (1.4 * radius)) ** 2) * (t.label != 3)
    lesion.push = (du * push, dv * push)
    return lesion


# --- helpers ----------------------------------------------------------------------------------------------

def smooth_fields(rng: np.random.Generator, size: int,
                  scales: dict[str, float | tuple[float, float]]) -> dict[str, np.ndarray]:
    """Independent Gaussian random fields with unit variance and the given correlation lengths (in image
    half-widths, so the anatomy looks the same at every size), filtered in Fourier space in one batch.
    A (vertical, horizontal) pair of lengths gives an anisotropic field, e.g. streaks of layered tissue."""
    noise = fft.rfft2(rng.standard_normal((len(scales), size, size), dtype=np.float32))
    fields = fft.irfft2(noise * _gaussian_gain(size, tuple(scales.values())), s=(size, size)).astype(np.float64)
    fields /= fields.std(axis=(1, 2), keepdims=True)
    return dict(zip(scales, fields))


@functools.lru_cache(maxsize=8)
def _gaussian_gain(size: int, scales: tuple[float | tuple[float, float], ...]) -> np.ndarray:
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    sigmas = np.array([s if isinstance(s, tuple) else (s, s) for s in scales]) * size / 2
    sy, sx = sigmas[:, 0, None, None], sigmas[:, 1, None, None]
    return np.exp(-2 * ((np.pi * sy * fy) ** 2 + (np.pi * sx * fx) ** 2)).astype(np.float32)


def _polar_field(rng: np.random.Generator, theta: np.ndarray, radius: np.ndarray, along: float,
                 inwards: float) -> np.ndarray:
    """A unit-variance random field with different correlation lengths around (angle, at radius ~0.7) and
    across (radius or depth) a centre: its zero crossings make sulci running inwards or folia running around.
    Drawn on a fixed polar lattice, so it does not depend on the image size."""
    n_angle, n_radius, extent = 512, 96, 1.2
    lattice = rng.standard_normal((n_radius, n_angle))
    cell_angle, cell_radius = 0.7 * 2 * np.pi / n_angle, extent / n_radius
    lattice = ndimage.gaussian_filter(lattice, (inwards / cell_radius, along / cell_angle), mode=("nearest", "wrap"))
    lattice /= lattice.std()
    rows = np.clip(radius, 0, extent) / cell_radius
    cols = (theta % (2 * np.pi)) / (2 * np.pi) * n_angle
    return ndimage.map_coordinates(lattice, [rows, cols], order=1, mode="grid-wrap")


def _near_polyline(u: np.ndarray, v: np.ndarray, points: np.ndarray, widths: np.ndarray,
                   scale: np.ndarray | float = 1.0) -> np.ndarray:
    """Pixels within a width (interpolated along the path, times `scale`) of a polyline: tubes such as
    ventricles or bone ridges. Only pixels in the path's bounding box are measured (speed)."""
    reach = widths.max() * np.max(scale)
    (u0, v0), (u1, v1) = points.min(0) - reach, points.max(0) + reach
    box = np.flatnonzero((u >= u0) & (u <= u1) & (v >= v0) & (v <= v1))
    bu, bv = u.ravel()[box], v.ravel()[box]
    bscale = np.ravel(scale)[box] if np.ndim(scale) else scale
    near = np.zeros(box.size, dtype=bool)
    for (p, q), (w0, w1) in zip(zip(points[:-1], points[1:]), zip(widths[:-1], widths[1:])):
        d = q - p
        t = np.clip(((bu - p[0]) * d[0] + (bv - p[1]) * d[1]) / (d @ d), 0, 1)
        near |= np.hypot(bu - p[0] - t * d[0], bv - p[1] - t * d[1]) < (w0 + t * (w1 - w0)) * bscale
    inside = np.zeros(u.size, dtype=bool)
    inside[box] = near
    return inside.reshape(u.shape)


def _bump(z: float, centre: float, width: float) -> float:
    return float(np.exp(-((z - centre) / width) ** 2))


def largest_filled(mask: np.ndarray) -> np.ndarray:
    """The largest connected region with its holes filled: one lesion as a radiologist would outline it."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    largest = 1 + np.argmax(ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1)))
    return ndimage.binary_fill_holes(labels == largest)


# Moore-neighbourhood steps (row, col), clockwise on screen starting west.
_STEPS = ((0, -1), (-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1))


def border_polygon(mask: np.ndarray) -> np.ndarray:
    """The mask's outer boundary as MATLAB-style x,y (1-based column, row) pairs, interleaved in one row.

    Moore-neighbour tracing of the first region in raster order; only the corners of the pixel chain are kept,
    as a drawn polygon would. Empty mask -> empty array. Every point is the centre of a mask pixel.
    """
    padded = np.pad(np.asarray(mask, dtype=bool), 1)
    rows, cols = np.nonzero(padded)
    if rows.size == 0:
        return np.zeros(0)
    start = (int(rows[0]), int(cols[0]))  # top-most, then left-most: its west neighbour is background
    chain, point, back = [start], start, 0
    while True:
        for k in range(1, 9):
            d = (back + k) % 8
            nxt = (point[0] + _STEPS[d][0], point[1] + _STEPS[d][1])
            if padded[nxt]:
                break
        else:
            break  # a single isolated pixel
        if point == start and len(chain) > 1 and nxt == chain[1]:
            break  # about to walk the first step again: the loop is closed
        prev = _STEPS[(d - 1) % 8]
        back = _STEPS.index((point[0] + prev[0] - nxt[0], point[1] + prev[1] - nxt[1]))
        point = nxt
        if point != start:
            chain.append(point)
    chain = np.array(chain)
    if len(chain) > 2:  # keep a point only where the chain turns
        step_in = chain - np.roll(chain, 1, axis=0)
        step_out = np.roll(chain, -1, axis=0) - chain
        chain = chain[(step_in != step_out).any(axis=1)]
    # The padding shifted indices by one, so padded (row, col) already are MATLAB's 1-based (y, x).
    return chain[:, ::-1].astype(np.float64).ravel()
