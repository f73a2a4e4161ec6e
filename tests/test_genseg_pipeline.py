"""GenSegPipeline and `genseg pipeline`: one diffusers folder restored in a fresh process, the promised output
files with consistent counts, real-file segmentation through the same object, and the bad inputs of issue 6.

Tiny parts (a 16 px generator trained a few steps, untrained small segmenters) keep it to seconds: the
pipeline's contract does not depend on what the weights learned."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genseg.errors import CheckpointError, ConfigError, GensegError
from genseg.evaluation.metrics import dice_iou
from genseg.pipeline.diffusion import SamplingSettings, seed_generators
from genseg.pipeline.genseg_pipeline import GenSegPipeline
from genseg.serve.testing import make_untrained_segmenter
from genseg.workflows.pipeline_run import load_pipeline, run_pipeline
from diffusion_helpers import quiet, tiny_generator
from seg_helpers import one_torch_thread  # noqa: F401  (autouse fixture)

REPO = Path(__file__).resolve().parents[1]
SIZE = 16


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("parts")
    return tiny_generator(folder), make_untrained_segmenter(folder / "seg", size=SIZE, base_channels=8, depth=3)


@pytest.fixture(scope="module")
def saved(parts, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "pipe"
    GenSegPipeline.from_runs(*parts).save_pretrained(folder)
    return folder


def test_round_trip_in_a_fresh_process(parts, saved, tmp_path):
    """save_pretrained -> from_pretrained in another interpreter gives the same slices, masks and probabilities
    for the same seed, and every part loads with plain diffusers."""
    expected = quiet(GenSegPipeline.from_runs(*parts))(3, num_inference_steps=4, generator=seed_generators(7, 3))
    script = f"""
import numpy as np
from diffusers import DDPMScheduler, UNet2DModel
from genseg.pipeline.diffusion import seed_generators
from genseg.pipeline.genseg_pipeline import GenSegPipeline
from genseg.models.unet import SegmentationUNet
pipe = GenSegPipeline.from_pretrained({str(saved)!r})
pipe.set_progress_bar_config(disable=True)
out = pipe(3, num_inference_steps=4, generator=seed_generators(7, 3))
UNet2DModel.from_pretrained({str(saved)!r}, subfolder="unet")
DDPMScheduler.from_pretrained({str(saved)!r}, subfolder="scheduler")
SegmentationUNet.from_pretrained({str(saved)!r}, subfolder="segmenter")
np.savez({str(tmp_path / "out.npz")!r}, images=out.images, generated=out.generated_masks,
         predicted=out.predicted_masks, probabilities=out.probabilities, threshold=pipe.config.threshold)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    got = np.load(tmp_path / "out.npz")
    assert np.array_equal(got["images"], expected.images)
    assert np.array_equal(got["generated"], expected.generated_masks)
    assert np.array_equal(got["predicted"], expected.predicted_masks)
    assert np.allclose(got["probabilities"], expected.probabilities, atol=1e-6)
    assert float(got["threshold"]) == 0.5
    assert sorted(p.name for p in saved.iterdir()) == ["model_index.json", "scheduler", "segmenter", "unet"]
    assert not list(saved.rglob("*.bin")) and len(list(saved.rglob("*.safetensors"))) == 2


def test_output_is_consistent(parts):
    out = quiet(GenSegPipeline.from_runs(*parts))(5, num_inference_steps=3, generator=seed_generators(0, 5))
    assert out.images.shape == out.predicted_masks.shape == out.probabilities.shape == (5, SIZE, SIZE)
    assert out.generated_masks.shape == (5, SIZE, SIZE) and set(np.unique(out.generated_masks)) <= {0, 1}
    assert np.array_equal(out.predicted_masks, (out.probabilities >= 0.5).astype(np.uint8))


