"""`genseg sample` and the process figures: synthetic slices from a diffusion run, written in the prepared
HDF5 format (same schema as `genseg prepare`, marked synthetic) so every consumer reads them like real data.

Each synthetic slice is its own "patient" (synth-00000, ...), so patient-wise folds are simply slice-wise. Labels:
the requested class when the model is class-conditional, else 0 for a slice whose generated mask is empty and
-1 (unknown) otherwise. In image mode no masks are generated: the file holds empty masks and its metadata says
`mask_source: none`, so they must be segmented before training on them. In mask-conditioned mode the masks are
given (`--masks-from DATA.h5`: drawn from a prepared file's training split, optionally transformed, each used for
`--per-mask` K images) and written exactly as the model received them: `mask_source: given`, with the source
file, its rows, the augmentations and K in the metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..data.augment import MASK_AUGMENTS, MaskAugment
from ..data.prepared import PreparedDataset, PreparedWriter, open_prepared, read_metadata
from ..errors import ConfigError, DataError
from ..models.diffusion import build_scheduler
from ..pipeline.diffusion import (SamplingSettings, SliceDiffusionOutput, SliceDiffusionPipeline, load_diffusion,
                                  model_layout)


def draw_masks(path: str | Path, size: int, num: int | None = None, seed: int = 0,
               augment: tuple[str, ...] | list[str] = ()) -> tuple[np.ndarray, dict]:
    """Masks for a mask-conditioned model from the prepared file `path`: `num` drawn from its training split with
    `seed` (a seeded permutation, repeated when `num` exceeds the split; None: every training mask, in file
    order), transformed by MaskAugment(`augment`, `seed`). Returns uint8 (num, size, size) {0, 1} and what goes
    into the synthetic file's metadata. Checked before anything is sampled (DataError naming the file): the file
    holds masks (not an image-mode synthetic file), of the model's `size`, with values 0 and 1 only. Empty masks
    are valid: they ask for tumour-free slices."""
    path = Path(path)
    if num is not None and num < 1:
        raise ConfigError(f"--num must be at least 1, got {num}")
    meta = read_metadata(path)  # DataError when it is no prepared file or lacks its masks dataset
    attrs = meta["attrs"]
    if (attrs.get("metadata") or {}).get("mask_source") == "none":
        raise DataError(path, "holds no masks: it was sampled from an image-only model and its masks are empty "
                              "placeholders; give a real prepared file or a joint / mask-conditioned sample")
    if int(attrs["size"]) != size:
        raise DataError(path, f"masks are {attrs['size']}x{attrs['size']} but the model generates {size}x{size}; "
                              f"prepare the data with --size {size}")
    train = np.flatnonzero(meta["split"] == "train")
    if not len(train):
        raise DataError(path, "has no training slices (split 'train') to draw masks from")
    if num is None:
        rows = train
    else:
        rng = np.random.default_rng(seed)
        rows = np.concatenate([rng.permutation(train) for _ in range(-(-num // len(train)))])[:num]
    with open_prepared(path) as h5:
        order = np.argsort(rows, kind="stable")  # h5py reads increasing rows; a row may come twice
        unique, inverse = np.unique(rows[order], return_inverse=True)
        read = h5["masks"][unique.tolist()]
    masks = np.empty((len(rows), size, size), read.dtype)
    masks[order] = read[inverse]
    values = np.unique(masks)
    bad = [v for v in values.tolist() if v not in (0, 1)]
    if bad:
        row = int(rows[np.flatnonzero((~np.isin(masks, (0, 1))).reshape(len(rows), -1).any(1))[0]])
        raise DataError(path, f"mask of row {row} holds value {bad[0]}{' (and others)' if len(bad) > 1 else ''}; "
                              f"masks must hold 0 and 1 only (a label map or an 8-bit 0/255 mask?)")
    try:
        augmenter = MaskAugment(tuple(augment), seed)
    except ValueError as exc:
        raise ConfigError(f"--mask-augment: {exc}") from None
    masks = np.stack([augmenter(m, i).numpy() for i, m in enumerate(masks)]).astype(np.uint8)
    info = {"masks_from": str(path.resolve()), "mask_rows": rows.astype(int).tolist(),
            "mask_augment": list(augmenter.parts), "masks_kept_unchanged": augmenter.unchanged,
            "empty_masks": int((~masks.reshape(len(masks), -1).any(1)).sum())}
    return masks, info


def parse_mask_augment(text: str | None) -> tuple[str, ...]:
    """"flip,shift" -> ("flip", "shift"); ConfigError naming the choices for anything else."""
    parts = tuple(p.strip() for p in (text or "").split(",") if p.strip())
    unknown = [p for p in parts if p not in MASK_AUGMENTS]
    if unknown:
        raise ConfigError(f"--mask-augment: unknown {', '.join(unknown)}; choose from {','.join(MASK_AUGMENTS)}")
    return parts


def sample_to_file(run_dir: str | Path, num: int | None, out: str | Path,
                   sampling: SamplingSettings = SamplingSettings(), *, masks_from: str | Path | None = None,
                   mask_augment: tuple[str, ...] | list[str] = (), per_mask: int = 1,
                   png_dir: str | Path | None = None, save_intermediates: bool = False, device: str | None = None,
                   progress: bool = True) -> Path | None:
    """Sample `num` slices with `sampling` into the prepared file `out` (plus PNGs / a reverse process strip
    `OUT_reverse.png` when asked). Images depend on (seed, index) only, not on the batch size (up to float
    rounding). Under `accelerate launch` / `torchrun` the batches are split over the processes and the main
    process writes the one file, equal to a single process's (genseg.distributed), and the others return None
    without writing anything.

    A mask-conditioned model needs `masks_from` (and only it takes one): `num` masks (None: every training mask)
    are drawn from that prepared file's training split and transformed (`draw_masks`), and each gets `per_mask`
    images, mask i giving images i*K..i*K+K-1; everything is checked before the first denoising step."""
    if num is None and masks_from is None:
        raise ConfigError("--num is required (it may be left out only with --masks-from: every training mask)")
    if num is not None and num < 1:
        raise ConfigError(f"--num must be at least 1, got {num}")
    if per_mask < 1:
        raise ConfigError(f"--per-mask must be at least 1, got {per_mask}")
    if sampling.steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {sampling.steps}")
    from ..distributed import process_state
    from .distributed_sampling import sample_shared

    out, state = Path(out), process_state()  # several processes under accelerate launch / torchrun
    pipe = load_diffusion(run_dir, device=device or (state.device if state.num_processes > 1 else
                                                     ("cuda" if torch.cuda.is_available() else "cpu")))
    masks, given = given_masks(pipe, run_dir, num, masks_from, mask_augment, per_mask, sampling.seed)
    total = len(masks) if masks is not None else num
    settings = {**sampling.metadata(), **({"per_mask": per_mask, **given} if given is not None else {})}
    pipe.set_progress_bar_config(disable=not progress or not state.is_main_process)
    if state.num_processes > 1:
        result = sample_shared(state, pipe, total, out, sampling, save_intermediates=save_intermediates, masks=masks)
        if result is None:  # not the main process: its share is in the file the main process writes
            return None
    else:
        result = sampling.sample(pipe, total, save_intermediates=save_intermediates, masks=masks)
    write_samples(result, out, run_dir, settings, split_seed=sampling.seed)
    if png_dir is not None:
        write_pngs(result, Path(png_dir))
    if save_intermediates:
        reverse_process_figure(result, out.with_name(out.stem + "_reverse.png"))
    return out


def check_mask_options(pipe: SliceDiffusionPipeline, source, masks_from, mask_augment, per_mask: int) -> bool:
    """True when `pipe` generates for given masks; the mask options must agree with its mode (ConfigError naming
    `source`, the run or pipeline folder), checked before anything is drawn, sampled or written."""
    _, mode = model_layout(pipe.unet)
    if mode != "mask-conditioned":
        if masks_from is not None or mask_augment or per_mask != 1:
            raise ConfigError(f"--masks-from, --mask-augment and --per-mask need a mask-conditioned model; {source} "
                              f"holds a {mode} model")
        return False
    if masks_from is None:
        raise ConfigError(f"{source} holds a mask-conditioned model: it generates images for given masks; pass "
                          f"--masks-from DATA.h5 (a prepared file of the model's size)")
    return True


def given_masks(pipe: SliceDiffusionPipeline, source, num: int | None, masks_from, mask_augment, per_mask: int,
                seed: int) -> tuple[np.ndarray | None, dict | None]:
    """The masks each image is generated for, `per_mask` images each (None for joint / image models), and their
    metadata (`draw_masks`); the model's mode and the options must agree (`check_mask_options`)."""
    if not check_mask_options(pipe, source, masks_from, mask_augment, per_mask):
        return None, None
    masks, info = draw_masks(masks_from, int(pipe.unet.config.sample_size), num, seed, mask_augment)
    return np.repeat(masks, per_mask, axis=0), info


