"""`genseg segment` and the inference library: every input format, empty masks where there is no tumour,
served-path masks equal to CLI masks, and every bad input reported clearly without losing the good ones."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from genseg.serve.testing import make_untrained_segmenter
from seg_helpers import one_torch_thread, phantom, write_phantoms  # noqa: F401

from conftest import oblique_orientation, write_dicom_series, write_enhanced_mr

from genseg.data.figshare import write_figshare_mat
from genseg.errors import CheckpointError, DataError
from genseg.evaluation.metrics import dice_iou
from genseg.inference.files import load_inputs, plan_outputs, prepare_input, segment_file, segment_files
from genseg.inference.segmenter import load_segmenter
from genseg.runs import SegTrainConfig
from genseg.training.seg import train_segmenter

SIZE = 64


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A 64 px width-8 segmenter trained on phantoms until it segments new ones, tumour-free slices included
    (about 20 s). Measured over seeds and thread counts: 40 slices for 12 epochs left 1-2 px specks on
    tumour-free slices, and without flips 80 slices missed most of a large lesion near the brain's edge."""
    folder = tmp_path_factory.mktemp("segment")
    data = write_phantoms(folder / "real.h5", n=160, size=SIZE, patients=10)
    cfg = SegTrainConfig(size=SIZE, base_channels=8, depth=3, batch_size=4, epochs=20, patience=None,
                         loss="bce+dice", lr=1e-2, hflip=True, max_rotation=0.0, plot_samples=1, bn_stat_slices=64)
    result = train_segmenter(cfg, data, folder / "run")
    assert result.metrics["test"]["dice"] > 0.8, result.metrics["test"]
    return folder / "run"


def raw_phantoms(seed: int, tumours=(True,)) -> tuple[np.ndarray, np.ndarray]:
    """Scanner-like int16 slices (Z, H, W) and their masks, as a raw file would hold them."""
    rng = np.random.default_rng(seed)
    pairs = [phantom(rng, SIZE, t) for t in tumours]
    return np.stack([(1000 * p[0] + 200).astype(np.int16) for p in pairs]), np.stack([p[1] for p in pairs])


def read_mask(path: Path) -> np.ndarray:
    mask = np.asarray(Image.open(path))
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    return mask > 0


def test_segment_figshare_png_and_dicom(run, tmp_path):
    images, masks = raw_phantoms(1, tumours=(True, True, False))
    write_figshare_mat(tmp_path / "7.mat", images[0], masks[0], 2, "P7", np.zeros(0))
    Image.fromarray((images[1] / 8).astype(np.uint8)).save(tmp_path / "slice.png")
    write_dicom(tmp_path / "scan.dcm", images[2])
    report = segment_files([tmp_path / "7.mat", tmp_path / "slice.png", tmp_path / "scan.dcm"], run, tmp_path / "out",
                           progress=False)
    assert report["failed"] == []
    assert len(report["written"]) == 6
    assert dice_iou(read_mask(tmp_path / "out" / "7_mask.png")[None], masks[:1])[0][0] > 0.8
    assert dice_iou(read_mask(tmp_path / "out" / "slice_mask.png")[None], masks[1:2])[0][0] > 0.8
    assert not read_mask(tmp_path / "out" / "scan_mask.png").any()  # tumour-free slice: empty mask
    overlay = np.asarray(Image.open(tmp_path / "out" / "7_overlay.png"))
    assert overlay.shape == (SIZE, SIZE, 3)


