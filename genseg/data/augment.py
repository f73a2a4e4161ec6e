"""Paired augmentation of an image and its mask: nnU-Net's 2-D default set, each part switchable.

Built from torchvision's v2 transforms on `tv_tensors.Image` / `tv_tensors.Mask`: the geometric transforms move
image and mask with the same random draw and interpolate the mask nearest by themselves (so it stays binary), and
the intensity transforms leave a Mask alone. Random draws come from torch's global generator, which the
training loop seeds and accelerate saves in every checkpoint, so the same seed gives the same augmented batches.

Strength 0 (False) switches a part off; the probabilities are nnU-Net's (Isensee et al. 2021, 2-D defaults):
  hflip, vflip       mirror, p 0.5 each
  max_rotation       rotate by U(-max, max) degrees, every slice (genseg's long-standing default)
  scale_range        zoom by U(1 - r, 1 + r), p 0.2
  elastic_alpha      elastic deformation of that strength (torchvision's alpha, sigma 5 px), p 0.2
  brightness         multiply intensities by U(1 - b, 1 + b), p 0.15
  contrast           stretch contrast by U(1 - c, 1 + c) about the mean, p 0.15
  gamma              intensity ** U(1 - g, 1 + g), p 0.3
  noise_std          add Gaussian noise of sigma U(0, s), clipped to [0, 1], p 0.1
  blur_sigma         Gaussian blur of sigma U(s / 2, s), p 0.2
  low_resolution     down-sample by U(1 - r, 1) (nearest) and back up (bilinear), p 0.25
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

ELASTIC_SIGMA = 5.0  # pixels: smoothness of the elastic displacement field (torchvision's default)


class RandomGamma(v2.Transform):
    """intensity ** gamma with gamma ~ U(low, high), images only (intensities in [0, 1] stay there)."""

    def __init__(self, low: float, high: float):
        super().__init__()
        self.low, self.high = low, high

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"gamma": float(torch.empty(()).uniform_(self.low, self.high))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, tv_tensors.Image):
            return inpt
        return tv_tensors.wrap(TF.adjust_gamma(inpt.as_subclass(torch.Tensor), params["gamma"]), like=inpt)


class SimulateLowResolution(v2.Transform):
    """Down-sample by a factor ~ U(low, 1) with nearest neighbours and back up bilinearly, images only: the
    blocky loss of detail of a coarser scan."""

    def __init__(self, low: float):
        super().__init__()
        self.low = low

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"factor": float(torch.empty(()).uniform_(self.low, 1.0))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, tv_tensors.Image):
            return inpt
        size = inpt.shape[-2:]
        small = [max(1, round(side * params["factor"])) for side in size]
        image = inpt.as_subclass(torch.Tensor)[None]
        coarse = F.interpolate(image, size=small, mode="nearest")
        return tv_tensors.wrap(F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)[0], like=inpt)


class NoiseOfRandomStrength(v2.Transform):
    """Gaussian noise with sigma ~ U(0, max_sigma), clipped to [0, 1], images only (v2.GaussianNoise takes one
    fixed sigma; nnU-Net draws it per slice)."""

    def __init__(self, max_sigma: float):
        super().__init__()
        self.max_sigma = max_sigma

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"sigma": float(torch.empty(()).uniform_(0.0, self.max_sigma))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, tv_tensors.Image):
            return inpt
        return TF.gaussian_noise(inpt, sigma=params["sigma"], clip=True)


class PairedAugment:
    """The switched-on parts of the module's list, geometric first, applied to (image, mask) tensors."""

    def __init__(self, hflip: bool = True, max_rotation: float = 10.0, vflip: bool = False, scale_range: float = 0.0,
                 elastic_alpha: float = 0.0, brightness: float = 0.0, contrast: float = 0.0, gamma: float = 0.0,
                 noise_std: float = 0.0, blur_sigma: float = 0.0, low_resolution: float = 0.0):
        checks = {"max_rotation": max_rotation, "scale_range": scale_range, "elastic_alpha": elastic_alpha,
                  "brightness": brightness, "contrast": contrast, "gamma": gamma, "noise_std": noise_std,
                  "blur_sigma": blur_sigma, "low_resolution": low_resolution}
        for name, value in checks.items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0 (0 switches it off), got {value}")
        for name in ("scale_range", "brightness", "contrast", "low_resolution"):
            if checks[name] >= 1:
                raise ValueError(f"{name} must be below 1 (a factor of 1 - {name} must stay positive), "
                                 f"got {checks[name]}")
        bilinear = InterpolationMode.BILINEAR  # for the image; a Mask is always moved nearest
        parts: list[tuple[bool, Callable[[], v2.Transform]]] = [  # built only when switched on
            (hflip, lambda: v2.RandomHorizontalFlip(0.5)),
            (vflip, lambda: v2.RandomVerticalFlip(0.5)),
            (max_rotation > 0, lambda: v2.RandomRotation(float(max_rotation), interpolation=bilinear)),
            (scale_range > 0, lambda: v2.RandomApply([v2.RandomAffine(
                0.0, scale=(1 - scale_range, 1 + scale_range), interpolation=bilinear)], p=0.2)),
            (elastic_alpha > 0, lambda: v2.RandomApply([v2.ElasticTransform(
                float(elastic_alpha), ELASTIC_SIGMA, interpolation=bilinear)], p=0.2)),
            (brightness > 0, lambda: v2.RandomApply([v2.ColorJitter(brightness=brightness)], p=0.15)),
            (contrast > 0, lambda: v2.RandomApply([v2.ColorJitter(contrast=contrast)], p=0.15)),
            (gamma > 0, lambda: v2.RandomApply([RandomGamma(max(1e-3, 1 - gamma), 1 + gamma)], p=0.3)),
            (noise_std > 0, lambda: v2.RandomApply([NoiseOfRandomStrength(noise_std)], p=0.1)),
            (blur_sigma > 0, lambda: v2.RandomApply([v2.GaussianBlur(
                _blur_kernel(blur_sigma), (blur_sigma / 2, blur_sigma))], p=0.2)),
            (low_resolution > 0, lambda: v2.RandomApply([SimulateLowResolution(1 - low_resolution)], p=0.25)),
        ]
        self.transform = v2.Compose([make() for on, make in parts if on] or [v2.Identity()])

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


