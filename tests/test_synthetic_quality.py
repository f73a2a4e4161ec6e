"""evaluate-synthetic: near-copies are caught, KID separates like from unlike, mask/image agreement is exact when
the masks are the segmenter's own predictions, the per-slice results are what train-seg filters on, and bad input
gets errors naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from seg_helpers import one_torch_thread, phantom, write_phantoms  # noqa: F401 (autouse fixture)

from genseg.config import config_from_dict
from genseg.data.prepared import PreparedWriter, read_metadata
from genseg.data.records import preprocess_pair
from genseg.errors import CheckpointError, DataError
from genseg.evaluation.metrics import kid
from genseg.evaluation.synthetic_quality import evaluate_synthetic, kid_reading, markdown_table, random_feature_network
from genseg.inference.segmenter import load_segmenter
from genseg.models.diffusion import build_unet
from genseg.pipeline.diffusion import SamplingSettings
from genseg.runs import SegTrainConfig
from genseg.training.diffusion import DiffusionTrainConfig, save_pipeline
from genseg.training.mixing import select_synthetic
from genseg.training.seg import train_segmenter
from genseg.workflows.sampling import sample_to_file

FAST = dict(kid_subsets=20, progress=False)
META = {"model": "test-ddpm", "scheduler": "dpmsolver", "steps": 20, "seed": 7, "class": None}


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> Path:
    return write_phantoms(tmp_path_factory.mktemp("real") / "real.h5", n=40, size=32, patients=10)


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory, real) -> Path:
    """A segmenter trained for a few epochs on the real phantoms: its predictions are neither empty nor perfect."""
    run = tmp_path_factory.mktemp("seg") / "run"
    cfg = SegTrainConfig(size=32, base_channels=8, depth=2, batch_size=4, epochs=12, lr=1e-2, patience=None,
                         loss="bce+dice", hflip=False, max_rotation=0.0, plot_samples=1)
    train_segmenter(cfg, real, run)
    return run


def fresh_phantoms(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """New phantoms (images (n, 1, S, S) as stored in float16, masks), never seen in the real file."""
    rng = np.random.default_rng(seed)
    pairs = [preprocess_pair(*phantom(rng, size, tumour=i % 4 != 0), size) for i in range(n)]
    images = np.stack([p[0] for p in pairs]).astype(np.float16).astype(np.float32)
    return images, np.stack([p[1] for p in pairs])


def write_synth(path: Path, images: np.ndarray, masks: np.ndarray, labels=None, synthetic: bool = True,
                **metadata) -> Path:
    """A synthetic file the way `genseg sample` writes one: the prepared format, marked synthetic, with metadata."""
    with PreparedWriter(path, size=images.shape[-1], channels=images.shape[1], source_format="diffusion",
                        synthetic=synthetic, metadata={**META, **metadata}) as writer:
        for i, (image, mask) in enumerate(zip(images, masks)):
            label = int(labels[i]) if labels is not None else (2 if mask.any() else 0)
            writer.append(image, mask, label=label, patient=f"synthetic-{i}", source="sample")
        return writer.close(folds=np.ones(len(images), dtype=np.int8))


def real_train_slices(real: Path, k: int) -> tuple[np.ndarray, np.ndarray]:
    rows = np.flatnonzero(read_metadata(real)["split"] == "train")[:k]
    with h5py.File(real, "r") as h5:
        return h5["images"][rows].astype(np.float32), h5["masks"][rows]


def test_copies_of_training_slices_are_near_copies(real, tmp_path):
    copies, copy_masks = real_train_slices(real, 6)
    copies[4:], copy_masks[4:] = copies[4:, ..., ::-1], copy_masks[4:, ..., ::-1]  # mirrored copies count too
    fresh, fresh_masks = fresh_phantoms(6, seed=123)
    synth = write_synth(tmp_path / "synth.h5", np.concatenate([copies, fresh]),
                        np.concatenate([copy_masks, fresh_masks]))
    pixels_before = h5py.File(synth, "r")["images"][:]

    result = evaluate_synthetic(synth, real, **FAST)
    with h5py.File(synth, "r") as h5:
        ratio = h5["quality_nn_ratio"][:]
        assert "quality_agreement" not in h5  # no segmenter: agreement unknown, not invented
        np.testing.assert_array_equal(h5["images"][:], pixels_before)
        assert json.loads(h5.attrs["quality"])["near_copies"] == 6
    assert np.all(ratio[:6] < 1e-3), ratio
    assert np.all(ratio[6:] > 0.6), ratio
    assert result["near_copies"] == 6 and result["near_copy_percent"] == 50.0
    assert result["real_near_copy_percent"] < 20  # held-out real slices are not flagged
    assert result["agreement_dice_mean"] is None and result["written"] == ["quality_nn_ratio"]
    assert result["agreement_real_reference"] is None
    assert result["feature_network"].startswith("random CNN")
    assert Path(result["figure"]).stat().st_size > 0
    table = markdown_table(result)
    assert "| near-copies (ratio < 0.5) | 6 (50 %)" in table and "KID x 1000" in table and "random CNN" in table
    # train-seg's filter reads what was written: only the fresh slices survive --min-nn-ratio 0.5
    rows, provenance = select_synthetic(synth, read_metadata(real)["attrs"], min_nn_ratio=0.5)
    assert rows.tolist() == list(range(6, 12)) and provenance["metadata"] == META
    # evaluating again replaces the datasets (same numbers, no duplicates)
    again = evaluate_synthetic(synth, real, near_copy_ratio=0.1, **FAST)
    assert again["near_copies"] == 6 and again["near_copy_threshold"] == 0.1
    with h5py.File(synth, "r") as h5:
        np.testing.assert_array_equal(h5["quality_nn_ratio"][:], ratio)
    # --min-agreement needs a segmenter's evaluation first
    with pytest.raises(DataError, match="quality_agreement"):
        select_synthetic(synth, read_metadata(real)["attrs"], min_agreement=0.5)


def test_kid_self_is_zero_and_noise_is_far():
    net = random_feature_network(1, seed=0)
    a, _ = fresh_phantoms(48, seed=1)
    b, _ = fresh_phantoms(48, seed=2)
    noise = np.random.default_rng(3).uniform(0, 1, a.shape).astype(np.float32)
    with torch.no_grad():
        fa, fb, fn = (net(torch.from_numpy(x)).numpy() for x in (a, b, noise))
    self_kid, _ = kid(fa, fa, num_subsets=20, subset_size=32)
    same_kid, _ = kid(fa, fb, num_subsets=20, subset_size=32)
    noise_kid, noise_sd = kid(fa, fn, num_subsets=20, subset_size=32)
    assert noise_kid > 20 * max(abs(self_kid), abs(same_kid)) and noise_kid > 5 * noise_sd
    # fixed seed = fixed features
    np.testing.assert_array_equal(random_feature_network(1, seed=0)(torch.from_numpy(a)).detach().numpy(), fa)


def test_kid_of_noise_exceeds_the_real_reference(real, tmp_path):
    images, masks = fresh_phantoms(24, seed=5)
    noise = np.random.default_rng(0).uniform(0, 1, images.shape).astype(np.float32)
    good = evaluate_synthetic(write_synth(tmp_path / "good.h5", images, masks), real, write=False, **FAST)
    bad = evaluate_synthetic(write_synth(tmp_path / "noise.h5", noise, masks), real, write=False, **FAST)
    assert bad["kid_mean"] > 10 * abs(good["kid_mean"]) and bad["kid_mean"] > 10 * abs(bad["kid_real_reference"])
    assert good["kid_mean"] < good["kid_real_reference"] + 3 * good["kid_real_reference_std"] + 3 * good["kid_std"]
    assert not h5py.File(tmp_path / "good.h5", "r").attrs.get("quality")  # write=False leaves the file alone


def test_bootstrap_kid_spreads_where_subsets_would_all_be_the_whole_sets():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(60, 16)), rng.normal(size=(60, 16)) + 0.3
    whole, spread = kid(a, b, num_subsets=5, subset_size=1000)
    assert spread == 0  # every subset is both whole sets
    mean, sd = kid(a, b, num_subsets=200, subset_size=1000, bootstrap=True)
    assert sd > 0 and abs(mean - whole) < sd / 2  # centred on the whole sets' KID, with its uncertainty
    same, same_sd = kid(a, rng.normal(size=(60, 16)), num_subsets=200, subset_size=1000, bootstrap=True)
    assert abs(same) < 2 * same_sd < whole  # a row drawn twice is not paired with itself: no bias up


def test_kid_spread_is_real_when_the_sets_are_equal_in_size(real, tmp_path):
    """A synthetic set as large as the training split (both below the subset size) still gets a spread."""
    n_train = int((read_metadata(real)["split"] == "train").sum())
    images, masks = fresh_phantoms(n_train, seed=6)
    result = evaluate_synthetic(write_synth(tmp_path / "s.h5", images, masks), real, write=False, **FAST)
    assert result["kid_std"] > 0 and result["kid_real_reference_std"] > 0
    assert result["kid_reading"] and f"KID: {result['kid_reading']}" in markdown_table(result)


def test_kid_reading_compares_with_the_reference_in_standard_deviations():
    assert kid_reading(None, None, 0.01, 0.01) is None and kid_reading(0.5, 0.1, None, None) is None
    assert kid_reading(0.02, 0.01, 0.01, 0.01).startswith("within two standard deviations")
    far = kid_reading(2.278, 0.05, 0.0141, 0.0695)
    assert far.startswith("26 standard deviations above") and "still tell synthetic from real" in far
    assert "x it" not in far  # the reference is within its own noise of 0: no ratio
    assert ", 100x it:" in kid_reading(1.0, 0.01, 0.01, 0.001)
    assert "below the real-vs-real reference" in kid_reading(-0.5, 0.01, 0.01, 0.01)


def test_agreement_with_the_segmenters_own_masks(real, seg_run, tmp_path):
    segmenter = load_segmenter(seg_run)
    images, truth = fresh_phantoms(16, seed=9)
    own = (segmenter.predict(images) >= segmenter.threshold).astype(np.uint8)
    assert own.any() and not own.all()  # a real test: the predictions are neither empty nor everything
    synth = write_synth(tmp_path / "own.h5", images, own, labels=np.arange(16) % 4)
    result = evaluate_synthetic(synth, real, segmenter=seg_run, **FAST)
    assert result["agreement_dice_mean"] == 1.0
    assert 0.0 < result["agreement_real_reference"] < 1.0  # the segmenter's Dice on held-out real slices
    assert result["feature_network"].startswith("segmenter encoder")
    assert result["written"] == ["quality_nn_ratio", "quality_agreement"]
    assert sum(result["class_histogram"]["synthetic"].values()) == pytest.approx(1.0)
    assert result["tumour_slice_share"]["synthetic"] == pytest.approx(np.mean(own.any(axis=(1, 2))))
    # inverted masks disagree: the measure can fail
    flipped = write_synth(tmp_path / "flipped.h5", images, 1 - own)
    worse = evaluate_synthetic(flipped, real, segmenter=segmenter, **FAST)
    assert worse["agreement_dice_mean"] < 0.5
    with h5py.File(flipped, "r") as h5:
        agreement = h5["quality_agreement"][:]
    rows, _ = select_synthetic(flipped, read_metadata(real)["attrs"], min_agreement=0.5)
    np.testing.assert_array_equal(rows, np.flatnonzero(agreement >= 0.5))
    # image-mode samples carry placeholder empty masks: no agreement is claimed for them
    image_mode = write_synth(tmp_path / "image_mode.h5", images, np.zeros_like(own), mask_source="none")
    result = evaluate_synthetic(image_mode, real, segmenter=segmenter, **FAST)
    assert result["agreement_dice_mean"] is None and result["written"] == ["quality_nn_ratio"]
    assert result["feature_network"].startswith("segmenter encoder")


def test_bad_input_names_the_file(real, seg_run, tmp_path):
    images, masks = fresh_phantoms(4, seed=11)
    not_synth = write_synth(tmp_path / "plain.h5", images, masks, synthetic=False)
    with pytest.raises(DataError, match="plain.h5.*not marked synthetic"):
        evaluate_synthetic(not_synth, real, **FAST)
    big, big_masks = fresh_phantoms(4, seed=11, size=64)
    with pytest.raises(DataError, match="big.h5.*64x64"):
        evaluate_synthetic(write_synth(tmp_path / "big.h5", big, big_masks), real, **FAST)
    rgb = write_synth(tmp_path / "rgb.h5", np.repeat(images, 3, axis=1), masks)
    with pytest.raises(DataError, match="rgb.h5.*3 channel"):
        evaluate_synthetic(rgb, real, **FAST)
    with pytest.raises(DataError, match="bright.h5.*outside \\[0, 1\\]"):
        evaluate_synthetic(write_synth(tmp_path / "bright.h5", images * 2 + 0.5, masks), real, **FAST)
    synth = write_synth(tmp_path / "ok.h5", images, masks)
    with PreparedWriter(tmp_path / "testonly.h5", size=32) as writer:  # every slice in the test fold
        for image, mask in zip(images, masks):
            writer.append(image, mask, label=2, patient="p", source="s")
        no_train = writer.close(folds=np.ones(4, dtype=np.int8))
    with pytest.raises(DataError, match="testonly.h5.*no training slice"):
        evaluate_synthetic(synth, no_train, **FAST)
    with pytest.raises(DataError, match="ok.h5.*synthetic"):
        evaluate_synthetic(real, synth, **FAST)  # swapped arguments
    with pytest.raises(CheckpointError, match="missing-run.*not found"):
        evaluate_synthetic(synth, real, segmenter=tmp_path / "missing-run", **FAST)


def test_cli_json_round_trip(real, genseg_cli, tmp_path):
    copies, copy_masks = real_train_slices(real, 2)
    fresh, fresh_masks = fresh_phantoms(4, seed=21)
    synth = write_synth(tmp_path / "synth.h5", np.concatenate([copies, fresh]),
                        np.concatenate([copy_masks, fresh_masks]))
    done = genseg_cli("evaluate-synthetic", synth, "--real", real, "--json", "--out-dir", tmp_path / "figs")
    result = json.loads(done.stdout)
    assert {"num_synthetic", "nn_ratio_median", "near_copies", "kid_mean", "kid_std", "kid_real_reference",
            "feature_network", "agreement_dice_mean"} <= set(result)
    assert result["num_synthetic"] == 6 and result["near_copies"] == 2 and result["agreement_dice_mean"] is None
    assert Path(result["figure"]).parent == tmp_path / "figs"
    assert h5py.File(synth, "r")["quality_nn_ratio"].shape == (6,)
    from click.testing import CliRunner

    from genseg.cli import main

    failed = CliRunner().invoke(main, ["evaluate-synthetic", str(real), "--real", str(real)])  # in-process: fast
    assert failed.exit_code == 2 and "real.h5" in failed.stderr and "not marked synthetic" in failed.stderr


def test_scores_what_genseg_sample_writes(real, seg_run, tmp_path):
    """The real sampler's output (an untrained 32 px joint model, 2 DPM-Solver steps) is read, scored and
    annotated like any synthetic file, and train-seg's filters then select from it."""
    cfg = config_from_dict(DiffusionTrainConfig, {"model": {"sample_size": 32, "block_out_channels": [16, 32],
                                                            "norm_num_groups": 8}})
    torch.manual_seed(0)
    save_pipeline(build_unet(cfg.model), cfg, tmp_path / "gen")
    synth = sample_to_file(tmp_path / "gen", 6, tmp_path / "sampled.h5", SamplingSettings(steps=2, seed=3),
                           progress=False)
    result = evaluate_synthetic(synth, real, segmenter=seg_run, **FAST)
    assert result["num_synthetic"] == 6 and result["generator"]["scheduler"] == "dpmsolver"
    assert result["written"] == ["quality_nn_ratio", "quality_agreement"]
    with h5py.File(synth, "r") as h5:
        agreement = h5["quality_agreement"][:]
    rows, provenance = select_synthetic(synth, read_metadata(real)["attrs"], min_nn_ratio=0.5,
                                        min_agreement=float(np.median(agreement)))
    assert 1 <= len(rows) <= 6 and provenance["metadata"]["steps"] == 2