def write_dicom(path: Path, pixels: np.ndarray) -> None:
    """A single-frame MR image written by pydicom (preamble, DICM, explicit little endian)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = pixels.astype(np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_segment_nifti_volume_keeps_affine(run, tmp_path):
    images, masks = raw_phantoms(2, tumours=(True, False, True))
    affine = np.array([[-0.9, 0, 0, 90], [0, 0.9, 0, -120], [0, 0, 2.5, -60], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.moveaxis(images, 0, -1), affine), tmp_path / "vol.nii.gz")
    report = segment_files([tmp_path / "vol.nii.gz"], run, tmp_path / "out", progress=False)
    assert report["failed"] == [] and len(report["written"]) == 3 * 2 + 1
    result = nib.load(tmp_path / "out" / "vol_mask.nii.gz")
    volume = np.asarray(result.dataobj)
    assert volume.dtype == np.uint8 and volume.shape == (SIZE, SIZE, 3)
    assert np.allclose(result.affine, affine)
    for k in range(3):
        assert np.array_equal(volume[..., k] > 0, read_mask(tmp_path / "out" / f"vol_z{k:03d}_mask.png"))
    assert not volume[..., 1].any()  # the tumour-free slice
    assert dice_iou(volume[..., 0][None] > 0, masks[:1])[0][0] > 0.8


def test_served_path_equals_segment_masks(run, tmp_path):
    """What the server does with a decoded array (prepare_input + predict) gives `segment`'s mask bit for bit."""
    images, _ = raw_phantoms(3)
    Image.fromarray((images[0] / 8).astype(np.uint8)).save(tmp_path / "a.png")
    assert segment_files([tmp_path / "a.png"], run, tmp_path / "out", progress=False)["failed"] == []
    segmenter = load_segmenter(run)
    decoded = np.asarray(Image.open(tmp_path / "a.png"))
    probs = segmenter.predict(prepare_input(decoded, segmenter.channels, segmenter.size)[None])
    assert np.array_equal(probs[0] >= segmenter.threshold, read_mask(tmp_path / "out" / "a_mask.png"))


def test_blank_image_gives_empty_mask(run, tmp_path):
    Image.fromarray(np.full((SIZE, SIZE), 7, np.uint8)).save(tmp_path / "blank.png")
    assert segment_files([tmp_path / "blank.png"], run, tmp_path / "out", progress=False)["failed"] == []
    assert not read_mask(tmp_path / "out" / "blank_mask.png").any()


def test_bad_files_are_reported_and_the_rest_segmented(tmp_path, genseg_cli):
    run = make_untrained_segmenter(tmp_path / "run", size=SIZE, base_channels=4, depth=2)
    images, _ = raw_phantoms(4, tumours=(True, True))
    Image.fromarray((images[0] / 8).astype(np.uint8)).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    colour = np.stack([images[1] / 8, images[1] / 16, images[1] / 32], -1).astype(np.uint8)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    nan_volume = np.moveaxis(images, 0, -1).astype(np.float32)
    nan_volume[3, 3, 0] = np.nan
    nib.save(nib.Nifti1Image(nan_volume, np.eye(4)), tmp_path / "nan.nii")
    (tmp_path / "notes.txt").write_text("hello")
    inputs = [tmp_path / n for n in ("broken.png", "good.png", "colour.png", "nan.nii", "notes.txt", "missing.png")]
    out = genseg_cli("segment", *inputs, "--checkpoint", run, "--out", tmp_path / "out", returncode=1)
    assert "Traceback" not in out.stderr
    assert (tmp_path / "out" / "good_mask.png").exists() and (tmp_path / "out" / "good_overlay.png").exists()
    errors = out.stderr.splitlines()
    expected = {"broken.png": "cannot read", "colour.png": "has 3 channel(s), the model expects 1",
                "nan.nii": "NaN", "notes.txt": "unsupported file type .txt", "missing.png": "file not found"}
    for name, fragment in expected.items():
        assert any(name in line and fragment in line for line in errors), (name, errors)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good_mask.png", "good_overlay.png"]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_inputs_with_the_same_name_never_overwrite_each_other(tmp_path, genseg_cli):
    """Issue 20: a/scan.png, b/scan.png and a/scan.tif all went to OUT/scan_*.png ("wrote 6 files", 2 on disk)."""
    run = make_untrained_segmenter(tmp_path / "run", size=SIZE, base_channels=4, depth=2)
    images, _ = raw_phantoms(5, tumours=(True, True, False))
    inputs = [tmp_path / "in" / n for n in ("a/scan.png", "b/scan.png", "a/scan.tif")]
    for path, image in zip(inputs, images):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image / 8).astype(np.uint8)).save(path)
    out = tmp_path / "out"
    done = genseg_cli("segment", *inputs, "--checkpoint", run, "--out", out)
    assert "wrote 6 files" in done.stdout
    written = _files(out)
    assert sorted(written) == ["a/scan.png_mask.png", "a/scan.png_overlay.png", "a/scan.tif_mask.png",
                               "a/scan.tif_overlay.png", "b/scan_mask.png", "b/scan_overlay.png"]
    segmenter = load_segmenter(run)
    for path, stem in zip(inputs, ["a/scan.png", "b/scan", "a/scan.tif"]):  # each output is its own input's
        alone = segment_file(segmenter, path, tmp_path / "alone" / path.parent.name)
        assert [p.read_bytes() for p in alone] == [written[f"{stem}_mask.png"], written[f"{stem}_overlay.png"]]

    shutil.rmtree(out)
    (out / "b").mkdir(parents=True)
    (out / "b" / "scan_overlay.png").write_bytes(b"an earlier result")
    again = genseg_cli("segment", *inputs, "--checkpoint", run, "--out", out, returncode=2)
    assert "b/scan_overlay.png: already exists; pass --force" in again.stderr and "Traceback" not in again.stderr
    assert _files(out) == {"b/scan_overlay.png": b"an earlier result"}  # checked before writing anything
    genseg_cli("segment", *inputs, "--checkpoint", run, "--out", out, "--force")
    assert _files(out) == written


