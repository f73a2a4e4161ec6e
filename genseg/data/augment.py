"""Paired augmentation: the same random flip and rotation applied to an image and its mask."""

from __future__ import annotations

import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF


class PairedAugment:
    """Random horizontal flip and a small rotation; the image is interpolated bilinearly, the mask nearest."""

    def __init__(self, hflip: bool = True, max_rotation: float = 10.0):
        self.hflip = hflip
        self.max_rotation = float(max_rotation)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.hflip and torch.rand(()) < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        if self.max_rotation > 0:
            angle = float((torch.rand(()) * 2 - 1) * self.max_rotation)
            image = TF.rotate(image, angle, interpolation=InterpolationMode.BILINEAR)
            mask = TF.rotate(mask, angle, interpolation=InterpolationMode.NEAREST)
        return image, mask
