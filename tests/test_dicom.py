"""DICOM inputs on real files: pydicom's and nibabel's shipped test data (MR/CT, big endian, JPEG, JPEG-LS,
JPEG 2000, RLE, an Enhanced MR multi-frame, structured reports) and series written the way scanners lay them
out; series order, rescaling and geometry, zips, and every bad input refused with the file named."""

from __future__ import annotations

import shutil
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from conftest import oblique_orientation, write_dicom_series, write_enhanced_mr
from genseg.data.dicom import read_dicom
from genseg.errors import DataError
from genseg.inference.files import load_inputs

BUDGET = 2**28

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's notes on the test files' odd values


def ras(lps) -> np.ndarray:
    return np.asarray(lps, float) * [-1, -1, 1]


def voxel_to_ras(affine: np.ndarray, r: float, c: float, k: float) -> np.ndarray:
    return (affine @ [r, c, k, 1])[:3]


def test_real_encodings_decode_alike_and_carry_geometry():
    """MR_small in five encodings gives the same pixels; CT_small is rescaled into Hounsfield units."""
    reference = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    expected = reference.pixel_array.astype(np.float32)
    for name in ("MR_small.dcm", "MR_small_bigendian.dcm", "MR_small_jpeg_ls_lossless.dcm",
                 "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm"):
        only, = load_inputs(get_testdata_file(name))
        assert only.part == "" and np.array_equal(only.image, expected), name
    volume = only.meta["volume"]
    # the voxel grid lands where the header says: nibabel's DICOM wrapper agrees on rows, columns and the origin
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nibabel calls its DICOM readers experimental
        from nibabel.nicom import dicomwrappers
    wrapper = dicomwrappers.wrapper_from_data(reference)
    assert np.allclose(volume.affine[:3, :2], wrapper.affine[:3, :2] * [[-1], [-1], [1]])
    assert np.allclose(volume.affine[:3, 3], ras(reference.ImagePositionPatient))
    assert volume.shape == (64, 64, 1)
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    only, = load_inputs(get_testdata_file("CT_small.dcm"))
    assert np.allclose(only.image, ct.pixel_array * float(ct.RescaleSlope) + float(ct.RescaleIntercept))
    assert float(ct.RescaleIntercept) != 0
    jpeg, = load_inputs(get_testdata_file("JPGExtended.dcm"))  # 12-bit JPEG: pylibjpeg-libjpeg
    assert jpeg.image.shape == (1024, 256) and jpeg.image.max() > 255


def test_multiframe_files(tmp_path):
    """An Enhanced MR file (a real header, frames shuffled) is one series of frames ordered along the normal; an
    RGB 2-frame RLE file without patient geometry keeps its frame order."""
    path = write_enhanced_mr(tmp_path / "mprage.dcm")
    slices = load_inputs(path)
    ds = pydicom.dcmread(path)
    assert len(slices) == 24 and slices[0].part == "_z000" and slices[0].image.shape == (256, 256)
    volume = slices[0].meta["volume"]
    groups = ds.PerFrameFunctionalGroupsSequence
    assert volume.series.frame_numbers != list(range(1, 25))  # stack order is not the file's frame order
    for k in (0, 1, 12, 23):
        frame = volume.series.frame_numbers[k] - 1
        assert np.allclose(voxel_to_ras(volume.affine, 0, 0, k), ras(groups[frame].PlanePositionSequence[0]
                                                                      .ImagePositionPatient), atol=1e-3)
        transform = groups[frame].PixelValueTransformationSequence[0]
        assert np.allclose(slices[k].image, ds.pixel_array[frame] * float(transform.RescaleSlope)
                           + float(transform.RescaleIntercept))
    along = [float(np.asarray(g.PlanePositionSequence[0].ImagePositionPatient) @ np.cross(
        *np.reshape(g.PlaneOrientationSequence[0].ImageOrientationPatient, (2, 3)))) for g in groups]
    ordered = [along[n - 1] for n in volume.series.frame_numbers]
    assert ordered == sorted(ordered)
    rgb = load_inputs(get_testdata_file("SC_rgb_rle_2frame.dcm"))
    assert [s.part for s in rgb] == ["_f000", "_f001"] and rgb[0].image.shape == (3, 100, 100)
    assert rgb[0].meta["volume"].affine is None


def test_series_from_shuffled_oblique_files(tmp_path):
    """Files named at random, InstanceNumber counting down: slices come out in position order, rescaled, placed."""
    stored = np.random.default_rng(0).integers(0, 1000, (5, 24, 20)).astype(np.int16)
    written = write_dicom_series(tmp_path / "study", stored, slope=2.0, intercept=-100.0)
    slices = load_inputs(tmp_path / "study")
    assert [s.part for s in slices] == [f"_T1_AX_POST_z{k:03d}" for k in range(5)]
    for k, s in enumerate(slices):
        assert np.array_equal(s.image, stored[k] * 2.0 - 100.0)
    affine = slices[0].meta["volume"].affine
    row, column, _ = oblique_orientation()
    for k, w in enumerate(written):
        assert np.allclose(voxel_to_ras(affine, 0, 0, k), ras(w["ipp"]), atol=1e-4)
    assert np.allclose(voxel_to_ras(affine, 3, 5, 2), ras(written[2]["ipp"] + 3 * 0.9 * column + 5 * 0.8 * row),
                       atol=1e-4)
    assert [m.path for m in slices[0].meta["volume"].series.members] == [w["path"] for w in written]

    with zipfile.ZipFile(tmp_path / "study.zip", "w") as archive:
        for w in written[::-1]:
            archive.write(w["path"], f"DICOM/{w['path'].name}")
    zipped = load_inputs(tmp_path / "study.zip")
    assert [s.part for s in zipped] == [s.part for s in slices]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(zipped, slices))
    assert np.allclose(zipped[0].meta["volume"].affine, affine)


