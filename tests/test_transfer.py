"""train-seg --init-from / --freeze: starts exactly from the source's weights, adapts 1 <-> 3 channels keeping the
response to grey input, keeps frozen parts (BatchNorm statistics included) unchanged, refuses bad sources and
settings before training; the transfer study and the BraTS per-modality script run in their smoke modes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from seg_helpers import one_torch_thread, write_phantoms  # noqa: F401 (autouse fixture)

from genseg.cli import main
from genseg.data.prepared import read_metadata
from genseg.errors import CheckpointError, ConfigError, DataError
from genseg.models.unet import SegmentationUNet
from genseg.runs import SegTrainConfig
from genseg.training.seg import cross_validate, train_segmenter
from genseg.training.transfer import initial_model

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


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory) -> Path:
    """A 3-channel source run."""
    root = tmp_path_factory.mktemp("rgb")
    colour = write_phantoms(root / "rgb.h5", n=30, size=32, patients=10, channels=3)
    train_segmenter(SegTrainConfig(**TINY), colour, root / "run")
    return root / "run"


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


def test_three_to_one_channel_sums_the_kernel_and_keeps_the_grey_response(grey, rgb_run, tmp_path):
    run = rgb_run
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
    if part == "encoder":  # a resumed run keeps the same parts frozen (weights come from its checkpoint)
        resumed = train_segmenter(SegTrainConfig(**{**asdict(cfg), "epochs": 3}), grey, tmp_path / "run", resume=True)
        assert resumed.metrics["epochs_run"] == 3
        later = resumed.model.state_dict()
        assert all(torch.equal(later[k], before[k]) for k in later if k.startswith(frozen) and "num_batches" not in k)
        assert not torch.equal(later["outc.weight"], after["outc.weight"])
        with pytest.raises(ConfigError, match=r"changed settings \['freeze'\]"):
            train_segmenter(SegTrainConfig(**{**asdict(cfg), "freeze": "none"}), grey, tmp_path / "run", resume=True)


def test_cross_validate_fine_tunes_every_fold(grey, source_run, tmp_path):
    cfg = SegTrainConfig(**TINY, init_from=str(source_run), freeze="encoder+bottleneck")
    summary = cross_validate(cfg, grey, tmp_path / "cv", folds=[1])
    assert summary["folds"] == [1]
    record = json.loads((tmp_path / "cv" / "fold-1" / "run.json").read_text())["init_from"]
    assert record["source"] == str(source_run.resolve()) and record["freeze"] == "encoder+bottleneck"


def tiny_generator() -> tuple:
    """A tiny joint (image + mask) diffusers UNet2DModel and its scheduler, as train-diffusion builds them."""
    from genseg.models.diffusion import DiffusionModelConfig, build_scheduler, build_unet

    cfg = DiffusionModelConfig(sample_size=32, block_out_channels=(8, 16), norm_num_groups=4)
    return build_unet(cfg), build_scheduler(cfg)


def test_cli_fine_tunes_from_a_pipeline_folder_and_logs_it(grey, source_run, tmp_path, genseg_cli):
    """A saved GenSegPipeline folder (model_index.json, unet/, scheduler/, segmenter/) is a source too."""
    from genseg.pipeline.genseg_pipeline import GenSegPipeline

    unet, scheduler = tiny_generator()
    GenSegPipeline(unet=unet, scheduler=scheduler, segmenter=source_model(source_run)).save_pretrained(tmp_path / "pipe")
    (tmp_path / "c.yaml").write_text("base_channels: 4\ndepth: 2\nplot_samples: 1\n")
    done = genseg_cli("train-seg", "--data", grey, "--config", tmp_path / "c.yaml", "--size", "32", "--epochs", "1",
                      "--init-from", tmp_path / "pipe", "--freeze", "encoder", "--out", tmp_path / "run")
    assert "init-from" in done.stdout and "freeze encoder" in done.stdout and "nothing to adapt" in done.stdout
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["init_from"] == str(tmp_path / "pipe") and saved["freeze"] == "encoder"


def diffusion_folders(root: Path) -> dict[str, Path]:
    """A bare diffusers UNet2DModel folder and a diffusion run folder (a SliceDiffusionPipeline: no segmenter)."""
    from genseg.pipeline.diffusion import SliceDiffusionPipeline

    unet, scheduler = tiny_generator()
    unet.save_pretrained(root / "bare-unet")
    SliceDiffusionPipeline(unet=unet, scheduler=scheduler).save_pretrained(root / "diffusion-run")
    return {"bare": root / "bare-unet", "run": root / "diffusion-run"}


def test_bad_sources_and_settings_fail_before_training(grey, source_run, rgb_run, tmp_path):
    folders = diffusion_folders(tmp_path)
    two = write_phantoms(tmp_path / "two.h5", n=30, size=32, patients=10, channels=2)
    with pytest.raises(ConfigError, match="cannot adapt a model with 3 input channels to data with 2"):
        train_segmenter(SegTrainConfig(**TINY, init_from=str(rgb_run)), two, tmp_path / "run")
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
    runner = CliRunner()  # the real click commands, in-process: bad flags fail in the CLI layer within ms
    bad = runner.invoke(main, ["train-seg", "--data", str(grey), "--freeze", "decoder", "--init-from", str(source_run)])
    assert bad.exit_code == 2 and "Invalid value for '--freeze'" in bad.output
    (tmp_path / "bad.yaml").write_text("freeze: decoder\n")
    bad = runner.invoke(main, ["train-seg", "--data", str(grey), "--config", str(tmp_path / "bad.yaml")])
    assert bad.exit_code == 2 and "freeze: 'decoder' is not one of" in bad.output
    bad = runner.invoke(main, ["train-seg", "--data", str(grey), "--size", "32", "--init-from", str(folders["run"]),
                               "--out", str(tmp_path / "cli-run")])
    assert bad.exit_code == 2 and "Error: --init-from:" in bad.output and "diffusion run" in bad.output
    assert not (tmp_path / "cli-run").exists()


def script_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def test_study_smoke_mode_runs(tmp_path):
    """scripts/study_transfer.py --smoke: brain pretraining, ultrasound adaptation, table and figure."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "study_transfer.py"), "--smoke", "--out",
                           str(tmp_path / "study")], env=script_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| training images | arm | test Dice (all)" in done.stdout
    results = json.loads((tmp_path / "study" / "results.json").read_text())
    assert {(r["arm"], r["n"]) for r in results["runs"]} == {(arm, n) for arm in ("scratch", "fine-tuned")
                                                             for n in (5, results["train_available"])}
    for r in results["runs"]:
        run = tmp_path / "study" / "runs" / f"{r['arm']}-n{r['n']}-seed{r['seed']}"
        started = json.loads((run / "run.json").read_text())
        assert started["real_train_slices"] == r["n"]
        assert ("init_from" in started) == (r["arm"] == "fine-tuned")
    assert (tmp_path / "study" / "transfer.png").read_bytes()[:4] == b"\x89PNG"


