"""The `genseg` command line: thin click wrappers over library functions that tests call directly."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from . import __version__
from .errors import GensegError
from .inference.postprocess import TTA_MODES

MODALITY_CHOICES = ["t1", "t1ce", "t2", "flair", "t1n", "t1c", "t2w", "t2f"]  # genseg.data.brats.MODALITIES


class _Group(click.Group):
    """Prints genseg's own errors as one clean line (exit 2) instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except GensegError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(2)


def _main_process() -> bool:
    """False on every process but the main one of an `accelerate launch` / `torchrun` run (genseg.distributed)."""
    from .distributed import process_state

    return process_state().is_main_process


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="genseg")
def main():
    """Generate synthetic brain-MRI slices with a diffusion model and segment tumours with a U-Net.

    Typical flow: `genseg demo-data` or real data -> `genseg prepare` -> `genseg train-seg` /
    `genseg train-diffusion` -> `genseg sample` -> `genseg pipeline`.
    """


@main.command()
@click.argument("source", type=click.Path(path_type=str))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Prepared HDF5 file to write.")
@click.option("--size", default=256, show_default=True, type=click.IntRange(min=8), help="Side in pixels every slice is resized to.")
@click.option("--format", "format_", type=click.Choice(["auto", "figshare", "brats", "folder", "dicom"]),
              default="auto", show_default=True,
              help="Source layout; auto tells it from the folder's contents. dicom: image series labelled by the "
                   "DICOM-SEG objects that reference them (a folder or a .zip).")
@click.option("--modality", type=click.Choice(MODALITY_CHOICES), default="t1ce", show_default=True,
              help="BraTS volume to slice (other formats ignore it); 2020 and 2023 names both work, whatever the "
                   "release: t1 = t1n, t1ce = t1c, t2 = t2w, flair = t2f.")
@click.option("--target", type=click.Choice(["wt", "tc", "et"]), default="wt", show_default=True,
              help="BraTS tumour region the masks mark: whole tumour, tumour core (necrotic core + enhancing) or "
                   "enhancing tumour (label 4 in 2020/2021 files, 3 in 2023 files, told from the names).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Processes that read and resize in parallel.")
@click.option("--strict", is_flag=True, help="Fail on the first bad file instead of reporting and skipping it.")
@click.option("--seed", default=0, show_default=True,
              help="Seed of the patient-wise split (when there is no cvind.mat) and of BraTS slice sampling.")
@click.option("--empty-fraction", default=0.1, show_default=True, type=click.FloatRange(0, 1),
              help="Share of each BraTS case's tumour-free brain slices to keep.")
@click.option("--channels", type=click.Choice(["1", "3"]), default="1", show_default=True,
              help="Image folders only: 1 = grey (BUSI is grey ultrasound), 3 = keep colour.")
@click.option("--test-fold", default=1, show_default=True, type=click.IntRange(1, 5), help="Fold (1-5) used as the test split; the next is val.")
def prepare(source, out, size, format_, modality, target, workers, strict, seed, empty_fraction, channels, test_fold):
    """Read a raw dataset (Figshare .mat, BraTS 2020-2024 NIfTI, BUSI / image+mask folders, DICOM series with
    DICOM-SEG labels) into one prepared file."""
    from .data.prepare import prepare as run

    report = run(source, out, size=size, format=format_, modality=modality, workers=workers, strict=strict,
                 seed=seed, test_fold=test_fold, empty_fraction=empty_fraction, channels=int(channels), target=target)
    click.echo(report.summary())


@main.group()
def data():
    """Inspect datasets."""


@data.command()
@click.argument("path", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--format", "format_", type=click.Choice(["auto", "figshare", "brats", "folder", "dicom"]),
              default="auto", show_default=True, help="Raw folders: source layout.")
@click.option("--modality", type=click.Choice(MODALITY_CHOICES), default="t1ce", show_default=True,
              help="Raw BraTS folders: volume to slice (t1 = t1n, t1ce = t1c, t2 = t2w, flair = t2f).")
@click.option("--target", type=click.Choice(["wt", "tc", "et"]), default="wt", show_default=True,
              help="Raw BraTS folders: whole tumour, tumour core or enhancing tumour.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Raw folders: processes that read in parallel.")
def info(path, as_json, format_, modality, target, workers):
    """Slices, patients, classes, sizes, splits and bad files of a raw folder or a prepared file; for BraTS also
    which naming (release) each case uses."""
    import json

    from .data.info import dataset_info, format_info

    result = dataset_info(path, format=format_, modality=modality, workers=workers, progress=not as_json,
                          target=target)
    click.echo(json.dumps(result, indent=1) if as_json else format_info(result))


@main.command("demo-data")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--domain", type=click.Choice(["mri", "anatomy", "ultrasound"]), default="mri", show_default=True,
              help="mri: procedural T1-CE brain slices in the Figshare layout; anatomy: a real brain (the EPI scan "
                   "bundled with nibabel) seen as a different patient each time, with inserted tumours of the three "
                   "classes, Figshare layout, data no genseg default was tuned on; ultrasound: breast-ultrasound "
                   "images in the BUSI layout (benign/, malignant/, normal/ PNGs with masks), a second domain for "
                   "transfer.")
@click.option("--patients", type=click.IntRange(min=1), default=30, show_default=True,
              help="Number of synthetic patients (heads; ultrasound: images); the classes are spread evenly over them.")
@click.option("--slices-per-patient", type=click.IntRange(min=1), default=8, show_default=True,
              help="MRI and anatomy: consecutive axial slices through each head (anatomy: at most 19).")
