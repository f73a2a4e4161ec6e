"""Figshare brain-tumour dataset (Cheng et al.): one MATLAB .mat per slice holding the struct `cjdata`.

Files are MATLAB v7.3 (HDF5 with a 512-byte MATLAB header; read with h5py, arrays come back transposed)
or, in some re-distributions, v5 (read with scipy). `cvind.mat` holds the 5-fold id of every slice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import hdf5storage
import numpy as np
import scipy.io

from ..errors import DataError
from .records import CLASS_NAMES, SliceRecord

REQUIRED_FIELDS = ("label", "PID", "image", "tumorMask")
CVIND_NAME = "cvind.mat"


def read_figshare_mat(path: str | Path) -> SliceRecord:
    """Read one slice file (v7.3 or v5) into a SliceRecord; DataError names the file and what is wrong."""
    path = Path(path)
    cjdata, transposed = _load_variable(path, "cjdata")
    if not isinstance(cjdata, dict):
        raise DataError(path, "'cjdata' is not a struct")
    missing = [name for name in REQUIRED_FIELDS if name not in cjdata]
    if missing:
        raise DataError(path, f"cjdata lacks field(s) {', '.join(missing)}")
    image, mask = (np.asarray(cjdata[name]) for name in ("image", "tumorMask"))
    if image.ndim != 2:
        raise DataError(path, f"image has shape {image.shape}, expected a 2-D slice")
    if transposed:  # h5py hands MATLAB's column-major arrays over transposed
        image, mask = image.T, mask.T
    pid = _decode_text(cjdata["PID"])
    if not pid:
        raise DataError(path, "PID is empty, so the slice cannot be kept to one patient's split")
    record = SliceRecord(image.astype(np.float32), (mask > 0).astype(np.uint8), _read_label(path, cjdata["label"]),
                         pid, str(path))
    return record.check()


def read_cvind(path: str | Path) -> np.ndarray:
    """Fold id (1, 2, ...) of every slice in `cvind.mat`: entry i belongs to file `{i+1}.mat`."""
    path = Path(path)
    value, _ = _load_variable(path, "cvind")
    folds = np.asarray(value, dtype=np.float64).ravel() if not isinstance(value, dict) else np.zeros(0)
    if folds.size == 0 or not np.isfinite(folds).all() or (folds != np.round(folds)).any() or folds.min() < 1:
        raise DataError(path, "'cvind' must be a non-empty vector of whole fold numbers 1, 2, ...")
    return folds.astype(np.int64)


def find_figshare_files(folder: str | Path) -> list[Path]:
    """Slice files under `folder` (any depth, so the four unzipped parts can sit side by side), in numeric order.

    Skips `cvind.mat` and hidden files (e.g. macOS `._1.mat` forks left by unzipping).
    """
    files = [p for p in Path(folder).rglob("*.mat") if p.name.lower() != CVIND_NAME and not p.name.startswith(".")]
    return sorted(files, key=lambda p: (0, int(p.stem), str(p)) if p.stem.isdigit() else (1, 0, str(p)))


def find_cvind(folder: str | Path) -> Path | None:
    found = sorted(p for p in Path(folder).rglob("*.mat") if p.name.lower() == CVIND_NAME)
    return found[0] if found else None


def _read_label(path: Path, value: Any) -> int:
    label = np.asarray(value, dtype=np.float64).ravel()
    valid = [k for k in CLASS_NAMES if k > 0]
    if label.size != 1 or label[0] not in valid:
        names = ", ".join(f"{k} ({CLASS_NAMES[k]})" for k in valid)
        raise DataError(path, f"label {label.tolist()} is not one of {names}")
    return int(label[0])


def _decode_text(value: Any) -> str:
    """MATLAB char arrays: uint16 codes from h5py, numpy strings from scipy."""
    arr = np.asarray(value)
    if arr.dtype.kind in "US":
        return "".join(str(x) for x in arr.ravel()).strip()
    return "".join(map(chr, arr.ravel().astype(np.int64))).strip()


def _mat_version(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(128)
    except OSError as exc:
        raise DataError(path, f"cannot open ({exc.strerror})") from None
    if not head:
        raise DataError(path, "file is empty")
    if h5py.is_hdf5(path):
        return "7.3"
    if head.startswith(b"MATLAB 7.3"):
        raise DataError(path, "truncated or damaged MATLAB v7.3 file: no HDF5 data after the MATLAB header")
    if head.startswith(b"MATLAB 5.0"):
        return "5"
    raise DataError(path, "not a MATLAB .mat file (neither v7.3/HDF5 nor v5)")


def _load_variable(path: Path, name: str) -> tuple[Any, bool]:
    """One variable of a .mat file: a struct as a dict of arrays, anything else as an array.

    The flag says whether 2-D arrays come back transposed (true for v7.3 read through h5py).
    """
    version = _mat_version(path)
    try:
        if version == "7.3":
            with h5py.File(path, "r") as f:
                if name not in f:
                    raise DataError(path, f"no '{name}' variable (found: {', '.join(sorted(f)) or 'nothing'})")
                obj = f[name]
                if isinstance(obj, h5py.Group):
                    return {key: _h5_value(obj[key]) for key in obj}, True
                return _h5_value(obj), True
        mat = scipy.io.loadmat(path, variable_names=[name], squeeze_me=False, struct_as_record=False)
        if name not in mat:
            found = ", ".join(entry[0] for entry in scipy.io.whosmat(path))
            raise DataError(path, f"no '{name}' variable (found: {found or 'nothing'})")
        value = mat[name]
        if value.dtype == object and value.size == 1 and isinstance(value.flat[0], scipy.io.matlab.mat_struct):
            struct = value.flat[0]
            return {key: getattr(struct, key) for key in struct._fieldnames}, False
        return value, False
    except DataError:
        raise
    except Exception as exc:  # h5py, scipy and zlib raise many types for damaged files
        raise DataError(path, f"unreadable MATLAB v{version} file ({type(exc).__name__}: {exc})") from None


def _h5_value(dataset: Any) -> np.ndarray:
    if not isinstance(dataset, h5py.Dataset):
        raise ValueError(f"{dataset.name} is a nested group, expected an array")
    if dataset.attrs.get("MATLAB_empty", 0):  # MATLAB stores an empty array's shape as its data
        return np.zeros(0)
    return dataset[()]


def write_figshare_mat(path: str | Path, image: np.ndarray, mask: np.ndarray, label: int, pid: str,
                       border: np.ndarray | None = None) -> None:
    """Write one slice exactly as the dataset's v7.3 files are laid out (MATLAB reads the result).

    image int16 (H, W), mask 0/1 (H, W) stored as MATLAB logical, label 1..3 as a 1x1 double, PID as a 1xn
    char row, border as a 1x2k double row of x,y polygon coordinates (1-based, MATLAB style).
    """
    cjdata = {
        "label": np.array([[float(label)]]),
        "PID": np.str_(pid),
        "image": np.asarray(image, dtype=np.int16),
        "tumorMask": np.asarray(mask).astype(bool),
        "tumorBorder": np.asarray(border if border is not None else np.zeros(0), dtype=np.float64).reshape(1, -1),
    }
    hdf5storage.savemat(str(path), {"cjdata": cjdata}, format="7.3", matlab_compatible=True,
                        store_python_metadata=False)


def write_cvind_mat(path: str | Path, folds: np.ndarray) -> None:
    """Write `cvind.mat` (v7.3): a 1xN double row of fold ids 1..5, slice i+1 in column i."""
    hdf5storage.savemat(str(path), {"cvind": np.asarray(folds, dtype=np.float64).reshape(1, -1)}, format="7.3",
                        matlab_compatible=True, store_python_metadata=False)
