"""Run directories: what a training run leaves on disk, read back by everything that uses a trained model.

A train-seg run holds config.yaml (the resolved `SegTrainConfig`), run.json (data and provenance), model/, log.csv
(`CsvLog`) and checkpoints/; a train-diffusion run is a diffusers pipeline folder plus the same training files.
Both trainers start, resume and refuse runs through `default_run_dir`, `resolve_config`, `check_resume` and
`refuse_to_overwrite` here; inference and evaluation read a run's threshold, size and folds through
`run_config` and `split_selection` without importing the trainers (or accelerate).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from .config import load_config
from .data.augment import AUGMENT_KEYS, PairedAugment
from .errors import CheckpointError, ConfigError
from .io import atomic_path

FREEZE_PARTS = ("none", "encoder", "encoder+bottleneck")  # what `freeze` may keep of init_from (training/transfer.py)
Config = TypeVar("Config")


@dataclass
class SegTrainConfig:
    """Everything a segmentation run depends on; written to RUN_DIR/config.yaml and read back by every user."""

    size: int = 256  # must equal the prepared file's size (`genseg prepare --size`)
    base_channels: int = 64  # filters of the first level; the paper's 64 gives 64 -> 1024
    depth: int = 4  # number of down-sampling steps
    loss: Literal["bce", "dice", "bce+dice"] = "bce"
    lr: float = 1e-3
    lr_schedule: Literal["constant", "cosine", "polynomial", "linear"] = "constant"  # over the run (schedule.py)
    warmup_steps: int = 0  # optimizer steps of linear learning-rate warm-up
    batch_size: int = 8
    epochs: int | None = 50  # the run ends at the first of epochs, max_steps and time_budget; None = no epoch cap
    max_steps: int | None = None  # optimizer steps; None = no step cap
    time_budget: float | None = None  # minutes of wall time, validation included; None = no time cap
    patience: int | None = 10  # epochs without a better validation score before stopping; None = never
    monitor: Literal["dice", "iou"] = "dice"
    threshold: float = 0.5  # probability at which a pixel counts as tumour (metrics and `segment`)
    seed: int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    channels_last: bool = False  # NHWC weights and inputs: faster on GPUs with AMP; measure on CPU first
    gradient_checkpointing: bool = False  # recompute each level in backward: 0.64x memory, 1.05-1.4x step time
    # augmentation of training slices (data/augment.py: what each does, with nnU-Net's probabilities); 0 = off
    hflip: bool = True
    vflip: bool = False
    max_rotation: float = 10.0  # degrees
    scale_range: float = 0.0  # zoom by U(1 - r, 1 + r)
    elastic_alpha: float = 0.0  # elastic deformation strength (torchvision's alpha)
    brightness: float = 0.0  # multiply by U(1 - b, 1 + b)
    contrast: float = 0.0  # contrast factor U(1 - c, 1 + c)
    gamma: float = 0.0  # intensity ** U(1 - g, 1 + g)
    noise_std: float = 0.0  # Gaussian noise of sigma up to this
    blur_sigma: float = 0.0  # Gaussian blur of sigma up to this (pixels)
    low_resolution: float = 0.0  # down-sample by up to this share and back
    num_workers: int = 0
    eval_batch_size: int = 16
    test_fold: int | None = None  # None: the file's own split; K: test fold K, val fold K % num_folds + 1
    synthetic_ratio: float = 0.0  # share of each training epoch drawn from the synthetic file (mixing.py)
    foreground_fraction: float | None = None  # share of an epoch's real slices with tumour (mixing.py); None = as drawn
    real_fraction: float = 1.0  # share of real training patients kept (seeded)
    min_agreement: float | None = None  # keep synthetic slices whose quality_agreement >= this
    min_nn_ratio: float | None = None  # keep synthetic slices whose quality_nn_ratio >= this
    # BatchNorm statistics recomputed before each validation from this many unaugmented real training slices (the
    # running averages lag behind fast-moving weights: high learning rates, few steps; training/batchnorm.py);
    # 0 = keep the running averages. Off by default: on the recipe benchmark it did not pay (docs/recipe-benchmark.md)
    bn_stat_slices: int = 0
    # Validate and save an exponential moving average of the weights with this decay (training/averaging.py);
    # null = the weights as they are. With bn_stat_slices its BatchNorm statistics are its own.
    ema_decay: float | None = None
    plot_samples: int = 4  # slices per split in the sample grids
    init_from: str | None = None  # start from this trained segmenter (run dir, model/ or pipeline folder); transfer.py
    freeze: Literal["none", "encoder", "encoder+bottleneck"] = "none"  # parts kept at init_from's weights
    report_to: Literal["none", "tensorboard", "wandb", "mlflow"] = "none"  # a tracker's copy of log.csv (tracking.py)
    classes: bool = False  # K+1-channel softmax head: segment and type the tumour (training/multiclass.py)

    def __post_init__(self):
        checks = [
            (self.size > 0 and self.size % 2**self.depth == 0, f"size {self.size} must be a positive multiple of "
                                                               f"2**depth = {2**self.depth}"),
            (self.base_channels > 0 and self.depth > 0, "base_channels and depth must be positive"),
            (self.lr > 0 and self.batch_size > 0, "lr and batch_size must be positive"),
            (self.epochs is None or self.epochs > 0, f"epochs must be positive (or null for no cap), got {self.epochs}"),
            (self.max_steps is None or self.max_steps > 0,
             f"max_steps must be positive (or null for no cap), got {self.max_steps}"),
            (self.time_budget is None or self.time_budget > 0,
             f"time_budget must be a positive number of minutes (or null for none), got {self.time_budget}"),
            (any(v is not None for v in (self.epochs, self.max_steps, self.time_budget)),
             "set at least one of epochs, max_steps and time_budget: nothing would end the run"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (self.bn_stat_slices >= 0, f"bn_stat_slices must be >= 0, got {self.bn_stat_slices}"),
            (self.ema_decay is None or 0.0 < self.ema_decay < 1.0,
             f"ema_decay must be in (0, 1) (or null for off), got {self.ema_decay}"),
            (0.0 < self.threshold < 1.0, f"threshold must be in (0, 1), got {self.threshold}"),
            (0.0 <= self.synthetic_ratio <= 1.0, f"synthetic_ratio must be in [0, 1], got {self.synthetic_ratio}"),
            (0.0 < self.real_fraction <= 1.0, f"real_fraction must be in (0, 1], got {self.real_fraction}"),
            (self.foreground_fraction is None or 0.0 <= self.foreground_fraction <= 1.0,
             f"foreground_fraction must be in [0, 1] (or null for off), got {self.foreground_fraction}"),
            (self.patience is None or self.patience > 0, "patience must be positive (or null to disable)"),
            (self.freeze in FREEZE_PARTS, f"freeze: unknown part {self.freeze!r}; choose one of {list(FREEZE_PARTS)}"),
            (self.freeze == "none" or self.init_from is not None,
             f"freeze {self.freeze!r} needs init_from (--init-from): a network trained from scratch has nothing to keep"),
        ]
        for ok, problem in checks:
            if not ok:
                raise ConfigError(problem)
        try:
            self.augmentation()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def augmentation(self) -> PairedAugment:
        """The paired augmentation of training slices these settings switch on."""
        return PairedAugment(**{key: getattr(self, key) for key in AUGMENT_KEYS})


def run_config(run_dir: str | Path) -> SegTrainConfig | None:
    """A train-seg run's config.yaml, or None when `run_dir` has none (a model/ or pipeline folder)."""
    path = Path(run_dir) / "config.yaml"
    return load_config(SegTrainConfig, path) if path.exists() else None


