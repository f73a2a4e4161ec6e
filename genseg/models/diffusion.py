"""The diffusion model factory: a diffusers `UNet2DModel` and its noise schedules, built from one config.

Channels: `image` mode models the prepared image channels alone (masks come later from a segmenter); `joint`
mode appends the tumour mask as one more channel, so every sample is a labelled image/mask pair;
`mask-conditioned` mode gets the clean mask as one more *input* channel and denoises the image channels only
(in_channels = image channels + 1, out_channels = image channels), so a sample's mask is the one given, exact by
construction. `inpaint` mode repaints a region of a real slice (`inpaint_condition`): in = the noised image, the
image with the region blanked, the region and the lesion mask (2 * image channels + 2), out = the image channels;
it is trained on crops of `crop_size` px, so its UNet's `sample_size` is the crop, and the slice size and region
margin it was trained with ride along in the UNet config under INPAINT_KEY (a private key, which diffusers saves
and loads without complaint). The mode is readable off a saved UNet's channels (pipeline.diffusion.model_layout).
The UNet's sinusoidal timestep embedding is the paper's "positional embedding".

Class conditioning (`num_classes` K > 0): the model gets K + 1 class embeddings; ids 0..K-1 are the prepared
file's labels (0 = no tumour, 1 meningioma, 2 glioma, 3 pituitary for K = 4) and id K is the *null* class,
trained by dropping labels (and standing for unknown labels, -1), which classifier-free guidance needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, PNDMScheduler, SchedulerMixin,
                       UNet2DModel)

from ..errors import ConfigError

INPAINT_KEY = "_genseg_inpaint"  # UNet config key of an inpaint model: {"slice_size": px, "region_margin": px}


@dataclass
class DiffusionModelConfig:
    """Shape of the denoiser and its training noise schedule (the `model:` section of configs/diffusion-*.yaml)."""

    sample_size: int = 64  # image side; must equal the prepared file's size
    image_channels: int = 1  # channels of the prepared images (1 grey, 3 colour)
    mode: Literal["joint", "image", "mask-conditioned", "inpaint"] = "joint"  # joint: image + mask channel; image:
                                      # image only; mask-conditioned: image given its clean mask; inpaint: a region
                                      # of a given slice repainted, given the rest and the lesion mask
    block_out_channels: tuple[int, ...] = (32, 64, 96, 128)  # one resolution level each, halving the size
    layers_per_block: int = 1
    attention_resolutions: tuple[int, ...] = ()  # sides (px) whose levels get self-attention, e.g. (16,)
    attention_head_dim: int = 8
    norm_num_groups: int = 32  # GroupNorm groups; must divide every entry of block_out_channels
    dropout: float = 0.0
    num_classes: int = 0  # 0 = unconditional; K = class-conditional on labels 0..K-1 (+ null class K)
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    num_train_timesteps: int = 1000
    crop_size: int | None = None  # inpaint: side of the training crops and of the window sampled around a region
                                  # (None: whole slices); the other modes train on whole slices
    region_margin: int = 3  # inpaint: px a lesion's region reaches past the lesion (a disc dilation)

    def __post_init__(self):
        levels = len(self.block_out_channels)
        inpaint = self.mode == "inpaint"
        checks = [
            (levels >= 1 and all(c > 0 for c in self.block_out_channels), "block_out_channels must be positive"),
            (self.crop_size is None or (inpaint and self.crop_size > 0),
             f"crop_size {self.crop_size}: a positive side, for mode inpaint only (mode {self.mode} trains on whole "
             f"slices: remove crop_size)"),
            (self.sample_size > 0 and 0 < self.unet_size <= self.sample_size and self.unet_size % 2 ** (levels - 1) == 0,
             f"{'crop_size' if self.crop_size else 'sample_size'} {self.unet_size} must be a positive multiple of "
             f"2**(levels - 1) = {2 ** (levels - 1)} (and a crop no larger than sample_size {self.sample_size})"),
            (self.region_margin >= 0, f"region_margin must be >= 0, got {self.region_margin}"),
            (all(c % self.norm_num_groups == 0 for c in self.block_out_channels),
             f"norm_num_groups {self.norm_num_groups} must divide every block_out_channels {self.block_out_channels}"),
            (set(self.attention_resolutions) <= set(self.resolutions),
             f"attention_resolutions {self.attention_resolutions} must be among the level sizes {self.resolutions}"),
            (self.layers_per_block >= 1 and self.num_train_timesteps >= 2, "layers_per_block >= 1, timesteps >= 2"),
            (self.image_channels >= 1 and self.num_classes >= 0, "image_channels >= 1 and num_classes >= 0"),
            (0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}"),
        ]
        for ok, problem in checks:
            if not ok:
                raise ConfigError(f"diffusion model: {problem}")

    @property
    def unet_size(self) -> int:
        """Side of what the UNet sees: the crop in inpaint mode (when set), else the whole slice."""
        return self.crop_size or self.sample_size

    @property
    def resolutions(self) -> tuple[int, ...]:
        return tuple(self.unet_size // 2**i for i in range(len(self.block_out_channels)))

    @property
    def channels(self) -> int:
        """Channels the UNet sees: the image channels, plus the mask in joint and mask-conditioned mode; in inpaint
        mode twice the image channels (noised and blanked) plus the region and the lesion mask."""
        if self.mode == "inpaint":
            return 2 * self.image_channels + 2
        return self.image_channels + (self.mode != "image")

    @property
    def out_channels(self) -> int:
        """Channels the UNet denoises: the image channels, plus the mask in joint mode only."""
        return self.image_channels + (self.mode == "joint")

    @property
    def null_class(self) -> int | None:
        return self.num_classes if self.num_classes else None


def build_unet(cfg: DiffusionModelConfig) -> UNet2DModel:
    """A fresh UNet2DModel; levels whose side is in `attention_resolutions` use the attention blocks. An inpaint
    model's config also holds its slice size and region margin (INPAINT_KEY), which sampling needs."""
    attn = [size in cfg.attention_resolutions for size in cfg.resolutions]
    unet = UNet2DModel(
        sample_size=cfg.unet_size,
        in_channels=cfg.channels,
        out_channels=cfg.out_channels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
        dropout=cfg.dropout,
        num_class_embeds=cfg.num_classes + 1 if cfg.num_classes else None,
    )
    if cfg.mode == "inpaint":
        unet.register_to_config(**{INPAINT_KEY: {"slice_size": cfg.sample_size, "region_margin": cfg.region_margin}})
    return unet


