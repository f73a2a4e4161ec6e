"""When does mixing synthetic slices into segmenter training help? Real fraction x synthetic ratio x seeds.

1. The demo data (`genseg demo-data`, prepared at the generator's size) and one synthetic set sampled from the
   shipped generator (as many slices as the real training split, DPM-Solver++).
2. For every real fraction F (share of real training *patients* kept, seeded per run), synthetic ratio R (share of
   each epoch drawn from the synthetic set; `train-seg --synthetic-ratio`) and seed: a configs/seg-demo.yaml
   segmenter, tested on the real test split. Plus one synthetic-only run per seed (R = 1: no real training slice).
   With `equal_steps` a run with fewer real slices per epoch runs proportionally more epochs (and patience), so
   every run gets about the same optimizer steps and small fractions are not simply undertrained; a time budget
   (seg-demo.yaml's) gives every run the same wall time instead, and `seg_overrides` {time_budget: null,
   max_steps: N} exactly N steps (configs/study-matched.yaml: in equal wall time real-only runs made fewer steps
   than mixed ones, which favours mixing).
3. The "one change" (config `change`), run for every R > 0 cell and synthetic-only next to the baseline:
   `agreement` keeps synthetic slices whose generated mask agrees with a real-only segmenter (Dice >=
   min_agreement): the real-only run (R = 0) of the same fraction and seed, so the filter uses no labels the arm
   does not have (synthetic-only uses fraction 1); `more` samples more_factor x as many synthetic slices.
4. With `matched_generator` (--matched-generator), a fairness control for the low-data cells: the shipped generator
   learned from *all* real training patients, so at F < 1 its slices carry patients the real-only arm never sees.
   These arms train one generator per (mode, F < 1, seed) on exactly the patients that segmenter keeps
   (`train-diffusion --real-fraction F --seed S`) and mix that generator's slices instead, one arm per mode of
   `matched_modes` (--matched-modes): joint (image and mask generated), mask-conditioned (images for masks drawn
   from the kept patients' training slices, moved by `mask_augment`) and inpaint (lesions of the kept patients
   painted into their own slices). `matched_generator_steps` sets each mode's steps; `matched_fractions` /
   `--matched-seeds` limit the arms. With `augmented_real` (--augmented-real) a classical-augmentation control
   runs the same cells: the kept real slices moved by the same flips, shifts, turns and zooms, image and mask
   together, as many as a synthetic set (is a generator better than augmentation at equal slice count?). Each
   matched or augmented set's KID, NN ratio and mask faithfulness are measured by the real-only run of its seed,
   or by `quality_judge` (--quality-judge: one segmenter for every set, e.g. the shipped pipeline's), beside
   the same measures of the kept real slices unchanged: a generator of 2 patients cannot be more real than them.
5. Mean ± sd test Dice and IoU: markdown tables (printed and OUT/study.md), OUT/study.json and OUT/study.png.

Finished runs (metrics.json) and the data and synthetic files are reused when the command is repeated; delete
OUT to start afresh (e.g. after the generator changed).

    python scripts/study_synthetic_ratio.py --out study-synthetic-ratio   # 39 baseline + 27 change runs
    python scripts/study_synthetic_ratio.py --change none                 # baseline only (39 runs)
    python scripts/study_synthetic_ratio.py --out study --matched-generator --matched-seeds 1   # + fairness arm
    # the matched study of docs/study-synthetic-ratio.md: 10 % and 25 % real, three modes, the augmentation control
    python scripts/study_synthetic_ratio.py --config configs/study-matched.yaml --out matched   # ~4 hours
    python scripts/study_synthetic_ratio.py --config configs/study-matched.yaml --out matched \
        --matched-modes joint --real-fractions 0.1 --no-augmented-real                         # one part of it
    python scripts/study_synthetic_ratio.py --config configs/study-matched.yaml --out matched \
        --matched-modes mask-conditioned --real-fractions 0.1 --synthetic-ratios 0,0.5         # a smaller part
    python scripts/study_synthetic_ratio.py --out /tmp/smoke --smoke --pipeline DIR   # seconds; what CI runs

Cost, measured on 2 CPU cores (docs/study-synthetic-ratio.md): one seed of the baseline 926 s idle, so the baseline
~46 min; baseline + agreement ~89 min on a partly shared machine; one matched joint generator (1500 steps) ~40 min
there and 12 min on an idle machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from genseg.config import config_from_dict, load_config
from genseg.data.augment import MASK_MAX_ROTATION, MASK_MAX_SHIFT, MASK_SCALE_RANGE
from genseg.data.prepared import PreparedDataset, PreparedWriter, read_metadata
from genseg.evaluation.synthetic_quality import evaluate_synthetic
from genseg.io import atomic_path
from genseg.pipeline.diffusion import SamplingSettings
from genseg.runs import CsvLog, SegTrainConfig
from genseg.training.diffusion import DiffusionTrainConfig
from genseg.training.mixing import select_synthetic, subsample_patients
from genseg.viz import overlay, plot_curves, save_grid
from genseg.workflows.demo import (DEVICE, GRID_SLICES, ensure_demo_data, ensure_diffusion, ensure_prepared,
                                   ensure_segmenter, generator_source, load_generator, sample_synthetic,
                                   training_length)
from genseg.workflows.sampling import sample_to_file

REPO = Path(__file__).resolve().parents[1]  # scripts are run from a checkout
CONFIG = REPO / "configs" / "study-synthetic-ratio.yaml"
CHANGES = ("none", "agreement", "more")
MODE_CONFIGS = {"joint": "configs/diffusion-cpu-small.yaml",
                "mask-conditioned": "configs/diffusion-maskcond-cpu-small.yaml",
                "inpaint": "configs/diffusion-inpaint-cpu-small.yaml"}
MODE_STEPS = {"joint": 1500, "mask-conditioned": 1000, "inpaint": 2000}  # study-synthetic-ratio.yaml says why


@dataclass
class StudyConfig:
    """configs/study-synthetic-ratio.yaml (comments there)."""

    real_fractions: tuple[float, ...] = (0.1, 0.25, 1.0)
    synthetic_ratios: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)
    seeds: tuple[int, ...] = (0, 1, 2)
    synthetic_only: bool = True
    seg_config: str = "configs/seg-demo.yaml"
    seg_overrides: dict = field(default_factory=dict)
    equal_steps: bool = True
    pipeline: str | None = None
    num_synthetic: int | None = None
    sample_steps: int = 20
    sample_seed: int = 1000
    patients: int = 30
    slices_per_patient: int = 8
    raw_size: int = 256
    change: str = "agreement"
    min_agreement: float = 0.7
    more_factor: int = 4
    shipped_arm: bool = True  # the baseline's ratio > 0 cells with the shipped generator's slices
    matched_generator: bool = False
    matched_modes: tuple[str, ...] = ("joint",)
    matched_fractions: tuple[float, ...] | None = None  # None: every real fraction below 1
    matched_seeds: tuple[int, ...] | None = None  # None: every seed
    matched_generator_configs: dict = field(default_factory=lambda: dict(MODE_CONFIGS))
    matched_generator_steps: dict = field(default_factory=lambda: dict(MODE_STEPS))
    matched_generator_overrides: dict = field(default_factory=dict)  # keys of those configs ("model" merges)
    mask_augment: tuple[str, ...] = ("flip", "shift", "rotate", "scale")  # mask-conditioned: masks of kept patients
    augmented_real: bool = False  # classical-augmentation arm: kept real slices augmented, as many as synthetic
    measure_quality: bool = True  # KID, NN ratio and mask faithfulness of every matched / augmented set
    quality_judge: str | None = None  # segmenter run or pipeline measuring them; None: the seed's real-only run

    def __post_init__(self):
        if self.change not in CHANGES:
            raise ValueError(f"change must be one of {CHANGES}, got {self.change!r}")
        if self.change == "agreement" and self.synthetic_only and 1.0 not in self.real_fractions:
            raise ValueError("change agreement with synthetic_only filters with the real-only run at fraction 1: "
                             "add 1.0 to real_fractions")
        unknown = sorted(set(self.matched_modes) - set(MODE_CONFIGS))
        if unknown:
            raise ValueError(f"matched_modes: unknown {', '.join(unknown)}; choose from {', '.join(MODE_CONFIGS)}")
        if not self.shipped_arm and (self.change != "none" or self.synthetic_only):
            raise ValueError("shipped_arm false leaves only real-only baseline runs: the change and synthetic_only "
                             "use the shipped generator's slices; set change none and synthetic_only false")

    def sampling(self, seed_offset: int = 0) -> SamplingSettings:
        """The sampler of every synthetic set; `seed_offset` gives a set of other slices."""
        return SamplingSettings(steps=self.sample_steps, seed=self.sample_seed + seed_offset)


SMOKE = {"real_fractions": [0.5, 1.0], "synthetic_ratios": [0.0, 0.5], "seeds": [0], "patients": 10,
         "slices_per_patient": 2, "raw_size": 64, "sample_steps": 2, "min_agreement": 0.0, "more_factor": 2,
         "seg_overrides": {"base_channels": 4, "depth": 2, "epochs": 1, "batch_size": 4, "plot_samples": 1},
         "matched_generator_steps": {"joint": 2, "mask-conditioned": 2, "inpaint": 2},
         "matched_generator_overrides": {"model": {"block_out_channels": [8, 16], "norm_num_groups": 4},
                                         "checkpoint_every_steps": 2, "sample_every_steps": 0}}


@dataclass
class Arm:
    """One row family of the tables: the baseline, the change or the matched generators, with the synthetic file
    each (fraction, seed) trains on and the cells it runs."""

    name: str
    folder: str  # OUT/runs/<folder>
    synthetic: Callable[[float, int], Path]
    min_agreement: float | None = None
    runs_cell: Callable[[float, float, int], bool] = lambda fraction, ratio, seed: ratio > 0


def make_data(out: Path, cfg: StudyConfig) -> tuple[Path, Path | None, int]:
    """Prepared real data, the shipped generator's synthetic set (reused when present; None when no arm uses it)
    and the generator's size."""
    generator = load_generator(generator_source(cfg.pipeline))
    size = int(generator.unet.config.sample_size)
    raw = ensure_demo_data(out / "raw", cfg.patients, cfg.slices_per_patient, cfg.raw_size, seed=0)
    data = ensure_prepared(raw, out / "demo.h5", size)
    if not cfg.shipped_arm:
        return data, None, size
    num = cfg.num_synthetic or int((read_metadata(data)["split"] == "train").sum())
    if not (out / "synthetic.h5").exists():
        sample_synthetic(generator, out / "synthetic.h5", num, cfg.sampling(),
                         source=cfg.pipeline or "shipped demo pipeline", grid=out / "synthetic_grid.png")
    if cfg.change == "more" and not (out / "synthetic-more.h5").exists():
        sample_synthetic(generator, out / "synthetic-more.h5", num * cfg.more_factor, cfg.sampling(seed_offset=1),
                         source=cfg.pipeline or "shipped demo pipeline")
    return data, out / "synthetic.h5", size


