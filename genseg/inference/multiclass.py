"""A multi-class model (`train-seg --classes`, issue 14 item 6) at inference: one U-Net that segments and types the
tumour.

The network's head has K + 1 output channels, softmax over background (0) and the K tumour classes the prepared
file records (its metadata `class_names`, ids 1..K: Figshare's meningioma, glioma, pituitary; BUSI's benign,
malignant); the training side (targets, loss, the refusal of unlabelled data) is genseg/training/multiclass.py.

The binary tumour mask stays what every consumer of `Segmenter.predict` (segment, serve, pipeline, TTA,
small-component removal) thresholds: `tumour_score` = p_best / (p_best + p_background), with p_best the largest
foreground class probability, is >= 0.5 exactly where the argmax is a tumour class (ties count as tumour), so at
the default threshold the binary mask is "argmax != 0". The typed mask gives each pixel of the binary mask its most
likely tumour class (1..K), 0 elsewhere; a slice's predicted class is the majority class of its predicted tumour
pixels (0 when there are none). TTA averages the softmax probabilities before either is taken
(postprocess.predict_typed). Their scores (per-class Dice, typing accuracy) are genseg/evaluation/multiclass.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


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


def slice_classes(typed: np.ndarray) -> np.ndarray:
    """Per slice the majority class of its typed mask's tumour pixels (ties: the lower id), 0 without any."""
    typed = np.asarray(typed).reshape(len(typed), -1)
    top = int(typed.max(initial=0))
    if top == 0:
        return np.zeros(len(typed), np.int64)
    counts = np.stack([(typed == k).sum(1) for k in range(1, top + 1)], 1)
    return np.where(counts.sum(1) > 0, 1 + counts.argmax(1), 0)


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