def split_selection(test_fold: int | None, num_folds: int, role: str) -> dict[str, Any]:
    """PreparedDataset arguments for role train/val/test: the file's split, or folds when test_fold is set."""
    if test_fold is None:
        return {"split": role}
    if not 1 <= test_fold <= num_folds:
        raise ConfigError(f"test_fold must be in 1..{num_folds} (the data has {num_folds} folds), got {test_fold}")
    if num_folds < 3:
        raise ConfigError(f"cross-validation needs at least 3 folds (test, val, train), the data has {num_folds}")
    val_fold = test_fold % num_folds + 1
    folds = {"test": [test_fold], "val": [val_fold],
             "train": [k for k in range(1, num_folds + 1) if k not in (test_fold, val_fold)]}
    return {"folds": folds[role]}


def default_run_dir(kind: str = "seg") -> Path:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("pass --out when launching several processes (each would pick its own default name)")
    return Path("checkpoints") / f"{kind}-{_dt.datetime.now():%Y%m%d-%H%M%S}"


def resolve_config(cls: type[Config], config: str | Path | None, overrides: dict[str, Any], out: str | Path | None,
                   resume: bool) -> Config:
    """The `cls` config a run uses: --config (or, on --resume without one, the run's own config.yaml) plus the
    flags the user gave."""
    if config is None and resume and out is not None and (Path(out) / "config.yaml").exists():
        config = Path(out) / "config.yaml"
    return load_config(cls, config, overrides)


def check_resume(cfg: Any, out: Path, resumable: set[str], command: str) -> dict:
    """Refuse to continue a run whose saved config differs from `cfg` in a key outside `resumable`; the run's
    run.json (data provenance), which the trainer compares with the data it was given."""
    if not (out / "config.yaml").exists():
        raise CheckpointError(f"{out}: nothing to resume (no config.yaml; is this a {command} run directory?)")
    saved = dataclasses.asdict(load_config(type(cfg), out / "config.yaml"))
    changed = sorted(k for k, v in dataclasses.asdict(cfg).items() if saved[k] != v and k not in resumable)
    if changed:
        raise ConfigError(f"{out}: cannot resume with changed settings {changed} (only {sorted(resumable)} may "
                          f"change); start a new run with another --out instead")
    return json.loads((out / "run.json").read_text())


def refuse_to_overwrite(run_dir: Path) -> None:
    """A new run must not mix its checkpoints and log rows with those of a run already in `run_dir`."""
    if any((run_dir / "checkpoints").glob("step-*")):
        raise ConfigError(f"{run_dir} already holds a training run; pass --resume to continue it or choose another --out")


class CsvLog:
    """Append-only CSV; a row with new keys widens the header. On resume, rows past the checkpoint are dropped."""

    def __init__(self, path: Path):
        self.path = path
        self._fields: list[str] | None = None

    def append(self, row: dict[str, Any]) -> None:
        row = {k: _fmt(v) for k, v in row.items()}
        if self._fields is None:
            self._fields = list(self.rows()[0]) if self.path.exists() and self.rows() else []
        missing = [k for k in row if k not in self._fields]
        if missing or not self.path.exists():
            self._fields += missing
            self._write(self.rows() + [row])
            return
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self._fields).writerow(row)

    def rows(self) -> list[dict[str, str]]:
        if not self.path.exists():
            return []
        with self.path.open(newline="") as f:
            return list(csv.DictReader(f))

    def truncate_after(self, key: str, value: int) -> None:
        rows = self.rows()
        kept = [r for r in rows if int(r[key]) <= value]
        if len(kept) != len(rows):
            self._fields = list(rows[0])
            self._write(kept)

    def _write(self, rows: list[dict[str, Any]]) -> None:
        with atomic_path(self.path) as tmp, tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self._fields, restval="")
            writer.writeheader()
            writer.writerows(rows)


def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v