def filtered_copy(out: Path, synthetic: Path, data: Path, seg_run: Path) -> Path:
    """The synthetic set with `quality_agreement` measured by `seg_run` (a copy per real-only run)."""
    path = out / "synthetic-agreement" / f"{seg_run.name}.h5"
    if path.exists():
        with h5py.File(path, "r") as h5:
            if "quality_agreement" in h5:
                return path
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(synthetic, path)
    evaluate_synthetic(path, data, seg_run, out_dir=path.parent, progress=False)
    return path


def kept_rows(data: Path, fraction: float, seed: int) -> np.ndarray:
    """Rows of `data` that the segmenter of (fraction, seed) trains on: its kept patients' training slices."""
    train = PreparedDataset(data, split="train")
    return train.rows[subsample_patients(train.patients, fraction, seed)]


def kept_real_file(out: Path, data: Path, fraction: float, seed: int) -> Path:
    """A prepared file holding only the kept real training slices of (fraction, seed), split and folds as in
    `data`: what a matched mask-conditioned generator draws its masks from and an inpaint generator paints into,
    so no other patient's mask or slice reaches the synthetic set."""
    path = out / "kept" / f"f{fraction:g}-s{seed}.h5"
    if path.exists():
        return path
    meta, rows = read_metadata(data), kept_rows(data, fraction, seed)
    attrs = meta["attrs"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(data, "r") as h5, PreparedWriter(
            path, int(attrs["size"]), int(attrs["channels"]), source_format=attrs["source_format"],
            modality=attrs.get("modality", "unknown"),
            metadata={**(attrs["metadata"] or {}), "kept_from": str(data.resolve()), "real_fraction": fraction,
                      "seed": seed}) as writer:
        for row in rows.tolist():
            writer.append(h5["images"][row].astype(np.float32), h5["masks"][row], int(meta["labels"][row]),
                          meta["patients"][row], meta["sources"][row], int(h5["slice_index"][row]))
        writer.close(folds=meta["fold"][rows], num_folds=int(attrs["num_folds"]), test_fold=int(attrs["test_fold"]),
                     seed=int(attrs["split_seed"]))
    return path


def augmented_real(out: Path, cfg: StudyConfig, data: Path, num: int | None, fraction: float, seed: int,
                   moved: bool = True) -> Path:
    """The classical-augmentation control: `num` slices made from the kept real training slices of (fraction,
    seed) by the geometric moves that `mask_augment` gives the mask-conditioned arm's masks (flip, shift up to
    10 %, rotate up to 15 degrees, scale 0.8-1.2; elastic off), applied to image and mask together; written as a
    synthetic file so it mixes like one. Same count as the synthetic sets, so a ratio gives both arms the same
    share of non-original slices. With `moved` False: the kept slices unchanged, each once (`num` None), the
    quality reference of a matched set (what the generator's own real data scores)."""
    path = out / ("augmented-real" if moved else "kept-real") / f"f{fraction:g}-s{seed}.h5"
    if path.exists():
        return path
    rows = kept_rows(data, fraction, seed)
    num = len(rows) if num is None else num
    attrs = read_metadata(data)["attrs"]
    parts = set(cfg.mask_augment) if moved else set()
    moves = v2.Compose([v2.RandomHorizontalFlip(0.5 if "flip" in parts else 0.0), v2.RandomAffine(
        degrees=MASK_MAX_ROTATION if "rotate" in parts else 0.0,
        translate=(MASK_MAX_SHIFT, MASK_MAX_SHIFT) if "shift" in parts else None,
        scale=(1 - MASK_SCALE_RANGE, 1 + MASK_SCALE_RANGE) if "scale" in parts else None,
        interpolation=InterpolationMode.BILINEAR)]) if moved else v2.Identity()
    torch.manual_seed(cfg.sample_seed * 100_003 + seed)
    order = np.concatenate([np.random.default_rng([cfg.sample_seed, seed]).permutation(rows)
                            for _ in range(-(-num // len(rows)))])[:num]
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset = PreparedDataset(data)
    metadata = {"mode": "augmented-real" if moved else "kept-real", "mask_source": "real", "rows": order.tolist(),
                "augment": sorted(parts - {"elastic"}), "real_fraction": fraction, "seed": seed}
    with PreparedWriter(path, int(attrs["size"]), int(attrs["channels"]), source_format="synthetic", synthetic=True,
                        modality=attrs.get("modality", "unknown"), metadata=metadata) as writer:
        for i, row in enumerate(order.tolist()):
            item = dataset[row]
            image, mask = moves(tv_tensors.Image(item["image"]), tv_tensors.Mask(item["mask"]))
            mask = (mask.as_subclass(torch.Tensor)[0] > 0).numpy()
            writer.append(image.as_subclass(torch.Tensor).clamp(0, 1).numpy(), mask,
                          label=item["label"] if mask.any() else 0, patient=f"aug-{i:05d}", source=f"row {row}")
        writer.close(seed=cfg.sample_seed)
    return path


def matched_synthetic(out: Path, cfg: StudyConfig, data: Path, size: int, num: int, fraction: float,
                      seed: int, mode: str) -> Path:
    """`num` synthetic slices from a generator of `mode` trained (or reused) on exactly the real patients that the
    segmenter of (fraction, seed) keeps, sampled with the study's sampler. A mask-conditioned generator gets
    masks drawn from those patients' training slices (moved by `mask_augment`), an inpaint generator paints their
    lesions into their slices: nothing of another patient enters the set."""
    path = out / "synthetic-matched" / mode / f"f{fraction:g}-s{seed}.h5"
    if path.exists():
        return path
    config = Path(cfg.matched_generator_configs[mode])
    config = config if config.is_absolute() else REPO / config
    overrides = dict(cfg.matched_generator_overrides)
    base_model = load_config(DiffusionTrainConfig, config).model
    model = {**dataclasses.asdict(base_model), **overrides.pop("model", {}), "sample_size": size}
    gen_cfg = load_config(DiffusionTrainConfig, config, {**overrides, "model": model, "split": "train",
                                                         "real_fraction": fraction, "seed": seed,
                                                         "max_steps": cfg.matched_generator_steps[mode]})
    run = ensure_diffusion(gen_cfg, data, out / "generators" / mode / f"f{fraction:g}-s{seed}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "joint":
        return sample_synthetic(load_generator(run), path, num, cfg.sampling(), source=run,
                                grid=path.with_suffix(".png"))
    kept = kept_real_file(out, data, fraction, seed)
    given = {"masks_from": kept, "mask_augment": cfg.mask_augment} if mode == "mask-conditioned" else \
        {"inpaint_into": kept}
    sample_to_file(run, num, path, cfg.sampling(), device=DEVICE, progress=False, **given)
    save_file_grid(path, path.with_suffix(".png"))
    return path


def save_file_grid(path: Path, grid: Path) -> Path:
    """The first GRID_SLICES slices of a prepared file with their masks outlined."""
    with h5py.File(path, "r") as h5:
        shown = min(GRID_SLICES, len(h5["images"]))
        tiles = [overlay(h5["images"][i].astype(np.float32)[0], h5["masks"][i]) for i in range(shown)]
    return save_grid(tiles, grid, ncols=int(math.ceil(math.sqrt(len(tiles)))))


def set_quality(path: Path, data: Path, judge: Path) -> dict:
    """KID and NN ratio against the real data, and (the masks being given or real) the mask faithfulness, of a
    matched or augmented set, measured once per judge (a segmenter run or pipeline folder; its encoder gives the
    KID features and its predictions the faithfulness)."""
    saved = path.with_name(f"{path.stem}.quality-{judge.name}.json")
    result = json.loads(saved.read_text()) if saved.exists() else {}
    if "lesion_kid_reading" not in result:  # not measured yet, or by a genseg without the lesion-window KID
        text = json.dumps(evaluate_synthetic(path, data, judge, out_dir=path.parent, progress=False, write=False),
                          default=str)
        with atomic_path(saved) as tmp:
            tmp.write_text(text)
        result = json.loads(text)
    return {key: result.get(key) for key in ("kid_mean", "kid_real_reference", "nn_ratio_median", "near_copy_percent",
                                             "lesion_nn_ratio_median", "lesion_near_copy_percent",
                                             "lesion_kid_mean", "lesion_kid_real_reference",
                                             "agreement_dice_mean", "agreement_real_reference")}


def run_cell(cfg: StudyConfig, base: SegTrainConfig, data: Path, arm: Arm, synthetic: Path | None, fraction: float,
             ratio: float, seed: int, run: Path, full_real: int) -> dict:
    """Train (or reuse) one segmenter and return its test scores and what it trained on."""
    attrs = read_metadata(data)["attrs"]
    train = PreparedDataset(data, split="train")
    kept = int(subsample_patients(train.patients, fraction, seed).sum())
    available = len(select_synthetic(synthetic, attrs, arm.min_agreement)[0]) if synthetic is not None else 0
    row = {"arm": arm.name, "fraction": fraction, "ratio": ratio, "seed": seed, "real_slices": kept,
           "synthetic_kept": available}
    if ratio > 0 and available == 0:
        return {**row, "skipped": f"no synthetic slice passes min_agreement {arm.min_agreement}"}
    epoch_length = kept if ratio < 1 else available
    factor = full_real / epoch_length if cfg.equal_steps else 1.0
    seg = dataclasses.replace(base, seed=seed, real_fraction=fraction, synthetic_ratio=ratio,
                              min_agreement=arm.min_agreement if ratio > 0 else None,
                              epochs=max(1, round(base.epochs * factor)) if base.epochs else None,
                              patience=None if base.patience is None else math.ceil(base.patience * factor))
    metrics = ensure_segmenter(seg, data, run, synthetic=synthetic if ratio > 0 else None)
    log = json.loads((run / "run.json").read_text())
    return {**row, "epochs": seg.epochs, "dice": metrics["test"]["dice"], "iou": metrics["test"]["iou"],
            "epoch": log["epoch"], "steps": int(CsvLog(run / "log.csv").rows()[-1]["step"])}


def run_study(out: str | Path, cfg: StudyConfig) -> dict:
    out = Path(out)
    started = time.perf_counter()
    data, synthetic, size = make_data(out, cfg)
    seg_path = Path(cfg.seg_config) if Path(cfg.seg_config).is_absolute() else REPO / cfg.seg_config
    # seg_overrides replace the segmenter config's keys, None included (time_budget: null turns its budget off)
    base = config_from_dict(SegTrainConfig, {**dataclasses.asdict(load_config(SegTrainConfig, seg_path)),
                                             **cfg.seg_overrides, "size": size}, "seg_overrides")
    full_real = int((read_metadata(data)["split"] == "train").sum())
    cells = [(f, r) for f in cfg.real_fractions for r in cfg.synthetic_ratios]
    if cfg.synthetic_only:
        cells.append((1.0, 1.0))
    arms = [Arm("baseline", "baseline", lambda fraction, seed: synthetic,
                runs_cell=lambda fraction, ratio, seed: cfg.shipped_arm or ratio == 0)]
    if cfg.change == "agreement":  # filtered by the real-only run of the same fraction (1 for synthetic-only)
        arms.append(Arm(f"agreement >= {cfg.min_agreement:g}", cfg.change, lambda fraction, seed: filtered_copy(
            out, synthetic, data, out / "runs" / "baseline" / f"f{fraction:g}-r0-s{seed}"), cfg.min_agreement))
    elif cfg.change == "more":
        arms.append(Arm(f"{cfg.more_factor}x synthetic", cfg.change, lambda fraction, seed: out / "synthetic-more.h5"))
    fractions = cfg.matched_fractions or [f for f in cfg.real_fractions if f < 1]
    seeds = cfg.seeds if cfg.matched_seeds is None else cfg.matched_seeds
    num = cfg.num_synthetic or full_real

    def matched_cell(fraction, ratio, seed):
        return 0 < ratio < 1 and fraction in fractions and seed in seeds

    def judge_of(fraction, seed) -> Path:
        return Path(cfg.quality_judge) if cfg.quality_judge else out / "runs" / "baseline" / f"f{fraction:g}-r0-s{seed}"

    def measured(make):  # the set of (fraction, seed), its quality measured by that real-only run first
        def synthetic_of(fraction, seed):
            path = make(fraction, seed)
            if cfg.measure_quality:
                judge = judge_of(fraction, seed)
                qualities[str(path)] = {"judge": str(judge), **set_quality(path, data, judge)}
            return path
        return synthetic_of

    qualities: dict[str, dict] = {}
    if cfg.matched_generator:
        for mode in cfg.matched_modes:
            arms.append(Arm(f"matched {mode}", f"matched-{mode}", measured(
                lambda fraction, seed, mode=mode: matched_synthetic(out, cfg, data, size, num, fraction, seed, mode)),
                runs_cell=matched_cell))
    if cfg.augmented_real:
        arms.append(Arm("augmented real", "augmented-real", measured(
            lambda fraction, seed: augmented_real(out, cfg, data, num, fraction, seed)), runs_cell=matched_cell))
    per_arm = [sum(arm.runs_cell(f, r, s) for f, r in cells for s in cfg.seeds) for arm in arms]
    finished = sum(1 for _ in (out / "runs").glob("*/*/metrics.json"))
    print(f"{sum(per_arm)} runs ({' + '.join(f'{n} {a.name}' for n, a in zip(per_arm, arms))}), {finished} finished "
          f"before; each trains for {training_length(base)} (epochs of the full real set)")
    rows = []
    for arm in arms:
        for fraction, ratio in cells:
            for seed in cfg.seeds:
                if not arm.runs_cell(fraction, ratio, seed):
                    continue  # the change and the matched generators only touch synthetic slices
                run = out / "runs" / arm.folder / f"f{fraction:g}-r{ratio:g}-s{seed}"
                source = arm.synthetic(fraction, seed) if ratio > 0 else None
                rows.append(run_cell(cfg, base, data, arm, source, fraction, ratio, seed, run, full_real))
                if str(source) in qualities:
                    rows[-1]["quality"] = qualities[str(source)]
                print(f"{arm.name} F={fraction:g} R={ratio:g} seed {seed}: "
                      + (rows[-1].get("skipped") or f"test Dice {rows[-1]['dice']:.4f}"))
    references = []  # the kept real slices unchanged, measured like the sets: what the generators' own data scores
    for fraction, seed in sorted({(r["fraction"], r["seed"]) for r in rows if r.get("quality")}):
        path, judge = augmented_real(out, cfg, data, None, fraction, seed, moved=False), judge_of(fraction, seed)
        references.append({"arm": "kept real slices, unchanged", "fraction": fraction, "seed": seed,
                           "quality": {"judge": str(judge), **set_quality(path, data, judge)}})
    summary = {"config": dataclasses.asdict(cfg), "real_train_slices": full_real, "runs": rows,
               "quality_references": references,
               "arms": [a.name for a in arms], "segmenter_stop": training_length(base) + (
                   " (epochs at fraction 1, scaled to each run's epoch length)" if cfg.equal_steps and base.epochs else ""),
               "seconds": round(time.perf_counter() - started, 1)}
    summary["table"] = markdown(summary)
    with atomic_path(out / "study.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1, default=str))
    with atomic_path(out / "study.md") as tmp:
        tmp.write_text(summary["table"] + "\n")
    plot(summary, out / "study.png")
    return summary


def by_seed(rows: list[dict], key: str, **where) -> dict[int, float]:
    """{seed: `key`} of the finished rows matching `where` (a seed fixes a run's kept real patients)."""
    return {r["seed"]: r[key] for r in rows if all(r[k] == v for k, v in where.items()) and key in r}


def stats(rows: list[dict], key: str, seeds=None, **where) -> tuple[float, float, int] | None:
    """(mean, sd, n) of `key` over the rows matching `where` (and, given, those seeds)."""
    values = [v for seed, v in by_seed(rows, key, **where).items() if seeds is None or seed in seeds]
    if not values:
        return None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, len(values)


def markdown(summary: dict) -> str:
    cfg, rows = summary["config"], summary["runs"]
    ratios = list(cfg["synthetic_ratios"])
    lines = []
    for key, title in (("dice", "Dice"), ("iou", "IoU")):
        lines += [f"### Test {title} (real test split; mean ± sd over {len(cfg['seeds'])} seed(s))", "",
                  "| arm | real fraction (slices) | " + " | ".join(f"ratio {r:g}" for r in ratios) + " |",
                  "|---|---|" + "---|" * len(ratios)]
        for arm in summary["arms"]:
            for fraction in cfg["real_fractions"]:
                slices = next(r["real_slices"] for r in rows if r["fraction"] == fraction)
                cells = []
                for ratio in ratios:
                    s = stats(rows, key, arm=arm, fraction=fraction, ratio=ratio)
                    seeds = by_seed(rows, key, arm=arm, fraction=fraction, ratio=ratio)  # compare on the same seeds
                    base = stats(rows, key, seeds, arm="baseline", fraction=fraction,
                                 ratio=0.0 if against_real_only(arm) else ratio)
                    cells.append(_cell(s, base if arm != "baseline" else None))
                if any(cell != "—" for cell in cells):
                    lines.append(f"| {arm} | {100 * fraction:g} % ({slices}) | " + " | ".join(cells) + " |")
        lines += ["", "(In brackets: the difference to the baseline on the same seeds"
                      + (", at the same ratio for the shipped generator's change" if cfg["change"] != "none" else "")
                      + (", against real-only (ratio 0) for the matched and augmented arms" if any(
                          against_real_only(a) for a in summary["arms"]) else "") + ".)", ""]
        if cfg["synthetic_only"]:
            base = stats(rows, key, arm="baseline", fraction=1.0, ratio=1.0)
            only = [f"{arm} {_cell(stats(rows, key, arm=arm, fraction=1.0, ratio=1.0), None if arm == 'baseline' else base)}"
                    for arm in summary["arms"] if stats(rows, key, arm=arm, fraction=1.0, ratio=1.0)]
            lines += ["Synthetic only (ratio 1, no real training slice): " + "; ".join(only) + ".", ""]
    lines += quality_table(rows + summary.get("quality_references", [])) + ["### Reading", ""] + findings(summary)
    skipped = [r for r in rows if "skipped" in r]
    if skipped:
        lines.append(f"\n{len(skipped)} run(s) skipped: " + "; ".join(
            f"{r['arm']} F={r['fraction']:g} R={r['ratio']:g} seed {r['seed']}: {r['skipped']}" for r in skipped))
    steps = [r["steps"] for r in rows if "steps" in r]
    lines.append(f"\n{summary['real_train_slices']} real training slices at fraction 1; segmenters stop at "
                 f"{summary['segmenter_stop']}; optimizer steps per run {min(steps, default=0)}-{max(steps, default=0)}; "
                 f"this invocation took {summary['seconds']:.0f} s (finished runs are reused).")
    return "\n".join(lines)


def against_real_only(arm: str) -> bool:
    """Arms whose cells are read against real-only training: the matched generators and augmented real slices."""
    return arm.startswith("matched") or arm == "augmented real"


def quality_table(rows: list[dict]) -> list[str]:
    """Per arm and real fraction, the mean over seeds of its sets' quality (measured once per set)."""
    sets: dict[tuple[str, float], dict[int, dict]] = {}
    for r in rows:
        if r.get("quality"):
            sets.setdefault((r["arm"], r["fraction"]), {})[r["seed"]] = r["quality"]
    if not sets:
        return []

    def mean(per_seed: dict, key: str, fmt: str, scale: float = 1.0) -> str:
        values = [scale * q[key] for q in per_seed.values() if q.get(key) is not None]
        return format(float(np.mean(values)), fmt) if values else "—"

    judges = sorted({q["judge"] for per_seed in sets.values() for q in per_seed.values()})
    judge = (judges[0] if len(judges) == 1 else "the real-only segmenter of each seed")
    lines = [f"### The synthetic sets (mean over seeds; measured by {judge})", "",
             "| arm | real fraction | sets | KID x 1000 | real-vs-real KID x 1000 | NN ratio (median) | near-copies % "
             "| placed lesions: NN ratio (near-copies %) | lesion windows: KID x 1000 (real-vs-real) "
             "| mask faithfulness Dice | segmenter on real held-out |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (arm, fraction), q in sets.items():
        lesions = (f"{mean(q, 'lesion_nn_ratio_median', '.2f')} ({mean(q, 'lesion_near_copy_percent', '.0f')})"
                   if any(v.get("lesion_nn_ratio_median") is not None for v in q.values()) else "—")
        lines.append(f"| {arm} | {100 * fraction:g} % | {len(q)} | {mean(q, 'kid_mean', '.1f', 1000)} "
                     f"| {mean(q, 'kid_real_reference', '.1f', 1000)} | {mean(q, 'nn_ratio_median', '.2f')} "
                     f"| {mean(q, 'near_copy_percent', '.0f')} | {lesions} | {mean(q, 'lesion_kid_mean', '.1f', 1000)} "
                     f"({mean(q, 'lesion_kid_real_reference', '.1f', 1000)}) | {mean(q, 'agreement_dice_mean', '.3f')} "
                     f"| {mean(q, 'agreement_real_reference', '.3f')} |")
    if not any(arm == "matched inpaint" for arm, _ in sets):
        return lines + [""]
    return lines + ["", "The inpaint sets' whole-slice NN ratio compares whole slices: every inpainted slice is its "
                        "host outside the repainted region, so it reads as a near-copy by construction; their placed "
                        "lesions' own windows are compared in the next column, and the lesion-window KID compares "
                        "windows around the lesions only (for inpaint sets the placed ones).", ""]


def _cell(s, base) -> str:
    if s is None:
        return "—"
    text = f"{s[0]:.3f} ± {s[1]:.3f}" if s[2] > 1 else f"{s[0]:.3f} (1 seed)"
    return text + (f" ({s[0] - base[0]:+.3f})" if base is not None else "")


def findings(summary: dict) -> list[str]:
    """Per real fraction and arm: the best ratio's Dice change against real-only, paired by seed (a seed fixes the
    kept real patients, so both runs of a pair saw the same real data), with the paired sd and the seed-to-seed
    sd; then each matched arm against the augmented-real control, cell by cell."""
    cfg, rows = summary["config"], summary["runs"]
    lines = []
    for arm in summary["arms"]:
        for fraction in cfg["real_fractions"]:
            real_only = stats(rows, "dice", arm="baseline", fraction=fraction, ratio=0.0)
            mixed = [(r, stats(rows, "dice", arm=arm, fraction=fraction, ratio=r))
                     for r in cfg["synthetic_ratios"] if r > 0]
            mixed = [(r, s) for r, s in mixed if s is not None]
            if real_only is None or not mixed:
                continue
            ratio, best = max(mixed, key=lambda item: item[1][0])
            real_by_seed = by_seed(rows, "dice", arm="baseline", fraction=fraction, ratio=0.0)
            differences = [dice - real_by_seed[seed] for seed, dice in
                           by_seed(rows, "dice", arm=arm, fraction=fraction, ratio=ratio).items() if seed in real_by_seed]
            lines.append(f"- {arm}, real fraction {100 * fraction:g} %, best synthetic ratio {ratio:g}, against real-only: "
                         f"{paired_reading(differences)}; seed-to-seed sd up to {max(real_only[1], best[1]):.3f}.")
    lines += [line for fraction in cfg["real_fractions"] for ratio in cfg["synthetic_ratios"] if ratio > 0
              for arm in summary["arms"] if arm.startswith("matched")
              for line in [paired_line(rows, arm, "augmented real", fraction, ratio)] if line]
    return lines


def paired_line(rows: list[dict], arm: str, other: str, fraction: float, ratio: float) -> str | None:
    """`arm` against `other` in the same cell, paired by seed."""
    ours, theirs = (by_seed(rows, "dice", arm=a, fraction=fraction, ratio=ratio) for a in (arm, other))
    differences = [ours[s] - theirs[s] for s in ours if s in theirs]
    if not differences:
        return None
    return (f"- {arm} against {other}, real fraction {100 * fraction:g} %, ratio {ratio:g} (equal slice counts): "
            f"{paired_reading(differences)}.")


def paired_reading(differences: list[float]) -> str:
    """Mean of per-seed Dice differences, their sd, each one, and a verdict: within noise when the mean is no
    larger than the sd of the differences (pairing removes the seed-to-seed spread of which patients are kept)."""
    gain = float(np.mean(differences))
    sd = float(np.std(differences, ddof=1)) if len(differences) > 1 else None
    verdict = ("one seed: no noise estimate" if sd is None else "within the paired noise" if abs(gain) <= sd
               else "a gain" if gain > 0 else "a loss")
    return (f"{gain:+.3f} (paired sd {'n/a' if sd is None else f'{sd:.3f}'}; per seed "
            + ", ".join(f"{d:+.3f}" for d in differences)
            + f"; better in {sum(d > 0 for d in differences)} of {len(differences)}): {verdict}")


def plot(summary: dict, path: Path) -> Path:
    cfg, rows = summary["config"], summary["runs"]
    series = {}
    for arm in summary["arms"]:
        for fraction in cfg["real_fractions"]:
            points = [(r, stats(rows, "dice", arm=arm, fraction=fraction, ratio=r)) for r in cfg["synthetic_ratios"]]
            points = [(r, s[0]) for r, s in points if s is not None]
            seeds = by_seed(rows, "dice", arm=arm, fraction=fraction)
            real_only = stats(rows, "dice", seeds, arm="baseline", fraction=fraction, ratio=0.0)
            if arm != "baseline" and points and real_only:  # the other arms start from the real-only runs of their seeds
                points = [(0.0, real_only[0])] + points
            if points:
                label = (f"real {100 * fraction:g} %" + ("" if arm == "baseline" else f", {arm}")
                         + (" (1 seed)" if len(seeds) == 1 and len(cfg["seeds"]) > 1 else ""))
                series[label] = ([p[0] for p in points], [p[1] for p in points])
        only = stats(rows, "dice", arm=arm, fraction=1.0, ratio=1.0)
        if cfg["synthetic_only"] and only is not None:
            series["synthetic only" + ("" if arm == "baseline" else f", {arm}")] = ([1.0], [only[0]])
    return plot_curves(series, path, "synthetic ratio (share of each epoch)", "test Dice (mean over seeds)",
                       "Real fraction x synthetic ratio")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=CONFIG, help="Study config (YAML).")
    parser.add_argument("--out", type=Path, default=Path("study-synthetic-ratio"), help="Folder for everything.")
    parser.add_argument("--pipeline", help="Generator (pipeline folder or train-diffusion run); default: shipped.")
    parser.add_argument("--change", choices=CHANGES, help="The one change next to the baseline.")
    parser.add_argument("--min-agreement", type=float, help="change agreement: keep slices with Dice >= this.")
    parser.add_argument("--more-factor", type=int, help="change more: this many times the synthetic slices.")
    parser.add_argument("--seeds", type=int, help="Number of seeds (0..N-1).")
    parser.add_argument("--real-fractions", help="Comma-separated real fractions (default: the config's), e.g. 0.1,0.25 "
                                                 "to run one part of a study into its folder.")
    parser.add_argument("--synthetic-ratios", help="Comma-separated synthetic ratios (default: the config's), e.g. "
                                                   "0,0.5 for real-only and one mixed ratio.")
    parser.add_argument("--matched-generator", action="store_true", default=None,
                        help="Add the fairness arm: a generator per (fraction < 1, seed) trained on that run's patients.")
    parser.add_argument("--matched-seeds", type=int, help="Matched generators for the first N seeds only.")
    parser.add_argument("--matched-modes", help="Comma-separated generator modes of the matched arms "
                                                "(joint, mask-conditioned, inpaint; default: the config's).")
    parser.add_argument("--augmented-real", action=argparse.BooleanOptionalAction, default=None,
                        help="Add (or leave out) the classical-augmentation control: kept real slices moved like the "
                             "masks (default: the config's).")
    parser.add_argument("--quality-judge", help="Segmenter run or pipeline folder that measures the matched and "
                                                "augmented sets (default: the real-only run of each set's seed).")
    parser.add_argument("--smoke", action="store_true", help="Tiny data, nets and grid, one seed: seconds.")
    args = parser.parse_args(argv)
    overrides = dict(SMOKE) if args.smoke else {}
    overrides.update({k: v for k, v in {"pipeline": args.pipeline, "change": args.change,
                                        "min_agreement": args.min_agreement, "more_factor": args.more_factor,
                                        "seeds": list(range(args.seeds)) if args.seeds else None,
                                        "real_fractions": [float(f) for f in args.real_fractions.split(",")]
                                        if args.real_fractions else None,
                                        "synthetic_ratios": [float(r) for r in args.synthetic_ratios.split(",")]
                                        if args.synthetic_ratios else None,
                                        "matched_generator": args.matched_generator,
                                        "matched_seeds": list(range(args.matched_seeds)) if args.matched_seeds else None,
                                        "matched_modes": args.matched_modes.split(",") if args.matched_modes else None,
                                        "augmented_real": args.augmented_real, "quality_judge": args.quality_judge,
                                        }.items()
                      if v is not None})
    cfg = load_config(StudyConfig, args.config, overrides)
    summary = run_study(args.out, cfg)
    print(summary["table"])
    print(f"wrote {args.out / 'study.md'}, study.json and study.png")
    return summary


if __name__ == "__main__":
    main()
