"""`genseg sample` and the process figures: synthetic slices from a diffusion run, written in the prepared
HDF5 format (same schema as `genseg prepare`, marked synthetic) so every consumer reads them like real data.

Each synthetic slice is its own "patient" (synth-00000, ...), so patient-wise folds are simply slice-wise. Labels:
the requested class when the model is class-conditional, else 0 for a slice whose generated mask is empty and
-1 (unknown) otherwise. In image mode no masks are generated: the file holds empty masks and its metadata says
`mask_source: none`, so they must be segmented before training on them. In mask-conditioned mode the masks are
given (`--masks-from DATA.h5`: drawn from a prepared file's training split, optionally transformed, each used for
`--per-mask` K images) and written exactly as the model received them: `mask_source: given`, with the source
file, its rows, the augmentations and K in the metadata. In inpaint mode (`--inpaint-into DATA.h5`) the slices are
real training slices with a region repainted: a real lesion placed elsewhere inside the head (`inpaint_inputs`),
or with `--erase` the slice's lesion painted over with tissue (empty mask, label 0); every pixel outside the
region is the real slice's, and the metadata records the hosts, lesion sources, regions' margin and skips.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..data.augment import MASK_AUGMENTS, MaskAugment
from ..data.prepared import PreparedDataset, PreparedWriter, open_prepared, read_metadata
from ..data.regions import (BRAIN_INSET, HEAD_THRESHOLD, PLACEMENT_SCALE, PLACEMENT_TRIES, PLACEMENT_TURN,
                            bounding_box, brain_mask, dilate, head_mask, place_lesion)
from ..errors import ConfigError, DataError
from ..models.diffusion import build_scheduler
from ..pipeline.diffusion import (SamplingSettings, SliceDiffusionOutput, SliceDiffusionPipeline, inpaint_settings,
                                  load_diffusion, model_layout)


def draw_masks(path: str | Path, size: int, num: int | None = None, seed: int = 0,
               augment: tuple[str, ...] | list[str] = ()) -> tuple[np.ndarray, dict]:
    """Masks for a mask-conditioned model from the prepared file `path`: `num` drawn from its training split with
    `seed` (a seeded permutation, repeated when `num` exceeds the split; None: every training mask, in file
    order), transformed by MaskAugment(`augment`, `seed`), each kept on the head of its own slice. Returns uint8
    (num, size, size) {0, 1} and what goes into the synthetic file's metadata. Checked before anything is sampled
    (DataError naming the file): the file holds masks (not an image-mode synthetic file), of the model's `size`,
    with values 0 and 1 only. Empty masks are valid: they ask for tumour-free slices."""
    path = Path(path)
    _, train = _training_rows(path, size)
    rows = _draw_rows(train, num, seed)
    masks = _read_masks(path, rows)
    try:
        augmenter = MaskAugment(tuple(augment), seed)
    except ValueError as exc:
        raise ConfigError(f"--mask-augment: {exc}") from None
    heads = _heads(path, rows) if augmenter.parts else [None] * len(rows)
    masks = np.stack([augmenter(m, i, head) for i, (m, head) in enumerate(zip(masks, heads))]).astype(np.uint8)
    info = {"masks_from": str(path.resolve()), "mask_rows": rows.astype(int).tolist(),
            "mask_augment": list(augmenter.parts), "masks_kept_unchanged": augmenter.unchanged,
            "masks_kept_on": f"the head of their own slice (intensity > {HEAD_THRESHOLD})" if augmenter.parts else None,
            "empty_masks": int((~masks.reshape(len(masks), -1).any(1)).sum())}
    return masks, info


def _heads(path: Path, rows: np.ndarray, chunk: int = 256) -> list[np.ndarray]:
    """data.regions.head_mask of each slice at `rows`, read a chunk at a time (a whole split need not fit)."""
    return [head_mask(image) for start in range(0, len(rows), chunk)
            for image in _read_rows(path, "images", rows[start:start + chunk])]


def _training_rows(path: Path, size: int) -> tuple[dict, np.ndarray]:
    """(metadata, training-split rows) of the prepared file `path` that masks or slices are drawn from, checked
    (DataError naming the file): it holds masks (not an image-mode sample) of the model's `size`, and training
    slices."""
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
    return meta, train


def _draw_rows(rows: np.ndarray, num: int | None, seed: int) -> np.ndarray:
    """`num` of `rows` by a seeded permutation (repeated when `num` exceeds them); None: all, in file order."""
    if num is None:
        return rows
    if num < 1:
        raise ConfigError(f"--num must be at least 1, got {num}")
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.permutation(rows) for _ in range(-(-num // len(rows)))])[:num]


def _read_rows(path: Path, key: str, rows: np.ndarray) -> np.ndarray:
    """Dataset `key` of a prepared file at `rows` (in their order; a row may come twice)."""
    with open_prepared(path) as h5:
        order = np.argsort(rows, kind="stable")  # h5py reads increasing rows
        unique, inverse = np.unique(rows[order], return_inverse=True)
        read = h5[key][unique.tolist()]
    values = np.empty((len(rows), *read.shape[1:]), read.dtype)
    values[order] = read[inverse]
    return values


def _read_masks(path: Path, rows: np.ndarray) -> np.ndarray:
    """The masks of `rows`, refused (DataError naming the first bad row) unless they hold 0 and 1 only."""
    masks = _read_rows(path, "masks", rows)
    bad = [v for v in np.unique(masks).tolist() if v not in (0, 1)]
    if bad:
        row = int(rows[np.flatnonzero((~np.isin(masks, (0, 1))).reshape(len(rows), -1).any(1))[0]])
        raise DataError(path, f"mask of row {row} holds value {bad[0]}{' (and others)' if len(bad) > 1 else ''}; "
                              f"masks must hold 0 and 1 only (a label map or an 8-bit 0/255 mask?)")
    return masks


def inpaint_inputs(path: str | Path, unet, num: int | None = None, seed: int = 0, erase: bool = False
                   ) -> tuple[dict[str, np.ndarray], dict]:
    """What an inpaint model (`unet`) repaints in the real prepared file `path`: {"images", "masks", "regions"}
    for the pipeline, and what goes into the synthetic file's metadata. Hosts are `num` training slices drawn with
    `seed` (None: each once, in file order). Placing (default): each host gets a lesion from a random training
    mask, turned, zoomed and moved into its brain (data.regions.place_lesion: the region, lesion grown by the
    model's margin, inside `brain_mask`, inside the model's crop and clear of the host's own tumour);
    its mask becomes the host's plus the lesion. `erase`: hosts are slices with a lesion, the region is their
    lesion grown by the margin, the mask empty. A host whose placement fails within PLACEMENT_TRIES draws, or
    whose lesion is too large to erase within the crop, is skipped and counted (seeded per host, so a slice's
    result does not depend on the others). Checked first (DataError naming the file): a real file of the
    model's slice size and channels, masks of 0 and 1, lesions to place or erase."""
    path, settings = Path(path), inpaint_settings(unet)
    size, margin, crop = settings["slice_size"], settings["region_margin"], int(unet.config.sample_size)
    meta, train = _training_rows(path, size)
    if meta["attrs"].get("synthetic"):
        raise DataError(path, "is a synthetic file; --inpaint-into repaints real prepared slices")
    channels = int(unet.config.out_channels)
    if int(meta["attrs"]["channels"]) != channels:
        raise DataError(path, f"has {meta['attrs']['channels']}-channel images but the model paints {channels}")
    masks = _read_masks(path, train)
    lesioned = train[masks.reshape(len(train), -1).any(1)]
    if not len(lesioned):
        raise DataError(path, f"has no lesions in its training split to {'erase' if erase else 'place'} (every "
                              f"training mask is empty)")
    hosts = _draw_rows(lesioned if erase else train, num, seed)
    sources = hosts if erase else np.random.default_rng([seed, 1]).choice(lesioned, len(hosts))
    images, host_masks = _read_rows(path, "images", hosts).astype(np.float32), _read_rows(path, "masks", hosts)
    lesions = host_masks if erase else _read_rows(path, "masks", sources)
    kept, out_masks, regions = [], [], []
    for i, (image, host_mask, lesion) in enumerate(zip(images, host_masks, lesions)):
        if erase:
            region = dilate(torch.from_numpy(host_mask), margin)
            top, bottom, left, right = bounding_box(region)
            if bottom - top >= crop or right - left >= crop:
                continue
            mask = np.zeros_like(host_mask)
        else:
            placed = place_lesion(torch.from_numpy(lesion), torch.from_numpy(brain_mask(image)),
                                  torch.from_numpy(host_mask), margin, crop,
                                  torch.Generator().manual_seed(seed * 100_003 + i))
            if placed is None:
                continue
            mask, region = host_mask | placed[0].numpy(), placed[1]
        kept.append(i)
        out_masks.append(mask)
        regions.append(region.numpy().astype(np.uint8))
    why = (f"its lesion grown by {margin} px spans more than the model's {crop} px crop" if erase else
           f"no placement inside the brain, clear of its own tumour and within the {crop} px crop in "
           f"{PLACEMENT_TRIES} tries")
    if not kept:
        raise DataError(path, f"none of the {len(hosts)} drawn slices could be repainted: {why}")
    info = {"inpaint_into": str(path.resolve()), "inpaint": "erase" if erase else "place",
            "host_rows": hosts[kept].astype(int).tolist(), "skipped": len(hosts) - len(kept), "skip_reason": why,
            "region_margin": margin, "crop_size": crop}
    if not erase:
        info.update(lesion_rows=sources[kept].astype(int).tolist(), head_threshold=HEAD_THRESHOLD,
                    brain_inset=BRAIN_INSET, placement_tries=PLACEMENT_TRIES, placement_scale=list(PLACEMENT_SCALE),
                    placement_turn_degrees=PLACEMENT_TURN)
    given = {"images": images[kept], "masks": np.stack(out_masks).astype(np.uint8), "regions": np.stack(regions)}
    return given, info


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
                   inpaint_into: str | Path | None = None, erase: bool = False,
                   png_dir: str | Path | None = None, save_intermediates: bool = False, device: str | None = None,
                   progress: bool = True) -> Path | None:
    """Sample `num` slices with `sampling` into the prepared file `out` (plus PNGs / a reverse process strip
    `OUT_reverse.png` when asked). Images depend on (seed, index) only, not on the batch size (up to float
    rounding). Under `accelerate launch` / `torchrun` the batches are split over the processes and the main
    process writes the one file, equal to a single process's (genseg.distributed), and the others return None
    without writing anything.

    A mask-conditioned model needs `masks_from` (and only it takes one): `num` masks (None: every training mask)
    are drawn from that prepared file's training split and transformed (`draw_masks`), and each gets `per_mask`
    images, mask i giving images i*K..i*K+K-1. An inpaint model needs `inpaint_into` (and only it takes one):
    `num` of that real file's training slices (None: each once) get a lesion placed, or with `erase` lose theirs
    (`inpaint_inputs`; slices that cannot be repainted are skipped and counted in the metadata). Everything is
    checked before the first denoising step."""
    if num is None and masks_from is None and inpaint_into is None:
        raise ConfigError("--num is required (it may be left out only with --masks-from: every training mask, or "
                          "--inpaint-into: every training slice)")
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
    given, info = given_inputs(pipe, run_dir, num, sampling.seed, masks_from=masks_from, mask_augment=mask_augment,
                               per_mask=per_mask, inpaint_into=inpaint_into, erase=erase)
    total = len(given["masks"]) if given else num
    settings = {**sampling.metadata(), **info}
    pipe.set_progress_bar_config(disable=not progress or not state.is_main_process)
    if state.num_processes > 1:
        result = sample_shared(state, pipe, total, out, sampling, save_intermediates=save_intermediates, given=given)
        if result is None:  # not the main process: its share is in the file the main process writes
            return None
    else:
        result = sampling.sample(pipe, total, save_intermediates=save_intermediates, **given)
    write_samples(result, out, run_dir, settings, split_seed=sampling.seed)
    if png_dir is not None:
        write_pngs(result, Path(png_dir))
    if save_intermediates:
        reverse_process_figure(result, out.with_name(out.stem + "_reverse.png"))
    return out


