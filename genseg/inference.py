"""Using a trained segmenter: load it from a run, predict on preprocessed arrays, segment files on disk.

`load_inputs` (files) and `load_upload` (uploaded bytes), both through genseg.decode's bounded decoders, and
`prepare_input` (channel check + the shared preprocessing) are kept separate from writing outputs so the HTTP
server decodes an upload exactly as `genseg segment` decodes the same file.
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

from .config import load_config
from .data.figshare import read_figshare_mat
from .data.records import normalize_intensity, preprocess_image
from .decode import MAX_FILE_PIXELS, MAX_SLICE_PIXELS, UPLOAD, decode_nifti, decode_npy, decode_picture, sniff
from .dicom import DicomSeries, read_dicom, write_segmentation
from .errors import CheckpointError, ConfigError, DataError, GensegError
from .io import atomic_path
from .models.unet import SegmentationUNet
from .multiclass import predict_typed, run_class_names, tumour_score
from .postprocess import check_postprocess, postprocessed
from .training.seg import SegTrainConfig
from .viz import PREDICTION_COLOR, overlay, save_png

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
WEIGHTS = "diffusion_pytorch_model.safetensors"  # diffusers' file name for a ModelMixin's weights


class Segmenter:
    """A segmentation U-Net ready for inference: eval mode, on its device, BatchNorm folded into the convs,
    channels-last by default (together ~1.4x eager NCHW on CPU, scripts/bench_segmenter.py), predicting in batches."""

    precision = "fp32"  # genseg.serve.onnx.OnnxSegmenter, the same interface on ONNX Runtime, may be int8

    def __init__(self, model: SegmentationUNet, threshold: float = 0.5, device: str | torch.device | None = None,
                 batch_size: int = 16, channels_last: bool = True, source: str = "", compile: bool = False,
                 class_names: Sequence[str] | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.eval().to(self.device)  # as trained and saved (what pipelines register)
        self.network = model.fold_batchnorm().to(memory_format=self.memory_format)  # what predicts
        if compile:  # inductor: ~1.4-1.6x on CPU after a one-off ~40 s compile (worth it for long jobs and servers)
            self.network = torch.compile(self.network)
        self.threshold = threshold
        self.batch_size = batch_size
        self.source = source
        classes = int(model.config.out_channels) - 1  # a --classes model (genseg/multiclass.py); 0 for binary
        self.class_names = list(class_names) if class_names else [f"class {k}" for k in range(1, classes + 1)]

    @property
    def multiclass(self) -> bool:
        """Whether the model types the tumour (K+1 softmax outputs): `predict_classes` and typed masks apply."""
        return int(self.model.config.out_channels) > 1

    @property
    def size(self) -> int:
        return int(self.model.config.sample_size)

    @property
    def channels(self) -> int:
        return int(self.model.config.in_channels)

    @torch.no_grad()
    def predict(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """Tumour probabilities (N, S, S) float32 for preprocessed images (N, C, S, S) in [0, 1]; for a multi-class
        model the tumour score (multiclass.tumour_score: >= 0.5 where a tumour class is the most likely)."""
        if self.multiclass:
            return tumour_score(self.predict_classes(images))
        x = self._check(images)
        out = [self.network.predict_proba(batch.to(self.device).contiguous(memory_format=self.memory_format))
               for batch in x.split(self.batch_size)]
        probs = torch.cat(out)[:, 0] if out else torch.zeros(0, self.size, self.size)
        return probs.float().cpu().numpy()

    @torch.no_grad()
    def predict_classes(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """Softmax probabilities (N, K+1, S, S) float32 of a multi-class model (channel 0 background)."""
        x = self._check(images)
        out = [self.network.predict_proba(batch.to(self.device).contiguous(memory_format=self.memory_format))
               for batch in x.split(self.batch_size)]
        channels = int(self.model.config.out_channels)
        return (torch.cat(out) if out else torch.zeros(0, channels, self.size, self.size)).float().cpu().numpy()

    @torch.no_grad()
    def features(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """Bottleneck features of the encoder, global-average-pooled: (N, D) float32 for preprocessed images
        (the feature space `genseg evaluate-synthetic` measures KID in)."""
        x = self._check(images)
        out = [self.network.encode(batch.to(self.device).contiguous(memory_format=self.memory_format))[-1].mean((2, 3))
               for batch in x.split(self.batch_size)]
        width = self.model.config.base_channels * 2 ** self.model.config.depth
        return (torch.cat(out) if out else torch.zeros(0, width)).float().cpu().numpy()

    def _check(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        return check_images(images, self.channels, self.size)


def check_images(images: np.ndarray | torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """float32 (N, channels, size, size) in [0, 1], or ValueError: what every segmenter's predict accepts."""
    x = torch.as_tensor(images, dtype=torch.float32)
    expected = (channels, size, size)
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
        raise ValueError(f"expected images of shape (N, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("images contain NaN or infinite values")
    if len(x) and (x.min() < -1e-3 or x.max() > 1 + 1e-3):
        raise ValueError(f"images must be preprocessed to [0, 1] (genseg.data.records.preprocess_image), "
                         f"got values in [{x.min():.3g}, {x.max():.3g}]")
    return x


def load_segmenter(path: str | Path, device: str | torch.device | None = None, batch_size: int = 16,
                   compile: bool = False, precision: str | None = None) -> "Segmenter | OnnxSegmenter":
    """A Segmenter from a train-seg run directory, its model/ folder, or a saved pipeline folder (its segmenter/);
    an OnnxSegmenter from an `export-onnx` file, or with precision "int8" from the folder's int8 export
    (INT8_FILE in the model folder). `precision` None takes the checkpoint's own (fp32 for a folder). CheckpointError
    if it is none of them."""
    from .serve.onnx import INT8_FILE, PRECISIONS, load_onnx_segmenter

    if precision not in (None, *PRECISIONS):
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    path = Path(path)
    if path.is_file():
        return load_onnx_segmenter(path, precision, batch_size=batch_size, compile=compile)
    model_dir, threshold = model_folder(path)
    if precision == "int8":
        return load_onnx_segmenter(model_dir / INT8_FILE, precision, batch_size=batch_size, compile=compile,
                                   weights=model_dir / WEIGHTS)
    model = SegmentationUNet.from_pretrained(model_dir, use_safetensors=True)
    classes = int(model.config.out_channels) - 1
    return Segmenter(model, threshold=threshold, device=device, batch_size=batch_size, source=str(path),
                     compile=compile, class_names=run_class_names(path, classes) if classes > 0 else None)


def model_folder(path: str | Path) -> tuple[Path, float]:
    """(folder holding config.json and the safetensors weights, the run's threshold) of a train-seg run directory,
    its model/ folder or a saved pipeline folder; CheckpointError naming what is missing."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: not found")
    threshold = 0.5
    model_dir = path
    if (path / "model_index.json").exists() and (path / "segmenter").is_dir():
        model_dir = path / "segmenter"  # a saved generate-then-segment pipeline: its registered segmenter module
    elif (path / "unet").is_dir() or (path / "scheduler").is_dir() or (path / "model_index.json").exists():
        raise CheckpointError(f"{path}: is a diffusion run or pipeline (unet/, scheduler/ or model_index.json) "
                              f"without a segmenter/, not a segmentation model; pass a train-seg run directory")
    if model_dir == path and (path / "config.yaml").exists() and not (path / "config.json").exists():
        threshold = load_config(SegTrainConfig, path / "config.yaml").threshold
        model_dir = path / "model"
        if not model_dir.is_dir():
            raise CheckpointError(f"{path}: has no trained model yet (model/ is missing); finish or resume training")
    config_file = model_dir / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path}: not a segmentation run or model folder (no config.yaml + model/, "
                              f"no config.json)")
    try:
        class_name = json.loads(config_file.read_text()).get("_class_name")
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_file}: unreadable model config ({exc})") from None
    if class_name != SegmentationUNet.__name__:
        raise CheckpointError(f"{model_dir}: holds a {class_name}, not a genseg {SegmentationUNet.__name__}")
    if not (model_dir / WEIGHTS).exists():
        found = sorted(p.name for p in model_dir.iterdir() if p.name != "config.json")
        raise CheckpointError(f"{model_dir}: no safetensors weights ({WEIGHTS}); found {found or 'nothing'}. "
                              f"Weights load only from safetensors, never from pickle files")
    return model_dir, threshold


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
        tmp.write_bytes(gzip.compress(image.to_bytes()))
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
                  precision: str | None = None, tta: str = "none", min_component: int = 0) -> dict[str, Any]:
    """Segment many inputs with a checkpoint (loaded with `compile` and `precision`, see `load_segmenter`) or a
    loaded Segmenter (or OnnxSegmenter) into `out_dir`, named by `plan_outputs`; `dicom_seg` and `probabilities`
    as in `segment_file`; `tta` and `min_component` as genseg.postprocess's.

    Refuses (GensegError naming the file) to replace an output that already exists unless `force`, before
    anything is written or a model loaded. Returns the inputs `segmented`, the files `written` and the inputs that
    `failed` (with the reason); a file that fails does not stop the others.
    """
    from tqdm.auto import tqdm

    check_postprocess(tta, min_component)
    out_dir = Path(out_dir)
    stems, outputs, failed = plan_outputs(paths, dicom_seg, probabilities, checkpoint_is_multiclass(checkpoint))
    existing = [out_dir / name for names in outputs.values() for name in names if (out_dir / name).exists()]
    if existing and not force:
        more = f" (and {len(existing) - 1} more of the outputs)" if len(existing) > 1 else ""
        raise GensegError(f"{existing[0]}: already exists{more}; pass --force to replace, or choose another --out")
    segmenter = (load_segmenter(checkpoint, compile=compile, precision=precision)
                 if isinstance(checkpoint, (str, os.PathLike)) else checkpoint)
    segmenter = postprocessed(segmenter, tta, min_component, threshold)
    report: dict[str, Any] = {"segmented": [], "written": [], "failed": failed}
    for path, stem in tqdm(stems.items(), desc="segment", disable=not progress or len(stems) < 2):
        try:
            report["written"] += [str(p) for p in segment_file(segmenter, path, out_dir / stem.parent, threshold,
                                                                stem.name, dicom_seg, probabilities)]
            report["segmented"].append(str(path))
        except DataError as exc:
            report["failed"].append({"path": str(path), "reason": exc.reason})
    return report
