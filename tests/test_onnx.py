"""`genseg export-onnx`: ONNX Runtime gives the same probabilities as PyTorch, for any batch size."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from genseg.cli import main
from genseg.inference import load_segmenter
from genseg.serve.testing import make_untrained_segmenter


@pytest.mark.parametrize("channels", [1, 3])
def test_onnx_runtime_matches_pytorch(tmp_path, channels):
    run_dir = make_untrained_segmenter(tmp_path / "seg", size=64, base_channels=8, depth=3, channels=channels, seed=3)
    out = tmp_path / "model.onnx"
    result = CliRunner().invoke(main, ["export-onnx", "--checkpoint", str(run_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).random((5, channels, 64, 64)).astype(np.float32)
    onnx_probs = session.run(["probability"], {"image": images})[0]
    torch_probs = load_segmenter(run_dir, device="cpu").predict(images)
    assert onnx_probs.shape == (5, 1, 64, 64)
    assert np.abs(onnx_probs[:, 0] - torch_probs).max() < 1e-4
    assert not list(tmp_path.glob(".model.onnx.*"))  # written atomically, no temporary left behind


def test_export_from_a_missing_run_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["export-onnx", "--checkpoint", str(tmp_path / "nothing"),
                                       "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2 and "not found" in result.output and not (tmp_path / "m.onnx").exists()
