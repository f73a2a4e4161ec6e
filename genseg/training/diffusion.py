"""Diffusion training: a DDPM denoiser on prepared slices, plugged into the shared loop (loop.py).

Each step noises a batch at random timesteps (the forward process) and regresses the UNet's output on the
noise (`epsilon`) or the velocity (`v_prediction`), optionally with min-SNR weighting and an extra weight on
the mask channel (joint mode). In mask-conditioned mode the clean mask (as mask * 2 - 1) is one more input
channel and never noised, and the loss is on the image channels only. In inpaint mode each slice gives one crop
of `crop_size` px holding a region to repaint (`inpaint_crops`): its lesion grown by `region_margin`, or a random
ellipse on tumour-free tissue, so the model learns normal tissue as well as lesions and a generator stays cheap;
the loss is on the image channels only, `region_weight` times heavier inside the region. An EMA copy of the
weights (diffusers' EMAModel, with warm-up) is what gets saved and sampled.
Every random draw of a step (flips, crops and regions, class dropout, noise, timesteps) comes from one generator
saved in each checkpoint, so a resumed run continues exactly like an uninterrupted one, also from the middle of an
epoch.

A run directory is a diffusers pipeline folder plus training files:
  model_index.json, unet/ (EMA weights, safetensors), scheduler/   -> `load_diffusion`, plain diffusers
  config.yaml (the resolved DiffusionTrainConfig), run.json (data, precision that ran), log.csv,
  checkpoints/step-N (accelerate state + EMA, keep-last-K, for --resume), samples/step-N.png grids.
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from torch.utils.data import DataLoader

from ..config import config_from_dict, load_config
from ..data.prepared import PreparedDataset, read_metadata
from ..data.regions import bounding_box, brain_mask, dilate, ellipse, window_start
from ..errors import ConfigError, DataError
from ..io import replace_path
from ..models.diffusion import (DiffusionModelConfig, build_scheduler, build_unet, inpaint_condition,
                                make_sampling_scheduler)
from ..pipeline.diffusion import SliceDiffusionPipeline, seed_generators
from ..runs import check_resume, default_run_dir, refuse_to_overwrite
from .loop import Hooks, SavedGenerator, Trainer, TrainState, effective_precision, make_accelerator, start_run
from .mixing import kept_patient_ids, subsample_patients
from .tracking import accelerator_tracking, finish_tracking, log_image_files, start_tracking
from .transfer import InitResult, initial_unet

# Settings that may differ when a run is resumed (they do not change what the saved state means).
REGION_AXES = (0.1, 0.3)  # inpaint: semi-axes of a healthy region's ellipse, U(low, high) times the crop side

RESUMABLE_KEYS = {"max_steps", "checkpoint_every_steps", "keep_last", "sample_every_steps", "sample_count",
                  "sample_steps", "log_every_steps", "num_workers", "report_to"}


@dataclass
class DiffusionTrainConfig:
    """Everything a diffusion run depends on; written to RUN_DIR/config.yaml."""

    model: DiffusionModelConfig = field(default_factory=DiffusionModelConfig)
    split: Literal["train", "all"] = "train"  # slices to learn from: the training split (keeps val/test unseen)
    real_fraction: float = 1.0  # share of the split's patients kept, seeded by `seed`: the same patients that
                                # `train-seg --real-fraction F --seed S` keeps, for a generator matched to a segmenter
    max_steps: int = 5000  # optimizer steps
    batch_size: int = 16
    lr: float = 2e-3
    lr_warmup_steps: int = 200
    lr_schedule: Literal["cosine", "constant_with_warmup", "linear"] = "cosine"
    weight_decay: float = 0.0
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0
    grad_accum: int = 1
    ema_decay: float = 0.999  # ceiling; EMA warm-up ramps the decay up from 0
    ema_power: float = 0.75  # warm-up speed: decay = 1 - (1 + step)^-power
    snr_gamma: float | None = 5.0  # min-SNR loss weighting (Hang et al. 2023); null = plain MSE
    mask_weight: float = 1.0  # joint mode: loss weight of the mask channel relative to the image channels
                              # (mask-conditioned mode: unused, the mask is an input, not denoised)
    class_dropout: float = 0.1  # share of labels replaced by the null class (needed for guidance)
    healthy_fraction: float = 0.5  # inpaint: share of slices with a lesion whose crop repaints healthy tissue
                                   # instead (tumour-free slices always do), so the model also learns normal tissue
    region_weight: float = 1.0  # inpaint: loss weight of the region's pixels relative to the rest of the crop
    hflip: bool = True
    seed: int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    num_workers: int = 0
    checkpoint_every_steps: int = 250
    keep_last: int = 2
    log_every_steps: int = 10
    sample_every_steps: int = 500  # 0 = no sample grids during training
    sample_count: int = 16
    sample_steps: int = 20  # DPM-Solver++ steps of the grids
    init_from: str | None = None  # continue a trained generator (run or pipeline folder) on this data
    report_to: Literal["none", "tensorboard", "wandb", "mlflow"] = "none"  # a tracker's copy of log.csv (tracking.py)

    def __post_init__(self):
        if isinstance(self.model, dict):
            self.model = config_from_dict(DiffusionModelConfig, self.model, "model")
        checks = [
            (self.max_steps > 0 and self.batch_size > 0 and self.lr > 0, "max_steps, batch_size and lr must be positive"),
            (self.grad_accum >= 1 and self.checkpoint_every_steps >= 1 and self.log_every_steps >= 1,
             "grad_accum, checkpoint_every_steps and log_every_steps must be >= 1"),
            (0.0 < self.ema_decay < 1.0, f"ema_decay must be in (0, 1), got {self.ema_decay}"),
            (0.0 < self.real_fraction <= 1.0, f"real_fraction must be in (0, 1], got {self.real_fraction}"),
            (self.snr_gamma is None or self.snr_gamma > 0, "snr_gamma must be positive (or null)"),
            (0.0 <= self.class_dropout < 1.0, f"class_dropout must be in [0, 1), got {self.class_dropout}"),
            (0.0 <= self.healthy_fraction <= 1.0, f"healthy_fraction must be in [0, 1], got {self.healthy_fraction}"),
            (self.region_weight > 0, f"region_weight must be positive, got {self.region_weight}"),
            (self.sample_every_steps >= 0 and self.sample_count >= 1 and self.sample_steps >= 1,
             "sample_every_steps >= 0, sample_count >= 1 and sample_steps >= 1"),
        ]
        for ok, problem in checks:
            if not ok:
                raise ConfigError(problem)


def _check_data(cfg: DiffusionTrainConfig, data: str | Path) -> dict:
    attrs = read_metadata(data)["attrs"]
    m = cfg.model
    if (int(attrs["size"]), int(attrs["channels"])) != (m.sample_size, m.image_channels):
        raise ConfigError(f"model sample_size {m.sample_size} / image_channels {m.image_channels} do not match {data} "
                          f"({attrs['size']}x{attrs['size']}, {attrs['channels']} channel(s)); prepare the data with "
                          f"--size {m.sample_size} or change model.sample_size in the config")
    if attrs.get("synthetic"):
        raise DataError(data, "is a synthetic file; train the generator on real prepared data")
    return attrs


def _check_resume(cfg: DiffusionTrainConfig, out: Path, data: str | Path) -> None:
    if (out / "config.yaml").exists():  # modes never mix in one run folder: say so before the generic refusal
        saved = load_config(DiffusionTrainConfig, out / "config.yaml").model.mode
        if saved != cfg.model.mode:
            raise ConfigError(f"{out}: holds a {saved} generator; cannot resume it as {cfg.model.mode} (model.mode); "
                              f"start a new run with another --out instead")
    old = check_resume(cfg, out, RESUMABLE_KEYS, "train-diffusion")["data"]
    if old != str(Path(data).resolve()):
        raise ConfigError(f"{out}: was trained on {old}; resume with the same --data")


def to_model_space(batch: dict, joint: bool) -> torch.Tensor:
    """Prepared [0, 1] images (and 0/1 masks in joint mode) -> the model's [-1, 1] channels."""
    x = batch["image"] * 2 - 1
    return torch.cat([x, batch["mask"] * 2 - 1], dim=1) if joint else x


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each slice (with its mask channel) mirrored left-right with probability 1/2."""
    flip = torch.rand(len(x), generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def diffusion_loss(model, noise_scheduler, x0: torch.Tensor, labels: torch.Tensor | None, cfg: DiffusionTrainConfig,
                   generator: torch.Generator | None = None, condition: torch.Tensor | None = None,
                   pixel_weight: torch.Tensor | None = None) -> torch.Tensor:
    """One denoising-regression loss on a clean batch `x0` in [-1, 1] (module docstring); `condition` (mask-
    conditioned and inpaint mode): clean input channels in [-1, 1], appended to the noised input and never noised
    themselves; `pixel_weight` (N, 1, H, W): each pixel's weight in its slice's mean error (None: equal)."""
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator,
                      device=x0.device)
    noisy = noise_scheduler.add_noise(x0, noise, t)
    target = noise if cfg.model.prediction_type == "epsilon" else noise_scheduler.get_velocity(x0, noise, t)
    model_in = noisy if condition is None else torch.cat([noisy, condition.to(noisy.dtype)], dim=1)
    pred = model(model_in, t, class_labels=labels).sample
    error = F.mse_loss(pred.float(), target.float(), reduction="none")
    if pixel_weight is None:
        per_channel = error.mean(dim=(2, 3))  # (N, C)
    else:
        weight = pixel_weight.float()
        per_channel = (error * weight).sum(dim=(2, 3)) / weight.sum(dim=(2, 3))
    if cfg.model.mode == "joint":
        weights = torch.ones(per_channel.shape[1], device=x0.device)
        weights[-1] = cfg.mask_weight
        per_sample = (per_channel * weights).sum(1) / weights.sum()
    else:
        per_sample = per_channel.mean(1)
    if cfg.snr_gamma is not None:
        snr = compute_snr(noise_scheduler, t)
        weight = torch.clamp(snr, max=cfg.snr_gamma) / (snr + 1 if cfg.model.prediction_type == "v_prediction" else snr)
        per_sample = per_sample * weight
    return per_sample.mean()


def _conditioning(labels: torch.Tensor, cfg: DiffusionTrainConfig, generator: torch.Generator | None = None
                  ) -> torch.Tensor | None:
    """Class ids for the UNet: unknown (-1) labels and a `class_dropout` share become the null class."""
    m = cfg.model
    if not m.num_classes:
        return None
    drop = (labels < 0) | (torch.rand(labels.shape, generator=generator, device=labels.device) < cfg.class_dropout)
    return torch.where(drop, torch.full_like(labels, m.null_class), labels)


def save_pipeline(unet: UNet2DModel, cfg: DiffusionTrainConfig, out: Path) -> None:
    """Write model_index.json, unet/ and scheduler/ into the run directory, each replaced atomically."""
    pipe = SliceDiffusionPipeline(unet=unet, scheduler=build_scheduler(cfg.model))
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pipeline-", dir=out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for name in ("unet", "scheduler", "model_index.json"):
            replace_path(Path(tmp) / name, out / name)


def sample_grid(pipe: SliceDiffusionPipeline, path: Path, count: int, steps: int, seed: int, **given) -> Path:
    """A grid of `count` samples (mask outlined in joint mode, the `given` masks in mask-conditioned mode, the
    given slices with their regions repainted in inpaint mode: `_grid_inputs`), DPM-Solver++ at `steps` steps."""
    from ..viz import overlay, save_grid

    pipe.scheduler = make_sampling_scheduler("dpmsolver", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)  # the training bar is the one to watch
    k = pipe.unet.config.num_class_embeds
    labels = [i % (k - 1) for i in range(count)] if k else None
    result = pipe(count, class_labels=labels, num_inference_steps=steps, generator=seed_generators(seed, count),
                  **given)
    tiles = [overlay(img, m) if m is not None else img
             for img, m in zip(result.images, result.masks if result.masks is not None else [None] * count)]
    titles = [f"class {c}" for c in labels] if labels else None
    return save_grid(tiles, path, ncols=int(np.ceil(np.sqrt(count))), titles=titles)


@dataclass
class DiffusionRunResult:
    run_dir: Path
    metrics: dict  # steps, final logged loss, seconds, precision, images/s
    main_process: bool = True  # False on the other processes of a multi-process run


def train_diffusion(cfg: DiffusionTrainConfig, data: str | Path, out: str | Path | None = None, resume: bool = False,
                    cpu: bool = False) -> DiffusionRunResult:
    """Train (or with `resume`, continue) a generator on `data` until `cfg.max_steps` optimizer steps."""
    out = Path(out) if out is not None else default_run_dir("diffusion")
    attrs = _check_data(cfg, data)
    if resume:
        _check_resume(cfg, out, data)
    else:
        refuse_to_overwrite(out)
    acc = make_accelerator(cfg.mixed_precision, cfg.grad_accum, cpu=cpu, seed=cfg.seed,
                           tracking=accelerator_tracking(cfg.report_to, out))
    set_seed(cfg.seed)
    dataset = _training_slices(cfg, data)
    init = initial_unet(cfg, load=not resume)  # a bad --init-from fails here, before anything is written
    for message in init.messages:
        acc.print(message)
    ema = EMAModel(init.model.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=cfg.ema_power)
    rng = SavedGenerator(cfg.seed, acc.device)  # the same on every process, as set_seed leaves the global RNG
    trainer = _diffusion_trainer(cfg, dataset, init.model, acc, out, {"ema": ema, "rng": rng})
    info = _run_info(cfg, data, attrs, dataset, init, acc)
    start_run(trainer, cfg, info, resume)
    ema.to(acc.device)
    train_batch = functools.partial(_train_batch, cfg=cfg, noise_scheduler=build_scheduler(cfg.model),
                                    generator=rng.generator)
    grid_inputs = _grid_inputs(dataset, cfg.sample_count, cfg.model)
    hooks = Hooks(after_step=lambda state: _after_step(state, trainer.model, ema, cfg, out, acc, grid_inputs),
                  log_row=lambda state: {"ema_decay": ema.cur_decay_value})
    start_tracking(acc, "train-diffusion", cfg)
    trainer.fit(train_batch, max_steps=cfg.max_steps, hooks=hooks, desc=f"train-diffusion {out.name}")
    result = _diffusion_result(trainer, ema, cfg, info["precision"])
    finish_tracking(acc)
    return result


def _grid_inputs(dataset: PreparedDataset, count: int, m: DiffusionModelConfig) -> dict[str, np.ndarray]:
    """What the sample grids are drawn for, the same at every step so they show progress on fixed inputs, from
    the first training slices (repeated when there are fewer): their masks (mask-conditioned), or the slices
    themselves with a region each (inpaint): the lesion grown by region_margin where that fits the crop, else a
    disc of a sixth of the crop at the brain's centre. Nothing for joint and image models."""
    if m.mode not in ("mask-conditioned", "inpaint"):
        return {}
    rows = [dataset[i % len(dataset)] for i in range(count)]
    masks = np.stack([row["mask"][0].numpy() for row in rows]).astype(np.uint8)
    if m.mode == "mask-conditioned":
        return {"masks": masks}
    images = np.stack([row["image"].numpy() for row in rows])
    regions = dilate(torch.from_numpy(masks), m.region_margin)
    for i, region in enumerate(regions):
        if region.any():
            top, bottom, left, right = bounding_box(region)
            if bottom - top < m.unet_size and right - left < m.unet_size:
                continue
        brain = brain_mask(images[i])
        centre = np.argwhere(brain).mean(0) if brain.any() else np.full(2, m.sample_size / 2)
        regions[i] = ellipse(m.sample_size, tuple(centre), (m.unet_size / 6,) * 2, 0.0)
    return {"images": images, "masks": masks, "regions": regions.numpy().astype(np.uint8)}


