"""When does mixing synthetic slices into segmenter training help? Real fraction x synthetic ratio x seeds.

1. The demo data (`genseg demo-data`, prepared at the generator's size) and one synthetic set sampled from the
   shipped generator (as many slices as the real training split, DPM-Solver++).
2. For every real fraction F (share of real training *patients* kept, seeded per run), synthetic ratio R (share of
   each epoch drawn from the synthetic set; `train-seg --synthetic-ratio`) and seed: a configs/seg-demo.yaml
   segmenter, tested on the real test split. Plus one synthetic-only run per seed (R = 1: no real training slice).
   With `equal_steps` a run with fewer real slices per epoch runs proportionally more epochs (and patience), so
   every run gets about the same optimizer steps and small fractions are not simply undertrained; a time budget
   (seg-demo.yaml's) already gives every run the same wall time and stays as it is.
3. The "one change" (config `change`), run for every R > 0 cell and synthetic-only next to the baseline:
   `agreement` keeps synthetic slices whose generated mask agrees with a real-only segmenter (Dice >=
   min_agreement): the real-only run (R = 0) of the same fraction and seed, so the filter uses no labels the arm
   does not have (synthetic-only uses fraction 1); `more` samples more_factor x as many synthetic slices.
4. With `matched_generator` (--matched-generator), a fairness control for the low-data cells: the shipped generator
   learned from *all* real training patients, so at F < 1 its slices carry patients the real-only arm never sees.
   This arm trains one generator per (F < 1, seed) on exactly the patients that segmenter keeps
   (`train-diffusion --real-fraction F --seed S`) and mixes that generator's slices instead (each generator costs
   `matched_generator_steps`, ~25 min per 1500 steps on 2 idle cores; `matched_fractions`/`--matched-seeds` limit it).
5. Mean ± sd test Dice and IoU: markdown tables (printed and OUT/study.md), OUT/study.json and OUT/study.png.

Finished runs (metrics.json) and the data and synthetic files are reused when the command is repeated; delete
OUT to start afresh (e.g. after the generator changed).

    python scripts/study_synthetic_ratio.py --out study-synthetic-ratio   # 39 baseline + 27 change runs
    python scripts/study_synthetic_ratio.py --change none                 # baseline only (39 runs)
Cost, measured on 2 CPU cores (docs/study-synthetic-ratio.md): one seed of the baseline 926 s idle, so the baseline
~46 min; baseline + agreement ~89 min on a partly shared machine; one matched generator (1500 steps) ~40 min.
    python scripts/study_synthetic_ratio.py --out study --matched-generator --matched-seeds 1   # + fairness arm
    python scripts/study_synthetic_ratio.py --out /tmp/smoke --smoke --pipeline DIR   # seconds; what CI runs
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

from genseg.config import load_config
from genseg.data.prepared import PreparedDataset, read_metadata
from genseg.evaluation.synthetic_quality import evaluate_synthetic
from genseg.io import atomic_path
from genseg.pipeline.diffusion import SamplingSettings
from genseg.runs import SegTrainConfig
from genseg.training.diffusion import DiffusionTrainConfig
from genseg.training.mixing import select_synthetic, subsample_patients
from genseg.viz import plot_curves
from genseg.workflows.demo import (ensure_demo_data, ensure_diffusion, ensure_prepared, ensure_segmenter,
                                   generator_source, load_generator, sample_synthetic, training_length)

REPO = Path(__file__).resolve().parents[1]  # scripts are run from a checkout
CONFIG = REPO / "configs" / "study-synthetic-ratio.yaml"
CHANGES = ("none", "agreement", "more")


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
    matched_generator: bool = False
    matched_fractions: tuple[float, ...] | None = None  # None: every real fraction below 1
    matched_seeds: tuple[int, ...] | None = None  # None: every seed
    matched_generator_config: str = "configs/diffusion-cpu-small.yaml"
    matched_generator_steps: int = 1500  # the shipped generator's steps
    matched_generator_overrides: dict = field(default_factory=dict)  # keys of that config ("model" merges)

    def __post_init__(self):
        if self.change not in CHANGES:
            raise ValueError(f"change must be one of {CHANGES}, got {self.change!r}")
        if self.change == "agreement" and self.synthetic_only and 1.0 not in self.real_fractions:
            raise ValueError("change agreement with synthetic_only filters with the real-only run at fraction 1: "
                             "add 1.0 to real_fractions")

    def sampling(self, seed_offset: int = 0) -> SamplingSettings:
        """The sampler of every synthetic set; `seed_offset` gives a set of other slices."""
        return SamplingSettings(steps=self.sample_steps, seed=self.sample_seed + seed_offset)


SMOKE = {"real_fractions": [0.5, 1.0], "synthetic_ratios": [0.0, 0.5], "seeds": [0], "patients": 10,
         "slices_per_patient": 2, "raw_size": 64, "sample_steps": 2, "min_agreement": 0.0, "more_factor": 2,
         "seg_overrides": {"base_channels": 4, "depth": 2, "epochs": 1, "batch_size": 4, "plot_samples": 1},
         "matched_generator_steps": 2,
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


def make_data(out: Path, cfg: StudyConfig) -> tuple[Path, Path, int]:
    """Prepared real data, the synthetic set (reused when present) and the generator's size."""
    generator = load_generator(generator_source(cfg.pipeline))
    size = int(generator.unet.config.sample_size)
    raw = ensure_demo_data(out / "raw", cfg.patients, cfg.slices_per_patient, cfg.raw_size, seed=0)
    data = ensure_prepared(raw, out / "demo.h5", size)
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