def check_given_options(pipe: SliceDiffusionPipeline, source, *, masks_from=None, mask_augment=(), per_mask: int = 1,
                        inpaint_into=None, erase: bool = False) -> str:
    """The model's mode, once the options for what it is given agree with it: masks for a mask-conditioned model,
    real slices for an inpaint model, nothing for joint / image models (ConfigError naming `source`, the run or
    pipeline folder), checked before anything is drawn, sampled or written."""
    _, mode = model_layout(pipe.unet)
    if mode != "mask-conditioned" and (masks_from is not None or mask_augment or per_mask != 1):
        raise ConfigError(f"--masks-from, --mask-augment and --per-mask need a mask-conditioned model; {source} "
                          f"holds a{'n' if mode == 'inpaint' else ''} {mode} model")
    if mode != "inpaint" and (inpaint_into is not None or erase):
        raise ConfigError(f"--inpaint-into and --erase need an inpaint model; {source} holds a {mode} model")
    if mode == "inpaint" and inpaint_into is None:
        raise ConfigError(f"{source} holds an inpaint model: it repaints regions of real slices and does not "
                          f"sample freely; pass --inpaint-into DATA.h5 (a real prepared file of the model's slice "
                          f"size), with --erase to erase lesions instead of placing them")
    if mode == "mask-conditioned" and masks_from is None:
        raise ConfigError(f"{source} holds a mask-conditioned model: it generates images for given masks; pass "
                          f"--masks-from DATA.h5 (a prepared file of the model's size)")
    return mode


