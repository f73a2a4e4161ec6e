"""Demo data: real MATLAB v7.3 files in the Figshare layout, masks and border polygons that agree, patient-wise
folds, determinism, and the `genseg demo-data` command run as a user would."""

import json
from collections import defaultdict

import h5py
import numpy as np
import pytest
import scipy.io
from PIL import Image, ImageDraw

import genseg.data.demo as demo
from genseg.data.demo import border_polygon, demo_slices, make_demo_dataset
from genseg.data.figshare import read_cvind, read_figshare_mat
from genseg.errors import DataError

FIELDS = {"label": b"double", "PID": b"char", "image": b"int16", "tumorMask": b"logical", "tumorBorder": b"double"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "raw"
    summary = make_demo_dataset(out, patients=6, slices_per_patient=5, size=64, seed=3, empty_share=0.2,
                                progress=False)
    return out, summary, [read_slice(out / f"{i}.mat") for i in range(1, summary["slices"] + 1)]


def read_slice(path):
    """Read one file through the dataset reader; the border polygon (which it does not return) with h5py."""
    record = read_figshare_mat(path)
    with h5py.File(path, "r") as f:
        border = f["cjdata/tumorBorder"]
        empty = border.attrs.get("MATLAB_empty", 0)  # MATLAB stores an empty array's shape as its data
        return {"image": record.image, "mask": record.mask, "label": record.label, "pid": record.patient,
                "raw_image": f["cjdata/image"][()], "border": np.zeros(0) if empty else border[()].ravel()}


def test_files_are_matlab_v73_with_the_figshare_struct(dataset):
    out, summary, _ = dataset
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"{i}.mat" for i in range(1, summary["slices"] + 1)] + ["cvind.mat", "README.txt"])
    for name in ("1.mat", "cvind.mat"):
        head = (out / name).read_bytes()[:520]
        assert head.startswith(b"MATLAB 7.3 MAT-file")
        assert head[512:520] == b"\x89HDF\r\n\x1a\n"  # a 512-byte MATLAB header, then HDF5
        with pytest.raises(NotImplementedError):
            scipy.io.loadmat(out / name)
    with h5py.File(out / "1.mat", "r") as f:
        assert f["cjdata"].attrs["MATLAB_class"] == b"struct"
        assert set(f["cjdata"]) == set(FIELDS)
        for field, matlab_class in FIELDS.items():
            assert f["cjdata"][field].attrs["MATLAB_class"] == matlab_class, field
        assert f["cjdata/image"].dtype == np.int16 and f["cjdata/tumorMask"].dtype == np.uint8


def test_slices_look_like_the_real_dataset(dataset):
    _, summary, slices = dataset
    for s in slices:
        assert s["image"].shape == s["mask"].shape == s["raw_image"].T.shape == (64, 64)
        assert np.array_equal(s["image"], s["raw_image"].T)  # the reader transposed MATLAB's column-major array
        assert s["raw_image"].dtype == np.int16 and s["image"].min() >= 0
        assert 300 < s["image"].max() < 4000  # scanner units, not 0..255 or 0..1
        assert set(np.unique(s["mask"])) <= {0, 1}
    labels = [s["label"] for s in slices]
    assert set(labels) == {1, 2, 3}
    assert summary["classes"] == {"meningioma": labels.count(1), "glioma": labels.count(2),
                                  "pituitary": labels.count(3)}
    empty = [s for s in slices if not s["mask"].any()]
    assert len(empty) == summary["empty_slices"] == round(0.2 * len(slices))
    assert all(s["border"].size == 0 for s in empty)
    label_of = defaultdict(set)
    for s in slices:
        label_of[s["pid"]].add(s["label"])
    assert len(label_of) == 6 and all(len(v) == 1 for v in label_of.values())  # empty slices keep the label


def test_tumour_is_enhancing_and_visible(dataset):
    """The enhancing part of every lesion is brighter than most of the brain around it."""
    for s in (s for s in dataset[2] if s["mask"].sum() >= 12):
        image, mask = s["image"].astype(float), s["mask"].astype(bool)
        head = image > 0.3 * np.percentile(image, 99)
        assert np.percentile(image[mask], 90) > np.percentile(image[head & ~mask], 75), s["label"]


def test_border_polygon_lies_on_the_transposed_mask(dataset):
    wrong_orientation_detected = False
    for s in (s for s in dataset[2] if s["mask"].any()):
        x, y = s["border"][0::2].astype(int), s["border"][1::2].astype(int)
        assert x.min() >= 1 and y.min() >= 1  # MATLAB's 1-based coordinates
        assert s["mask"][y - 1, x - 1].all()
        wrong_orientation_detected |= not s["mask"].T[y - 1, x - 1].all()
        filled = Image.new("1", s["mask"].shape[::-1])
        ImageDraw.Draw(filled).polygon(list(zip(x - 1, y - 1)), fill=1, outline=1)
        filled = np.array(filled)
        assert (filled & s["mask"].astype(bool)).sum() / (filled | s["mask"].astype(bool)).sum() > 0.9
    assert wrong_orientation_detected  # the check above would catch a missing transpose