def inpaint_crops(x: torch.Tensor, m: DiffusionModelConfig, healthy_fraction: float, generator: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One crop of m.unet_size px per slice for an inpaint step, from `x` (N, image channels + mask, H, W) in
    [-1, 1]: (clean image crops, their condition channels, regions (N, 1, S, S) bool). The region is the slice's
    lesion grown by region_margin or, for tumour-free slices and a `healthy_fraction` share of the others, a
    random ellipse (semi-axes REGION_AXES of the crop, any angle) on the brain (data.regions.brain_mask), kept
    clear of the lesion where the brain has room: the lesion mask is empty there, which teaches the normal tissue
    that erasing a lesion asks for. The crop holds the region at a random offset. The draws come from `generator`
    as one (N, 7) table, so how many are drawn never depends on the data and a resumed run draws the same."""
    c, size, crop = m.image_channels, x.shape[-1], m.unet_size
    draws = torch.rand(len(x), 7, generator=generator, device=generator.device).cpu().tolist()
    slices = x.detach().float().cpu()
    lesions = slices[:, c] > 0
    crops, regions = [], []
    for i, (healthy, pick, axis_a, axis_b, turn, down, across) in enumerate(draws):
        if healthy < healthy_fraction or not lesions[i].any():
            low, high = REGION_AXES
            axes = (crop * (low + (high - low) * axis_a), crop * (low + (high - low) * axis_b))
            brain = torch.from_numpy(brain_mask((slices[i, :c].numpy() + 1) / 2))
            near_lesion = dilate(lesions[i], int(np.ceil(max(axes))))  # a centre here would reach the lesion
            clear = next(pixels for pixels in (brain & ~near_lesion, brain, torch.ones_like(brain)) if pixels.any())
            centres = torch.nonzero(clear)
            region = ellipse(size, centres[min(int(pick * len(centres)), len(centres) - 1)].tolist(), axes,
                             turn * np.pi)
        else:
            region = dilate(lesions[i], m.region_margin)
        top, bottom, left, right = bounding_box(region)
        row, col = window_start(top, bottom, crop, size, down), window_start(left, right, crop, size, across)
        crops.append(x[i, :, row:row + crop, col:col + crop])
        regions.append(region[row:row + crop, col:col + crop])
    crops, regions = torch.stack(crops), torch.stack(regions)[:, None].to(x.device)
    images = crops[:, :c]
    return images, inpaint_condition(images, regions, crops[:, c:] > 0), regions


def _training_slices(cfg: DiffusionTrainConfig, data: str | Path) -> PreparedDataset:
    """The split's slices of the kept patients, unaugmented: the step flips them with the saved generator."""
    dataset = PreparedDataset(data, split=None if cfg.split == "all" else cfg.split)
    kept = dataset.rows[subsample_patients(dataset.patients, cfg.real_fraction, cfg.seed)]
    dataset = PreparedDataset(data, indices=kept)
    if len(dataset) == 0:
        raise DataError(data, f"has no slices in split {cfg.split!r}")
    if cfg.model.num_classes and dataset.labels.max() >= cfg.model.num_classes:
        raise DataError(data, f"has label {int(dataset.labels.max())}, outside the model's classes 0.."
                              f"{cfg.model.num_classes - 1}; raise model.num_classes")
    return dataset


def _diffusion_trainer(cfg: DiffusionTrainConfig, dataset: PreparedDataset, unet: UNet2DModel, acc: Accelerator,
                       out: Path, extra_state: dict) -> Trainer:
    """AdamW under a warm-up schedule on shuffled batches, with a log row every `log_every_steps`."""
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, betas=(0.9, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay)
    lr_scheduler = get_scheduler(cfg.lr_schedule, optimizer, num_warmup_steps=cfg.lr_warmup_steps * acc.num_processes,
                                 num_training_steps=cfg.max_steps * acc.num_processes)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.num_workers)
    return Trainer(acc, unet, optimizer, loader, out, lr_scheduler=lr_scheduler, max_grad_norm=cfg.max_grad_norm,
                   checkpoint_every_steps=cfg.checkpoint_every_steps, log_every_steps=cfg.log_every_steps,
                   keep_last=cfg.keep_last, extra_state=extra_state)


