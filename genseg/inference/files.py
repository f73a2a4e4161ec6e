"""Segmenting files: decode inputs (`load_inputs` for files, `load_upload` for uploaded bytes, both through
genseg.data.decode's bounded decoders), `prepare_input` (channel check + the shared preprocessing), and
`segment_files`, which writes the outputs. Decoding is kept separate from writing outputs so the HTTP server
decodes an upload exactly as `genseg segment` decodes the same file.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data.decode import MAX_FILE_PIXELS, MAX_SLICE_PIXELS, UPLOAD, decode_nifti, decode_npy, decode_picture, sniff
from ..data.dicom import DicomSeries, read_dicom, write_segmentation
from ..data.figshare import read_figshare_mat
from ..data.records import normalize_intensity, preprocess_image
from ..errors import DataError, GensegError
from ..io import atomic_path
from ..viz import PREDICTION_COLOR, overlay, save_png
from .postprocess import check_postprocess, postprocessed, predict_typed
from .segmenter import Segmenter, load_segmenter, model_folder

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


class InputSlice(NamedTuple):
    """One 2-D image from an input file: raw intensities (H, W) or (C, H, W) plus where it came from."""

    part: str  # what its output names add to the file's: "" for a one-slice file, _z007 / _f002 in a volume
    image: np.ndarray
    meta: dict[str, Any]  # "format", and for slices of a volume "volume" (a Volume) and "slice"


@dataclass(eq=False)
class Volume:
    """Slices of one input that share a voxel grid (a NIfTI file, a DICOM series), and what volume outputs need."""

    part: str  # what the volume's output names add to the input's: "" or _<series> for a series in a folder/zip
    shape: tuple[int, ...]  # the voxel grid; slices run along the last axis
    affine: np.ndarray | None  # voxel -> RAS mm; None when the source has no patient geometry (no NIfTI outputs)
    header: Any = None  # a NIfTI source's header, which its masks keep
    series: DicomSeries | None = None  # a DICOM source, which --dicom-seg references


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _stem(path: Path) -> str:
    return path.name[: -len(".nii.gz")] if _suffix(path) == ".nii.gz" else path.stem


def _is_dicom(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(132)[128:] == b"DICM"


def load_inputs(path: str | Path, max_pixels: int = MAX_FILE_PIXELS,
                skipped: list[DataError] | None = None) -> list[InputSlice]:
    """Decode one input into 2-D slices: Figshare .mat, NIfTI (slices along the last axis), DICOM (a file, or the
    series of a folder or .zip), PNG/JPG/TIFF/BMP, .npy. Sizes are checked against MAX_SIDE and `max_pixels` (all
    slices together) before decoding. Files of a DICOM folder or zip that cannot be used are appended to `skipped`
    while the readable series are returned."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "file not found")
    suffix = _suffix(path)
    try:
        if path.is_dir() or suffix in (".zip", ".dcm") or _is_dicom(path):
            return _dicom_slices(path, max_pixels, skipped)
        if suffix == ".mat":
            return [_figshare_slice(path, "", max_pixels)]
        if suffix in NIFTI_SUFFIXES:
            img, voxels = decode_nifti(path, path, max_pixels)
            volume = Volume("", img.shape, img.affine, img.header)
            return [InputSlice(f"_z{k:03d}", voxels[..., k], {"format": "nifti", "volume": volume, "slice": k})
                    for k in range(voxels.shape[-1])]
        if suffix == ".npy":
            return [InputSlice("", decode_npy(path, path, max_pixels), {"format": "npy"})]
        if suffix in IMAGE_SUFFIXES:
            return [InputSlice("", decode_picture(path, path, max_pixels), {"format": "image"})]
    except DataError:
        raise
    except Exception as exc:  # every decoder's own failure becomes one clear line naming the file
        raise DataError(path, "cannot read", f"{type(exc).__name__}: {exc}") from None
    raise DataError(path, f"unsupported file type {suffix or '(none)'}; expected .mat, .nii/.nii.gz, .dcm, .npy, "
                          f"an image ({', '.join(IMAGE_SUFFIXES)}), or a folder or .zip of DICOM files")


