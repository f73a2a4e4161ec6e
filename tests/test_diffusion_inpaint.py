"""Lesion-inpainting diffusion (issue 15, item 2): the UNet repaints a region of a real slice given the slice with
the region blanked, the region and the lesion mask, trained on crops around lesions and on healthy regions.

The channel layout and how a saved folder is recognised, the training crops, exact resume, the pipeline's
`images=`/`regions=` (pixels outside the region are the real slice's, bit for bit), `genseg sample --inpaint-into`
(lesions placed inside the head only, `--erase`), the shipped config, and every bad input of the issue.
Tiny models (32 px slices, 16 px crops, channels 16/32, a few steps) on phantoms; the contracts do not depend on
what the weights learned."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

from genseg.data.prepared import PreparedWriter, check_synthetic, read_metadata
from genseg.data.regions import BRAIN_INSET, brain_mask, dilate, head_mask, place_lesion
from genseg.errors import CheckpointError, ConfigError, DataError
from genseg.models.diffusion import INPAINT_KEY, DiffusionModelConfig, build_unet
from genseg.pipeline.diffusion import (SamplingSettings, inpaint_settings, load_diffusion, model_layout,
                                       seed_generators)
from genseg.training.diffusion import inpaint_crops, to_model_space, train_diffusion
from genseg.workflows.sampling import sample_to_file
import seg_helpers
from diffusion_helpers import quiet, tiny_config, train_killed_then_resumed, with_label_map_mask
from seg_helpers import write_phantoms

one_torch_thread = seg_helpers.one_torch_thread  # the autouse fixture, in this module's namespace

SIZE, CROP, MARGIN = 32, 16, 2
INPAINT = {"mode": "inpaint", "sample_size": SIZE, "crop_size": CROP, "region_margin": MARGIN}
FAST = SamplingSettings(steps=2, seed=1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("inpaint")


@pytest.fixture(scope="module")
def data(folder) -> Path:
    """32 px phantoms, 12 slices of 6 patients over 5 folds (training split: 3 folds), a quarter tumour-free."""
    return write_phantoms(folder / "phantoms.h5", n=12, size=SIZE, patients=6)


@pytest.fixture(scope="module")
def run(folder, data) -> Path:
    """An inpaint generator, 4 steps on 16 px crops, with a sample grid on repainted training slices."""
    cfg = tiny_config(INPAINT, sample_every_steps=4, sample_count=4, sample_steps=2, region_weight=3.0)
    return train_diffusion(cfg, data, folder / "run", cpu=True).run_dir


@pytest.fixture(scope="module")
def joint_run(folder) -> Path:
    small = write_phantoms(folder / "small.h5", n=8, size=16, patients=4)
    return train_diffusion(tiny_config(), small, folder / "joint", cpu=True).run_dir


@pytest.fixture(scope="module")
def maskcond_run(folder) -> Path:
    return train_diffusion(tiny_config({"mode": "mask-conditioned"}), folder / "small.h5", folder / "maskcond",
                           cpu=True).run_dir


def _slices(path: Path, rows) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(path, "r") as h5:
        return h5["images"][:][rows, 0].astype(np.float32), h5["masks"][:][rows]


def _file(path: Path) -> dict:
    with h5py.File(path, "r") as h5:
        return {"images": h5["images"][:, 0].astype(np.float32), "masks": h5["masks"][:], "labels": h5["labels"][:]}


def _grown(masks: np.ndarray) -> np.ndarray:
    return dilate(torch.from_numpy(masks), MARGIN).numpy()


def _disc(radius: float, centre=(SIZE / 2, SIZE / 2)) -> np.ndarray:
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def write_heads(path: Path, radii, lesions, seed: int = 0) -> Path:
    """Slices that are a head (a noisy disc of known radius, centred) and nothing else, every one in the training
    split; lesions[i]: (row, col, half side) of a bright square tumour, or None."""
    rng = np.random.default_rng(seed)
    with PreparedWriter(path, size=SIZE, channels=1, source_format="test") as writer:
        for i, (radius, lesion) in enumerate(zip(radii, lesions)):
            head = _disc(radius)
            mask = np.zeros((SIZE, SIZE), np.uint8)
            if lesion is not None:
                r, c, half = lesion
                mask[r - half:r + half + 1, c - half:c + half + 1] = 1
            image = head * (0.45 + rng.normal(0, 0.03, head.shape)) + 0.4 * mask
            writer.append(np.clip(image, 0, 1), mask, label=int(mask.any()), patient=f"h{i}", source=f"head{i}")
        return writer.close(folds=np.full(len(radii), 3))


# --- the model: layout, recognition, config ----------------------------------------------------------------------


def test_layout_is_inpaint_and_loads_with_plain_diffusers(run):
    unet = UNet2DModel.from_pretrained(run, subfolder="unet")
    assert (unet.config.in_channels, unet.config.out_channels) == (4, 1)  # noised + blanked image, region, lesion
    assert unet.config.sample_size == CROP  # what the UNet sees: a crop
    assert unet.config[INPAINT_KEY] == {"slice_size": SIZE, "region_margin": MARGIN}
    assert model_layout(unet) == (1, "inpaint") and inpaint_settings(load_diffusion(run).unet)["slice_size"] == SIZE
    assert (run / "samples" / "step-00000004.png").is_file()  # the grid of repainted training slices
    assert "mode: inpaint" in (run / "config.yaml").read_text()


def test_every_mode_has_its_own_channels_grey_and_colour():
    layouts = {}
    for channels in (1, 3):
        for mode in ("image", "joint", "mask-conditioned", "inpaint"):
            cfg = DiffusionModelConfig(sample_size=16, image_channels=channels, mode=mode, block_out_channels=(8, 16),
                                       norm_num_groups=8)
            unet = build_unet(cfg)
            assert model_layout(unet) == (channels, mode)
            layouts[(unet.config.in_channels, unet.config.out_channels)] = mode
    assert len(layouts) == 8  # no two modes share a layout: the channels alone tell the mode
    bare = UNet2DModel(in_channels=4, out_channels=1, sample_size=8, block_out_channels=(8,), norm_num_groups=4,
                       down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",))
    with pytest.raises(CheckpointError, match="inpaint UNet without its _genseg_inpaint config entry"):
        inpaint_settings(bare)


def test_crop_settings_are_checked():
    with pytest.raises(ConfigError, match="crop_size 16: .*for mode inpaint only .*mode joint"):
        DiffusionModelConfig(sample_size=32, crop_size=16, block_out_channels=(8, 16), norm_num_groups=8)
    with pytest.raises(ConfigError, match="crop_size 10 must be a positive multiple of 2\\*\\*\\(levels - 1\\) = 4"):
        DiffusionModelConfig(sample_size=32, crop_size=10, mode="inpaint", block_out_channels=(8, 16, 32),
                             norm_num_groups=8)
    with pytest.raises(ConfigError, match="no larger than sample_size 32"):
        DiffusionModelConfig(sample_size=32, crop_size=64, mode="inpaint", block_out_channels=(8, 16), norm_num_groups=8)
    with pytest.raises(ConfigError, match="region_margin must be >= 0"):
        DiffusionModelConfig(mode="inpaint", region_margin=-1, block_out_channels=(8, 16), norm_num_groups=8)
    whole = DiffusionModelConfig(sample_size=32, mode="inpaint", block_out_channels=(8, 16), norm_num_groups=8)
    assert whole.unet_size == 32 and whole.channels == 4  # no crop_size: whole slices


# --- training ---------------------------------------------------------------------------------------------------


def _batch(data: Path) -> torch.Tensor:
    from genseg.data.prepared import PreparedDataset

    dataset = PreparedDataset(data)
    rows = [dataset[i] for i in range(len(dataset))]
    return to_model_space({"image": torch.stack([r["image"] for r in rows]),
                           "mask": torch.stack([r["mask"] for r in rows]).float()}, joint=True)


def test_training_crops_hold_their_region_and_heal_tumour_free_tissue(data):
    x = _batch(data)
    lesions = x[:, 1] > 0
    model = DiffusionModelConfig(**{**INPAINT, "block_out_channels": (16, 32), "norm_num_groups": 8})
    images, condition, regions = inpaint_crops(x, model, healthy_fraction=0.0, generator=torch.Generator().manual_seed(0))
    assert images.shape == (len(x), 1, CROP, CROP) and condition.shape == (len(x), 3, CROP, CROP)
    assert regions.dtype == torch.bool and regions.flatten(1).any(1).all()  # every crop has something to repaint
    assert torch.equal(condition[:, :1], torch.where(regions, torch.zeros_like(images), images))  # blanked to 0
    assert torch.equal(condition[:, 1:2] > 0, regions)
    assert not ((condition[:, 2:] > 0) & ~regions).any()  # a lesion crop repaints its whole lesion
    assert (condition[:, 2:] > 0).flatten(1).any(1).sum() == lesions.flatten(1).any(1).sum()
    _, healthy, healthy_regions = inpaint_crops(x, model, healthy_fraction=1.0,
                                                generator=torch.Generator().manual_seed(0))
    assert not ((healthy[:, 2:] > 0) & healthy_regions).any()  # healthy regions miss the lesion: tissue to paint
    again = inpaint_crops(x, model, healthy_fraction=0.5, generator=torch.Generator().manual_seed(3))
    other = inpaint_crops(x, model, healthy_fraction=0.5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(again[1], inpaint_crops(x, model, 0.5, torch.Generator().manual_seed(3))[1])  # seeded
    assert not torch.equal(again[1], other[1])


def test_resume_is_exact(data, tmp_path, monkeypatch):
    """12 slices in batches of 4: 3 steps an epoch, so the step-2 checkpoint is mid-epoch. Killed after its first
    log row past it and resumed, a run ends with the weights, EMA and log (bar the timings) of an uninterrupted
    one: the crops and regions come from the saved generator."""
    from safetensors.torch import load_file

    settings = {"max_steps": 6, "checkpoint_every_steps": 2, "log_every_steps": 1, "lr_warmup_steps": 2,
                "healthy_fraction": 0.5, "region_weight": 2.0}
    cfg = tiny_config(INPAINT, **settings)
    whole = train_diffusion(cfg, data, tmp_path / "whole", cpu=True).run_dir
    cut = train_killed_then_resumed(cfg, data, tmp_path / "cut", monkeypatch, after_step=2)

    def weights(run: Path, name: Path) -> dict:
        return load_file(run / name)

    final = Path("checkpoints") / "step-00000006"
    for name in (final / "model.safetensors", final / "ema.safetensors",
                 Path("unet", "diffusion_pytorch_model.safetensors")):
        a, b = weights(whole, name), weights(cut, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert _log_without_timings(cut) == _log_without_timings(whole)
    reseeded = train_diffusion(tiny_config(INPAINT, seed=1, **settings), data, tmp_path / "seed1", cpu=True).run_dir
    a, b = (weights(run, Path("unet", "diffusion_pytorch_model.safetensors")) for run in (whole, reseeded))
    assert not all(torch.equal(a[k], b[k]) for k in a)  # the comparison can fail: other draws, other weights


def _log_without_timings(run: Path) -> list[dict]:
    import csv

    with (run / "log.csv").open() as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def test_modes_do_not_mix(run, joint_run, data, folder):
    with pytest.raises(ConfigError, match="holds a joint .* generator.*this run trains a inpaint"):
        train_diffusion(tiny_config(INPAINT, init_from=str(joint_run)), data, folder / "mixed", cpu=True)
    assert not (folder / "mixed").exists()
    with pytest.raises(ConfigError, match="holds a inpaint generator; cannot resume it as joint"):
        train_diffusion(tiny_config({"sample_size": SIZE}), data, run, resume=True, cpu=True)


# --- the pipeline -----------------------------------------------------------------------------------------------


def _inputs(data: Path, rows=(1, 2, 4)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slices 0 (tumour-free) and 1.., their masks and regions: the lesion grown by the margin, or a square."""
    images, masks = _slices(data, list(rows))
    regions = _grown(masks).astype(np.uint8)
    for region, mask in zip(regions, masks):
        if not mask.any():
            region[12:18, 10:16] = 1
    return images, masks, regions


