"""Mask-conditioned diffusion (issue 15, item 1): the UNet gets the noised image plus the clean mask as one more
input channel and denoises the image only, so a sample's mask is the given one, exact by construction.

Training and loading the mode, the pipeline's `masks=`, `genseg sample --masks-from` (drawing, augmenting, K
images per mask, the written file), mask faithfulness in `evaluate-synthetic`, and every bad input of the issue.
Tiny models (16 px, channels 16/32, a few steps) on phantom slices; the contracts do not depend on the weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from genseg.data.augment import MaskAugment
from genseg.data.prepared import read_metadata
from genseg.data.regions import head_mask
from genseg.errors import CheckpointError, ConfigError, DataError
from genseg.pipeline.diffusion import SamplingSettings, load_diffusion, model_channels, model_layout, seed_generators
from genseg.training.diffusion import train_diffusion
from genseg.workflows.sampling import draw_masks, sample_to_file
from diffusion_helpers import quiet, tiny_config, tiny_generator, with_label_map_mask
from seg_helpers import one_torch_thread, write_phantoms  # noqa: F401  (one_torch_thread: autouse fixture)

MASKCOND = {"mode": "mask-conditioned"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("maskcond")


@pytest.fixture(scope="module")
def data(folder) -> Path:
    """16 px phantoms, 12 slices of 6 patients over 5 folds (training split: 3 folds), a quarter tumour-free."""
    return write_phantoms(folder / "phantoms.h5", n=12, size=16, patients=6)


@pytest.fixture(scope="module")
def run(folder, data) -> Path:
    """A class-conditional mask-conditioned generator, 4 steps, with a sample grid on its given masks."""
    cfg = tiny_config({**MASKCOND, "num_classes": 4}, sample_every_steps=4, sample_count=4, sample_steps=2)
    return train_diffusion(cfg, data, folder / "run", cpu=True).run_dir


@pytest.fixture(scope="module")
def joint_run(folder, data) -> Path:
    return train_diffusion(tiny_config(), data, folder / "joint", cpu=True).run_dir


def _masks(n: int = 3, size: int = 16) -> np.ndarray:
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(1, n):  # mask 0 stays empty: a tumour-free slice
        masks[i, 3 + i:8 + i, 4:9 + i] = 1
    return masks


def test_channels_record_the_mode_and_load_with_plain_diffusers(run):
    unet = UNet2DModel.from_pretrained(run, subfolder="unet")
    assert DDPMScheduler.from_pretrained(run, subfolder="scheduler").config.num_train_timesteps == 1000
    assert (unet.config.in_channels, unet.config.out_channels) == (2, 1)  # image + mask in, image out
    assert model_layout(unet) == (1, "mask-conditioned") and model_channels(unet) == (1, False)
    assert model_layout(load_diffusion(run).unet) == (1, "mask-conditioned")
    assert (run / "samples" / "step-00000004.png").is_file()  # the grid sampled on the training masks
    assert "mode: mask-conditioned" in (run / "config.yaml").read_text()


def test_layouts_that_are_no_genseg_model_are_refused(tmp_path):
    small = {"sample_size": 8, "block_out_channels": (8,), "down_block_types": ("DownBlock2D",),
             "up_block_types": ("UpBlock2D",), "norm_num_groups": 4, "layers_per_block": 1}
    for cin, cout, mode in [(1, 1, "image"), (2, 2, "joint"), (4, 3, "mask-conditioned"), (3, 3, "image")]:
        assert model_layout(UNet2DModel(in_channels=cin, out_channels=cout, **small))[1] == mode
    for cin, cout in [(3, 1), (2, 3), (5, 4), (1, 2)]:
        with pytest.raises(CheckpointError, match=f"{cin} input and {cout} output channels is not a genseg"):
            model_layout(UNet2DModel(in_channels=cin, out_channels=cout, **small))
    UNet2DModel(in_channels=3, out_channels=1, **small).save_pretrained(tmp_path / "odd" / "unet")
    DDPMScheduler().save_pretrained(tmp_path / "odd" / "scheduler")
    (tmp_path / "odd" / "model_index.json").write_text(json.dumps({"scheduler": ["diffusers", "DDPMScheduler"]}))
    with pytest.raises(CheckpointError, match="odd: UNet with 3 input and 1 output"):
        load_diffusion(tmp_path / "odd")


def test_pipeline_returns_the_given_masks_and_images_depend_on_seed_and_index(run):
    pipe = quiet(load_diffusion(run))
    masks = _masks(3)
    a = pipe(3, masks=masks, num_inference_steps=3, generator=seed_generators(5, 3))
    b = pipe(3, masks=torch.from_numpy(masks), num_inference_steps=3, generator=seed_generators(5, 3), batch_size=2)
    assert a.masks.dtype == np.uint8 and np.array_equal(a.masks, masks)  # unchanged, the empty one included
    assert a.images.shape == (3, 16, 16) and 0 <= a.images.min() and a.images.max() <= 1
    np.testing.assert_allclose(a.images, b.images, atol=1e-4)  # same seed: same images, whatever the batch size
    alone = pipe(1, masks=masks[2:], num_inference_steps=3, generator=seed_generators(5, 3)[2:])
    np.testing.assert_allclose(alone.images[0], a.images[2], atol=1e-4)  # image 2 depends on (seed, 2) only
    other = pipe(3, masks=masks[::-1].copy(), num_inference_steps=3, generator=seed_generators(5, 3))
    assert not np.allclose(other.images[0], a.images[0])  # the mask conditions the image
    guided = pipe(3, masks=masks, class_labels=2, guidance_scale=3.0, num_inference_steps=3,
                  generator=seed_generators(5, 3))  # class conditioning and guidance still work
    assert guided.labels.tolist() == [2, 2, 2] and np.array_equal(guided.masks, masks)
    assert not np.allclose(guided.images, a.images)
    images, given, *_ = pipe(3, masks=masks, num_inference_steps=2, output_type="pt", return_dict=False)
    assert isinstance(images, torch.Tensor) and torch.equal(given, torch.from_numpy(masks))


def test_masks_required_by_the_mode_and_refused_by_the_others(run, joint_run):
    pipe = quiet(load_diffusion(run))
    with pytest.raises(ConfigError, match="a mask-conditioned model needs masks"):
        pipe(2, num_inference_steps=2)
    with pytest.raises(ConfigError, match="masks were given to a joint model"):
        quiet(load_diffusion(joint_run))(3, masks=_masks(3), num_inference_steps=2)
    with pytest.raises(ConfigError, match=r"expected 3 masks of 16x16 \(the model's size\), got .*\(3, 32, 32\)"):
        pipe(3, masks=_masks(3, 32), num_inference_steps=2)
    with pytest.raises(ConfigError, match=r"expected 2 masks"):
        pipe(2, masks=_masks(3), num_inference_steps=2)
    with pytest.raises(ConfigError, match=r"0 and 1 only, found value\(s\) \[255\]"):
        pipe(3, masks=_masks(3) * 255, num_inference_steps=2)


def test_modes_do_not_mix_in_one_run_folder(run, joint_run, data, folder):
    """A joint generator cannot be continued as a mask-conditioned one (nor resumed with the other mode), and a
    mask-conditioned folder cannot be resumed as joint: clear errors, nothing written."""
    cfg = tiny_config(MASKCOND, init_from=str(joint_run))
    with pytest.raises(ConfigError, match="holds a joint .* generator.*this run trains a mask-conditioned"):
        train_diffusion(cfg, data, folder / "mixed", cpu=True)
    assert not (folder / "mixed").exists()
    joint_again = tiny_config({"num_classes": 4}, sample_every_steps=4, sample_count=4, sample_steps=2, max_steps=6)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match="holds a mask-conditioned generator; cannot resume it as joint"):
        train_diffusion(joint_again, data, run, resume=True, cpu=True)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    with pytest.raises(ConfigError, match="already holds a training run"):
        train_diffusion(tiny_config(MASKCOND), data, joint_run, cpu=True)


def test_shipped_config_trains_with_real_fraction_and_seed(tmp_path):
    """configs/diffusion-maskcond-cpu-small.yaml is diffusion-cpu-small.yaml in this mode, and `train-diffusion
    --config diffusion-maskcond-cpu-small --real-fraction F --seed S` learns from the patients `train-seg
    --real-fraction F --seed S` keeps (one optimizer step at the config's 64 px)."""
    import dataclasses

    from click.testing import CliRunner

    from genseg.cli import main
    from genseg.runs import SegTrainConfig, resolve_config
    from genseg.training.diffusion import DiffusionTrainConfig
    from genseg.training.seg import build_seg_data

    shipped = resolve_config(DiffusionTrainConfig, "diffusion-maskcond-cpu-small", {}, None, False)
    joint = resolve_config(DiffusionTrainConfig, "diffusion-cpu-small", {}, None, False)
    assert shipped.model.mode == "mask-conditioned"
    assert dataclasses.replace(shipped, model=dataclasses.replace(shipped.model, mode="joint")) == joint
    data = write_phantoms(tmp_path / "p64.h5", n=20, size=64, patients=10)
    done = CliRunner().invoke(main, ["train-diffusion", "--data", str(data), "--config", "diffusion-maskcond-cpu-small",
                                     "--real-fraction", "0.5", "--seed", "3", "--max-steps", "1", "--batch-size", "4",
                                     "--out", str(tmp_path / "run"), "--cpu"])
    assert done.exit_code == 0, done.output
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    seg = build_seg_data(SegTrainConfig(size=64, depth=2, real_fraction=0.5, seed=3), data).info
    assert info["kept_patients"] == seg["kept_patients"] and info["slices"] == seg["real_train_slices"]
    assert len(info["kept_patients"]) == 3  # half of the 6 training patients
    assert model_layout(load_diffusion(tmp_path / "run").unet) == (1, "mask-conditioned")


ALL_AUGMENTS = ("flip", "shift", "rotate", "scale", "elastic")
FAST = SamplingSettings(steps=2, seed=1)


def _file(path: Path) -> dict:
    with h5py.File(path, "r") as h5:
        return {"images": h5["images"][:], "masks": h5["masks"][:], "labels": h5["labels"][:]}


def test_sample_masks_from_writes_k_images_per_exact_given_mask(run, data, tmp_path):
    out = sample_to_file(run, 4, tmp_path / "aug.h5", FAST, masks_from=data, mask_augment=ALL_AUGMENTS, per_mask=2,
                         progress=False)
    meta, written = read_metadata(out), _file(out)
    info = meta["attrs"]["metadata"]
    assert meta["num_slices"] == 8 and meta["attrs"]["synthetic"]
    assert (info["mode"], info["mask_source"], info["per_mask"]) == ("mask-conditioned", "given", 2)
    assert info["masks_from"] == str(data.resolve()) and info["mask_augment"] == list(ALL_AUGMENTS)
    train_rows = set(np.flatnonzero(read_metadata(data)["split"] == "train").tolist())
    assert len(info["mask_rows"]) == 4 and set(info["mask_rows"]) <= train_rows
    expected, _ = draw_masks(data, 16, 4, seed=1, augment=ALL_AUGMENTS)  # what the model was given, re-drawn
    assert np.array_equal(written["masks"], np.repeat(expected, 2, axis=0))  # bit for bit, K copies per mask
    assert set(np.unique(written["masks"]).tolist()) <= {0, 1}
    with h5py.File(data, "r") as h5:
        originals = h5["masks"][:][info["mask_rows"]]
    assert not np.array_equal(expected, originals)  # the transforms moved some
    plain = sample_to_file(run, 4, tmp_path / "plain.h5", FAST, masks_from=data, progress=False)
    with h5py.File(data, "r") as h5:  # without --mask-augment the masks are the file's, unchanged
        rows = read_metadata(plain)["attrs"]["metadata"]["mask_rows"]
        assert rows == info["mask_rows"] and np.array_equal(_file(plain)["masks"], h5["masks"][:][rows])
    again = sample_to_file(run, 4, tmp_path / "again.h5", FAST, masks_from=data, mask_augment=ALL_AUGMENTS,
                           per_mask=2, progress=False)
    assert np.array_equal(_file(again)["images"], written["images"])  # same seed, same slices
    other = sample_to_file(run, 4, tmp_path / "other.h5", SamplingSettings(steps=2, seed=2), masks_from=data,
                           mask_augment=ALL_AUGMENTS, per_mask=2, progress=False)
    assert not np.array_equal(_file(other)["images"], written["images"])
    assert not np.array_equal(written["images"][0], written["images"][1])  # K images of one mask differ


def test_every_training_mask_by_default_and_empty_masks_give_tumour_free_slices(run, data, tmp_path):
    out = sample_to_file(run, None, tmp_path / "all.h5", FAST, masks_from=data, progress=False)
    meta, written = read_metadata(out), _file(out)
    train = np.flatnonzero(read_metadata(data)["split"] == "train")
    assert meta["attrs"]["metadata"]["mask_rows"] == train.tolist() and meta["num_slices"] == len(train)
    empty = ~written["masks"].reshape(len(train), -1).any(1)
    assert empty.any() and meta["attrs"]["metadata"]["empty_masks"] == int(empty.sum())  # accepted as conditions
    assert (written["labels"][empty] == 0).all() and (written["labels"][~empty] == -1).all()
    with h5py.File(data, "r") as h5:
        assert np.array_equal(written["masks"], h5["masks"][:][train])


def test_a_joint_models_sample_is_a_mask_source(run, joint_run, tmp_path):
    joint = sample_to_file(joint_run, 8, tmp_path / "joint.h5", FAST, progress=False)
    out = sample_to_file(run, 3, tmp_path / "given.h5", FAST, masks_from=joint, per_mask=2, progress=False)
    info = read_metadata(out)["attrs"]["metadata"]
    with h5py.File(joint, "r") as h5:
        assert np.array_equal(_file(out)["masks"], np.repeat(h5["masks"][:][info["mask_rows"]], 2, axis=0))
    assert info["masks_from"] == str(joint.resolve()) and info["mask_source"] == "given"


def test_bad_mask_files_are_refused_before_sampling(run, joint_run, data, tmp_path):
    out = tmp_path / "x.h5"
    big = write_phantoms(tmp_path / "big.h5", n=6, size=32, patients=3)
    with pytest.raises(DataError, match=r"big.h5.*masks are 32x32 but the model generates 16x16.*--size 16"):
        sample_to_file(run, 2, out, FAST, masks_from=big, progress=False)
    labelled, row = with_label_map_mask(data, tmp_path / "labelmap.h5")
    with pytest.raises(DataError, match=rf"labelmap.h5.*mask of row {row} holds value 255.*0 and 1 only"):
        sample_to_file(run, None, out, FAST, masks_from=labelled, progress=False)
    image_only = write_phantoms(tmp_path / "imageonly.h5", n=6, size=16, patients=3, synthetic=True,
                                metadata={"mode": "image", "mask_source": "none"})
    with pytest.raises(DataError, match="imageonly.h5.*holds no masks"):
        sample_to_file(run, 2, out, FAST, masks_from=image_only, progress=False)
    maskless = tmp_path / "maskless.h5"
    shutil.copy(data, maskless)
    with h5py.File(maskless, "a") as h5:
        del h5["masks"]
    with pytest.raises(DataError, match="maskless.h5.*lacks dataset.*masks"):
        sample_to_file(run, 2, out, FAST, masks_from=maskless, progress=False)
    with pytest.raises(ConfigError, match="holds a mask-conditioned model.*--masks-from"):
        sample_to_file(run, 2, out, FAST, progress=False)
    with pytest.raises(ConfigError, match="need a mask-conditioned model.*holds a joint model"):
        sample_to_file(joint_run, 2, out, FAST, masks_from=data, progress=False)
    with pytest.raises(ConfigError, match="--num is required"):
        sample_to_file(joint_run, None, out, FAST, progress=False)
    with pytest.raises(ConfigError, match="--per-mask must be at least 1"):
        sample_to_file(run, 2, out, FAST, masks_from=data, per_mask=0, progress=False)
    with pytest.raises(ConfigError, match="unknown mask augmentation.*twist"):
        sample_to_file(run, 2, out, FAST, masks_from=data, mask_augment=("twist",), progress=False)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_sample_and_pipeline(run, data, tmp_path):
    from click.testing import CliRunner

    from genseg.cli import main
    from genseg.serve.testing import make_untrained_segmenter

    runner = CliRunner()
    done = runner.invoke(main, ["sample", "--checkpoint", str(run), "--masks-from", str(data), "--num", "2",
                                "--per-mask", "3", "--mask-augment", "flip,rotate", "--steps", "2",
                                "--out", str(tmp_path / "cli.h5"), "--png-dir", str(tmp_path / "png")])
    assert done.exit_code == 0, done.output
    assert "wrote 6 synthetic slices (2 given masks x 3)" in done.output and (tmp_path / "png" / "grid.png").is_file()
    assert read_metadata(tmp_path / "cli.h5")["attrs"]["metadata"]["mask_augment"] == ["flip", "rotate"]
    for args, message in [(["--num", "2"], "--masks-from"),
                          (["--num", "2", "--mask-augment", "flip"], "give --masks-from too"),
                          (["--masks-from", str(data), "--mask-augment", "flip,twist"], "unknown twist")]:
        err = runner.invoke(main, ["sample", "--checkpoint", str(run), "--out", str(tmp_path / "e.h5"), *args])
        assert err.exit_code == 2 and message in err.output, err.output
    segmenter = make_untrained_segmenter(tmp_path / "seg", size=16, base_channels=8, depth=2)
    err = runner.invoke(main, ["pipeline", "--diffusion", str(run), "--segmenter", str(segmenter), "--num", "2",
                               "--out", str(tmp_path / "pipe-out"), "--save-pipeline", str(tmp_path / "saved")])
    assert err.exit_code == 2 and "mask-conditioned model: it generates images for given masks; pass --masks-from" \
        in err.output, err.output  # before --save-pipeline wrote anything (tests/test_maskcond_pipeline.py: with them)
    assert not [p.name for p in tmp_path.iterdir() if p.name in ("e.h5", "pipe-out", "saved") or p.name[0] == "."]


def test_mask_faithfulness_is_reported_for_given_masks(run, data, tmp_path):
    from genseg.evaluation.synthetic_quality import evaluate_synthetic, markdown_table
    from genseg.serve.testing import make_untrained_segmenter

    synth = sample_to_file(run, 4, tmp_path / "given.h5", FAST, masks_from=data, progress=False)
    segmenter = make_untrained_segmenter(tmp_path / "seg", size=16, base_channels=8, depth=2)
    result = evaluate_synthetic(synth, data, segmenter=segmenter, kid_subsets=5, progress=False)
    assert result["mask_source"] == "given" and result["masks_generated"]
    assert result["mask_faithfulness_dice_mean"] == result["agreement_dice_mean"] is not None
    assert "mask faithfulness: segmenter Dice on the generated image vs the given mask" in markdown_table(result)


def test_step_timing_of_the_demo_plan_handles_the_mode():
    from genseg.workflows.demo import measure_diffusion_step

    assert measure_diffusion_step(tiny_config(MASKCOND)) > 0  # image channels denoised, the mask as input


def test_moved_masks_stay_on_the_head_of_their_own_slice(tmp_path):
    """--mask-augment may move a tumour, but not off the head into the air beside it: a draw that puts more of it
    outside the head than the given mask had is redrawn. Shown where it matters, a tumour on the head's edge."""
    size = 64
    yy, xx = np.mgrid[:size, :size]
    head = (yy - 32) ** 2 + (xx - 24) ** 2 <= 18**2  # a head on the left, air on the right
    tumour = ((yy - 32) ** 2 + (xx - 37) ** 2 <= 3**2).astype(np.uint8)  # inside it, at its right edge
    assert head[tumour > 0].all()
    free, kept = MaskAugment(("shift", "scale", "rotate"), seed=3), MaskAugment(("shift", "scale", "rotate"), seed=3)
    left_the_head = sum(not head[free(tumour, i).numpy() > 0].all() for i in range(40))
    assert left_the_head >= 5, "without the head the shifts push the tumour off it (else this test shows nothing)"
    moved = [kept(tumour, i, head).numpy() for i in range(40)]
    assert all(head[m > 0].all() for m in moved)
    assert sum(not np.array_equal(m, tumour) for m in moved) >= 30, "the masks still move"


def test_drawn_masks_keep_their_share_of_their_own_head(tmp_path):
    data = write_phantoms(tmp_path / "p64.h5", n=16, size=64, patients=4)
    masks, info = draw_masks(data, 64, 48, seed=2, augment=("shift", "scale", "rotate", "elastic"))
    assert "head of their own slice" in info["masks_kept_on"]
    rows = np.array(info["mask_rows"])
    with h5py.File(data) as h5:
        images, given = h5["images"][:], h5["masks"][:]
    for mask, row in zip(masks, rows):
        if mask.any():
            head = head_mask(images[row])
            assert head[mask > 0].mean() >= head[given[row] > 0].mean()
