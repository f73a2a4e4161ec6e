"""The real-anatomy demo data (genseg.data.demo_anatomy): a real head with inserted tumours where each class says
it is, exact masks, deterministic, written in the Figshare layout that `prepare` reads."""

import numpy as np
import pytest
from scipy import ndimage

from genseg.data.demo_anatomy import (LEVELS, _brain, _insert_tumour, _upsample, anatomy_slices, load_head,
                                      make_anatomy_dataset)
from genseg.data.prepare import prepare
from genseg.data.prepared import PreparedDataset


@pytest.fixture(scope="module")
def head():
    return load_head()


def test_the_bundled_head_is_a_brain(head):
    assert head.shape == (2, len(LEVELS), 128, 128)
    middle = head[0, len(LEVELS) // 2]
    brain = _brain(_upsample(middle, 128))
    assert 0.15 < brain.mean() < 0.6  # one head in the frame, not noise and not the whole image
    assert np.percentile(middle[brain], 50) > 10 * np.percentile(middle[~brain], 50)


@pytest.mark.parametrize("label", [1, 2, 3])
def test_each_class_is_painted_where_it_belongs(head, label):
    levels = [_upsample(head[0, 6 + k], 128) for k in range(8)]
    spans = []
    for seed in range(4):
        images, alphas = _insert_tumour(levels, label, np.random.default_rng(seed))
        painted = [k for k, a in enumerate(alphas) if (a >= 0.5).any()]
        assert painted and painted == list(range(painted[0], painted[-1] + 1))  # one tumour, grown and shrunk in 3-D
        spans.append(len(painted))
        k = max(painted, key=lambda i: (alphas[i] >= 0.5).sum())
        mask, brain = alphas[k] >= 0.5, _brain(levels[k])
        outside = (mask & ~brain).sum() / mask.sum()
        if label == 1:  # extra-axial: bulges out of the brain's outline
            assert outside > 0.05
        else:
            assert outside == 0
        if label == 3:  # small, on the midline
            cols = np.flatnonzero(brain.any(0))
            assert abs(ndimage.center_of_mass(mask)[1] - (cols[0] + cols[-1]) / 2) < 0.08 * 128
            assert mask.sum() < 0.01 * 128 * 128
        ring = ndimage.binary_dilation(mask, iterations=4) & ~ndimage.binary_dilation(mask, iterations=1) & brain
        assert np.abs(images[k][mask].mean() - images[k][ring].mean()) > 0.05  # the tumour is visible
        assert np.array_equal(images[k][alphas[k] == 0], levels[k][alphas[k] == 0]) or label == 2  # (oedema)
    assert min(spans) < len(levels)  # tumours end: levels above or below them are tumour-free


def test_slices_are_deterministic_and_masks_follow_the_head():
    first = list(anatomy_slices(patients=3, slices_per_patient=4, size=64, seed=5))
    again = list(anatomy_slices(patients=3, slices_per_patient=4, size=64, seed=5))
    other = list(anatomy_slices(patients=3, slices_per_patient=4, size=64, seed=6))
    assert all(np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask) for a, b in zip(first, again))
    assert not all(np.array_equal(a.image, b.image) for a, b in zip(first, other))
    assert sorted({s.label for s in first}) == [1, 2, 3]
    for s in first:
        assert s.image.dtype == np.int16 and s.image.shape == (64, 64) and set(np.unique(s.mask)) <= {0, 1}
        if s.mask.any():  # the moved mask lies on the moved head's tissue or its edge, not in the background
            head = ndimage.binary_dilation(s.image > 0.2 * np.percentile(s.image, 99), iterations=2)
            assert (s.mask.astype(bool) & ~head).sum() <= 0.05 * s.mask.sum()


def test_dataset_is_figshare_layout_that_prepare_reads(tmp_path):
    summary = make_anatomy_dataset(tmp_path / "raw", patients=3, slices_per_patient=3, size=64, seed=1,
                                   progress=False)
    assert summary["slices"] == 9 and sum(summary["classes"].values()) == 9
    assert sorted(p.name for p in (tmp_path / "raw").iterdir())[:3] == ["1.mat", "2.mat", "3.mat"]
    prepare(tmp_path / "raw", tmp_path / "anatomy.h5", size=32, progress=False)
    data = PreparedDataset(tmp_path / "anatomy.h5")
    assert len(data) == 9 and len(set(data.patients.tolist())) == 3
    with pytest.raises(ValueError, match="slices_per_patient <= 19"):
        next(anatomy_slices(patients=1, slices_per_patient=20))


def test_cli_demo_data_anatomy(tmp_path, genseg_cli):
    out = tmp_path / "anatomy"
    result = genseg_cli("demo-data", out, "--domain", "anatomy", "--patients", 2, "--slices-per-patient", 2,
                        "--size", 32)
    assert "Wrote 4 slices of 2 patients" in result.stdout and (out / "cvind.mat").exists()
    refused = genseg_cli("demo-data", tmp_path / "x", "--domain", "anatomy", "--preset", "small", returncode=2)
    assert "--preset does not apply to --domain anatomy" in refused.stderr and "Traceback" not in refused.stderr
    refused = genseg_cli("demo-data", tmp_path / "y", "--domain", "anatomy", "--slices-per-patient", 25,
                         returncode=2)
    assert "the anatomy head has 19 levels" in refused.stderr