def _dicom_slices(path: Path, max_pixels: int, skipped: list[DataError] | None) -> list[InputSlice]:
    """Every series of a DICOM file, folder or zip as slices; a series in a folder or zip is named by its label."""
    found = read_dicom(path, max_pixels)
    problems = found.skipped + [DataError(m.where, "is a DICOM Segmentation, not an image to segment")
                                for m, _ in found.segmentations]
    grouped = path.is_dir() or _suffix(path) == ".zip"
    if skipped is not None and grouped:
        skipped.extend(problems)
    if not found.series:
        if not grouped:
            raise problems[0]
        raise DataError(path, "holds no DICOM image series that can be read", f"{len(problems)} file(s) skipped")
    slices = []
    for series, frames in zip(found.series, found.frames):
        volume = Volume(f"_{series.label}" if grouped else "", series.shape, series.affine, series=series)
        for k, frame in enumerate(frames):
            index = "" if len(frames) == 1 else f"_{'z' if series.affine is not None else 'f'}{k:03d}"
            slices.append(InputSlice(volume.part + index, frame, {"format": "dicom", "volume": volume, "slice": k}))
    return slices


def load_upload(data: bytes, max_pixels: int = MAX_SLICE_PIXELS) -> list[InputSlice]:
    """Decode uploaded bytes, told apart by their magic number: PNG, JPEG, .npy, a Figshare MATLAB v7.3/v5 slice.

    Nothing touches the file system. DataError (path "upload", a `problem` that quotes nothing of the upload)
    for anything else, and for a claimed size over MAX_SIDE or `max_pixels` before anything that size is
    allocated; a server can pass what is left of a request's pixel budget as `max_pixels`.
    """
    kind = sniff(data)
    try:
        if kind == "mat":
            return [_figshare_slice(data, "", max_pixels)]
        if kind == "npy":
            return [InputSlice("", decode_npy(data, UPLOAD, max_pixels), {"format": "npy"})]
        if kind in ("png", "jpeg"):
            return [InputSlice("", decode_picture(data, UPLOAD, max_pixels, (kind.upper(),)), {"format": "image"})]
    except DataError:
        raise
    except Exception as exc:
        raise DataError(UPLOAD, "cannot read", f"{type(exc).__name__}: {exc}") from None
    raise DataError(UPLOAD, "not a PNG, JPEG, .npy or MATLAB .mat file")


def _figshare_slice(source: Path | bytes, part: str, max_pixels: int) -> InputSlice:
    record = read_figshare_mat(source, min(max_pixels, MAX_SLICE_PIXELS))
    return InputSlice(part, record.image, {"format": "figshare", "label": record.label, "patient": record.patient})


def prepare_input(image: np.ndarray, channels: int, size: int, where: str | Path = "input") -> np.ndarray | None:
    """Match the model's channels and apply the training preprocessing; None for a constant (blank) image.

    A colour picture whose channels are identical is grey and is accepted by a 1-channel model; real colour
    into a grey model (or grey into a colour model) is an error, as are NaN values.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3 and channels == 1 and image.shape[0] in (3, 4) and np.ptp(image[:3], axis=0).max() == 0:
        image = image[0]
    have = 1 if image.ndim == 2 else image.shape[0]
    if image.ndim not in (2, 3) or have != channels:
        raise DataError(where, f"image of shape {image.shape} has {have} channel(s), the model expects {channels}")
    if not np.isfinite(image).all():
        raise DataError(where, "image contains NaN or infinite values")
    if image.max() == image.min():
        return None  # nothing to segment; callers write an empty mask
    return preprocess_image(image, size)


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if mask.shape == shape:
        return mask.astype(np.uint8)
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.interpolate(t, size=shape, mode="nearest-exact")[0, 0].numpy().astype(np.uint8)


def resize_probability(probability: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(probability, dtype=np.float32))[None, None]
    if tuple(t.shape[-2:]) != tuple(shape):
        t = F.interpolate(t, size=shape, mode="bilinear", align_corners=False)
    return t[0, 0].clamp(0, 1).numpy()


def _volumes(slices: Sequence[InputSlice]) -> list[tuple[Volume, list[int]]]:
    """The volumes these slices belong to, each with its slices' indices, in input order."""
    groups: dict[int, tuple[Volume, list[int]]] = {}
    for i, s in enumerate(slices):
        if "volume" in s.meta:
            groups.setdefault(id(s.meta["volume"]), (s.meta["volume"], []))[1].append(i)
    return list(groups.values())


