"""ONNX export of a trained segmenter, fp32 or int8, and `OnnxSegmenter`, which runs an export on ONNX Runtime
behind the `Segmenter` interface, so `evaluate`, `segment`, `serve` and `pipeline` take `--precision int8` (or an
.onnx file as --checkpoint) and their callers do not change.

fp32 uses torch's `torch.export`-based exporter (needs onnxscript, in the `onnx` extra): the TorchScript exporter is
deprecated in recent torch releases. int8 is ONNX Runtime's static quantiser on that BatchNorm-folded export: QDQ
format, int8 weights per output channel, uint8 activations calibrated (MinMax) on a few dozen slices of the model's
own training split. Before an int8 file is written, its masks are compared with the fp32 model's on the held-out
splits, and the export is refused when the Dice against ground truth moves by more than `max_dice_change`.
Every export carries its metadata (sizes, threshold, the weights it came from, the guard's numbers) as the ONNX
metadata entry "genseg".
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, ConfigError, DataError, GensegError
from ..io import atomic_path

PRECISIONS = ("fp32", "int8")
INT8_FILE = "segmenter-int8.onnx"  # in the model folder, where `--precision int8` looks for it
METADATA_KEY = "genseg"
MAX_DICE_CHANGE = 0.005
CALIBRATION_SLICES = 32
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


def onnxruntime():
    """The onnxruntime module, or a GensegError that says how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise GensegError("int8 and .onnx models run through ONNX Runtime, which is not installed: "
                          "pip install 'genseg[onnx]'") from None
    return onnxruntime


def cpu_features() -> list[str]:
    """The x86 vector features of this CPU that int8 and fp32 kernels choose by (from /proc/cpuinfo; empty
    elsewhere), recorded next to measured numbers because the int8 speed-up depends on them."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        return []
    return [name for name in CPU_FEATURES if name in flags]


class _Probabilities(torch.nn.Module):
    """The exported graph ends in the sigmoid, so its output is what `Segmenter.predict` returns."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.predict_proba(image)


