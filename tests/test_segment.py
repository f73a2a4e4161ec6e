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

from genseg.data.figshare import write_figshare_mat
from genseg.errors import CheckpointError, DataError
from genseg.inference import (load_inputs, load_segmenter, plan_outputs, prepare_input, segment_file,
                              segment_files)
from genseg.metrics import dice_iou
from genseg.training.seg import SegTrainConfig, train_segmenter

SIZE = 64


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A 64 px width-8 segmenter trained on phantoms until it segments them (about 15 s)."""
    folder = tmp_path_factory.mktemp("segment")
    data = write_phantoms(folder / "real.h5", n=40, size=SIZE, patients=10)
    cfg = SegTrainConfig(size=SIZE, base_channels=8, depth=3, batch_size=4, epochs=12, patience=None,
                         loss="bce+dice", lr=1e-2, hflip=False, max_rotation=0.0, plot_samples=1)
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
