"""Figshare brain-tumour dataset (Cheng et al.): one MATLAB .mat per slice holding the struct `cjdata`.

Files are MATLAB v7.3 (HDF5 with a 512-byte MATLAB header; read with h5py, arrays come back transposed)
or, in some re-distributions, v5 (read with scipy). `cvind.mat` holds the 5-fold id of every slice.
"""

from __future__ import annotations

from pathlib import Path

import hdf5storage
import numpy as np


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
