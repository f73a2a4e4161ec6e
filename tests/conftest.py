"""Fixture writers for raw datasets in their real on-disk layouts (MATLAB v7.3 / v5, NIfTI, PNG folders).

Factories rather than fixed fixtures, so each test builds just what it needs; other test files may use them.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import scipy.io
from PIL import Image, ImageDraw

from genseg.data.figshare import write_cvind_mat, write_figshare_mat

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def genseg_cli():
    """genseg_cli(*args, returncode=0): run `python -m genseg ARGS` as a user would, with this checkout's code
    first on the path; asserts the exit code and returns the CompletedProcess (text stdout/stderr)."""

    def run(*args, returncode: int = 0) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        done = subprocess.run([sys.executable, "-m", "genseg", *map(str, args)], env=env, capture_output=True,
                              text=True, timeout=180)
        assert done.returncode == returncode, done.stderr
        return done

    return run


def polygon_slice(size: int, polygon: list[tuple[float, float]], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An int16 scanner-like slice (H = W = size) with a bright tumour filling `polygon` ((x, y) = (col, row))."""
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon(polygon, fill=1, outline=1)
    mask = np.asarray(canvas, dtype=np.uint8)
    rng = np.random.default_rng(seed)
    image = rng.normal(400, 60, (size, size)) + 900.0 * mask
    return image.astype(np.int16), mask


def matlab_border(polygon: list[tuple[float, float]]) -> np.ndarray:
    """tumorBorder as MATLAB stores it: x1, y1, x2, y2, ... with 1-based coordinates."""
    return (np.asarray(polygon, dtype=np.float64) + 1).ravel()


def tumour_polygon(size: int) -> list[tuple[float, float]]:
    """A lopsided quadrilateral in the upper right: its transpose lands somewhere else entirely."""
    s = size / 64
    return [(40 * s, 6 * s), (58 * s, 10 * s), (52 * s, 22 * s), (44 * s, 16 * s)]


