"""train-seg --init-from / --freeze: starts exactly from the source's weights, adapts 1 <-> 3 channels keeping the
response to grey input, keeps frozen parts (BatchNorm statistics included) unchanged, refuses bad sources and
settings before training; the transfer study and the BraTS per-modality script run in their smoke modes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from seg_helpers import one_torch_thread, write_phantoms  # noqa: F401 (autouse fixture)

from genseg.errors import CheckpointError, ConfigError
from genseg.models.unet import SegmentationUNet
from genseg.training.seg import SegTrainConfig, train_segmenter
from genseg.training.transfer import adapt_first_conv, initial_model

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(size=32, base_channels=4, depth=2, batch_size=4, epochs=1, patience=None, hflip=False, max_rotation=0.0,
            plot_samples=1)


@pytest.fixture(scope="module")
def grey(tmp_path_factory) -> Path:
    return write_phantoms(tmp_path_factory.mktemp("grey") / "grey.h5", n=30, size=32, patients=10)


@pytest.fixture(scope="module")
def source_run(grey, tmp_path_factory) -> Path:
    """A trained 1-channel source run (two epochs, so its BatchNorm running statistics are not the defaults)."""
    run = tmp_path_factory.mktemp("src") / "run"
    train_segmenter(SegTrainConfig(**{**TINY, "epochs": 2}), grey, run)
    return run


def source_model(run: Path) -> SegmentationUNet:
    return SegmentationUNet.from_pretrained(run / "model", use_safetensors=True).eval()


def random_grey(n=3, size=32, seed=0) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def test_first_forward_equals_the_source(source_run):
    cfg = SegTrainConfig(**{**TINY, "size": 64}, init_from=str(source_run))  # new size: nothing to adapt
    init = initial_model(cfg, channels=1)
    x = random_grey(size=64)
    with torch.no_grad():
        assert torch.equal(init.model.eval()(x), source_model(source_run)(x))
    assert init.model.config.sample_size == 64
    assert any("fully convolutional" in m and "32 -> 64" in m for m in init.messages)
    assert init.info["channel_adaptation"] is None and init.info["size"] == [32, 64]


@pytest.mark.parametrize("channels", [3, 2])
def test_one_to_many_channels_keeps_the_grey_response(source_run, channels):
    init = initial_model(SegTrainConfig(**TINY, init_from=str(source_run)), channels=channels)
    x = random_grey()
    with torch.no_grad():
        adapted = init.model.eval()(x.repeat(1, channels, 1, 1))
        torch.testing.assert_close(adapted, source_model(source_run)(x), rtol=1e-4, atol=1e-5)
    assert init.model.config.in_channels == channels
    assert f"from 1 to {channels}" in init.info["channel_adaptation"]


def test_three_to_one_channel_sums_the_kernel_and_keeps_the_grey_response(grey, tmp_path):
    colour = write_phantoms(tmp_path / "rgb.h5", n=30, size=32, patients=10, channels=3)
    run = tmp_path / "rgb-run"
    train_segmenter(SegTrainConfig(**TINY), colour, run)
    rgb_model = source_model(run)
    init = initial_model(SegTrainConfig(**TINY, init_from=str(run)), channels=1)
    torch.testing.assert_close(init.model.inc[0].weight, rgb_model.inc[0].weight.sum(1, keepdim=True))
    x = random_grey()
    with torch.no_grad():
        torch.testing.assert_close(init.model.eval()(x), rgb_model(x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-5)
    # and the adapted model trains on grey data: a working model, its run records where it started
    result = train_segmenter(SegTrainConfig(**TINY, init_from=str(run)), grey, tmp_path / "ft")
    assert 0.0 <= result.metrics["test"]["dice"] <= 1.0
    record = json.loads((tmp_path / "ft" / "run.json").read_text())["init_from"]
    assert record["source"] == str(run.resolve()) and record["channels"] == [3, 1]
    assert "summed over the 3 channels" in record["channel_adaptation"]
    assert yaml.safe_load((tmp_path / "ft" / "config.yaml").read_text())["init_from"] == str(run)


@pytest.mark.parametrize("part, frozen_downs", [("encoder", 1), ("encoder+bottleneck", 2)])
def test_frozen_parts_stay_unchanged_while_the_rest_trains(grey, source_run, tmp_path, part, frozen_downs):
    cfg = SegTrainConfig(**{**TINY, "epochs": 2, "lr": 1e-2}, init_from=str(source_run), freeze=part)
    result = train_segmenter(cfg, grey, tmp_path / "run")
    before, after = source_model(source_run).state_dict(), result.model.state_dict()
    frozen = ("inc.",) + tuple(f"downs.{i}." for i in range(frozen_downs))
    for name, value in after.items():
        if name.endswith("num_batches_tracked"):
            continue
        if name.startswith(frozen):  # weights and BatchNorm running statistics
            assert torch.equal(value, before[name]), name
        elif name.startswith(("ups.", "outc.")) and not name.endswith(("running_mean", "running_var")):
            assert not torch.equal(value, before[name]), name
    if frozen_downs == 1:  # the bottleneck trains under "encoder"
        assert not torch.equal(after["downs.1.1.0.weight"], before["downs.1.1.0.weight"])
    record = json.loads((tmp_path / "run" / "run.json").read_text())["init_from"]
    assert record["freeze"] == part and 0 < record["frozen_parameters"] < record["total_parameters"]


def test_cli_fine_tunes_from_a_pipeline_folder_and_logs_it(grey, source_run, tmp_path, genseg_cli):
    """A saved pipeline folder (model_index.json, unet/, scheduler/, segmenter/) is a source too."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    pipe = tmp_path / "pipe"
    unet = UNet2DModel(sample_size=32, in_channels=2, out_channels=2, block_out_channels=(8, 16), norm_num_groups=4,
                       layers_per_block=1, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(pipe)
    source_model(source_run).save_pretrained(pipe / "segmenter")
    index = json.loads((pipe / "model_index.json").read_text())
    (pipe / "model_index.json").write_text(json.dumps({**index, "segmenter": ["genseg.models.unet",
                                                                               "SegmentationUNet"]}))
    (tmp_path / "c.yaml").write_text("base_channels: 4\ndepth: 2\nplot_samples: 1\n")
    done = genseg_cli("train-seg", "--data", grey, "--config", tmp_path / "c.yaml", "--size", "32", "--epochs", "1",
                      "--init-from", pipe, "--freeze", "encoder", "--out", tmp_path / "run")
    assert "init-from" in done.stdout and "freeze encoder" in done.stdout and "nothing to adapt" in done.stdout
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["init_from"] == str(pipe) and saved["freeze"] == "encoder"


def diffusion_folders(root: Path) -> dict[str, Path]:
    """A bare diffusers UNet2DModel folder and a diffusion run / pipeline without a segmenter."""
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=32, in_channels=2, out_channels=2, block_out_channels=(8, 16), norm_num_groups=4,
                       layers_per_block=1, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    unet.save_pretrained(root / "bare-unet")
    unet.save_pretrained(root / "diffusion-run" / "unet")
    DDPMScheduler().save_pretrained(root / "diffusion-run" / "scheduler")
    return {"bare": root / "bare-unet", "run": root / "diffusion-run"}


def test_bad_sources_and_settings_fail_before_training(grey, source_run, tmp_path, genseg_cli):
    folders = diffusion_folders(tmp_path)
    cases = [
        (dict(init_from=str(tmp_path / "nothing")), CheckpointError, "nothing: not found"),
        (dict(init_from=str(folders["bare"])), CheckpointError, "holds a UNet2DModel, not a genseg SegmentationUNet"),
        (dict(init_from=str(folders["run"])), CheckpointError, "is a diffusion run or pipeline"),
        (dict(init_from=str(source_run), base_channels=8), ConfigError,
         r"holds SegmentationUNet\(in_channels=1, base_channels=4, depth=2.*this run builds "
         r"SegmentationUNet\(in_channels=1, base_channels=8, depth=2"),
        (dict(init_from=str(source_run), depth=3), ConfigError, "depth differ"),
        (dict(freeze="encoder"), ConfigError, "needs init_from"),
        (dict(init_from=str(source_run), freeze="decoder"), ConfigError, "unknown part 'decoder'"),
    ]
    for overrides, error, match in cases:
        with pytest.raises(error, match=match):
            train_segmenter(SegTrainConfig(**{**TINY, **overrides}), grey, tmp_path / "run")
        assert not (tmp_path / "run").exists(), overrides  # nothing written: failed before training
    with pytest.raises(ConfigError, match="cannot adapt a model with 3 input channels to data with 2"):
        adapt_first_conv(torch.ones(4, 3, 3, 3), 2)
    bad = genseg_cli("train-seg", "--data", grey, "--freeze", "decoder", "--init-from", source_run, returncode=2)
    assert "Invalid value for '--freeze'" in bad.stderr
    (tmp_path / "bad.yaml").write_text("freeze: decoder\n")
    bad = genseg_cli("train-seg", "--data", grey, "--config", tmp_path / "bad.yaml", returncode=2)
    assert "freeze: 'decoder' is not one of" in bad.stderr
    bad = genseg_cli("train-seg", "--data", grey, "--size", "32", "--init-from", folders["run"],
                     "--out", tmp_path / "cli-run", returncode=2)
    assert "Error: --init-from:" in bad.stderr and "diffusion run" in bad.stderr
