"""Scoring a trained segmenter on a prepared file (`genseg evaluate`) and drawing a run's figures.

Metric conventions (empty masks, HD95, per-patient pooling, false-positive rate) are in genseg/evaluation/metrics.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.prepared import PreparedDataset, class_names, open_prepared, read_metadata
from ..errors import DataError
from ..inference.postprocess import postprocessed, predict_typed
from ..inference.segmenter import Segmenter, load_segmenter
from ..runs import CsvLog, SegTrainConfig, run_config, split_selection
from ..viz import MASK_COLOR, PREDICTION_COLOR, overlay, plot_curves, save_grid
from .metrics import score_slices, summarize
from .multiclass import typed_summary


def selection(run_dir: str | Path, data: str | Path, split: str = "test", fold: int | None = None) -> dict:
    """PreparedDataset arguments: an explicit fold, else the run's own role `split` (its fold under CV)."""
    if fold is not None:
        return {"folds": [int(fold)]}
    cfg = run_config(run_dir)
    num_folds = int(read_metadata(data)["attrs"]["num_folds"])
    return split_selection(cfg.test_fold if cfg else None, num_folds, split)


def open_split(data: str | Path, chosen: dict, segmenter, what: str = "slices") -> PreparedDataset:
    """The slices `chosen` selects from `data`; DataError when they do not fit the segmenter's size and channels,
    or when there are none (`what` names them in the message)."""
    dataset = PreparedDataset(data, **chosen)
    if (dataset.size, dataset.channels) != (segmenter.size, segmenter.channels):
        raise DataError(data, f"slices are {dataset.size}x{dataset.size} with {dataset.channels} channel(s), the "
                              f"model expects {segmenter.size}x{segmenter.size} with {segmenter.channels}")
    if len(dataset) == 0:
        raise DataError(data, f"has no {what} for {chosen}")
    return dataset


def evaluate(run_dir: str | Path, data: str | Path, split: str = "test", fold: int | None = None,
             segmenter: Segmenter | None = None, progress: bool = True,
             precision: str | None = None, tta: str = "none", min_component: int = 0,
             min_peak: float = 0.0) -> dict[str, Any]:
    """Mean and per-class Dice, IoU, HD95, per-patient Dice and the FP rate on tumour-free slices.

    `split` is the run's own train/val/test role: for a cross-validation fold run, "test" means its test fold.
    `fold=K` scores fold K of the file instead. `precision` as `load_segmenter`'s (int8: the run's int8 export).
    `tta`, `min_component` and `min_peak` as genseg.inference.postprocess's; the result records them. A
    multi-class model (`train-seg --classes`) adds "typed": per-class Dice of its typed masks and the slice-typing
    accuracy (evaluation/multiclass.py).
    """
    segmenter = postprocessed(segmenter or load_segmenter(run_dir, precision=precision), tta, min_component,
                              min_peak=min_peak)
    chosen = selection(run_dir, data, split, fold)
    dataset = open_split(data, chosen, segmenter)
    parts, typed = [], []
    for batch in tqdm(DataLoader(dataset, batch_size=segmenter.batch_size), desc="evaluate", disable=not progress):
        pred = _predict(segmenter, batch, typed) >= segmenter.threshold
        parts.append(score_slices(pred, batch["mask"][:, 0].numpy() > 0.5))
    scores = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    result = summarize(scores, dataset.labels, dataset.patients, class_names(dataset.attrs))
    if typed:
        result["typed"] = typed_summary(np.concatenate([t[0] for t in typed]), np.concatenate([t[1] for t in typed]),
                                        dataset.labels, segmenter.class_names)
    return {"data": str(data), "checkpoint": str(run_dir), "selection": chosen, "threshold": segmenter.threshold,
            "precision": segmenter.precision, "tta": tta, "min_component": min_component, "min_peak": min_peak,
            "num_slices": len(dataset),
            **result}


def _predict(segmenter, batch: dict, typed: list) -> np.ndarray:
    """The batch's tumour probabilities; a multi-class segmenter also appends (typed masks, true masks) to `typed`."""
    if not getattr(segmenter, "multiclass", False):
        return segmenter.predict(batch["image"])
    scores, classes = predict_typed(segmenter, batch["image"])
    typed.append((classes, batch["mask"][:, 0].numpy() > 0.5))
    return scores


