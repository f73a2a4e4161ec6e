"""Diffusion: training (overfits, resumes after a kill), the saved diffusers folder, sampling with every
scheduler into the prepared format, class conditioning, process figures, and the bad inputs of issue 5.

Tiny models (16 px, channels 16/32) on phantom slices keep the whole file well under a minute and a half."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image

from genseg.data.info import dataset_info
from genseg.data.prepared import PreparedDataset, read_metadata
from genseg.errors import CheckpointError, ConfigError, DataError
from genseg.models.diffusion import SCHEDULERS, DiffusionModelConfig, make_sampling_scheduler
from genseg.pipeline import SamplingSettings, SliceDiffusionPipeline, load_diffusion, seed_generators
from genseg.runs import resolve_config
from genseg.training.diffusion import DiffusionTrainConfig, train_diffusion
from genseg.workflows.sampling import forward_process_figure, sample_to_file
from diffusion_helpers import quiet, tiny_config as shared_tiny_config, train_killed_then_resumed
from seg_helpers import one_torch_thread, write_phantoms  # noqa: F401  (one_torch_thread: autouse fixture)

REPO = Path(__file__).resolve().parents[1]
def tiny_config(**overrides) -> DiffusionTrainConfig:
    """The shared tiny generator, trained longer and with sample grids (enough to see the loss fall)."""
    values = {"max_steps": 60, "lr": 2e-3, "lr_warmup_steps": 5, "checkpoint_every_steps": 30, "log_every_steps": 5,
              "sample_every_steps": 30, "sample_count": 4, "sample_steps": 4, **overrides}
    return shared_tiny_config(values.pop("model", None), **values)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_phantoms(tmp_path_factory.mktemp("data") / "phantoms.h5", n=8, size=16, patients=4)


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory) -> tuple[Path, dict]:
    """A tiny joint model trained 60 steps on 4 slices."""
    folder = tmp_path_factory.mktemp("overfit")
    four = write_phantoms(folder / "four.h5", n=4, size=16, patients=4)
    result = train_diffusion(tiny_config(), four, folder / "run", cpu=True)
    return result.run_dir, result.metrics


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory, data) -> Path:
    cfg = tiny_config(model={"num_classes": 4}, max_steps=4, sample_every_steps=0, checkpoint_every_steps=4)
    return train_diffusion(cfg, data, tmp_path_factory.mktemp("cond") / "run", cpu=True).run_dir


def test_tiny_model_overfits_four_slices(overfit_run):
    run, metrics = overfit_run
    losses = [float(r["loss"]) for r in _log(run) if r["loss"]]
    assert len(losses) == 12 and metrics["steps"] == 60
    assert np.mean(losses[-3:]) < 0.5 * losses[0], losses  # the loss falls by a clear factor
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000030", "step-00000060"]
    assert (run / "samples" / "step-00000060.png").is_file()
    assert (run / "config.yaml").is_file() and json.loads((run / "run.json").read_text())["slices"] == 4
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # no temporaries left behind


def test_run_is_a_plain_diffusers_folder(overfit_run):
    run, _ = overfit_run
    unet = UNet2DModel.from_pretrained(run, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(run, subfolder="scheduler")
    assert (run / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(run.rglob("*.bin")) or all("checkpoints" in p.parts for p in run.rglob("*.bin"))
    assert unet.config.in_channels == 2 and scheduler.config.prediction_type == "epsilon"
    pipe = load_diffusion(run)
    assert isinstance(pipe, SliceDiffusionPipeline)
    for a, b in zip(unet.parameters(), pipe.unet.parameters()):
        assert torch.equal(a, b)


def test_saved_weights_are_the_ema_weights(overfit_run):
    """unet/ holds the EMA of the training weights, which differ from the raw weights in the checkpoint."""
    from safetensors.torch import load_file

    run, _ = overfit_run
    raw = load_file(run / "checkpoints" / "step-00000060" / "model.safetensors")
    ema = load_file(run / "checkpoints" / "step-00000060" / "ema.safetensors")
    saved = UNet2DModel.from_pretrained(run, subfolder="unet")
    names = [n for n, _ in saved.named_parameters()]
    first = names[0]
    assert torch.equal(saved.get_parameter(first), ema["shadow_params.0"])
    assert not torch.equal(saved.get_parameter(first), raw[first])


def test_same_seed_same_samples_whatever_the_batch_size(overfit_run, tmp_path):
    run, _ = overfit_run
    a = sample_to_file(run, 5, tmp_path / "a.h5", SamplingSettings(steps=6, seed=3, batch_size=5), progress=False)
    b = sample_to_file(run, 5, tmp_path / "b.h5", SamplingSettings(steps=6, seed=3, batch_size=2), progress=False)
    c = sample_to_file(run, 5, tmp_path / "c.h5", SamplingSettings(steps=6, seed=4), progress=False)
    with h5py.File(a) as fa, h5py.File(b) as fb, h5py.File(c) as fc:
        np.testing.assert_allclose(fa["images"][:].astype(np.float32), fb["images"][:].astype(np.float32), atol=1e-3)
        assert np.array_equal(fa["masks"][:], fb["masks"][:])
        assert not np.allclose(fa["images"][:], fc["images"][:])
    pipe = quiet(load_diffusion(run))
    first = pipe(2, num_inference_steps=4, generator=seed_generators(7, 2))
    again = pipe(2, num_inference_steps=4, generator=seed_generators(7, 2))
    assert np.array_equal(first.images, again.images) and np.array_equal(first.masks, again.masks)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_samples_binary_masks(overfit_run, tmp_path, name):
    run, _ = overfit_run
    out = sample_to_file(run, 3, tmp_path / f"{name}.h5", SamplingSettings(scheduler=name, steps=5), progress=False)
    meta = read_metadata(out)
    attrs = meta["attrs"]
    assert attrs["synthetic"] and attrs["size"] == 16 and attrs["channels"] == 1
    assert attrs["metadata"]["scheduler"] == name and attrs["metadata"]["steps"] == 5
    assert attrs["metadata"]["mask_source"] == "generated"
    with h5py.File(out) as h5:
        images, masks = h5["images"][:].astype(np.float32), h5["masks"][:]
    assert images.shape == (3, 1, 16, 16) and np.isfinite(images).all()
    assert images.min() >= 0 and images.max() <= 1
    assert set(np.unique(masks)) <= {0, 1}
    assert all((lab == 0) == (not m.any()) for lab, m in zip(meta["labels"], masks))  # empty mask = class 0
    assert type(load_diffusion(run).scheduler) is DDPMScheduler  # the saved scheduler stays the training one
    assert type(make_sampling_scheduler(name, load_diffusion(run).scheduler.config)) is SCHEDULERS[name]


def test_dpmsolver_is_dpmsolver_plus_plus():
    sched = make_sampling_scheduler("dpmsolver", DDPMScheduler(prediction_type="v_prediction").config)
    assert sched.config.algorithm_type == "dpmsolver++" and sched.config.prediction_type == "v_prediction"


def test_synthetic_file_reads_like_prepared_data(overfit_run, tmp_path):
    run, _ = overfit_run
    out = sample_to_file(run, 4, tmp_path / "s.h5", SamplingSettings(steps=3, seed=1), png_dir=tmp_path / "png",
                         save_intermediates=True, progress=False)
    info = dataset_info(out)
    assert info["synthetic"] and info["slices"] == 4 and info["patients"] == 4 and info["size"] == 16
    item = PreparedDataset(out)[0]
    assert item["image"].shape == (1, 16, 16) and item["mask"].shape == (1, 16, 16)
    meta = read_metadata(out)["attrs"]["metadata"]
    assert meta["model"] == str(run.resolve()) and meta["seed"] == 1 and meta["class"] is None
    assert sorted(p.name for p in (tmp_path / "png").iterdir())[:3] == ["grid.png", "synth-00000.png",
                                                                        "synth-00000_mask.png"]
    assert set(np.unique(np.asarray(Image.open(tmp_path / "png" / "synth-00000_mask.png")))) <= {0, 255}
    strip = Image.open(tmp_path / "s_reverse.png")
    assert strip.width >= 4 * 16 and strip.height >= 4 * 16  # 4 samples x (3 x_t + the result)


def test_class_conditional_samples_carry_the_class(conditional_run, tmp_path):
    pipe = quiet(load_diffusion(conditional_run))
    assert pipe.unet.config.num_class_embeds == 5  # classes 0..3 + the null class
    out = sample_to_file(conditional_run, 3, tmp_path / "c2.h5", SamplingSettings(class_label=2, guidance=3.0, steps=3),
                         progress=False)
    meta = read_metadata(out)
    assert meta["labels"].tolist() == [2, 2, 2]
    assert meta["attrs"]["metadata"]["class"] == 2 and meta["attrs"]["metadata"]["guidance"] == 3.0
    guided = pipe(2, class_labels=[1, 3], guidance_scale=3.0, num_inference_steps=3, generator=seed_generators(0, 2))
    plain = pipe(2, class_labels=[1, 3], num_inference_steps=3, generator=seed_generators(0, 2))
    assert guided.labels.tolist() == [1, 3] and not np.array_equal(guided.images, plain.images)
    free = pipe(2, num_inference_steps=3, generator=seed_generators(0, 2))  # no class: the null class
    assert free.labels is None and not np.array_equal(free.images, plain.images)


def test_image_mode_has_no_masks(data, tmp_path):
    cfg = tiny_config(model={"mode": "image"}, max_steps=2, sample_every_steps=2, checkpoint_every_steps=2)
    run = train_diffusion(cfg, data, tmp_path / "run", cpu=True).run_dir
    assert UNet2DModel.from_pretrained(run, subfolder="unet").config.in_channels == 1
    result = quiet(load_diffusion(run))(2, num_inference_steps=2, generator=seed_generators(0, 2))
    assert result.masks is None and result.images.shape == (2, 16, 16)
    out = sample_to_file(run, 2, tmp_path / "img.h5", SamplingSettings(steps=2), progress=False)
    meta = read_metadata(out)
    assert meta["attrs"]["metadata"]["mask_source"] == "none" and meta["labels"].tolist() == [-1, -1]


def test_bad_inputs(overfit_run, conditional_run, data, tmp_path):
    run, _ = overfit_run
    seg_like = tmp_path / "segrun"
    (seg_like / "model").mkdir(parents=True)
    (seg_like / "config.yaml").write_text("size: 16\n")
    with pytest.raises(CheckpointError, match="not a diffusion run"):
        load_diffusion(seg_like)
    with pytest.raises(CheckpointError, match="not found"):
        sample_to_file(tmp_path / "nothing", 1, tmp_path / "x.h5")
    with pytest.raises(ConfigError, match="unknown scheduler 'euler'.*ddim"):
        sample_to_file(run, 1, tmp_path / "x.h5", SamplingSettings(scheduler="euler"))
    with pytest.raises(ConfigError, match="steps must be at least 1"):
        sample_to_file(run, 1, tmp_path / "x.h5", SamplingSettings(steps=0))
    with pytest.raises(ConfigError, match="unconditional"):
        sample_to_file(run, 1, tmp_path / "x.h5", SamplingSettings(class_label=1), progress=False)
    with pytest.raises(ConfigError, match=r"class \[4\] outside the trained range 0..3"):
        sample_to_file(conditional_run, 1, tmp_path / "x.h5", SamplingSettings(class_label=4), progress=False)
    with pytest.raises(ConfigError, match=r"class \[-1\]"):
        quiet(load_diffusion(conditional_run))(1, class_labels=-1, num_inference_steps=2)
    with pytest.raises(ConfigError, match="guidance.*needs a class"):
        quiet(load_diffusion(conditional_run))(1, guidance_scale=3.0, num_inference_steps=2)
    with pytest.raises(ConfigError, match="steps 1001 exceed the 1000 training timesteps"):
        quiet(load_diffusion(run))(1, num_inference_steps=1001)
    assert not (tmp_path / "x.h5").exists()
    with pytest.raises(ConfigError, match="sample_size 32.*--size 32"):
        train_diffusion(tiny_config(model={"sample_size": 32}), data, tmp_path / "r", cpu=True)
    with pytest.raises(ConfigError, match="norm_num_groups 32 must divide"):
        DiffusionModelConfig(sample_size=16, block_out_channels=(16, 32))
    with pytest.raises(ConfigError, match="attention_resolutions"):
        DiffusionModelConfig(sample_size=16, block_out_channels=(32, 64), attention_resolutions=(4,))


def test_forward_process_figure(data, tmp_path):
    out = forward_process_figure(data, 2, tmp_path / "fwd.png")
    fig = np.asarray(Image.open(out).convert("L"), dtype=np.float32)
    assert fig.shape[1] >= 8 * 16  # x_0 and seven noise levels
    with pytest.raises(DataError, match="--index 99 is out of range 0..7"):
        forward_process_figure(data, 99, tmp_path / "f.png")


def test_cli_commands(genseg_cli, overfit_run, data, tmp_path):
    """One real `genseg sample` process as a user runs it; the other commands in-process via click's runner."""
    from click.testing import CliRunner

    from genseg.cli import main

    run, _ = overfit_run
    done = genseg_cli("sample", "--checkpoint", run, "--num", 2, "--out", tmp_path / "cli.h5", "--steps", 3,
                      "--scheduler", "ddim", "--save-intermediates", "--png-dir", tmp_path / "png")
    assert "wrote 2 synthetic slices" in done.stdout and (tmp_path / "cli_reverse.png").is_file()
    assert read_metadata(tmp_path / "cli.h5")["attrs"]["metadata"]["scheduler"] == "ddim"
    runner = CliRunner()
    info = runner.invoke(main, ["data", "info", str(tmp_path / "cli.h5"), "--json"])
    assert info.exit_code == 0 and json.loads(info.output)["synthetic"] is True
    fwd = runner.invoke(main, ["forward-process", "--data", str(data), "--out", str(tmp_path / "f.png"),
                               "--checkpoint", str(run)])
    assert fwd.exit_code == 0 and (tmp_path / "f.png").is_file()
    for args, message in [(["--checkpoint", str(data.parent)], "not a diffusion run"),
                          (["--checkpoint", str(run), "--scheduler", "euler"], "unknown scheduler 'euler'"),
                          (["--checkpoint", str(run), "--steps", "0"], "--steps must be at least 1"),
                          (["--checkpoint", str(run), "--class", "1"], "unconditional")]:
        err = runner.invoke(main, ["sample", "--num", "1", "--out", str(tmp_path / "e.h5"), *args])
        assert err.exit_code == 2 and message in err.output, err.output
    assert not (tmp_path / "e.h5").exists()


