"""The segmentation recipe against a bare PyTorch loop and MONAI's standard 2-D recipe, at equal wall time, on data
none of them was tuned on (issue 14, item 5), in one run.

Datasets (generated here, 128 px by default, cached under OUT/data): `standard` (the demo data), the harder demo
presets `skull`, `low-contrast`, `small`, `bias` (`genseg demo-data --preset`, each with its own seed),
`ultrasound` (the breast-ultrasound demo domain) and `anatomy` (`genseg demo-data --domain anatomy`: a real brain,
nibabel's bundled EPI scan, with inserted tumours). Each is drawn at 256 px and prepared at --size, as the README's
demo flow does. Recipes, each given --budget minutes of wall time per dataset:

- `genseg`: the shipped recipe, configs/seg-cpu-small.yaml through `train_segmenter`, with `time_budget` set to the
  budget where the config has that key; otherwise its `epochs`, capped at the number of the bare loop's epochs
  that fit the budget on that dataset. Its wall time includes its own final scoring and figures.
- `bare`: about 60 lines of plain PyTorch below: the same network (SegmentationUNet width 16, depth 4), BCE + Dice,
  Adam 1e-3, batch 8, random horizontal flips, validation after every epoch, the best validation state kept.
- `monai`: `monai.networks.nets.UNet` (16..256 channels, strides 2, 2 residual units), `DiceCELoss` on sigmoid
  outputs, Adam 1e-3, batch 8, MONAI dictionary transforms (RandFlipd, RandRotated, RandScaleIntensityd,
  RandShiftIntensityd) and the same validation and best state.

`--variant NAME:KEY=VALUE[,KEY=VALUE]` adds a recipe `genseg NAME`: the shipped config with those keys changed
(for instance `--variant norot:max_rotation=0`), trained like `genseg`, so that one run measures what a part of the
recipe pays. `--seed` seeds every recipe, genseg's config included.

Every recipe's test masks are scored by genseg.evaluation.metrics (the best validation state, threshold 0.5), so the
numbers compare. With --post-rows every genseg model (variants too) is also evaluated with flip TTA, with
small-component removal, with both, and with unsure-region removal (--min-peak; no extra training). Writes
OUT/results.json (everything, with the validation curves), OUT/results.md (the table, with each recipe's test Dice
over the bare loop's on that dataset) and OUT/val_dice.png (validation Dice against wall time, one panel per
dataset). --rescore re-evaluates the saved genseg models of earlier runs with post-processing rules instead of
training: each rule's change of validation and test Dice, model by model and over all of them.

    PYTHONPATH=$PWD python3 scripts/bench_recipe.py --budget 5 --out bench-recipe
    PYTHONPATH=$PWD python3 scripts/bench_recipe.py --budget 0.3 --datasets standard small --out /tmp/smoke \
        --variant norot:max_rotation=0
    PYTHONPATH=$PWD python3 scripts/bench_recipe.py --combine bench-seed*/results.json   # means over seeds
    PYTHONPATH=$PWD python3 scripts/bench_recipe.py --rescore bench-*/results.json --min-peak 0.7 0.8 0.9
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from genseg.config import load_config
from genseg.data.demo import PRESETS, make_demo_dataset
from genseg.data.demo_anatomy import make_anatomy_dataset
from genseg.data.demo_ultrasound import make_ultrasound_dataset
from genseg.data.prepare import prepare
from genseg.data.prepared import PreparedDataset, class_names, read_metadata
from genseg.evaluation.metrics import dice_iou, score_slices, summarize
from genseg.models.unet import SegmentationUNet
from genseg.runs import CsvLog, SegTrainConfig
from genseg.training.seg import train_segmenter

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("standard", *PRESETS, "ultrasound", "anatomy")
RECIPES = ("genseg", "bare", "monai")
RUN_ORDER = ("bare", "monai", "genseg")  # the bare loop first: genseg's epoch fallback needs its pace
BATCH, LR, THRESHOLD = 8, 1e-3, 0.5


# --- data ---------------------------------------------------------------------------------------------------

def make_dataset(name: str, work: Path, size: int, patients: int) -> Path:
    """OUT/data/NAME.h5, drawn and prepared once (reused when present)."""
    prepared = work / f"{name}-{patients}p-{size}px.h5"
    if prepared.exists():
        return prepared
    raw = work / f"{name}-{patients}p-raw"
    if name == "ultrasound":  # as many images as the MRI sets have slices
        make_ultrasound_dataset(raw, cases=patients * 8, seed=105, force=True, progress=False)
    elif name == "anatomy":
        make_anatomy_dataset(raw, patients=patients, seed=106, force=True, progress=False)
    else:
        make_demo_dataset(raw, patients=patients, preset=None if name == "standard" else name, force=True,
                          progress=False)
    prepare(raw, prepared, size=size, progress=False)
    shutil.rmtree(raw)
    return prepared


def prepared_size(data: Path) -> int:
    return int(read_metadata(data)["attrs"]["size"])


def load_split(data: Path, split: str) -> dict:
    """One split of a prepared file in memory: images (N, C, S, S), masks (N, 1, S, S), labels, patients and the
    file's class names."""
    dataset = PreparedDataset(data, split=split)
    items = [dataset[i] for i in range(len(dataset))]
    return {"images": torch.stack([it["image"] for it in items]), "masks": torch.stack([it["mask"] for it in items]),
            "labels": dataset.labels, "patients": dataset.patients, "class_names": class_names(dataset.attrs)}