@click.option("--size", type=click.IntRange(min=16), default=256, show_default=True,
              help="Width and height of every slice in pixels.")
@click.option("--seed", type=int, default=None,
              help="Random seed: the same arguments always give the same pixels. Default 0, or the preset's own.")
@click.option("--empty-share", type=click.FloatRange(0, 1, max_open=True), default=0.125, show_default=True,
              help="MRI only: share of slices above or below the tumour: all-zero mask, the patient's class label kept.")
@click.option("--preset", metavar="NAME",
              help="MRI only: a harder dataset, each with its own default seed: skull (half the patients have a "
                   "meningioma pressed flat against the skull, no CSF cleft), low-contrast (tumours 0.3x as far "
                   "from white matter in intensity), small (tumours half the radius), bias (3x coil bias and a "
                   "smooth random intensity inhomogeneity).")
@click.option("--force", is_flag=True, help="Replace OUT_DIR, and everything in it, when it is not empty.")
@click.pass_context
def demo_data(ctx, out_dir, domain, patients, slices_per_patient, size, seed, empty_share, preset, force):
    """Write a generated dataset (no download) to OUT_DIR: T1-CE brain MRI in the Figshare layout (1.mat ..
    N.mat, MATLAB v7.3 struct cjdata, and cvind.mat with patient-wise folds), drawn procedurally or, with
    --domain anatomy, from a real brain with inserted tumours; or with --domain ultrasound breast-ultrasound PNGs
    in the BUSI layout."""
    if domain == "ultrasound":
        from .data.demo_ultrasound import make_ultrasound_dataset

        _refuse_given(ctx, ("slices_per_patient", "empty_share", "preset"), "does not apply to --domain ultrasound")
        s = make_ultrasound_dataset(out_dir, patients, size, seed or 0, force=force)
        classes = ", ".join(f"{name} {n}" for name, n in s["classes"].items())
        click.echo(f"Wrote {s['images']} ultrasound images ({s['size']}x{s['size']}) to {s['out_dir']} "
                   f"in {s['seconds']:.1f} s: {classes}.")
        return
    if domain == "anatomy":
        from .data.demo_anatomy import LEVELS, make_anatomy_dataset

        _refuse_given(ctx, ("empty_share", "preset"), "does not apply to --domain anatomy (its tumour-free slices "
                                                       "are the levels above and below each tumour)")
        if slices_per_patient > len(LEVELS):
            raise click.BadParameter(f"{slices_per_patient}: the anatomy head has {len(LEVELS)} levels",
                                     param_hint="--slices-per-patient")
        s = make_anatomy_dataset(out_dir, patients, slices_per_patient, size, seed or 0, force=force)
    else:
        from .data.demo import make_demo_dataset, preset_settings

        try:
            preset_settings(preset)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--preset") from None
        s = make_demo_dataset(out_dir, patients, slices_per_patient, size, seed, empty_share, force=force,
                              preset=preset)
    classes = ", ".join(f"{name} {n}" for name, n in s["classes"].items())
    click.echo(f"Wrote {s['slices']} slices of {s['patients']} patients ({s['size']}x{s['size']}) to {s['out_dir']} "
               f"in {s['seconds']:.1f} s: {classes}; {s['empty_slices']} slices without tumour.")


def _refuse_given(ctx: click.Context, names: tuple[str, ...], why: str) -> None:
    """UsageError for the first of these options the user gave (a default is never refused)."""
    for name in names:
        if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT:
            raise click.UsageError(f"--{name.replace('_', '-')} {why}")


def _postprocess_options(command):
    """--tta, --min-component and --min-peak for the commands that segment (genseg.inference.postprocess)."""
    command = click.option(
        "--min-peak", type=click.FloatRange(0, 1), default=0.0, show_default=True, metavar="P",
        help="Drop regions of each slice's mask in which the model is nowhere at least P sure (hysteresis "
             "thresholding: a kept region keeps its shape at the threshold); removes faint specks, not small "
             "confident lesions. 0 keeps everything.")(command)
    command = click.option(
        "--min-component", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
        help="Drop connected regions (8-connected) of fewer than N pixels from each slice's mask, at the model's "
             "resolution; 0 keeps everything.")(command)
    return click.option(
        "--tta", type=click.Choice(TTA_MODES), default="none", show_default=True, is_flag=False,
        flag_value="hflip", help="Flip test-time augmentation: average the probabilities over the identity and "
                                 "the left-right flip (--tta alone, hflip) or also the up-down flips (hvflip).")(command)


def _precision_option(command):
    """--precision for the commands that segment."""
    return click.option(
        "--precision", type=click.Choice(["fp32", "int8"]),
        help="fp32: the PyTorch model (or an fp32 .onnx --checkpoint); int8: the model's int8 export "
             "(segmenter-int8.onnx in its model folder, from `genseg export-onnx --int8`) on ONNX Runtime. "
             "Default: fp32 for a run or pipeline folder, the file's own for an .onnx checkpoint.")(command)


REPORT_TO_OPTION = {"type": click.Choice(["none", "tensorboard", "wandb", "mlflow"]),
                    "help": "Also send log rows (losses, metrics, learning rate) and image grids to this tracker "
                            "through accelerate (TensorBoard: RUN_DIR/tracking); log.csv stays the record."}