def _placed(s: InputSlice) -> bool:
    """Whether the slice lies in a volume with patient geometry (its outputs then include the volume's NIfTI)."""
    return "volume" in s.meta and s.meta["volume"].affine is not None


def output_names(slices: Sequence[InputSlice], stem: str, dicom_seg: bool = False,
                 probabilities: bool = False, typed: bool = False) -> list[str]:
    """The files `segment_file` writes for these slices of one input, in the order it writes them (`typed`: a
    multi-class model's, with the _classes outputs)."""
    names = []
    for s in slices:
        names += [f"{stem}{s.part}_mask.png", f"{stem}{s.part}_overlay.png"]
        if typed:
            names.append(f"{stem}{s.part}_classes.png")
        if probabilities and not _placed(s):
            names.append(f"{stem}{s.part}_probabilities.nii.gz")
    for volume, _ in _volumes(slices):
        if volume.affine is not None:
            names.append(f"{stem}{volume.part}_mask.nii.gz")
            if typed:
                names.append(f"{stem}{volume.part}_classes.nii.gz")
            if probabilities:
                names.append(f"{stem}{volume.part}_probabilities.nii.gz")
        if dicom_seg and volume.series is not None:
            names.append(f"{stem}{volume.part}_seg.dcm")
    return names


def segment_file(segmenter: Segmenter, path: str | Path, out_dir: str | Path, threshold: float | None = None,
                 stem: str | None = None, dicom_seg: bool = False, probabilities: bool = False) -> list[Path]:
    """Segment every slice of one input; write <stem>_mask.png (0/255) and <stem>_overlay.png at the input's
    resolution (<stem>_z007_... per slice of a volume, <stem>_<series>_... per series of a DICOM folder or zip).
    A volume with patient geometry (NIfTI, a DICOM series) also gets a uint8 <stem>_mask.nii.gz on its own voxel
    grid (a NIfTI source's affine and header; a DICOM series' affine from its geometry). `probabilities` adds
    float32 <stem>_probabilities.nii.gz (NIfTI has no float16 type; per slice for inputs without geometry),
    `dicom_seg` a DICOM Segmentation <stem>_seg.dcm for each DICOM series. `stem` defaults to the file's name
    without its extension. A multi-class model (`train-seg --classes`) also writes the typed mask, the tumour class
    (1..K, the run's class_names in order; 0 background) of every pixel of the binary mask: uint8
    <stem>_classes.png per slice (pixel values 0..K) and <stem>_classes.nii.gz per volume with geometry.
    Returns the paths, in `output_names` order."""
    path, out_dir = Path(path), Path(out_dir)
    threshold = segmenter.threshold if threshold is None else threshold
    slices = load_inputs(path)
    prepared = [prepare_input(s.image, segmenter.channels, segmenter.size, path) for s in slices]
    todo = [i for i, p in enumerate(prepared) if p is not None]
    typed = getattr(segmenter, "multiclass", False)
    probs, classes = _predict_slices(segmenter, [prepared[i] for i in todo], todo, threshold, typed)
    targets = iter(out_dir / name for name in output_names(slices, _stem(path) if stem is None else stem, dicom_seg,
                                                           probabilities, typed))
    written, full_masks, full_probs, full_classes = [], [], [], []
    for i, s in enumerate(slices):
        shape = s.image.shape[-2:]
        mask = resize_mask((probs[i] >= threshold).astype(np.uint8), shape) if i in probs else np.zeros(shape, np.uint8)
        shown = normalize_intensity(s.image) if i in probs else np.zeros(shape, np.float32)
        written.append(save_png(Image.fromarray(mask * 255), next(targets)))
        written.append(save_png(overlay(shown, mask, PREDICTION_COLOR), next(targets)))
        if typed:
            full_classes.append(resize_mask(classes[i], shape) if i in classes else np.zeros(shape, np.uint8))
            written.append(save_png(Image.fromarray(full_classes[-1]), next(targets)))
        full_masks.append(mask)
        full_probs.append(resize_probability(probs[i], shape) if i in probs else np.zeros(shape, np.float32))
        if probabilities and not _placed(s):
            written.append(_write_nifti(full_probs[-1][..., None], np.float32, None, next(targets)))
    for volume, indices in _volumes(slices):
        if volume.affine is not None:
            written.append(_write_nifti(np.stack([full_masks[i] for i in indices], -1), np.uint8, volume,
                                        next(targets)))
            if typed:
                written.append(_write_nifti(np.stack([full_classes[i] for i in indices], -1), np.uint8, volume,
                                            next(targets)))
            if probabilities:
                written.append(_write_nifti(np.stack([full_probs[i] for i in indices], -1), np.float32, volume,
                                            next(targets)))
        if dicom_seg and volume.series is not None:
            written.append(write_segmentation(volume.series, np.stack([full_masks[i] for i in indices]),
                                              next(targets)))
    return written


