"""DICOM series: the files of a folder, a zip or one file grouped into series and stacked in patient space.

Files are grouped by SeriesInstanceUID. A series' slices are ordered by ImagePositionPatient projected on the
slice normal (InstanceNumber breaks ties, and orders series without geometry); one multi-frame file (Enhanced
MR/CT) is a series of its frames, ordered the same way from its functional groups. A series whose slices mix
orientations or pixel spacings, share a position or are not evenly spaced along one line is refused with the
reason: genseg does not resample. Pixels are scaled by RescaleSlope/Intercept into scanner units. The voxel
grid (row, column, slice) maps to patient RAS millimetres (DICOM's LPS with x and y negated), so NIfTI outputs
overlay the series in viewers.

Sizes are checked as in genseg.data.decode: every header is read without its pixel data first, and a series' Rows x
Columns x slices must fit the pixel budget before any pixels are decoded. Deflated data sets are refused
before pydicom would inflate them whole. Zip members are read in memory, one at a time and never past the
size their header declares; an archive whose member names are absolute or contain `..` is refused whole.
"""

from __future__ import annotations

import copy
import io
import re
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import numpy as np

from ..errors import DataError
from ..io import atomic_path
from .decode import check_size

MAX_ZIP_MEMBERS = 100_000
MAX_ZIP_BYTES = 2**30  # uncompressed bytes of all members together
ORIENTATION_TOLERANCE = 1e-3  # direction cosines (and pixel spacings, in mm) that differ by less are the same
POSITION_TOLERANCE = 0.05  # share of the slice step a slice may lie off the evenly spaced line through the stack
DECODERS = ("pip install 'genseg[dicom]' brings the decoders for JPEG, JPEG-LS, JPEG 2000 and RLE "
            "(pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg, pyjpegls)")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Member:
    """One file to read: a file on disk, or a member of a zip archive (`name` inside `path`)."""

    path: Path
    name: str | None = None

    @property
    def where(self) -> str:
        return str(self.path) if self.name is None else f"{self.path}/{self.name}"

    def open(self) -> BinaryIO:
        if self.name is None:
            return self.path.open("rb")
        with zipfile.ZipFile(self.path) as archive:
            info = archive.getinfo(self.name)
            with archive.open(info) as f:
                data = f.read(info.file_size + 1)  # never inflate past the declared size
        if len(data) != info.file_size:
            raise DataError(self.where, "zip member is longer or shorter than the archive declares")
        return io.BytesIO(data)


@dataclass(frozen=True)
class UploadMember(Member):
    """An uploaded DICOM file, read from memory: nothing of it is named by a path."""

    data: bytes = b""

    @property
    def where(self) -> str:
        return "upload"

    def open(self) -> BinaryIO:
        return io.BytesIO(self.data)


@dataclass(eq=False)
class DicomSeries:
    """One image series in slice order: headers without pixel data, where they came from and the grid they span."""

    uid: str
    label: str  # what output names use: SeriesDescription, else the series number, else the UID
    members: list[Member]  # one per header
    headers: list[Any]  # pydicom Datasets without pixel data, in slice order (one for a multi-frame file)
    frame_numbers: list[int] | None  # multi-frame: the 1-based frame of each slice, in slice order
    shape: tuple[int, int, int]  # rows, columns, slices
    samples: int
    affine: np.ndarray | None  # voxel (row, column, slice) -> RAS mm; None without patient geometry

    @property
    def patient(self) -> str:
        return str(self.headers[0].get("PatientID", "") or self.uid)

    def slice_member(self, k: int) -> Member:
        return self.members[0 if self.frame_numbers else k]


@dataclass
class DicomFolder:
    """What a folder, zip or file holds: image series, Segmentation objects, and files that are not usable."""

    series: list[DicomSeries]
    segmentations: list[tuple[Member, Any]]
    skipped: list[DataError]
    frames: list[np.ndarray] = field(default_factory=list)  # read_dicom: each series' decoded pixels


def pydicom_module(where: str | Path):
    """pydicom, or a DataError naming `where` and saying how to install it."""
    try:
        import pydicom
    except ImportError:
        raise DataError(where, "reading DICOM needs pydicom: pip install 'genseg[dicom]'") from None
    return pydicom


def find_members(path: Path) -> list[Member]:
    """The files to read: every file under a folder (hidden names skipped), every member of a zip, or the file."""
    if path.is_dir():
        return [Member(p) for p in sorted(path.rglob("*"))
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)]
    if path.suffix.lower() == ".zip":
        return _zip_members(path)
    return [Member(path)]