def test_pixels_outside_the_region_are_the_real_slices(run, data):
    pipe = quiet(load_diffusion(run))
    images, masks, regions = _inputs(data, rows=(0, 1, 2, 5))
    a = pipe(4, images=images, masks=masks, regions=regions, num_inference_steps=3, generator=seed_generators(5, 4))
    outside = regions == 0
    assert a.images.dtype == np.float32 and a.images.shape == images.shape
    assert np.array_equal(a.images[outside], images[outside])  # bit for bit
    assert not np.array_equal(a.images[~outside], images[~outside])  # the region was repainted
    assert np.array_equal(a.masks, masks)
    b = pipe(4, images=torch.from_numpy(images), masks=masks, regions=regions[:, None], num_inference_steps=3,
             generator=seed_generators(5, 4), batch_size=3)
    np.testing.assert_allclose(a.images, b.images, atol=1e-4)  # whatever the batch size
    c = pipe(4, images=images, masks=masks, regions=regions, num_inference_steps=3, generator=seed_generators(6, 4))
    assert not np.allclose(a.images, c.images)  # another seed, other paint
    ones = np.ones_like(masks)
    ones[:, 0] = 0
    d = pipe(4, images=images, masks=ones, regions=regions, num_inference_steps=3, generator=seed_generators(5, 4))
    assert not np.allclose(a.images, d.images)  # the lesion mask conditions the paint


