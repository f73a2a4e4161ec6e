"""ONNX export of a trained segmenter, for users who serve with ONNX Runtime or Triton instead of `genseg serve`.

Uses torch's `torch.export`-based exporter (needs onnxscript, in the `onnx` extra): the TorchScript exporter is
deprecated in recent torch releases.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..inference import load_segmenter
from ..io import atomic_path


class _Probabilities(torch.nn.Module):
    """The exported graph ends in the sigmoid, so its output is what `Segmenter.predict` returns."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.predict_proba(image)


def export_onnx(checkpoint: str | Path, out: str | Path, opset: int = 18) -> Path:
    """Write `out` (atomically): input `image` (N, C, S, S), output `probability` (N, 1, S, S), dynamic N."""
    segmenter = load_segmenter(checkpoint, device="cpu")
    module = _Probabilities(segmenter.network.to(memory_format=torch.contiguous_format)).eval()
    example = torch.zeros(2, segmenter.channels, segmenter.size, segmenter.size)
    out = Path(out)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with atomic_path(out) as tmp, torch.no_grad():
        program = torch.onnx.export(module, (example,), input_names=["image"], output_names=["probability"],
                                    dynamic_shapes={"image": {0: batch}}, opset_version=opset, dynamo=True,
                                    verbose=False)
        program.save(str(tmp))
    return out