def test_output_names_that_would_meet_use_the_whole_file_name(tmp_path):
    """A volume's slice names can meet another input's name too; the count written is the count on disk."""
    images, _ = raw_phantoms(6, tumours=(True, False))
    nib.save(nib.Nifti1Image(np.moveaxis(images, 0, -1), np.eye(4)), tmp_path / "vol.nii.gz")
    Image.fromarray((images[0] / 8).astype(np.uint8)).save(tmp_path / "vol_z001.png")  # also vol.nii.gz's slice 1
    Image.fromarray((images[1] / 8).astype(np.uint8)).save(tmp_path / "other.png")
    paths = [tmp_path / "vol.nii.gz", tmp_path / "vol_z001.png", tmp_path / "other.png", tmp_path / "missing.png"]
    stems, outputs, failed = plan_outputs([*paths, tmp_path / "x" / ".." / "other.png"])  # given twice: once
    assert {p.name: str(s) for p, s in stems.items()} == {"vol.nii.gz": "vol.nii.gz", "vol_z001.png": "vol_z001.png",
                                                          "other.png": "other"}
    assert [str(n) for n in outputs[paths[0]]] == ["vol.nii.gz_z000_mask.png", "vol.nii.gz_z000_overlay.png",
                                                   "vol.nii.gz_z001_mask.png", "vol.nii.gz_z001_overlay.png",
                                                   "vol.nii.gz_mask.nii.gz"]
    assert [f["reason"] for f in failed] == ["file not found"]
    run = make_untrained_segmenter(tmp_path / "run", size=SIZE, base_channels=4, depth=2)
    report = segment_files([*paths, paths[2]], run, tmp_path / "out", progress=False)
    assert len(report["written"]) == len(_files(tmp_path / "out")) == 5 + 2 + 2
    assert len(report["segmented"]) == 3


def test_dicom_without_pydicom_says_how_to_install(tmp_path, monkeypatch):
    write_dicom(tmp_path / "x.dcm", np.arange(64, dtype=np.int16).reshape(8, 8))
    monkeypatch.setitem(sys.modules, "pydicom", None)  # what an environment without the extra looks like
    with pytest.raises(DataError, match=r"x.dcm: reading DICOM needs pydicom: pip install 'genseg\[dicom\]'"):
        load_inputs(tmp_path / "x.dcm")


