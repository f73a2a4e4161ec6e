"""Readers on real file layouts: Figshare v7.3 / v5 .mat, cvind.mat, BraTS NIfTI, BUSI and image+mask folders."""

import h5py
import nibabel as nib
import hdf5storage
import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import matlab_border, polygon_slice, save_png, tumour_polygon, write_v5_slice
from genseg.cli import MODALITY_CHOICES
from genseg.data.brats import MODALITIES, case_naming, find_brats_cases, read_brats_case
from genseg.data.figshare import (find_figshare_files, read_cvind, read_figshare_mat, write_cvind_mat,
                                  write_figshare_mat)
from genseg.data.folders import find_busi_pairs, find_folder_pairs, read_image_pair
from genseg.errors import DataError


def _inside_border(border: np.ndarray, shape) -> np.ndarray:
    """Pixels on or inside the polygon given as MATLAB's 1-based x, y pairs (x = column, y = row)."""
    xy = border.reshape(-1, 2) - 1
    canvas = Image.new("L", (shape[1], shape[0]), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in xy], fill=1, outline=1)
    return np.asarray(canvas, dtype=bool)


@pytest.mark.parametrize("size", [512, 256])
def test_v73_transpose_matches_border_polygon(tmp_path, make_figshare, size):
    make_figshare(tmp_path, sizes=(size,), cvind=False)
    path = tmp_path / "1.mat"
    record = read_figshare_mat(path)
    with h5py.File(path, "r") as f:  # the stored layout really is MATLAB's: h5py sees the transpose
        assert f["cjdata/image"].shape == (size, size) and f["cjdata/PID"].dtype == np.uint16
        border = f["cjdata/tumorBorder"][()].ravel()
    inside = _inside_border(border, (size, size))
    mask = record.mask.astype(bool)
    assert record.image.shape == (size, size) and record.image.dtype == np.float32
    assert mask.sum() > 50 and not (mask & ~inside).any()  # every tumour pixel on/inside the border
    assert (mask.T & ~inside).any()  # an untransposed read would fail the same check
    assert record.image[mask].mean() > record.image[~mask].mean() + 500  # the image lines up with the mask
    assert (record.label, record.patient, record.source) == (1, "P0", str(path))


def test_v5_reads_like_v73(tmp_path):
    polygon = tumour_polygon(64)
    image, mask = polygon_slice(64, polygon)
    write_figshare_mat(tmp_path / "a.mat", image, mask, 3, "PID-7", matlab_border(polygon))
    write_v5_slice(tmp_path / "b.mat", image, mask, label=3, pid="PID-7", border=matlab_border(polygon))
    with open(tmp_path / "b.mat", "rb") as f:
        assert f.read(10) == b"MATLAB 5.0"
    v73, v5 = read_figshare_mat(tmp_path / "a.mat"), read_figshare_mat(tmp_path / "b.mat")
    assert np.array_equal(v73.image, v5.image) and np.array_equal(v73.mask, v5.mask)
    assert (v5.label, v5.patient, v5.mask.dtype) == (3, "PID-7", np.uint8)
    assert not (v5.mask.astype(bool) & ~_inside_border(matlab_border(polygon), (64, 64))).any()


