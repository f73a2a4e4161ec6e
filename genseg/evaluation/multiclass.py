"""Scoring a multi-class model's typed masks (`train-seg --classes`; genseg/inference/multiclass.py makes them).

`typed_summary`: per class k, the mean over the slices of class k that have tumour of the Dice between the
predicted class-k pixels and the true tumour pixels; the slice-typing accuracy over slices with tumour; and the
confusion of true against predicted slice classes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..inference.multiclass import slice_classes
from .metrics import dice_from_counts


def typed_summary(pred_typed: np.ndarray, truth: np.ndarray, labels: Sequence[int], names: Sequence[str]) -> dict:
    """Per-class Dice of typed masks, slice-typing accuracy and confusion (module doc). `pred_typed` (N, H, W)
    holds classes 0..K, `truth` (N, H, W) the binary tumour masks, `labels` (N,) the slices' classes."""
    pred_typed, truth, labels = np.asarray(pred_typed), np.asarray(truth, bool), np.asarray(labels)
    has_tumour = truth.reshape(len(truth), -1).any(1)
    per_class = {}
    for k, name in enumerate(names, start=1):
        sel = has_tumour & (labels == k)
        pred_k = (pred_typed[sel] == k).reshape(int(sel.sum()), truth[0].size)
        true_k = truth[sel].reshape(int(sel.sum()), truth[0].size)
        dice = dice_from_counts((pred_k & true_k).sum(1), pred_k.sum(1), true_k.sum(1))
        per_class[name] = {"n": int(sel.sum()), "dice": float(dice.mean()) if len(dice) else None}
    predicted = slice_classes(pred_typed)
    all_names = ["none", *names]
    confusion = {all_names[t]: {all_names[p]: int(((labels == t) & (predicted == p) & has_tumour).sum())
                                for p in range(len(all_names))} for t in range(1, len(all_names))}
    typed = has_tumour & (labels >= 1) & (labels <= len(names))
    dices = [row["dice"] for row in per_class.values() if row["dice"] is not None]
    return {"class_names": list(names), "per_class": per_class,
            "dice_mean": float(np.mean(dices)) if dices else None,
            "typing_accuracy": float((predicted[typed] == labels[typed]).mean()) if typed.any() else None,
            "typing_slices": int(typed.sum()), "confusion": confusion}
