"""`SliceDiffusionPipeline`: sample MRI slices (with tumour masks in joint mode, for given masks in mask-conditioned
mode, regions of given slices repainted in inpaint mode) from a trained UNet2DModel.

The stock `DDPMPipeline` passes no class labels, so this thin pipeline runs diffusers' own
`scheduler.step` loop with optional class conditioning and classifier-free guidance.

Conventions: the model works in [-1, 1]; outputs are back in the prepared-file range, images float32 in
[0, 1] and masks uint8 {0, 1} (mask channel > 0), so a segmenter trained on prepared data reads them directly.
The mode is read off the UNet's channels (`model_layout`): in = out = 1 or 3: image only (grey / colour);
in = out = 2 or 4: image + mask (joint); in = 2 or 4 and out = in - 1: mask-conditioned (the clean mask, as
mask * 2 - 1, is the last input channel and is never noised; only the image is denoised); out = 1 or 3 and
in = 2 * out + 2 (4 or 8): inpaint (models.diffusion.inpaint_condition). No two layouts share their channels, so
the mode needs no other record, and folders saved before inpaint existed load as before.

Inpainting runs on crops: the UNet was trained on crops of its `sample_size`, so each slice is denoised in the
crop-sized window that centres its region (GroupNorm statistics and receptive field as in training; a whole
slice would be another input distribution), and only the region's pixels are pasted back into the real slice:
every pixel outside the region is the given slice's, exactly.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import diffusers
import numpy as np
import torch
from diffusers import DiffusionPipeline, UNet2DModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..data.regions import bounding_box, window_start
from ..errors import CheckpointError, ConfigError
from ..models.diffusion import INPAINT_KEY, inpaint_condition, make_sampling_scheduler

INTERMEDIATE_SNAPSHOTS = 10  # x_t kept per call with save_intermediates (evenly spaced over the steps)
OUTPUT_TYPES = ("np", "pt", "pil")


@dataclass
class SliceDiffusionOutput(BaseOutput):
    """images (N, H, W) float32 in [0, 1] ((N, C, H, W) for colour; in inpaint mode the given slices with their
    regions repainted); masks (N, H, W) uint8 {0, 1} or None in image mode (in mask-conditioned and inpaint mode
    the given masks, unchanged); labels (N,) int or None when unconditional; intermediates: [(timestep, x_t as
    (N, channels, H, W) float32 in [0, 1], the crops in inpaint mode)] from noise to the last step, or None.
    NumPy with output_type "np"; see `convert_output`."""

    images: np.ndarray
    masks: np.ndarray | None
    labels: np.ndarray | None
    intermediates: list[tuple[int, np.ndarray]] | None


def seed_generators(seed: int, num_images: int) -> list[torch.Generator]:
    """One CPU generator per image from a seed, so an image depends on (seed, its index) only: not on the batch
    size, nor on how many images are asked for. Every command, workflow and the server seed the pipelines here."""
    return [torch.Generator().manual_seed(seed * 100_003 + i) for i in range(num_images)]


@dataclass(frozen=True)
class SamplingSettings:
    """The sampler choices of `genseg sample`, `genseg pipeline`, the demo and generate requests, as one value
    instead of six parameters through every signature."""

    scheduler: str = "dpmsolver"  # a name of models.diffusion.SCHEDULERS, sharing the trained noise schedule
    steps: int = 20
    class_label: int | None = None
    guidance: float = 1.0
    seed: int = 0
    batch_size: int = 16

    def metadata(self) -> dict[str, Any]:
        """The settings as synthetic files and pipeline summaries record them."""
        return {"scheduler": self.scheduler, "steps": self.steps, "seed": self.seed, "class": self.class_label,
                "guidance": self.guidance}

    def sample(self, pipe: SliceDiffusionPipeline, num_images: int, train_scheduler_config=None, start: int = 0,
               **call):
        """`pipe(num_images, ...)` with these settings (`call`: its other keyword arguments), its scheduler first
        swapped for `self.scheduler` built on `train_scheduler_config` (default: the pipe's own). `start`: the
        index of the first image, so images start..start+num_images-1 of the seed come out (one process's share
        of a run split over several, genseg.distributed)."""
        pipe.scheduler = make_sampling_scheduler(self.scheduler, train_scheduler_config or pipe.scheduler.config)
        return pipe(num_images, class_labels=self.class_label, guidance_scale=self.guidance,
                    num_inference_steps=self.steps, generator=seed_generators(self.seed, start + num_images)[start:],
                    batch_size=self.batch_size, **call)


def check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ConfigError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")


def convert_output(value, output_type: str, picture: bool = False):
    """A NumPy result as `output_type`: "pt" makes every array a CPU tensor; "pil" makes pictures (images, 0/1
    masks) lists of 8-bit PIL images and leaves the rest NumPy."""
    if value is None or output_type == "np" or (output_type == "pil" and not picture):
        return value
    if output_type == "pt":
        return torch.from_numpy(value)
    channels_last = value[..., None] if value.ndim == 3 else value.transpose(0, 2, 3, 1)
    return DiffusionPipeline.numpy_to_pil(channels_last.astype(np.float32))


MODES = ("image", "joint", "mask-conditioned", "inpaint")


def model_layout(unet: UNet2DModel) -> tuple[int, str]:
    """(image channels, mode) of a UNet trained by genseg, from its in/out channels: in = out = 1 or 3 image-only,
    in = out = 2 or 4 joint (image + mask), in = 2 or 4 with out = in - 1 mask-conditioned, out = 1 or 3 with
    in = 2 * out + 2 inpaint. Anything else is refused (CheckpointError): it is no genseg slice model."""
    cin, cout = int(unet.config.in_channels), int(unet.config.out_channels)
    if cin == cout and cin in (1, 3):
        return cin, "image"
    if cin == cout and cin in (2, 4):
        return cin - 1, "joint"
    if cin in (2, 4) and cout == cin - 1:
        return cout, "mask-conditioned"
    if cout in (1, 3) and cin == 2 * cout + 2:
        return cout, "inpaint"
    raise CheckpointError(f"UNet with {cin} input and {cout} output channels is not a genseg slice model (image "
                          f"only: 1 or 3 in and out; joint: 2 or 4 in and out; mask-conditioned: 2 or 4 in, one "
                          f"fewer out; inpaint: 1 or 3 out, twice that plus 2 in)")


def inpaint_settings(unet: UNet2DModel) -> dict:
    """{"slice_size", "region_margin"} an inpaint UNet was trained with (models.diffusion.INPAINT_KEY)."""
    settings = unet.config.get(INPAINT_KEY)
    if not isinstance(settings, dict) or not {"slice_size", "region_margin"} <= settings.keys():
        raise CheckpointError(f"inpaint UNet without its {INPAINT_KEY} config entry (slice size and region margin); "
                              f"it was not saved by `genseg train-diffusion`")
    return {"slice_size": int(settings["slice_size"]), "region_margin": int(settings["region_margin"])}


def mask_source(unet: UNet2DModel) -> str | None:
    """Where a sample's mask comes from: "generated" (joint: the model draws it), "given" (mask-conditioned and
    inpaint: the caller's mask, unchanged) or None (image mode: no mask)."""
    return {"joint": "generated", "mask-conditioned": "given", "inpaint": "given"}.get(model_layout(unet)[1])


def slice_size(unet: UNet2DModel) -> int:
    """Side of the slices a UNet generates: its own, but for inpaint models (trained on crops) the slices'."""
    return inpaint_settings(unet)["slice_size"] if model_layout(unet)[1] == "inpaint" else int(unet.config.sample_size)


def model_channels(unet: UNet2DModel) -> tuple[int, bool]:
    """(image channels, joint) of a UNet trained by genseg (`model_layout`; joint = it generates its own mask)."""
    channels, mode = model_layout(unet)
    return channels, mode == "joint"


def _binary_maps(values, name: str, num_images: int, size: int, whose: str) -> np.ndarray:
    """Given masks or regions as uint8 (N, H, W), or ConfigError: N of size x size (`whose` says why that size),
    values 0 and 1 only; (N, 1, H, W) is accepted."""
    given = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if given.ndim == 4 and given.shape[1] == 1:
        given = given[:, 0]
    if given.shape != (num_images, size, size):
        raise ConfigError(f"{name}: expected {num_images} {name} of {size}x{size} ({whose}), got an array of shape "
                          f"{tuple(given.shape)}")
    bad = [v for v in np.unique(given).tolist() if v not in (0, 1)]
    if bad:
        raise ConfigError(f"{name} must hold 0 and 1 only, found value(s) {bad[:5]}")
    return given.astype(np.uint8)


HOW_TO_CALL = {
    "mask-conditioned": "pass masks=(N, H, W) 0/1 arrays (`genseg sample --masks-from DATA.h5`)",
    "inpaint": "pass images=(N, H, W) slices in [0, 1], regions=(N, H, W) 0/1 (the pixels to repaint) and masks=(N, "
               "H, W) 0/1 (the lesions; empty to erase) (`genseg sample --inpaint-into DATA.h5`)",
}


def num_classes(unet: UNet2DModel) -> int:
    """Classes the UNet was conditioned on (0 = unconditional); its last class embedding is the null class."""
    embeds = unet.config.num_class_embeds
    return int(embeds) - 1 if embeds else 0


class SliceDiffusionPipeline(DiffusionPipeline):
    """unet + scheduler; swap the sampler with `pipe.scheduler = make_sampling_scheduler(name, config)`."""

    def __init__(self, unet: UNet2DModel, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.set_progress_bar_config(desc="sampling", unit="img-step")  # until the caller sets its own

    def _labels(self, class_labels, num_images: int) -> torch.Tensor | None:
        k = num_classes(self.unet)
        if class_labels is None:
            return None
        if k == 0:
            raise ConfigError("class conditioning was asked of an unconditional model (trained with num_classes 0); "
                              "sample without --class")
        labels = torch.as_tensor([class_labels] * num_images if np.isscalar(class_labels) else list(class_labels))
        if labels.ndim != 1 or len(labels) != num_images:
            raise ConfigError(f"class_labels: give one class or {num_images}, got {len(labels)}")
        bad = sorted({int(c) for c in labels if not 0 <= int(c) < k})
        if bad:
            raise ConfigError(f"class {bad} outside the trained range 0..{k - 1}")
        return labels.long()

    def _masks(self, masks, mode: str, num_images: int) -> np.ndarray | None:
        """The given masks as uint8 (N, H, W), checked against the model: mask-conditioned and inpaint models need
        them (size equal to the model's slices, values 0 and 1 only; an empty mask is a tumour-free slice, or in
        inpaint mode a lesion erased), others refuse them."""
        if mode not in ("mask-conditioned", "inpaint"):
            if masks is not None:
                raise ConfigError(f"masks were given to a {mode} model; only a mask-conditioned model (train-diffusion "
                                  f"with model.mode: mask-conditioned) generates images for given masks")
            return None
        if masks is None:
            raise ConfigError(f"{'an' if mode == 'inpaint' else 'a'} {mode} model needs masks: {HOW_TO_CALL[mode]}")
        return _binary_maps(masks, "masks", num_images, slice_size(self.unet), "the model's size")

    def _inpaint_inputs(self, images, regions, mode: str, num_images: int
                        ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]] | None:
        """The slices to repaint as float32 (N, C, H, W), their regions as bool (N, H, W) and each region's crop
        window (top, left), checked: only inpaint models take slices and regions, and they need both (slices in
        [0, 1] of the model's size and channels, regions of 0/1 that are not empty and fit in the model's crop)."""
        if mode != "inpaint":
            if images is not None or regions is not None:
                raise ConfigError(f"images / regions were given to a {mode} model; only an inpaint model (train-"
                                  f"diffusion with model.mode: inpaint) repaints regions of given slices")
            return None
        if images is None or regions is None:
            raise ConfigError(f"an inpaint model repaints regions of given slices and does not sample freely: "
                              f"{HOW_TO_CALL[mode]}")
        size, channels = slice_size(self.unet), int(self.unet.config.out_channels)
        real = np.asarray(images.detach().cpu() if isinstance(images, torch.Tensor) else images, np.float32)
        real = real[:, None] if real.ndim == 3 else real
        if real.shape != (num_images, channels, size, size):
            raise ConfigError(f"images: expected {num_images} slices of {channels} channel(s) at {size}x{size} (the "
                              f"slices the model was trained on), got an array of shape {tuple(np.shape(images))}")
        if not np.isfinite(real).all() or real.min() < 0 or real.max() > 1:
            raise ConfigError(f"images must be prepared slices in [0, 1], got values in [{np.nanmin(real):.3g}, "
                              f"{np.nanmax(real):.3g}]{' and NaN or infinite ones' if not np.isfinite(real).all() else ''}")
        regions = _binary_maps(regions, "regions", num_images, size, "the images' size").astype(bool)
        crop, windows = int(self.unet.config.sample_size), []
        for i, region in enumerate(regions):
            if not region.any():
                raise ConfigError(f"region of slice {i} is empty: nothing to repaint")
            top, bottom, left, right = bounding_box(torch.from_numpy(region))
            if bottom - top >= crop or right - left >= crop:
                raise ConfigError(f"region of slice {i} spans {bottom - top + 1}x{right - left + 1} px, more than the "
                                  f"model's {crop} px crop: give a smaller region or train with a larger crop_size")
            windows.append((window_start(top, bottom, crop, size, 0.5), window_start(left, right, crop, size, 0.5)))
        return real, regions, windows

    @staticmethod
    def _generators(generator, num_images: int) -> list[torch.Generator]:
        """One generator per image: a list is used as given; one generator (or None: torch's global RNG) draws a
        seed per image, so an image depends on the generator's state and its index, not on the batch size."""
        if isinstance(generator, (list, tuple)):
            if len(generator) != num_images:
                raise ConfigError(f"{len(generator)} generators for {num_images} images")
            return list(generator)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: a torch.Generator or a list of them (seed_generators(seed, n)), "
                            f"not {type(generator).__name__}")
        seeds = torch.randint(0, 2**62, (num_images,), generator=generator).tolist()
        return [torch.Generator().manual_seed(int(s)) for s in seeds]

    @torch.no_grad()
    def __call__(self, num_images: int = 1, *, class_labels: int | Sequence[int] | None = None,
                 guidance_scale: float = 1.0, num_inference_steps: int | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None, batch_size: int | None = None,
                 save_intermediates: bool = False, callback_on_step_end: Callable | None = None,
                 output_type: str = "np", return_dict: bool = True,
                 masks: np.ndarray | torch.Tensor | Sequence | None = None,
                 images: np.ndarray | torch.Tensor | None = None,
                 regions: np.ndarray | torch.Tensor | Sequence | None = None) -> SliceDiffusionOutput | tuple:
        """Generate `num_images` slices. `masks` (N, H, W) of 0/1, H = W = the model's size: the masks a
        mask-conditioned model generates images for (required there, refused by joint and image models); they come
        back unchanged as the output's masks. An inpaint model needs `images` (N, H, W) (colour: (N, C, H, W)) in
        [0, 1], `regions` (N, H, W) of 0/1 and `masks` (the slices' lesion masks: a placed lesion, the slice's own
        tumour, or empty where a lesion is erased): it repaints each region and returns the slices with every
        pixel outside the region unchanged (as float32), and the masks. `num_inference_steps` defaults to the
        training timesteps (full DDPM); `guidance_scale` > 1 applies classifier-free guidance towards `class_labels`. `callback_on_step_end(pipe,
        step, timestep, {})` runs after every denoising step, as in diffusers; raising from it stops sampling.
        `output_type` "np", "pt" or "pil" (`convert_output`); `return_dict=False` gives the output's fields as a
        tuple in their order, None included. The progress bar follows `set_progress_bar_config`."""
        if num_images < 1:
            raise ConfigError(f"number of images must be at least 1, got {num_images}")
        steps = num_inference_steps or self.scheduler.config.num_train_timesteps
        if steps < 1:
            raise ConfigError(f"steps must be at least 1, got {steps}")
        if steps > self.scheduler.config.num_train_timesteps:
            raise ConfigError(f"steps {steps} exceed the {self.scheduler.config.num_train_timesteps} training timesteps")
        if guidance_scale <= 0:
            raise ConfigError(f"guidance scale must be positive, got {guidance_scale}")
        check_output_type(output_type)
        labels = self._labels(class_labels, num_images)
        if guidance_scale != 1.0 and labels is None:
            raise ConfigError("classifier-free guidance (guidance != 1) needs a class to guide towards")
        image_channels, mode = model_layout(self.unet)
        inpaint = self._inpaint_inputs(images, regions, mode, num_images)
        given = self._masks(masks, mode, num_images)
        condition = None
        if mode == "mask-conditioned":  # the clean mask in [-1, 1], never noised, one more input channel
            condition = given[:, None].astype(np.float32) * 2 - 1
        elif inpaint is not None:
            condition = self._inpaint_condition(*inpaint, given)
        generators = self._generators(generator, num_images)
        batch_size = batch_size or num_images
        if batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {batch_size}")
        chunks, snapshots = [], []
        with self.progress_bar(total=num_images * steps) as bar:
            for start in range(0, num_images, batch_size):
                stop = min(start + batch_size, num_images)
                x, snaps = self._denoise(generators[start:stop], None if labels is None else labels[start:stop],
                                         guidance_scale, steps, save_intermediates, bar, callback_on_step_end,
                                         None if condition is None else condition[start:stop])
                chunks.append(x)
                snapshots.append(snaps)
        x = torch.cat(chunks).float().cpu().numpy()
        images = np.clip((x[:, :image_channels] + 1) / 2, 0, 1).astype(np.float32)
        if inpaint is not None:
            images = self._paste(images, *inpaint)
        images = images[:, 0] if image_channels == 1 else images
        masks = (x[:, image_channels] > 0).astype(np.uint8) if mode == "joint" else given
        intermediates = None
        if save_intermediates:
            intermediates = [(t, convert_output(np.concatenate([s[i][1] for s in snapshots]), output_type))
                             for i, (t, _) in enumerate(snapshots[0])]
        labels = None if labels is None else labels.numpy().astype(np.int64)
        output = SliceDiffusionOutput(images=convert_output(images, output_type, picture=True),
                                      masks=convert_output(masks, output_type, picture=True),
                                      labels=convert_output(labels, output_type), intermediates=intermediates)
        return self._returned(output, return_dict)

    def _inpaint_condition(self, real: np.ndarray, regions: np.ndarray, windows: list[tuple[int, int]],
                           masks: np.ndarray) -> np.ndarray:
        """Each slice's crop window as the inpaint UNet's condition channels (models.diffusion.inpaint_condition)."""
        crop = int(self.unet.config.sample_size)

        def crops(values: np.ndarray) -> torch.Tensor:
            values = values if values.ndim == 4 else values[:, None]
            return torch.from_numpy(np.stack([v[:, r:r + crop, c:c + crop] for v, (r, c) in zip(values, windows)]))

        return inpaint_condition(crops(real) * 2 - 1, crops(regions), crops(masks)).numpy()

    def _paste(self, generated: np.ndarray, real: np.ndarray, regions: np.ndarray,
               windows: list[tuple[int, int]]) -> np.ndarray:
        """The real slices with each region's pixels taken from its denoised crop; all others stay the real ones."""
        crop, out = int(self.unet.config.sample_size), real.copy()
        for i, (r, c) in enumerate(windows):
            window = out[i, :, r:r + crop, c:c + crop]
            window[:] = np.where(regions[i, None, r:r + crop, c:c + crop], generated[i], window)
        return out

    @staticmethod
    def _returned(output: BaseOutput, return_dict: bool) -> BaseOutput | tuple:
        """The output dataclass, or with `return_dict=False` its fields as a tuple (None kept, so that positions
        do not move; BaseOutput.to_tuple drops them)."""
        return output if return_dict else tuple(getattr(output, f.name) for f in fields(output))

    def _denoise(self, generators, labels, guidance_scale, steps, save_intermediates, bar, callback, condition=None):
        unet, scheduler, device = self.unet, self.scheduler, self._execution_device
        size = unet.config.sample_size
        shape = (len(generators), unet.config.out_channels, size, size)  # the denoised channels (in: + condition)
        x = randn_tensor(shape, generator=generators, device=device, dtype=unet.dtype) * scheduler.init_noise_sigma
        scheduler.set_timesteps(steps, device=device)
        guided = labels is not None and guidance_scale != 1.0
        if labels is None and num_classes(unet):  # a class-conditional model samples freely with its null class
            labels = torch.full((len(generators),), num_classes(unet), dtype=torch.long)
        if labels is not None:
            labels = labels.to(device)
            if guided:  # conditional and unconditional halves in one forward pass
                labels = torch.cat([labels, torch.full_like(labels, num_classes(unet))])
        if condition is not None:  # clean input channels in [-1, 1], never noised (mask-conditioned, inpaint)
            condition = torch.from_numpy(condition).to(device=device, dtype=unet.dtype)
            condition = torch.cat([condition, condition]) if guided else condition
        timesteps = scheduler.timesteps
        keep = set(np.linspace(0, len(timesteps) - 1, min(INTERMEDIATE_SNAPSHOTS, len(timesteps))).round().astype(int))
        # stochastic samplers take the generators; deterministic ones (PNDM) have no such argument
        extra = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
        snaps = []
        for i, t in enumerate(timesteps):
            model_in = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
            if condition is not None:
                model_in = torch.cat([model_in, condition], dim=1)
            out = unet(model_in, t, class_labels=labels).sample
            if guided:
                cond, uncond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            x = scheduler.step(out, t, x, **extra).prev_sample
            if save_intermediates and i in keep:
                snaps.append((int(t), np.clip((x.float().cpu().numpy() + 1) / 2, 0, 1)))
            bar.update(len(generators))
            if callback is not None:
                callback(self, i, t, {})
        return x, snaps


