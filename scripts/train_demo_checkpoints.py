"""Train the shipped demo models (checkpoints/demo/) on the embedded demo data, reproducibly from a seed.

Stages in WORK, each reused when already finished there (an interrupted run, or a generator trained by hand with
the same commands, continues where it stopped):
  raw/          genseg demo-data WORK/raw --seed SEED
  demo64.h5     genseg prepare WORK/raw --out WORK/demo64.h5 --size 64
  diffusion/    genseg train-diffusion --data WORK/demo64.h5 --config configs/diffusion-cpu-small.yaml
                --out WORK/diffusion --max-steps N   (resumed, with its own config, when it stopped below N)
  seg/          genseg train-seg --data WORK/demo64.h5 --config configs/seg-demo.yaml --seed SEED --out WORK/seg
  synthetic.h5  as many slices as the real training split (DPM-Solver++, 20 steps), evaluated with seg/
Then OUT gets: pipeline/ (GenSegPipeline of diffusion/ + seg/, safetensors; fp16 only when fp32 exceeds --max-mb),
log.csv and the last training sample grid of the generator, synthetic_grid.png, quality.json,
synthetic_quality.png and README.md (how it was made, the numbers).

    python scripts/train_demo_checkpoints.py --work /work/demo-build              # CPU: hours for 2500 steps
    python scripts/train_demo_checkpoints.py --work /tmp/w --out /tmp/o --tiny    # seconds (tests)
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from genseg.config import load_config
from genseg.data.prepared import read_metadata
from genseg.evaluation.synthetic_quality import evaluate_synthetic, markdown_table
from genseg.io import atomic_path
from genseg.pipeline.diffusion import SamplingSettings
from genseg.pipeline.genseg_pipeline import GenSegPipeline
from genseg.runs import CsvLog
from genseg.training.diffusion import DiffusionTrainConfig
from genseg.workflows.demo import (DIFFUSION_CPU_CONFIG, diffusion_checkpoint_step, ensure_demo_data, ensure_diffusion,
                                   ensure_prepared, ensure_segmenter, load_generator, sample_synthetic, seg_demo_config)
from genseg.workflows.pipeline_run import DEMO_PIPELINE

SIZE = 64
MAX_MB = 30.0


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def save_pipeline(pipe: GenSegPipeline, out: Path, max_mb: float) -> tuple[str, float]:
    """Save fp32; when that exceeds `max_mb`, save again in fp16. Returns (precision, MB)."""
    with atomic_path(out, is_dir=True) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        precision, size = "fp32", folder_mb(tmp)
        if size > max_mb:
            shutil.rmtree(tmp)
            pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
            pipe.to(torch.float32)
            precision, size = "fp16", folder_mb(tmp)
    return precision, size


def build(work: Path, out: Path, seed: int = 0, diffusion_steps: int = 2500, tiny: bool = False,
          max_mb: float = MAX_MB) -> dict:
    """Run or reuse every stage (module docstring) and write OUT; returns the numbers in OUT/README.md."""
    started = time.perf_counter()
    patients, slices, raw_size, seg_overrides = (10, 2, 64, {"epochs": 1}) if tiny else (30, 8, 256, {})
    diffusion_overrides = {"max_steps": diffusion_steps, "seed": seed}
    if tiny:
        diffusion_overrides.update(batch_size=4, lr_warmup_steps=1, checkpoint_every_steps=diffusion_steps,
                                   sample_every_steps=diffusion_steps, sample_count=4, sample_steps=2)
    sample_steps = 2 if tiny else 20

    print(f"[1/6] demo data -> {work / 'raw'}")
    raw = ensure_demo_data(work / "raw", patients, slices, raw_size, seed=seed)
    print(f"[2/6] prepared at {SIZE} px -> {work / 'demo64.h5'}")
    data = ensure_prepared(raw, work / "demo64.h5", SIZE)
    run = work / "diffusion"
    print(f"[3/6] generator -> {run} (has {diffusion_checkpoint_step(run)} of {diffusion_steps} steps)")
    diffusion_cfg = load_config(DiffusionTrainConfig, DIFFUSION_CPU_CONFIG, diffusion_overrides)
    ensure_diffusion(diffusion_cfg, data, run)
    print(f"[4/6] segmenter -> {work / 'seg'}")
    seg_metrics = ensure_segmenter(seg_demo_config(seed=seed, **seg_overrides), data, work / "seg")

    print(f"[5/6] pipeline -> {out / 'pipeline'}")
    out.mkdir(parents=True, exist_ok=True)
    pipe = GenSegPipeline.from_runs(run, work / "seg")
    precision, size_mb = save_pipeline(pipe, out / "pipeline", max_mb)
    print(f"      {precision}, {size_mb:.1f} MB")
    shutil.copy2(run / "log.csv", out / "log.csv")
    grids = sorted((run / "samples").glob("step-*.png"))
    for old in out.glob("samples-step-*.png"):
        old.unlink()
    if grids:
        shutil.copy2(grids[-1], out / f"samples-{grids[-1].name}")

    print("[6/6] synthetic set and its quality")
    num = int((read_metadata(data)["split"] == "train").sum())
    synthetic = sample_synthetic(load_generator(out / "pipeline"), work / "synthetic.h5", num,
                                 SamplingSettings(steps=sample_steps, seed=seed), source=out / "pipeline",
                                 grid=out / "synthetic_grid.png")
    quality = evaluate_synthetic(synthetic, data, work / "seg", out_dir=work)
    shutil.copy2(quality["figure"], out / "synthetic_quality.png")
    with atomic_path(out / "quality.json") as tmp:
        tmp.write_text(json.dumps({k: v for k, v in quality.items() if k not in ("figure", "written")}, indent=1))

    rows = [r for r in CsvLog(run / "log.csv").rows() if r.get("loss")]
    diffusion_info = json.loads((run / "run.json").read_text())
    numbers = {"seed": seed, "diffusion_steps": diffusion_checkpoint_step(run),
               "diffusion_final_loss": float(rows[-1]["loss"]) if rows else None,
               "diffusion_train_seconds": float(rows[-1]["seconds"]) if rows and rows[-1].get("seconds") else None,
               "diffusion_parameters": diffusion_info.get("parameters"), "pipeline_precision": precision,
               "pipeline_mb": round(size_mb, 2), "seg_test": seg_metrics["test"], "seg_val": seg_metrics["val"],
               "num_synthetic": num, "sample_steps": sample_steps, "tiny": tiny, "patients": patients,
               "slices_per_patient": slices,
               "seconds_this_call": round(time.perf_counter() - started, 1)}
    with atomic_path(out / "README.md") as tmp:
        tmp.write_text(readme(numbers, quality, grids[-1].name if grids else None).replace(str(work), "WORK"))
    print(f"wrote {out} in {numbers['seconds_this_call']:.0f} s")
    return numbers


def readme(n: dict, quality: dict, grid: str | None) -> str:
    test, cfg = n["seg_test"], seg_demo_config()
    loss = "n/a" if n["diffusion_final_loss"] is None else f"{n['diffusion_final_loss']:.4f}"
    seconds = "n/a" if n["diffusion_train_seconds"] is None else f"{n['diffusion_train_seconds'] / 60:.0f} min"
    params = "n/a" if n["diffusion_parameters"] is None else f"{n['diffusion_parameters'] / 1e6:.1f} M"
    return "\n".join([
        "# Shipped demo models", "",
        ("**Tiny test build: not the shipped models.**\n\n" if n["tiny"] else "") +
        "Made by `python scripts/train_demo_checkpoints.py --work WORK --seed "
        f"{n['seed']} --diffusion-steps {n['diffusion_steps']}{' --tiny' if n['tiny'] else ''}` from the embedded "
        "demo data (`genseg demo-data`, "
        f"{n['patients']} patients x {n['slices_per_patient']} slices, prepared at 64 px; train/val/test by "
        "patient; the generator saw the training split only).", "",
        "- `pipeline/`: a GenSegPipeline folder (`genseg pipeline` and `genseg demo` use it by default, "
        "`genseg serve --pipeline` loads it): generator `unet/` + `scheduler/`, segmenter `segmenter/`; safetensors, "
        f"{n['pipeline_precision']}, {n['pipeline_mb']:.1f} MB.",
        f"- generator: configs/diffusion-cpu-small.yaml (joint image + mask, {params} parameters), "
        f"{n['diffusion_steps']} steps on the training split, final logged loss {loss}, training time {seconds} "
        "as logged; `log.csv` is its training log" +
        (f", `samples-{grid}` its last DPM-Solver++ sample grid." if grid else "."),
        f"- segmenter: configs/seg-demo.yaml (width {cfg.base_channels}, depth {cfg.depth}, {cfg.loss}); "
        f"real test split Dice {test['dice']:.4f}, IoU {test['iou']:.4f}, HD95 "
        f"{'n/a' if test.get('hd95') is None else format(test['hd95'], '.2f')} px "
        f"(validation Dice {n['seg_val']['dice']:.4f}).", "",
        f"## Quality of {n['num_synthetic']} synthetic slices (DPM-Solver++, {n['sample_steps']} steps)", "",
        markdown_table(quality), "",
        "`quality.json` holds every number; `synthetic_grid.png` shows the first 16 slices (generated mask "
        "outlined), `synthetic_quality.png` the histograms.", "",
        "![synthetic slices](synthetic_grid.png)", "", "![quality](synthetic_quality.png)", ""])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="Folder for the stages (reused when finished).")
    parser.add_argument("--out", type=Path, default=DEMO_PIPELINE.parent,
                        help="Where the models go (default: the shipped genseg/demo_models).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--diffusion-steps", type=int, help="Generator optimizer steps (default 2500; --tiny: 2).")
    parser.add_argument("--max-mb", type=float, default=MAX_MB, help="Save fp16 when fp32 would exceed this.")
    parser.add_argument("--tiny", action="store_true", help="Seconds-long test build (few slices, 2 steps, 1 epoch).")
    args = parser.parse_args(argv)
    steps = args.diffusion_steps or (2 if args.tiny else 2500)
    return build(args.work, args.out, args.seed, steps, args.tiny, args.max_mb)


if __name__ == "__main__":
    main()