def test_inpaint_pipeline_inputs_are_checked(run, joint_run, maskcond_run, data):
    pipe = quiet(load_diffusion(run))
    images, masks, regions = _inputs(data)
    with pytest.raises(ConfigError, match="an inpaint model repaints regions of given slices and does not sample "
                                          "freely.*--inpaint-into"):
        pipe(3, num_inference_steps=2)
    with pytest.raises(ConfigError, match="an inpaint model needs masks"):
        pipe(3, images=images, regions=regions, num_inference_steps=2)
    for other in (joint_run, maskcond_run):
        with pytest.raises(ConfigError, match="images / regions were given to a (joint|mask-conditioned) model"):
            quiet(load_diffusion(other))(3, images=images[:, 8:24, 8:24], masks=masks[:, 8:24, 8:24],
                                         num_inference_steps=2)
    calls = [
        ({"images": images[:, :16, :16]}, r"images: expected 3 slices of 1 channel\(s\) at 32x32"),
        ({"images": images * 2}, r"images must be prepared slices in \[0, 1\], got values in \[0, 2\]"),
        ({"masks": masks * 255}, r"masks must hold 0 and 1 only, found value\(s\) \[255\]"),
        ({"masks": masks[:, :16, :16]}, r"masks: expected 3 masks of 32x32 \(the model's size\)"),
        ({"regions": np.pad(regions, ((0, 0), (0, 8), (0, 8)))}, r"regions: expected 3 regions of 32x32 \(the images' "
                                                                 r"size\), got .*\(3, 40, 40\)"),
        ({"regions": regions * 2}, r"regions must hold 0 and 1 only, found value\(s\) \[2\]"),
        ({"regions": np.concatenate([regions[:1], np.zeros_like(regions[:1]), regions[2:]])},
         "region of slice 1 is empty: nothing to repaint"),
        ({"regions": np.pad(np.ones((3, 20, 18), np.uint8), ((0, 0), (6, 6), (7, 7)))},
         "region of slice 0 spans 20x18 px, more than the model's 16 px crop"),
    ]
    for change, message in calls:
        given = {"images": images, "masks": masks, "regions": regions, **change}
        with pytest.raises(ConfigError, match=message):
            pipe(3, num_inference_steps=2, **given)