def inpaint_condition(images: torch.Tensor, regions: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The input channels an inpaint UNet gets beside the noised image, for clean `images` (N, C, S, S) in
    [-1, 1], `regions` and lesion `masks` (N, 1, S, S) of 0/1: the image with the region blanked to 0 (mid-grey,
    as diffusers' inpainting pipelines blank theirs; the region channel says which pixels are unknown), then the
    region and the mask as x * 2 - 1. Training and sampling both build it here, so they cannot drift apart."""
    regions, masks = regions.to(images.dtype), masks.to(images.dtype)
    return torch.cat([images * (1 - regions), regions * 2 - 1, masks * 2 - 1], dim=1)


def build_scheduler(cfg: DiffusionModelConfig) -> DDPMScheduler:
    """The training (forward-process) schedule; samplers are derived from its config."""
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         prediction_type=cfg.prediction_type, clip_sample=False)


SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpmsolver": DPMSolverMultistepScheduler,
    "pndm": PNDMScheduler,
}
_OVERRIDES = {"dpmsolver": {"algorithm_type": "dpmsolver++", "solver_order": 2},
              "pndm": {"skip_prk_steps": True}}  # PLMS only: PRK warm-up steps would triple the model calls


def make_sampling_scheduler(name: str, train_scheduler_config) -> SchedulerMixin:
    """Sampler `name` sharing the trained noise schedule and prediction type (diffusers' `from_config`)."""
    if name not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
    return SCHEDULERS[name].from_config(train_scheduler_config, **_OVERRIDES.get(name, {}))
