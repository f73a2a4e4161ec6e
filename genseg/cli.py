"""The `genseg` command line: thin click wrappers over library functions that tests call directly."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import __version__
from .errors import GensegError


class _Group(click.Group):
    """Prints genseg's own errors as one clean line (exit 2) instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except GensegError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(2)


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
@click.option("--format", "format_", type=click.Choice(["auto", "figshare", "brats", "folder"]), default="auto",
              show_default=True, help="Source layout; auto tells it from the folder's contents.")
@click.option("--modality", type=click.Choice(["t1", "t1ce", "t2", "flair"]), default="t1ce", show_default=True,
              help="BraTS volume to slice (other formats ignore it).")
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
def prepare(source, out, size, format_, modality, workers, strict, seed, empty_fraction, channels, test_fold):
    """Read a raw dataset folder (Figshare .mat, BraTS NIfTI, BUSI / image+mask folders) into one prepared file."""
    from .data.prepare import prepare as run

    report = run(source, out, size=size, format=format_, modality=modality, workers=workers, strict=strict,
                 seed=seed, test_fold=test_fold, empty_fraction=empty_fraction, channels=int(channels))
    click.echo(report.summary())


@main.group()
def data():
    """Inspect datasets."""


@data.command()
@click.argument("path", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--format", "format_", type=click.Choice(["auto", "figshare", "brats", "folder"]), default="auto",
              show_default=True, help="Raw folders: source layout.")
@click.option("--modality", type=click.Choice(["t1", "t1ce", "t2", "flair"]), default="t1ce", show_default=True,
              help="Raw BraTS folders: volume to slice.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Raw folders: processes that read in parallel.")
def info(path, as_json, format_, modality, workers):
    """Slices, patients, classes, sizes, splits and bad files of a raw folder or a prepared file."""
    import json

    from .data.info import dataset_info, format_info

    result = dataset_info(path, format=format_, modality=modality, workers=workers, progress=not as_json)
    click.echo(json.dumps(result, indent=1) if as_json else format_info(result))


@main.command("demo-data")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--domain", type=click.Choice(["mri", "ultrasound"]), default="mri", show_default=True,
              help="mri: T1-CE brain slices in the Figshare layout; ultrasound: breast-ultrasound images in the "
                   "BUSI layout (benign/, malignant/, normal/ PNGs with masks), a second domain for transfer.")
@click.option("--patients", type=click.IntRange(min=1), default=30, show_default=True,
              help="Number of synthetic patients (heads; ultrasound: images); the classes are spread evenly over them.")
@click.option("--slices-per-patient", type=click.IntRange(min=1), default=8, show_default=True,
              help="MRI only: consecutive axial slices through each head.")
@click.option("--size", type=click.IntRange(min=16), default=256, show_default=True,
              help="Width and height of every slice in pixels.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Random seed: the same arguments always give the same pixels.")
@click.option("--empty-share", type=click.FloatRange(0, 1, max_open=True), default=0.125, show_default=True,
              help="MRI only: share of slices above or below the tumour: all-zero mask, the patient's class label kept.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR, and everything in it, when it is not empty.")
@click.pass_context
def demo_data(ctx, out_dir, domain, patients, slices_per_patient, size, seed, empty_share, force):
    """Write a procedurally generated dataset (no download) to OUT_DIR: T1-CE brain MRI in the Figshare layout
    (1.mat .. N.mat, MATLAB v7.3 struct cjdata, and cvind.mat with patient-wise folds), or with
    --domain ultrasound breast-ultrasound PNGs in the BUSI layout."""
    if domain == "ultrasound":
        from .data.demo_ultrasound import make_ultrasound_dataset

        for name in ("slices_per_patient", "empty_share"):
            if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT:
                raise click.UsageError(f"--{name.replace('_', '-')} applies to --domain mri only")
        s = make_ultrasound_dataset(out_dir, patients, size, seed, force=force)
        classes = ", ".join(f"{name} {n}" for name, n in s["classes"].items())
        click.echo(f"Wrote {s['images']} ultrasound images ({s['size']}x{s['size']}) to {s['out_dir']} "
                   f"in {s['seconds']:.1f} s: {classes}.")
        return
    from .data.demo import make_demo_dataset

    s = make_demo_dataset(out_dir, patients, slices_per_patient, size, seed, empty_share, force=force)
    classes = ", ".join(f"{name} {n}" for name, n in s["classes"].items())
    click.echo(f"Wrote {s['slices']} slices of {s['patients']} patients ({s['size']}x{s['size']}) to {s['out_dir']} "
               f"in {s['seconds']:.1f} s: {classes}; {s['empty_slices']} slices without tumour.")