def test_kill_and_resume_continues_the_step_count(data, tmp_path):
    from genseg.config import save_config

    config = tmp_path / "tiny.yaml"
    save_config(tiny_config(checkpoint_every_steps=5, sample_every_steps=0, max_steps=1000), config)
    run = tmp_path / "run"
    args = [sys.executable, "-m", "genseg", "train-diffusion", "--data", str(data), "--config", str(config),
            "--out", str(run), "--cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(list((run / "checkpoints").glob("step-*"))) < 2:
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = max(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))
    assert 10 <= killed_at < 1000
    target = killed_at + 10
    done = subprocess.run(args + ["--resume", "--max-steps", str(target)], env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr
    state = json.loads((run / "checkpoints" / f"step-{target:08d}" / "trainer_state.json").read_text())
    assert state["step"] == target
    steps = [int(r["step"]) for r in _log(run) if r["loss"]]
    assert steps == list(range(5, target + 1, 5))  # no restart from 0, no duplicates after the kill
    assert (run / "model_index.json").is_file()
    changed = resolve_config(DiffusionTrainConfig, config, {"lr": 0.1}, run, resume=True)
    with pytest.raises(ConfigError, match=r"cannot resume with changed settings \['lr'\]"):
        train_diffusion(changed, data, run, resume=True, cpu=True)
    with pytest.raises(ConfigError, match="already holds a training run; pass --resume"):
        train_diffusion(changed, data, run, cpu=True)


def _log(run: Path) -> list[dict]:
    import csv

    with (run / "log.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("checkpoint_every", [4, 3], ids=["epoch-boundary", "mid-epoch"])
def test_resume_is_exact(data, tmp_path, monkeypatch, checkpoint_every):
    """8 slices in batches of 4: 2 steps per epoch, so the step-4 checkpoint ends an epoch and step 3 is mid-epoch.
    A run killed after its first log row past that checkpoint and resumed ends with the same weights, EMA and
    log (bar the timings) as an uninterrupted one."""
    from safetensors.torch import load_file

    cfg = tiny_config(max_steps=8, checkpoint_every_steps=checkpoint_every, log_every_steps=1, sample_every_steps=0,
                      lr_warmup_steps=2, model={"num_classes": 4})
    whole = train_diffusion(cfg, data, tmp_path / "whole", cpu=True).run_dir
    cut = train_killed_then_resumed(cfg, data, tmp_path / "cut", monkeypatch, after_step=checkpoint_every)

    final = Path("checkpoints") / "step-00000008"
    unet = Path("unet", "diffusion_pytorch_model.safetensors")  # the EMA weights users load
    for name in (final / "model.safetensors", final / "ema.safetensors", unet):
        a, b = load_file(whole / name), load_file(cut / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert (whole / final / "ema.json").read_text() == (cut / final / "ema.json").read_text()  # warm-up counters
    rows = [{k: v for k, v in r.items() if k != "seconds"} for r in _log(whole)]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in _log(cut)] == rows
    epoch_rows = [r for r in rows if r["train_loss"]]
    assert [int(r["epoch"]) for r in epoch_rows] == [1, 2, 3, 4] and all(float(r["train_loss"]) > 0 for r in epoch_rows)

    (cut / final / "rng.safetensors").unlink()  # what a checkpoint of a genseg before the saved generator lacks
    with pytest.raises(CheckpointError, match="incomplete training checkpoint, rng.safetensors missing"):
        train_diffusion(dataclasses.replace(cfg, max_steps=10), data, cut, resume=True, cpu=True)


def test_real_fraction_learns_from_the_patients_train_seg_keeps(tmp_path):
    """A generator matched to a segmenter: with the same --real-fraction and --seed both keep the same patients
    (and a different seed keeps others)."""
    from genseg.runs import SegTrainConfig
    from genseg.training.seg import build_seg_data

    data = write_phantoms(tmp_path / "p.h5", n=40, size=16, patients=10)
    quick = {"split": "train", "max_steps": 1, "checkpoint_every_steps": 1, "sample_every_steps": 0}
    kept = {}
    for seed in (3, 4):
        run = train_diffusion(tiny_config(real_fraction=0.5, seed=seed, **quick), data, tmp_path / f"r{seed}",
                              cpu=True).run_dir
        kept[seed] = json.loads((run / "run.json").read_text())
        seg = build_seg_data(SegTrainConfig(size=16, depth=2, real_fraction=0.5, seed=seed), data).info
        assert kept[seed]["kept_patients"] == seg["kept_patients"]
        assert kept[seed]["slices"] == seg["real_train_slices"]
    train_patients = set(PreparedDataset(data, split="train").patients.astype(str).tolist())
    assert len(kept[3]["kept_patients"]) == kept[3]["patients"] == round(0.5 * len(train_patients))
    assert kept[3]["kept_patients"] != kept[4]["kept_patients"]
    assert set(kept[3]["kept_patients"]) < train_patients
    with pytest.raises(ConfigError, match="real_fraction must be in"):
        tiny_config(real_fraction=0.0)
