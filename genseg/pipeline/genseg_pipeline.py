"""`GenSegPipeline`: generate slices with the diffusion model, then segment them with the registered U-Net.

One diffusers folder holds all three parts (`unet/`, `scheduler/`, `segmenter/`, `model_index.json`), so
`save_pretrained` / `from_pretrained` move the whole generate-then-segment chain, and each part still loads
with plain diffusers (`UNet2DModel.from_pretrained(DIR, subfolder="unet")`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.utils import BaseOutput

from ..errors import CheckpointError, ConfigError
from ..inference.segmenter import Segmenter, load_segmenter
from ..models.unet import SegmentationUNet
from .diffusion import (SliceDiffusionPipeline, check_output_type, convert_output, load_diffusion, mask_source,
                        model_channels, model_layout, slice_size)

PARTS = ("unet", "scheduler", "segmenter")


@dataclass
class GenSegOutput(BaseOutput):
    """images (N, H, W) float32 in [0, 1]; generated_masks (N, H, W) uint8: drawn by a joint model, the caller's
    masks unchanged for a mask-conditioned or inpaint one (`mask_source` says which), None in image mode;
    predicted_masks (N, H, W) uint8 from the segmenter at `threshold`; probabilities (N, H, W) float32;
    labels (N,) int or None. NumPy with output_type "np"; see `convert_output`."""

    images: np.ndarray
    generated_masks: np.ndarray | None
    predicted_masks: np.ndarray
    probabilities: np.ndarray
    labels: np.ndarray | None


def check_compatible(unet: UNet2DModel, segmenter: SegmentationUNet) -> None:
    """The segmenter must read the generator's images: same channels (sizes may differ: images are resized)."""
    image_channels, _ = model_channels(unet)
    if int(segmenter.config.in_channels) != image_channels:
        raise ConfigError(f"the segmenter reads {segmenter.config.in_channels}-channel images but the diffusion "
                          f"model generates {image_channels}-channel ones; pair models trained on the same modality")