def _seg_training_options(command):
    """Flags shared by train-seg and cross-validate; each overrides one SegTrainConfig key when given."""
    options = [
        click.option("--data", required=True, type=click.Path(dir_okay=False),
                     help="Prepared real dataset (genseg prepare); validation and test always come from it."),
        click.option("--config", "config_path", type=click.Path(dir_okay=False),
                     help="YAML config file, or a shipped one by name (seg-cpu-small, seg-demo, seg-paper, ...); "
                          "flags below override its keys."),
        click.option("--epochs", type=int, help="Maximum number of epochs."),
        click.option("--time-budget", type=float,
                     help="Train for this many minutes of wall time (validation included); the learning-rate "
                          "schedule runs to its end. The run ends at the first of --epochs, --max-steps and this."),
        click.option("--max-steps", type=int, help="Maximum number of optimizer steps."),
        click.option("--lr-schedule", type=click.Choice(["constant", "cosine", "polynomial", "linear"]),
                     help="Learning-rate schedule over the run (diffusers' shapes; polynomial = nnU-Net's poly 0.9), "
                          "a function of progress towards the first limit."),
        click.option("--warmup-steps", type=int, help="Optimizer steps of linear learning-rate warm-up."),
        click.option("--batch-size", type=int, help="Training batch size."),
        click.option("--lr", type=float, help="Adam learning rate (paper: 1e-3)."),
        click.option("--patience", type=int, help="Stop after this many epochs without a better validation score."),
        click.option("--seed", type=int, help="Seed for weights, data order and augmentation."),
        click.option("--size", type=int, help="Image side; must equal the size the data was prepared at."),
        click.option("--loss", type=click.Choice(["bce", "dice", "bce+dice"]), help="Training loss (paper: bce)."),
        click.option("--monitor", type=click.Choice(["dice", "iou"]), help="Validation score that picks the best model."),
        click.option("--mixed-precision", type=click.Choice(["no", "bf16", "fp16"]),
                     help="Precision via accelerate; the precision that actually ran is printed and logged."),
        click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
                     help="Recompute each U-Net level in the backward pass instead of storing it: less training "
                          "memory for a slower step (scripts/bench_segmenter.py measures both)."),
        click.option("--synthetic", type=click.Path(dir_okay=False),
                     help="Synthetic prepared file (genseg sample) to mix into training."),
        click.option("--synthetic-ratio", type=float,
                     help="Share of each training epoch drawn from --synthetic, 0 (real only) .. 1 (synthetic only). "
                          "Epoch length = real training slices (synthetic slices when 1)."),
        click.option("--real-fraction", type=float, help="Keep this seeded share of real training patients (0, 1]."),
        click.option("--foreground-fraction", type=float,
                     help="Share of each epoch's real slices drawn from slices with tumour, 0 .. 1 (default: as the "
                          "data comes)."),
        click.option("--min-agreement", type=float,
                     help="Keep synthetic slices whose quality_agreement (mask vs segmenter Dice) is at least this."),
        click.option("--min-nn-ratio", type=float,
                     help="Keep synthetic slices whose quality_nn_ratio (distance to nearest real / typical) is at "
                          "least this; drops near-copies."),
        click.option("--init-from", type=click.Path(),
                     help="Fine-tune: start from this trained segmenter (train-seg run directory, its model/, or a "
                          "saved pipeline folder). A different image size needs nothing; 1 <-> 3 input channels "
                          "adapt the first convolution (logged); width/depth must match."),
        click.option("--freeze", type=click.Choice(["none", "encoder", "encoder+bottleneck"]),
                     help="With --init-from: keep these parts at the source's weights (BatchNorm statistics too)."),
        click.option("--report-to", **REPORT_TO_OPTION),
        click.option("--classes/--no-classes", default=None,
                     help="Multi-class: a softmax head over background + the K tumour classes the data records "
                          "(Figshare: meningioma, glioma, pituitary), so one model segments and types the tumour; "
                          "evaluate adds per-class Dice and typing accuracy, segment a NAME_classes mask. Every "
                          "slice with tumour needs a known class. Default: binary, as in the paper."),
        click.option("--cpu", is_flag=True, help="Run on CPU even when a GPU is present."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _seg_config(config_path, out, resume, overrides):
    from .runs import SegTrainConfig, resolve_config

    return resolve_config(SegTrainConfig, config_path, overrides, out, resume)


@main.command("train-seg")
@_seg_training_options
@click.option("--out", type=click.Path(file_okay=False), help="Run directory (default: checkpoints/seg-DATE-TIME).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--fold", "test_fold", type=int, help="Use fold K of the data as test set (val = K % 5 + 1).")
def train_seg(data, config_path, out, resume, synthetic, cpu, **overrides):
    """Train the paper's U-Net on a prepared dataset; best model by validation score into RUN_DIR/model."""
    from .evaluation.evaluate import markdown_table
    from .training.seg import train_segmenter

    cfg = _seg_config(config_path, out, resume, overrides)
    result = train_segmenter(cfg, data, out, resume=resume, synthetic=synthetic, cpu=cpu)
    if "test" in result.metrics:
        click.echo(f"precision: {result.metrics['precision']}; best epoch {result.metrics['best_epoch']}")
        click.echo(markdown_table(result.metrics["test"]))
        click.echo(f"run: {result.run_dir}")


@main.command("cross-validate")
@_seg_training_options
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the fold runs and cv.md.")
@click.option("--folds", help="Comma-separated folds to run (default: all). Finished folds are reused.")
def cross_validate_cmd(data, config_path, out, synthetic, cpu, folds, **overrides):
    """Train and test one model per fold (test = K, val = K % 5 + 1, train = rest) and report mean ± sd."""
    from .training.seg import cross_validate

    cfg = _seg_config(config_path, None, False, overrides)
    chosen = [int(k) for k in folds.split(",")] if folds else None
    summary = cross_validate(cfg, data, out, synthetic=synthetic, folds=chosen, cpu=cpu)
    click.echo(summary["table"])


@main.command()
@click.option("--checkpoint", required=True, type=click.Path(),
              help="train-seg run directory (or its model/), or an `export-onnx` .onnx file.")
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="Prepared dataset to score on.")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True,
              help="The run's own split (its folds when it was trained with --fold).")
