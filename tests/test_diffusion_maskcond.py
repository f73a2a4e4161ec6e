"""Mask-conditioned diffusion (issue 15, item 1): the UNet gets the noised image plus the clean mask as one more
input channel and denoises the image only, so a sample's mask is the given one, exact by construction.

Training and loading the mode, the pipeline's `masks=`, `genseg sample --masks-from` (drawing, augmenting, K
images per mask, the written file), mask faithfulness in `evaluate-synthetic`, and every bad input of the issue.
Tiny models (16 px, channels 16/32, a few steps) on phantom slices; the contracts do not depend on the weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from genseg.errors import CheckpointError, ConfigError
from genseg.pipeline.diffusion import load_diffusion, model_channels, model_layout, seed_generators
from genseg.training.diffusion import train_diffusion
from diffusion_helpers import quiet, tiny_config, tiny_generator
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


def test_real_fraction_and_seed_work_in_this_mode(tmp_path):
    data = write_phantoms(tmp_path / "p.h5", n=20, size=16, patients=10)
    cfg = tiny_config(MASKCOND, split="train", real_fraction=0.5, seed=3, max_steps=2, checkpoint_every_steps=2)
    info = json.loads((train_diffusion(cfg, data, tmp_path / "r", cpu=True).run_dir / "run.json").read_text())
    assert info["real_fraction"] == 0.5 and len(info["kept_patients"]) == info["patients"] == 3