def sample_into(pipe: SliceDiffusionPipeline, num: int, out: str | Path, source: str | Path,
                sampling: SamplingSettings = SamplingSettings(), *, save_intermediates: bool = False
                ) -> SliceDiffusionOutput:
    """Sample with an already loaded generator (its progress bar as the caller configured it) into the synthetic
    prepared file `out`; `source` (its run or pipeline folder) and the sampler settings go into the file's
    metadata. Returns the samples."""
    result = sampling.sample(pipe, num, save_intermediates=save_intermediates)
    write_samples(result, out, source, sampling.metadata(), split_seed=sampling.seed)
    return result


def write_samples(result: SliceDiffusionOutput, out: str | Path, run_dir: str | Path, settings: dict,
                  split_seed: int = 0) -> Path:
    """A pipeline's output as a synthetic prepared file; `settings` (sampler, steps, seed, ...) go into metadata.
    Settings with `masks_from` mark the masks as given to a mask-conditioned model (`mask_source: given`)."""
    run_dir, out = Path(run_dir), Path(out)
    info_path = run_dir / "run.json"
    run_info = json.loads(info_path.read_text()) if info_path.exists() else {}
    joint = result.masks is not None  # masks known: generated (joint) or given (mask-conditioned)
    given = "masks_from" in settings
    num, size = len(result.images), result.images.shape[-1]
    channels = 1 if result.images.ndim == 3 else result.images.shape[1]
    mode = "mask-conditioned" if given else "joint" if joint else "image"
    metadata = {"model": str(run_dir.resolve()), **settings, "mode": mode,
                "mask_source": "given" if given else "generated" if joint else "none",
                "trained_on": run_info.get("data"), "class_names": run_info.get("class_names") or {}}
    masks = result.masks if joint else np.zeros((num, size, size), np.uint8)
    with PreparedWriter(out, size=size, channels=channels, source_format="synthetic", synthetic=True,
                        modality=run_info.get("modality", "unknown"), metadata=metadata) as writer:
        for i in range(num):
            label = int(result.labels[i]) if result.labels is not None else (0 if joint and not masks[i].any() else -1)
            writer.append(result.images[i], masks[i], label=label, patient=f"synth-{i:05d}",
                          source=f"{out.name}#{i}")
        return writer.close(num_folds=5, seed=split_seed)