@click.option("--fold", type=int, help="Score fold K of the data instead of --split.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (dice, iou, per_class, ...).")
@_precision_option
@_postprocess_options
def evaluate(checkpoint, data, split, fold, as_json, precision, tta, min_component, min_peak):
    """Dice, IoU, HD95 (per class), per-patient Dice and false-positive rate of a trained segmenter."""
    import json

    from .evaluation.evaluate import evaluate as run_evaluate, markdown_table

    result = run_evaluate(checkpoint, data, split=split, fold=fold, progress=not as_json, precision=precision,
                          tta=tta, min_component=min_component, min_peak=min_peak)
    click.echo(json.dumps(result, indent=1) if as_json else markdown_table(result))


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--checkpoint", required=True, type=click.Path(),
              help="train-seg run directory (or its model/), or an `export-onnx` .onnx file.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for masks and overlays.")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Probability at or above which a pixel is tumour (default: the run's threshold, 0.5).")
@click.option("--compile", "compile_", is_flag=True,
              help="torch.compile the network first: a one-off ~40 s, then ~1.4x faster on CPU (for many slices).")
@click.option("--force", is_flag=True, help="Replace output files that already exist.")
@click.option("--dicom-seg", is_flag=True,
              help="DICOM inputs: also write NAME_seg.dcm, a DICOM Segmentation (segment 'tumour', algorithm genseg) "
                   "that references the source series, for PACS and viewers (needs genseg[dicom]).")
@click.option("--save-probabilities", is_flag=True,
              help="Also write the tumour probabilities (0..1) as float32 NAME_probabilities.nii.gz on the "
                   "input's grid (NIfTI has no float16 type).")
@_precision_option
@_postprocess_options
def segment(inputs, checkpoint, out, threshold, compile_, force, dicom_seg, save_probabilities, precision, tta,
            min_component, min_peak):
    """Segment .mat, NIfTI (.nii/.nii.gz), DICOM (files, or folders and .zip files of series), PNG/JPG and .npy
    files: mask + overlay PNGs per slice, and a uint8 NIfTI mask per volume (NIfTI, DICOM series). A multi-class
    model (train-seg --classes) also writes the typed mask: NAME_classes.png (pixel value = class id 0..K) per slice
    and NAME_classes.nii.gz per volume.

    A DICOM folder or zip is grouped by SeriesInstanceUID and each series segmented on its own, named by its
    SeriesDescription (else series number or UID): OUT/exam_T1_AX_z000_mask.png, OUT/exam_T1_AX_mask.nii.gz.
    A series whose slices are unevenly spaced or mix orientations is refused (no resampling), as are files
    without pixel data; the rest of the folder is still segmented.

    Outputs keep the inputs' folders below their common parent folder: a/scan.png and b/scan.png give
    OUT/a/scan_mask.png, OUT/a/scan_overlay.png and OUT/b/scan_..., files of one folder land in OUT itself.
    Inputs whose output names would meet, such as a/scan.png and a/scan.tif, use their whole file name:
    OUT/a/scan.png_mask.png, OUT/a/scan.tif_mask.png. If any output already exists nothing is written, unless
    --force. A file that cannot be read is reported; the others are still segmented (exit status 1 if any failed).

    Runs over several processes when launched with `torchrun --nproc_per_node N -m genseg segment ...` or
    `accelerate launch --multi_gpu --num_processes N -m genseg segment ...`: the inputs are split between them,
    outputs are named and checked once for all, and the masks are the same as a single process's.
    """
    from .inference.files import segment_files

    report = segment_files(inputs, checkpoint, out, threshold, force=force, compile=compile_, dicom_seg=dicom_seg,
                           probabilities=save_probabilities, precision=precision, tta=tta,
                           min_component=min_component, min_peak=min_peak)
    if _main_process():  # one summary for a distributed launch; every process exits with its status
        click.echo(f"wrote {len(report['written'])} files to {out}")
        for failure in report["failed"]:
            click.echo(f"Error: {failure['path']}: {failure['reason']}", err=True)
    if report["failed"]:
        sys.exit(1)


@main.command()
@click.option("--checkpoint", type=click.Path(path_type=str),
              help="Segmentation run directory (or its model/ folder). Default: $AIP_STORAGE_URI (a local path or "
                   "gs://bucket/prefix, the latter with `pip install 'genseg[gcs]'`; a run or a pipeline folder).")
@click.option("--pipeline", "pipeline_dir", type=click.Path(path_type=str),
              help="Saved GenSegPipeline folder (genseg pipeline --save-pipeline): segments like --checkpoint and "
                   "also answers generate requests.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on; 0.0.0.0 inside a container.")
@click.option("--port", type=click.IntRange(1, 65535), default=None,
              help="Port to listen on. Default: $AIP_HTTP_PORT, else 8080.")
@click.option("--max-batch", type=click.IntRange(min=1), default=16, show_default=True,
              help="Most instances (from one or several concurrent requests) run through the model at once.")
@click.option("--max-instances", type=click.IntRange(min=1), default=64, show_default=True,
              help="Most instances one request may carry; more gets a 413 JSON error.")
@click.option("--compile", "compile_", is_flag=True,
              help="torch.compile the network (~1.4-1.6x faster on CPU); health stays 503 while it compiles "
                   "(about a minute) and turns 200 once the first batches have run.")
@click.option("--max-generate", type=click.IntRange(min=1, max=64), default=8, show_default=True,
              help="Most slices one generate request may ask for (responses stay within Vertex AI's size limit).")
@click.option("--generate-queue", type=click.IntRange(min=0), default=2, show_default=True,
              help="Generate requests that may wait behind the running one; more get a 503 with Retry-After, so "
                   "generation never starves segmentation.")
@click.option("--graceful-timeout", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Seconds that SIGTERM waits for requests in flight before cancelling them (keep it under the "
                   "platform's grace period).")
@click.option("--read-timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="Seconds a client has to send a request's headers, and again its body (408 after that).")
@_precision_option
def serve(checkpoint, pipeline_dir, host, port, max_batch, max_instances, compile_, max_generate, generate_queue,
          graceful_timeout, read_timeout, precision):
    """Serve real-time segmentation over HTTP, following the Vertex AI custom-container contract.

    POST {"instances": [{"b64": <PNG/JPEG/.npy/.mat bytes>} or nested lists], "parameters": {"threshold": 0.5,
    "mask_format": "png_b64"|"rle"|"none", "return_probabilities": false}} to $AIP_PREDICT_ROUTE (/predict);
    GET $AIP_HEALTH_ROUTE (/health) answers 503 until the model is loaded, then 200. With a pipeline,
    {"instances": [{}], "parameters": {"generate": N, "class": K, "steps": S, "seed": X}} returns N generated
    slices with their masks. The request schema is at /openapi.json; SECURITY.md says what the server trusts.
    """
    import logging
    import os

    import uvicorn

    from .serve.app import ServeSettings, create_app
    from .serve.guard import HeaderTimeoutH11Protocol

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")  # uvicorn's look

    settings = ServeSettings(max_batch=max_batch, max_instances=max_instances, max_generate=max_generate,
                             generate_queue=generate_queue, body_timeout_s=read_timeout, compile=compile_,
                             precision=precision)
    app = create_app(checkpoint, pipeline_path=pipeline_dir, settings=settings)
    port = port or int(os.environ.get("AIP_HTTP_PORT", 8080))
    protocol = type("Protocol", (HeaderTimeoutH11Protocol,), {"header_timeout": read_timeout})
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False, http=protocol,
                timeout_graceful_shutdown=graceful_timeout, h11_max_incomplete_event_size=64 * 1024)


@main.command("export-onnx")
@click.option("--checkpoint", required=True, type=click.Path(path_type=str),
              help="Segmentation run directory (or its model/ folder, or a saved pipeline folder).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=str),
              help="ONNX file to write (for ONNX Runtime, Triton and friends). Default: segmenter-fp32.onnx or "
                   "segmenter-int8.onnx in the model folder, where `--precision int8` finds it.")
@click.option("--opset", type=click.IntRange(min=11), default=18, show_default=True, help="ONNX opset version.")
@click.option("--int8", is_flag=True,
              help="Quantise to int8 (ONNX Runtime, static, QDQ, per-channel weights) and check its accuracy.")
@click.option("--calibration", type=click.Path(dir_okay=False, path_type=str),
              help="With --int8: the prepared file the model was trained on (default: the run's own, from "
                   "run.json). A few dozen slices of its training split calibrate; its validation and test splits "
                   "check the int8 masks against fp32's.")
@click.option("--calibration-slices", type=click.IntRange(min=1), default=32, show_default=True,
              help="With --int8: training slices that calibrate the activation ranges.")
@click.option("--max-dice-change", type=click.FloatRange(min=0), default=0.005, show_default=True,
              help="With --int8: refuse (write nothing) when the validation or test Dice moves by more than this.")
@click.option("--int8-format", type=click.Choice(["auto", "u8u8", "u8s8"]), default="auto", show_default=True,
              help="With --int8: weight format. auto = u8s8 (int8 weights, fastest, uses VNNI/AMX) on a CPU with "
                   "VNNI, else u8u8 (uint8 weights, exact on every CPU). A u8s8 file is refused on a CPU without "
                   "VNNI, where ONNX Runtime's u8s8 sums saturate.")
def export_onnx_cmd(checkpoint, out, opset, int8, calibration, calibration_slices, max_dice_change, int8_format):
    """Export a trained segmenter to ONNX: input `image` (N, C, S, S) in [0, 1] preprocessed as `genseg segment`
    does, output `probability` (N, 1, S, S); the batch dimension is dynamic. With --int8 the file is quantised,
    and the Dice numbers of the accuracy check are printed and stored in its metadata."""
    from .workflows.export import export_onnx, guard_summary

    if not int8 and calibration:
        raise click.UsageError("--calibration applies to --int8 exports only")
    result = export_onnx(checkpoint, out, opset=opset, int8=int8, calibration=calibration,
                         calibration_slices=calibration_slices, max_dice_change=max_dice_change,
                         weight_format=int8_format)
    path = Path(result["path"])
    if int8:
        click.echo(f"int8 ({result['quantisation']['weight_format']}) accuracy check: "
                   f"{guard_summary(result['guard']['splits'])}")
    click.echo(f"Wrote {path} ({result['precision']}, {path.stat().st_size / 1e6:.1f} MB)")


# --- diffusion ---


@main.command("train-diffusion")
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="Prepared real dataset (genseg prepare).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="YAML config file, or a shipped one by name (diffusion-cpu-small, diffusion-paper); flags override it.")
@click.option("--out", type=click.Path(file_okay=False), help="Run directory (default: checkpoints/diffusion-DATE-TIME).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint (step count kept).")
@click.option("--max-steps", type=int, help="Total optimizer steps (a resumed run trains up to this many).")
@click.option("--batch-size", type=int, help="Training batch size per process.")
@click.option("--lr", type=float, help="Peak AdamW learning rate (after the warm-up).")
@click.option("--seed", type=int, help="Seed for weights, noise and data order.")
@click.option("--real-fraction", type=float,
              help="Learn from a seeded share of the training patients (0, 1]: with the same --seed, the patients "
                   "`train-seg --real-fraction` keeps, so generator and segmenter see the same real data.")
@click.option("--mixed-precision", type=click.Choice(["no", "bf16", "fp16"]),
              help="Precision via accelerate; measure bf16 on CPU first (it was ~20x slower here).")
@click.option("--init-from", type=click.Path(),
              help="Start from a trained generator (train-diffusion run or saved pipeline folder), e.g. to adapt "
                   "it to a new domain; its channel layout and classes must match this run's.")
@click.option("--report-to", **REPORT_TO_OPTION)
@click.option("--cpu", is_flag=True, help="Run on CPU even when a GPU is present.")
def train_diffusion_cmd(data, config_path, out, resume, cpu, **overrides):
    """Train a DDPM (diffusers UNet2DModel) on prepared slices; RUN_DIR becomes a diffusers pipeline folder
    (model_index.json, unet/ with EMA weights, scheduler/) plus log.csv, checkpoints/ and samples/ grids."""
    from .runs import resolve_config
    from .training.diffusion import DiffusionTrainConfig, train_diffusion

    cfg = resolve_config(DiffusionTrainConfig, config_path, overrides, out, resume)
    result = train_diffusion(cfg, data, out, resume=resume, cpu=cpu)
    if result.main_process:
        click.echo(f"{result.metrics}\nrun: {result.run_dir}")


def _given_options(command):
    """What a conditioned generator is given, shared by `sample` and `pipeline`: --masks-from, --mask-augment
    (parsed into a tuple) and --per-mask for mask-conditioned models, --inpaint-into and --erase for inpaint ones."""
    options = [
        click.option("--masks-from", type=click.Path(dir_okay=False),
                     help="Mask-conditioned models: prepared file (real, or a joint model's sample) whose "
                          "training-split masks the images are generated for; its size must be the model's, its "
                          "masks 0/1. The masks come back unchanged beside the images (mask_source: given)."),
        click.option("--mask-augment", metavar="LIST",
                     help="With --masks-from: transform each drawn mask (nearest, seeded; kept inside the image and "
                          "on the head of the slice it comes from), a comma list of flip,shift,rotate,scale,elastic; "
                          "without it the masks are used unchanged."),
        click.option("--per-mask", default=1, show_default=True, type=int,
                     help="With --masks-from: images generated for each mask (K images share one mask, new noise "
                          "each)."),
        click.option("--inpaint-into", type=click.Path(dir_okay=False),
                     help="Inpaint models: real prepared file (the model's slice size) whose training slices each get "
                          "a real lesion, turned, zoomed and moved to a random place inside the head, painted in; "
                          "pixels outside the repainted region stay the real slice's. --num: slices drawn."),
        click.option("--erase", is_flag=True,
                     help="With --inpaint-into: paint each drawn slice's lesion over with tissue instead (empty "
                          "masks)."),
    ]

    @functools.wraps(command)
    def with_given(masks_from, mask_augment, inpaint_into, erase, **rest):
        from .workflows.sampling import parse_mask_augment

        augment = parse_mask_augment(mask_augment)
        if augment and masks_from is None:
            raise click.UsageError("--mask-augment transforms the masks of --masks-from; give --masks-from too")
        if erase and inpaint_into is None:
            raise click.UsageError("--erase erases the lesions of --inpaint-into's slices; give --inpaint-into too")
        return command(masks_from=masks_from, mask_augment=augment, inpaint_into=inpaint_into, erase=erase, **rest)

    for option in reversed(options):
        with_given = option(with_given)
    return with_given


def _generation_options(command):
    """Sampler options shared by the commands that generate slices, handed to the command as one
    `sampling: SamplingSettings` instead of six parameters."""
    options = [
        click.option("--scheduler", default="dpmsolver", show_default=True,
                     help="Sampler: ddpm, ddim, dpmsolver (DPM-Solver++) or pndm, sharing the trained noise schedule."),
        click.option("--steps", default=20, show_default=True, type=int, help="Denoising steps (ddpm: up to 1000)."),
        click.option("--class", "class_label", type=int, help="Tumour class to generate (class-conditional models only)."),
        click.option("--guidance", default=1.0, show_default=True, type=float,
                     help="Classifier-free guidance scale with --class (1 = none)."),
        click.option("--seed", default=0, show_default=True, type=int, help="Same seed, same slices."),
        click.option("--batch-size", default=16, show_default=True, type=int, help="Slices denoised at once."),
    ]

    @functools.wraps(command)
    def with_sampling(scheduler, steps, class_label, guidance, seed, batch_size, **rest):
        from .pipeline.diffusion import SamplingSettings

        return command(sampling=SamplingSettings(scheduler=scheduler, steps=steps, class_label=class_label,
                                                 guidance=guidance, seed=seed, batch_size=batch_size), **rest)

    for option in reversed(options):
        with_sampling = option(with_sampling)
    return with_sampling


@main.command()
@click.option("--checkpoint", required=True, type=click.Path(), help="train-diffusion run directory.")
@click.option("-n", "--num", type=int,
              help="Number of slices to generate (-n under torchrun, whose own parser refuses --num as ambiguous); "
                   "with --masks-from: number of masks drawn (seeded by --seed) from the file's training split "
                   "(default: all of them), each giving --per-mask slices.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Synthetic prepared HDF5 file to write (same format as `genseg prepare`).")
@_generation_options
@_given_options
@click.option("--png-dir", type=click.Path(file_okay=False), help="Also write PNGs (image + _mask) and grid.png here.")
@click.option("--save-intermediates", is_flag=True, help="Also write OUT_reverse.png: the reverse (denoising) process.")
def sample(checkpoint, num, out, sampling, masks_from, mask_augment, per_mask, inpaint_into, erase, png_dir,
           save_intermediates):
    """Generate synthetic slices (with tumour masks in joint mode) from a trained diffusion run.

    A mask-conditioned run (model.mode: mask-conditioned) generates images for given masks instead: `--masks-from
    DATA.h5 [--num N] [--per-mask K] [--mask-augment flip,shift,rotate,scale,elastic]` writes N*K slices whose
    masks are exactly the (transformed) given ones. An inpaint run (model.mode: inpaint) repaints real slices:
    `--inpaint-into DATA.h5 [--num N] [--erase]` places a real lesion inside the head of each drawn training slice
    (or erases its lesion); slices where that cannot be done are skipped and counted. Everything is checked
    before sampling; nothing is written on an error.

    Runs over several processes (GPUs, machines, or CPU processes) when launched with `torchrun
    --nproc_per_node N -m genseg sample -n NUM ...` or `accelerate launch --multi_gpu --num_processes N -m genseg
    sample ...`: each process denoises whole batches of --batch-size, and the main process writes the one file,
    the same as a single process's (masks bit for bit; images as far as every process's kernels round alike:
    README). If any process fails, no file is written.
    """
    from .data.prepared import read_metadata
    from .workflows.sampling import sample_to_file

    path = sample_to_file(checkpoint, num, out, sampling, masks_from=masks_from, mask_augment=mask_augment,
                          per_mask=per_mask, inpaint_into=inpaint_into, erase=erase, png_dir=png_dir,
                          save_intermediates=save_intermediates)
    if path is not None:  # None: a process other than the main one of a distributed launch
        meta = read_metadata(path)
        info = meta["attrs"]["metadata"]
        about = ""
        if info.get("mask_rows") is not None:
            about = f" ({len(info['mask_rows'])} given masks x {per_mask})"
        elif info.get("inpaint_into"):
            skipped = f"; {info['skipped']} skipped: {info['skip_reason']}" if info["skipped"] else ""
            about = f" (real slices, lesions {'erased' if erase else 'placed'}{skipped})"
        click.echo(f"wrote {meta['num_slices']} synthetic slices{about} to {path}")


@main.command("forward-process")
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="Prepared dataset.")
@click.option("--index", default=0, show_default=True, type=int, help="Row of the slice to noise.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG to write.")
@click.option("--checkpoint", type=click.Path(), help="Use this diffusion run's noise schedule.")
@click.option("--beta-schedule", type=click.Choice(["linear", "scaled_linear", "squaredcos_cap_v2"]),
              default="squaredcos_cap_v2", show_default=True, help="Schedule when no --checkpoint is given.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the noise.")
def forward_process(data, index, out, checkpoint, beta_schedule, seed):
    """Figure of the forward (noising) process: x_t of one slice at several t, from clean to pure noise."""
    from .workflows.sampling import forward_process_figure

    click.echo(f"wrote {forward_process_figure(data, index, out, checkpoint, beta_schedule, seed=seed)}")


# --- pipeline ---


@main.command()
@click.option("--pipeline", "pipeline_dir", type=click.Path(file_okay=False),
              help="Saved GenSegPipeline folder (unet/, scheduler/, segmenter/).")
@click.option("--diffusion", type=click.Path(file_okay=False), help="train-diffusion run directory (with --segmenter).")
@click.option("--segmenter", type=click.Path(file_okay=False), help="train-seg run directory (with --diffusion).")
@click.option("--num", default=16, show_default=True, type=int,
              help="Slices to generate and segment; with --masks-from: masks drawn, each giving --per-mask slices.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (must not exist, or --force).")
@_generation_options
@_given_options
@click.option("--input", "inputs", multiple=True, type=click.Path(dir_okay=False),
              help="Segment real files (.mat, NIfTI, DICOM, PNG/JPG) with the pipeline's segmenter instead of "
                   "generating: --input a.mat b.nii.gz, or --input repeated.")
@click.option("--save-pipeline", type=click.Path(file_okay=False),
              help="Also save the assembled pipeline as one diffusers folder here (reload with --pipeline).")
@click.option("--force", is_flag=True,
              help="Replace an existing --out folder (with --input: existing output files).")
@click.argument("more_inputs", nargs=-1, type=click.Path(dir_okay=False), metavar="[--input FILE [FILE]...]")
@_precision_option
@_postprocess_options
def pipeline(pipeline_dir, diffusion, segmenter, num, out, sampling, masks_from, mask_augment, per_mask, inpaint_into,
             erase, inputs, save_pipeline, force, more_inputs, precision, tta, min_component, min_peak):
    """Generate slices with the diffusion model and segment them, end to end.

    Writes OUT/slices/NNNN.png and NNNN_overlay.png (predicted mask green; the generator's mask outlined red),
    OUT/contact_sheet.png, OUT/summary.json (per slice: tumour area, mean probability, Dice of the generator's
    mask vs the predicted one) and OUT/report.md. As with `genseg sample`, a mask-conditioned generator takes
    --masks-from DATA.h5 (images generated for those masks) and an inpaint generator --inpaint-into DATA.h5 [--erase]
    (real slices with a lesion painted in, or erased); the Dice then measures mask faithfulness. With no model
    options it uses the shipped demo pipeline. With --input it segments the real files named after it
    instead.
    """
    from .io import atomic_path
    from .workflows.pipeline_run import PIPELINE_SOURCE, load_pipeline, run_pipeline, segment_inputs
    from .workflows.sampling import check_given_options

    if more_inputs and not inputs:  # click gives an option one value; the files after the first come as arguments
        raise click.UsageError(f"Got unexpected extra argument(s) ({' '.join(more_inputs)}); real files to "
                               f"segment go after --input")
    inputs = (*inputs, *more_inputs)
    if inputs and (masks_from or per_mask != 1 or inpaint_into):
        raise click.UsageError("--masks-from, --per-mask and --inpaint-into are for generating; --input segments "
                               "real files")
    pipe = load_pipeline(pipeline_dir, diffusion, segmenter, precision)
    if not inputs:  # before --save-pipeline writes anything
        check_given_options(pipe, PIPELINE_SOURCE, masks_from=masks_from, mask_augment=mask_augment,
                            per_mask=per_mask, inpaint_into=inpaint_into, erase=erase)
    if save_pipeline:
        with atomic_path(save_pipeline, is_dir=True) as tmp:
            pipe.save_pretrained(tmp)
        click.echo(f"saved the pipeline to {save_pipeline}")
    if inputs:
        report = segment_inputs(pipe, inputs, out, force, tta=tta, min_component=min_component, min_peak=min_peak)
        click.echo(f"segmented {len(report['segmented'])} file(s) into {out}")
        for failure in report["failed"]:
            click.echo(f"skipped {failure['path']}: {failure['reason']}", err=True)
        return
    summary = run_pipeline(pipe, out, num=num, sampling=sampling, masks_from=masks_from, mask_augment=mask_augment,
                           per_mask=per_mask, inpaint_into=inpaint_into, erase=erase, force=force, tta=tta,
                           min_component=min_component, min_peak=min_peak)
    click.echo(f"{summary['num_slices']} slices, {summary['slices_with_predicted_tumour']} with a predicted tumour; "
               f"wrote {out}/report.md")


# --- synthetic quality ---


@main.command("evaluate-synthetic")
@click.argument("synthetic", type=click.Path(dir_okay=False, path_type=str))
@click.option("--real", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="The real prepared dataset the generator was trained on (its split 'train' is the reference).")
@click.option("--segmenter", type=click.Path(path_type=str),
              help="train-seg run directory: its encoder gives the KID features and its predictions the mask/image "
                   "agreement. Without it KID uses a fixed random CNN (a weaker proxy) and agreement is skipped.")
@click.option("--near-copy-ratio", type=click.FloatRange(0, min_open=True), default=0.5, show_default=True,
              help="Flag a synthetic slice as a near-copy when its nearest-neighbour ratio is below this.")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=str),
              help="Folder for the histogram PNG (default: next to SYNTHETIC).")