def _predict_slices(segmenter, images: list[np.ndarray], todo: list[int], threshold: float,
                    typed: bool) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """({slice index: tumour probabilities}, {slice index: typed mask} for a multi-class model, else {})."""
    if not todo:
        return {}, {}
    if not typed:
        return dict(zip(todo, segmenter.predict(np.stack(images)))), {}
    scores, classes = predict_typed(segmenter, np.stack(images), threshold)
    return dict(zip(todo, scores)), dict(zip(todo, classes))


def checkpoint_is_multiclass(checkpoint) -> bool:
    """Whether a checkpoint (path or loaded segmenter) is a multi-class model, read from its config.json without
    loading weights; False for anything unreadable (loading it reports the problem)."""
    if not isinstance(checkpoint, (str, os.PathLike)):
        return bool(getattr(checkpoint, "multiclass", False))
    try:
        if Path(checkpoint).is_file():
            return False  # an .onnx export: binary only (export-onnx refuses multi-class models)
        model_dir, _ = model_folder(checkpoint)
        return int(json.loads((model_dir / "config.json").read_text()).get("out_channels", 1)) > 1
    except (GensegError, OSError, ValueError, TypeError):
        return False


def _write_nifti(values: np.ndarray, dtype, volume: Volume | None, target: Path) -> Path:
    """`values` (H, W, Z) as a NIfTI in the source volume's voxel grid, with its affine (and a NIfTI source's
    header) so viewers overlay it; without a volume, the picture's own pixel grid (identity affine)."""
    import gzip

    import nibabel as nib

    if volume is not None and volume.header is not None:
        header = volume.header.copy()
        header.set_data_dtype(dtype)
        image = nib.Nifti1Image(values.reshape(volume.shape).astype(dtype), volume.affine, header)
    else:
        affine = np.eye(4) if volume is None else volume.affine
        image = nib.Nifti1Image(values.astype(dtype), affine)
        image.set_qform(affine, code="scanner")
        image.set_sform(affine, code="scanner")
    image.header["scl_slope"], image.header["scl_inter"] = 1, 0
    with atomic_path(target) as tmp:
        tmp.write_bytes(gzip.compress(image.to_bytes(), mtime=0))  # no time stamp: same mask, same bytes
    return target