def mean_dice(probs: torch.Tensor, masks: torch.Tensor) -> float:
    """Mean per-slice Dice (both empty = 1), genseg.evaluation.metrics' convention, of probabilities at THRESHOLD."""
    return float(dice_iou(probs[:, 0].numpy() >= THRESHOLD, masks[:, 0].numpy() > 0.5)[0].mean())


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([torch.sigmoid(model(x)) for x in images.split(16)])


def test_scores(probs: torch.Tensor, test: dict) -> dict:
    scores = score_slices(probs[:, 0].numpy() >= THRESHOLD, test["masks"][:, 0].numpy() > 0.5)
    return summarize(scores, test["labels"], test["patients"], test["class_names"])


# --- the baselines' shared loop -------------------------------------------------------------------------------

def train_until(model: torch.nn.Module, optimizer, loss_fn, epoch, per_epoch: int, val: dict,
                budget_s: float) -> tuple[torch.nn.Module, dict]:
    """Train on `epoch()`'s (x, y) batches until `budget_s` seconds, validating after each (possibly cut) epoch and
    keeping the best validation state: the loop both baselines run, so only their model, loss and data differ."""
    start, steps, best, best_state, curve = time.perf_counter(), 0, -1.0, None, []
    while time.perf_counter() - start < budget_s:
        model.train()
        for x, y in epoch():
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            if time.perf_counter() - start >= budget_s:
                break
        dice = mean_dice(predict(model, val["images"]), val["masks"])
        curve.append((time.perf_counter() - start, dice))
        if dice > best:
            best, best_state = dice, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return model, {"epochs": steps / per_epoch, "best_val_dice": best, "curve": curve}


# --- the bare loop ------------------------------------------------------------------------------------------

def bare_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    probs = torch.sigmoid(logits)
    dice = (2 * (probs * masks).sum((1, 2, 3)) + 1) / (probs.sum((1, 2, 3)) + masks.sum((1, 2, 3)) + 1)
    return F.binary_cross_entropy_with_logits(logits, masks) + (1 - dice).mean()


def train_bare(train: dict, val: dict, budget_s: float, seed: int) -> tuple[torch.nn.Module, dict]:
    """Plain PyTorch: same network, BCE + Dice, Adam, flips, validation per epoch, best state; until the budget."""
    torch.manual_seed(seed)
    images, masks = train["images"], train["masks"]
    model = SegmentationUNet(in_channels=images.shape[1], base_channels=16, depth=4, sample_size=images.shape[-1])
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)

    def epoch():
        for rows in torch.randperm(len(images)).split(BATCH):
            x, y = images[rows].clone(), masks[rows].clone()
            flip = torch.rand(len(rows)) < 0.5
            x[flip], y[flip] = x[flip].flip(-1), y[flip].flip(-1)
            yield x, y

    return train_until(model, optimizer, bare_loss, epoch, math.ceil(len(images) / BATCH), val, budget_s)