def _zip_members(path: Path) -> list[Member]:
    try:
        with zipfile.ZipFile(path) as archive:
            infos = [i for i in archive.infolist() if not i.is_dir()]
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(path, "unreadable zip archive", f"{type(exc).__name__}: {exc}") from None
    for info in infos:
        name = info.filename.replace("\\", "/")
        if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in PurePosixPath(name).parts:
            raise DataError(path, "zip member paths must stay inside the archive (no absolute paths or '..'); "
                                  "nothing in it was read", f"member {info.filename!r}")
    if len(infos) > MAX_ZIP_MEMBERS:
        raise DataError(path, f"zip archive has more than {MAX_ZIP_MEMBERS} members")
    if sum(i.file_size for i in infos) > MAX_ZIP_BYTES:
        raise DataError(path, f"zip members hold more than {MAX_ZIP_BYTES} bytes uncompressed")
    return [Member(path, i.filename) for i in infos
            if not any(part.startswith(".") for part in PurePosixPath(i.filename).parts)]


def read_headers(members: list[Member], max_pixels: int) -> DicomFolder:
    """Read every member's header (no pixel data) and group the images into series; unusable files are skipped, as
    are series that cannot be stacked or that claim more than `max_pixels`."""
    pydicom = pydicom_module(members[0].where if members else "DICOM")
    groups: dict[str, list[tuple[Member, Any]]] = defaultdict(list)
    segmentations, skipped = [], []
    for member in members:
        try:
            header = _read_header(pydicom, member)
        except DataError as exc:
            skipped.append(exc)
            continue
        sop_class = str(header.get("SOPClassUID", ""))
        if sop_class == pydicom.uid.MediaStorageDirectoryStorage:
            continue  # a DICOMDIR: an index of the other files
        if header.get("Modality") == "SEG" or sop_class == pydicom.uid.SegmentationStorage:
            segmentations.append((member, header))
        elif "Rows" not in header or "Columns" not in header:
            kind = pydicom.uid.UID(sop_class).name if sop_class else "DICOM object"
            skipped.append(DataError(member.where, "has no pixel data: not an image", kind))
        else:  # a file without SeriesInstanceUID is a series of its own
            groups[str(header.get("SeriesInstanceUID") or member.where)].append((member, header))
    series = []
    labels = _labels({uid: entries[0][1] for uid, entries in groups.items()})
    for uid, entries in groups.items():
        try:
            series.append(_build_series(uid, labels[uid], entries, max_pixels))
        except DataError as exc:
            skipped.append(exc)
    return DicomFolder(sorted(series, key=lambda s: s.label), segmentations, skipped)


def read_dicom(path: str | Path, max_pixels: int) -> DicomFolder:
    """The series under a folder, a zip or one file, with their pixels decoded (`frames`) within `max_pixels` in all.

    A series that cannot be stacked or decoded is skipped with its reason, the others are kept.
    """
    return decode_frames(read_headers(find_members(Path(path)), max_pixels), max_pixels)


def decode_frames(found: DicomFolder, max_pixels: int) -> DicomFolder:
    """`found` with each series' pixels decoded into `frames`, within `max_pixels` in all; a series that cannot be
    decoded moves to `skipped`."""
    budget, decoded = max_pixels, []
    for series in found.series:
        rows, columns, slices = series.shape
        try:
            check_size(series.members[0].where, rows, columns, budget, slices=slices, channels=series.samples)
            found.frames.append(decode_series(series))
        except DataError as exc:
            found.skipped.append(exc)
            continue
        budget -= rows * columns * slices
        decoded.append(series)
    found.series = decoded
    return found


def _read_header(pydicom, member: Member):
    try:
        with member.open() as fp:
            pydicom.filereader.read_preamble(fp, False)
            meta = pydicom.filereader._read_file_meta_info(fp)  # public read_file_meta_info takes only paths
            if meta.get("TransferSyntaxUID") == pydicom.uid.DeflatedExplicitVRLittleEndian:
                raise DataError(member.where, "deflated DICOM files are not read; save it uncompressed or with "
                                              "JPEG compression")
            fp.seek(0)
            return pydicom.dcmread(fp, stop_before_pixels=True)
    except DataError:
        raise
    except pydicom.errors.InvalidDicomError as exc:
        raise DataError(member.where, "not a DICOM file (no DICM header)", str(exc)) from None
    except Exception as exc:  # pydicom raises many types for damaged headers
        raise DataError(member.where, "unreadable DICOM header", f"{type(exc).__name__}: {exc}") from None


