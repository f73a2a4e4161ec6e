"""Figshare brain-tumour dataset (Cheng et al.): one MATLAB .mat per slice holding the struct `cjdata`.

Files are MATLAB v7.3 (HDF5 with a 512-byte MATLAB header; read with h5py, arrays come back transposed)
or, in some re-distributions, v5 (read with scipy). `cvind.mat` holds the 5-fold id of every slice.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Any

import h5py
import hdf5storage
import numpy as np
import scipy.io

from ..errors import DataError
from .decode import HDF5_SIGNATURE, MAX_SIDE, MAX_SLICE_PIXELS, UPLOAD
from .hdf5 import Spec, check_dataset, check_values, member, small_attribute
from .records import CLASS_NAMES, SliceRecord

REQUIRED_FIELDS = ("label", "PID", "image", "tumorMask")
CVIND_NAME = "cvind.mat"
MAX_SMALL_VALUES = 256  # label values, PID characters: far beyond any real file
MAX_FOLD_IDS = 2**20  # entries of cvind.mat
HEADER_SLACK = 2**20  # bytes of a .mat beyond its arrays' data: headers, tumorBorder


def read_figshare_mat(source: str | Path | bytes, max_pixels: int = MAX_SLICE_PIXELS) -> SliceRecord:
    """Read one slice file (v7.3 or v5; a path or the file's bytes) into a SliceRecord.

    DataError names the file and what is wrong: anything stored outside the file, unusual HDF5 filters or
    types, images over MAX_SIDE or `max_pixels`, and files that would inflate beyond that are refused before
    their data is read. Only the required fields are read.
    """
    where = UPLOAD if isinstance(source, bytes) else str(source)
    image_spec = Spec(max_values=max_pixels, max_side=MAX_SIDE)
    small = Spec(max_values=MAX_SMALL_VALUES)
    fields = {"label": small, "PID": Spec("biufT", MAX_SMALL_VALUES), "image": image_spec, "tumorMask": image_spec}
    cjdata, transposed = _load_struct(source, where, "cjdata", fields, 16 * max_pixels + HEADER_SLACK)
    image, mask = cjdata["image"], cjdata["tumorMask"]
    if image.ndim != 2:
        raise DataError(where, f"image has shape {image.shape}, expected a 2-D slice")
    if transposed:  # h5py hands MATLAB's column-major arrays over transposed
        image, mask = image.T, mask.T
    pid = _decode_text(where, "PID", cjdata["PID"])
    if not pid:
        raise DataError(where, "PID is empty, so the slice cannot be kept to one patient's split")
    record = SliceRecord(image.astype(np.float32), (mask > 0).astype(np.uint8), _read_label(where, cjdata["label"]),
                         pid, where)
    return record.check()


def read_cvind(path: str | Path) -> np.ndarray:
    """Fold id (1, 2, ...) of every slice in `cvind.mat`: entry i belongs to file `{i+1}.mat`."""
    path = Path(path)
    spec = Spec(max_values=MAX_FOLD_IDS)
    folds = _load_array(path, str(path), "cvind", spec, 8 * MAX_FOLD_IDS + HEADER_SLACK)
    folds = np.asarray(folds, dtype=np.float64).ravel()
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


def _read_label(where: str, value: np.ndarray) -> int:
    label = np.asarray(value, dtype=np.float64).ravel()
    valid = [k for k in CLASS_NAMES if k > 0]
    if label.size != 1 or label[0] not in valid:
        names = ", ".join(f"{k} ({CLASS_NAMES[k]})" for k in valid)
        found = f"it is {label[0]:g}" if label.size == 1 else f"it holds {label.size} values"
        raise DataError(where, f"label is not one of {names}", found)
    return int(label[0])


def _decode_text(where: str, name: str, value: np.ndarray) -> str:
    """MATLAB char arrays: uint16 codes from h5py, numpy strings from scipy; printable text only."""
    if value.dtype.kind in "US":
        text = "".join(str(x) for x in value.ravel())
    else:
        codes = value.ravel().astype(np.float64)
        whole = np.isfinite(codes) & (codes == np.round(codes))
        if not (whole & (codes >= 0) & (codes <= 0xFFFF)).all():
            raise DataError(where, f"{name} is not MATLAB text (whole character codes 0..65535)")
        text = "".join(map(chr, codes.astype(np.int64)))
    text = text.strip()
    if not text.isprintable():
        raise DataError(where, f"{name} holds control or non-printable characters")
    return text


def _read_source(source: str | Path | bytes, where: str, max_bytes: int) -> bytes:
    """The file's bytes, refusing a file larger than anything it may hold could need."""
    if isinstance(source, bytes):
        data = source
    else:
        try:
            with open(source, "rb") as f:
                data = f.read(max_bytes + 1)
        except OSError as exc:
            raise DataError(where, f"cannot open ({exc.strerror})") from None
    if not data:
        raise DataError(where, "file is empty")
    if len(data) > max_bytes:
        raise DataError(where, f"file is larger than {max_bytes} bytes, more than a slice within the limits needs")
    return data


def _mat_version(data: bytes, where: str) -> str:
    """"7.3" for HDF5 (bare, or after MATLAB's 512-byte header), "5" for v5; DataError for anything else."""
    if data.startswith(HDF5_SIGNATURE) or (data.startswith(b"MATLAB 7.3") and data[512:520] == HDF5_SIGNATURE):
        return "7.3"
    if data.startswith(b"MATLAB 7.3"):
        raise DataError(where, "truncated or damaged MATLAB v7.3 file: no HDF5 data after the MATLAB header")
    if data.startswith(b"MATLAB 5.0"):
        return "5"
    raise DataError(where, "not a MATLAB .mat file (neither v7.3/HDF5 nor v5)")


def _load_struct(source: str | Path | bytes, where: str, name: str, fields: dict[str, Spec],
                 max_bytes: int) -> tuple[dict[str, np.ndarray], bool]:
    """The `fields` of struct variable `name`, each checked against its Spec (before reading, for v7.3).

    The flag says whether 2-D arrays come back transposed (true for v7.3 read through h5py).
    """
    data = _read_source(source, where, max_bytes)
    version = _mat_version(data, where)
    try:
        if version == "7.3":
            with h5py.File(io.BytesIO(data), "r") as f:
                group = member(f, name, where)
                if not isinstance(group, h5py.Group):
                    raise DataError(where, f"no '{name}' variable" if group is None else f"'{name}' is not a struct")
                found = {key: member(group, key, where) for key in fields}
                _check_fields(where, name, found)
                for key, spec in fields.items():
                    check_dataset(found[key], f"{name}/{key}", where, spec)
                return {key: _h5_value(found[key]) for key in fields}, True
        value = _v5_variable(data, where, name, max_bytes)
        if not (value.dtype == object and value.size == 1 and isinstance(value.flat[0], scipy.io.matlab.mat_struct)):
            raise DataError(where, f"'{name}' is not a struct")
        struct = value.flat[0]
        found = {key: getattr(struct, key) for key in fields if key in struct._fieldnames}
        _check_fields(where, name, found)
        for key, spec in fields.items():
            if not isinstance(found[key], np.ndarray):
                raise DataError(where, f"{name}/{key} is not an array")
            check_values(found[key], f"{name}/{key}", where, spec)
        return found, False
    except DataError:
        raise
    except Exception as exc:  # h5py, scipy and zlib raise many types for damaged files
        raise DataError(where, f"unreadable MATLAB v{version} file", f"{type(exc).__name__}: {exc}") from None


def _load_array(source: str | Path | bytes, where: str, name: str, spec: Spec, max_bytes: int) -> np.ndarray:
    """Array variable `name`, checked against `spec` (before reading, for v7.3)."""
    data = _read_source(source, where, max_bytes)
    version = _mat_version(data, where)
    try:
        if version == "7.3":
            with h5py.File(io.BytesIO(data), "r") as f:
                obj = member(f, name, where)
                if obj is None:
                    raise DataError(where, f"no '{name}' variable")
                check_dataset(obj, name, where, spec)
                return _h5_value(obj)
        value = _v5_variable(data, where, name, max_bytes)
        check_values(value, name, where, spec)
        return value
    except DataError:
        raise
    except Exception as exc:
        raise DataError(where, f"unreadable MATLAB v{version} file", f"{type(exc).__name__}: {exc}") from None


def _check_fields(where: str, name: str, found: dict[str, Any]) -> None:
    missing = [key for key, value in found.items() if value is None]
    missing += [key for key in REQUIRED_FIELDS if key not in found]
    if missing:
        raise DataError(where, f"{name} lacks field(s) {', '.join(missing)}")


def _h5_value(obj: h5py.Dataset) -> np.ndarray:
    empty = small_attribute(obj, "MATLAB_empty")
    if empty is not None and empty.any():  # MATLAB stores an empty array's shape as its data
        return np.zeros(0)
    return obj[()]


def _v5_variable(data: bytes, where: str, name: str, max_bytes: int) -> np.ndarray:
    """Variable `name` of a v5 file, after checking its elements inflate to at most `max_bytes` in all."""
    _check_v5_size(data, where, max_bytes)
    mat = scipy.io.loadmat(io.BytesIO(data), variable_names=[name], squeeze_me=False, struct_as_record=False,
                           verify_compressed_data_integrity=True)
    if name not in mat:
        found = ", ".join(entry[0] for entry in scipy.io.whosmat(io.BytesIO(data)))
        raise DataError(where, f"no '{name}' variable", f"found: {found or 'nothing'}")
    return mat[name]


def _check_v5_size(data: bytes, where: str, max_bytes: int) -> None:
    """Walk the top-level elements of a v5 file and inflate each compressed one with a bound (the output is
    counted, not kept): a small file must not make scipy inflate gigabytes."""
    order = {b"IM": "<", b"MI": ">"}.get(data[126:128])
    if order is None:
        raise DataError(where, "damaged MATLAB v5 header (no byte-order mark)")
    total, pos = 0, 128
    while pos + 8 <= len(data):
        kind, nbytes = struct.unpack(order + "II", data[pos:pos + 8])
        if kind >> 16:  # small data element: type and size share the first word
            pos += 8
            continue
        body = data[pos + 8:pos + 8 + nbytes]
        total += _inflated_size(body, max_bytes - total + 1) if kind == 15 else nbytes  # 15 = miCOMPRESSED
        if total > max_bytes:
            raise DataError(where, f"MATLAB v5 data would inflate to more than {max_bytes} bytes")
        pos += 8 + nbytes


def _inflated_size(body: bytes, limit: int) -> int:
    """Bytes a zlib stream inflates to, counting no further than `limit`."""
    inflater, total = zlib.decompressobj(), 0
    while body and total < limit:
        total += len(inflater.decompress(body, min(2**20, limit - total)))
        body = inflater.unconsumed_tail
    return total


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
