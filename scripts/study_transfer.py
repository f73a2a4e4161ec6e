"""Does starting from a brain-MRI segmenter pay on a new domain? Fine-tuned vs from-scratch on few images.

1. Pretrain a small U-Net on the demo brain MRI (`genseg demo-data` + `genseg prepare`).
2. Write the ultrasound demo domain (`genseg demo-data --domain ultrasound`, BUSI layout) and prepare it.
3. For 5, 20 and all training images of the new domain and each seed: train once from scratch and once with
   `init_from` = the brain run (same images, same seed, same number of optimizer steps, same learning rate).
4. Report test Dice (all test images, and lesion images only) and the epochs / training seconds until the
   validation Dice first reaches 90 % of the run's best, mean ± sd over seeds: a markdown table (stdout and
   OUT/transfer.md), OUT/results.json and OUT/transfer.png.

Each run gets the same optimizer-step budget (`--steps`), so small training sets run more epochs. Finished
runs (metrics.json present) are reused when the command is repeated.

    OMP_NUM_THREADS=1 python scripts/study_transfer.py --out study-transfer   # the study (CPU: ~15-30 min)
    python scripts/study_transfer.py --out /tmp/smoke --smoke        # seconds; what CI runs
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from genseg.data.demo import make_demo_dataset
from genseg.data.demo_ultrasound import make_ultrasound_dataset
from genseg.data.prepare import prepare
from genseg.data.prepared import PreparedDataset
from genseg.io import atomic_path
from genseg.runs import CsvLog, SegTrainConfig
from genseg.training.seg import train_segmenter
from genseg.viz import plot_curves


@dataclass
class StudySettings:
    size: int = 64  # prepared image side for both domains
    base_channels: int = 8  # 0.1 s per training step of 8 images on one CPU core (width 16, depth 4: ~0.5 s)
    depth: int = 3
    brain_patients: int = 30
    brain_slices: int = 8
    brain_epochs: int = 15
    us_images: int = 100  # ultrasound images written (test fold 1, val fold 2, train the other three)
    train_sizes: tuple = (5, 20, 0)  # 0 = all training images
    seeds: tuple = (0, 1, 2)
    steps: int = 200  # optimizer steps per adaptation run, whatever the number of images
    batch_size: int = 8
    lr: float = 1e-3


SMOKE = StudySettings(size=32, base_channels=4, depth=2, brain_patients=10, brain_slices=2, brain_epochs=1,
                      us_images=20, train_sizes=(5, 0), seeds=(0,), steps=2, batch_size=4)


def seg_config(s: StudySettings, **overrides) -> SegTrainConfig:
    return SegTrainConfig(size=s.size, base_channels=s.base_channels, depth=s.depth, loss="bce+dice", lr=s.lr,
                          batch_size=s.batch_size, patience=None, plot_samples=2, **overrides)


def make_data(out: Path, s: StudySettings) -> tuple[Path, Path]:
    """Brain and ultrasound prepared files (reused when present)."""
    brain, us = out / "brain.h5", out / "ultrasound.h5"
    if not brain.exists():
        make_demo_dataset(out / "raw-brain", s.brain_patients, s.brain_slices, s.size, seed=0, force=True,
                          progress=False)
        prepare(out / "raw-brain", brain, size=s.size, progress=False)
    if not us.exists():
        make_ultrasound_dataset(out / "raw-ultrasound", s.us_images, s.size, seed=0, force=True, progress=False)
        prepare(out / "raw-ultrasound", us, size=s.size, progress=False)
    return brain, us


def time_to_90(run: Path) -> tuple[int, float]:
    """(epoch, training seconds) at which validation Dice first reached 90 % of the run's best."""
    rows = CsvLog(run / "log.csv").rows()
    dice = np.array([float(r["val_dice"]) for r in rows])
    first = int(np.flatnonzero(dice >= 0.9 * dice.max())[0])
    return int(rows[first]["epoch"]), float(rows[first]["seconds"])


def run_once(cfg: SegTrainConfig, data: Path, run: Path) -> dict:
    if not (run / "metrics.json").exists():
        train_segmenter(cfg, data, run, resume=any((run / "checkpoints").glob("step-*")))
    test = json.loads((run / "metrics.json").read_text())["test"]
    epochs, seconds = time_to_90(run)
    return {"dice": test["dice"], "dice_tumour": test["dice_tumour"], "epochs_to_90": epochs,
            "seconds_to_90": seconds, "epochs": cfg.epochs}