# --- placing and erasing lesions --------------------------------------------------------------------------------


def test_a_placed_lesion_stays_inside_the_head():
    """Many draws of place_lesion on heads of known radius: every region (lesion grown by the margin) lies inside
    the head and clear of the slice's own tumour, and lesions land in different places."""
    lesion = torch.zeros(SIZE, SIZE, dtype=torch.uint8)
    lesion[3:8, 24:30] = 1  # near the corner: where it comes from does not matter
    own = np.zeros((SIZE, SIZE), np.uint8)
    own[14:18, 14:18] = 1
    centres, failed = set(), 0
    for radius in (11, 13, 15):
        head = torch.from_numpy(_disc(radius))
        for seed in range(40):
            placed = place_lesion(lesion, head, torch.from_numpy(own), MARGIN, CROP, torch.Generator().manual_seed(seed))
            if placed is None:  # the smallest head leaves little room around its own tumour
                failed += 1
                continue
            moved, region = placed
            assert moved.any() and set(moved.unique().tolist()) <= {0, 1}
            assert torch.equal(region, dilate(moved, MARGIN))
            assert not (region & ~head).any() and not (region & torch.from_numpy(own > 0)).any()
            centres.add(tuple(torch.nonzero(moved).float().mean(0).round().int().tolist()))
    assert failed < 20 and len(centres) > 30
    tiny_head = torch.from_numpy(_disc(3))
    assert place_lesion(lesion, tiny_head, torch.zeros_like(lesion), MARGIN, CROP, torch.Generator()) is None
    assert place_lesion(lesion, torch.zeros_like(tiny_head), torch.zeros_like(lesion), MARGIN, CROP,
                        torch.Generator()) is None


