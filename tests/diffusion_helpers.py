"""Tiny diffusion parts for tests: a generator trained a few steps on phantoms and a saved GenSegPipeline, in
seconds. The contracts under test (file layouts, seeds, shapes, errors) do not depend on what the weights learned."""

from __future__ import annotations

from pathlib import Path

from genseg.config import config_from_dict
from genseg.pipeline.genseg_pipeline import GenSegPipeline
from genseg.serve.testing import make_untrained_segmenter
from genseg.training.diffusion import DiffusionTrainConfig, train_diffusion
from seg_helpers import write_phantoms

TINY_MODEL = {"sample_size": 16, "block_out_channels": [16, 32], "norm_num_groups": 8}


def quiet(pipe):
    """`pipe` with diffusers' progress bar off, for calls on one line."""
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_config(model: dict | None = None, **values) -> DiffusionTrainConfig:
    """A 16 px joint generator config (model keys override TINY_MODEL), trained on all slices, no sample grids."""
    defaults = {"split": "all", "max_steps": 4, "batch_size": 4, "checkpoint_every_steps": 4, "sample_every_steps": 0}
    return config_from_dict(DiffusionTrainConfig, {"model": {**TINY_MODEL, **(model or {})}, **defaults, **values})


def tiny_generator(folder: Path, model: dict | None = None, **values) -> Path:
    """A diffusion run in folder/diffusion trained on 8 phantom slices of the model's size."""
    size = (model or {}).get("sample_size", TINY_MODEL["sample_size"])
    data = write_phantoms(folder / "phantoms.h5", n=8, size=size, patients=4)
    return train_diffusion(tiny_config(model, **values), data, folder / "diffusion", cpu=True).run_dir


def tiny_pipeline(folder: Path, model: dict | None = None, base_channels: int = 8, depth: int = 3, **values) -> Path:
    """folder/pipe: a saved GenSegPipeline of a tiny generator and an untrained segmenter of the same size."""
    size = (model or {}).get("sample_size", TINY_MODEL["sample_size"])
    segmenter = make_untrained_segmenter(folder / "seg", size=size, base_channels=base_channels, depth=depth)
    GenSegPipeline.from_runs(tiny_generator(folder, model, **values), segmenter).save_pretrained(folder / "pipe")
    return folder / "pipe"