def run_study(out: str | Path, s: StudySettings) -> dict:
    out = Path(out)
    started = time.perf_counter()
    brain, us = make_data(out, s)
    pretrained = out / "runs" / "brain"
    if not (pretrained / "metrics.json").exists():
        train_segmenter(seg_config(s, epochs=s.brain_epochs), brain, pretrained)
    brain_test = json.loads((pretrained / "metrics.json").read_text())["test"]
    available = len(PreparedDataset(us, split="train"))  # one image = one patient in the BUSI layout
    results = []
    for wanted in s.train_sizes:
        n = available if wanted == 0 or wanted > available else wanted
        steps_per_epoch = math.ceil(n / s.batch_size)
        epochs = max(1, math.ceil(s.steps / steps_per_epoch))
        for seed in s.seeds:
            for arm, init in (("scratch", None), ("fine-tuned", str(pretrained))):
                cfg = seg_config(s, epochs=epochs, seed=seed, real_fraction=n / available, init_from=init)
                run = out / "runs" / f"{arm}-n{n}-seed{seed}"
                results.append({"arm": arm, "n": n, "seed": seed, **run_once(cfg, us, run)})
    summary = {"settings": asdict(s), "brain_test_dice": brain_test["dice"], "train_available": available,
               "runs": results, "seconds": time.perf_counter() - started}
    summary["table"] = markdown(summary)
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    with atomic_path(out / "transfer.md") as tmp:
        tmp.write_text(summary["table"] + "\n")
    plot(summary, out / "transfer.png")
    return summary


def stats(summary: dict, arm: str, n: int, key: str) -> tuple[float, float]:
    values = np.array([r[key] for r in summary["runs"] if r["arm"] == arm and r["n"] == n], dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def markdown(summary: dict) -> str:
    sizes = sorted({r["n"] for r in summary["runs"]})
    seeds = len({r["seed"] for r in summary["runs"]})
    lines = ["| training images | arm | test Dice (all) | test Dice (lesion images) | epochs to 90 % | "
             "seconds to 90 % | epochs run |", "|---|---|---|---|---|---|---|"]
    for n in sizes:
        for arm in ("scratch", "fine-tuned"):
            cells = []
            for key, digits in (("dice", 3), ("dice_tumour", 3), ("epochs_to_90", 1), ("seconds_to_90", 1)):
                mean, sd = stats(summary, arm, n, key)
                cells.append(f"{mean:.{digits}f} ± {sd:.{digits}f}")
            epochs = next(r["epochs"] for r in summary["runs"] if r["n"] == n)
            lines.append(f"| {n} | {arm} | " + " | ".join(cells) + f" | {epochs} |")
    lines.append(f"\nmean ± sd over {seeds} seed(s); pretrained brain model test Dice "
                 f"{summary['brain_test_dice']:.3f}; {summary['train_available']} ultrasound training images "
                 f"available; study took {summary['seconds']:.0f} s.")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> Path:
    sizes = sorted({r["n"] for r in summary["runs"]})
    series = {}
    for arm in ("scratch", "fine-tuned"):
        for key, name in (("dice", "Dice"), ("dice_tumour", "lesion Dice")):
            series[f"{arm} {name}"] = (sizes, [stats(summary, arm, n, key)[0] for n in sizes])
    return plot_curves(series, path, "ultrasound training images", "test Dice (mean over seeds)",
                       "Brain-pretrained vs from scratch on ultrasound")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="study-transfer", help="Folder for data, runs, table and figure.")
    parser.add_argument("--smoke", action="store_true", help="Tiny sizes and one seed: checks the script runs.")
    parser.add_argument("--seeds", type=int, help="Number of seeds (default 3).")
    parser.add_argument("--steps", type=int, help="Optimizer steps per adaptation run (default 200).")
    args = parser.parse_args()
    s = SMOKE if args.smoke else StudySettings()
    if args.seeds:
        s.seeds = tuple(range(args.seeds))
    if args.steps:
        s.steps = args.steps
    summary = run_study(args.out, s)
    print(summary["table"])
    print(f"wrote {Path(args.out) / 'transfer.md'}, results.json and transfer.png")


if __name__ == "__main__":
    main()
