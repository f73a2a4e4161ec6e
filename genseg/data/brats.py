"""BraTS case folders: one NIfTI volume per modality plus a segmentation, cut into axial slices.

The releases name files differently, and the naming is told apart per case from the file names:
2020 `BraTS20_Training_001_{t1,t1ce,t2,flair,seg}.nii.gz`, 2021 the same names with `BraTS2021_00000`,
2023-2024 `BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz` (challenges GLI, MEN, MET, PED, SSA), and bare
`t1c.nii.gz` (or `t1ce.nii.gz`) in a case folder. Either vocabulary asks for the same modality (t1 = t1n,
t1ce = t1c, t2 = t2w, flair = t2f). The seg labels follow the naming: enhancing tumour is 4 in 2020/2021 and 3
from 2023 on; 1 is the necrotic core and 2 oedema in both. The binary mask is the `target`: whole tumour (wt),
tumour core (tc = necrotic core + enhancing) or enhancing tumour (et).
Every tumour slice is kept, plus a seeded share of tumour-free brain slices (the model must learn to predict
nothing there); slices outside the brain (constant, usually all zero) are skipped.
Slices are shown the way radiologists view axial images, as in the Figshare set: anterior at the top, the
patient's right on the image's left, whatever the orientation stored in the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from ..errors import DataError
from .records import SliceRecord, sample_slices

# both vocabularies, mapped to the 2023 names that genseg uses inside
CANONICAL = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "t1n": "t1n", "t1c": "t1c", "t2w": "t2w",
             "t2f": "t2f"}
MODALITIES = tuple(CANONICAL)
NAMES_2020 = {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair"}
TARGETS = ("wt", "tc", "et")
NECROTIC, OEDEMA = 1, 2
ENHANCING = {"2020": 4, "2023": 3}  # by vocabulary: 2020 names (2020, 2021) or 2023 names (2023, 2024)
CHALLENGE_LABELS = {"MEN": 1, "MET": -1}  # meningioma; metastases are none of genseg's classes (-1 = unknown)
GLIOMA = 2  # BraTS 2020/2021 and the GLI, PED and SSA challenges are gliomas; tumour-free slices get 0
NIFTI_SUFFIXES = (".nii.gz", ".nii")
_CHALLENGE = re.compile(r"brats-([a-z]+)-", re.I)


@dataclass(frozen=True)
class Naming:
    """How one case folder names its files: the release, the vocabulary and the separator before the kind."""

    release: str  # "2020", "2021", "2023" or "bare"
    vocabulary: str  # "2020" (t1, t1ce, t2, flair) or "2023" (t1n, t1c, t2w, t2f)

    @property
    def enhancing(self) -> int:
        return ENHANCING[self.vocabulary]

    @property
    def labels(self) -> tuple[int, ...]:
        return (0, NECROTIC, OEDEMA, self.enhancing)

    def target_labels(self, target: str) -> tuple[int, ...]:
        return {"wt": (NECROTIC, OEDEMA, self.enhancing), "tc": (NECROTIC, self.enhancing),
                "et": (self.enhancing,)}[target]

    def word(self, kind: str) -> str:
        """What this vocabulary calls `kind` (a canonical modality or "seg")."""
        return NAMES_2020.get(kind, kind) if self.vocabulary == "2020" else kind

    def file_name(self, case: Path, kind: str, suffix: str = ".nii.gz") -> str:
        """The name this naming gives the `kind` volume of `case`."""
        if self.release == "bare":
            return f"{self.word(kind)}{suffix}"
        return f"{case.name}{'-' if self.release == '2023' else '_'}{self.word(kind)}{suffix}"

    def describe(self) -> str:
        names = "t1/t1ce/t2/flair" if self.vocabulary == "2020" else "t1n/t1c/t2w/t2f"
        release = f"bare names ({names})" if self.release == "bare" else f"BraTS {self.release} ({names})"
        return f"{release}, enhancing = {self.enhancing}"


def find_brats_cases(folder: str | Path) -> list[Path]:
    """Folders (at any depth) that hold at least one BraTS modality or seg volume in any release's naming."""
    return sorted({p.parent for p in Path(folder).rglob("*.nii*") if _volume_kind(p) is not None})


def case_naming(case: str | Path) -> Naming:
    """The naming of a case folder, told from its volumes' names; DataError if it mixes the vocabularies."""
    case = Path(case)
    kinds = [k for k in (_volume_kind(p) for p in sorted(case.iterdir())) if k is not None]
    vocabularies = {vocabulary for _, vocabulary, _ in kinds if vocabulary}
    if len(vocabularies) > 1:
        raise DataError(case, "BraTS case mixes 2020 names (t1, t1ce, t2, flair) and 2023 names (t1n, t1c, t2w, "
                              "t2f); keep one naming per case folder")
    vocabulary = vocabularies.pop() if vocabularies else "2020"
    if any(separator == "" for *_, separator in kinds):
        return Naming("bare", vocabulary)
    if vocabulary == "2023":
        return Naming("2023", vocabulary)
    return Naming("2021" if case.name.lower().startswith("brats2021") else "2020", vocabulary)