class OnnxSegmenter:
    """An `export-onnx` file on ONNX Runtime's CPU provider, with `Segmenter`'s predict, size, channels, threshold
    and batch_size; `precision` and `metadata` come from the file. `threads` defaults to torch's thread count, so
    one setting governs both paths."""

    def __init__(self, path: str | Path, batch_size: int = 16, threads: int | None = None):
        ort = onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT's own errors (InvalidProtobuf, Fail, ...) share no useful base class
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise CheckpointError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {first_line[:200]})"
                                  ) from None
        try:
            self.metadata = json.loads(self.session.get_modelmeta().custom_metadata_map[METADATA_KEY])
            self.precision = self.metadata["precision"]
            self.size, self.channels = int(self.metadata["size"]), int(self.metadata["channels"])
            self.threshold = float(self.metadata["threshold"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: an ONNX model without genseg's export metadata; write it with "
                                  f"`genseg export-onnx`") from None
        if self.precision not in PRECISIONS:
            raise CheckpointError(f"{path}: unknown precision {self.precision!r} in its metadata")
        self.batch_size = batch_size
        self.source = str(path)

    def predict(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """Tumour probabilities (N, S, S) float32 for preprocessed images (N, C, S, S) in [0, 1]."""
        from ..inference import check_images

        x = check_images(images, self.channels, self.size).numpy()
        out = [self.session.run(["probability"], {"image": x[i:i + self.batch_size]})[0][:, 0]
               for i in range(0, len(x), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.size, self.size), np.float32)


def load_onnx_segmenter(path: Path, precision: str | None, batch_size: int = 16, compile: bool = False,
                        weights: Path | None = None) -> OnnxSegmenter:
    """An OnnxSegmenter whose precision is `precision` (None: any); with `weights`, the file must have been
    exported from exactly those weights, so a retrained model is never served with a stale int8 file."""
    if compile:
        raise ConfigError("--compile applies to the PyTorch fp32 path; ONNX Runtime models are not compiled")
    if weights is not None and not path.is_file():
        raise CheckpointError(f"{path.parent}: has no int8 export ({path.name}); make it with `genseg export-onnx "
                              f"--checkpoint RUN --int8 [--calibration DATA.h5]`")
    segmenter = OnnxSegmenter(path, batch_size=batch_size)
    if precision is not None and segmenter.precision != precision:
        raise CheckpointError(f"{path}: is an {segmenter.precision} export, not {precision}")
    if weights is not None and segmenter.metadata.get("weights_sha256") != file_sha256(weights):
        raise CheckpointError(f"{path}: was exported from other weights than {weights} holds now (retrained?); "
                              f"export it again")
    return segmenter


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_metadata(path: Path, metadata: dict[str, Any]) -> None:
    """Replace the file's "genseg" metadata entry with `metadata` (JSON)."""
    import onnx

    model = onnx.load(str(path))
    kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(metadata))
    onnx.save(model, str(path))


def export_fp32(segmenter, out: Path, metadata: dict[str, Any], opset: int = 18) -> None:
    """Input `image` (N, C, S, S), output `probability` (N, 1, S, S), dynamic N, BatchNorm folded; `metadata`
    (precision fp32) attached."""
    module = _Probabilities(segmenter.network.to(memory_format=torch.contiguous_format)).eval()
    example = torch.zeros(2, segmenter.channels, segmenter.size, segmenter.size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        program = torch.onnx.export(module, (example,), input_names=["image"], output_names=["probability"],
                                    dynamic_shapes={"image": {0: batch}}, opset_version=opset, dynamo=True,
                                    verbose=False)
    program.save(str(out))
    write_metadata(out, metadata)


def quantize_int8(fp32: Path, out: Path, images: np.ndarray, metadata: dict[str, Any]) -> dict[str, Any]:
    """Static int8 quantisation of an fp32 export with ONNX Runtime, calibrated on `images` (N, C, S, S); writes
    `out` with `metadata` plus the quantisation settings, and returns that metadata.

    QDQ with uint8 weights per output channel and uint8 activations (u8u8), after ORT's recommended
    pre-processing (shape inference, graph optimisation). Not u8s8, although it is ORT's fastest x86 format: on
    CPUs without VNNI, ORT multiplies u8s8 with VPMADDUBSW, whose int16 sums saturate, and the masks of a trained
    segmenter fall apart there; u8u8 never saturates, so one export is accurate on every CPU it is served on
    (docs: README, "int8")."""
    ort = onnxruntime()
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"image": images[i:i + 8]} for i in range(0, len(images), 8)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as work:
        pre = Path(work) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre))
        quantize_static(str(pre), str(out), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    metadata = {**metadata, "precision": "int8",
                "quantisation": {"toolkit": f"onnxruntime {ort.__version__}", "format": "QDQ",
                                 "weights": "uint8 per output channel", "activations": "uint8 per tensor",
                                 "calibration_method": "MinMax", "calibration_slices": len(images)}}
    write_metadata(out, metadata)
    return metadata


def _split(segmenter, checkpoint: str | Path, data: str | Path, role: str, what: str):
    from ..evaluate import open_split, selection

    chosen = selection(checkpoint, data, role)
    return chosen, open_split(data, chosen, segmenter, what)


def calibration_images(segmenter, checkpoint: str | Path, data: str | Path, count: int) -> tuple[np.ndarray, dict]:
    """(`count` evenly spaced slices of the model's training split in `data`, the selection they came from)."""
    chosen, dataset = _split(segmenter, checkpoint, data, "train", "training slices to calibrate on")
    rows = np.linspace(0, len(dataset) - 1, min(count, len(dataset))).round().astype(int)
    return np.stack([dataset[int(i)]["image"].numpy() for i in rows]), chosen


def accuracy_guard(fp32, int8, checkpoint: str | Path, data: str | Path) -> dict[str, dict[str, Any]]:
    """Per held-out split (val, test) of `data`: slices, mean Dice against ground truth of the fp32 and the int8
    model, its change, and the mean Dice between the two models' masks."""
    from torch.utils.data import DataLoader

    from ..metrics import dice_iou

    rows = {}
    for role in ("val", "test"):
        chosen, dataset = _split(fp32, checkpoint, data, role, f"{role} slices to check the int8 model on")
        truth, masks_fp32, masks_int8 = [], [], []
        for batch in DataLoader(dataset, batch_size=fp32.batch_size):
            truth.append(batch["mask"][:, 0].numpy() > 0.5)
            masks_fp32.append(fp32.predict(batch["image"]) >= fp32.threshold)
            masks_int8.append(int8.predict(batch["image"]) >= int8.threshold)
        truth, masks_fp32, masks_int8 = map(np.concatenate, (truth, masks_fp32, masks_int8))
        dice_fp32, dice_int8 = (float(dice_iou(m, truth)[0].mean()) for m in (masks_fp32, masks_int8))
        rows[role] = {"selection": chosen, "slices": len(dataset), "dice_fp32": dice_fp32, "dice_int8": dice_int8,
                      "dice_change": dice_int8 - dice_fp32,
                      "mask_dice_fp32_vs_int8": float(dice_iou(masks_fp32, masks_int8)[0].mean())}
    return rows


def guard_summary(guard: dict[str, dict[str, Any]]) -> str:
    return "; ".join(f"{role} ({row['slices']} slices): Dice fp32 {row['dice_fp32']:.4f} -> int8 "
                     f"{row['dice_int8']:.4f} ({row['dice_change']:+.4f}), fp32 vs int8 masks "
                     f"{row['mask_dice_fp32_vs_int8']:.4f}" for role, row in guard.items())


def _calibration_file(checkpoint: str | Path, calibration: str | Path | None) -> Path:
    """--calibration, else the prepared file the run was trained on (run.json's data)."""
    if calibration is not None:
        return Path(calibration)
    run_json = Path(checkpoint) / "run.json"
    if run_json.is_file():
        data = Path(json.loads(run_json.read_text())["data"])
        if data.is_file():
            return data
    raise ConfigError("--int8 needs --calibration DATA.h5, the prepared file the model was trained on (its "
                      "training split calibrates, its validation and test splits check the accuracy)")


def refuse_multiclass(segmenter, checkpoint: str | Path) -> None:
    """ConfigError for a multi-class model (`train-seg --classes`): the export and OnnxSegmenter carry one tumour
    probability per pixel, and would silently drop the classes."""
    if getattr(segmenter, "multiclass", False):
        raise ConfigError(f"{checkpoint}: is a multi-class model ({len(segmenter.class_names)} tumour classes, "
                          f"trained with --classes); export-onnx supports binary models only, nothing written. "
                          f"Use the run directory itself with segment, evaluate or serve")


def export_onnx(checkpoint: str | Path, out: str | Path | None = None, opset: int = 18, int8: bool = False,
                calibration: str | Path | None = None, calibration_slices: int = CALIBRATION_SLICES,
                max_dice_change: float = MAX_DICE_CHANGE) -> dict[str, Any]:
    """Write the export of `checkpoint` (atomically) and return its metadata with "path" added. `out` defaults to
    segmenter-fp32.onnx / segmenter-int8.onnx in the model folder (where `--precision int8` looks).

    int8 is calibrated on `calibration` (default: the run's own training data) and refused, with nothing written,
    when its test or validation Dice differs from fp32's by more than `max_dice_change` (GensegError with the
    numbers); the guard's numbers are in the metadata."""
    from ..inference import WEIGHTS, load_segmenter, model_folder

    if int8:
        onnxruntime()  # before any work: the clear install hint
    model_dir, _ = model_folder(checkpoint)
    segmenter = load_segmenter(checkpoint, device="cpu")
    refuse_multiclass(segmenter, checkpoint)
    out = Path(out) if out is not None else model_dir / f"segmenter-{'int8' if int8 else 'fp32'}.onnx"
    metadata = {"precision": "fp32", "size": segmenter.size, "channels": segmenter.channels,
                "threshold": segmenter.threshold, "source": str(checkpoint),
                "weights_sha256": file_sha256(model_dir / WEIGHTS)}
    if not int8:
        with atomic_path(out) as tmp:
            export_fp32(segmenter, tmp, metadata, opset)
        return {**metadata, "path": str(out)}
    calibration = _calibration_file(checkpoint, calibration)
    images, chosen = calibration_images(segmenter, checkpoint, calibration, calibration_slices)
    with tempfile.TemporaryDirectory() as work, atomic_path(out) as tmp:
        fp32 = Path(work) / "fp32.onnx"
        export_fp32(segmenter, fp32, metadata, opset)
        metadata = quantize_int8(fp32, tmp, images, metadata)
        metadata["quantisation"].update(calibration_file=str(calibration), calibration_selection=chosen)
        guard = accuracy_guard(segmenter, OnnxSegmenter(tmp, batch_size=segmenter.batch_size), checkpoint,
                               calibration)
        worst = max(abs(row["dice_change"]) for row in guard.values())
        if worst > max_dice_change:
            raise GensegError(f"int8 export refused, nothing written: the Dice change exceeds "
                              f"{max_dice_change} ({guard_summary(guard)})")
        metadata.update(guard={"max_dice_change": max_dice_change, "splits": guard}, cpu_features=cpu_features())
        write_metadata(tmp, metadata)
    return {**metadata, "path": str(out)}
