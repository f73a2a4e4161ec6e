"""`genseg prepare`: read a raw dataset, preprocess every slice the one shared way, write one prepared file.

Bad files are reported and skipped (every good one is kept) unless `strict`; the output appears only when
complete (PreparedWriter writes to a temporary name and renames).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from ..errors import DataError
from .info import dataset_info
from .prepared import PreparedWriter
from .records import SliceRecord, preprocess_pair
from .sources import choose_folds, open_source, scan, worker_pool


@dataclass
class PrepareReport:
    out: Path
    source_format: str
    files_read: int
    slices: int
    bad_files: list[dict]  # {"path", "reason"} per skipped file
    folds_from: str
    classes: dict[str, int]
    splits: dict[str, int]
    seconds: float

    def summary(self) -> str:
        lines = [
            f"wrote {self.slices} slices from {self.files_read} {self.source_format} file(s) to {self.out} "
            f"in {self.seconds:.1f} s",
            "classes: " + ", ".join(f"{name} {n}" for name, n in self.classes.items()),
            f"splits ({self.folds_from}): " + ", ".join(f"{name} {n}" for name, n in self.splits.items()),
            f"skipped {len(self.bad_files)} bad file(s)" + (":" if self.bad_files else ""),
        ]
        return "\n".join(lines + [f"  {bad['path']}: {bad['reason']}" for bad in self.bad_files])


def prepare(source: str | Path, out: str | Path, size: int = 256, format: str = "auto", modality: str = "t1ce",
            workers: int = 1, strict: bool = False, seed: int = 0, num_folds: int = 5, test_fold: int = 1,
            empty_fraction: float = 0.1, channels: int = 1, progress: bool = True,
            target: str = "wt") -> PrepareReport:
    """Write every readable slice under `source` to the prepared file `out` at `size` x `size`.

    Folds come from Figshare's cvind.mat when present, else from a `seed`ed patient-wise assignment; `test_fold`
    is the test split and the next fold validation. `empty_fraction` is the share of tumour-free brain slices
    kept per BraTS case and `target` the tumour region its masks mark (wt, tc or et); `channels` (1 or 3)
    applies to image folders.
    """
    start = time.perf_counter()
    src = open_source(source, format, modality, empty_fraction, seed, channels, target)
    bad, sources, files_read = [], [], 0
    with worker_pool(workers) as pool, PreparedWriter(out, size, channels, source_format=src.format,
                                                      modality=src.modality) as writer:
        for result in scan(src, partial(_preprocess, size), pool, progress, desc=f"prepare {src.path.name}"):
            if isinstance(result, DataError):
                if strict:
                    raise result
                bad.append({"path": result.path, "reason": result.reason})
                continue
            files_read += 1
            for row in result:
                writer.append(*row)
                sources.append(row[4])
        if not sources:
            raise DataError(src.path, f"no readable slices: all {len(bad)} file(s) are bad, the first "
                                      f"{bad[0]['path']}: {bad[0]['reason']}")
        folds, folds_from, bad_cvind = choose_folds(src, sources, num_folds, seed)
        if strict and bad_cvind:
            raise DataError(bad_cvind[0]["path"], bad_cvind[0]["reason"])
        bad += bad_cvind
        writer.attrs["metadata"] = {"source": str(src.path), "folds_from": folds_from, **src.settings,
                                    "class_names": {str(k): v for k, v in src.class_names.items()}}
        writer.close(folds, num_folds, test_fold, seed, bad_files=bad)
    info = dataset_info(out)
    return PrepareReport(Path(out), src.format, files_read, info["slices"], bad, folds_from, info["classes"],
                         info["splits"], time.perf_counter() - start)


def _preprocess(size: int, records: list[SliceRecord]) -> list[tuple]:
    """Runs in the workers: preprocess, and halve what travels back by sending float16 (what the file stores)."""
    rows = []
    for r in records:
        image, mask = preprocess_pair(r.image, r.mask, size)
        rows.append((image.astype(np.float16), mask, r.label, r.patient, r.source, r.slice_index))
    return rows
