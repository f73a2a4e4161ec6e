"""ONNX export of a trained segmenter, fp32 or int8 (run by `OnnxSegmenter`, genseg.inference.onnx).

fp32 uses torch's `torch.export`-based exporter (needs onnxscript, in the `onnx` extra): the TorchScript exporter is
deprecated in recent torch releases. int8 is ONNX Runtime's static quantiser on that BatchNorm-folded export: QDQ
format, weights per output channel, uint8 activations calibrated (MinMax) on a few dozen slices of the model's
own training split; the weights are int8 (u8s8) where the exporting CPU has VNNI and uint8 (u8u8) elsewhere
(`int8_format`). Before an int8 file is written, its masks are compared with the fp32 model's on the held-out
splits, and the export is refused when the Dice against ground truth moves by more than `max_dice_change`.
Every export carries its metadata (sizes, threshold, the weights it came from, the guard's numbers) as the ONNX
metadata entry "genseg".
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, GensegError
from ..evaluation.evaluate import open_split, selection
from ..evaluation.metrics import dice_iou
from ..inference.onnx import METADATA_KEY, OnnxSegmenter, cpu_features, file_sha256, int8_format, onnxruntime
from ..inference.segmenter import WEIGHTS, load_segmenter, model_folder
from ..io import atomic_path

MAX_DICE_CHANGE = 0.005
CALIBRATION_SLICES = 32
class _Probabilities(torch.nn.Module):
    """The exported graph ends in the sigmoid, so its output is what `Segmenter.predict` returns."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.predict_proba(image)


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


def quantize_int8(fp32: Path, out: Path, images: np.ndarray, metadata: dict[str, Any],
                 weight_format: str = "u8u8") -> dict[str, Any]:
    """Static int8 quantisation of an fp32 export with ONNX Runtime, calibrated on `images` (N, C, S, S); writes
    `out` with `metadata` plus the quantisation settings, and returns that metadata.

    QDQ with weights per output channel (uint8 for "u8u8", int8 for "u8s8"; see `int8_format`) and uint8
    activations, after ORT's recommended pre-processing (shape inference, graph optimisation)."""
    ort = onnxruntime()
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"image": images[i:i + 8]} for i in range(0, len(images), 8)])

        def get_next(self):
            return next(self.batches, None)

    weights = {"u8u8": QuantType.QUInt8, "u8s8": QuantType.QInt8}[weight_format]
    with tempfile.TemporaryDirectory() as work:
        pre = Path(work) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre))
        quantize_static(str(pre), str(out), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=weights,
                        calibrate_method=CalibrationMethod.MinMax)
    metadata = {**metadata, "precision": "int8",
                "quantisation": {"toolkit": f"onnxruntime {ort.__version__}", "format": "QDQ",
                                 "weight_format": weight_format,
                                 "weights": f"{'uint8' if weight_format == 'u8u8' else 'int8'} per output channel",
                                 "activations": "uint8 per tensor",
                                 "calibration_method": "MinMax", "calibration_slices": len(images)}}
    write_metadata(out, metadata)
    return metadata


def _split(segmenter, checkpoint: str | Path, data: str | Path, role: str, what: str):
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
                max_dice_change: float = MAX_DICE_CHANGE, weight_format: str = "auto") -> dict[str, Any]:
    """Write the export of `checkpoint` (atomically) and return its metadata with "path" added. `out` defaults to
    segmenter-fp32.onnx / segmenter-int8.onnx in the model folder (where `--precision int8` looks).

    int8 is calibrated on `calibration` (default: the run's own training data) and refused, with nothing written,
    when its test or validation Dice differs from fp32's by more than `max_dice_change` (GensegError with the
    numbers); the guard's numbers are in the metadata. `weight_format` "auto" picks u8s8 on a CPU with VNNI and
    u8u8 elsewhere (`int8_format`); a u8s8 file is refused later on a CPU without VNNI."""
    if int8:
        onnxruntime()  # before any work: the clear install hint
        weight_format = int8_format(weight_format, cpu_features())
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
        metadata = quantize_int8(fp32, tmp, images, metadata, weight_format)
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