def test_diffusers_call_conventions(parts, capsys):
    """output_type np / pt / pil hold the same pixels, return_dict=False gives the fields in order, an int seed is
    refused (seed_generators makes the generators), and the progress bar follows set_progress_bar_config."""
    pipe = GenSegPipeline.from_runs(*parts)
    capsys.readouterr()
    pipe(1, num_inference_steps=1, generator=seed_generators(0, 1))
    assert "sampling" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)

    def run(**options):
        return pipe(2, num_inference_steps=2, generator=seed_generators(1, 2), **options)

    arrays, tensors = run(), run(output_type="pt")
    assert torch.equal(tensors.images, torch.from_numpy(arrays.images))
    assert torch.equal(tensors.generated_masks, torch.from_numpy(arrays.generated_masks))
    assert torch.equal(tensors.probabilities, torch.from_numpy(arrays.probabilities))
    images, generated, predicted, probabilities, labels = run(output_type="pil", return_dict=False)
    assert np.array_equal(np.asarray(images[0]), np.round(arrays.images[0] * 255).astype(np.uint8))
    assert np.array_equal(np.asarray(generated[1]), arrays.generated_masks[1] * 255)
    assert np.array_equal(np.asarray(predicted[1]), arrays.predicted_masks[1] * 255)
    assert np.array_equal(probabilities, arrays.probabilities) and labels is None
    assert capsys.readouterr().err == ""
    with pytest.raises(TypeError, match="seed_generators"):
        pipe(1, num_inference_steps=2, generator=7)
    with pytest.raises(ConfigError, match="output_type"):
        pipe(1, num_inference_steps=2, output_type="latent")


def test_pipeline_command_writes_the_promised_files(genseg_cli, parts, tmp_path):
    diffusion, segmenter = parts
    out = tmp_path / "out"
    done = genseg_cli("pipeline", "--diffusion", diffusion, "--segmenter", segmenter, "--num", 5, "--steps", 3,
                      "--scheduler", "ddim", "--seed", 3, "--out", out, "--save-pipeline", tmp_path / "pipe")
    assert "5 slices" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_slices"] == 5 and len(summary["slices"]) == 5
    assert summary["settings"] == {**summary["settings"], "scheduler": "ddim", "steps": 3, "seed": 3}
    names = sorted(p.name for p in (out / "slices").iterdir())
    assert names == sorted([f"{i:04d}.png" for i in range(5)] + [f"{i:04d}_overlay.png" for i in range(5)])
    assert (out / "contact_sheet.png").is_file() and "contact_sheet.png" in (out / "report.md").read_text()
    # the summary's numbers are those of the written slices: recompute one from the saved pipeline
    again = quiet(GenSegPipeline.load(tmp_path / "pipe"))
    from genseg.models.diffusion import make_sampling_scheduler

    again.scheduler = make_sampling_scheduler("ddim", again.scheduler.config)
    result = again(5, num_inference_steps=3, generator=seed_generators(3, 5))
    dice, _ = dice_iou(result.predicted_masks, result.generated_masks)
    for row, d, mask in zip(summary["slices"], dice, result.predicted_masks):
        assert row["tumour_area_px"] == int(mask.sum())
        assert row["dice_generated_vs_predicted"] == pytest.approx(float(d))
    image = np.asarray(Image.open(out / "slices" / "0000.png"))
    assert image.shape[:2] == (SIZE, SIZE)


def test_an_existing_output_is_not_overwritten_without_force(genseg_cli, saved, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous result")
    done = genseg_cli("pipeline", "--pipeline", saved, "--num", 2, "--steps", 2, "--out", out, returncode=2)
    assert "already exists" in done.stderr and "--force" in done.stderr
    assert (out / "keep.txt").read_text() == "previous result"
    genseg_cli("pipeline", "--pipeline", saved, "--num", 2, "--steps", 2, "--out", out, "--force")
    assert not (out / "keep.txt").exists() and (out / "summary.json").is_file()


def test_input_mode_segments_real_files_like_segment(genseg_cli, saved, parts, tmp_path):
    rng = np.random.default_rng(0)
    png = tmp_path / "real.png"
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(png)
    genseg_cli("pipeline", "--pipeline", saved, "--input", png, "--out", tmp_path / "piped")
    genseg_cli("segment", png, "--checkpoint", parts[1], "--out", tmp_path / "segmented")
    for name in ("real_mask.png", "real_overlay.png"):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "piped" / name)),
                              np.asarray(Image.open(tmp_path / "segmented" / name)))
    again = genseg_cli("pipeline", "--pipeline", saved, "--input", png, "--out", tmp_path / "piped", returncode=2)
    assert "real_mask.png: already exists (and 1 more of the outputs); pass --force" in again.stderr  # as `segment`