def _labels(first_headers: dict[str, Any]) -> dict[str, str]:
    """A file-name-safe label per series; series whose labels would meet use their UID."""
    labels = {}
    for uid, header in first_headers.items():
        text = str(header.get("SeriesDescription", "") or "")
        number = header.get("SeriesNumber")
        fallback = uid if "SeriesInstanceUID" in header else PurePosixPath(uid).stem
        text = text if text.strip() else (f"series{number}" if number not in (None, "") else fallback)
        labels[uid] = re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_.")[:64] or uid
    counts = Counter(labels.values())
    return {uid: label if counts[label] == 1 else uid for uid, label in labels.items()}


def _build_series(uid: str, label: str, entries: list[tuple[Member, Any]], max_pixels: int) -> DicomSeries:
    members, headers = [m for m, _ in entries], [h for _, h in entries]
    where = members[0].where
    multi = [h for h in headers if _frame_count(h) > 1 or "PerFrameFunctionalGroupsSequence" in h]
    if multi and len(headers) > 1:
        raise DataError(where, "series mixes a multi-frame file with other files; genseg reads one multi-frame "
                               "file per series", f"series {label}, {len(headers)} files")
    sizes = {(int(h.Rows), int(h.Columns), int(h.get("SamplesPerPixel", 1) or 1)) for h in headers}
    if len(sizes) > 1:
        raise DataError(where, "slices of the series differ in rows, columns or samples per pixel",
                        f"series {label}: {sorted(sizes)}")
    (rows, columns, samples), = sizes
    check_size(where, rows, columns, max_pixels, slices=sum(map(_frame_count, headers)), channels=samples)
    if multi:
        geometry = _frame_geometry(headers[0], where)
        numbers = list(range(1, len(geometry) + 1))
    else:
        geometry = [_slice_geometry(h) for h in headers]
        numbers = [int(h.get("InstanceNumber", 0) or 0) for h in headers]
    order, affine = _stack(geometry, numbers, where, float(headers[0].get("SliceThickness", 0) or 0))
    if multi:
        return DicomSeries(uid, label, members, headers, [numbers[k] for k in order], (rows, columns, len(order)),
                           samples, affine)
    return DicomSeries(uid, label, [members[k] for k in order], [headers[k] for k in order], None,
                       (rows, columns, len(order)), samples, affine)


def _frame_count(header) -> int:
    return int(header.get("NumberOfFrames", 1) or 1)