@click.option("--no-write", is_flag=True, help="Only report; leave SYNTHETIC unchanged.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for KID subsets and the random CNN.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def evaluate_synthetic_cmd(synthetic, real, segmenter, near_copy_ratio, out_dir, no_write, seed, as_json):
    """Quality of a synthetic dataset: near-copies of real training slices (nearest-neighbour ratio), KID against
    real data next to the real-vs-real KID (of whole slices, and of windows around the lesions alone: for an
    inpaint set the placed lesions), and with --segmenter the Dice between generated masks and the
    segmenter's predictions, plus tumour-size and class histograms. Unless --no-write, the per-slice
    quality_nn_ratio / quality_agreement that `train-seg --min-nn-ratio / --min-agreement` filter on are written
    into SYNTHETIC (an edited copy atomically replaces it)."""
    import json

    from .evaluation.synthetic_quality import evaluate_synthetic, markdown_table

    result = evaluate_synthetic(synthetic, real, segmenter, near_copy_ratio=near_copy_ratio, seed=seed,
                                write=not no_write, out_dir=out_dir, progress=not as_json)
    click.echo(json.dumps(result, indent=1) if as_json else markdown_table(result))


# --- demo ---


@main.command()
@click.option("--out", default="demo", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Demo folder; a finished stage in it is reused when the command is repeated.")
@click.option("--pipeline", "pipeline_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Generator to sample from: a saved pipeline folder or a train-diffusion run "
                   "(default: the shipped checkpoints/demo/pipeline).")
@click.option("--from-scratch", is_flag=True,
              help="Train the generator first (configs/diffusion-cpu-small.yaml); the time it takes is measured "
                   "and printed before it starts (tens of minutes to hours on CPU).")
@click.option("--diffusion-steps", type=click.IntRange(min=1),
              help="With --from-scratch: generator training steps (default: the config's max_steps).")
@click.option("--force", is_flag=True, help="Redo every stage (deletes the previous demo folder's contents).")
@click.option("--tiny", is_flag=True, help="Smoke mode for CI: few patients, one epoch, two sampling steps; "
                                           "same stages, meaningless numbers.")
def demo(out, pipeline_dir, from_scratch, diffusion_steps, force, tiny):
    """The first command to run: build the demo data, sample a synthetic set from the shipped generator, train
    a real-only and a mixed (synthetic ratio 0.5) segmenter, compare them on the real test split and run the
    generate-then-segment pipeline. Ends with OUT/report.md and PNGs. Prints a plan with times measured on this
    machine first; within 10 minutes on 2 idle CPU cores, and on a GPU it uses the GPU."""
    from .workflows.demo import run_demo

    run_demo(out, pipeline=pipeline_dir, from_scratch=from_scratch, diffusion_steps=diffusion_steps, force=force,
             tiny=tiny, echo=click.echo)
