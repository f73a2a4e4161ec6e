"""prepare -> prepared file -> Dataset round trips, splits, bad-file handling, data info, and the CLI end to end."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from genseg.data.info import dataset_info, format_info
from genseg.data.prepare import prepare
from genseg.data.prepared import PreparedDataset, read_metadata
from genseg.errors import DataError

REPO = Path(__file__).resolve().parents[1]


def _add_bad_files(folder: Path) -> None:
    (folder / "98.mat").write_text("not a mat file")
    good = (folder / "1.mat").read_bytes()
    (folder / "99.mat").write_bytes(good[: len(good) // 3])


def test_figshare_round_trip_with_cvind(tmp_path, make_figshare):
    labels = make_figshare(tmp_path / "raw", sizes=(512, 256) + (48,) * 8)
    report = prepare(tmp_path / "raw", tmp_path / "d.h5", size=32, progress=False)
    assert (report.slices, report.files_read, report.bad_files, report.folds_from) == (10, 10, [], "cvind.mat")
    meta = read_metadata(tmp_path / "d.h5")
    assert [Path(s).name for s in meta["sources"]] == [f"{i}.mat" for i in range(1, 11)]
    assert meta["labels"].tolist() == labels
    assert meta["fold"].tolist() == [1 + (i // 2) % 5 for i in range(10)]  # straight from cvind.mat
    assert meta["attrs"]["source_format"] == "figshare" and meta["attrs"]["modality"] == "t1ce"
    ds = PreparedDataset(tmp_path / "d.h5")
    for i in (0, 1, 5):
        item = ds[i]
        assert item["image"].shape == (1, 32, 32) and item["image"].dtype == torch.float32
        assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
        assert item["mask"].shape == (1, 32, 32) and item["mask"].sum() > 0 and item["label"] == labels[i]
    with h5py.File(tmp_path / "d.h5") as h5:
        assert h5["images"].dtype == np.float16 and h5["masks"].dtype == np.uint8
    assert sum(report.splits.values()) == 10 and report.classes == {"meningioma": 4, "glioma": 3, "pituitary": 3}


def test_patient_wise_split_and_seed(tmp_path, make_figshare):
    make_figshare(tmp_path / "raw", sizes=(16,) * 30, cvind=False)
    prepare(tmp_path / "raw", tmp_path / "a.h5", size=16, seed=4, progress=False)
    meta = read_metadata(tmp_path / "a.h5")
    splits_of = {}
    for patient, split in zip(meta["patients"], meta["split"]):
        splits_of.setdefault(patient, set()).add(split)
    assert all(len(s) == 1 for s in splits_of.values()) and len(splits_of) == 15
    assert set(meta["split"]) == {"train", "val", "test"}
    prepare(tmp_path / "raw", tmp_path / "b.h5", size=16, seed=4, progress=False)
    prepare(tmp_path / "raw", tmp_path / "c.h5", size=16, seed=5, progress=False)
    assert read_metadata(tmp_path / "b.h5")["fold"].tolist() == meta["fold"].tolist()
    assert read_metadata(tmp_path / "c.h5")["fold"].tolist() != meta["fold"].tolist()


def test_bad_files_skipped_reported_and_strict(tmp_path, make_figshare):
    make_figshare(tmp_path / "raw", sizes=(24,) * 6)
    _add_bad_files(tmp_path / "raw")
    report = prepare(tmp_path / "raw", tmp_path / "d.h5", size=24, progress=False)
    assert report.slices == 6 and sorted(Path(b["path"]).name for b in report.bad_files) == ["98.mat", "99.mat"]
    assert "skipped 2 bad file(s)" in report.summary() and "98.mat: not a MATLAB .mat file" in report.summary()
    stored = read_metadata(tmp_path / "d.h5")["attrs"]["bad_files"]
    assert [Path(b["path"]).name for b in stored] == ["98.mat", "99.mat"]
    info = dataset_info(tmp_path / "raw")
    assert (info["slices"], info["files_read"], len(info["bad_files"])) == (6, 6, 2)

    out = tmp_path / "strict" / "d.h5"
    with pytest.raises(DataError, match="98.mat: not a MATLAB"):
        prepare(tmp_path / "raw", out, size=24, strict=True, progress=False)
    assert not out.exists() and list(out.parent.iterdir()) == []  # no half-written output, no temporary left


def test_workers_give_the_same_file(tmp_path, make_figshare):
    make_figshare(tmp_path / "raw", sizes=(40,) * 9)
    _add_bad_files(tmp_path / "raw")
    one = prepare(tmp_path / "raw", tmp_path / "w1.h5", size=24, workers=1, progress=False)
    two = prepare(tmp_path / "raw", tmp_path / "w2.h5", size=24, workers=2, progress=False)
    assert one.bad_files == two.bad_files and one.slices == two.slices == 9
    with h5py.File(tmp_path / "w1.h5") as a, h5py.File(tmp_path / "w2.h5") as b:
        for key in ("images", "masks", "labels", "patients", "sources", "fold", "split"):
            assert np.array_equal(a[key][()], b[key][()]), key


def test_cvind_that_does_not_fit_falls_back_to_patient_folds(tmp_path, make_figshare):
    make_figshare(tmp_path / "raw", sizes=(16,) * 4)
    (tmp_path / "raw" / "cvind.mat").write_text("broken")
    report = prepare(tmp_path / "raw", tmp_path / "d.h5", size=16, progress=False)
    assert report.folds_from == "patient-wise, seed 0" and report.slices == 4
    assert "cvind.mat" in report.bad_files[0]["path"] and "patient-wise" in report.bad_files[0]["reason"]


def test_folder_problems(tmp_path, make_figshare):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty.*folder is empty"):
        prepare(tmp_path / "empty", tmp_path / "x.h5", progress=False)
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="cannot tell the dataset format"):
        prepare(tmp_path / "odd", tmp_path / "x.h5", progress=False)
    with pytest.raises(DataError, match="folder not found"):
        dataset_info(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "1.mat").write_text("junk")
    with pytest.raises(DataError, match="no readable slices: all 1 file"):
        prepare(tmp_path / "bad", tmp_path / "x.h5", progress=False)
    assert not (tmp_path / "x.h5").exists()


def test_brats_prepare_and_info(tmp_path, make_brats_case):
    make_brats_case(tmp_path / "brats", "BraTS20_Training_001")
    make_brats_case(tmp_path / "brats", "BraTS20_Training_002")
    make_brats_case(tmp_path / "brats", "BraTS20_Validation_001", seg=False)
    report = prepare(tmp_path / "brats", tmp_path / "b.h5", size=32, modality="flair", empty_fraction=1.0,
                     progress=False)
    assert report.source_format == "brats" and report.slices == 16 and len(report.bad_files) == 1
    assert "BraTS20_Validation_001 has no seg volume" in report.bad_files[0]["reason"]
    with h5py.File(tmp_path / "b.h5") as h5:
        assert h5["slice_index"][:8].tolist() == list(range(2, 10)) and h5.attrs["modality"] == "flair"
    info = dataset_info(tmp_path / "b.h5")
    assert info["classes"] == {"none": 10, "glioma": 6} and info["patients"] == 2
    assert info["tumour_free_share"] == pytest.approx(10 / 16)


def test_brats_mixed_releases_prepare_and_info(tmp_path, make_brats_case, genseg_cli):
    """2020 and 2023 cases in one folder: a case without the modality is listed and skipped, the others kept."""
    data = tmp_path / "brats"
    make_brats_case(data, "BraTS20_Training_001")
    make_brats_case(data, "BraTS-GLI-00000-000", ("t1n", "t1c", "t2w", "t2f"), seg_labels=(1, 2, 3), names="2023")
    make_brats_case(data, "BraTS-GLI-00001-000", ("t1n", "t2w"), seg_labels=(1, 2, 3), names="2023")
    report = prepare(data, tmp_path / "et.h5", size=32, modality="flair", target="et", empty_fraction=0.0,
                     progress=False)
    assert report.slices == 2 and [Path(b["path"]).name for b in report.bad_files] == ["BraTS-GLI-00001-000-t2f.nii.gz"]
    assert "BraTS-GLI-00001-000 has no t2f volume" in report.bad_files[0]["reason"]
    metadata = read_metadata(tmp_path / "et.h5")["attrs"]["metadata"]
    assert metadata["target"] == "et"
    assert metadata["naming"] == {"BraTS 2023 (t1n/t1c/t2w/t2f), enhancing = 3": 2,
                                  "BraTS 2020 (t1/t1ce/t2/flair), enhancing = 4": 1}
    done = genseg_cli("data", "info", data, "--modality", "t2f", "--target", "tc")
    assert re.search(r"^naming\s+BraTS 2023 \(t1n/t1c/t2w/t2f\), enhancing = 3: 2 case\(s\)$", done.stdout, re.M)
    assert re.search(r"^\s+BraTS 2020 \(t1/t1ce/t2/flair\), enhancing = 4: 1 case\(s\)$", done.stdout, re.M)
    # tumour core: slices 4 and 6 of each readable case, plus one of its six tumour-free brain slices
    assert re.search(r"^slices\s+6$", done.stdout, re.M) and "BraTS-GLI-00001-000 has no t2f volume" in done.stdout
    assert dataset_info(tmp_path / "et.h5")["naming"] == metadata["naming"]


def test_dicom_series_labelled_by_dicom_seg(tmp_path):
    """A series with the DICOM-SEG that `segment --dicom-seg` writes (highdicom) is a training case, from a folder
    or a zip; a series nobody segmented, a structured report and a stray SEG are listed as bad files."""
    import shutil
    import zipfile

    from pydicom.data import get_testdata_file

    from conftest import write_dicom_series
    from genseg.data.dicom import find_members, read_headers, write_segmentation
    from seg_helpers import phantom

    rng = np.random.default_rng(3)
    pairs = [phantom(rng, 64, t) for t in (True, True, False, True, False, False)]
    images = np.stack([(1000 * image + 200).astype(np.int16) for image, _ in pairs])
    masks = np.stack([mask for _, mask in pairs])
    exam = tmp_path / "exam"
    write_dicom_series(exam / "t1", images, "T1 AX POST")
    series, = read_headers(find_members(exam / "t1"), 2**28).series
    write_segmentation(series, masks, exam / "t1_seg.dcm")
    write_dicom_series(exam / "flair", images[::-1], "FLAIR AX", seed=1)
    write_dicom_series(tmp_path / "elsewhere", images[:2], "PD", seed=2)
    other, = read_headers(find_members(tmp_path / "elsewhere"), 2**28).series
    write_segmentation(other, masks[:2], exam / "stray_seg.dcm")
    shutil.copy(get_testdata_file("reportsi.dcm"), exam / "report.dcm")

    report = prepare(exam, tmp_path / "d.h5", size=64, empty_fraction=1.0, progress=False)
    assert report.source_format == "dicom" and report.slices == 6 and report.files_read == 1
    reasons = {Path(bad["path"]).relative_to(exam).parts[0]: bad["reason"] for bad in report.bad_files}
    assert "series FLAIR_AX needs exactly one DICOM Segmentation referencing it for training, found 0" in \
        reasons["flair"]
    assert reasons["report.dcm"] == "has no pixel data: not an image (Basic Text SR Storage)"
    assert reasons["stray_seg.dcm"] == "DICOM Segmentation references no image series found here"
    with h5py.File(tmp_path / "d.h5") as h5:
        assert np.array_equal(h5["masks"][:], masks) and h5["slice_index"][:].tolist() == list(range(6))
        assert h5.attrs["modality"] == "MR"
    info = dataset_info(tmp_path / "d.h5")
    assert info["classes"] == {"unknown": 3, "none": 3} and info["patients"] == 1

    with zipfile.ZipFile(tmp_path / "exam.zip", "w") as archive:
        for path in sorted(exam.rglob("*")):
            archive.write(path, path.relative_to(exam))
    raw = dataset_info(tmp_path / "exam.zip", empty_fraction=0.0)
    assert (raw["kind"], raw["source_format"], raw["slices"], len(raw["bad_files"])) == ("raw", "dicom", 3, 3)


def test_busi_prepare_info_and_class_names(tmp_path, make_busi):
    make_busi(tmp_path / "busi" / "Dataset_BUSI_with_GT")
    report = prepare(tmp_path / "busi", tmp_path / "u.h5", size=16, progress=False)
    assert report.source_format == "busi" and report.slices == 3
    info = dataset_info(tmp_path / "u.h5")
    assert info["classes"] == {"normal": 1, "benign": 1, "malignant": 1}
    assert info["modality"] == "ultrasound" and info["channels"] == 1
    raw = dataset_info(tmp_path / "busi")
    assert raw["image_sizes"] == {"32x40": 3} and raw["tumour_free_share"] == pytest.approx(1 / 3)
    table = format_info(info)
    assert re.search(r"^  malignant\s+1$", table, re.M) and re.search(r"^bad files\s+0$", table, re.M)
    colour = prepare(tmp_path / "busi", tmp_path / "c.h5", size=16, channels=3, progress=False)
    assert PreparedDataset(colour.out)[0]["image"].shape == (3, 16, 16)


def _genseg(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "genseg", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_cli_prepare_and_info_end_to_end(tmp_path, make_figshare):
    make_figshare(tmp_path / "raw", sizes=(64,) * 6)
    (tmp_path / "raw" / "7.mat").write_text("broken")
    done = _genseg("prepare", "raw", "--out", "data/d.h5", "--size", "32", "--workers", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "wrote 6 slices" in done.stdout and "skipped 1 bad file(s)" in done.stdout and "7.mat" in done.stdout
    done = _genseg("data", "info", "data/d.h5", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert (info["slices"], info["patients"], info["kind"]) == (6, 3, "prepared")
    assert info["classes"] == {"meningioma": 2, "glioma": 2, "pituitary": 2}
    assert [Path(b["path"]).name for b in info["bad_files"]] == ["7.mat"]
    done = _genseg("prepare", "raw", "--out", "strict.h5", "--strict", cwd=tmp_path)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and last.startswith("Error: ") and "7.mat: not a MATLAB" in last
    assert "Traceback" not in done.stderr and not (tmp_path / "strict.h5").exists()