def _slice_geometry(header) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(ImagePositionPatient, ImageOrientationPatient, PixelSpacing) of a single-frame image, None if any is missing."""
    try:
        return (np.asarray(header.ImagePositionPatient, float), np.asarray(header.ImageOrientationPatient, float),
                np.asarray(header.PixelSpacing, float))
    except (AttributeError, TypeError, ValueError):
        return None


def _functional_group(header, k: int, sequence: str):
    """The `sequence` item that applies to frame k of a multi-frame image (per-frame first, then shared), or None."""
    for groups, index in ((header.get("PerFrameFunctionalGroupsSequence"), k),
                          (header.get("SharedFunctionalGroupsSequence"), 0)):
        if groups and len(groups) > index and groups[index].get(sequence):
            return groups[index].get(sequence)[0]
    return None


def _frame_geometry(header, where: str) -> list[tuple[np.ndarray, np.ndarray, np.ndarray] | None]:
    """Per-frame geometry of a multi-frame image from its functional groups (None for frames without it)."""
    per_frame = header.get("PerFrameFunctionalGroupsSequence")
    frames = _frame_count(header)
    if not per_frame:
        return [None] * frames
    if len(per_frame) != frames:
        raise DataError(where, "per-frame functional groups and NumberOfFrames differ",
                        f"{len(per_frame)} groups, {frames} frames")
    geometry = []
    for k in range(frames):
        position, orientation, spacing = (
            getattr(_functional_group(header, k, sequence), attribute, None) for sequence, attribute in
            (("PlanePositionSequence", "ImagePositionPatient"), ("PlaneOrientationSequence", "ImageOrientationPatient"),
             ("PixelMeasuresSequence", "PixelSpacing")))
        geometry.append(None if None in (position, orientation, spacing) else
                        (np.asarray(position, float), np.asarray(orientation, float), np.asarray(spacing, float)))
    return geometry


def _stack(geometry: list, numbers: list[int], where: str, thickness: float) -> tuple[list[int], np.ndarray | None]:
    """(slice order, affine or None): slices ordered along the normal, checked to form one evenly spaced stack."""
    if all(g is None for g in geometry):
        return sorted(range(len(geometry)), key=lambda k: numbers[k]), None
    if any(g is None for g in geometry):
        raise DataError(where, "some slices of the series lack ImagePositionPatient, ImageOrientationPatient or "
                               "PixelSpacing; the stack cannot be placed")
    positions = np.stack([g[0] for g in geometry])
    orientations, spacings = np.stack([g[1] for g in geometry]), np.stack([g[2] for g in geometry])
    if np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
        distinct = len({tuple(np.round(o, 3)) for o in orientations})
        raise DataError(where, "series mixes slice orientations (ImageOrientationPatient); genseg stacks one "
                               "orientation at a time and does not resample", f"{distinct} orientations")
    if np.abs(spacings - spacings[0]).max() > ORIENTATION_TOLERANCE:
        raise DataError(where, "series mixes pixel spacings (PixelSpacing); genseg does not resample")
    row_cosines, column_cosines = orientations[0][:3], orientations[0][3:]
    normal = np.cross(row_cosines, column_cosines)
    along = positions @ normal
    order = sorted(range(len(geometry)), key=lambda k: (along[k], numbers[k]))
    ordered = positions[order]
    if len(order) > 1:
        gaps = np.diff(along[order])
        step = (ordered[-1] - ordered[0]) / (len(order) - 1)
        expected = ordered[0] + np.arange(len(order))[:, None] * step
        if gaps.min() < ORIENTATION_TOLERANCE:
            raise DataError(where, "two or more slices of the series share one position (several echoes, time "
                                   "points or stacks in one series?); genseg reads one stack per series",
                            f"{int((gaps < ORIENTATION_TOLERANCE).sum()) + 1} slices at one position")
        if np.linalg.norm(ordered - expected, axis=1).max() > POSITION_TOLERANCE * np.linalg.norm(step):
            raise DataError(where, "slice spacing of the series is not even (a missing slice, or stacks mixed in one "
                                   "series); genseg does not resample",
                            f"gaps from {gaps.min():.3g} to {gaps.max():.3g} mm")
    else:
        step = normal * (thickness or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = column_cosines * spacings[0][0]  # down the rows
    lps[:3, 1] = row_cosines * spacings[0][1]  # along a row
    lps[:3, 2] = step
    lps[:3, 3] = ordered[0]
    return order, LPS_TO_RAS @ lps


def decode_series(series: DicomSeries) -> np.ndarray:
    """The series' pixels in slice order as float32 (N, H, W) or (N, C, H, W), in scanner units, MONOCHROME2."""
    if series.frame_numbers:
        frames = _decode(series.members[0], series.headers[0])
        return frames[[n - 1 for n in series.frame_numbers]]
    return np.concatenate([_decode(m, h) for m, h in zip(series.members, series.headers)])


def _decode(member: Member, header) -> np.ndarray:
    """One file's frames, checked against its header's claims: float32 (F, H, W) or (F, C, H, W)."""
    pydicom = pydicom_module(member.where)
    with member.open() as fp:
        ds = pydicom.dcmread(fp)
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        kind = pydicom.uid.UID(ds.get("SOPClassUID", "")).name
        raise DataError(member.where, "has no pixel data: not an image", kind)
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # a missing decoder, or damaged pixel data
        syntax = ds.file_meta.get("TransferSyntaxUID")
        if syntax is not None and syntax.is_transfer_syntax and syntax.is_compressed:
            raise DataError(member.where, f"no installed decoder reads its {syntax.name} pixel data; {DECODERS}; "
                                          f"other compressions must be converted first",
                            f"{type(exc).__name__}: {exc}") from None
        raise DataError(member.where, "cannot decode the pixel data", f"{type(exc).__name__}: {exc}") from None
    frames, samples = _frame_count(header), int(header.get("SamplesPerPixel", 1) or 1)
    expected = (frames,) * (frames > 1) + (int(header.Rows), int(header.Columns)) + (samples,) * (samples > 1)
    if pixels.shape != expected:
        raise DataError(member.where, "pixel data does not match the header's rows, columns and frames",
                        f"decoded {pixels.shape}, header {expected}")
    pixels = pixels.astype(np.float32).reshape((frames,) + pixels.shape[-3 if samples > 1 else -2:])
    for k in range(frames):
        transform = _functional_group(ds, k, "PixelValueTransformationSequence") or ds
        pixels[k] = pixels[k] * float(transform.get("RescaleSlope", 1) or 1) + \
            float(transform.get("RescaleIntercept", 0) or 0)
    if ds.get("PhotometricInterpretation", "") == "MONOCHROME1":  # bright = low values: negate to MONOCHROME2
        pixels = -pixels
    return np.moveaxis(pixels, -1, 1) if samples > 1 else pixels


