"""Finding a raw dataset on disk and reading it, in parallel, as `prepare` and `data info` both do.

A `Source` is a list of work items (a Figshare file, a BraTS case folder, an image with its masks) and a reader
that turns one item into SliceRecords. `scan` runs a reader plus a per-item job over all items, in worker
processes when asked, and yields results in the items' order so output never depends on the worker count.
Bad items come back as DataError values instead of stopping the scan.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError
from .brats import MODALITIES, TARGETS, case_naming, find_brats_cases, read_brats_case
from .dicom_cases import find_dicom_cases, read_dicom_case
from .figshare import find_cvind, find_figshare_files, read_cvind, read_figshare_mat
from .folders import BUSI_CLASSES, find_busi_pairs, find_folder_pairs, find_layout_root, read_image_pair
from .records import CLASS_NAMES, SliceRecord

FORMATS = ("auto", "figshare", "brats", "folder", "dicom")


@dataclass
class Source:
    """A raw dataset: what to read, how, and what its format says about classes and folds."""

    path: Path
    format: str  # figshare | brats | busi | folder | dicom
    items: list
    read: Callable[[Any], SliceRecord | list[SliceRecord]]  # module-level (picklable) for worker processes
    class_names: dict[int, str]
    modality: str
    cvind: Path | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # reader options worth recording in the output


def open_source(path: str | Path, format: str = "auto", modality: str = "t1ce", empty_fraction: float = 0.1,
                seed: int = 0, channels: int = 1, target: str = "wt") -> Source:
    """Find the items of a raw dataset folder; DataError for a missing, empty or unrecognised folder."""
    path = Path(path)
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if not 0.0 <= empty_fraction <= 1.0:
        raise ConfigError(f"empty_fraction must be between 0 and 1, got {empty_fraction}")
    is_zip = path.is_file() and path.suffix.lower() == ".zip"
    if not path.is_dir() and not is_zip:
        raise DataError(path, "not a folder or a .zip of DICOM files" if path.exists() else "folder not found")
    if path.is_dir() and not any(path.iterdir()):
        raise DataError(path, "folder is empty")
    if format == "auto":
        format = "dicom" if is_zip else detect_format(path)
    if is_zip and format != "dicom":
        raise DataError(path, f"only DICOM data is read from a zip; unpack it to read it as {format}")
    if channels != 1 and format != "folder":
        raise ConfigError(f"channels={channels} only applies to image folders; {format} data has one channel")
    if format == "figshare":
        items = find_figshare_files(path)
        names = {k: v for k, v in CLASS_NAMES.items() if k > 0}
        source = Source(path, "figshare", items, read_figshare_mat, names, "t1ce", find_cvind(path))
    elif format == "brats":
        items = find_brats_cases(path)
        read = partial(read_brats_case, modality=modality, empty_fraction=empty_fraction, seed=seed, target=target)
        names = {0: "none", 1: "meningioma", 2: "glioma", -1: "unknown"}
        settings = {"empty_fraction": empty_fraction, "seed": seed, "target": target, "naming": brats_namings(items)}
        source = Source(path, "brats", items, read, names, modality, settings=settings)
    elif format == "dicom":
        items = find_dicom_cases(path)
        read = partial(read_dicom_case, empty_fraction=empty_fraction, seed=seed)
        modality = "/".join(sorted({case.modality for case in items if case.modality})) or "unknown"
        source = Source(path, "dicom", items, read, {0: "none", -1: "unknown"}, modality,
                        settings={"empty_fraction": empty_fraction, "seed": seed})
    else:
        layout = find_layout_root(path)
        if layout is None:
            raise DataError(path, "no benign/, malignant/, normal/ or images/ + masks/ folders in it")
        kind, root = layout
        items = find_busi_pairs(root) if kind == "busi" else find_folder_pairs(root)
        names = {v: k for k, v in BUSI_CLASSES.items()} if kind == "busi" else {-1: "unknown"}
        modality = "ultrasound" if kind == "busi" else "unknown"
        source = Source(path, kind, items, partial(read_image_pair, channels=channels), names, modality)
    if not source.items:
        raise DataError(path, f"no {format} files found in it")
    return source


def brats_namings(cases: Sequence[Path]) -> dict[str, int]:
    """Cases per naming ("BraTS 2023 (t1n/t1c/t2w/t2f), enhancing = 3": 12), told from the file names alone."""
    counts: Counter[str] = Counter()
    for case in cases:
        try:
            counts[case_naming(case).describe()] += 1
        except DataError:  # mixed names: the reader reports the case when it is read
            counts["mixed names"] += 1
    return dict(counts)


def detect_format(path: Path) -> str:
    """Tell the format from the folder's contents."""
    if find_figshare_files(path):
        return "figshare"
    if find_brats_cases(path):
        return "brats"
    if find_layout_root(path) is not None:
        return "folder"
    if any(p.is_file() and _is_dicom_file(p) for p in path.rglob("*")):
        return "dicom"
    raise DataError(path, "cannot tell the dataset format: found no .mat slice files (figshare), no BraTS "
                          "<case>_<modality>.nii.gz or <case>-<modality>.nii.gz volumes (brats), no benign/ "
                          "malignant/ normal/ or images/ + masks/ folders (folder) and no DICOM files (dicom); pass "
                          "--format to say which it is")


def _is_dicom_file(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(132)[128:] == b"DICM"


def scan(source: Source, job: Callable[[list[SliceRecord]], Any], pool=None, progress: bool = True,
         desc: str = "reading") -> Iterator[Any]:
    """Yield job(records of item) for each item, in order, or the DataError that made an item unreadable.

    With a `worker_pool`, items are read and the job run in its processes; results still arrive in order.
    """
    task = partial(_run_item, source.read, job)
    results = pool.imap(task, source.items) if pool is not None else map(task, source.items)
    yield from tqdm(results, total=len(source.items), desc=desc, unit="file", disable=not progress)


@contextlib.contextmanager
def worker_pool(workers: int):
    """A process pool for `scan`, or None for workers <= 1. Start it before opening output files, so no open
    HDF5 handle is copied into the forked workers."""
    if workers <= 1:
        yield None
        return
    # fork is cheap (no re-import of torch); one torch thread per worker keeps the processes from oversubscribing
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        yield pool


def choose_folds(source: Source, sources: Sequence[str], num_folds: int,
                 seed: int) -> tuple[np.ndarray | None, str, list[dict]]:
    """Folds per slice from Figshare's cvind.mat when it is present and fits, else None (= seeded patient-wise).

    Returns (folds or None, where they came from, bad-file entries for an unusable cvind.mat).
    """
    patient_wise = f"patient-wise, seed {seed}"
    if source.cvind is None:
        return None, patient_wise, []
    try:
        cvind = read_cvind(source.cvind)
        if cvind.max() > num_folds:
            raise DataError(source.cvind, f"fold ids run to {cvind.max()} but num_folds is {num_folds}")
        stems = [Path(s).stem for s in sources]
        outside = [s for s in stems if not s.isdigit() or not 1 <= int(s) <= len(cvind)]
        if outside:
            raise DataError(source.cvind, f"has {len(cvind)} fold ids, none for slice file(s) {outside[:3]}")
    except DataError as exc:
        return None, patient_wise, [{"path": exc.path, "reason": f"{exc.reason}; used {patient_wise} folds"}]
    return cvind[[int(s) - 1 for s in stems]], "cvind.mat", []


def _run_item(read: Callable, job: Callable, item: Any) -> Any:
    try:
        records = read(item)
        return job(records if isinstance(records, list) else [records])
    except DataError as exc:
        return exc

