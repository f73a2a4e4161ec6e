"""The prepared HDF5 file: the hub format that real data (after `prepare`) and synthetic data (after `sample`)
share, and the torch Dataset that reads it lazily.

Layout (N slices, C channels, S x S pixels):
  images       float16 (N, C, S, S)  per-slice normalised to [0, 1], one chunk per slice
  masks        uint8   (N, S, S)     1 = tumour, one chunk per slice (lzf)
  labels       int8    (N,)          -1 unknown, 0 no tumour, 1 meningioma, 2 glioma, 3 pituitary
  patients     str     (N,)          splits are made by patient, never by slice
  sources      str     (N,)          file each slice came from
  slice_index  int32   (N,)          axial index within a volume, -1 for single-slice files
  fold         int8    (N,)          1..num_folds, patient-wise (Figshare's cvind.mat when present)
  split        str     (N,)          train / val / test derived from the folds (test_fold, the next is val)
File attributes: schema_version, genseg_version, size, channels, source_format, modality, normalization,
synthetic, metadata (JSON: generator details etc.), bad_files (JSON list of {path, reason}), num_folds,
test_fold, created.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from .. import __version__
from ..errors import DataError
from ..io import atomic_path
from .hdf5 import FLETCHER32, LZF, SHUFFLE, Spec, dataset, member

SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")
NORMALIZATION = "per-slice 0.5/99.5 percentile clip, min-max to [0, 1]; image bilinear antialiased, mask nearest"
_STR = h5py.string_dtype()
_FILTERS = (SHUFFLE, LZF, FLETCHER32)  # what our writer uses, and no filter whose chunks would need walking
DATASETS = {"images": Spec("f", filters=_FILTERS), "masks": Spec("biu", filters=_FILTERS),
            "labels": Spec("iu", filters=_FILTERS), "patients": Spec("T", filters=_FILTERS),
            "sources": Spec("T", filters=_FILTERS), "slice_index": Spec("iu", filters=_FILTERS),
            "fold": Spec("iu", filters=_FILTERS), "split": Spec("T", filters=_FILTERS)}
OPTIONAL_DATASETS = {"quality_nn_ratio": Spec("f", filters=_FILTERS), "quality_agreement": Spec("f", filters=_FILTERS)}


def assign_patient_folds(patients: Sequence[str], num_folds: int = 5, seed: int = 0) -> np.ndarray:
    """Give every patient one fold in 1..num_folds, balancing slice counts; returns the fold of each slice.

    Patients are shuffled with `seed`, then each goes to the fold with the fewest slices so far, so folds stay
    balanced even when patients contribute very different numbers of slices.
    """
    unique, counts = np.unique(np.asarray(patients, dtype=object).astype(str), return_counts=True)
    order = np.random.default_rng(seed).permutation(len(unique))
    fold_of: dict[str, int] = {}
    load = np.zeros(num_folds, dtype=np.int64)
    for i in order:
        fold = int(np.argmin(load))
        fold_of[unique[i]] = fold + 1
        load[fold] += counts[i]
    return np.array([fold_of[str(p)] for p in patients], dtype=np.int8)


def split_from_folds(folds: np.ndarray, num_folds: int, test_fold: int = 1) -> np.ndarray:
    """test = `test_fold`, val = the next fold (cyclically), train = the rest."""
    if not 1 <= test_fold <= num_folds:
        raise ValueError(f"test_fold must be in 1..{num_folds}, got {test_fold}")
    val_fold = test_fold % num_folds + 1
    split = np.full(len(folds), "train", dtype=object)
    split[folds == test_fold] = "test"
    split[folds == val_fold] = "val"
    return split


class PreparedWriter:
    """Appends slices to a new prepared file; the file appears under its name only when `close` succeeds."""

    def __init__(self, path: str | Path, size: int, channels: int = 1, **attrs: Any):
        self.path = Path(path)
        self.size = int(size)
        self.channels = int(channels)
        self.attrs = attrs
        self._meta: dict[str, list] = {"labels": [], "patients": [], "sources": [], "slice_index": []}
        self._ctx = atomic_path(self.path)
        tmp = self._ctx.__enter__()
        self._h5 = h5py.File(tmp, "w")
        s, c = self.size, self.channels
        self._images = self._h5.create_dataset(
            "images", shape=(0, c, s, s), maxshape=(None, c, s, s), dtype=np.float16, chunks=(1, c, s, s)
        )
        self._masks = self._h5.create_dataset(
            "masks", shape=(0, s, s), maxshape=(None, s, s), dtype=np.uint8, chunks=(1, s, s), compression="lzf"
        )
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []

    def __len__(self) -> int:
        return len(self._meta["labels"])

    def append(self, image: np.ndarray, mask: np.ndarray, label: int, patient: str, source: str,
               slice_index: int = -1) -> None:
        """Add one preprocessed slice: image float (C, S, S) in [0, 1], mask (S, S) of 0/1."""
        image = np.asarray(image, dtype=np.float32)
        if image.ndim == 2:
            image = image[None]
        expected = (self.channels, self.size, self.size)
        if image.shape != expected or np.shape(mask) != expected[1:]:
            raise ValueError(f"slice from {source}: image {image.shape} / mask {np.shape(mask)}, expected {expected}")
        self._pending.append((image.astype(np.float16), (np.asarray(mask) > 0).astype(np.uint8)))
        for key, value in zip(self._meta, (int(label), str(patient), str(source), int(slice_index))):
            self._meta[key].append(value)
        if len(self._pending) >= 64:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        start, n = self._images.shape[0], len(self._pending)
        self._images.resize(start + n, axis=0)
        self._masks.resize(start + n, axis=0)
        self._images[start:] = np.stack([p[0] for p in self._pending])
        self._masks[start:] = np.stack([p[1] for p in self._pending])
        self._pending.clear()

    def close(self, folds: np.ndarray | None = None, num_folds: int = 5, test_fold: int = 1, seed: int = 0,
              bad_files: Iterable[dict] = ()) -> Path:
        """Write metadata and splits, then move the file into place. `folds` None = seeded patient-wise folds."""
        try:
            self._flush()
            meta = self._meta
            if folds is None:
                folds = assign_patient_folds(meta["patients"], num_folds, seed)
            folds = np.asarray(folds, dtype=np.int8)
            if len(folds) != len(self):
                raise ValueError(f"{len(folds)} fold ids for {len(self)} slices")
            h5 = self._h5
            h5.create_dataset("labels", data=np.asarray(meta["labels"], dtype=np.int8))
            h5.create_dataset("patients", data=np.asarray(meta["patients"], dtype=object), dtype=_STR)
            h5.create_dataset("sources", data=np.asarray(meta["sources"], dtype=object), dtype=_STR)
            h5.create_dataset("slice_index", data=np.asarray(meta["slice_index"], dtype=np.int32))
            h5.create_dataset("fold", data=folds)
            h5.create_dataset("split", data=split_from_folds(folds, num_folds, test_fold), dtype=_STR)
            attrs = {
                "schema_version": SCHEMA_VERSION,
                "genseg_version": __version__,
                "size": self.size,
                "channels": self.channels,
                "normalization": NORMALIZATION,
                "synthetic": False,
                "num_folds": num_folds,
                "test_fold": test_fold,
                "split_seed": seed,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                **self.attrs,
            }
            attrs["metadata"] = json.dumps(attrs.get("metadata", {}))
            attrs["bad_files"] = json.dumps(list(bad_files))
            for key, value in attrs.items():
                h5.attrs[key] = value
            h5.close()
        except BaseException as exc:
            self.abort(exc)
            raise
        self._ctx.__exit__(None, None, None)
        return self.path

    def abort(self, exc: BaseException | None = None) -> None:
        """Drop the partial file."""
        if self._h5.id.valid:
            self._h5.close()
        exc = exc or RuntimeError("aborted")
        try:
            self._ctx.__exit__(type(exc), exc, None)
        except BaseException:
            pass

    def __enter__(self) -> "PreparedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self.abort(exc)


def open_prepared(path: str | Path) -> h5py.File:
    """Open a prepared file read-only, with a clear error when it is not one.

    Every dataset genseg reads from it is checked first (genseg.data.hdf5): a prepared file from elsewhere
    cannot point at other files through links, external storage or virtual datasets.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(path, "not a readable HDF5 file", str(exc)) from None
    try:
        if "schema_version" not in h5.attrs or member(h5, "images", path) is None:
            raise DataError(path, "not a genseg prepared dataset (run `genseg prepare` on the raw data first)")
        missing = [name for name, spec in DATASETS.items() if dataset(h5, name, path, spec) is None]
        if missing:
            raise DataError(path, f"prepared file lacks dataset(s) {', '.join(missing)}")
        for name, spec in OPTIONAL_DATASETS.items():
            dataset(h5, name, path, spec)
    except BaseException:
        h5.close()
        raise
    return h5


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Everything but the pixels: per-slice arrays and the file attributes (JSON attributes decoded)."""
    with open_prepared(path) as h5:
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in h5.attrs.items()}
        for key in ("metadata", "bad_files"):
            attrs[key] = json.loads(attrs.get(key, "null") or "null")
        return {
            "attrs": attrs,
            "num_slices": int(h5["images"].shape[0]),
            "labels": h5["labels"][:].astype(np.int64),
            "patients": h5["patients"].asstr()[:].astype(object),
            "sources": h5["sources"].asstr()[:].astype(object),
            "fold": h5["fold"][:].astype(np.int64),
            "split": h5["split"].asstr()[:].astype(object),
        }


def class_names(attrs: dict[str, Any]) -> dict[int, str]:
    """{label: name} that `prepare` recorded from the source (Figshare's tumour types, BUSI's benign / malignant /
    normal, ...), from a prepared file's decoded attributes; empty when the source named none."""
    return {int(k): v for k, v in ((attrs.get("metadata") or {}).get("class_names") or {}).items()}


