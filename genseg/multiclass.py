"""The multi-class option (`train-seg --classes`, issue 14 item 6): one U-Net that segments and types the tumour.

The network's head has K + 1 output channels, softmax over background (0) and the K tumour classes the prepared
file records (its metadata `class_names`, ids 1..K: Figshare's meningioma, glioma, pituitary; BUSI's benign,
malignant). The training target of a pixel is 0 outside the tumour mask and the slice's label inside it, so every
slice with tumour needs a known label (1..K); `class_names` refuses data where that is not so.

Loss: softmax cross-entropy for "bce" and a soft Dice averaged over the K foreground classes for "dice" (both for
"bce+dice"), the multi-class counterparts of the binary choices.

At inference the binary tumour mask stays what every consumer of `Segmenter.predict` (segment, serve, pipeline,
TTA, small-component removal) thresholds: `tumour_score` = p_best / (p_best + p_background), with p_best the
largest foreground class probability, is >= 0.5 exactly where the argmax is a tumour class (ties count as tumour),
so at the default threshold the binary mask is "argmax != 0". The typed mask gives each pixel of the binary mask
its most likely tumour class (1..K), 0 elsewhere; a slice's predicted class is the majority class of its
predicted tumour pixels (0 when there are none). TTA averages the softmax probabilities before either is taken.

`typed_summary` scores typed masks: per class k, the mean over the slices of class k that have tumour of the
Dice between the predicted class-k pixels and the true tumour pixels; the slice-typing accuracy over slices with
tumour; and the confusion of true against predicted slice classes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError


def class_names(data: str | Path, rows: Sequence[np.ndarray] = ()) -> list[str]:
    """Names of tumour classes 1..K of a prepared file, after checking that every slice with tumour among `rows`
    (arrays of row numbers, e.g. the training and validation slices) has a label in 1..K; DataError naming the
    file and the value otherwise."""
    from .data.prepared import read_metadata
    from .training.mixing import tumour_slices

    meta = read_metadata(data)
    recorded = (meta["attrs"].get("metadata") or {}).get("class_names") or {}
    names = {int(k): str(v) for k, v in recorded.items() if int(k) > 0}
    for chosen in rows:
        chosen = np.asarray(chosen, dtype=np.int64)
        labels = meta["labels"][chosen]
        unknown = (labels < 1) | (labels > max(names)) if names else labels < 1
        bad = tumour_slices(data, chosen) & unknown
        if bad.any():
            value = int(labels[bad][0])
            meaning = "unknown" if value < 0 else "no tumour" if value == 0 else "not a recorded class"
            raise DataError(data, f"--classes needs the tumour class of every slice with tumour, but "
                                  f"{int(bad.sum())} slice(s) with a tumour mask have label {value} ({meaning}); "
                                  f"train without --classes, or prepare labelled data (Figshare, BUSI class folders)",
                            f"the first: {meta['sources'][chosen[bad][0]]}")
    if not names:
        raise DataError(data, "records no tumour class names (metadata class_names with ids 1..K), so --classes has "
                              "no classes to learn; prepare labelled data (Figshare, BUSI class folders) or train "
                              "without --classes", f"class_names: {json.dumps(recorded) if recorded else 'missing'}")
    if sorted(names) != list(range(1, len(names) + 1)):
        raise DataError(data, f"tumour class ids {sorted(names)} are not 1..{len(names)}; --classes needs them so")
    return [names[k] for k in range(1, len(names) + 1)]


def pixel_targets(masks: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Class per pixel (N, H, W) long: 0 outside the mask (N, 1, H, W), the slice's label inside."""
    return (masks[:, 0] > 0.5).long() * labels.long().clamp(min=0).view(-1, 1, 1)


def class_loss(logits: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-slice loss (N,) of (N, K+1, H, W) logits: cross-entropy for "bce", soft Dice over the foreground classes
    (smooth 1, so a class absent from a slice pushes its probabilities towards 0) for "dice", or both."""
    logits = logits.float()
    target = pixel_targets(masks, labels)
    loss = torch.zeros(logits.shape[0], device=logits.device)
    if "bce" in kind:
        loss = loss + F.cross_entropy(logits, target, reduction="none").mean((1, 2))
    if "dice" in kind:
        probs = torch.softmax(logits, dim=1)[:, 1:]
        onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
        soft_dice = (2 * (probs * onehot).sum((2, 3)) + 1) / (probs.sum((2, 3)) + onehot.sum((2, 3)) + 1)
        loss = loss + 1 - soft_dice.mean(1)
    return loss


def tumour_score(probabilities: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """(N, H, W) from softmax probabilities (N, K+1, H, W): >= 0.5 exactly where a tumour class is the most likely."""
    if isinstance(probabilities, torch.Tensor):
        best = probabilities[:, 1:].amax(1)
        return best / (best + probabilities[:, 0]).clamp(min=1e-12)
    probabilities = np.asarray(probabilities, np.float32)
    best = probabilities[:, 1:].max(1)
    return best / np.maximum(best + probabilities[:, 0], np.float32(1e-12))


def typed_masks(probabilities: np.ndarray, tumour: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W): the most likely tumour class (1..K) of every pixel of the binary masks `tumour`, else 0."""
    return np.where(tumour, 1 + np.asarray(probabilities)[:, 1:].argmax(1), 0).astype(np.uint8)


def predict_typed(segmenter, images, threshold: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(tumour scores (N, H, W) as `segmenter.predict` returns them, typed masks (N, H, W) uint8) from one
    prediction of a multi-class Segmenter, or a PostProcessed one (TTA on the softmax, small components dropped
    from both)."""
    from .postprocess import drop_small_components

    threshold = segmenter.threshold if threshold is None else threshold
    probabilities = segmenter.predict_classes(images)
    scores = drop_small_components(tumour_score(probabilities), threshold, getattr(segmenter, "min_component", 0))
    return scores, typed_masks(probabilities, scores >= threshold)


def slice_classes(typed: np.ndarray) -> np.ndarray:
    """Per slice the majority class of its typed mask's tumour pixels (ties: the lower id), 0 without any."""
    typed = np.asarray(typed).reshape(len(typed), -1)
    top = int(typed.max(initial=0))
    if top == 0:
        return np.zeros(len(typed), np.int64)
    counts = np.stack([(typed == k).sum(1) for k in range(1, top + 1)], 1)
    return np.where(counts.sum(1) > 0, 1 + counts.argmax(1), 0)


def typed_summary(pred_typed: np.ndarray, truth: np.ndarray, labels: Sequence[int], names: Sequence[str]) -> dict:
    """Per-class Dice of typed masks, slice-typing accuracy and confusion (module doc). `pred_typed` (N, H, W)
    holds classes 0..K, `truth` (N, H, W) the binary tumour masks, `labels` (N,) the slices' classes."""
    from .metrics import dice_from_counts

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


def run_class_names(path: str | Path, num_classes: int) -> list[str]:
    """The class names a train-seg run recorded in run.json (for `path` = the run directory or its model/ folder),
    else "class 1".."class K" (a saved pipeline folder, a bare model folder)."""
    path = Path(path)
    for folder in (path, path.parent):
        run_json = folder / "run.json"
        if run_json.is_file() and (folder / "config.yaml").is_file():
            try:
                names = json.loads(run_json.read_text()).get("class_names")
            except (OSError, json.JSONDecodeError):
                names = None
            if isinstance(names, list) and len(names) == num_classes:
                return [str(n) for n in names]
    return [f"class {k}" for k in range(1, num_classes + 1)]