def _blur_kernel(sigma: float) -> int:
    """An odd kernel side covering +-3 sigma."""
    return 2 * max(1, round(3 * sigma)) + 1


AUGMENT_KEYS = tuple(inspect.signature(PairedAugment).parameters)  # SegTrainConfig keys of the same names


# --- masks alone: `genseg sample --masks-from DATA.h5 --mask-augment ...` --------------------------------------

MASK_AUGMENTS = ("flip", "shift", "rotate", "scale", "elastic")
MASK_MAX_SHIFT = 0.1  # shift: up to this share of the side in each direction (a tumour stays near its place)
MASK_MAX_ROTATION = 15.0  # rotate: U(-15, 15) degrees about the tumour's centre
MASK_SCALE_RANGE = 0.2  # scale: zoom U(0.8, 1.2) about the tumour's centre
MASK_ELASTIC_MOVE = 0.05  # elastic: largest displacement, a share of the side (3 px at 64 px) ...
MASK_ELASTIC_SMOOTH = 1 / 12  # ... of a random field smoothed by a Gaussian of sigma = this share of the side
MASK_TRIES = 10  # draws per mask before it is kept unchanged


class MaskAugment:
    """Random transforms of tumour masks alone (no image), each draw seeded by (seed, the mask's index), applied in
    the order flip (left-right, p 0.5), scale, rotate, elastic, shift. Geometric moves are nearest-neighbour, so
    values stay {0, 1}. A draw that pushes the tumour onto the image border (when the given mask did not touch it)
    is redrawn, up to MASK_TRIES times, after which the mask is kept unchanged (`unchanged` counts those): the
    mask stays inside the image. Given `inside` (the head of the mask's own slice, data.regions.head_mask), a draw
    must also keep as much of the tumour inside it as the given mask had, so that moved tumours stay on the head
    instead of landing in the air beside it. An empty mask stays empty (a tumour-free slice)."""

    def __init__(self, parts: tuple[str, ...] | list[str] = (), seed: int = 0):
        unknown = sorted(set(parts) - set(MASK_AUGMENTS))
        if unknown:
            raise ValueError(f"unknown mask augmentation(s) {', '.join(unknown)}; choose from {', '.join(MASK_AUGMENTS)}")
        self.parts = tuple(p for p in MASK_AUGMENTS if p in parts)  # the documented order, whatever the given one
        self.seed = seed
        self.unchanged = 0

    def __call__(self, mask: torch.Tensor | Any, index: int, inside: torch.Tensor | Any | None = None) -> torch.Tensor:
        """Mask `index` of a set, (H, W) of 0/1 -> its transformed uint8 tensor; `inside`: (H, W) bool or None."""
        mask = (torch.as_tensor(mask) > 0).to(torch.uint8)
        if not self.parts or not mask.any():
            return mask
        rng = torch.Generator().manual_seed(self.seed * 100_003 + index)
        on_border = _touches_border(mask)
        inside = None if inside is None else torch.as_tensor(inside).bool()
        kept_inside = _share_inside(mask, inside)
        for _ in range(MASK_TRIES):
            moved = self._draw(mask, rng)
            if (moved.any() and (on_border or not _touches_border(moved))
                    and _share_inside(moved, inside) >= kept_inside):
                return moved
        self.unchanged += 1
        return mask

    def _draw(self, mask: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        def uniform(low: float, high: float) -> float:
            return float(torch.empty(()).uniform_(low, high, generator=rng))

        side = mask.shape[-1]
        x = tv_tensors.Mask(mask[None])
        ys, xs = torch.nonzero(mask, as_tuple=True)
        centre = [float(xs.float().mean()), float(ys.float().mean())]
        if "flip" in self.parts and uniform(0, 1) < 0.5:
            x = TF.horizontal_flip(x)
            centre[0] = side - 1 - centre[0]
        angle = uniform(-MASK_MAX_ROTATION, MASK_MAX_ROTATION) if "rotate" in self.parts else 0.0
        scale = uniform(1 - MASK_SCALE_RANGE, 1 + MASK_SCALE_RANGE) if "scale" in self.parts else 1.0
        if angle or scale != 1.0:
            x = TF.affine(x, angle=angle, translate=[0, 0], scale=scale, shear=[0.0, 0.0],
                          interpolation=InterpolationMode.NEAREST, center=centre)
        if "elastic" in self.parts:
            sigma = side * MASK_ELASTIC_SMOOTH
            kernel = int(8 * sigma + 1) | 1  # half of it stays below the side (reflect padding)
            field = torch.rand(1, 2, side, side, generator=rng) * 2 - 1
            field = TF.gaussian_blur(field, [kernel, kernel], [sigma, sigma])
            field = field / field.abs().amax().clamp_min(1e-6)  # at most 1: the largest move is MASK_ELASTIC_MOVE
            displacement = (field * MASK_ELASTIC_MOVE * 2).permute(0, 2, 3, 1)  # grid units: the side spans 2
            x = TF.elastic(x, displacement, interpolation=InterpolationMode.NEAREST)
        if "shift" in self.parts:
            limit = max(1, round(MASK_MAX_SHIFT * side))
            x = TF.affine(x, angle=0.0, translate=[round(uniform(-limit, limit)), round(uniform(-limit, limit))],
                          scale=1.0, shear=[0.0, 0.0], interpolation=InterpolationMode.NEAREST)
        return (x.as_subclass(torch.Tensor)[0] > 0).to(torch.uint8)


def _share_inside(mask: torch.Tensor, inside: torch.Tensor | None) -> float:
    """The share of the tumour's pixels inside `inside` (1 when there is no such region)."""
    if inside is None:
        return 1.0
    return float((mask.bool() & inside).sum()) / float(mask.sum())


def _touches_border(mask: torch.Tensor) -> bool:
    return bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