def write_pngs(result: SliceDiffusionOutput, folder: Path) -> Path:
    """synth-00000.png (+ _mask.png, 0/255, the BUSI layout `genseg segment` and `prepare` read) and grid.png."""
    from ..viz import overlay, save_grid, save_png

    folder.mkdir(parents=True, exist_ok=True)
    tiles = []
    for i, image in enumerate(result.images):
        save_png(image, folder / f"synth-{i:05d}.png")
        if result.masks is not None:
            save_png(result.masks[i] * np.uint8(255), folder / f"synth-{i:05d}_mask.png")
            tiles.append(overlay(image, result.masks[i]))
        else:
            tiles.append(image)
    titles = [f"class {c}" for c in result.labels] if result.labels is not None else None
    return save_grid(tiles, folder / "grid.png", ncols=int(np.ceil(np.sqrt(len(tiles)))), titles=titles)


def reverse_process_figure(result: SliceDiffusionOutput, path: Path, rows: int = 4) -> Path:
    """Denoising strips: one row per sample (at most `rows`), x_t from noise to the last step, then the result."""
    from ..viz import overlay, save_grid

    if not result.intermediates:
        raise ValueError("no intermediates: sample with save_intermediates=True")
    n = min(rows, len(result.images))
    tiles, titles = [], []
    for i in range(n):
        for t, x in result.intermediates:
            tiles.append(x[i, 0])
            titles.append(f"t={t}")
        final = result.images[i] if result.images.ndim == 3 else result.images[i, 0]
        tiles.append(overlay(final, result.masks[i]) if result.masks is not None else final)
        titles.append("sample")
    return save_grid([_enlarge(t) for t in tiles], path, ncols=len(result.intermediates) + 1, titles=titles)


FORWARD_FRACTIONS = (0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)


def forward_process_figure(data: str | Path, index: int, out: str | Path, run_dir: str | Path | None = None,
                           beta_schedule: str = "squaredcos_cap_v2", num_train_timesteps: int = 1000,
                           seed: int = 0) -> Path:
    """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps for t from 0 to T (clean to noise) of slice `index` of a prepared
    file; the schedule is the run's when `run_dir` is given, else `beta_schedule` over `num_train_timesteps`."""
    from ..models.diffusion import DiffusionModelConfig
    from ..viz import save_grid

    dataset = PreparedDataset(data)
    if not 0 <= index < len(dataset):
        raise DataError(data, f"has {len(dataset)} slices; --index {index} is out of range 0..{len(dataset) - 1}")
    if run_dir is not None:
        scheduler = load_diffusion(run_dir).scheduler
    else:
        scheduler = build_scheduler(DiffusionModelConfig(beta_schedule=beta_schedule,
                                                         num_train_timesteps=num_train_timesteps))
    x0 = dataset[index]["image"][None] * 2 - 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    last = scheduler.config.num_train_timesteps - 1
    steps = sorted({round(f * last) for f in FORWARD_FRACTIONS})
    tiles = [x0[0, 0].numpy() * 0.5 + 0.5]
    for t in steps[1:]:
        xt = scheduler.add_noise(x0, noise, torch.tensor([t]))
        tiles.append(np.clip(xt[0, 0].numpy() * 0.5 + 0.5, 0, 1))
    return save_grid([_enlarge(t) for t in tiles], out, ncols=len(tiles),
                     titles=["x_0"] + [f"t={t}" for t in steps[1:]])


def _enlarge(tile: np.ndarray, min_side: int = 64) -> np.ndarray:
    """Repeat pixels (nearest) so small slices stay visible and wider than their captions in the figures."""
    factor = max(1, -(-min_side // tile.shape[0]))
    return tile.repeat(factor, axis=0).repeat(factor, axis=1)
