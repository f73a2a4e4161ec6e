"""`genseg pipeline`: load a GenSegPipeline, generate and segment N slices (or segment real files), and write
what a person looks at — PNGs, overlays, a contact sheet — next to `summary.json` and a short report."""

from __future__ import annotations

import importlib.resources
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import ConfigError, GensegError
from ..evaluation.metrics import dice_iou
from ..inference.postprocess import postprocessed
from ..inference.segmenter import load_segmenter
from ..io import atomic_path
from ..pipeline.diffusion import SamplingSettings, model_layout
from ..pipeline.genseg_pipeline import GenSegOutput, GenSegPipeline
from ..viz import MASK_COLOR, PREDICTION_COLOR, overlay, save_grid, save_png

DEMO_PIPELINE = Path(str(importlib.resources.files("genseg") / "demo_models" / "pipeline"))  # package data
CONTACT_SHEET_MAX = 64  # slices on the contact sheet; every slice still gets its own PNGs
CONTACT_SHEET_COLUMNS = 8
CAPTION_LEGEND = ("Contact sheet captions: slice number, predicted tumour share of the slice and, for generated "
                  "slices, the Dice of the generated vs the predicted mask.")


def load_pipeline(pipeline: str | Path | None = None, diffusion: str | Path | None = None,
                  segmenter: str | Path | None = None, precision: str | None = None) -> GenSegPipeline:
    """A saved pipeline folder, or a diffusion run + a segmentation run, or (given nothing) the shipped demo;
    with precision "int8" it segments with the segmenter's int8 export (`genseg export-onnx --int8`)."""
    if pipeline is not None:
        if diffusion is not None or segmenter is not None:
            raise ConfigError("give either --pipeline DIR or --diffusion RUN_DIR with --segmenter RUN_DIR, not both")
        pipe, source = GenSegPipeline.load(pipeline), pipeline
    elif diffusion is None and segmenter is None:
        if not (DEMO_PIPELINE / "model_index.json").is_file():
            raise ConfigError(f"no models given and no shipped demo pipeline at {DEMO_PIPELINE}; pass --pipeline DIR "
                              f"or --diffusion RUN_DIR --segmenter RUN_DIR")
        pipe, source = GenSegPipeline.load(DEMO_PIPELINE), DEMO_PIPELINE
    elif diffusion is None or segmenter is None:
        raise ConfigError("--diffusion and --segmenter go together (or pass --pipeline DIR)")
    else:
        pipe, source = GenSegPipeline.from_runs(diffusion, segmenter), segmenter
    if precision == "int8":
        pipe.use_predictor(load_segmenter(source, precision="int8"))
    return pipe


def slice_summaries(result: GenSegOutput) -> list[dict[str, Any]]:
    """Per slice: predicted tumour area and share, mean probability inside the predicted mask, and in joint
    mode the generated mask's area and its Dice with the prediction (both empty = 1, as everywhere in genseg)."""
    predicted = result.predicted_masks.astype(bool)
    area = predicted.reshape(len(predicted), -1).sum(1)
    rows = []
    for i in range(len(predicted)):
        inside = result.probabilities[i][predicted[i]]
        row = {"index": i, "tumour_area_px": int(area[i]), "tumour_share": float(area[i] / predicted[i].size),
               "mean_probability": float(inside.mean()) if inside.size else 0.0}
        if result.labels is not None:
            row["class"] = int(result.labels[i])
        rows.append(row)
    if result.generated_masks is not None:
        dice, _ = dice_iou(result.predicted_masks, result.generated_masks)
        for row, generated, d in zip(rows, result.generated_masks, dice):
            row["generated_area_px"] = int(generated.sum())
            row["dice_generated_vs_predicted"] = float(d)
    return rows


def write_pipeline_outputs(result: GenSegOutput, out: str | Path, settings: dict[str, Any], force: bool = False
                           ) -> dict[str, Any]:
    """Write slices/NNNN.png, NNNN_overlay.png (predicted mask green, generated mask red in joint mode),
    contact_sheet.png, summary.json and report.md into `out`, all at once (a folder that appears complete)."""
    out = Path(out)
    if out.exists() and not force:
        raise GensegError(f"{out}: already exists (a previous result?); pass --force to replace it or choose --out")
    rows = slice_summaries(result)
    summary = {"settings": settings, "num_slices": len(rows), "slices": rows, **_aggregate(rows)}
    with atomic_path(out, is_dir=True) as tmp:
        (tmp / "slices").mkdir()
        tiles = []
        for i, image in enumerate(result.images):
            tile = overlay(image, result.predicted_masks[i], PREDICTION_COLOR)
            if result.generated_masks is not None:
                tile = overlay(tile, result.generated_masks[i], MASK_COLOR, alpha=0.0)  # outline only
            save_png(image, tmp / "slices" / f"{i:04d}.png")
            save_png(tile, tmp / "slices" / f"{i:04d}_overlay.png")
            if i < CONTACT_SHEET_MAX:
                tiles.append(tile)
        titles = [caption(row) for row in rows[:CONTACT_SHEET_MAX]]
        save_grid(tiles, tmp / "contact_sheet.png", ncols=CONTACT_SHEET_COLUMNS, titles=titles)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        (tmp / "report.md").write_text(_report(summary, result.generated_masks is not None))
    return summary