def read_brats_case(case: str | Path, modality: str = "t1ce", empty_fraction: float = 0.1, seed: int = 0,
                    target: str = "wt") -> list[SliceRecord]:
    """All tumour slices of one case plus `empty_fraction` of its tumour-free brain slices, in axial order
    (records.sample_slices, seeded by the case name)."""
    case = Path(case)
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    naming = case_naming(case)
    image_path, seg_path = _find_volume(case, CANONICAL[modality], naming), _find_volume(case, "seg", naming)
    image, seg = _load_volume(image_path), _load_volume(seg_path)
    if image.shape != seg.shape:
        raise DataError(seg_path, f"segmentation shape {seg.shape} differs from the {modality} volume's {image.shape}")
    if not np.isfinite(image).all():
        raise DataError(image_path, "volume contains NaN or infinite values")
    unexpected = [f"{v:g}" for v in np.unique(seg).tolist() if v not in naming.labels]
    if unexpected:
        raise DataError(seg_path, f"unexpected segmentation labels {', '.join(unexpected[:5])}; BraTS uses "
                                  f"{', '.join(map(str, naming.labels))} with {naming.describe()}")

    mask = np.isin(seg, naming.target_labels(target))
    brain = image.max(axis=(0, 1)) > image.min(axis=(0, 1))
    tumour = mask.any(axis=(0, 1)) & brain
    label = _tumour_label(case)
    records = []
    for z in sample_slices(tumour, brain, empty_fraction, seed, case.name):
        record = SliceRecord(_radiological(image[:, :, z]), _radiological(mask[:, :, z]).astype(np.uint8),
                             label if tumour[z] else 0, case.name, str(image_path), slice_index=int(z))
        records.append(record.check())
    return records


def _tumour_label(case: Path) -> int:
    """The class of a case's tumour slices, from its challenge (BraTS-MEN-..., BraTS-MET-...)."""
    names = [case.name] + [p.name for p in case.iterdir()]
    challenge = next((m[1].upper() for m in map(_CHALLENGE.match, names) if m), "GLI")
    return CHALLENGE_LABELS.get(challenge, GLIOMA)


def _radiological(axial: np.ndarray) -> np.ndarray:
    """RAS voxel slice (x right, y anterior) -> rows anterior to posterior, columns patient's right to left."""
    return np.ascontiguousarray(np.flip(axial.T, axis=(0, 1)))


def _volume_kind(path: Path) -> tuple[str, str | None, str] | None:
    """(canonical kind, vocabulary or None for seg, separator: "_", "-" or "" for a bare name) of a volume."""
    name = path.name.lower()
    suffix = next((s for s in NIFTI_SUFFIXES if name.endswith(s)), None)
    if suffix is None:
        return None
    stem = name[: -len(suffix)]
    for separator in ("", "_", "-"):
        word = stem.rsplit(separator, 1)[-1] if separator else stem
        if word == "seg":
            return "seg", None, separator
        if word in CANONICAL:
            return CANONICAL[word], "2020" if word in NAMES_2020.values() else "2023", separator
    return None


def _find_volume(case: Path, kind: str, naming: Naming) -> Path:
    found = sorted(p for p in case.iterdir() if _volume_kind(p) is not None and _volume_kind(p)[0] == kind)
    if len(found) == 1:
        return found[0]
    expected = case / naming.file_name(case, kind)
    if found:
        raise DataError(expected, f"BraTS case {case.name} has {len(found)} {naming.word(kind)} volumes: "
                                  f"{', '.join(p.name for p in found)}")
    problem = (f"BraTS case {case.name} has no {naming.word(kind)} volume ({naming.file_name(case, kind)} or "
               f"{naming.file_name(case, kind, '.nii')}; the case uses {naming.describe()})")
    if kind == "seg":
        others = [p.name for p in sorted(case.iterdir()) if p.name.lower().endswith(NIFTI_SUFFIXES)
                  and _volume_kind(p) is None]
        problem += "; validation cases ship without one and cannot be used for training"
        if others:
            problem += (f". Found other NIfTI file(s): {', '.join(others)}. If one is the segmentation (a known "
                        f"re-distribution names case 355's seg 'W39_1998.09.19_Segm.nii'), rename it to "
                        f"{naming.file_name(case, 'seg', '.nii')}")
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
