"""DICOM training data for `prepare`: image series labelled by DICOM Segmentation objects in the same folder or zip.

Each image series (genseg.data.dicom: grouped, ordered and checked as `segment` reads it) is one case; its mask is
the union of the segments of the DICOM-SEG that references it (ReferencedSeriesSequence), as written by
`genseg segment --dicom-seg`, viewers and annotation tools. Slices keep the series' own row/column layout.
Every tumour slice is kept plus a seeded share of the tumour-free ones (records.sample_slices); tumour slices
get label -1 (unknown class: a SEG does not say which tumour it is), tumour-free slices 0. A series without
exactly one SEG, and every file that is not usable, becomes an item that reports itself when read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from .decode import MAX_FILE_PIXELS, check_size
from .dicom import Member, decode_series, find_members, read_headers, read_segmentation
from .records import SliceRecord, sample_slices


@dataclass(frozen=True)
class DicomCase:
    """One image series with the Segmentation objects that reference it, or a file to report."""

    label: str
    members: tuple[Member, ...] = ()
    segmentations: tuple[Member, ...] = ()
    modality: str = ""
    problem: DataError | None = None


def find_dicom_cases(path: str | Path) -> list[DicomCase]:
    """The cases of a folder or zip of DICOM files, read from their headers only."""
    found = read_headers(find_members(Path(path)), MAX_FILE_PIXELS)
    references: dict[str, list[Member]] = {}
    for member, header in found.segmentations:
        for item in header.get("ReferencedSeriesSequence", []):
            references.setdefault(str(item.SeriesInstanceUID), []).append(member)
    cases = [DicomCase(s.label, tuple(s.members), tuple(references.pop(s.uid, ())),
                       str(s.headers[0].get("Modality", ""))) for s in found.series]
    problems = found.skipped + [DataError(m.where, "DICOM Segmentation references no image series found here")
                                for members in references.values() for m in members]
    return cases + [DicomCase(Path(p.path).name, problem=p) for p in problems]


def read_dicom_case(case: DicomCase, empty_fraction: float = 0.1, seed: int = 0) -> list[SliceRecord]:
    """Tumour slices of the case's series plus `empty_fraction` of its tumour-free, non-blank slices, in order."""
    if case.problem is not None:
        raise case.problem
    where = case.members[0].where
    if len(case.segmentations) != 1:
        raise DataError(where, f"series {case.label} needs exactly one DICOM Segmentation referencing it for "
                               f"training, found {len(case.segmentations)}",
                        ", ".join(m.where for m in case.segmentations))
    found = read_headers(list(case.members), MAX_FILE_PIXELS)
    if found.skipped:
        raise found.skipped[0]
    series, = found.series
    rows, columns, slices = series.shape
    check_size(where, rows, columns, MAX_FILE_PIXELS, slices=slices, channels=series.samples)
    frames = decode_series(series)
    masks = read_segmentation(case.segmentations[0], series, MAX_FILE_PIXELS)
    usable = frames.reshape(slices, -1).max(axis=1) > frames.reshape(slices, -1).min(axis=1)
    keep = sample_slices(masks.any(axis=(1, 2)), usable, empty_fraction, seed, f"{series.patient}/{series.uid}")
    return [SliceRecord(frames[k], masks[k].astype("uint8"), -1 if masks[k].any() else 0, series.patient,
                        series.slice_member(k).where, slice_index=k).check() for k in keep]