# --- MONAI's standard 2-D recipe ----------------------------------------------------------------------------

def train_monai(train: dict, val: dict, budget_s: float, seed: int) -> tuple[torch.nn.Module, dict]:
    """monai UNet + DiceCELoss + dictionary transforms, Adam; validation per epoch, best state; until the budget."""
    from monai.data import DataLoader, Dataset
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet
    from monai.transforms import (Compose, RandFlipd, RandRotated, RandScaleIntensityd, RandShiftIntensityd)
    from monai.utils import set_determinism

    set_determinism(seed=seed)
    keys = ["image", "label"]
    transform = Compose([RandFlipd(keys, prob=0.5, spatial_axis=1),
                         RandRotated(keys, range_x=math.radians(10), prob=0.5, mode=("bilinear", "nearest")),
                         RandScaleIntensityd("image", factors=0.1, prob=0.5),
                         RandShiftIntensityd("image", offsets=0.05, prob=0.5)])
    items = [{"image": x, "label": y} for x, y in zip(train["images"], train["masks"])]
    loader = DataLoader(Dataset(items, transform), batch_size=BATCH, shuffle=True)
    model = UNet(spatial_dims=2, in_channels=train["images"].shape[1], out_channels=1,
                 channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2)
    loss_fn, optimizer = DiceCELoss(sigmoid=True), torch.optim.Adam(model.parameters(), lr=LR)
    batches = lambda: ((batch["image"].as_tensor(), batch["label"].as_tensor()) for batch in loader)  # noqa: E731
    trained = train_until(model, optimizer, loss_fn, batches, len(loader), val, budget_s)
    set_determinism(seed=None)
    return trained


# --- the shipped recipe -------------------------------------------------------------------------------------

def parse_variant(text: str) -> tuple[str, dict]:
    """`NAME:KEY=VALUE,...` -> ("genseg NAME", {KEY: VALUE}), each value read as YAML (0 -> int, off -> False)."""
    import yaml

    name, sep, pairs = text.partition(":")
    changes = dict(pair.split("=", 1) for pair in pairs.split(",") if "=" in pair)
    if not (name and sep and changes):
        raise argparse.ArgumentTypeError(f"--variant wants NAME:KEY=VALUE[,KEY=VALUE], got {text!r}")
    unknown = set(changes) - {f.name for f in dataclasses.fields(SegTrainConfig)}
    if unknown:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: no config key(s) {sorted(unknown)}")
    return f"genseg {name}", {k: yaml.safe_load(v) for k, v in changes.items()}


