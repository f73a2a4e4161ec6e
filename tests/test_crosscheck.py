"""Our metrics against the field's reference implementations, on random masks (optional test dependencies,
installed by genseg[test]): Dice, IoU and HD95 against MONAI, KID against torchmetrics' unbiased polynomial MMD."""

from __future__ import annotations

import numpy as np
import torch

from genseg.evaluation.metrics import dice_iou, hd95, kid


def random_masks(n: int, side: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Blobby mask pairs of varied overlap, plus empty-vs-empty and empty-vs-full cases."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    pred, target = np.zeros((n, side, side), bool), np.zeros((n, side, side), bool)
    for i in range(n):
        for masks in (pred, target):
            for _ in range(rng.integers(0, 3)):
                cy, cx, r = rng.uniform(0, side), rng.uniform(0, side), rng.uniform(2, side / 3)
                masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
            masks[i] ^= rng.random((side, side)) < 0.01  # speckle: boundaries with holes and islands
    pred[0], target[0] = False, False
    return pred, target


def as_monai(masks: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(masks[:, None], dtype=torch.float32)


def test_dice_iou_hd95_equal_monai():
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou

    pred, target = random_masks(200, 48, seed=0)
    dice, iou = dice_iou(pred, target)
    monai_dice = compute_dice(as_monai(pred), as_monai(target), include_background=True, ignore_empty=False)[:, 0]
    monai_iou = compute_iou(as_monai(pred), as_monai(target), include_background=True, ignore_empty=False)[:, 0]
    np.testing.assert_allclose(dice, monai_dice.numpy(), atol=1e-6)
    np.testing.assert_allclose(iou, monai_iou.numpy(), atol=1e-6)

    both = pred.any((1, 2)) & target.any((1, 2))  # MONAI leaves HD undefined when either mask is empty
    assert both.sum() > 100
    monai_hd = compute_hausdorff_distance(as_monai(pred[both]), as_monai(target[both]), include_background=True,
                                          percentile=95)[:, 0]
    ours = np.array([hd95(p, t) for p, t in zip(pred[both], target[both])])
    np.testing.assert_allclose(ours, monai_hd.numpy(), atol=1e-4)


def test_kid_equals_torchmetrics_poly_mmd():
    from torchmetrics.image.kid import poly_mmd

    rng = np.random.default_rng(1)
    a = rng.normal(size=(120, 32))
    for b in (rng.normal(size=(120, 32)), rng.normal(0.3, 1.2, size=(120, 32))):
        mean, _ = kid(a, b, num_subsets=1, subset_size=len(a))  # one subset holding every row of both sets
        reference = poly_mmd(torch.as_tensor(a), torch.as_tensor(b), degree=3, gamma=1 / a.shape[1], coef=1.0)
        assert abs(mean - float(reference)) < 1e-9 * max(1.0, abs(float(reference)))
