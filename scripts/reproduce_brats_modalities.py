"""The paper's per-modality table on BraTS 2020, in one process (scripts/reproduce_brats_modalities.sh runs it).

For each modality (t1, t2, t1ce, flair): `genseg prepare BRATS --format brats --modality M`, then `genseg train-seg`
with configs/seg-brats-modality.yaml (the run scores its test split into metrics.json); finally a markdown table
of test IoU and Dice next to the paper's average IoU (.8203 / .8307 / .7799 / .8312), printed and written to
OUT/brats_modalities.md. Library calls rather than eight CLI processes: the same code, imported once.
Finished steps are reused when the command is repeated (prepared files, runs with metrics.json), an
interrupted run is resumed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from genseg.config import load_config
from genseg.data.prepare import prepare
from genseg.errors import DataError, GensegError
from genseg.runs import SegTrainConfig
from genseg.training.seg import train_segmenter

REPO = Path(__file__).resolve().parents[1]
PAPER_IOU = {"t1": 0.8203, "t2": 0.8307, "t1ce": 0.7799, "flair": 0.8312}  # the paper's average IoU per modality
SMOKE = {"config": REPO / "configs" / "seg-cpu-small.yaml", "size": 32, "epochs": 1, "batch_size": 4}


def reproduce(brats: str | Path, out: str | Path, config: str | Path, size: int = 256, workers: int = 4,
              overrides: dict | None = None, cpu: bool = False) -> str:
    """Prepare, train and test one run per modality under `out`; returns the markdown table."""
    brats, out = Path(brats), Path(out)
    if not brats.is_dir():
        raise DataError(brats, "BraTS folder not found")
    lines = ["| modality | test IoU | test Dice | test slices | paper IoU |", "|---|---|---|---|---|"]
    for modality, paper_iou in PAPER_IOU.items():
        data, run = out / f"brats-{modality}.h5", out / f"seg-{modality}"
        if not data.exists():
            print(prepare(brats, data, size=size, format="brats", modality=modality, workers=workers).summary())
        if not (run / "metrics.json").exists():
            cfg = load_config(SegTrainConfig, config, {**(overrides or {}), "size": size})
            train_segmenter(cfg, data, run, resume=any((run / "checkpoints").glob("step-*")), cpu=cpu)
        test = json.loads((run / "metrics.json").read_text())["test"]
        lines.append(f"| {modality} | {test['iou']:.4f} | {test['dice']:.4f} | {test['num_slices']} | "
                     f"{paper_iou:.4f} |")
    table = "\n".join(lines)
    (out / "brats_modalities.md").write_text(table + "\n")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("brats", help="Folder with BraTS20_Training_XXX/ case folders.")
    parser.add_argument("out", nargs="?", default="brats-modalities", help="Folder for prepared files, runs, table.")
    parser.add_argument("--smoke", action="store_true", help="Tiny: 32 px, the small CPU config, one epoch (CI).")
    parser.add_argument("--config", default=str(REPO / "configs" / "seg-brats-modality.yaml"))
    parser.add_argument("--workers", type=int, default=4, help="Processes that read NIfTI files in prepare.")
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], help="Override the config's precision.")
    parser.add_argument("--cpu", action="store_true", help="Run on CPU even when a GPU is present.")
    args = parser.parse_args()
    overrides = {"mixed_precision": args.mixed_precision}
    config, size, workers = args.config, 256, args.workers
    if args.smoke:
        config, size, workers = SMOKE["config"], SMOKE["size"], 1
        overrides.update(epochs=SMOKE["epochs"], batch_size=SMOKE["batch_size"])
    try:
        print(reproduce(args.brats, args.out, config, size, workers, overrides, args.cpu))
    except GensegError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
