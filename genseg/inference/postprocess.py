"""Test-time augmentation and post-processing of a segmenter's output (issue 14, item 4).

- Flip TTA: the probabilities are averaged over flipped copies of each image, each flipped back first:
  "hflip" uses the identity and the left-right flip (brains are roughly left-right symmetric), "hvflip" adds the
  up-down flip and both flips together. Works with any segmenter's `predict` (PyTorch or ONNX Runtime), at the
  cost of 2 or 4 forward passes.
- Small-component removal: connected regions (8-connected) of a slice's mask with fewer than `min_component`
  pixels are dropped, and their probabilities set to 0 so that masks drawn from them agree. Each slice on its own;
  an empty mask stays empty, and the largest region is dropped too when it is below the limit.
- Unsure-region removal (hysteresis thresholding): with `min_peak` P, a region of the mask is kept only if the
  model is at least P sure somewhere inside it; kept regions keep their shape at the threshold. Many specks on
  tumour-free slices are faint regions while tumours have a confident core, whatever their size, so this removes
  those specks without removing small lesions (docs/recipe-benchmark.md, run 8).

`PostProcessed` wraps a segmenter with all three, behind the same interface, so evaluate, segment and the pipeline
take them without knowing; the server applies the same functions around its batcher.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..errors import ConfigError

TTA_MODES = ("none", "hflip", "hvflip")
_FLIPS = {"none": [()], "hflip": [(), (-1,)], "hvflip": [(), (-1,), (-2,), (-2, -1)]}  # axes of (..., H, W)
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def check_postprocess(tta: str = "none", min_component: int = 0, min_peak: float = 0.0) -> None:
    """ConfigError naming the value for an unknown TTA mode, a negative / non-integer component size or a peak
    probability outside [0, 1]."""
    if tta not in TTA_MODES:
        raise ConfigError(f"tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
    if isinstance(min_component, bool) or not isinstance(min_component, (int, np.integer)) or min_component < 0:
        raise ConfigError(f"min_component must be a whole number of pixels >= 0, got {min_component!r}")
    if (isinstance(min_peak, bool) or not isinstance(min_peak, (int, float, np.integer, np.floating))
            or not 0.0 <= min_peak <= 1.0):
        raise ConfigError(f"min_peak must be a probability in [0, 1], got {min_peak!r}")


def flip_views(images: np.ndarray, tta: str) -> np.ndarray:
    """(V * N, C, H, W): every image (N, C, H, W) in each of the mode's V flips, view by view."""
    images = np.asarray(images)
    return np.concatenate([np.flip(images, axes) if axes else images for axes in _FLIPS[tta]])


def merge_views(probabilities: np.ndarray, tta: str) -> np.ndarray:
    """(N, H, W): the mean of `flip_views`' predictions (V * N, H, W), each view flipped back first."""
    views = np.split(np.asarray(probabilities, np.float32), len(_FLIPS[tta]))
    return np.mean([np.flip(view, axes) if axes else view for view, axes in zip(views, _FLIPS[tta])], axis=0)


def predict_with_tta(predict: Callable[[np.ndarray], np.ndarray], images, tta: str) -> np.ndarray:
    """`predict`'s probabilities (N, H, W) averaged over the flips of `tta`."""
    if tta == "none":
        return predict(images)
    return merge_views(predict(flip_views(np.asarray(images, np.float32), tta)), tta)


def remove_small_components(mask: np.ndarray, min_component: int) -> np.ndarray:
    """A boolean mask (H, W) or stack (N, H, W) without its 8-connected regions of fewer than `min_component`
    pixels, slice by slice."""
    mask = np.asarray(mask, bool)
    if min_component <= 1 or not mask.any():
        return mask
    if mask.ndim == 3:
        return np.stack([remove_small_components(m, min_component) for m in mask])
    return _kept_regions(mask, min_component)