def plan_outputs(paths: Sequence[str | Path], dicom_seg: bool = False,
                 probabilities: bool = False,
                 typed: bool = False) -> tuple[dict[Path, Path], dict[Path, list[Path]], list[dict]]:
    """Name every output before anything is written: (input -> output stem, input -> its output files, both
    relative to the output folder; failures, including the unusable files of DICOM folders and zips). Each input
    is decoded here once for its slice names.

    Outputs keep the inputs' folders below their common parent folder (a/scan.png and b/scan.png ->
    a/scan_mask.png and b/scan_mask.png; files of one folder stay flat). Inputs whose names would meet
    (scan.png and scan.tif in one folder, vol.nii.gz's slice vol_z000 and vol_z000.png) use their whole file name
    as the stem (scan.png_mask.png, scan.tif_mask.png). A file given twice counts once.
    """
    first: dict[str, Path] = {}
    for path in paths:
        first.setdefault(os.path.abspath(path), Path(path))
    folders = {path: Path(key).parent for key, path in first.items()}
    root = Path(os.path.commonpath(list(folders.values()))) if folders else Path()
    slices, failed, skipped = {}, [], []
    for path in folders:
        try:
            slices[path] = [s._replace(image=None) for s in load_inputs(path, skipped=skipped)]  # names only
        except DataError as exc:
            failed.append({"path": str(path), "reason": exc.reason})
    failed = [{"path": exc.path, "reason": exc.reason} for exc in skipped] + failed
    whole_name: set[Path] = set()
    while True:
        stems = {p: folders[p].relative_to(root) / (p.name if p in whole_name else _stem(p)) for p in slices}
        outputs = {p: [stem.parent / name for name in output_names(slices[p], stem.name, dicom_seg, probabilities,
                                                                   typed)]
                   for p, stem in stems.items()}
        writers = defaultdict(list)
        for p, names in outputs.items():
            for name in names:
                writers[name].append(p)
        clash = {name: ps for name, ps in writers.items() if len(ps) > 1}
        if not clash:
            return stems, outputs, failed
        meeting = {p for ps in clash.values() for p in ps}
        if meeting <= whole_name:
            name, (a, b, *_) = next(iter(clash.items()))
            raise GensegError(f"{a} and {b} would both write {name}; rename one of them")
        whole_name |= meeting


def segment_files(paths: Sequence[str | Path], checkpoint: str | Path | Segmenter, out_dir: str | Path,
                  threshold: float | None = None, progress: bool = True, force: bool = False,
                  compile: bool = False, dicom_seg: bool = False, probabilities: bool = False,
                  precision: str | None = None, tta: str = "none", min_component: int = 0,
                  min_peak: float = 0.0) -> dict[str, Any]:
    """Segment many inputs with a checkpoint (loaded with `compile` and `precision`, see `load_segmenter`) or a
    loaded Segmenter (or OnnxSegmenter) into `out_dir`, named by `plan_outputs`; `dicom_seg` and `probabilities`
    as in `segment_file`; `tta`, `min_component` and `min_peak` as genseg.inference.postprocess's.

    Refuses (GensegError naming the file) to replace an output that already exists unless `force`, before
    anything is written or a model loaded. Returns the inputs `segmented`, the files `written` and the inputs that
    `failed` (with the reason); a file that fails does not stop the others.

    Under `accelerate launch` / `torchrun` the main process plans and checks the outputs once for every
    process, each process segments its share of the inputs, and every process returns the merged report, the
    same as one process's (genseg.distributed).
    """
    from tqdm.auto import tqdm

    from ..distributed import main_decides, merge_reports, process_state, share

    check_postprocess(tta, min_component, min_peak)
    out_dir = Path(out_dir)
    state = process_state()

    def plan():
        stems, outputs, failed = plan_outputs(paths, dicom_seg, probabilities, checkpoint_is_multiclass(checkpoint))
        existing = [out_dir / name for names in outputs.values() for name in names if (out_dir / name).exists()]
        if existing and not force:
            more = f" (and {len(existing) - 1} more of the outputs)" if len(existing) > 1 else ""
            raise GensegError(f"{existing[0]}: already exists{more}; pass --force to replace, or choose another "
                              f"--out")
        return stems, failed

    stems, failed = main_decides(state, plan)
    device = state.device if state.num_processes > 1 else None
    segmenter = (load_segmenter(checkpoint, device=device, compile=compile, precision=precision)
                 if isinstance(checkpoint, (str, os.PathLike)) else checkpoint)
    segmenter = postprocessed(segmenter, tta, min_component, threshold, min_peak)
    report: dict[str, Any] = {"segmented": [], "written": [], "failed": []}
    mine = share(state, list(stems.items()))
    for path, stem in tqdm(mine, desc="segment", disable=not progress or len(stems) < 2 or not state.is_main_process):
        try:
            report["written"] += [str(p) for p in segment_file(segmenter, path, out_dir / stem.parent, threshold,
                                                                stem.name, dicom_seg, probabilities)]
            report["segmented"].append(str(path))
        except DataError as exc:
            report["failed"].append({"path": str(path), "reason": exc.reason})
    report = merge_reports(state, report)
    report["failed"] = failed + report["failed"]
    return report