def test_head_and_brain_masks():
    image = 0.5 * _disc(12).astype(np.float32)
    image[14:18, 14:18] = 0.0  # a dark hole (a ventricle) inside: still head
    image[1, 1] = 0.9  # a bright speck in the air: not head
    assert np.array_equal(head_mask(image), _disc(12))
    brain, inset = brain_mask(image), round(BRAIN_INSET * SIZE)
    assert inset >= 1 and not (brain & ~_disc(12 - inset + 0.5)).any() and not (_disc(12 - inset - 0.5) & ~brain).any()


def test_inpaint_into_places_lesions_inside_the_head_only(run, tmp_path):
    radii = [13, 14, 14, 3, 13, 14]  # slice 3: a head too small to take any lesion
    lesions = [(12, 12, 2), None, (18, 16, 2), None, None, (10, 18, 2)]
    heads = write_heads(tmp_path / "heads.h5", radii, lesions)
    out = sample_to_file(run, None, tmp_path / "placed.h5", FAST, inpaint_into=heads, progress=False)
    info, written = read_metadata(out)["attrs"]["metadata"], _file(out)
    assert (info["mode"], info["mask_source"], info["inpaint"]) == ("inpaint", "given", "place")
    assert info["host_rows"] == [0, 1, 2, 4, 5] and info["skipped"] == 1  # each training slice once; 3 skipped
    assert "no placement inside the brain" in info["skip_reason"] and info["region_margin"] == MARGIN
    assert set(info["lesion_rows"]) <= {0, 2, 5}
    hosts, host_masks = _slices(heads, info["host_rows"])
    for i, host in enumerate(info["host_rows"]):
        placed = written["masks"][i] & ~host_masks[i]
        assert placed.any() and np.array_equal(written["masks"][i] & host_masks[i], host_masks[i])  # own tumour kept
        region = _grown(placed)  # the lesion and its margin: inside the brain, never on the skull or outside the head
        assert not (region & ~_disc(radii[host] - BRAIN_INSET * SIZE + 0.5)).any()
        changed = written["images"][i] != hosts[i]
        assert changed.any() and not (changed & ~region).any()  # outside the region: the real slice, bit for bit
    assert (written["labels"] == -1).all()  # tumour of unknown class
    check_synthetic(out, read_metadata(heads)["attrs"])  # train-seg --synthetic reads it
    again = sample_to_file(run, None, tmp_path / "again.h5", FAST, inpaint_into=heads, progress=False)
    assert np.array_equal(_file(again)["masks"], written["masks"])  # seeded: the same placements
    drawn = sample_to_file(run, 3, tmp_path / "drawn.h5", SamplingSettings(steps=2, seed=7), inpaint_into=heads,
                           progress=False)
    assert read_metadata(drawn)["num_slices"] + read_metadata(drawn)["attrs"]["metadata"]["skipped"] == 3


def test_erase_gives_tumour_free_slices(run, data, tmp_path):
    out = sample_to_file(run, None, tmp_path / "erased.h5", FAST, inpaint_into=data, erase=True, progress=False)
    info, written = read_metadata(out)["attrs"]["metadata"], _file(out)
    meta = read_metadata(data)
    _, all_masks = _slices(data, list(range(meta["num_slices"])))
    lesioned = [r for r in np.flatnonzero(meta["split"] == "train") if all_masks[r].any()]
    assert info["inpaint"] == "erase" and info["host_rows"] == [int(r) for r in lesioned] and info["skipped"] == 0
    assert not written["masks"].any() and (written["labels"] == 0).all()  # empty masks: tumour-free slices
    hosts, host_masks = _slices(data, info["host_rows"])
    changed = written["images"] != hosts
    assert changed.any() and not (changed & ~_grown(host_masks)).any()