class GenSegPipeline(SliceDiffusionPipeline):
    """unet + scheduler (generation, inherited) + segmenter. A segmenter trained at another size than the
    generator's is fed bilinearly resized images and its probabilities are resized back (stated in reports)."""

    def __init__(self, unet: UNet2DModel, scheduler, segmenter: SegmentationUNet, threshold: float = 0.5):
        check_compatible(unet, segmenter)
        if not 0.0 < threshold < 1.0:
            raise ConfigError(f"threshold must lie in (0, 1), got {threshold}")
        super().__init__(unet=unet, scheduler=scheduler)
        self.register_modules(segmenter=segmenter)
        self.register_to_config(threshold=float(threshold))
        self._segmenter_cache: tuple[int, Segmenter] | None = None

    @classmethod
    def from_runs(cls, diffusion: str | Path, segmenter: str | Path) -> "GenSegPipeline":
        """Pair a `train-diffusion` run with a `train-seg` run (the segmenter's threshold comes from its run)."""
        generator = load_diffusion(diffusion)
        seg = load_segmenter(segmenter, device="cpu")
        if not isinstance(seg, Segmenter):
            raise CheckpointError(f"{segmenter}: a pipeline registers the PyTorch segmenter: pass its train-seg run "
                                  f"(with --precision int8 to segment with the run's int8 export)")
        return cls(unet=generator.unet, scheduler=generator.scheduler, segmenter=seg.model, threshold=seg.threshold)

    @classmethod
    def load(cls, path: str | Path) -> "GenSegPipeline":
        """`from_pretrained` with a clear error for a folder that is not a complete GenSegPipeline."""
        path = Path(path)
        index = path / "model_index.json"
        if not index.is_file():
            raise CheckpointError(f"{path}: not a saved pipeline (no model_index.json)")
        missing = [part for part in PARTS if not (path / part).is_dir()]
        if missing:
            raise CheckpointError(f"{path}: pipeline folder is missing {', '.join(missing)}/")
        return cls.from_pretrained(path, use_safetensors=True)

    @property
    def size_note(self) -> str:
        gen, seg = self.slice_size, int(self.segmenter.config.sample_size)
        return "" if gen == seg else f"generated {gen}x{gen} slices resized to the segmenter's {seg}x{seg} and back"

    def predictor(self, **options) -> Segmenter:
        """A BatchNorm-folded inference copy of the registered segmenter, rebuilt only when the module changes;
        `options` (batch_size, compile, ...) of `Segmenter` apply when it is built."""
        if self._segmenter_cache is None or self._segmenter_cache[0] != id(self.segmenter):
            self._segmenter_cache = (id(self.segmenter), Segmenter(self.segmenter, threshold=self.config.threshold,
                                                                   device=self._execution_device, **options))
        return self._segmenter_cache[1]

    def use_predictor(self, predictor) -> None:
        """Predict with `predictor` (e.g. the registered segmenter's int8 OnnxSegmenter) until the registered
        module changes; it must read the registered segmenter's size and channels."""
        expected = (int(self.segmenter.config.sample_size), int(self.segmenter.config.in_channels))
        if (predictor.size, predictor.channels) != expected:
            raise ConfigError(f"{predictor.source}: reads {predictor.size} px, {predictor.channels} channel(s); the "
                              f"pipeline's segmenter reads {expected[0]} px, {expected[1]} channel(s)")
        self._segmenter_cache = (id(self.segmenter), predictor)

    def segment(self, images: np.ndarray) -> np.ndarray:
        """Tumour probabilities (N, H, W) for images (N, H, W) or (N, C, H, W) in [0, 1] at any size."""
        predictor = self.predictor()
        x = torch.as_tensor(np.asarray(images, np.float32))
        x = x[:, None] if x.ndim == 3 else x
        size = x.shape[-2:]
        if tuple(size) != (predictor.size, predictor.size):
            x = F.interpolate(x, size=(predictor.size, predictor.size), mode="bilinear", antialias=True,
                              align_corners=False).clamp(0, 1)
        probabilities = torch.as_tensor(predictor.predict(x))
        if tuple(probabilities.shape[-2:]) != tuple(size):
            probabilities = F.interpolate(probabilities[:, None], size=tuple(size), mode="bilinear",
                                          align_corners=False)[:, 0]
        return probabilities.numpy()

    @property
    def mode(self) -> str:
        """The generator's mode (pipeline.diffusion.MODES), read off its channels: a saved folder carries it."""
        return model_layout(self.unet)[1]

    @property
    def slice_size(self) -> int:
        """Side of the slices the generator returns (an inpaint model's crops are smaller)."""
        return slice_size(self.unet)

    @property
    def mask_source(self) -> str | None:
        """"generated" (joint), "given" (mask-conditioned: call with `masks=`; inpaint: with `images=`, `masks=`
        and `regions=`) or None (image mode)."""
        return mask_source(self.unet)

    def __call__(self, num_images: int = 1, *, output_type: str = "np", return_dict: bool = True,
                 **sampling) -> GenSegOutput | tuple:
        """Sample `num_images` slices (keyword arguments as `SliceDiffusionPipeline.__call__`: `masks=` for a
        mask-conditioned generator, `images=`, `masks=` and `regions=` for an inpaint one) and segment them;
        `output_type` and `return_dict` as there (probabilities stay NumPy with "pil")."""
        check_output_type(output_type)
        generated = super().__call__(num_images, **sampling)
        probabilities = self.segment(generated.images)
        predicted = (probabilities >= self.config.threshold).astype(np.uint8)
        output = GenSegOutput(images=convert_output(generated.images, output_type, picture=True),
                              generated_masks=convert_output(generated.masks, output_type, picture=True),
                              predicted_masks=convert_output(predicted, output_type, picture=True),
                              probabilities=convert_output(probabilities.astype(np.float32), output_type),
                              labels=convert_output(generated.labels, output_type))
        return self._returned(output, return_dict)