def train_genseg(data: Path, run_dir: Path, budget_s: float, bare_epoch_s: float | None, seed: int,
                 changes: dict | None = None) -> tuple[Path, dict]:
    """configs/seg-cpu-small.yaml (with `changes`) through train_segmenter, budgeted by `time_budget` where the
    config has it."""
    cfg = load_config(SegTrainConfig, ROOT / "configs" / "seg-cpu-small.yaml",
                      {"size": prepared_size(data), "seed": seed, **(changes or {})})
    if "time_budget" in {f.name for f in dataclasses.fields(SegTrainConfig)}:
        cfg, budget_by = dataclasses.replace(cfg, time_budget=budget_s / 60), "time_budget"
    elif bare_epoch_s:
        cfg, budget_by = dataclasses.replace(cfg, epochs=max(1, min(cfg.epochs, int(budget_s // bare_epoch_s)))), "epochs"
    else:
        budget_by = "epochs"
    shutil.rmtree(run_dir, ignore_errors=True)
    result = train_segmenter(cfg, data, run_dir)
    rows = CsvLog(run_dir / "log.csv").rows()
    curve = [(float(r["seconds"]), float(r["val_dice"])) for r in rows if r.get("val_dice")]
    return run_dir, {"epochs": result.metrics["epochs_run"], "best_val_dice": result.metrics["best_val_dice"],
                     "curve": curve, "budget_by": budget_by, "config_epochs": cfg.epochs,
                     "test": result.metrics["test"]}


def genseg_post_rows(recipe: str, run_dir: Path, data: Path, min_component: int, min_peak: float) -> dict[str, dict]:
    """A genseg recipe's model evaluated with flip TTA, small-component removal, both, and unsure-region removal (no
    extra training)."""
    from genseg.evaluation.evaluate import evaluate

    variants = {f"{recipe} +tta": {"tta": "hflip"},
                f"{recipe} +min-component {min_component}": {"min_component": min_component},
                f"{recipe} +tta +min-component {min_component}": {"tta": "hflip", "min_component": min_component},
                f"{recipe} +min-peak {min_peak:g}": {"min_peak": min_peak}}
    return {name: evaluate(run_dir, data, progress=False, **kwargs) for name, kwargs in variants.items()}


def rescore(paths: list[Path], min_peaks: list[float], min_component: int) -> str:
    """Every trained genseg model (variants too) of earlier runs' results evaluated again, on its validation and test
    splits, plain and with each post-processing rule: a table of the rules' changes, model by model, and a summary
    per rule (mean change, models better and worse by at least 0.0005, the worst change)."""
    from genseg.evaluation.evaluate import evaluate

    rules = {**{f"min-peak {p:g}": {"min_peak": p} for p in min_peaks},
             f"min-component {min_component}": {"min_component": min_component}}
    lines = ["| results | dataset | recipe | test Dice | " + " | ".join(f"{r}: test (val)" for r in rules) + " |",
             "|---|---|---|---|" + "---|" * len(rules)]
    changes: dict[tuple[str, str], list[float]] = {(rule, split): [] for rule in rules for split in ("val", "test")}
    for path in paths:
        for dataset, rows in json.loads(Path(path).read_text())["datasets"].items():
            for recipe, row in rows.items():
                if not recipe.startswith("genseg") or " +" in recipe:  # trained models only, not post-rows
                    continue
                run, data = row["test"]["checkpoint"], row["test"]["data"]
                plain = {split: evaluate(run, data, split=split, progress=False)["dice"] for split in ("val", "test")}
                cells = []
                for rule, kwargs in rules.items():
                    for split in ("val", "test"):
                        changes[rule, split].append(
                            evaluate(run, data, split=split, progress=False, **kwargs)["dice"] - plain[split])
                    cells.append(f"{changes[rule, 'test'][-1]:+.3f} ({changes[rule, 'val'][-1]:+.3f})")
                lines.append(f"| {Path(path).parent.name} | {dataset} | {recipe} | {plain['test']:.3f} | "
                             + " | ".join(cells) + " |")
    lines += ["", "| rule | split | models | mean change | better | worse | worst |", "|---|---|---|---|---|---|---|"]
    for (rule, split), values in changes.items():
        if values:
            lines.append(f"| {rule} | {split} | {len(values)} | {sum(values) / len(values):+.4f} | "
                         f"{sum(v >= 5e-4 for v in values)} | {sum(v <= -5e-4 for v in values)} | {min(values):+.3f} |")
    return "\n".join(lines) + "\n"


# --- one run ------------------------------------------------------------------------------------------------

def run_dataset(name: str, data: Path, recipes: list[str], variants: dict[str, dict], budget_s: float, out: Path,
                seed: int, post_rows: bool, min_component: int, min_peak: float) -> dict[str, dict]:
    """Every recipe (and genseg variant) on one dataset: wall time, epochs, validation curve, test scores."""
    splits = {split: load_split(data, split) for split in ("train", "val", "test")}
    rows: dict[str, dict] = {}
    for recipe in [*sorted(recipes, key=RUN_ORDER.index), *variants]:
        print(f"[{name}] {recipe}: {budget_s / 60:.2f} min budget", flush=True)
        start = time.perf_counter()
        if recipe.startswith("genseg"):
            bare = rows.get("bare")
            epoch_s = bare["wall_s"] / bare["epochs"] if bare and bare["epochs"] else None
            run_dir, info = train_genseg(data, out / "runs" / f"{name}-{recipe.replace(' ', '-')}", budget_s,
                                         epoch_s, seed, variants.get(recipe))
            test = info.pop("test")
        else:
            train = train_bare if recipe == "bare" else train_monai
            model, info = train(splits["train"], splits["val"], budget_s, seed)
            test = test_scores(predict(model, splits["test"]["images"]), splits["test"])
        rows[recipe] = {"wall_s": time.perf_counter() - start, **info, "test": test}
        if recipe.startswith("genseg") and post_rows:
            for variant, scores in genseg_post_rows(recipe, run_dir, data, min_component, min_peak).items():
                rows[variant] = {**{k: v for k, v in rows[recipe].items() if k != "test"},
                                 "test": scores}
    return rows


def markdown(results: dict, budget_min: float) -> str:
    """One row per dataset and recipe; per-class Dice in one cell, Dice over the bare loop's on that dataset."""
    def fmt(v, digits=3):
        return "n/a" if v is None else f"{v:.{digits}f}"

    lines = [f"Budget {budget_min:g} min of wall time per recipe and dataset; test split; genseg.evaluation.metrics.", "",
             "| dataset | recipe | test Dice | Dice / bare | per-class Dice | HD95 (px) | wall (s) | epochs |",
             "|---|---|---|---|---|---|---|---|"]
    for dataset, rows in results["datasets"].items():
        bare = rows.get("bare", {}).get("test", {}).get("dice")
        for recipe, row in rows.items():
            test = row["test"]
            per_class = ", ".join(f"{c} {fmt(v['dice'])}" for c, v in test["per_class"].items())
            ratio = fmt(test["dice"] / bare, 2) if bare else "n/a"
            lines.append(f"| {dataset} | {recipe} | {fmt(test['dice'])} | {ratio} | {per_class} | "
                         f"{fmt(test['hd95'], 1)} | {row['wall_s']:.0f} | {row['epochs']:.1f} |")
    return "\n".join(lines) + "\n"


def combine(paths: list[Path]) -> str:
    """Several runs' results.json (other seeds, or the same seed again: a time budget makes every run its own
    sample) as one table: per dataset and recipe the mean and sd of test Dice over the runs, its worst run, the
    mean over runs of each class's Dice, and the mean differences to the bare loop and to the genseg recipe,
    each paired within the runs (files) that have both (with its sd)."""
    from statistics import mean, stdev

    runs: dict[tuple[str, str], list[dict]] = {}
    for path in paths:
        results = json.loads(path.read_text())
        for dataset, rows in results["datasets"].items():
            for recipe, row in rows.items():
                runs.setdefault((dataset, recipe), []).append({"file": str(path), **row["test"]})
    datasets = list(dict.fromkeys(dataset for dataset, _ in runs))

    def sd(values):
        return f"{stdev(values):.3f}" if len(values) > 1 else "n/a"

    def paired(tests, dataset, baseline):
        other = {t["file"]: t["dice"] for t in runs.get((dataset, baseline), [])}
        diffs = [t["dice"] - other[t["file"]] for t in tests if t["file"] in other]
        return f"{mean(diffs):+.3f} ({sd(diffs)}, n={len(diffs)})" if diffs else "n/a"

    lines = ["| dataset | recipe | runs | test Dice mean | sd | worst | minus bare, paired (sd) | "
             "minus genseg, paired (sd) | per-class Dice, mean |", "|---|---|---|---|---|---|---|---|---|"]
    for dataset, recipe in sorted(runs, key=lambda key: datasets.index(key[0])):
        tests = runs[dataset, recipe]
        dice = [t["dice"] for t in tests]
        classes = sorted({c for t in tests for c in t["per_class"]})
        per_class = ", ".join(f"{c} {mean(t['per_class'][c]['dice'] for t in tests if c in t['per_class']):.3f}"
                              for c in classes)
        to_bare = "n/a" if recipe == "bare" else paired(tests, dataset, "bare")
        to_genseg = "n/a" if recipe in ("bare", "genseg") else paired(tests, dataset, "genseg")
        lines.append(f"| {dataset} | {recipe} | {len(tests)} | {mean(dice):.3f} | {sd(dice)} | {min(dice):.3f} | "
                     f"{to_bare} | {to_genseg} | {per_class} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> Path:
    """Validation Dice against wall time, one panel per dataset, one line per trained recipe."""
    from matplotlib.figure import Figure

    datasets = list(results["datasets"])
    cols = min(3, len(datasets))
    fig = Figure(figsize=(4.5 * cols, 3.4 * math.ceil(len(datasets) / cols)), dpi=110, layout="constrained")
    for k, dataset in enumerate(datasets):
        ax = fig.add_subplot(math.ceil(len(datasets) / cols), cols, k + 1)
        for recipe, row in results["datasets"][dataset].items():
            if (recipe in RECIPES or recipe in results["variants"]) and row["curve"]:
                seconds, dice = zip(*row["curve"])
                ax.plot(seconds, dice, marker="o", markersize=2.5, label=recipe)
        ax.set(title=dataset, xlabel="wall time (s)", ylabel="validation Dice", ylim=(0, 1))
        ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--recipes", nargs="*", choices=RECIPES, default=list(RECIPES),
                        help="recipes to train (none: only the --variant ones, e.g. beside an earlier run's)")
    parser.add_argument("--budget", type=float, default=5.0, help="minutes of wall time per recipe and dataset")
    parser.add_argument("--out", type=Path, default=Path("bench-recipe"))
    parser.add_argument("--size", type=int, default=128, help="prepared slice side")
    parser.add_argument("--patients", type=int, default=30,
                        help="patients per MRI dataset (8 slices each); ultrasound gets 8x as many images")
    parser.add_argument("--seed", type=int, default=0, help="seed of every recipe's training run")
    parser.add_argument("--variant", dest="variants", type=parse_variant, action="append", default=[],
                        metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                        help="also train the shipped config with these keys changed, as recipe 'genseg NAME'")
    parser.add_argument("--post-rows", action="store_true",
                        help="also evaluate the genseg model with --tta, --min-component, both, and --min-peak")
    parser.add_argument("--min-component", type=int, default=16, help="pixels, for --post-rows and --rescore")
    parser.add_argument("--min-peak", type=float, nargs="+", default=[0.8], metavar="P",
                        help="peak probability of a kept region, for --post-rows (the first) and --rescore (each)")
    parser.add_argument("--rescore", nargs="+", type=Path, metavar="RESULTS.json",
                        help="train nothing: evaluate the genseg models saved by earlier runs again, plain and with "
                             "each --min-peak and --min-component, on their validation and test splits")
    parser.add_argument("--combine", nargs="+", type=Path, metavar="RESULTS.json",
                        help="train nothing: print earlier runs' results (other seeds) as one table of means, sds "
                             "and differences to the bare loop paired within each file")
    args = parser.parse_args()
    if args.combine:
        print(combine(args.combine))
        return
    if not all(0 <= p <= 1 for p in args.min_peak):
        parser.error(f"--min-peak must be probabilities in [0, 1], got {args.min_peak}")
    if args.rescore:
        print(rescore(args.rescore, args.min_peak, args.min_component))
        return
    if not args.recipes and not args.variants:
        parser.error("nothing to train: give --recipes or --variant")
    if args.budget <= 0:
        parser.error(f"--budget must be positive minutes, got {args.budget}")
    args.out.mkdir(parents=True, exist_ok=True)
    variants = dict(args.variants)
    results = {"budget_min": args.budget, "size": args.size, "patients": args.patients, "seed": args.seed,
               "torch_threads": torch.get_num_threads(), "variants": variants, "datasets": {}}
    for name in args.datasets:
        data = make_dataset(name, args.out / "data", args.size, args.patients)
        results["datasets"][name] = run_dataset(name, data, args.recipes, variants, args.budget * 60, args.out,
                                                args.seed, args.post_rows, args.min_component, args.min_peak[0])
        (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    table = markdown(results, args.budget)
    (args.out / "results.md").write_text(table)
    plot(results, args.out / "val_dice.png")
    print(table)
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}, {args.out / 'val_dice.png'}")


if __name__ == "__main__":
    main()