def test_one_input_option_takes_several_files(saved, tmp_path):
    """`--input a.png b.png` as the README writes it, mixed with a repeated --input; files without --input are
    an error, not a silent generate run."""
    from click.testing import CliRunner

    from genseg.cli import main

    rng = np.random.default_rng(1)
    names = ("a", "b", "c")
    for name in names:
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    a, b, c = (tmp_path / f"{name}.png" for name in names)
    done = CliRunner().invoke(main, ["pipeline", "--pipeline", str(saved), "--input", str(a), str(b),
                                     "--out", str(tmp_path / "real"), "--input", str(c)])
    assert done.exit_code == 0, done.output
    assert "segmented 3 file(s)" in done.output
    assert all((tmp_path / "real" / f"{name}_mask.png").is_file() for name in names)
    done = CliRunner().invoke(main, ["pipeline", "--pipeline", str(saved), str(a), "--out", str(tmp_path / "x")])
    assert done.exit_code == 2 and "go after --input" in done.output and not (tmp_path / "x").exists()


def test_a_segmenter_of_another_size_is_fed_resized_images_and_says_so(parts, tmp_path):
    bigger = make_untrained_segmenter(tmp_path / "seg32", size=32, base_channels=8, depth=3)
    pipe = GenSegPipeline.from_runs(parts[0], bigger)
    assert "resized" in pipe.size_note
    summary = run_pipeline(pipe, tmp_path / "out", num=2, sampling=SamplingSettings(steps=2))
    assert summary["settings"]["size_note"] and "resized" in (tmp_path / "out" / "report.md").read_text()
    assert len(summary["slices"]) == 2


def test_bad_inputs(genseg_cli, parts, saved, tmp_path):
    diffusion, segmenter = parts
    colour = make_untrained_segmenter(tmp_path / "rgb", size=SIZE, base_channels=8, depth=3, channels=3)
    with pytest.raises(ConfigError, match="3-channel"):
        GenSegPipeline.from_runs(diffusion, colour)
    with pytest.raises(CheckpointError, match="not a diffusion run"):
        load_pipeline(diffusion=segmenter, segmenter=segmenter)
    with pytest.raises(ConfigError, match="go together"):
        load_pipeline(diffusion=diffusion)
    with pytest.raises(ConfigError, match="not both"):
        load_pipeline(saved, diffusion=diffusion)
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in saved.iterdir():
        if item.name != "segmenter":
            (broken / item.name).symlink_to(item)
    with pytest.raises(CheckpointError, match="missing segmenter/"):
        GenSegPipeline.load(broken)
    with pytest.raises(CheckpointError, match="no model_index.json"):
        GenSegPipeline.load(tmp_path)
    done = genseg_cli("pipeline", "--pipeline", saved, "--num", 0, "--out", tmp_path / "zero", returncode=2)
    assert "--num must be at least 1" in done.stderr and not (tmp_path / "zero").exists()
    with pytest.raises(GensegError, match="already exists"):
        run_pipeline(GenSegPipeline.load(saved), tmp_path, num=1, sampling=SamplingSettings(steps=1))


def test_the_generator_of_a_saved_pipeline_samples_like_its_run(parts, saved):
    """`genseg sample --checkpoint PIPELINE_DIR` works: the saved folder's generator is the run's, loaded without
    diffusers' warnings about the segmenter entry it does not need."""
    from genseg.pipeline.diffusion import load_diffusion

    import logging

    warned = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warned.append(record.getMessage())
    diffusers_logger = logging.getLogger("diffusers")  # it does not propagate to pytest's capture
    diffusers_logger.addHandler(handler)
    try:
        from_pipeline = quiet(load_diffusion(saved))(3, num_inference_steps=2, generator=seed_generators(5, 3))
    finally:
        diffusers_logger.removeHandler(handler)
    assert not [message for message in warned if "segmenter" in message]
    from_run = quiet(load_diffusion(parts[0]))(3, num_inference_steps=2, generator=seed_generators(5, 3))
    np.testing.assert_array_equal(from_pipeline.images, from_run.images)
    np.testing.assert_array_equal(from_pipeline.masks, from_run.masks)
