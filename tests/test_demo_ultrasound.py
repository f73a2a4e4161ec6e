"""Ultrasound demo domain: BUSI layout read by the real folder reader, the ultrasound cues (hypoechoic lesions,
shapes, posterior enhancement vs shadowing), determinism, safe writes, and `genseg demo-data --domain ultrasound`
-> `prepare` -> `data info` run as a user would."""

import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

import genseg.data.demo_ultrasound as us
from genseg.data.demo_ultrasound import make_ultrasound_dataset, ultrasound_cases
from genseg.data.folders import find_busi_pairs, find_layout_root, read_image_pair
from genseg.errors import DataError


@pytest.fixture(scope="module")
def lesion_cases():
    return [c for c in ultrasound_cases(cases=24, size=80, seed=5) if c.label]


def test_folder_is_busi_and_reads_back(tmp_path):
    out = tmp_path / "us"
    summary = make_ultrasound_dataset(out, cases=8, size=64, seed=1, progress=False)
    assert summary["classes"] == {"benign": 3, "malignant": 3, "normal": 2}
    assert find_layout_root(out) == ("busi", out)
    pairs = find_busi_pairs(out)
    assert len(pairs) == 8 and all(len(p.masks) == 1 for p in pairs)
    counts = {}
    for pair in pairs:
        name = pair.image.parent.name
        counts[name] = counts.get(name, 0) + 1
        assert pair.image.name == f"{name} ({counts[name]}).png"
        assert pair.masks[0].name == f"{name} ({counts[name]})_mask.png"
        png, mask_png = Image.open(pair.image), Image.open(pair.masks[0])
        assert png.mode == mask_png.mode == "L" and png.size == (64, 64)
        assert set(np.unique(np.asarray(mask_png))) <= {0, 255}
        record = read_image_pair(pair)
        assert record.image.shape == record.mask.shape == (64, 64)
        assert set(np.unique(record.mask)) <= {0, 1}
        assert record.mask.any() == (name != "normal"), pair.image  # normal images have empty masks
        assert record.image.max() > 150 and (record.image == 0).any()  # bright echoes, black outside the view
    assert counts == summary["classes"]
    assert "NOT patient data" in (out / "README.txt").read_text()


def test_lesions_are_darker_than_the_tissue_around_them(lesion_cases):
    for c in lesion_cases:
        mask = c.mask.astype(bool)
        ring = ndimage.binary_dilation(mask, iterations=4) & ~mask & c.field_of_view
        assert c.image[mask].mean() < c.image[ring].mean() - 10, c.label
        assert not (mask & ~c.field_of_view).any()


def test_benign_wider_than_tall_malignant_taller(lesion_cases):
    def width_over_height(mask):
        return np.ptp(np.flatnonzero(mask.any(axis=0))) / np.ptp(np.flatnonzero(mask.any(axis=1)))

    benign = [width_over_height(c.mask) for c in lesion_cases if c.label == 1]
    malignant = [width_over_height(c.mask) for c in lesion_cases if c.label == 2]
    assert len(benign) >= 4 and len(malignant) >= 4
    assert min(benign) > 1.15 and np.mean(malignant) < 0.95


