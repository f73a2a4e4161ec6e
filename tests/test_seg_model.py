"""The paper's U-Net (counts, shapes, save/load), the metric conventions and the figure helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from genseg.evaluation.metrics import dice_iou, hd95, score_slices, summarize
from genseg.models.unet import SegmentationUNet
from genseg.viz import overlay, plot_curves, save_grid


def test_paper_architecture_counts():
    model = SegmentationUNet()
    convs = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert len(convs) == 23  # 18 3x3 + 4 up-convs + the 1x1 output
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 18
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 31.0
    widths = [m.out_channels for m in convs if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert max(widths) == 1024 and widths[0] == 64
    assert all(m.padding == (1, 1) for m in convs if m.kernel_size == (3, 3))


@pytest.mark.parametrize("channels,depth,size", [(1, 3, 64), (3, 2, 32)])
def test_output_shape_equals_input_shape(channels, depth, size):
    model = SegmentationUNet(in_channels=channels, base_channels=8, depth=depth, sample_size=size).eval()
    x = torch.rand(2, channels, size, size)
    assert model(x).shape == (2, 1, size, size)
    probs = model.predict_proba(x)
    assert probs.min() >= 0 and probs.max() <= 1


def test_bad_shapes_are_clear():
    model = SegmentationUNet(base_channels=4, depth=3, sample_size=64).eval()
    with pytest.raises(ValueError, match="not divisible by 2\\*\\*depth = 8"):
        model(torch.rand(1, 1, 60, 64))
    with pytest.raises(ValueError, match="expected images of shape \\(N, 1, H, W\\)"):
        model(torch.rand(1, 3, 64, 64))


def test_save_load_identical_predictions(tmp_path):
    from genseg.inference.segmenter import Segmenter, load_segmenter

    torch.manual_seed(0)
    model = SegmentationUNet(base_channels=8, depth=3, sample_size=64)
    model.train()(torch.rand(4, 1, 64, 64))  # move the BatchNorm running statistics away from their defaults
    model.eval()
    model.save_pretrained(tmp_path / "model", safe_serialization=True)
    assert (tmp_path / "model" / "diffusion_pytorch_model.safetensors").exists()
    images = torch.rand(5, 1, 64, 64)
    expected = Segmenter(model, device="cpu", batch_size=2).predict(images.numpy())
    assert np.allclose(expected, model.predict_proba(images)[:, 0].numpy(), atol=1e-5)  # channels_last: same maths
    loaded = load_segmenter(tmp_path / "model", device="cpu", batch_size=2)
    assert np.array_equal(loaded.predict(images.numpy()), expected)
    assert (loaded.size, loaded.channels) == (64, 1)


def test_dice_iou_conventions():
    empty = np.zeros((1, 8, 8), bool)
    full = np.zeros((1, 8, 8), bool)
    full[0, 2:6, 2:6] = True
    half = np.zeros((1, 8, 8), bool)
    half[0, 2:6, 2:4] = True
    assert dice_iou(empty, empty) == (1.0, 1.0)  # both empty: perfect
    assert dice_iou(full, empty) == (0.0, 0.0)  # false alarm on a tumour-free slice
    dice, iou = dice_iou(half, full)
    assert dice[0] == pytest.approx(2 * 8 / 24) and iou[0] == pytest.approx(0.5)


def test_hd95_cases():
    a = np.zeros((32, 32), bool)
    a[10:20, 10:20] = True
    b = np.roll(a, 3, axis=1)
    assert hd95(a, a) == 0
    assert hd95(a, b) == pytest.approx(3.0)
    assert hd95(np.zeros_like(a), np.zeros_like(a)) == 0
    assert hd95(a, np.zeros_like(a)) == pytest.approx(np.hypot(32, 32))


def test_summarize_classes_patients_and_false_positives():
    target = np.zeros((4, 8, 8), bool)
    target[:2, 2:6, 2:6] = True
    pred = target.copy()
    pred[3, 0, 0] = True  # a false alarm on the second tumour-free slice
    result = summarize(score_slices(pred, target), labels=[1, 2, 0, 0], patients=["a", "a", "b", "c"])
    assert result["dice_tumour"] == 1.0 and result["dice"] == 0.75
    assert result["fp_rate"] == 0.5 and result["tumour_free_slices"] == 2
    assert result["per_patient_dice"] == {"a": 1.0, "b": 1.0, "c": 0.0}
    assert set(result["per_class"]) == {"none", "meningioma", "glioma"}
    assert result["per_class"]["none"]["hd95"] is None  # HD95 covers slices with tumour only


def test_figures_are_pngs(tmp_path):
    image = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:8, 4:8] = 1
    tinted = overlay(image, mask, (255, 0, 0), alpha=0.5)
    assert tinted.shape == (16, 16, 3) and tinted[5, 5, 0] > tinted[5, 5, 1] and tinted[0, 0, 0] == 0
    grid = save_grid([image, mask.astype(np.float32), tinted], tmp_path / "g.png", ncols=2, titles=["a", "b", "c"])
    assert Image.open(grid).size[0] == 2 * (16 + 4) + 4
    curve = plot_curves({"train": ([1, 2, 3], [0.9, 0.5, 0.3])}, tmp_path / "c.png", "epoch", "loss")
    assert Image.open(curve).format == "PNG"


def test_folding_batchnorm_keeps_the_outputs_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = SegmentationUNet(base_channels=8, depth=3, sample_size=64)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # trained-looking statistics
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    folded = model.fold_batchnorm()
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-4, rtol=1e-4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 2 * 7  # 7 double convs at depth 3


def test_compiled_segmenter_predicts_what_the_eager_one_does(tmp_path):
    from genseg.inference.segmenter import load_segmenter
    from genseg.serve.testing import make_untrained_segmenter

    run = make_untrained_segmenter(tmp_path / "run", size=32, base_channels=4, depth=2)
    images = np.random.default_rng(0).random((2, 1, 32, 32)).astype(np.float32)
    eager = load_segmenter(run, device="cpu").predict(images)
    compiled = load_segmenter(run, device="cpu", compile=True).predict(images)
    assert np.abs(eager - compiled).max() < 1e-5


def _train_step(model: SegmentationUNet, x: torch.Tensor) -> None:
    model.train()
    model(x).square().mean().backward()


def test_gradient_checkpointing_is_exact_for_gradients_and_batchnorm_statistics():
    """Same gradients and the same BatchNorm running statistics as without checkpointing, though every block's
    forward runs twice; plain torch checkpointing (the counter-check) would count each batch twice."""
    import copy

    import torch.utils.checkpoint

    torch.manual_seed(0)
    plain = SegmentationUNet(base_channels=4, depth=2, sample_size=32)
    checkpointed, naive = copy.deepcopy(plain), copy.deepcopy(plain)
    checkpointed.enable_gradient_checkpointing()
    naive.enable_gradient_checkpointing(lambda block, *args: torch.utils.checkpoint.checkpoint(
        block, *args, use_reentrant=False))
    x = torch.rand(3, 1, 32, 32)
    for model in (plain, checkpointed, naive):
        _train_step(model, x)
    assert checkpointed.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    for a, b in zip(plain.parameters(), checkpointed.parameters()):
        assert torch.equal(a.grad, b.grad)
    for (name, a), b, c in zip(plain.named_buffers(), checkpointed.buffers(), naive.buffers()):
        assert torch.equal(a, b), name
    counts = [int(b) for name, b in naive.named_buffers() if name.endswith("num_batches_tracked")]
    assert counts and set(counts) == {2}
    with torch.no_grad():  # inference never recomputes
        checkpointed.eval()
        plain.eval()
        assert torch.equal(checkpointed(x), plain(x))