def given_inputs(pipe: SliceDiffusionPipeline, source, num: int | None, seed: int, *, masks_from=None,
                 mask_augment=(), per_mask: int = 1, inpaint_into=None, erase: bool = False
                 ) -> tuple[dict[str, np.ndarray], dict]:
    """The pipeline's inputs besides the noise (masks for a mask-conditioned model, `per_mask` images each; slices,
    masks and regions for an inpaint model; none for joint / image models) and their metadata, once
    `check_given_options` agrees."""
    mode = check_given_options(pipe, source, masks_from=masks_from, mask_augment=mask_augment, per_mask=per_mask,
                               inpaint_into=inpaint_into, erase=erase)
    if mode == "inpaint":
        return inpaint_inputs(inpaint_into, pipe.unet, num, seed, erase)
    if mode != "mask-conditioned":
        return {}, {}
    masks, info = draw_masks(masks_from, int(pipe.unet.config.sample_size), num, seed, mask_augment)
    return {"masks": np.repeat(masks, per_mask, axis=0)}, {"per_mask": per_mask, **info}


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
    Settings with `masks_from` (`inpaint_into`) mark the masks as given to a mask-conditioned (inpaint) model
    (`mask_source: given`)."""
    run_dir, out = Path(run_dir), Path(out)
    info_path = run_dir / "run.json"
    run_info = json.loads(info_path.read_text()) if info_path.exists() else {}
    joint = result.masks is not None  # masks known: generated (joint) or given (mask-conditioned, inpaint)
    given = "masks_from" in settings or "inpaint_into" in settings
    num, size = len(result.images), result.images.shape[-1]
    channels = 1 if result.images.ndim == 3 else result.images.shape[1]
    mode = "inpaint" if "inpaint_into" in settings else "mask-conditioned" if given else "joint" if joint else "image"
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