def test_bad_inpaint_inputs_are_refused_before_anything_is_written(run, joint_run, maskcond_run, data, tmp_path):
    out = tmp_path / "x.h5"

    def refused(error, message, checkpoint=run, **options):
        with pytest.raises(error, match=message):
            sample_to_file(checkpoint, options.pop("num", 2), out, FAST, progress=False, **options)

    maskless = tmp_path / "maskless.h5"
    shutil.copy(data, maskless)
    with h5py.File(maskless, "a") as h5:
        del h5["masks"]
    refused(DataError, "maskless.h5.*lacks dataset.*masks", inpaint_into=maskless)
    image_only = write_phantoms(tmp_path / "imageonly.h5", n=6, size=SIZE, patients=3, synthetic=True,
                                metadata={"mode": "image", "mask_source": "none"})
    refused(DataError, "imageonly.h5.*holds no masks", inpaint_into=image_only)
    healthy = write_phantoms(tmp_path / "healthy.h5", n=6, size=SIZE, patients=3, empty_every=1)
    refused(DataError, "healthy.h5.*has no lesions in its training split to place", inpaint_into=healthy)
    refused(DataError, "healthy.h5.*has no lesions in its training split to erase", inpaint_into=healthy, erase=True)
    small = write_phantoms(tmp_path / "small.h5", n=6, size=16, patients=3)
    refused(DataError, r"small.h5.*masks are 16x16 but the model generates 32x32.*--size 32", inpaint_into=small)
    labelled, row = with_label_map_mask(data, tmp_path / "labelmap.h5")
    refused(DataError, rf"labelmap.h5.*mask of row {row} holds value 255.*0 and 1 only", inpaint_into=labelled)
    synthetic = write_phantoms(tmp_path / "synth.h5", n=6, size=SIZE, patients=3, synthetic=True)
    refused(DataError, "synth.h5.*is a synthetic file", inpaint_into=synthetic)
    no_room = write_heads(tmp_path / "noroom.h5", [3, 4], [(16, 16, 1), (16, 16, 1)])
    refused(DataError, "noroom.h5.*none of the 2 drawn slices could be repainted: no placement inside the brain",
            inpaint_into=no_room, num=None)
    refused(ConfigError, "holds an inpaint model: it repaints regions of real slices and does not sample freely")
    refused(ConfigError, "--inpaint-into and --erase need an inpaint model; .*holds a joint model", joint_run,
            inpaint_into=data)
    refused(ConfigError, "--inpaint-into and --erase need an inpaint model; .*holds a mask-conditioned model",
            maskcond_run, erase=True, masks_from=data)
    refused(ConfigError, "--masks-from, --mask-augment and --per-mask need a mask-conditioned model; .*holds an "
                         "inpaint model", masks_from=data)
    refused(ConfigError, "--num must be at least 1", num=0, inpaint_into=data)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_inpaint_into_and_the_pipeline_command(run, data, tmp_path):
    from click.testing import CliRunner

    from genseg.cli import main
    from genseg.serve.testing import make_untrained_segmenter

    runner = CliRunner()
    done = runner.invoke(main, ["sample", "--checkpoint", str(run), "--inpaint-into", str(data), "--num", "3",
                                "--steps", "2", "--out", str(tmp_path / "cli.h5")])
    assert done.exit_code == 0, done.output
    assert "wrote 3 synthetic slices (real slices, lesions placed) to" in done.output
    done = runner.invoke(main, ["sample", "--checkpoint", str(run), "--inpaint-into", str(data), "--erase",
                                "--steps", "2", "--out", str(tmp_path / "erased.h5")])
    assert done.exit_code == 0 and "lesions erased" in done.output, done.output
    assert json.loads(json.dumps(read_metadata(tmp_path / "erased.h5")["attrs"]["metadata"]))["inpaint"] == "erase"
    err = runner.invoke(main, ["sample", "--checkpoint", str(run), "--erase", "--num", "2",
                               "--out", str(tmp_path / "e.h5")])
    assert err.exit_code == 2 and "give --inpaint-into too" in err.output, err.output
    segmenter = make_untrained_segmenter(tmp_path / "seg", size=SIZE, base_channels=8, depth=2)
    pipeline = ["pipeline", "--diffusion", str(run), "--segmenter", str(segmenter), "--num", "2", "--steps", "2"]
    err = runner.invoke(main, [*pipeline, "--out", str(tmp_path / "pipe-out"), "--save-pipeline", str(tmp_path / "s")])
    assert err.exit_code == 2 and "holds an inpaint model: it repaints regions of real slices" in err.output, err.output
    assert not [p.name for p in tmp_path.iterdir() if p.name in ("e.h5", "pipe-out", "s") or p.name[0] == "."]
    done = runner.invoke(main, [*pipeline, "--inpaint-into", str(data), "--out", str(tmp_path / "pipe-out")])
    assert done.exit_code == 0, done.output
    summary = json.loads((tmp_path / "pipe-out" / "summary.json").read_text())
    assert summary["mask_source"] == "given" and summary["settings"]["inpaint"] == "place"
    placed = read_metadata(tmp_path / "cli.h5")["attrs"]["metadata"]  # the same seed draws the same hosts and lesions
    assert summary["settings"]["host_rows"] == placed["host_rows"][:2]
    assert all("dice_given_vs_predicted" in row for row in summary["slices"])
    assert "a lesion painted into real slices" in (tmp_path / "pipe-out" / "report.md").read_text()