def is_diffusion_run(path: str | Path) -> bool:
    path = Path(path)
    return (path / "model_index.json").is_file() and (path / "unet").is_dir() and (path / "scheduler").is_dir()


def load_diffusion(run_dir: str | Path, device: str | torch.device | None = None) -> SliceDiffusionPipeline:
    """The EMA generator of a `train-diffusion` run or of a saved GenSegPipeline folder (its unet/ and
    scheduler/; the segmenter is not loaded); CheckpointError if the folder is neither."""
    path = Path(run_dir)
    if not path.exists():
        raise CheckpointError(f"{path}: not found")
    if not is_diffusion_run(path):
        hint = " (it looks like a segmentation run)" if (path / "model").is_dir() else ""
        raise CheckpointError(f"{path}: not a diffusion run{hint}: expected model_index.json, unet/ and scheduler/ "
                              f"as written by `genseg train-diffusion`")
    try:
        scheduler_class = json.loads((path / "model_index.json").read_text())["scheduler"][1]
        scheduler = getattr(diffusers, scheduler_class).from_pretrained(path, subfolder="scheduler")
        unet = UNet2DModel.from_pretrained(path, subfolder="unet", use_safetensors=True)
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: cannot load the diffusion model ({type(exc).__name__}: {exc})") from None
    pipe = SliceDiffusionPipeline(unet=unet, scheduler=scheduler)
    try:
        model_layout(pipe.unet)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return pipe.to(device) if device is not None else pipe
