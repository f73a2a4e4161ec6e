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

Synthetic-data measures (used by `genseg evaluate-synthetic`, genseg/evaluation/synthetic_quality.py):
- `nearest_neighbour_distances`: per query, the smallest RMS pixel difference to a reference set (memorisation).
- `kid`: Kernel Inception Distance (Binkowski et al. 2018) on any feature vectors: the unbiased MMD^2 with the
  cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets; mean and standard deviation.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage

from ..data.records import CLASS_NAMES


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


def summarize(scores: dict[str, np.ndarray], labels: Sequence[int], patients: Sequence[str],
              class_names: dict[int, str] | None = None) -> dict:
    """Means over slices, per tumour class and per patient, plus the false-positive rate (module doc). Classes are
    named by `class_names` (the data's own, e.g. BUSI's benign / malignant / normal), else by Figshare's."""
    labels, patients = np.asarray(labels), np.asarray(patients, dtype=object)
    names = {**CLASS_NAMES, **(class_names or {})}
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
        "per_class": {names.get(int(c), str(int(c))): block(labels == c) for c in np.unique(labels)},
        "patient_dice_mean": _mean(np.array(list(per_patient.values()))),
        "per_patient_dice": per_patient,
        "fp_rate": _mean(false_alarms.astype(np.float64)),
        "tumour_free_slices": int(tumour_free.sum()),
    }


def nearest_neighbour_distances(queries: np.ndarray, references: np.ndarray, query_groups: np.ndarray | None = None,
                                reference_groups: np.ndarray | None = None, chunk: int = 512) -> np.ndarray:
    """For every query row, the RMS difference (L2 / sqrt(dim)) to its nearest reference row.

    Rows are flattened. With groups (e.g. patient ids), references of the query's own group are skipped, so a
    real slice is never matched with itself or its neighbouring slices; a query with no other group gets inf.
    """
    q = torch.as_tensor(np.asarray(queries, np.float32).reshape(len(queries), -1))
    r = torch.as_tensor(np.asarray(references, np.float32).reshape(len(references), -1))
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"queries have {q.shape[1]} values per row, references {r.shape[1]}")
    if not len(r):
        raise ValueError("no reference rows")
    grouped = query_groups is not None and reference_groups is not None
    if grouped:
        _, codes = np.unique(np.concatenate([np.asarray(query_groups, str), np.asarray(reference_groups, str)]),
                             return_inverse=True)
        q_codes, r_codes = torch.as_tensor(codes[: len(q)]), torch.as_tensor(codes[len(q):])
    out = []
    for start in range(0, len(q), chunk):
        d = torch.cdist(q[start:start + chunk].double(), r.double())
        if grouped:
            d[q_codes[start:start + chunk, None] == r_codes[None, :]] = float("inf")
        out.append(d.min(dim=1).values)
    dist = torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)
    return (dist / math.sqrt(q.shape[1])).numpy()


def kid(features_a: np.ndarray, features_b: np.ndarray, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0, bootstrap: bool = False) -> tuple[float, float]:
    """KID between two feature sets (N, D): mean and standard deviation over `num_subsets` random subsets.

    Each subset draws min(subset_size, N_a, N_b) rows of each set without replacement and computes the unbiased
    MMD^2 (diagonal kernel terms left out), so the expected value is 0 for two samples of one distribution and
    can come out slightly negative. With `bootstrap`, each subset draws min(subset_size, N) rows of each set
    *with* replacement instead, and a row drawn twice is never paired with itself: for sets no larger than
    `subset_size` the spread is then the bootstrap error of the whole sets' KID (subsets without replacement
    would all be the whole sets, with a spread of 0). The three kernel matrices are computed once (float64)
    and subsets index them, so keep each set to a few thousand rows. Needs at least 2 rows per set.
    """
    a = torch.as_tensor(np.asarray(features_a, np.float64))
    b = torch.as_tensor(np.asarray(features_b, np.float64))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected two (N, D) feature sets of equal D, got {tuple(a.shape)} and {tuple(b.shape)}")
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(a)} and {len(b)}")
    dim = a.shape[1]
    k_aa, k_bb, k_ab = ((u @ v.T / dim + 1) ** 3 for u, v in ((a, a), (b, b), (a, b)))
    g = torch.Generator().manual_seed(seed)

    def draw(n: int) -> torch.Tensor:
        """A subset as a weight vector (how often each row was drawn): its kernel sums are quadratic forms."""
        if bootstrap:
            return torch.bincount(torch.randint(n, (min(subset_size, n),), generator=g), minlength=n).double()
        return torch.zeros(n, dtype=torch.float64).index_fill_(0, torch.randperm(n, generator=g)[:m], 1)

    def within(w: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Mean kernel over pairs of different rows of one subset."""
        return (w @ k @ w - (w * w) @ k.diagonal()) / (w.sum() ** 2 - (w * w).sum())

    values = []
    for _ in range(num_subsets):
        x, y = draw(len(a)), draw(len(b))
        values.append(float(within(x, k_aa) + within(y, k_bb) - 2 * (x @ k_ab @ y) / (x.sum() * y.sum())))
    return float(np.mean(values)), float(np.std(values))