@pytest.fixture
def make_figshare():
    """make_figshare(folder, sizes, cvind=True): one v7.3 file per entry of `sizes` (1.mat, 2.mat, ...).

    Slice i has label 1 + i % 3 and patient P{i // 2} (two slices per patient); returns the list of labels.
    """

    def make(folder: Path, sizes=(64,) * 6, cvind: bool = True) -> list[int]:
        folder.mkdir(parents=True, exist_ok=True)
        labels = []
        for i, size in enumerate(sizes):
            polygon = tumour_polygon(size)
            image, mask = polygon_slice(size, polygon, seed=i)
            labels.append(1 + i % 3)
            write_figshare_mat(folder / f"{i + 1}.mat", image, mask, labels[-1], f"P{i // 2}", matlab_border(polygon))
        if cvind:
            write_cvind_mat(folder / "cvind.mat", [1 + (i // 2) % 5 for i in range(len(sizes))])
        return labels

    return make


def write_v5_slice(path: Path, image, mask, label=2.0, pid="v5pid", border=None, drop=()) -> None:
    """A MATLAB v5 `cjdata` struct the way scipy (and older MATLAB `save -v7`) writes it."""
    cjdata = {"label": np.array([[float(label)]]), "PID": pid, "image": image, "tumorMask": np.asarray(mask, bool),
              "tumorBorder": np.zeros((1, 0)) if border is None else np.asarray(border, float).reshape(1, -1)}
    scipy.io.savemat(path, {"cjdata": {k: v for k, v in cjdata.items() if k not in drop}})


@pytest.fixture
def make_brats_case():
    """make_brats_case(folder, name, ...): a small BraTS case (NIfTI, RAS identity affine unless given).

    Volume 40 x 48 x 12: brain (a non-zero ellipse) in slices 2..9, tumour labels 1/2/4 in slices 4..6 at the
    patient's right-anterior (high x, high y). `names` lays the files out as a release does: "2020" (also 2021)
    <name>_<modality>, "2023" <name>-<modality>, "bare" <modality>. Returns the case folder.
    """

    def make(folder: Path, name: str = "BraTS20_Training_001", modalities=("t1", "t1ce", "t2", "flair"),
             seg: bool = True, suffix: str = ".nii.gz", affine=None, seg_labels=(1, 2, 4), names: str = "2020") -> Path:
        case = folder / name
        case.mkdir(parents=True, exist_ok=True)
        x, y = np.meshgrid(np.arange(40), np.arange(48), indexing="ij")
        brain = ((x - 20) / 17) ** 2 + ((y - 24) / 21) ** 2 <= 1
        image = np.zeros((40, 48, 12), np.float32)
        image[:, :, 2:10] = brain[..., None] * (300 + 10 * np.arange(8))
        labels = np.zeros((40, 48, 12), np.uint8)
        for k, z in enumerate(range(4, 7)):  # one label per tumour slice: all of them count as whole tumour
            labels[28:33, 32:38, z] = seg_labels[k % len(seg_labels)]
        image += (labels > 0) * 500.0
        aff = np.eye(4) if affine is None else affine
        if affine is not None:  # store the same anatomy in the file's own axis directions
            flips = [axis for axis in range(3) if affine[axis, axis] < 0]
            image, labels = np.flip(image, flips).copy(), np.flip(labels, flips).copy()
        prefix = {"2020": f"{name}_", "2023": f"{name}-", "bare": ""}[names]
        for modality in modalities:
            nib.save(nib.Nifti1Image(image * (1 + 0.1 * len(modality)), aff), case / f"{prefix}{modality}{suffix}")
        if seg:
            nib.save(nib.Nifti1Image(labels, aff, dtype=np.uint8), case / f"{prefix}seg{suffix}")
        return case

    return make


def save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


@pytest.fixture
def make_busi():
    """make_busi(folder): benign (split mask), malignant (RGB image and RGB mask), normal (empty mask), 40 x 32.

    Returns {image name: expected binary mask}.
    """

    def make(folder: Path) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(0)
        grey = rng.integers(0, 200, (32, 40)).astype(np.uint8)
        top, bottom = np.zeros((32, 40), np.uint8), np.zeros((32, 40), np.uint8)
        top[3:8, 5:15], bottom[20:28, 22:35] = 255, 255
        save_png(folder / "benign" / "benign (1).png", grey)
        save_png(folder / "benign" / "benign (1)_mask.png", top)
        save_png(folder / "benign" / "benign (1)_mask_1.png", bottom)
        rgb_mask = np.zeros((32, 40, 3), np.uint8)
        rgb_mask[10:20, 10:20, 0] = 255  # tumour marked in the red channel only
        save_png(folder / "malignant" / "malignant (1).png", np.stack([grey] * 3, axis=-1))
        save_png(folder / "malignant" / "malignant (1)_mask.png", rgb_mask)
        save_png(folder / "normal" / "normal (1).png", grey[::-1])
        save_png(folder / "normal" / "normal (1)_mask.png", np.zeros((32, 40), np.uint8))
        return {"benign (1).png": (top | bottom) > 0, "malignant (1).png": rgb_mask[..., 0] > 0,
                "normal (1).png": np.zeros((32, 40), bool)}

    return make


def oblique_orientation(about_x: float = 20.0, about_z: float = 10.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row cosines, column cosines, slice normal) of an axial plane tilted about x then turned about z (degrees)."""
    ax, az = np.radians(about_x), np.radians(about_z)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    r = rz @ rx
    return r[:, 0], r[:, 1], r[:, 2]


def write_dicom_series(folder: Path, stored: np.ndarray, description: str = "T1 AX POST", gap: float = 3.0,
                       spacing=(0.9, 0.8), orientation=None, positions=None, slope: float = 1.0,
                       intercept: float = 0.0, seed: int = 0, study_uid: str | None = None) -> list[dict]:
    """One MR series the way a scanner exports it: a file per slice with random names (so the file order says
    nothing), slices along an oblique normal, InstanceNumber counting down the stack, RescaleSlope/Intercept, and
    the patient/study/frame-of-reference modules a viewer (and highdicom) needs. `stored` (N, H, W) holds the
    stored values of slice k at position origin + k * gap * normal unless `positions` gives them. Returns per
    slice (in stack order) its path, SOPInstanceUID and ImagePositionPatient."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    row, column, normal = oblique_orientation() if orientation is None else orientation
    origin = np.array([-100.0, -120.0, 40.0])
    rng = np.random.default_rng(seed)
    series_uid, frame_uid, study_uid = generate_uid(), generate_uid(), study_uid or generate_uid()
    written = []
    for k, pixels in enumerate(stored):
        ipp = origin + k * gap * normal if positions is None else np.asarray(positions[k], float)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Patient", "P-0001", "19700101", "O"
        ds.StudyInstanceUID, ds.StudyID, ds.StudyDate, ds.StudyTime = study_uid, "1", "20240101", "120000"
        ds.AccessionNumber, ds.ReferringPhysicianName = "A1", ""
        ds.Modality, ds.Manufacturer = "MR", "genseg tests"
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series_uid, 3, description
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        ds.InstanceNumber = len(stored) - k
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row, *column)]
        ds.PixelSpacing, ds.SliceThickness = list(spacing), gap
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "US"
        ds.PixelData = pixels.astype(np.int16).tobytes()
        path = folder / f"IM{rng.integers(10**8):08d}"
        ds.save_as(path, enforce_file_format=True)
        written.append({"path": path, "uid": ds.SOPInstanceUID, "ipp": ipp})
    return written


def write_enhanced_mr(path: Path, stored: np.ndarray | None = None, frames: int = 24, seed: int = 0) -> Path:
    """nibabel's real Philips Enhanced MR Image Storage file (176 sagittal 256 x 256 frames in one file, per-frame
    positions and rescaling in functional groups) cut to `frames` of them in a seeded random order (the shipped
    file stores them in stack order, which would hide a reader that ignores positions), with `stored`
    (frames, 256, 256) values, or seeded random ones, written into its pixel data (the shipped pixels are all
    zero). The stack of frames kept is still evenly spaced: every 176 // frames-th frame of the original."""
    import gzip

    import pydicom

    shipped = Path(nib.__file__).parent / "nicom" / "tests" / "data" / "philips_mprage.dcm.gz"
    ds = pydicom.dcmread(io.BytesIO(gzip.decompress(shipped.read_bytes())))
    rng = np.random.default_rng(seed)
    groups = list(ds.PerFrameFunctionalGroupsSequence)[:: len(ds.PerFrameFunctionalGroupsSequence) // frames][:frames]
    ds.PerFrameFunctionalGroupsSequence = [groups[k] for k in rng.permutation(frames)]
    ds.NumberOfFrames = frames
    if stored is None:
        stored = rng.integers(0, 2**12, (int(ds.NumberOfFrames), ds.Rows, ds.Columns))
    ds.PixelData = stored.astype(np.uint16).tobytes()
    ds.save_as(path)
    return path