def test_border_polygon_keeps_the_corners_of_the_outline():
    mask = np.zeros((6, 7), dtype=np.uint8)
    mask[1:5, 2:4] = 1
    mask[3:5, 4:6] = 1  # an L shape
    # 8-connected trace through pixel centres (as MATLAB's bwboundaries), clockwise from the top-left pixel:
    # the inner corner is cut diagonally from (4, 3) to (5, 4); straight runs keep only their ends.
    xy = border_polygon(mask).reshape(-1, 2)
    assert xy.astype(int).tolist() == [[3, 2], [4, 2], [4, 3], [5, 4], [6, 4], [6, 5], [3, 5]]
    assert border_polygon(np.zeros((4, 4))).size == 0
    single = np.zeros((4, 4))
    single[2, 1] = 1
    assert border_polygon(single).tolist() == [2.0, 3.0]


def test_folds_are_patient_wise(dataset):
    out, summary, slices = dataset
    folds = read_cvind(out / "cvind.mat")
    assert folds.shape == (summary["slices"],) and set(folds) <= {1, 2, 3, 4, 5}
    fold_of = defaultdict(set)
    for s, fold in zip(slices, folds):
        fold_of[s["pid"]].add(fold)
    assert all(len(f) == 1 for f in fold_of.values())
    assert len(set(folds)) == 5


def test_slices_of_a_patient_are_consecutive_levels_through_one_tumour():
    slices = list(demo_slices(patients=3, slices_per_patient=6, size=48, seed=5, empty_share=0.3))
    for p in range(3):
        masks = [s.mask.astype(bool) for s in slices[6 * p:6 * p + 6]]
        present = [m.any() for m in masks]
        first, last = present.index(True), len(present) - present[::-1].index(True)
        assert all(present[first:last])  # empty slices only above or below the tumour
        for a, b in zip(masks[first:last - 1], masks[first + 1:last]):
            assert (a & b).any()  # neighbouring levels cut the same lesion


def test_same_arguments_same_pixels_other_seed_other_pixels():
    def run(seed):
        return [(s.image, s.mask, s.label, s.patient) for s in demo_slices(3, 2, 48, seed)]

    first, again, other = run(7), run(7), run(8)
    for (i1, m1, l1, p1), (i2, m2, l2, p2) in zip(first, again):
        assert np.array_equal(i1, i2) and np.array_equal(m1, m2) and (l1, p1) == (l2, p2)
    assert not any(np.array_equal(a[0], b[0]) for a, b in zip(first, other))


@pytest.mark.parametrize("size", [32, 128])
def test_other_sizes(size):
    slices = list(demo_slices(patients=3, slices_per_patient=1, size=size, seed=2, empty_share=0.0))
    for s in slices:
        assert s.image.shape == s.mask.shape == (size, size)
        assert s.mask.any() and not s.mask[[0, -1]].any() and not s.mask[:, [0, -1]].any()
        assert border_polygon(s.mask).size >= 2


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="empty_share"):
        next(demo_slices(empty_share=1.0))
    with pytest.raises(ValueError, match="patients"):
        next(demo_slices(patients=0))


def test_refuses_a_non_empty_folder_and_force_replaces_it(tmp_path):
    out = tmp_path / "raw"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty") as info:
        make_demo_dataset(out, patients=1, slices_per_patient=1, size=32, progress=False)
    assert str(out) in str(info.value) and (out / "notes.txt").read_text() == "mine"
    make_demo_dataset(out, patients=1, slices_per_patient=2, size=32, force=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["1.mat", "2.mat", "README.txt", "cvind.mat"]


def test_an_interrupted_run_leaves_no_dataset(tmp_path, monkeypatch):
    real_write = demo.write_figshare_mat
    calls = []

    def write_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_write(*args, **kwargs)

    monkeypatch.setattr(demo, "write_figshare_mat", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        make_demo_dataset(tmp_path / "raw", patients=2, slices_per_patient=2, size=32, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_demo_data_then_prepare_then_info(tmp_path, genseg_cli):
    """The README path: the demo folder goes through the real reader, `prepare` and `data info` like Figshare."""
    raw, prepared = tmp_path / "raw", tmp_path / "demo.h5"
    make = ["demo-data", raw, "--patients", 4, "--slices-per-patient", 3, "--size", 64, "--empty-share", 0.25]
    assert "Wrote 12 slices of 4 patients (64x64)" in genseg_cli(*make).stdout
    refused = genseg_cli(*make, returncode=2)  # a second run must not overwrite the dataset
    assert "not empty" in refused.stderr and "Traceback" not in refused.stderr
    help_text = genseg_cli("demo-data", "--help").stdout
    for option in ("--patients", "--slices-per-patient", "--size", "--seed", "--empty-share", "--force"):
        assert option in help_text
    genseg_cli("prepare", raw, "--out", prepared, "--size", 48)
    # 4 patients get classes 1, 2, 3 and one more: 3 slices each; 0.25 of 12 slices miss the tumour.
    expected_classes = [{"meningioma": 6, "glioma": 3, "pituitary": 3}, {"meningioma": 3, "glioma": 6, "pituitary": 3},
                        {"meningioma": 3, "glioma": 3, "pituitary": 6}]
    for path in (raw, prepared):
        info = json.loads(genseg_cli("data", "info", path, "--json").stdout)
        assert info["source_format"] == "figshare" and info["bad_files"] == []
        assert (info["slices"], info["patients"]) == (12, 4)
        assert info["classes"] in expected_classes
        assert info["tumour_free_share"] == pytest.approx(3 / 12)
        assert sum(info["splits"].values()) == 12
        assert "cvind" in info["folds_from"]
    assert info["size"] == 48 and info["kind"] == "prepared"
