"""Segmentation metrics: Dice, IoU (Jaccard), HD95, and their per-class / per-patient aggregation.

Conventions (binary masks; predictions are thresholded probabilities, `>= threshold`, 0.5 by default):
- Dice = 2|P∩G| / (|P|+|G|) and IoU = |P∩G| / |P∪G| per slice. When prediction and ground truth are both
  empty the slice was segmented perfectly: Dice = IoU = 1, and these slices enter every mean like any other.
  `dice_tumour` / `iou_tumour` additionally average only over slices whose ground truth has tumour, the number
  most papers report.
- HD95 (pixels) is the larger of the two directed 95th percentiles of boundary-to-boundary distances
  (MONAI's convention). Both empty: 0. Exactly one empty: the image diagonal, the largest distance the image
  allows, so a missed tumour is penalised instead of silently dropped. The reported mean covers slices with
  tumour in the ground truth; false alarms on tumour-free slices are counted by `fp_rate` instead.
- Per-patient Dice pools all of a patient's slices (sum of overlaps over sum of sizes, a volume Dice);
  patients with no tumour and no prediction anywhere score 1.
- fp_rate: share of tumour-free slices (empty ground truth) on which the prediction has at least one pixel.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import ndimage

from .data.records import CLASS_NAMES


def overlap_counts(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per slice |P∩G|, |P|, |G| for boolean stacks (N, H, W)."""
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    axes = tuple(range(1, pred.ndim))
    return (pred & target).sum(axes), pred.sum(axes), target.sum(axes)


def dice_from_counts(inter, pred_sum, target_sum) -> np.ndarray:
    """Dice with the both-empty = 1 convention (works on scalars and arrays)."""
    inter, total = np.asarray(inter, np.float64), np.asarray(pred_sum, np.float64) + np.asarray(target_sum, np.float64)
    return np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)


def iou_from_counts(inter, pred_sum, target_sum) -> np.ndarray:
    """IoU with the both-empty = 1 convention."""
    inter = np.asarray(inter, np.float64)
    union = np.asarray(pred_sum, np.float64) + np.asarray(target_sum, np.float64) - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def dice_iou(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice Dice and IoU of boolean stacks (N, H, W)."""
    counts = overlap_counts(pred, target)
    return dice_from_counts(*counts), iou_from_counts(*counts)


def _boundary(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(pred: np.ndarray, target: np.ndarray) -> float:
    """95th-percentile symmetric Hausdorff distance in pixels between two 2-D boolean masks (see module doc)."""
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    if not pred.any() and not target.any():
        return 0.0
    if not pred.any() or not target.any():
        return float(math.hypot(*pred.shape))
    pred_edge, target_edge = _boundary(pred), _boundary(target)
    to_target = ndimage.distance_transform_edt(~target_edge)[pred_edge]
    to_pred = ndimage.distance_transform_edt(~pred_edge)[target_edge]
    return float(max(np.percentile(to_target, 95), np.percentile(to_pred, 95)))


def score_slices(pred: np.ndarray, target: np.ndarray) -> dict[str, np.ndarray]:
    """Everything the summaries need, per slice: dice, iou, hd95 and the raw overlap counts."""
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    inter, pred_sum, target_sum = overlap_counts(pred, target)
    return {
        "dice": dice_from_counts(inter, pred_sum, target_sum),
        "iou": iou_from_counts(inter, pred_sum, target_sum),
        "hd95": np.array([hd95(p, t) for p, t in zip(pred, target)]),
        "inter": inter, "pred_sum": pred_sum, "target_sum": target_sum,
    }


def _mean(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if len(values) else None


def summarize(scores: dict[str, np.ndarray], labels: Sequence[int], patients: Sequence[str]) -> dict:
    """Means over slices, per tumour class and per patient, plus the false-positive rate (module doc)."""
    labels, patients = np.asarray(labels), np.asarray(patients, dtype=object)
    has_tumour = scores["target_sum"] > 0
    tumour_free = ~has_tumour

    def block(sel: np.ndarray) -> dict:
        return {
            "n": int(sel.sum()),
            "dice": _mean(scores["dice"][sel]),
            "iou": _mean(scores["iou"][sel]),
            "hd95": _mean(scores["hd95"][sel & has_tumour]),
        }

    per_patient = {}
    for patient in sorted(set(patients.tolist())):
        sel = patients == patient
        per_patient[str(patient)] = float(dice_from_counts(
            scores["inter"][sel].sum(), scores["pred_sum"][sel].sum(), scores["target_sum"][sel].sum()))
    false_alarms = (scores["pred_sum"][tumour_free] > 0)
    return {
        **block(np.ones(len(labels), bool)),
        "dice_tumour": _mean(scores["dice"][has_tumour]),
        "iou_tumour": _mean(scores["iou"][has_tumour]),
        "per_class": {CLASS_NAMES.get(int(c), str(int(c))): block(labels == c) for c in np.unique(labels)},
        "patient_dice_mean": _mean(np.array(list(per_patient.values()))),
        "per_patient_dice": per_patient,
        "fp_rate": _mean(false_alarms.astype(np.float64)),
        "tumour_free_slices": int(tumour_free.sum()),
    }