def test_grey_model_accepts_grey_rgb_and_refuses_wrong_channels():
    grey = np.random.default_rng(0).random((40, 40)).astype(np.float32)
    assert prepare_input(np.stack([grey] * 3), 1, 32).shape == (1, 32, 32)
    with pytest.raises(DataError, match="1 channel\\(s\\), the model expects 3"):
        prepare_input(grey, 3, 32)


def test_checkpoint_errors(tmp_path):
    from diffusers import UNet2DModel

    with pytest.raises(CheckpointError, match="not found"):
        load_segmenter(tmp_path / "nothing")
    UNet2DModel(sample_size=16, block_out_channels=(8, 8), norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                up_block_types=("UpBlock2D",) * 2).save_pretrained(tmp_path / "diffusion" / "unet")
    with pytest.raises(CheckpointError, match="is a diffusion run"):
        load_segmenter(tmp_path / "diffusion")
    with pytest.raises(CheckpointError, match="holds a UNet2DModel, not a genseg SegmentationUNet"):
        load_segmenter(tmp_path / "diffusion" / "unet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a segmentation run or model folder"):
        load_segmenter(tmp_path / "empty")
    run = make_untrained_segmenter(tmp_path / "pickled", size=32, base_channels=4, depth=2)
    model_dir = run / "model"
    weights = model_dir / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), model_dir / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(CheckpointError, match="no safetensors weights .* never from pickle"):
        load_segmenter(run)
    shutil.rmtree(model_dir)
    with pytest.raises(CheckpointError, match="has no trained model yet"):
        load_segmenter(run)


def test_untrained_helper_gives_a_loadable_run(tmp_path):
    segmenter = load_segmenter(make_untrained_segmenter(tmp_path / "r", size=32, base_channels=4, depth=2, channels=3))
    assert (segmenter.size, segmenter.channels) == (32, 3)
    assert segmenter.predict(np.zeros((2, 3, 32, 32), np.float32)).shape == (2, 32, 32)
    with pytest.raises(ValueError, match="NaN"):
        segmenter.predict(np.full((1, 3, 32, 32), np.nan, np.float32))
    assert json.loads((tmp_path / "r" / "model" / "config.json").read_text())["_class_name"] == "SegmentationUNet"


def _seg_frames(seg) -> list[tuple[str, np.ndarray]]:
    """(referenced SOP instance UID, ImagePositionPatient) of each frame of a read-back DICOM Segmentation."""
    frames = []
    for item in seg.PerFrameFunctionalGroupsSequence:
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        frames.append((str(source.ReferencedSOPInstanceUID), np.asarray(item.PlanePositionSequence[0]
                                                                      .ImagePositionPatient, float)))
    return frames


