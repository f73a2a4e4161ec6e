"""Convergence curve of the diffusion generator (issue 5, items 2 and 5): sample quality against training steps
and minutes, to find how long the CPU-small setup needs to give recognisable labelled slices.

Trains CONFIG on DATA for --steps optimizer steps with a checkpoint every --every steps (keeping all of them), so
the training minutes are not inflated by evaluation. Then, for each checkpoint: its EMA weights are saved as a
diffusers folder, --samples slices are drawn with DPM-Solver++ at --sample-steps steps (fixed seed, the code path
of `genseg sample`), and `evaluate-synthetic` measures them against DATA: KID (next to the real-vs-real
reference), median nearest-neighbour ratio, near-copies, and with --segmenter the mask/segmenter Dice.
Every mode: a mask-conditioned generator is sampled for DATA's training masks (`--masks-from DATA`), an inpaint
generator paints lesions into DATA's training slices (`--inpaint-into DATA`), so their agreement column is the
mask faithfulness (segmenter Dice on the image vs the given mask); `--given FILE` draws them from FILE instead
(a matched generator's own patients) while quality is still measured against DATA.
Prints a markdown table (step, minutes, loss, KID, ...) and writes OUT/convergence/: table.md, curve.json,
kid.png (KID vs training minutes), quality.png (NN ratio and agreement), and per step the synthetic file,
its quality histogram and a sample grid.

    genseg demo-data demo/raw && genseg prepare demo/raw --out demo/demo64.h5 --size 64
    PYTHONPATH=$PWD python3 scripts/convergence_curve.py --data demo/demo64.h5 \
        --config configs/diffusion-cpu-small.yaml --out runs/conv --steps 3000 --every 250 --samples 64 \
        [--segmenter SEG_RUN] [--set batch_size=8 --set lr=0.001]

--eval-only re-measures the checkpoints of an existing --out (e.g. with a segmenter trained later).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml
from diffusers.training_utils import EMAModel

from genseg.config import load_config
from genseg.evaluation.synthetic_quality import evaluate_synthetic
from genseg.io import atomic_path
from genseg.models.diffusion import build_unet
from genseg.pipeline.diffusion import SamplingSettings
from genseg.runs import CsvLog, resolve_config
from genseg.training.diffusion import DiffusionTrainConfig, save_pipeline, train_diffusion
from genseg.training.loop import STATE_FILE, _load_state_dict  # the checkpoint format's own reader
from genseg.viz import plot_curves
from genseg.workflows.sampling import sample_to_file


def ema_weights(checkpoint: Path, cfg: DiffusionTrainConfig):
    """The UNet with the EMA weights stored in a training checkpoint (what train-diffusion would save)."""
    unet = build_unet(cfg.model)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=cfg.ema_power)
    ema.load_state_dict(_load_state_dict(checkpoint / "ema"))
    ema.copy_to(unet.parameters())
    return unet


def loss_at(rows: list[dict], step: int) -> float | None:
    """Mean training loss of the last log row at or before `step` (rows average the steps since the previous)."""
    before = [r for r in rows if r.get("loss") and int(r["step"]) <= step]
    return float(before[-1]["loss"]) if before else None


def measure(out: Path, data: Path, cfg: DiffusionTrainConfig, samples: int, sample_steps: int, seed: int,
            segmenter: str | None, given: Path | None = None) -> list[dict]:
    rows = CsvLog(out / "log.csv").rows()
    checkpoints = sorted(p for p in (out / "checkpoints").glob("step-*") if (p / STATE_FILE).exists())
    if not checkpoints:
        raise SystemExit(f"{out}: no checkpoints to evaluate (train first, or check --out)")
    curve = []
    for checkpoint in checkpoints:
        state = json.loads((checkpoint / STATE_FILE).read_text())
        folder = out / "convergence" / checkpoint.name
        save_pipeline(ema_weights(checkpoint, cfg), cfg, folder)
        started = time.perf_counter()
        inputs = {"mask-conditioned": {"masks_from": given or data},
                  "inpaint": {"inpaint_into": given or data}}.get(cfg.model.mode, {})
        synthetic = sample_to_file(folder, samples, folder / "synthetic.h5",
                                   SamplingSettings(scheduler="dpmsolver", steps=sample_steps, seed=seed),
                                   png_dir=folder / "png", progress=False, **inputs)
        sample_s = (time.perf_counter() - started) / samples
        quality = evaluate_synthetic(synthetic, data, segmenter, out_dir=folder, seed=seed, progress=False)
        curve.append({"step": state["step"], "minutes": round(state["elapsed_s"] / 60, 2),
                      "loss": loss_at(rows, state["step"]), "seconds_per_sample": round(sample_s, 3),
                      **{k: quality[k] for k in ("kid_mean", "kid_std", "kid_real_reference", "nn_ratio_median",
                                                 "near_copy_percent", "agreement_dice_mean", "agreement_real_reference",
                                                 "tumour_slice_share",
                                                 "feature_network")},
                      "lesion_nn_ratio_median": quality.get("lesion_nn_ratio_median"),
                      "lesion_near_copy_percent": quality.get("lesion_near_copy_percent")})
        print(table(curve[-1:], header=not curve[:-1]), flush=True)
    return curve


def table(curve: list[dict], header: bool = True) -> str:
    def fmt(v, scale=1.0):
        return "n/a" if v is None else f"{v * scale:.4g}"

    lines = ["| step | minutes | loss | KID x1000 | real KID x1000 | NN ratio median | near-copies % | "
             "mask/seg Dice (real) | tumour slices syn/real | s/sample |", "|" + "---|" * 10] if header else []
    for r in curve:
        nn, copies = fmt(r["nn_ratio_median"]), f"{r['near_copy_percent']:g}"
        if r.get("lesion_nn_ratio_median") is not None:  # inpaint: the placed lesions' own windows too
            nn += f" (placed lesions {fmt(r['lesion_nn_ratio_median'])})"
            copies += f" (lesions {r['lesion_near_copy_percent']:g})"
        lines.append(f"| {r['step']} | {r['minutes']} | {fmt(r['loss'])} | {fmt(r['kid_mean'], 1e3)} ± "
                     f"{fmt(r['kid_std'], 1e3)} | {fmt(r['kid_real_reference'], 1e3)} | {nn} | {copies} | "
                     f"{fmt(r['agreement_dice_mean'])} ({fmt(r['agreement_real_reference'])}) | "
                     f"{fmt(r['tumour_slice_share']['synthetic'])}/{fmt(r['tumour_slice_share']['real'])} | "
                     f"{r['seconds_per_sample']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="Prepared real dataset at the model's size.")
    parser.add_argument("--config", default="configs/diffusion-cpu-small.yaml", help="Diffusion config YAML.")
    parser.add_argument("--out", required=True, type=Path, help="Run directory (train-diffusion layout).")
    parser.add_argument("--steps", type=int, default=3000, help="Optimizer steps to train.")
    parser.add_argument("--every", type=int, default=250, help="Checkpoint and evaluate every this many steps.")
    parser.add_argument("--samples", type=int, default=64, help="Slices sampled per evaluation.")
    parser.add_argument("--sample-steps", type=int, default=20, help="DPM-Solver++ steps per sample.")
    parser.add_argument("--segmenter", help="train-seg run: KID on its encoder, plus mask/segmenter agreement.")
    parser.add_argument("--seed", type=int, default=0, help="Sampling and KID seed.")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="Override a top-level config key (YAML value), e.g. --set batch_size=8.")
    parser.add_argument("--eval-only", action="store_true", help="Only evaluate the checkpoints already in --out.")
    parser.add_argument("--given", type=Path, help="Prepared file that masks are drawn from (mask-conditioned) or "
                                                   "lesions painted into (inpaint); default --data. E.g. a matched "
                                                   "generator's own patients (the study's kept/F-S.h5).")
    args = parser.parse_args()

    if args.eval_only:
        cfg = load_config(DiffusionTrainConfig, args.out / "config.yaml")
    else:
        overrides = {key: yaml.safe_load(value) for key, value in (s.split("=", 1) for s in args.set)}
        overrides.update(max_steps=args.steps, checkpoint_every_steps=args.every,
                         keep_last=args.steps // args.every + 1)
        cfg = resolve_config(DiffusionTrainConfig, args.config, overrides, args.out, resume=False)
        result = train_diffusion(cfg, args.data, args.out)
        print(f"trained {result.metrics}", flush=True)
    curve = measure(args.out, args.data, cfg, args.samples, args.sample_steps, args.seed, args.segmenter, args.given)

    folder = args.out / "convergence"
    text = table(curve)
    (folder / "table.md").write_text(text + f"\n\nKID features: {curve[0]['feature_network']}\n")
    with atomic_path(folder / "curve.json") as tmp:
        tmp.write_text(json.dumps(curve, indent=1))
    minutes = [r["minutes"] for r in curve]
    kid_series = {"synthetic vs real train": (minutes, [r["kid_mean"] * 1e3 for r in curve])}
    if curve[0]["kid_real_reference"] is not None:
        kid_series["real held-out vs real train"] = (minutes, [r["kid_real_reference"] * 1e3 for r in curve])
    plot_curves(kid_series, folder / "kid.png", "training minutes", "KID x 1000", "KID during training")
    other = {"NN ratio median": (minutes, [r["nn_ratio_median"] for r in curve])}
    if curve[0]["agreement_dice_mean"] is not None:
        other["mask/segmenter Dice"] = (minutes, [r["agreement_dice_mean"] for r in curve])
    plot_curves(other, folder / "quality.png", "training minutes", "value", "Memorisation and agreement")
    print(f"\n{text}\n\nwrote {folder}/table.md, curve.json, kid.png, quality.png")


if __name__ == "__main__":
    main()