def _kept_regions(mask: np.ndarray, min_component: int, probability: np.ndarray | None = None,
                  min_peak: float = 0.0) -> np.ndarray:
    """One slice's boolean mask (H, W) without its 8-connected regions of fewer than `min_component` pixels or,
    given the slice's `probability`, whose highest probability is below `min_peak`: one labelling for both rules."""
    from scipy import ndimage  # here, so that the CLI can read TTA_MODES without loading SciPy

    labels, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    keep = np.bincount(labels.ravel(), minlength=n + 1) >= min_component
    if probability is not None and n:
        keep[1:] &= ndimage.maximum(probability, labels, np.arange(1, n + 1)) >= min_peak
    keep[0] = False
    return keep[labels]


def drop_regions(probabilities: np.ndarray, threshold: float, min_component: int = 0,
                 min_peak: float = 0.0) -> np.ndarray:
    """Probabilities (N, H, W) with those of the mask's regions at `threshold` set to 0 where a region has fewer
    than `min_component` pixels or never reaches `min_peak`."""
    probabilities = np.asarray(probabilities, np.float32)
    if min_component <= 1 and min_peak <= threshold:
        return probabilities
    mask = probabilities >= threshold
    if not mask.any():
        return probabilities
    kept = np.stack([_kept_regions(m, min_component, p if min_peak > threshold else None, min_peak)
                     for m, p in zip(mask, probabilities)])
    return np.where(mask & ~kept, np.float32(0), probabilities)


class PostProcessed:
    """A segmenter (Segmenter or OnnxSegmenter) whose `predict` applies flip TTA and small- and unsure-region
    removal; everything else is the wrapped segmenter's. `threshold` (default the segmenter's) is the one the
    regions are found at, and the one callers threshold at."""

    def __init__(self, segmenter, tta: str = "none", min_component: int = 0, threshold: float | None = None,
                 min_peak: float = 0.0):
        check_postprocess(tta, min_component, min_peak)
        self.segmenter, self.tta, self.min_component = segmenter, tta, int(min_component)
        self.min_peak = float(min_peak)
        self.threshold = segmenter.threshold if threshold is None else threshold

    def __getattr__(self, name: str):
        return getattr(self.segmenter, name)

    def predict(self, images) -> np.ndarray:
        if getattr(self.segmenter, "multiclass", False):  # TTA on the softmax, then the tumour score (inference/multiclass.py)
            from .multiclass import tumour_score

            probabilities = tumour_score(self.predict_classes(images))
        else:
            probabilities = predict_with_tta(self.segmenter.predict, images, self.tta)
        return drop_regions(probabilities, self.threshold, self.min_component, self.min_peak)

    def predict_classes(self, images) -> np.ndarray:
        """A multi-class segmenter's softmax probabilities (N, K+1, H, W), averaged over the TTA flips (small and
        unsure regions are dropped from masks drawn from them: predict_typed)."""
        return predict_with_tta(self.segmenter.predict_classes, images, self.tta)


def postprocessed(segmenter, tta: str = "none", min_component: int = 0, threshold: float | None = None,
                  min_peak: float = 0.0):
    """The plain segmenter when there is nothing to do, else PostProcessed (checking the values either way); a
    PostProcessed segmenter's settings are replaced, not applied twice."""
    check_postprocess(tta, min_component, min_peak)
    segmenter = segmenter.segmenter if isinstance(segmenter, PostProcessed) else segmenter
    if tta == "none" and min_component <= 1 and min_peak == 0:
        return segmenter
    return PostProcessed(segmenter, tta, min_component, threshold, min_peak)


def predict_typed(segmenter, images, threshold: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(tumour scores (N, H, W) as `segmenter.predict` returns them, typed masks (N, H, W) uint8) from one
    prediction of a multi-class Segmenter, or a PostProcessed one (TTA on the softmax, small and unsure regions
    dropped from both; inference/multiclass.py)."""
    from .multiclass import tumour_score, typed_masks

    threshold = segmenter.threshold if threshold is None else threshold
    probabilities = segmenter.predict_classes(images)
    scores = drop_regions(tumour_score(probabilities), threshold, getattr(segmenter, "min_component", 0),
                          getattr(segmenter, "min_peak", 0.0))
    return scores, typed_masks(probabilities, scores >= threshold)