def _run_info(cfg: DiffusionTrainConfig, data: str | Path, attrs: dict, dataset: PreparedDataset, init: InitResult,
              acc: Accelerator) -> dict:
    """run.json: the data and patients learned from, the precision that ran, the model and where it started."""
    return {"data": str(Path(data).resolve()), "slices": len(dataset), "real_fraction": cfg.real_fraction,
            "patients": int(len(set(dataset.patients.tolist()))),
            "kept_patients": kept_patient_ids(dataset.patients, cfg.real_fraction), "precision": effective_precision(acc),
            "processes": acc.num_processes, "parameters": sum(p.numel() for p in init.model.parameters()),
            "modality": attrs.get("modality", "unknown"), "class_names": (attrs.get("metadata") or {}).get("class_names"),
            "init_from": init.info}


def _train_batch(model: UNet2DModel, batch: dict, cfg: DiffusionTrainConfig, noise_scheduler,
                 generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """A batch's loss; its flips, class dropout, noise and timesteps all come from the run's saved generator."""
    mode = cfg.model.mode
    x0 = to_model_space(batch, mode != "image")  # conditioned modes: the mask too, so that a flip moves both
    if cfg.hflip:
        x0 = random_hflip(x0, generator)
    condition = weight = None
    if mode == "mask-conditioned":
        x0, condition = x0[:, :cfg.model.image_channels], x0[:, cfg.model.image_channels:]
    elif mode == "inpaint":
        x0, condition, regions = inpaint_crops(x0, cfg.model, cfg.healthy_fraction, generator)
        weight = 1 + (cfg.region_weight - 1) * regions.to(x0.dtype)
    labels = _conditioning(batch["label"], cfg, generator)
    return diffusion_loss(model, noise_scheduler, x0, labels, cfg, generator, condition, weight), {}


def _diffusion_result(trainer: Trainer, ema: EMAModel, cfg: DiffusionTrainConfig, precision: str
                      ) -> DiffusionRunResult:
    """Steps, the last logged loss and the speed, once every process is done; a resumed run that had nothing left
    to train still gets its pipeline folder."""
    acc, state, out = trainer.accelerator, trainer.state, trainer.run_dir
    acc.wait_for_everyone()
    if acc.is_main_process and not (out / "model_index.json").exists():
        save_pipeline(_ema_unet(ema, cfg.model), cfg, out)
    rows = [r for r in trainer.log.rows() if r.get("loss")]
    metrics = {"steps": state.step, "loss": float(rows[-1]["loss"]) if rows else None,
               "train_seconds": round(state.elapsed_s, 2), "precision": precision,
               "images_per_s": round(state.step * cfg.batch_size * cfg.grad_accum * acc.num_processes
                                     / max(state.elapsed_s, 1e-9), 2)}
    return DiffusionRunResult(out, metrics, acc.is_main_process)


def _ema_unet(ema: EMAModel, model_cfg: DiffusionModelConfig) -> UNet2DModel:
    copy = build_unet(model_cfg)
    ema.copy_to(copy.parameters())
    return copy


def _after_step(state: TrainState, model: torch.nn.Module, ema: EMAModel, cfg: DiffusionTrainConfig, out: Path,
                acc: Accelerator, grid_inputs: dict[str, np.ndarray] | None = None) -> None:
    """Update the EMA weights; write them as the pipeline whenever a checkpoint is due, so the pipeline folder
    always holds the newest EMA weights a checkpoint also has, and sample a grid every `sample_every_steps`."""
    ema.step(acc.unwrap_model(model).parameters())
    due_save = state.step % cfg.checkpoint_every_steps == 0 or state.step >= cfg.max_steps
    due_grid = cfg.sample_every_steps and state.step % cfg.sample_every_steps == 0
    if acc.is_main_process and (due_save or due_grid):
        unet = _ema_unet(ema, cfg.model)
        if due_save:
            save_pipeline(unet, cfg, out)
        if due_grid:
            pipe = SliceDiffusionPipeline(unet=unet.to(acc.device), scheduler=build_scheduler(cfg.model))
            grid = sample_grid(pipe, out / "samples" / f"step-{state.step:08d}.png", cfg.sample_count,
                               cfg.sample_steps, cfg.seed, **(grid_inputs or {}))
            log_image_files(acc, {"samples": grid}, state.step)
