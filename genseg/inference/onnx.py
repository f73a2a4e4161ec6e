"""`OnnxSegmenter`: an `export-onnx` file (fp32 or int8, genseg.workflows.export) on ONNX Runtime behind the
`Segmenter` interface, so `evaluate`, `segment`, `serve` and `pipeline` take `--precision int8` (or an .onnx file as
--checkpoint) and their callers do not change. Every export carries its metadata (sizes, threshold, the weights it
came from) as the ONNX metadata entry "genseg".
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.records import check_images
from ..errors import CheckpointError, ConfigError, GensegError

PRECISIONS = ("fp32", "int8")
INT8_FILE = "segmenter-int8.onnx"  # in the model folder, where `--precision int8` looks for it
METADATA_KEY = "genseg"
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
INT8_FORMATS = ("auto", "u8u8", "u8s8")
VNNI = ("avx512_vnni", "avx_vnni")  # either gives ONNX Runtime u8s8 kernels whose int32 sums do not saturate


def onnxruntime():
    """The onnxruntime module, or a GensegError that says how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise GensegError("int8 and .onnx models run through ONNX Runtime, which is not installed: "
                          "pip install 'genseg[onnx]'") from None
    return onnxruntime

def int8_format(requested: str, features: list[str]) -> str:
    """The weight format of an int8 export: u8s8 (ONNX Runtime's fastest on x86) on a CPU with VNNI, u8u8
    elsewhere. Without VNNI, ORT multiplies u8s8 with VPMADDUBSW, whose int16 partial sums saturate and break a
    trained segmenter's masks; u8u8 never saturates but runs without the VNNI/AMX int8 kernels."""
    if requested not in INT8_FORMATS:
        raise ConfigError(f"int8 format {requested!r}: expected one of {', '.join(INT8_FORMATS)}")
    if requested != "auto":
        return requested
    return "u8s8" if any(name in features for name in VNNI) else "u8u8"


def check_int8_format(path: str | Path, metadata: dict[str, Any], features: list[str]) -> None:
    """Refuse a u8s8 export on an x86 CPU without VNNI: its accuracy guard was measured where the sums do not
    saturate, and here they do."""
    fmt = metadata.get("quantisation", {}).get("weight_format")
    if fmt == "u8s8" and "avx2" in features and not any(name in features for name in VNNI):
        raise CheckpointError(f"{path}: a u8s8 int8 export (made on a CPU with VNNI), and this CPU has no VNNI, where "
                              f"ONNX Runtime's u8s8 sums saturate and the masks would be wrong; export it again on "
                              f"this machine (`genseg export-onnx --int8` picks u8u8 here)")


def cpu_features() -> list[str]:
    """The x86 vector features of this CPU that int8 and fp32 kernels choose by (from /proc/cpuinfo; empty
    elsewhere), recorded next to measured numbers because the int8 speed-up depends on them."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        return []
    return [name for name in CPU_FEATURES if name in flags]


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
        check_int8_format(path, self.metadata, cpu_features())
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