def test_brats_modalities_script_smoke_mode(tmp_path, make_brats_case):
    """scripts/reproduce_brats_modalities.sh --smoke on generated NIfTI cases: four runs and the table."""
    for k in range(1, 7):
        make_brats_case(tmp_path / "brats", f"BraTS20_Training_{k:03d}")
    done = subprocess.run(["bash", str(ROOT / "scripts" / "reproduce_brats_modalities.sh"), "--smoke",
                           str(tmp_path / "brats"), str(tmp_path / "out")], env=script_env(), capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| t") or line.startswith("| flair")]
    assert [row.split("|")[1].strip() for row in rows] == ["t1", "t2", "t1ce", "flair"]
    assert [row.split("|")[5].strip() for row in rows] == ["0.8203", "0.8307", "0.7799", "0.8312"]
    for modality in ("t1", "t2", "t1ce", "flair"):
        assert read_metadata(tmp_path / "out" / f"brats-{modality}.h5")["attrs"]["modality"] == modality
        assert (tmp_path / "out" / f"seg-{modality}" / "model" / "diffusion_pytorch_model.safetensors").exists()
    assert (tmp_path / "out" / "brats_modalities.md").read_text().count("\n") == 6
    spec = importlib.util.spec_from_file_location("brats_script", ROOT / "scripts" / "reproduce_brats_modalities.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(DataError, match="none: BraTS folder not found"):
        script.reproduce(tmp_path / "none", tmp_path / "none-out", ROOT / "configs" / "seg-brats-modality.yaml")