def matched_synthetic(out: Path, cfg: StudyConfig, data: Path, size: int, num: int, fraction: float,
                      seed: int) -> Path:
    """Synthetic slices from a generator trained (or reused) on exactly the real patients that the segmenter of
    (fraction, seed) keeps; as many slices and the same sampler as the shipped generator's set."""
    path = out / "synthetic-matched" / f"f{fraction:g}-s{seed}.h5"
    if path.exists():
        return path
    config = Path(cfg.matched_generator_config)
    config = config if config.is_absolute() else REPO / config
    overrides = dict(cfg.matched_generator_overrides)
    base_model = load_config(DiffusionTrainConfig, config).model
    model = {**dataclasses.asdict(base_model), **overrides.pop("model", {}), "sample_size": size}
    gen_cfg = load_config(DiffusionTrainConfig, config, {**overrides, "model": model, "split": "train",
                                                         "real_fraction": fraction, "seed": seed,
                                                         "max_steps": cfg.matched_generator_steps})
    run = ensure_diffusion(gen_cfg, data, out / "generators" / f"f{fraction:g}-s{seed}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return sample_synthetic(load_generator(run), path, num, cfg.sampling(), source=run, grid=path.with_suffix(".png"))


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
            "epoch": log["epoch"]}


def run_study(out: str | Path, cfg: StudyConfig) -> dict:
    out = Path(out)
    started = time.perf_counter()
    data, synthetic, size = make_data(out, cfg)
    seg_path = Path(cfg.seg_config) if Path(cfg.seg_config).is_absolute() else REPO / cfg.seg_config
    base = load_config(SegTrainConfig, seg_path, {**cfg.seg_overrides, "size": size})
    full_real = int((read_metadata(data)["split"] == "train").sum())
    cells = [(f, r) for f in cfg.real_fractions for r in cfg.synthetic_ratios]
    if cfg.synthetic_only:
        cells.append((1.0, 1.0))
    arms = [Arm("baseline", "baseline", lambda fraction, seed: synthetic, runs_cell=lambda *cell: True)]
    if cfg.change == "agreement":  # filtered by the real-only run of the same fraction (1 for synthetic-only)
        arms.append(Arm(f"agreement >= {cfg.min_agreement:g}", cfg.change, lambda fraction, seed: filtered_copy(
            out, synthetic, data, out / "runs" / "baseline" / f"f{fraction:g}-r0-s{seed}"), cfg.min_agreement))
    elif cfg.change == "more":
        arms.append(Arm(f"{cfg.more_factor}x synthetic", cfg.change, lambda fraction, seed: out / "synthetic-more.h5"))
    if cfg.matched_generator:
        fractions = cfg.matched_fractions or [f for f in cfg.real_fractions if f < 1]
        seeds = cfg.seeds if cfg.matched_seeds is None else cfg.matched_seeds
        num = cfg.num_synthetic or full_real
        arms.append(Arm("matched generator", "matched",
                        lambda fraction, seed: matched_synthetic(out, cfg, data, size, num, fraction, seed),
                        runs_cell=lambda fraction, ratio, seed: (0 < ratio < 1 and fraction in fractions
                                                                 and seed in seeds)))
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
                print(f"{arm.name} F={fraction:g} R={ratio:g} seed {seed}: "
                      + (rows[-1].get("skipped") or f"test Dice {rows[-1]['dice']:.4f}"))
    summary = {"config": dataclasses.asdict(cfg), "real_train_slices": full_real, "runs": rows,
               "arms": [a.name for a in arms], "seconds": round(time.perf_counter() - started, 1)}
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
                    base = stats(rows, key, seeds, arm="baseline", fraction=fraction, ratio=ratio)
                    cells.append(_cell(s, base if arm != "baseline" else None))
                if any(cell != "—" for cell in cells):
                    lines.append(f"| {arm} | {100 * fraction:g} % ({slices}) | " + " | ".join(cells) + " |")
        lines.append("")
        if cfg["synthetic_only"]:
            base = stats(rows, key, arm="baseline", fraction=1.0, ratio=1.0)
            only = [f"{arm} {_cell(stats(rows, key, arm=arm, fraction=1.0, ratio=1.0), None if arm == 'baseline' else base)}"
                    for arm in summary["arms"] if stats(rows, key, arm=arm, fraction=1.0, ratio=1.0)]
            lines += ["Synthetic only (ratio 1, no real training slice): " + "; ".join(only) + ".", ""]
    lines += ["### Reading", ""] + findings(summary)
    skipped = [r for r in rows if "skipped" in r]
    if skipped:
        lines.append(f"\n{len(skipped)} run(s) skipped: " + "; ".join(
            f"{r['arm']} F={r['fraction']:g} R={r['ratio']:g} seed {r['seed']}: {r['skipped']}" for r in skipped))
    lines.append(f"\n{summary['real_train_slices']} real training slices at fraction 1; equal optimizer steps per "
                 f"run: {cfg['equal_steps']}; this invocation took {summary['seconds']:.0f} s (finished runs are reused).")
    return "\n".join(lines)


