"""Training a multi-class model (`train-seg --classes`, issue 14 item 6): one U-Net that segments and types the
tumour.

The network's head has K + 1 output channels, softmax over background (0) and the K tumour classes the prepared
file records (its metadata `class_names`, ids 1..K: Figshare's meningioma, glioma, pituitary; BUSI's benign,
malignant). The training target of a pixel is 0 outside the tumour mask and the slice's label inside it, so every
slice with tumour needs a known label (1..K); `class_names` refuses data where that is not so.

Loss: softmax cross-entropy for "bce" and a soft Dice averaged over the K foreground classes for "dice" (both for
"bce+dice"), the multi-class counterparts of the binary choices. The model's binary and typed masks at inference
are genseg/inference/multiclass.py's, their scores genseg/evaluation/multiclass.py's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.prepared import read_metadata
from ..errors import DataError
from .mixing import tumour_slices


def class_names(data: str | Path, rows: Sequence[np.ndarray] = ()) -> list[str]:
    """Names of tumour classes 1..K of a prepared file, after checking that every slice with tumour among `rows`
    (arrays of row numbers, e.g. the training and validation slices) has a label in 1..K; DataError naming the
    file and the value otherwise."""
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
