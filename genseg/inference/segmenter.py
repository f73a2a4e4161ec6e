"""A trained segmenter ready to predict: `Segmenter` (PyTorch) and `load_segmenter`, which reads a train-seg run,
its model/ folder, a saved pipeline folder or an ONNX export (onnx.py) into one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..data.records import check_images
from ..errors import CheckpointError, ConfigError
from ..models.unet import SegmentationUNet
from ..runs import run_config
from .multiclass import run_class_names, tumour_score
from .onnx import INT8_FILE, PRECISIONS, OnnxSegmenter, load_onnx_segmenter

WEIGHTS = "diffusion_pytorch_model.safetensors"  # diffusers' file name for a ModelMixin's weights


class Segmenter:
    """A segmentation U-Net ready for inference: eval mode, on its device, BatchNorm folded into the convs,
    channels-last by default (together ~1.4x eager NCHW on CPU, scripts/bench_segmenter.py), predicting in batches."""

    precision = "fp32"  # genseg.inference.onnx.OnnxSegmenter, the same interface on ONNX Runtime, may be int8

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
        classes = int(model.config.out_channels) - 1  # a --classes model (inference/multiclass.py); 0 for binary
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
        return self._probabilities(images)[:, 0].numpy()

    @torch.no_grad()
    def predict_classes(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """Softmax probabilities (N, K+1, S, S) float32 of a multi-class model (channel 0 background)."""
        return self._probabilities(images).numpy()

    def _probabilities(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The network's output probabilities (N, out channels, S, S) float32 on the CPU, batch by batch."""
        x = self._check(images)
        out = [self.network.predict_proba(batch.to(self.device).contiguous(memory_format=self.memory_format))
               for batch in x.split(self.batch_size)]
        channels = int(self.model.config.out_channels)
        return (torch.cat(out) if out else torch.zeros(0, channels, self.size, self.size)).float().cpu()

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


def load_segmenter(path: str | Path, device: str | torch.device | None = None, batch_size: int = 16,
                   compile: bool = False, precision: str | None = None) -> "Segmenter | OnnxSegmenter":
    """A Segmenter from a train-seg run directory, its model/ folder, or a saved pipeline folder (its segmenter/);
    an OnnxSegmenter from an `export-onnx` file, or with precision "int8" from the folder's int8 export
    (INT8_FILE in the model folder). `precision` None takes the checkpoint's own (fp32 for a folder). CheckpointError
    if it is none of them."""
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
        threshold = run_config(path).threshold
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