def write_segmentation(series: DicomSeries, masks: np.ndarray, target: Path) -> Path:
    """A DICOM Segmentation object (highdicom) of binary `masks` (N, H, W) in slice order, one frame per source
    slice (empty ones too), referencing the source series; segment "tumour", algorithm genseg."""
    try:
        import highdicom as hd
        from pydicom.sr.codedict import codes
        from pydicom.uid import generate_uid
    except ImportError:
        raise DataError(target, "writing DICOM-SEG needs highdicom: pip install 'genseg[dicom]'") from None
    from .. import __version__

    if series.frame_numbers:  # back to the source's frame order
        sources = [_shared_geometry(series.headers[0])]
        pixels = np.zeros((len(series.frame_numbers),) + masks.shape[1:], np.uint8)
        pixels[[n - 1 for n in series.frame_numbers]] = masks
    else:
        sources, pixels = series.headers, masks.astype(np.uint8)
    algorithm = hd.AlgorithmIdentificationSequence(name="genseg", family=codes.cid7162.ArtificialIntelligence,
                                                   version=__version__)
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="tumour", segmented_property_type=codes.SCT.Neoplasm,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm)
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[segment], series_instance_uid=generate_uid(),
            series_number=int(series.headers[0].get("SeriesNumber", 0) or 0) + 1000, sop_instance_uid=generate_uid(),
            instance_number=1, manufacturer="genseg", manufacturer_model_name="genseg U-Net",
            software_versions=__version__, device_serial_number="none", series_description="genseg tumour",
            omit_empty_frames=False)
    except Exception as exc:  # highdicom checks the source headers' modules and raises ValueError/AttributeError
        raise DataError(series.members[0].where, "cannot build a DICOM Segmentation for this series",
                        f"{type(exc).__name__}: {exc}") from None
    with atomic_path(target) as tmp:
        seg.save_as(tmp)
    return target


def _shared_geometry(header):
    """A copy whose shared functional groups hold the pixel measures and orientation: highdicom reads them only
    there, and a stacked series has one of each for every frame."""
    header = copy.deepcopy(header)
    shared = header.SharedFunctionalGroupsSequence[0]
    for sequence in ("PixelMeasuresSequence", "PlaneOrientationSequence"):
        if sequence not in shared:
            setattr(shared, sequence, header.PerFrameFunctionalGroupsSequence[0].get(sequence))
    return header


def read_segmentation(member: Member, series: DicomSeries, max_pixels: int) -> np.ndarray:
    """The tumour mask (N, H, W) bool of `series`, in its slice order, from a DICOM Segmentation object that
    references it: all its segments together; source slices the SEG leaves out are tumour-free."""
    try:
        import highdicom as hd
    except ImportError:
        raise DataError(member.where, "reading DICOM-SEG needs highdicom: pip install 'genseg[dicom]'") from None
    header = _read_header(pydicom_module(member.where), member)
    check_size(member.where, int(header.Rows), int(header.Columns), max_pixels, slices=_frame_count(header))
    if (int(header.Rows), int(header.Columns)) != series.shape[:2]:
        raise DataError(member.where, "segmentation rows and columns differ from those of the series it references",
                        f"{header.Rows} x {header.Columns}, series {series.shape[0]} x {series.shape[1]}")
    try:
        with member.open() as fp:
            seg = hd.seg.segread(fp)
        options = {"combine_segments": True, "assert_missing_frames_are_empty": True}
        if series.frame_numbers:
            labels = seg.get_pixels_by_source_frame(str(series.headers[0].SOPInstanceUID), series.frame_numbers,
                                                    **options)
        else:
            labels = seg.get_pixels_by_source_instance([str(h.SOPInstanceUID) for h in series.headers], **options)
    except Exception as exc:  # highdicom raises ValueError/KeyError/AttributeError for SEGs that do not fit
        raise DataError(member.where, "segmentation does not fit the slices of the series it references",
                        f"{type(exc).__name__}: {exc}") from None
    return labels.reshape((series.shape[2],) + series.shape[:2]) > 0