def caption(row: dict[str, Any]) -> str:
    """A slice's contact-sheet caption (CAPTION_LEGEND says how to read it)."""
    text = f"#{row['index']} {100 * row['tumour_share']:.1f}%"
    if "dice_generated_vs_predicted" in row:
        text += f" Dice {row['dice_generated_vs_predicted']:.2f}"
    return text


def _aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    with_tumour = [r for r in rows if r["tumour_area_px"]]
    totals = {"slices_with_predicted_tumour": len(with_tumour),
              "mean_tumour_share": float(np.mean([r["tumour_share"] for r in rows]))}
    if rows and "dice_generated_vs_predicted" in rows[0]:
        totals["mean_dice_generated_vs_predicted"] = float(np.mean([r["dice_generated_vs_predicted"] for r in rows]))
    return totals


def _report(summary: dict[str, Any], joint: bool) -> str:
    s = summary["settings"]
    lines = [
        "# genseg pipeline report", "",
        f"Generated {summary['num_slices']} slices with the {s['scheduler']} scheduler in {s['steps']} steps "
        f"(seed {s['seed']}, class {s['class']}, guidance {s['guidance']}) and segmented them "
        f"(threshold {s['threshold']}). Wall time {s['seconds']:.1f} s.",
    ]
    if s.get("size_note"):
        lines.append(f"Note: {s['size_note']}.")
    lines += ["", f"- slices with a predicted tumour: {summary['slices_with_predicted_tumour']} of {summary['num_slices']}",
              f"- mean predicted tumour share: {100 * summary['mean_tumour_share']:.2f} %"]
    if joint:
        lines.append(f"- mean Dice of generated vs predicted mask: {summary['mean_dice_generated_vs_predicted']:.3f} "
                     "(how well the segmenter agrees with the mask the generator drew)")
    lines += ["", "![contact sheet](contact_sheet.png)", "",
              "Overlays: predicted mask tinted and outlined in green" + ("; generated mask outlined in red." if joint else "."),
              CAPTION_LEGEND, ""]
    return "\n".join(lines)


def check_generates_freely(pipe: GenSegPipeline) -> None:
    """`genseg pipeline` generates without masks or slices: mask-conditioned and inpaint generators are refused
    (ConfigError)."""
    needs = {"mask-conditioned": ("is mask-conditioned: it needs masks", "--masks-from"),
             "inpaint": ("is an inpaint model: it repaints given slices", "--inpaint-into")}
    mode = model_layout(pipe.unet)[1]
    if mode in needs:
        what, option = needs[mode]
        raise ConfigError(f"the pipeline's generator {what}, which `genseg pipeline` does not take; generate with "
                          f"`genseg sample --checkpoint DIR {option} DATA.h5`, then segment or score the file "
                          f"(`genseg evaluate-synthetic --segmenter RUN`)")


def run_pipeline(pipe: GenSegPipeline, out: str | Path, *, num: int, sampling: SamplingSettings = SamplingSettings(),
                 force: bool = False, tta: str = "none", min_component: int = 0) -> dict[str, Any]:
    """Generate `num` slices with the chosen sampler, segment them, and write the outputs folder. `tta` and
    `min_component` (genseg.inference.postprocess) become the pipeline's predictor from here on."""
    check_generates_freely(pipe)  # before anything is written
    pipe.use_predictor(postprocessed(pipe.predictor(), tta, min_component))
    if num < 1:
        raise ConfigError(f"--num must be at least 1, got {num}")
    if Path(out).exists() and not force:  # before spending minutes on sampling
        raise GensegError(f"{out}: already exists (a previous result?); pass --force to replace it or choose --out")
    started = time.perf_counter()
    result = sampling.sample(pipe, num)
    settings = {**sampling.metadata(), "threshold": pipe.config.threshold, "tta": tta, "min_component": min_component,
                "size_note": pipe.size_note, "seconds": time.perf_counter() - started}
    return write_pipeline_outputs(result, out, settings, force=force)


def segment_inputs(pipe: GenSegPipeline, inputs: Sequence[str | Path], out: str | Path,
                   force: bool = False, tta: str = "none", min_component: int = 0) -> dict[str, Any]:
    """`--input`: real files segmented by the pipeline's own segmenter, with `genseg segment`'s outputs (and its
    refusal to replace existing ones unless `force`) and post-processing."""
    from ..inference.files import segment_files

    return segment_files(inputs, pipe.predictor(), out, force=force, tta=tta, min_component=min_component)