def test_dicom_series_get_nifti_probabilities_and_dicom_seg(run, tmp_path):
    """Two series and a structured report in one folder: each series segmented on its own, named by its
    SeriesDescription, with a NIfTI mask on its grid, float32 probabilities and a DICOM-SEG read back with
    highdicom against the source series; the report is named as unusable."""
    import highdicom as hd
    import pydicom
    from pydicom.data import get_testdata_file

    from genseg import __version__

    images, masks = raw_phantoms(7, tumours=(True, True, False, True))
    t1 = write_dicom_series(tmp_path / "exam", images, "T1 AX POST", slope=0.5, intercept=10.0)
    flair = write_dicom_series(tmp_path / "exam", raw_phantoms(8, tumours=(True, False))[0], "FLAIR AX", seed=1)
    shutil.copy(get_testdata_file("test-SR.dcm"), tmp_path / "exam" / "report.dcm")
    out = tmp_path / "out"
    report = segment_files([tmp_path / "exam"], run, out, progress=False, dicom_seg=True, probabilities=True)
    assert report["failed"] == [{"path": str(tmp_path / "exam" / "report.dcm"),
                                 "reason": "has no pixel data: not an image (Comprehensive SR Storage)"}]
    assert report["segmented"] == [str(tmp_path / "exam")]
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".png")) == [
        "exam_FLAIR_AX_mask.nii.gz", "exam_FLAIR_AX_probabilities.nii.gz", "exam_FLAIR_AX_seg.dcm",
        "exam_T1_AX_POST_mask.nii.gz", "exam_T1_AX_POST_probabilities.nii.gz", "exam_T1_AX_POST_seg.dcm"]
    assert len(report["written"]) == (4 + 2) * 2 + 6

    nifti = nib.load(out / "exam_T1_AX_POST_mask.nii.gz")
    volume = np.asarray(nifti.dataobj)
    assert volume.dtype == np.uint8 and volume.shape == (SIZE, SIZE, 4)
    for k, w in enumerate(t1):  # voxel (0, 0, k) sits at slice k's ImagePositionPatient, LPS -> RAS
        assert np.allclose((nifti.affine @ [0, 0, k, 1])[:3], w["ipp"] * [-1, -1, 1], atol=1e-4)
        assert np.array_equal(volume[..., k] > 0, read_mask(out / f"exam_T1_AX_POST_z{k:03d}_mask.png"))
    assert nifti.header["sform_code"] > 0 and nifti.header["qform_code"] > 0
    assert dice_iou(np.moveaxis(volume, -1, 0)[[0, 1, 3]] > 0, masks[[0, 1, 3]])[0].min() > 0.8
    assert not volume[..., 2].any()
    probabilities = nib.load(out / "exam_T1_AX_POST_probabilities.nii.gz")
    assert probabilities.get_data_dtype() == np.float32 and np.allclose(probabilities.affine, nifti.affine)
    assert np.mean((np.asarray(probabilities.dataobj) >= 0.5) == (volume > 0)) > 0.999

    for name, source in (("T1_AX_POST", t1), ("FLAIR_AX", flair)):
        seg = hd.seg.segread(out / f"exam_{name}_seg.dcm")
        first = pydicom.dcmread(source[0]["path"], stop_before_pixels=True)
        assert (seg.Modality, seg.Rows, seg.Columns, seg.NumberOfFrames) == ("SEG", SIZE, SIZE, len(source))
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
        assert (seg.StudyInstanceUID, seg.FrameOfReferenceUID) == (first.StudyInstanceUID, first.FrameOfReferenceUID)
        assert {uid for _, _, uid in seg.get_source_image_uids()} == {w["uid"] for w in source}
        positions = {w["uid"]: w["ipp"] for w in source}
        frames = _seg_frames(seg)
        assert sorted(uid for uid, _ in frames) == sorted(positions)  # one frame per source slice, empty ones too
        assert all(np.allclose(ipp, positions[uid], atol=1e-4) for uid, ipp in frames)
        segment = seg.SegmentSequence[0]
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert (segment.SegmentLabel, segment.SegmentAlgorithmType, segment.SegmentAlgorithmName) == (
            "tumour", "AUTOMATIC", "genseg")
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion, seg.SoftwareVersions) == (
            "genseg", __version__, __version__)
        pixels = seg.get_pixels_by_source_instance([w["uid"] for w in source], combine_segments=True)
        nifti_mask = np.asarray(nib.load(out / f"exam_{name}_mask.nii.gz").dataobj)
        assert np.array_equal(pixels, np.moveaxis(nifti_mask, -1, 0))