def test_placed_lesions_are_judged_by_their_own_window(real, tmp_path):
    """An inpainted slice is its real host outside the repainted region, so memorisation of placed lesions looks
    at the lesion's window only: a training lesion pasted back is a near-copy (ratio 0), a lesion never seen is
    as far from the training lesions as a held-out real one; erase sets and other modes get no such view."""
    meta = read_metadata(real)
    train = np.flatnonzero(meta["split"] == "train")
    with h5py.File(real, "r") as h5:
        masks = h5["masks"][:]
    hosts = [int(r) for r in train if not masks[r].any()][:3]  # tumour-free hosts: the whole mask was placed
    pasted, pasted_masks = real_train_slices(real, 12)
    keep = pasted_masks.reshape(12, -1).any(1)
    pasted, pasted_masks = pasted[keep][:3], pasted_masks[keep][:3]
    fresh, fresh_masks = fresh_phantoms(8, seed=321)
    keep = fresh_masks.reshape(8, -1).any(1)
    fresh, fresh_masks = fresh[keep][:3], fresh_masks[keep][:3]
    placed = {"inpaint_into": str(real), "inpaint": "place", "host_rows": hosts, "region_margin": 2}
    copies = evaluate_synthetic(write_synth(tmp_path / "pasted.h5", pasted, pasted_masks, **placed), real,
                                write=False, **FAST)
    new = evaluate_synthetic(write_synth(tmp_path / "new.h5", fresh, fresh_masks, **placed), real, write=False, **FAST)
    assert copies["lesion_windows"] == new["lesion_windows"] == 3
    assert copies["lesion_kid_windows"]["synthetic"] == 3 and copies["lesion_kid_margin"] == 2  # placed lesions
    assert copies["lesion_nn_ratio_median"] < 1e-3 and copies["lesion_near_copy_percent"] == 100
    assert new["lesion_nn_ratio_median"] > 0.5 and new["lesion_near_copy_percent"] < 100
    assert "placed lesions only" in markdown_table(new)
    erased = evaluate_synthetic(write_synth(tmp_path / "erased.h5", fresh, fresh_masks, **{**placed, "inpaint": "erase"}),
                                real, write=False, **FAST)
    assert erased["lesion_memorisation"] == "not measured: an erase set places no lesion"
    assert erased["lesion_kid_reading"] == "not measured: an erase set places no lesion"
    joint = evaluate_synthetic(write_synth(tmp_path / "joint.h5", fresh, fresh_masks), real, write=False, **FAST)
    assert "lesion_memorisation" not in joint


