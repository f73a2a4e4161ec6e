"""`--report-to`: tiny real trainings with TensorBoard, read back from their event files, and a clear error for a
tracker whose package is missing. log.csv stays the record: the tracker holds a copy of its rows."""

from __future__ import annotations

import importlib.util

import pytest

from genseg.runs import CsvLog, SegTrainConfig
from genseg.training.diffusion import train_diffusion
from genseg.training.seg import train_segmenter
from genseg.training.tracking import TRACKING_DIR

from diffusion_helpers import tiny_config
from seg_helpers import one_torch_thread, write_phantoms  # noqa: F401 (autouse fixture)

pytest.importorskip("tensorboard", reason="the tensorboard extra: pip install 'genseg[tensorboard]'")


def events(run_dir, command):
    """(scalar tag -> number of events, image tag -> number of events) of the run's TensorBoard files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = run_dir / TRACKING_DIR / command
    assert any(folder.glob("events.out.tfevents.*")), list(folder.rglob("*"))
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    return ({tag: len(accumulator.Scalars(tag)) for tag in tags["scalars"]},
            {tag: len(accumulator.Images(tag)) for tag in tags["images"]})


def test_train_seg_reports_every_log_row_and_the_prediction_grids(tmp_path):
    data = write_phantoms(tmp_path / "data.h5", n=20, size=32, patients=10)
    cfg = SegTrainConfig(size=32, base_channels=4, depth=2, batch_size=4, epochs=2, patience=None, hflip=False,
                         max_rotation=0.0, plot_samples=2, report_to="tensorboard")
    run = train_segmenter(cfg, data, tmp_path / "run", cpu=True).run_dir
    scalars, images = events(run, "train-seg")
    rows = CsvLog(run / "log.csv").rows()
    assert len(rows) == 2
    for tag in ("train_loss", "val_loss", "val_dice", "val_iou", "lr"):
        assert scalars[tag] == len(rows), (tag, scalars)  # one event per log.csv row
    assert {"samples_train", "samples_val", "samples_test"} <= set(images) and all(n == 1 for n in images.values())
    print(f"train-seg: scalars {scalars}, images {images}")


def test_train_diffusion_reports_losses_lr_and_sample_grids(tmp_path):
    data = write_phantoms(tmp_path / "data.h5", n=8, size=16, patients=4)
    cfg = tiny_config(max_steps=4, log_every_steps=2, sample_every_steps=2, sample_count=4, sample_steps=2,
                      report_to="tensorboard")
    run = train_diffusion(cfg, data, tmp_path / "run", cpu=True).run_dir
    scalars, images = events(run, "train-diffusion")
    step_rows = [r for r in CsvLog(run / "log.csv").rows() if r.get("loss")]
    assert scalars["loss"] == len(step_rows) == 2 and scalars["lr"] >= 2 and scalars["ema_decay"] == 2
    assert scalars["train_loss"] >= 1  # the epoch rows
    assert images == {"samples": 2}  # the grids at steps 2 and 4
    print(f"train-diffusion: scalars {scalars}, images {images}")


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_tracker_without_its_package_is_a_clear_error(tracker, tmp_path, genseg_cli):
    if importlib.util.find_spec(tracker) is not None:
        pytest.skip(f"{tracker} is installed here; the error is for machines without it")
    data = write_phantoms(tmp_path / "data.h5", n=8, size=32, patients=4)
    out = genseg_cli("train-seg", "--data", data, "--out", tmp_path / "run", "--size", "32", "--epochs", "1",
                     "--report-to", tracker, "--cpu", returncode=2)
    assert f"--report-to {tracker} needs the {tracker}" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
