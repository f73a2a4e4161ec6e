"""Benchmark of diffusion sampling and training on this machine (issue 5, Performance), in one run.

Prints seconds per image for DDPM 1000 steps, DDIM 50, DPM-Solver++ 20 and 10 (the same seed, so the same
initial noise for every sampler) and the speed-up over DDPM 1000; with --real REAL.h5 (and --segmenter RUN)
each sampler's images are scored by `evaluate-synthetic` (KID, nearest-neighbour ratio, mask agreement).
With --data DATA.h5 it also measures training images/s of the run's config in fp32 and in bf16 (accelerate).

    genseg demo-data demo/raw --size 64 && genseg prepare demo/raw --out demo/demo64.h5 --size 64
    genseg train-diffusion --data demo/demo64.h5 --config configs/diffusion-cpu-small.yaml --out runs/gen
    PYTHONPATH=$PWD python3 scripts/bench_sampling.py --checkpoint runs/gen --real demo/demo64.h5 --data demo/demo64.h5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from genseg.config import load_config
from genseg.evaluation.synthetic_quality import evaluate_synthetic
from genseg.pipeline.diffusion import SamplingSettings, load_diffusion
from genseg.training.diffusion import DiffusionTrainConfig, train_diffusion
from genseg.workflows.sampling import write_samples

SAMPLERS = (("ddpm", 1000), ("ddim", 50), ("dpmsolver", 20), ("dpmsolver", 10))
QUALITY_KEYS = ("kid_mean", "kid_std", "kid_real_reference", "nn_ratio_median", "near_copy_percent",
                "agreement_dice_mean")


def bench_sampling(run: Path, num: int, batch_size: int, real: Path | None, segmenter: Path | None,
                   tmp: Path) -> list[dict]:
    """Seconds per image of the denoising loop alone (the model is loaded once, outside the timing); with `real`,
    the headline numbers of `evaluate-synthetic` on each sampler's images (same seed = same initial noise)."""
    pipe = load_diffusion(run)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for scheduler, steps in SAMPLERS:
        sampling = SamplingSettings(scheduler=scheduler, steps=steps, batch_size=batch_size)
        start = time.perf_counter()
        result = sampling.sample(pipe, num)
        row = {"sampler": f"{scheduler} {steps}", "s_per_image": (time.perf_counter() - start) / num}
        if real is not None:
            out = write_samples(result, tmp / f"{scheduler}-{steps}.h5", run, sampling.metadata())
            quality = evaluate_synthetic(out, real, segmenter, write=False, out_dir=tmp, progress=False)
            row.update({key: quality[key] for key in QUALITY_KEYS})
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]["s_per_image"]
    for row in rows:
        row["speedup_vs_ddpm1000"] = base / row["s_per_image"]
    return rows


def bench_training(run: Path, data: Path, steps: int, tmp: Path) -> dict:
    """images/s of `steps` optimizer steps of the run's own config, fp32 vs bf16 (fresh runs, same seed)."""
    from accelerate.state import AcceleratorState

    cfg = load_config(DiffusionTrainConfig, run / "config.yaml")
    result = {}
    for precision in ("no", "bf16"):
        AcceleratorState._reset_state(True)
        trial = dataclasses.replace(cfg, mixed_precision=precision, max_steps=steps, lr_warmup_steps=0,
                                    sample_every_steps=0, checkpoint_every_steps=steps)
        metrics = train_diffusion(trial, data, tmp / f"train-{precision}", cpu=True).metrics
        result[metrics["precision"]] = metrics["images_per_s"]
        print(json.dumps({"train_precision": metrics["precision"], "images_per_s": metrics["images_per_s"]}),
              flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="train-diffusion run directory")
    parser.add_argument("--num", type=int, default=8, help="images per sampler")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--real", type=Path, help="real prepared file for the quality numbers")
    parser.add_argument("--segmenter", type=Path, help="train-seg run: KID on its encoder + mask agreement")
    parser.add_argument("--data", type=Path, help="prepared file to time training on (fp32 vs bf16)")
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        report = {"sampling": bench_sampling(args.checkpoint, args.num, args.batch_size, args.real, args.segmenter,
                                             Path(tmp))}
        if args.data is not None:
            report["training_images_per_s"] = bench_training(args.checkpoint, args.data, args.train_steps, Path(tmp))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