def test_cvind_and_file_order(tmp_path, make_figshare):
    make_figshare(tmp_path, sizes=(16,) * 11)
    (tmp_path / "._3.mat").write_bytes(b"macOS fork")
    files = find_figshare_files(tmp_path)
    assert [p.name for p in files] == [f"{i}.mat" for i in range(1, 12)]  # numeric, not 1, 10, 11, 2
    assert read_cvind(tmp_path / "cvind.mat").tolist() == [1 + (i // 2) % 5 for i in range(11)]
    write_cvind_mat(tmp_path / "column.mat", np.array([[3], [1], [2]]))
    assert read_cvind(tmp_path / "column.mat").tolist() == [3, 1, 2]


def _bad_figshare(kind: str, path):
    polygon = tumour_polygon(32)
    image, mask = polygon_slice(32, polygon)
    if kind == "truncated":
        write_figshare_mat(path, image, mask, 1, "p")
        path.write_bytes(path.read_bytes()[:3000])
    elif kind == "not a mat":
        path.write_text("this is a text file\n")
    elif kind == "no cjdata":
        hdf5storage.savemat(str(path), {"other": np.ones((2, 2))}, format="7.3", matlab_compatible=True)
    elif kind == "missing field":
        hdf5storage.savemat(str(path), {"cjdata": {"label": np.array([[1.0]]), "PID": np.str_("p"),
                                                   "image": image}}, format="7.3", matlab_compatible=True)
    elif kind == "shape mismatch":
        write_figshare_mat(path, image, mask[:16], 1, "p")
    elif kind == "nan":
        write_v5_slice(path, np.where(mask > 0, np.nan, image.astype(float)), mask)
    elif kind == "constant":
        write_figshare_mat(path, np.zeros_like(image), mask, 1, "p")
    elif kind == "label":
        write_figshare_mat(path, image, mask, 7, "p")
    elif kind == "empty pid":
        write_v5_slice(path, image, mask, pid="")
    elif kind == "v5 truncated":
        write_v5_slice(path, image, mask)
        path.write_bytes(path.read_bytes()[:400])


BAD_FIGSHARE = {"truncated": "truncated", "not a mat": "not a MATLAB .mat file", "no cjdata": "no 'cjdata'",
                "missing field": "lacks field.*tumorMask", "shape mismatch": r"\(32, 32\) and mask shape \(16, 32\)",
                "nan": "NaN", "constant": "constant", "label": r"label is not one of 1 \(meningioma\).* \(it is 7\)",
                "empty pid": "PID is empty", "v5 truncated": "unreadable MATLAB v5"}


@pytest.mark.parametrize("kind", BAD_FIGSHARE)
def test_bad_figshare_file_names_file_and_problem(tmp_path, kind):
    path = tmp_path / "42.mat"
    _bad_figshare(kind, path)
    with pytest.raises(DataError, match=BAD_FIGSHARE[kind]) as info:
        read_figshare_mat(path)
    assert info.value.path == str(path) and str(info.value).startswith(str(path))


def test_bad_cvind(tmp_path):
    write_cvind_mat(tmp_path / "cvind.mat", [1, 0, 2])
    with pytest.raises(DataError, match="whole fold numbers"):
        read_cvind(tmp_path / "cvind.mat")


def test_brats_case_slices_mask_and_sampling(tmp_path, make_brats_case):
    case = make_brats_case(tmp_path)
    records = read_brats_case(case, "t1ce", empty_fraction=0.4, seed=0)
    tumour = [r.slice_index for r in records if r.mask.any()]
    empty = [r.slice_index for r in records if not r.mask.any()]
    assert tumour == [4, 5, 6]  # labels 1, 2 and 4 all count as whole tumour
    assert len(empty) == 2 and set(empty) <= {2, 3, 7, 8, 9}  # 40 % of 5 brain slices, none outside the brain
    assert [r.slice_index for r in records] == sorted(tumour + empty)
    assert {r.label for r in records if r.mask.any()} == {2} and {r.label for r in records if not r.mask.any()} == {0}
    assert all(r.patient == "BraTS20_Training_001" and r.source.endswith("_t1ce.nii.gz") for r in records)
    assert all(r.mask.sum() == 30 and r.image.shape == (48, 40) for r in records if r.mask.any())
    again = read_brats_case(case, "t1ce", empty_fraction=0.4, seed=0)
    assert [r.slice_index for r in again] == [r.slice_index for r in records]
    assert len(read_brats_case(case, "flair", empty_fraction=0.0)) == 3
    assert len(read_brats_case(case, "t2", empty_fraction=1.0)) == 8


@pytest.mark.parametrize("affine", [None, np.diag([-1.0, -1.0, 1.0, 1.0])])
def test_brats_orientation_is_radiological_whatever_the_affine(tmp_path, make_brats_case, affine):
    case = make_brats_case(tmp_path, affine=affine)
    mask = [r for r in read_brats_case(case, empty_fraction=0.0)][0].mask
    rows, cols = np.nonzero(mask)
    # tumour at the patient's right-anterior: anterior = top rows, patient's right = image left
    assert rows.max() < 48 / 2 and cols.max() < 40 / 2


def test_brats_uncompressed_nii_and_discovery(tmp_path, make_brats_case):
    make_brats_case(tmp_path / "data", "case_a", suffix=".nii")
    make_brats_case(tmp_path / "data", "case_b")
    (tmp_path / "data" / "name_mapping.csv").write_text("x")
    cases = find_brats_cases(tmp_path)
    assert [c.name for c in cases] == ["case_a", "case_b"]
    assert len(read_brats_case(cases[0], empty_fraction=0.0)) == 3


def test_brats_missing_modality_and_seg(tmp_path, make_brats_case):
    case = make_brats_case(tmp_path, "BraTS20_Training_002", modalities=("t1", "t2", "flair"))
    with pytest.raises(DataError, match="BraTS20_Training_002 has no t1ce volume") as info:
        read_brats_case(case, "t1ce")
    assert info.value.path.endswith("BraTS20_Training_002_t1ce.nii.gz")
    case = make_brats_case(tmp_path, "BraTS20_Training_355", seg=False)
    (case / "W39_1998.09.19_Segm.nii").write_bytes(b"")
    with pytest.raises(DataError, match="no seg volume.*W39_1998.09.19_Segm.nii.*rename it to "
                                        "BraTS20_Training_355_seg.nii") as info:
        read_brats_case(case, "t1ce")
    assert "BraTS20_Training_355" in info.value.path


def test_brats_bad_volumes(tmp_path, make_brats_case):
    case = make_brats_case(tmp_path, "c1", seg_labels=(1, 3, 4))
    with pytest.raises(DataError, match="unexpected segmentation labels 3;"):
        read_brats_case(case)
    case = make_brats_case(tmp_path, "c2")
    flair = case / "c2_flair.nii.gz"
    flair.write_bytes(flair.read_bytes()[:200])
    with pytest.raises(DataError, match="unreadable NIfTI") as info:
        read_brats_case(case, "flair")
    assert info.value.path == str(flair)


def test_brats_releases_are_told_apart_per_case(tmp_path, make_brats_case):
    """2020, 2021, 2023 (GLI, MEN, MET) and bare names in one folder; either vocabulary asks for the same volume."""
    data = tmp_path / "brats"
    cases = {
        "2020": make_brats_case(data, "BraTS20_Training_001"),
        "2021": make_brats_case(data, "BraTS2021_00000"),
        "2023": make_brats_case(data, "BraTS-GLI-00000-000", ("t1n", "t1c", "t2w", "t2f"), seg_labels=(1, 2, 3),
                                names="2023"),
        "men": make_brats_case(data, "BraTS-MEN-00004-000", ("t1n", "t1c", "t2w", "t2f"), seg_labels=(1, 2, 3),
                               names="2023"),
        "met": make_brats_case(data, "BraTS-MET-00001-000", ("t1c",), seg_labels=(1, 2, 3), names="2023"),
        "bare": make_brats_case(data, "case_bare", ("t1c", "t2f"), seg_labels=(1, 2, 3), names="bare"),
        "bare 2020 names": make_brats_case(data, "case_old", ("t1ce",), names="bare"),
    }
    assert find_brats_cases(data) == sorted(cases.values())
    described = {key: case_naming(case).describe() for key, case in cases.items()}
    assert described == {"2020": "BraTS 2020 (t1/t1ce/t2/flair), enhancing = 4",
                         "2021": "BraTS 2021 (t1/t1ce/t2/flair), enhancing = 4",
                         "2023": "BraTS 2023 (t1n/t1c/t2w/t2f), enhancing = 3",
                         "men": "BraTS 2023 (t1n/t1c/t2w/t2f), enhancing = 3",
                         "met": "BraTS 2023 (t1n/t1c/t2w/t2f), enhancing = 3",
                         "bare": "bare names (t1n/t1c/t2w/t2f), enhancing = 3",
                         "bare 2020 names": "bare names (t1/t1ce/t2/flair), enhancing = 4"}
    for key, case in cases.items():
        for old, new in (("t1ce", "t1c"), ("flair", "t2f")):
            if key in ("met", "bare 2020 names") and old == "flair":
                continue
            a, b = read_brats_case(case, old, empty_fraction=0.0), read_brats_case(case, new, empty_fraction=0.0)
            assert [r.source for r in a] == [r.source for r in b] and len(a) == 3, key
        # slice 4 holds label 1 (necrotic core), 5 oedema, 6 enhancing (4 in 2020/2021 files, 3 from 2023)
        regions = {target: [r.slice_index for r in read_brats_case(case, "t1c", 0.0, target=target)]
                   for target in ("wt", "tc", "et")}
        assert regions == {"wt": [4, 5, 6], "tc": [4, 6], "et": [6]}, key
    labels = {key: {r.label for r in read_brats_case(case, "t1c", 0.0)} for key, case in cases.items()}
    assert labels == {"2020": {2}, "2021": {2}, "2023": {2}, "men": {1}, "met": {-1}, "bare": {2},
                      "bare 2020 names": {2}}
    with pytest.raises(DataError, match="BraTS-GLI-00000-000 has no t1c volume .*BraTS-GLI-00000-000-t1c.nii.gz"):
        (cases["2023"] / "BraTS-GLI-00000-000-t1c.nii.gz").unlink()
        read_brats_case(cases["2023"], "t1ce")
    with pytest.raises(DataError, match="unexpected segmentation labels 4; BraTS uses 0, 1, 2, 3 with BraTS 2023"):
        read_brats_case(make_brats_case(tmp_path, "BraTS-PED-00002-000", ("t1c",), seg_labels=(4,), names="2023"),
                        "t1c")
    mixed = make_brats_case(tmp_path, "mixed", ("t1c", "t1ce"), names="bare")
    with pytest.raises(DataError, match="mixes 2020 names"):
        read_brats_case(mixed, "t1c")
    assert MODALITY_CHOICES == list(MODALITIES)  # the CLI's choices, kept apart so --help imports no nibabel


def test_brats_seg_of_another_shape(tmp_path, make_brats_case):
    case = make_brats_case(tmp_path, "BraTS-GLI-00003-000", ("t1c",), seg_labels=(1, 2, 3), names="2023")
    seg = case / "BraTS-GLI-00003-000-seg.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(nib.load(seg).dataobj)[:, :, :10], np.eye(4)), seg)
    with pytest.raises(DataError, match=r"segmentation shape \(40, 48, 10\) differs from the t1c volume's") as info:
        read_brats_case(case, "t1c")
    assert info.value.path == str(seg)


def test_busi_split_rgb_and_normal_masks(tmp_path, make_busi):
    expected = make_busi(tmp_path)
    pairs = find_busi_pairs(tmp_path)
    assert [(p.image.name, len(p.masks), p.label) for p in pairs] == [
        ("benign (1).png", 2, 1), ("malignant (1).png", 1, 2), ("normal (1).png", 1, 0)]
    for pair in pairs:
        record = read_image_pair(pair)
        assert record.image.shape == (32, 40) and record.image.dtype == np.float32
        assert np.array_equal(record.mask.astype(bool), expected[pair.image.name])
    colour = read_image_pair(pairs[1], channels=3)
    assert colour.image.shape == (3, 32, 40)


def test_busi_bad_pairs(tmp_path, make_busi):
    make_busi(tmp_path)
    save_png(tmp_path / "benign" / "benign (2).png", np.full((32, 40), 9))
    save_png(tmp_path / "benign" / "benign (3).png", np.arange(32 * 40).reshape(32, 40) % 200)
    save_png(tmp_path / "benign" / "benign (3)_mask.png", np.zeros((30, 40)))
    save_png(tmp_path / "malignant" / "malignant (9)_mask.png", np.zeros((32, 40)))
    errors = {}
    for pair in find_busi_pairs(tmp_path):
        try:
            read_image_pair(pair)
        except DataError as exc:
            errors[exc.path.split("/")[-1]] = exc.problem
    assert errors == {"benign (2).png": "no mask found for this image",
                      "benign (3)_mask.png": "mask is 40x30 pixels but image benign (3).png is 40x32",
                      "malignant (9).png": "missing: mask malignant (9)_mask.png has no image"}


def test_generic_images_masks_folder(tmp_path):
    img = np.arange(24 * 20).reshape(24, 20) % 251
    mask = np.zeros((24, 20))
    mask[5:9, 3:7] = 1  # a 0/1 mask, not 0/255
    save_png(tmp_path / "images" / "scan_a.png", img)
    save_png(tmp_path / "masks" / "scan_a.png", mask)
    save_png(tmp_path / "images" / "scan_b.jpg", img)
    (pair_a, pair_b) = find_folder_pairs(tmp_path)
    record = read_image_pair(pair_a)
    assert (record.label, record.patient, int(record.mask.sum())) == (-1, "scan_a", 16)
    with pytest.raises(DataError, match="no mask"):
        read_image_pair(pair_b)
