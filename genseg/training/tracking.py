"""Experiment tracking (`--report-to tensorboard|wandb|mlflow`) through accelerate's trackers.

log.csv stays the run's source of truth (resume truncates it, the plots and reports read it); a tracker gets a
copy of every log row (losses, metrics, learning rate) and the run's image grids, so runs can be compared in the
tool a team already uses. accelerate's trackers are used rather than each tool's client so that multi-process
runs log once, from the main process, as the rest of the loop does. TensorBoard's event files go to
RUN_DIR/tracking/<command>.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator
from PIL import Image

from ..errors import ConfigError

REPORT_TO = ("none", "tensorboard", "wandb", "mlflow")
TRACKING_DIR = "tracking"
PACKAGES = {"tensorboard": "tensorboard (pip install 'genseg[tensorboard]')", "wandb": "wandb (pip install wandb)",
            "mlflow": "mlflow (pip install mlflow)"}


def tracker_name(report_to: str) -> str | None:
    """accelerate's `log_with` for a --report-to value (None for "none"); ConfigError when the tool's package is
    not installed, before anything of the run is written."""
    if report_to not in REPORT_TO:
        raise ConfigError(f"report_to must be one of {', '.join(REPORT_TO)}, got {report_to!r}")
    if report_to == "none":
        return None
    if importlib.util.find_spec(report_to) is None:
        raise ConfigError(f"--report-to {report_to} needs the {PACKAGES[report_to]}")
    return report_to


def accelerator_tracking(report_to: str, run_dir: Path) -> dict[str, Any]:
    """The Accelerator arguments that send its `log` calls to the chosen tracker."""
    name = tracker_name(report_to)
    return {"log_with": name, "project_dir": str(Path(run_dir) / TRACKING_DIR)} if name else {}


def start_tracking(accelerator: Accelerator, command: str, cfg: Any) -> None:
    """Open the trackers (main process only, as accelerate does), with the run's config as hyperparameters."""
    if accelerator.log_with:
        accelerator.init_trackers(command, config=_hyperparameters(dataclasses.asdict(cfg)))


def _hyperparameters(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config as flat `model.sample_size` keys with the plain types every tracker accepts."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_hyperparameters(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def log_row(accelerator: Accelerator, row: dict[str, Any], step: int) -> None:
    """A log.csv row's numbers as scalars at `step` (a no-op without trackers)."""
    numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
               and k not in ("step",)}
    if accelerator.trackers and numbers:
        accelerator.log(numbers, step=step)


def log_image_files(accelerator: Accelerator, images: dict[str, Path], step: int) -> None:
    """PNG figures the run wrote (sample and prediction grids) as tracker images at `step`."""
    for tracker in accelerator.trackers if accelerator.is_main_process else []:
        for name, path in images.items():
            if tracker.name == "mlflow":  # mlflow keeps files, not image series
                tracker.log_artifact(str(path), artifact_path="images")
                continue
            pixels = np.asarray(Image.open(path).convert("RGB"))
            if tracker.name == "tensorboard":
                tracker.log_images({name: pixels[None]}, step=step, dataformats="NHWC")
            else:
                tracker.log_images({name: [pixels]}, step=step)


def finish_tracking(accelerator: Accelerator) -> None:
    """Close the trackers. Not accelerator.end_training(): that also destroys the process group, which
    cross-validate still needs for its next fold."""
    for tracker in accelerator.trackers:
        tracker.finish()