def typed_table(typed: dict[str, Any]) -> list[str]:
    """Markdown lines for evaluate's "typed" block (multi-class models)."""

    def fmt(v) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    lines = ["", "Typed masks (Dice of the predicted against the true pixels of each class, over that class's "
                 "slices with tumour):", "", "| class | n | typed Dice |", "|---|---|---|"]
    lines += [f"| {name} | {row['n']} | {fmt(row['dice'])} |" for name, row in typed["per_class"].items()]
    lines += [f"| mean over classes | | {fmt(typed['dice_mean'])} |", "",
              f"Slice typing accuracy (majority class of the predicted tumour pixels) on {typed['typing_slices']} "
              f"slices with tumour: {fmt(typed['typing_accuracy'])}"]
    return lines


def markdown_table(result: dict[str, Any]) -> str:
    """All slices, tumour slices and each class as rows; Dice, IoU, HD95 and counts as columns."""

    def fmt(v) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    lines = [f"Evaluation of {result['checkpoint']} on {result['data']} {result['selection']} "
             f"(threshold {result['threshold']}, {result['precision']}, TTA {result['tta']}, min component "
             f"{result['min_component']} px, min peak {result['min_peak']})", "",
             "| slices | n | Dice | IoU | HD95 (px) |", "|---|---|---|---|---|",
             f"| all | {result['n']} | {fmt(result['dice'])} | {fmt(result['iou'])} | {fmt(result['hd95'])} |",
             f"| with tumour | {result['n'] - result['tumour_free_slices']} | {fmt(result['dice_tumour'])} | "
             f"{fmt(result['iou_tumour'])} | {fmt(result['hd95'])} |"]
    for name, row in result["per_class"].items():
        lines.append(f"| class {name} | {row['n']} | {fmt(row['dice'])} | {fmt(row['iou'])} | {fmt(row['hd95'])} |")
    lines += ["", f"Per-patient Dice (pooled over each patient's slices): mean {fmt(result['patient_dice_mean'])} "
                  f"over {len(result['per_patient_dice'])} patients",
              f"False-positive rate on {result['tumour_free_slices']} tumour-free slices: {fmt(result['fp_rate'])}"]
    if result.get("typed"):
        lines += typed_table(result["typed"])
    return "\n".join(lines)


def plot_run(run_dir: str | Path, data: str | Path, cfg: SegTrainConfig) -> list[Path]:
    """RUN_DIR/plots: loss curves, Dice/IoU per epoch, and image / truth / prediction / overlay grids."""
    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    rows = CsvLog(run_dir / "log.csv").rows()
    epochs = [int(r["epoch"]) for r in rows]
    column = lambda key: [float(r[key]) for r in rows]  # noqa: E731
    written = [
        plot_curves({"train": (epochs, column("train_loss")), "val": (epochs, column("val_loss"))},
                    plots / "loss.png", "epoch", f"{cfg.loss} loss", "Training and validation loss"),
        plot_curves({"val Dice": (epochs, column("val_dice")), "val IoU": (epochs, column("val_iou"))},
                    plots / "dice_iou.png", "epoch", "score", "Validation Dice and IoU (threshold 0.5)"),
    ]
    segmenter = load_segmenter(run_dir)
    for role in ("train", "val", "test"):
        dataset = PreparedDataset(data, **selection(run_dir, data, role))
        if len(dataset) == 0:
            continue
        picks = _sample_rows(dataset, cfg.plot_samples)
        items = [dataset[i] for i in picks]
        images = np.stack([item["image"].numpy() for item in items])
        preds = segmenter.predict(images) >= segmenter.threshold
        tiles = []
        for item, pred in zip(items, preds):
            image, mask = item["image"].numpy(), item["mask"][0].numpy()
            both = overlay(overlay(image, mask, MASK_COLOR), pred, PREDICTION_COLOR)
            tiles += [image, mask.astype(np.float32), pred.astype(np.float32), both]
        titles = ["image", "truth", "prediction", "truth red, pred. green"] * len(items)
        written.append(save_grid(tiles, plots / f"samples_{role}.png", ncols=4, titles=titles))
    return written


def _sample_rows(dataset: PreparedDataset, n: int) -> list[int]:
    """Evenly spaced slices with tumour plus one tumour-free slice (when there is one), to show both cases.

    Goes by the masks, not the labels: some sources keep the patient's class label on tumour-free slices."""
    with open_prepared(dataset.path) as h5:
        masks = h5["masks"]
        has_tumour = np.array([bool(masks[int(row)].any()) for row in dataset.rows])
    tumour, free = np.flatnonzero(has_tumour), np.flatnonzero(~has_tumour)
    pool = tumour if len(tumour) else np.arange(len(dataset))
    count = max(1, n - (1 if len(free) else 0))
    picks = pool[np.linspace(0, len(pool) - 1, min(count, len(pool))).round().astype(int)].tolist()
    return picks + ([int(free[len(free) // 2])] if len(free) else [])