def test_lesion_window_kid_looks_at_the_lesions_only(real, tmp_path):
    """Real tumour slices score within the real reference on their lesion windows; the same slices with the
    lesions (and only they) blacked out score far above it, and further above it, in standard deviations, than
    the whole-slice KID does (most of each slice is unchanged); the table shows the row."""
    images, masks = real_train_slices(real, 40)
    keep = masks.reshape(len(masks), -1).any(1)
    images, masks = images[keep], masks[keep]
    holes = np.where(masks[:, None] > 0, 0.0, images).astype(np.float32)
    same = evaluate_synthetic(write_synth(tmp_path / "same.h5", images, masks), real, write=False, **FAST)
    spoiled = evaluate_synthetic(write_synth(tmp_path / "holes.h5", holes, masks), real, write=False, **FAST)
    assert same["lesion_kid_windows"]["synthetic"] == len(images) >= 10

    def z(result, prefix):
        return (result[f"{prefix}kid_mean"] - result[f"{prefix}kid_real_reference"]) / np.hypot(
            result[f"{prefix}kid_std"], result[f"{prefix}kid_real_reference_std"])

    assert z(same, "lesion_") < 2 and z(spoiled, "lesion_") > 5 and z(spoiled, "lesion_") > 2 * z(spoiled, "")
    assert spoiled["lesion_kid_reading"] and "KID x 1000 of the lesion windows only" in markdown_table(spoiled)
    empty = evaluate_synthetic(write_synth(tmp_path / "empty.h5", images, np.zeros_like(masks)), real, write=False,
                               **FAST)
    assert "lesion_kid_mean" not in empty and empty["lesion_kid_reading"].startswith("not measured")
