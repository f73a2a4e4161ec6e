"""Harder demo datasets (issue 14): each preset changes what it says it changes, and nothing changes the standard
demo data, on which tests and shipped checkpoints depend bit for bit."""

import hashlib

import numpy as np
import pytest
from scipy import ndimage

from genseg.data.demo import PRESETS, DemoSettings, demo_slices, make_demo_dataset, preset_settings

# sha256 of demo_slices(3, 3, 48, seed=0)'s images, masks, labels and patients, drawn before the presets existed
STANDARD_DIGEST = "da9a75ffb4ecc4d9cd6cd0e718ad0c4446f9008d12da3b6ab031eae9f9588fee"


def digest(slices) -> str:
    h = hashlib.sha256()
    for s in slices:
        h.update(s.image.tobytes() + s.mask.tobytes() + f"{s.label}/{s.patient}".encode())
    return h.hexdigest()


def slices_with(settings: DemoSettings, patients: int = 6, size: int = 64, seed: int = 5) -> list:
    return list(demo_slices(patients, 3, size, seed, empty_share=0.0, settings=settings))


def test_standard_demo_data_is_unchanged():
    assert digest(demo_slices(3, 3, 48, seed=0)) == STANDARD_DIGEST
    assert digest(demo_slices(3, 3, 48, seed=0, settings=DemoSettings())) == STANDARD_DIGEST


def test_small_lesions_are_about_a_quarter_of_the_area():
    standard, small = slices_with(DemoSettings()), slices_with(PRESETS["small"][0])
    ratio = sum(s.mask.sum() for s in small) / sum(s.mask.sum() for s in standard)
    assert 0.1 < ratio < 0.4


def lesion_contrast(slices) -> float:
    """Mean |tumour - brain ring around it| over slices, relative to the brain ring."""
    values = []
    for s in slices:
        mask = s.mask.astype(bool)
        if mask.sum() < 10:
            continue
        ring = ndimage.binary_dilation(mask, iterations=4) & ~ndimage.binary_dilation(mask, iterations=1)
        around = np.median(s.image[ring])
        values.append(abs(np.median(s.image[mask]) - around) / around)
    return float(np.mean(values))


def test_low_contrast_lesions_are_closer_to_their_surroundings():
    standard, low = slices_with(DemoSettings()), slices_with(PRESETS["low-contrast"][0])
    assert [s.mask.tolist() for s in standard] == [s.mask.tolist() for s in low]  # same anatomy, fainter lesion
    assert lesion_contrast(low) < 0.6 * lesion_contrast(standard)


def test_skull_preset_presses_meningiomas_against_the_skull():
    def contact(slices) -> float:
        """Mean over meningioma slices: tumour pixels next to the skull (within 1.5 px of the tumour's closest
        point to the outside of the head), relative to the tumour's diameter scale sqrt(area)."""
        shares = []
        for s in slices:
            if s.label == 1 and s.mask.sum() >= 5:
                head = ndimage.binary_fill_holes(s.image > 0.2 * np.percentile(s.image, 99))
                depth = ndimage.distance_transform_edt(head)[s.mask.astype(bool)]
                shares.append((depth <= depth.min() + 1.5).sum() / np.sqrt(s.mask.sum()))
        return float(np.mean(shares))

    standard = slices_with(DemoSettings(meningioma_share=1.0))
    pressed = slices_with(DemoSettings(meningioma_share=1.0, skull_contact=True))
    assert contact(pressed) > 1.15 * contact(standard)
    labels = [s.label for s in slices_with(PRESETS["skull"][0], patients=8)[::3]]
    assert labels.count(1) == 4 and {2, 3} <= set(labels)


def test_bias_preset_multiplies_the_image_by_a_smooth_field():
    standard, biased = slices_with(DemoSettings()), slices_with(PRESETS["bias"][0])
    spreads = []
    for a, b in zip(standard, biased):
        assert np.array_equal(a.mask, b.mask)
        inside = ndimage.binary_erosion(a.image > 0.3 * np.percentile(a.image, 99), iterations=3)
        spreads.append(np.std(np.log(ndimage.median_filter(b.image, 5)[inside] + 1)
                              - np.log(ndimage.median_filter(a.image, 5)[inside] + 1)))
    assert np.mean(spreads) > 0.15


def test_presets_have_their_own_seeds_and_bad_settings_are_refused():
    seeds = [seed for _, seed in PRESETS.values()]
    assert len(set(seeds)) == len(seeds) and 0 not in seeds
    assert preset_settings(None) == (DemoSettings(), 0)
    with pytest.raises(ValueError, match="unknown demo preset 'hard'.*skull"):
        preset_settings("hard")
    for bad in ({"lesion_contrast": 0}, {"lesion_scale": -1}, {"inhomogeneity": -0.1}, {"meningioma_share": 1.5}):
        with pytest.raises(ValueError):
            DemoSettings(**bad)


def test_cli_demo_data_preset(tmp_path, genseg_cli):
    out = tmp_path / "small"
    genseg_cli("demo-data", out, "--preset", "small", "--patients", 2, "--slices-per-patient", 2, "--size", 32)
    readme = (out / "README.txt").read_text()
    assert "--seed 103 --preset small" in readme
    refused = genseg_cli("demo-data", tmp_path / "x", "--preset", "hard", returncode=2)
    assert "unknown demo preset 'hard'" in refused.stderr and "Traceback" not in refused.stderr
    refused = genseg_cli("demo-data", tmp_path / "y", "--domain", "ultrasound", "--preset", "small", returncode=2)
    assert "--preset does not apply to --domain ultrasound" in refused.stderr


def test_make_demo_dataset_records_the_preset(tmp_path):
    summary = make_demo_dataset(tmp_path / "bias", patients=1, slices_per_patient=1, size=32, preset="bias",
                                progress=False)
    assert (summary["seed"], summary["preset"]) == (104, "bias")
    plain = make_demo_dataset(tmp_path / "plain", patients=1, slices_per_patient=1, size=32, progress=False)
    assert plain["seed"] == 0 and "--preset" not in (tmp_path / "plain" / "README.txt").read_text()