def test_multiframe_dicom_seg_follows_the_source_frames(run, tmp_path):
    """A real Enhanced MR header (24 frames, conftest.write_enhanced_mr) holding phantoms with a tumour in every
    third frame: the SEG's frames reference the source frames, and its pixels read back per source frame equal
    the NIfTI mask of the position-ordered stack."""
    import highdicom as hd
    import pydicom

    rng = np.random.default_rng(10)
    stored = np.stack([np.kron(1000 * phantom(rng, SIZE, f % 3 == 0)[0] + 200, np.ones((4, 4))) for f in range(24)])
    source = pydicom.dcmread(write_enhanced_mr(tmp_path / "mprage.dcm", stored), stop_before_pixels=True)
    report = segment_files([tmp_path / "mprage.dcm"], run, tmp_path / "out", progress=False, dicom_seg=True)
    assert report["failed"] == [] and len(report["written"]) == 24 * 2 + 2
    seg = hd.seg.segread(tmp_path / "out" / "mprage_seg.dcm")
    assert (seg.Rows, seg.Columns, seg.NumberOfFrames) == (256, 256, 24)
    positions = [np.asarray(g.PlanePositionSequence[0].ImagePositionPatient, float)
                 for g in source.PerFrameFunctionalGroupsSequence]
    for item in seg.PerFrameFunctionalGroupsSequence:
        ref = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
        frame = int(ref.ReferencedFrameNumber) - 1
        assert np.allclose(item.PlanePositionSequence[0].ImagePositionPatient, positions[frame])
    mask = np.asarray(nib.load(tmp_path / "out" / "mprage_mask.nii.gz").dataobj)
    along = [p @ np.cross(*np.reshape(source.PerFrameFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
                                      .ImageOrientationPatient, (2, 3))) for p in positions]
    order = np.argsort(along)  # stack order: frame order[k] is slice k of the NIfTI mask
    by_frame = seg.get_pixels_by_source_frame(source.SOPInstanceUID, list(range(1, 25)), combine_segments=True)
    assert np.array_equal(by_frame[order], np.moveaxis(mask, -1, 0))
    assert [bool(m.any()) for m in by_frame] == [f % 3 == 0 for f in range(24)]  # the tumour frames, in frame order


def test_cli_dicom_folder_zip_and_bad_inputs(tmp_path, genseg_cli):
    """A folder with a good and an unevenly spaced series, a zip with a path-traversal member, a good zip and a
    real single file: errors name the files, the good ones are segmented (exit status 1)."""
    import zipfile

    from pydicom.data import get_testdata_file

    run = make_untrained_segmenter(tmp_path / "run", size=SIZE, base_channels=4, depth=2)
    images, _ = raw_phantoms(9, tumours=(True, True, False))
    write_dicom_series(tmp_path / "exam", images, "T2 AX")
    normal = oblique_orientation()[2]
    uneven = write_dicom_series(tmp_path / "exam", images, "T2 gap", positions=[normal * z for z in (0, 3, 9)], seed=2)
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as archive:
        archive.write(get_testdata_file("MR_small.dcm"), "../../evil.dcm")
    good = write_dicom_series(tmp_path / "zipped", images[:2], "PD AX", seed=3)
    with zipfile.ZipFile(tmp_path / "good.zip", "w") as archive:
        for w in good:
            archive.write(w["path"], w["path"].name)
    shutil.copy(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"), tmp_path / "mr.dcm")
    out = tmp_path / "out"
    done = genseg_cli("segment", tmp_path / "exam", tmp_path / "evil.zip", tmp_path / "good.zip", tmp_path / "mr.dcm",
                      "--checkpoint", run, "--out", out, returncode=1)
    errors = done.stderr.splitlines()
    assert "Traceback" not in done.stderr
    assert any(str(tmp_path / "evil.zip") in line and "zip member paths must stay inside the archive" in line
               and "../../evil.dcm" in line for line in errors), errors
    assert any(str(uneven[0]["path"].parent) in line and "slice spacing of the series is not even" in line
               for line in errors), errors
    names = sorted(p.name for p in out.iterdir())
    assert "exam_T2_AX_mask.nii.gz" in names and "good_PD_AX_mask.nii.gz" in names and "mr_mask.nii.gz" in names
    assert "exam_T2_AX_z002_overlay.png" in names and not any("gap" in n for n in names)
    assert f"wrote {len(names)} files" in done.stdout and len(names) == 3 * 2 + 1 + 2 * 2 + 1 + 2 + 1