def check_synthetic(path: str | Path, real_attrs: dict) -> dict:
    """`read_metadata` of a synthetic file, after checking it is marked synthetic and matches the real data's
    image size and channels (DataError naming the file otherwise)."""
    meta = read_metadata(path)
    attrs = meta["attrs"]
    if not attrs.get("synthetic", False):
        raise DataError(path, "is not marked synthetic (attribute synthetic is false); pass a file written by "
                              "`genseg sample`")
    ours = (int(attrs["size"]), int(attrs["channels"]))
    theirs = (int(real_attrs["size"]), int(real_attrs["channels"]))
    if ours != theirs:
        raise DataError(path, f"synthetic images are {ours[0]}x{ours[0]} with {ours[1]} channel(s), but the real "
                              f"data is {theirs[0]}x{theirs[0]} with {theirs[1]} channel(s); sample at the real "
                              f"data's size or prepare the real data at {ours[0]}")
    return meta


class PreparedDataset(Dataset):
    """Lazily reads slices of a prepared file (bounded RAM), optionally restricted to a split or folds.

    Items are dicts: image float32 (C, S, S) in [0, 1], mask float32 (1, S, S), label int, index int (row in the
    file). `transform` (e.g. `PairedAugment`) gets and returns (image, mask) tensors.
    """

    def __init__(self, path: str | Path, split: str | None = None, folds: Sequence[int] | None = None,
                 indices: Sequence[int] | None = None, transform=None):
        self.path = Path(path)
        meta = read_metadata(self.path)
        self.attrs = meta["attrs"]
        self.size = int(self.attrs["size"])
        self.channels = int(self.attrs["channels"])
        keep = np.ones(meta["num_slices"], dtype=bool)
        if split is not None:
            if split not in SPLITS:
                raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
            keep &= meta["split"] == split
        if folds is not None:
            keep &= np.isin(meta["fold"], list(folds))
        rows = np.flatnonzero(keep)
        if indices is not None:
            rows = np.intersect1d(rows, np.asarray(indices, dtype=np.int64))
        self.rows = rows
        self.labels = meta["labels"][rows]
        self.patients = meta["patients"][rows]
        self.transform = transform
        self._h5: h5py.File | None = None
        self._images: h5py.Dataset | None = None
        self._masks: h5py.Dataset | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self._h5 is None:  # opened per process: h5py handles must not cross a fork
            self._h5 = h5py.File(self.path, "r")
            # keep the dataset handles: looking them up by name costs more than reading a 256x256 slice
            self._images, self._masks = self._h5["images"], self._h5["masks"]
        row = int(self.rows[i])
        image = torch.from_numpy(self._images[row].astype(np.float32))
        mask = torch.from_numpy(self._masks[row].astype(np.float32))[None]
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return {"image": image, "mask": mask, "label": int(self.labels[i]), "index": row}

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_h5=None, _images=None, _masks=None)
        return state