def test_shipped_config_trains_on_crops(tmp_path):
    """configs/diffusion-inpaint-cpu-small.yaml: 64 px slices, 32 px crops; three optimizer steps of it through
    `train-diffusion --real-fraction F --seed S` (batch 4) write a loadable inpaint pipeline folder."""
    from click.testing import CliRunner

    from genseg.cli import main
    from genseg.runs import resolve_config
    from genseg.training.diffusion import DiffusionTrainConfig

    shipped = resolve_config(DiffusionTrainConfig, "diffusion-inpaint-cpu-small", {}, None, False)
    assert (shipped.model.mode, shipped.model.sample_size, shipped.model.crop_size) == ("inpaint", 64, 32)
    data = write_phantoms(tmp_path / "p64.h5", n=12, size=64, patients=6)
    done = CliRunner().invoke(main, ["train-diffusion", "--data", str(data), "--config", "diffusion-inpaint-cpu-small",
                                     "--real-fraction", "0.5", "--seed", "3", "--max-steps", "3", "--batch-size", "4",
                                     "--out", str(tmp_path / "run"), "--cpu"])
    assert done.exit_code == 0, done.output
    unet = load_diffusion(tmp_path / "run").unet
    assert model_layout(unet) == (1, "inpaint") and unet.config.sample_size == 32
    assert inpaint_settings(unet) == {"slice_size": 64, "region_margin": shipped.model.region_margin}


def test_step_timing_of_the_demo_plan_handles_the_mode():
    from genseg.workflows.demo import measure_diffusion_step

    assert measure_diffusion_step(tiny_config(INPAINT)) > 0  # crops, with the blanked image, region and mask as input


def test_a_pipeline_server_refuses_generate_requests_for_an_inpaint_generator(run, tmp_path):
    """Generate requests carry no real slices to paint into: a clear 400, and the server keeps segmenting."""
    from genseg.pipeline.genseg_pipeline import GenSegPipeline
    from genseg.serve.testing import ServerProcess, make_untrained_segmenter, post_json, request

    segmenter = make_untrained_segmenter(tmp_path / "seg", size=SIZE, base_channels=8, depth=2)
    GenSegPipeline.from_runs(run, segmenter).save_pretrained(tmp_path / "pipe")
    with ServerProcess(tmp_path / "pipe") as server:
        assert request(server.port, "GET", "/health")[1]["generate_masks"] == "given"
        status, body = post_json(server.port, "/predict", {"instances": [{}], "parameters": {"generate": 1}})
        assert status == 400 and "--inpaint-into" in body["error"]["message"], body
        image = np.random.default_rng(0).random((SIZE, SIZE)).tolist()
        assert post_json(server.port, "/predict", {"instances": [image]})[0] == 200
