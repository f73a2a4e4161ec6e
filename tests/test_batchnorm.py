"""Precise BatchNorm statistics (training/batchnorm.py): recomputed from given batches for the current weights,
frozen layers and the model's mode left alone, and wired into train-seg so the saved model carries them."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from seg_helpers import one_torch_thread, write_phantoms  # noqa: F401 (one_torch_thread: autouse fixture)

from genseg.models.unet import SegmentationUNet
from genseg.runs import SegTrainConfig
from genseg.training.batchnorm import recompute_batchnorm_stats
from genseg.training.seg import build_seg_data, train_segmenter


def stale_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2))
    for layer in (model[1], model[4]):
        layer.running_mean.fill_(5.0)
        layer.running_var.fill_(9.0)
    return model.eval()


def test_statistics_are_the_average_over_the_batches_for_the_current_weights():
    model = stale_model()
    batches = [torch.randn(4, 1, 12, 12) * 2 + 1 for _ in range(3)]
    recompute_batchnorm_stats(model, batches)
    with torch.no_grad():
        features = [model[0](x) for x in batches]
    expected_mean = torch.stack([f.mean((0, 2, 3)) for f in features]).mean(0)
    expected_var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in features]).mean(0)
    assert torch.allclose(model[1].running_mean, expected_mean, atol=1e-5)
    assert torch.allclose(model[1].running_var, expected_var, atol=1e-4)
    assert not model.training and model[1].momentum == 0.1  # mode and momentum restored
    assert not torch.allclose(model[4].running_mean, torch.full((2,), 5.0))  # every layer, not just the first


def test_frozen_layers_and_no_batches_leave_the_statistics_alone():
    model = stale_model().train()
    recompute_batchnorm_stats(model, [torch.randn(2, 1, 8, 8)], frozen=[model[1]])
    assert torch.equal(model[1].running_mean, torch.full((3,), 5.0))
    assert not torch.equal(model[4].running_mean, torch.full((2,), 5.0))
    assert model.training and model[1].training  # the caller's mode, frozen part included, comes back as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recompute_batchnorm_stats(model, [])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_train_seg_saves_the_model_with_statistics_of_its_own_weights(tmp_path):
    """A one-epoch run's saved model: recomputing its statistics from the same seeded slices changes nothing, while
    the run without (bn_stat_slices 0) keeps running averages that recomputing moves."""
    data = write_phantoms(tmp_path / "real.h5", n=40, size=32, patients=10)
    moved = {}
    for slices in (8, 0):
        cfg = SegTrainConfig(size=32, base_channels=4, depth=2, batch_size=4, epochs=1, patience=None, hflip=False,
                             max_rotation=0.0, plot_samples=1, lr=1e-2, bn_stat_slices=slices)
        run = train_segmenter(cfg, data, tmp_path / f"run{slices}").run_dir
        model = SegmentationUNet.from_pretrained(run / "model")
        sample = build_seg_data(dataclasses.replace(cfg, bn_stat_slices=8), data).bn_stats  # the run's own draw
        images = torch.stack([s["image"] for s in sample])  # one batch: the run's order does not matter
        before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("running_mean")}
        recompute_batchnorm_stats(model, [images])
        after = model.state_dict()
        moved[slices] = max(float((after[k] - v).abs().max()) for k, v in before.items())
    assert moved[8] < 1e-4, moved
    assert moved[0] > 1e-3, moved
