"""`OnnxSegmenter`: an `export-onnx` file (fp32 or int8, genseg.workflows.export) on ONNX Runtime behind the
`Segmenter` interface, so `evaluate`, `segment`, `serve` and `pipeline` take `--precision int8` (or an .onnx file as
--checkpoint) and their callers do not change. Every export carries its metadata (sizes, threshold, the weights it
came from) as the ONNX metadata entry "genseg".
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from ..data.records import check_images
from ..errors import CheckpointError, ConfigError, GensegError

PRECISIONS = ("fp32", "int8")
INT8_FILE = "segmenter-int8.onnx"  # in the model folder, where `--precision int8` looks for it
METADATA_KEY = "genseg"


def onnxruntime():
    """The onnxruntime module, or a GensegError that says how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise GensegError("int8 and .onnx models run through ONNX Runtime, which is not installed: "
                          "pip install 'genseg[onnx]'") from None
    return onnxruntime

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