def _cell(s, base) -> str:
    if s is None:
        return "—"
    text = f"{s[0]:.3f} ± {s[1]:.3f}" if s[2] > 1 else f"{s[0]:.3f} (1 seed)"
    return text + (f" ({s[0] - base[0]:+.3f})" if base is not None else "")


def findings(summary: dict) -> list[str]:
    """Per real fraction and arm: the best ratio's Dice change against real-only, paired by seed (a seed fixes the
    kept real patients, so both runs of a pair saw the same real data), next to the seed-to-seed sd."""
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
            gain = float(np.mean(differences))
            noise = max(real_only[1], best[1])
            verdict = ("one seed: no noise estimate" if len(differences) < 2 else "within seed noise" if abs(gain) <= noise
                       else "a gain" if gain > 0 else "a loss")
            lines.append(f"- {arm}, real fraction {100 * fraction:g} %: best synthetic ratio {ratio:g} changes Dice by "
                         f"{gain:+.3f} against real-only (per seed " + ", ".join(f"{d:+.3f}" for d in differences)
                         + f"; better in {sum(d > 0 for d in differences)} of {len(differences)}; sd up to "
                           f"{noise:.3f}): {verdict}.")
    return lines


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
    parser.add_argument("--matched-generator", action="store_true", default=None,
                        help="Add the fairness arm: a generator per (fraction < 1, seed) trained on that run's patients.")
    parser.add_argument("--matched-seeds", type=int, help="Matched generators for the first N seeds only.")
    parser.add_argument("--smoke", action="store_true", help="Tiny data, nets and grid, one seed: seconds.")
    args = parser.parse_args(argv)
    overrides = dict(SMOKE) if args.smoke else {}
    overrides.update({k: v for k, v in {"pipeline": args.pipeline, "change": args.change,
                                        "min_agreement": args.min_agreement, "more_factor": args.more_factor,
                                        "seeds": list(range(args.seeds)) if args.seeds else None,
                                        "matched_generator": args.matched_generator,
                                        "matched_seeds": list(range(args.matched_seeds)) if args.matched_seeds else None
                                        }.items()
                      if v is not None})
    cfg = load_config(StudyConfig, args.config, overrides)
    summary = run_study(args.out, cfg)
    print(summary["table"])
    print(f"wrote {args.out / 'study.md'}, study.json and study.png")
    return summary


if __name__ == "__main__":
    main()
