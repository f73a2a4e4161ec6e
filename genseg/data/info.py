"""`genseg data info`: what a raw dataset folder or a prepared file holds, and which files are bad."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import DataError
from .prepared import (SPLITS, assign_patient_folds, class_names, open_prepared, read_metadata,
                       split_from_folds)
from .records import CLASS_NAMES, SliceRecord
from .sources import choose_folds, open_source, scan, worker_pool


def dataset_info(path: str | Path, format: str = "auto", modality: str = "t1ce", empty_fraction: float = 0.1,
                 seed: int = 0, num_folds: int = 5, test_fold: int = 1, channels: int = 1, workers: int = 1,
                 progress: bool = False, target: str = "wt") -> dict[str, Any]:
    """Counts for a prepared file, or for a raw folder as `prepare` with the same options would write it.

    Keys: path, kind, source_format, slices, patients, classes {name: slices}, image_sizes {"HxW": slices},
    tumour_free_share, splits {train/val/test: slices}, folds_from, bad_files [{path, reason}]; prepared files
    add synthetic, modality, size, channels; raw folders add files_read; BraTS data adds naming {naming: cases}.
    """
    path = Path(path)
    if path.is_file() and path.suffix.lower() != ".zip":  # a zip holds raw DICOM data
        return _prepared_info(path)
    src = open_source(path, format, modality, empty_fraction, seed, channels, target)
    rows, bad = [], []
    with worker_pool(workers) as pool:
        for result in scan(src, _describe, pool, progress, desc=f"info {path.name}"):
            if isinstance(result, DataError):
                bad.append({"path": result.path, "reason": result.reason})
            else:
                rows.append(result)
    slices = [row for item in rows for row in item]
    labels, patients, sources, sizes, tumour = (list(column) for column in zip(*slices)) if slices else ([],) * 5
    folds, folds_from, bad_cvind = choose_folds(src, sources, num_folds, seed)
    if folds is None:
        folds = assign_patient_folds(patients, num_folds, seed)
    info = _summary(path, "raw", src.format, labels, patients, sizes, tumour,
                    split_from_folds(np.asarray(folds), num_folds, test_fold), folds_from, bad + bad_cvind,
                    src.class_names)
    info["files_read"] = len(rows)
    if "naming" in src.settings:
        info["naming"] = src.settings["naming"]
    return info


def format_info(info: dict[str, Any]) -> str:
    """A readable two-column table of `dataset_info`'s result."""
    share = info["tumour_free_share"]
    classes = [("classes", "")] + [(f"  {name}", n) for name, n in info["classes"].items()] if info["classes"] else []
    rows = [
        ("path", info["path"]),
        ("kind", f"{info['kind']} {info['source_format']}" + (" (synthetic)" if info.get("synthetic") else "")),
        ("slices", info["slices"]),
        ("patients", info["patients"]),
        *classes,
        ("image sizes", ", ".join(f"{size}: {n}" for size, n in info["image_sizes"].items()) or "-"),
        ("tumour-free", "-" if share is None else f"{100 * share:.1f} % of slices"),
        ("splits", ", ".join(f"{name} {n}" for name, n in info["splits"].items()) + f" ({info['folds_from']})"),
        *[("naming" if i == 0 else "", f"{naming}: {n} case(s)") for i, (naming, n) in
          enumerate(info.get("naming", {}).items())],
        ("bad files", len(info["bad_files"])),
    ]
    width = max(len(name) for name, _ in rows) + 2
    lines = [f"{name:<{width}}{value}".rstrip() for name, value in rows]
    return "\n".join(lines + [f"  {bad['path']}: {bad['reason']}" for bad in info["bad_files"]])


def _prepared_info(path: Path) -> dict[str, Any]:
    meta = read_metadata(path)
    attrs, n = meta["attrs"], meta["num_slices"]
    metadata = attrs.get("metadata") or {}
    names = class_names(attrs)
    with open_prepared(path) as h5:
        masks = h5["masks"]
        tumour = np.concatenate([masks[i:i + 256].reshape(-1, masks.shape[1] * masks.shape[2]).any(axis=1)
                                 for i in range(0, n, 256)]) if n else np.zeros(0, dtype=bool)
    size = int(attrs["size"])
    info = _summary(path, "prepared", attrs.get("source_format", "unknown"), meta["labels"], meta["patients"],
                    [f"{size}x{size}"] * n, tumour, meta["split"], metadata.get("folds_from", "stored folds"),
                    attrs.get("bad_files") or [], names)
    info.update(synthetic=bool(attrs.get("synthetic", False)), modality=attrs.get("modality", "unknown"),
                size=size, channels=int(attrs["channels"]))
    if "naming" in metadata:
        info["naming"] = metadata["naming"]
    return info


def _summary(path: Path, kind: str, source_format: str, labels: Sequence[int], patients: Sequence[str],
             sizes: Sequence[str], tumour: Sequence[bool], split: Sequence[str], folds_from: str,
             bad_files: list[dict], class_names: dict[int, str]) -> dict[str, Any]:
    ids, counts = np.unique(np.asarray(labels, dtype=np.int64), return_counts=True)
    split_counts = Counter(split)
    return {
        "path": str(path),
        "kind": kind,
        "source_format": source_format,
        "slices": len(labels),
        "patients": len(set(patients)),
        "classes": {class_names.get(int(k), CLASS_NAMES.get(int(k), f"class {k}")): int(c) for k, c in
                    zip(ids, counts)},
        "image_sizes": dict(Counter(sizes).most_common()),
        "tumour_free_share": float(1 - np.mean(tumour)) if len(tumour) else None,
        "splits": {name: split_counts.get(name, 0) for name in SPLITS},
        "folds_from": folds_from,
        "bad_files": list(bad_files),
    }


def _describe(records: list[SliceRecord]) -> list[tuple]:
    return [(r.label, r.patient, r.source, "x".join(map(str, r.image.shape[-2:])), bool(r.mask.any()))
            for r in records]