def test_malignant_shadows_and_benign_enhances_behind_the_lesion(lesion_cases):
    """Mean grey in the band behind the lesion's middle vs the same depths beside the lesion."""
    ratios = {1: [], 2: []}
    for c in lesion_cases:
        mask = c.mask.astype(bool)
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        top, bottom = rows[-1] + 2, rows[-1] + 2 + (rows[-1] - rows[0])
        width = cols[-1] - cols[0]
        behind, beside = np.zeros_like(mask), np.zeros_like(mask)
        behind[top:bottom, cols[0] + width // 4:cols[-1] - width // 4 + 1] = True
        beside[top:bottom, max(cols[0] - width, 0):cols[0] - 2] = True
        beside[top:bottom, cols[-1] + 3:cols[-1] + width + 1] = True
        ratios[c.label].append(c.image[behind & c.field_of_view].mean() / c.image[beside & c.field_of_view].mean())
    assert max(ratios[2]) < 0.85  # posterior acoustic shadow behind every malignant lesion
    assert min(ratios[1]) > 0.9 and np.mean(ratios[1]) > 1.05  # benign: none or posterior enhancement


def test_same_seed_same_pixels_other_seed_other_pixels():
    def run(seed):
        return [(c.image, c.mask, c.label) for c in ultrasound_cases(cases=4, size=48, seed=seed)]

    first, again, other = run(3), run(3), run(4)
    for (i1, m1, l1), (i2, m2, l2) in zip(first, again):
        assert np.array_equal(i1, i2) and np.array_equal(m1, m2) and l1 == l2
    assert not any(np.array_equal(a[0], b[0]) for a, b in zip(first, other))


@pytest.mark.parametrize("size", [32, 160])
def test_other_sizes(size):
    for c in ultrasound_cases(cases=3, size=size, seed=2):
        assert c.image.shape == c.mask.shape == c.field_of_view.shape == (size, size)
        assert c.image.dtype == np.uint8 and (c.image[~c.field_of_view] == 0).mean() > 0.97  # black but depth ticks
        assert c.mask.any() == (c.label != 0)
    with pytest.raises(ValueError, match="cases"):
        next(ultrasound_cases(cases=0))


def test_refuses_a_non_empty_folder_and_an_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "us"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        make_ultrasound_dataset(out, cases=2, size=32, progress=False)
    assert (out / "notes.txt").read_text() == "mine"
    make_ultrasound_dataset(out, cases=3, size=32, force=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", "benign", "malignant", "normal"]

    def interrupted(*args):
        yield next(iter(ultrasound_cases(1, 32)))
        raise KeyboardInterrupt

    monkeypatch.setattr(us, "ultrasound_cases", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make_ultrasound_dataset(tmp_path / "other", cases=3, size=32, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["us"]


def test_cli_demo_data_ultrasound_then_prepare_then_info(tmp_path, genseg_cli):
    raw, prepared = tmp_path / "us", tmp_path / "us.h5"
    made = genseg_cli("demo-data", raw, "--domain", "ultrasound", "--patients", 7, "--size", 64, "--seed", 3)
    assert "Wrote 7 ultrasound images (64x64)" in made.stdout and "benign 3, malignant 2, normal 2" in made.stdout
    genseg_cli("prepare", raw, "--out", prepared, "--size", 48, "--format", "folder")
    info = json.loads(genseg_cli("data", "info", prepared, "--json").stdout)
    assert info["source_format"] == "busi" and info["kind"] == "prepared" and info["bad_files"] == []
    assert (info["slices"], info["patients"], info["size"]) == (7, 7, 48)
    assert info["classes"] == {"normal": 2, "benign": 3, "malignant": 2}
    assert info["tumour_free_share"] == pytest.approx(2 / 7)


def test_cli_refuses_mri_only_options_for_ultrasound(tmp_path):
    from click.testing import CliRunner

    from genseg.cli import main

    for option in (["--empty-share", "0.2"], ["--slices-per-patient", "3"]):
        done = CliRunner().invoke(main, ["demo-data", str(tmp_path / "us"), "--domain", "ultrasound", *option])
        assert done.exit_code == 2 and f"{option[0]} does not apply to --domain ultrasound" in done.output
    assert not (tmp_path / "us").exists()
    assert "--domain [mri|anatomy|ultrasound]" in CliRunner().invoke(main, ["demo-data", "--help"]).output


@pytest.mark.parametrize("defocus", [0.0, 1.0])
def test_speckle_is_rayleigh_and_multiplicative(defocus):
    """Fully developed speckle: mean/std of the envelope is sqrt(pi / (4 - pi)) = 1.91 at any echo level, and
    the mean scales with the amplitude (sqrt of the reflectivity)."""
    rng = np.random.default_rng(0)
    dim = us.speckle(rng, np.full((256, 256), 0.25), (1.0, 2.0), defocus)
    bright = us.speckle(rng, np.full((256, 256), 1.0), (1.0, 2.0), defocus)
    for envelope in (dim, bright):
        assert envelope.mean() / envelope.std() == pytest.approx(np.sqrt(np.pi / (4 - np.pi)), rel=0.05)
    assert bright.mean() / dim.mean() == pytest.approx(2.0, rel=0.05)