def _series(folder: Path, description: str, seed: int, **kwargs) -> list[dict]:
    stored = np.random.default_rng(seed).integers(0, 1000, (4, 16, 16)).astype(np.int16)
    return write_dicom_series(folder, stored, description, seed=seed, **kwargs)


def test_bad_series_are_refused_with_the_reason_and_the_good_kept(tmp_path):
    folder = tmp_path / "exam"
    _series(folder / "good", "T2 AX", 1)
    normal = oblique_orientation()[2]
    gaps = [0, 3, 6, 12]  # slice 3 is missing
    _series(folder / "gap", "FLAIR gap", 2, positions=[k * normal for k in gaps])
    tilted = [w["path"] for w in _series(folder / "tilt", "DWI tilt", 3)]
    ds = pydicom.dcmread(tilted[1])
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*oblique_orientation(35.0)[0], *oblique_orientation(35.0)[1])]
    ds.save_as(tilted[1])
    _series(folder / "twice", "T1 twice", 4, positions=[normal * 0, normal * 3, normal * 3, normal * 6])
    shutil.copy(get_testdata_file("reportsi.dcm"), folder / "report.dcm")
    (folder / "notes.txt").write_text("not DICOM")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden: ignored
    found = read_dicom(folder, BUDGET)
    assert [s.label for s in found.series] == ["T2_AX"]
    reasons = {Path(e.path).relative_to(folder).parts[0]: e.reason for e in found.skipped}
    assert "slice spacing of the series is not even" in reasons["gap"] and "gaps from 3 to 6 mm" in reasons["gap"]
    assert "mixes slice orientations" in reasons["tilt"]
    assert "share one position" in reasons["twice"]
    assert reasons["report.dcm"] == "has no pixel data: not an image (Basic Text SR Storage)"
    assert reasons["notes.txt"].startswith("not a DICOM file")
    assert len(reasons) == 6 - 1  # the hidden file is not read
    with pytest.raises(DataError, match=r"reportsi.dcm: has no pixel data: not an image \(Basic Text SR Storage\)"):
        load_inputs(get_testdata_file("reportsi.dcm"))


def test_two_series_in_one_folder_are_named_apart(tmp_path):
    study = pydicom.uid.generate_uid()
    _series(tmp_path / "exam", "T1 AX", 1, study_uid=study)
    _series(tmp_path / "exam", "T1 AX", 2, study_uid=study)  # same description: both fall back to their UIDs
    _series(tmp_path / "exam", "", 3, study_uid=study)  # no description: the series number
    labels = sorted({s.part.rsplit("_z", 1)[0] for s in load_inputs(tmp_path / "exam")})
    assert len(labels) == 3 and "_series3" in labels
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID) for p in (tmp_path / "exam").iterdir()}
    assert set(labels) - {"_series3"} <= {f"_{uid}" for uid in uids}


@pytest.mark.parametrize("member", ["../escape.dcm", "/etc/absolute.dcm", "a/../../up.dcm", "C:/windows.dcm"])
def test_zip_members_that_leave_the_archive_refuse_it(tmp_path, member):
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as archive:
        archive.write(get_testdata_file("MR_small.dcm"), "fine/MR_small.dcm")
        archive.writestr(zipfile.ZipInfo(member), Path(get_testdata_file("MR_small.dcm")).read_bytes())
    with pytest.raises(DataError, match="zip member paths must stay inside the archive") as info:
        load_inputs(tmp_path / "bad.zip")
    assert info.value.path == str(tmp_path / "bad.zip") and member in info.value.detail
    assert not (tmp_path / "escape.dcm").exists() and not (tmp_path.parent / "up.dcm").exists()


def test_undecodable_truncated_and_oversized_files(tmp_path):
    """A compression no installed plugin decodes names what to install; claims are checked before decoding."""
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML  # video: genseg's decoders do not read it
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00\x00\x01\xb3" + bytes(64)])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "video.dcm", enforce_file_format=True)
    with pytest.raises(DataError, match=r"video.dcm: no installed decoder reads its MPEG2 .* pixel data; "
                                        r"pip install 'genseg\[dicom\]' brings the decoders for JPEG, JPEG-LS"):
        load_inputs(tmp_path / "video.dcm")
    with pytest.raises(DataError, match="MR_truncated.dcm: "):
        load_inputs(get_testdata_file("MR_truncated.dcm"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="image holds more than 1000 pixels"):
            load_inputs(get_testdata_file("MR_small.dcm"), max_pixels=1000)
