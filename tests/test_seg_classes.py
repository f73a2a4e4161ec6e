"""train-seg --classes (issue 14 item 6): a (K+1)-channel softmax head that segments and types the tumour, its run
records, evaluate's per-class Dice of typed masks, segment's typed masks, the refusals (unlabelled data, ONNX
export), and the binary default left as it was."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from seg_helpers import one_torch_thread, phantom, write_phantoms  # noqa: F401 (autouse fixture)

from genseg.data.prepared import PreparedWriter
from genseg.data.records import preprocess_pair
from genseg.errors import ConfigError, DataError
from genseg.evaluation.evaluate import evaluate, markdown_table
from genseg.evaluation.multiclass import typed_summary
from genseg.inference.files import segment_files
from genseg.inference.multiclass import slice_classes, tumour_score
from genseg.inference.segmenter import load_segmenter
from genseg.runs import SegTrainConfig
from genseg.training.multiclass import class_loss
from genseg.training.seg import batch_loss, seg_loss, train_segmenter
from genseg.workflows.export import export_onnx

SIZE = 32
FIGSHARE = {"1": "meningioma", "2": "glioma", "3": "pituitary"}
TUMOUR = {1: 0.1, 2: 0.6, 3: 0.85}  # the tumour's intensity tells its class, so a tiny model can learn it
TINY = dict(size=SIZE, base_channels=8, depth=2, batch_size=4, epochs=20, patience=None, loss="bce+dice", lr=1e-2,
            hflip=False, max_rotation=0.0, plot_samples=1)


def typed_phantoms(path: Path, patients: int = 15, seed: int = 0) -> Path:
    """Four slices per patient, the first tumour-free: phantoms whose tumour intensity depends on the patient's
    class (1 + patient % 3, which tumour-free slices keep, as in Figshare) inside a bright skull ring (so the
    per-slice normalisation keeps intensities comparable), written like `genseg prepare` would with the Figshare
    class names; patient p in fold 1 + p % 5."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    radius = ((yy - 0.5) / 0.42) ** 2 + ((xx - 0.5) / 0.36) ** 2  # the phantom's brain is radius < 1
    with PreparedWriter(path, size=SIZE, channels=1, source_format="test",
                        metadata={"class_names": FIGSHARE}) as writer:
        for i in range(4 * patients):
            tumour, label = i % 4 != 0, 1 + (i // 4) % 3
            image, mask = phantom(rng, SIZE, tumour)
            image = np.where(mask > 0, TUMOUR[label] + rng.normal(0, 0.03, mask.shape), image)
            image = np.clip(np.where((radius >= 1) & (radius < 1.2), 1.0, image), 0, 1)
            writer.append(*preprocess_pair(image, mask, SIZE), label=label, patient=f"p{i // 4}", source=f"{i}.png")
        return writer.close(folds=np.array([1 + (i // 4) % 5 for i in range(4 * patients)]))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return typed_phantoms(tmp_path_factory.mktemp("classes") / "typed.h5")


@pytest.fixture(scope="module")
def run(data) -> Path:
    out = data.parent / "run"
    result = train_segmenter(SegTrainConfig(**TINY, classes=True), data, out)
    assert result.model.outc.out_channels == 4  # background + meningioma, glioma, pituitary
    return out


def test_per_class_dice_of_hand_made_typed_masks():
    truth = np.zeros((3, 4, 4), bool)
    truth[0, :2, :2] = truth[1, 2:, 2:] = True  # slice 0 class 1, slice 1 class 2, slice 2 tumour-free (class 0)
    labels = [1, 2, 0]
    right = truth * np.array([1, 2, 0])[:, None, None]
    swapped = truth * np.array([2, 1, 0])[:, None, None]  # tumour found everywhere, classes swapped
    names = ["meningioma", "glioma", "pituitary"]
    good, bad = typed_summary(right, truth, labels, names), typed_summary(swapped, truth, labels, names)
    assert good["per_class"]["meningioma"] == {"n": 1, "dice": 1.0} and good["per_class"]["glioma"]["dice"] == 1.0
    assert good["per_class"]["pituitary"] == {"n": 0, "dice": None} and good["typing_accuracy"] == 1.0
    assert bad["per_class"]["meningioma"]["dice"] == 0.0 and bad["per_class"]["glioma"]["dice"] == 0.0
    assert bad["typing_accuracy"] == 0.0 and bad["confusion"]["meningioma"]["glioma"] == 1
    half = right.copy()
    half[0, 0, :2] = 3  # 2 of meningioma's 4 pixels called pituitary: Dice 2*2 / (2 + 4)
    scored = typed_summary(half, truth, labels, names)
    assert scored["per_class"]["meningioma"]["dice"] == pytest.approx(4 / 6)
    assert scored["dice_mean"] == pytest.approx((4 / 6 + 1) / 2)
    assert slice_classes(half).tolist() == [1, 2, 0]  # majority (2 vs 2: the lower id), none without pixels


def test_class_loss_and_tumour_score():
    masks = torch.zeros(2, 1, 4, 4)
    masks[0, 0, :2, :2] = 1
    labels = torch.tensor([3, 0])
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    target[0, :2, :2] = 3
    right = torch.nn.functional.one_hot(target, 4).permute(0, 3, 1, 2).float() * 20
    wrong = torch.nn.functional.one_hot(target.clamp(max=1) * 2, 4).permute(0, 3, 1, 2).float() * 20
    for kind in ("bce", "dice", "bce+dice"):
        good, bad = class_loss(right, masks, labels, kind), class_loss(wrong, masks, labels, kind)
        assert good.shape == (2,) and (good < 0.05).all() and bad[0] > 0.5
    probs = torch.softmax(torch.randn(3, 4, 8, 8), 1)
    assert torch.equal(tumour_score(probs) >= 0.5, probs.argmax(1) != 0)


def test_trains_records_and_loads_a_typed_model(run):
    cfg = (run / "config.yaml").read_text()
    assert "classes: true" in cfg
    assert json.loads((run / "run.json").read_text())["class_names"] == ["meningioma", "glioma", "pituitary"]
    segmenter = load_segmenter(run, device="cpu")
    assert segmenter.multiclass and segmenter.class_names == ["meningioma", "glioma", "pituitary"]
    images = np.random.default_rng(0).random((3, 1, SIZE, SIZE)).astype(np.float32)
    probs = segmenter.predict_classes(images)
    assert probs.shape == (3, 4, SIZE, SIZE) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert np.array_equal(segmenter.predict(images) >= 0.5, probs.argmax(1) != 0)  # binary = argmax != 0
    assert "val_typed_dice" in (run / "log.csv").read_text().splitlines()[0]


def test_evaluate_reports_per_class_dice_of_typed_masks(run, data):
    metrics = json.loads((run / "metrics.json").read_text())["test"]
    typed = metrics["typed"]
    assert set(typed["per_class"]) == {"meningioma", "glioma", "pituitary"}
    for row in typed["per_class"].values():
        assert row["n"] > 0 and 0.0 <= row["dice"] <= 1.0
    assert 0.0 <= typed["typing_accuracy"] <= 1.0 and {"dice", "iou", "hd95"} <= set(metrics)
    print("typed test Dice", {k: round(v["dice"], 3) for k, v in typed["per_class"].items()},
          "typing accuracy", typed["typing_accuracy"], "binary Dice", round(metrics["dice_tumour"], 3))
    flipped = evaluate(run, data, split="test", tta="hflip", min_component=3, progress=False)
    assert set(flipped["typed"]["per_class"]) == set(typed["per_class"])
    table = markdown_table(flipped)
    assert "| glioma |" in table and "Slice typing accuracy" in table


def test_segment_writes_a_binary_and_a_typed_mask_that_agree(run, tmp_path):
    rng = np.random.default_rng(7)
    slices = [phantom(rng, SIZE, True)[0] for _ in range(2)]
    np.save(tmp_path / "scan.npy", (1000 * slices[0] + 200).astype(np.int16))
    nib.save(nib.Nifti1Image(np.stack([(1000 * s + 200).astype(np.int16) for s in slices], -1), np.eye(4)),
             tmp_path / "vol.nii.gz")
    report = segment_files([tmp_path / "scan.npy", tmp_path / "vol.nii.gz"], run, tmp_path / "out", progress=False)
    assert not report["failed"]
    out = tmp_path / "out"
    for stem in ("scan", "vol_z000", "vol_z001"):
        mask = np.asarray(Image.open(out / f"{stem}_mask.png")) > 0
        typed = np.asarray(Image.open(out / f"{stem}_classes.png"))
        assert typed.dtype == np.uint8 and typed.max() <= 3
        assert np.array_equal(typed > 0, mask)
    volume_mask = np.asanyarray(nib.load(out / "vol_mask.nii.gz").dataobj)
    volume_typed = np.asanyarray(nib.load(out / "vol_classes.nii.gz").dataobj)
    assert volume_typed.shape == volume_mask.shape and np.array_equal(volume_typed > 0, volume_mask > 0)


def test_serve_answers_the_binary_mask_of_a_typed_model(run, tmp_path):
    from genseg.serve.codec import rle_decode
    from genseg.serve.testing import ServerProcess, post_json

    image = phantom(np.random.default_rng(3), SIZE, True)[0]
    png = tmp_path / "scan.png"
    Image.fromarray((image * 255).astype(np.uint8)).save(png)
    segment_files([png], run, tmp_path / "out", progress=False)
    cli_mask = np.asarray(Image.open(tmp_path / "out" / "scan_mask.png")) > 0
    body = {"instances": [{"b64": base64.b64encode(png.read_bytes()).decode()}], "parameters": {"mask_format": "rle"}}
    with ServerProcess(run, max_batch=2) as server:
        status, answer = post_json(server.port, "/predict", body)
    assert status == 200, answer
    assert np.array_equal(rle_decode(answer["predictions"][0]["mask"]) > 0, cli_mask)


def test_onnx_export_refuses_a_typed_model(run, tmp_path):
    with pytest.raises(ConfigError, match="multi-class model .*export-onnx supports binary models only"):
        export_onnx(run, tmp_path / "typed.onnx")
    assert not (tmp_path / "typed.onnx").exists()


def test_classes_on_unlabelled_data_is_a_clear_error(tmp_path, genseg_cli):
    """A folder dataset (images/ + masks/, no class folders) prepares with label -1 on every slice."""
    rng = np.random.default_rng(0)
    for i in range(10):
        image, mask = phantom(rng, SIZE, True)
        for folder, array in (("images", image * 255), ("masks", mask * 255)):
            (tmp_path / "raw" / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array.astype(np.uint8)).save(tmp_path / "raw" / folder / f"case{i}.png")
    genseg_cli("prepare", tmp_path / "raw", "--out", tmp_path / "folder.h5", "--size", SIZE)
    out = genseg_cli("train-seg", "--data", tmp_path / "folder.h5", "--size", SIZE, "--out", tmp_path / "run",
                     "--classes", "--epochs", "1", returncode=2)
    assert "folder.h5" in out.stderr and "have label -1 (unknown)" in out.stderr, out.stderr
    assert "--classes needs the tumour class of every slice with tumour" in out.stderr
    assert not (tmp_path / "run").exists()
    unnamed = write_phantoms(tmp_path / "unnamed.h5", n=20, size=SIZE, patients=10)  # labels 1..3, no names
    with pytest.raises(DataError, match="unnamed.h5: records no tumour class names"):
        train_segmenter(SegTrainConfig(**{**TINY, "epochs": 1}, classes=True), unnamed, tmp_path / "run2")


def test_binary_stays_the_default(data, tmp_path):
    cfg = SegTrainConfig(**{**TINY, "epochs": 1})
    assert cfg.classes is False
    logits, masks = torch.randn(2, 1, 8, 8), (torch.rand(2, 1, 8, 8) > 0.5).float()
    assert torch.equal(batch_loss(logits, {"mask": masks, "label": torch.tensor([1, 2])}, cfg),
                       seg_loss(logits, masks, cfg.loss))
    result = train_segmenter(cfg, data, tmp_path / "run")
    assert result.model.outc.out_channels == 1
    assert "class_names" not in json.loads((tmp_path / "run" / "run.json").read_text())
    assert "typed" not in result.metrics["test"] and not load_segmenter(tmp_path / "run").multiclass
    np.save(tmp_path / "scan.npy", (1000 * phantom(np.random.default_rng(1), SIZE, True)[0]).astype(np.int16))
    report = segment_files([tmp_path / "scan.npy"], tmp_path / "run", tmp_path / "out", progress=False)
    assert sorted(Path(p).name for p in report["written"]) == ["scan_mask.png", "scan_overlay.png"]
