"""Tiny diffusion parts for tests: a generator trained a few steps on phantoms and a saved GenSegPipeline, in
seconds. The contracts under test (file layouts, seeds, shapes, errors) do not depend on what the weights learned."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from genseg.config import config_from_dict
from genseg.data.prepared import read_metadata
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


class Killed(Exception):
    """What `train_killed_then_resumed` stops a run with, as a kill would."""


def train_killed_then_resumed(cfg: DiffusionTrainConfig, data: Path, out: Path, monkeypatch, after_step: int) -> Path:
    """Train `cfg` into `out`, stopped right after its first log row past `after_step`, then resumed to the end
    (the run folder): what an exact resume is compared with an uninterrupted run on."""
    from genseg.runs import CsvLog

    append = CsvLog.append

    def append_then_die(log, row):
        append(log, row)
        if int(row["step"]) > after_step:
            raise Killed

    monkeypatch.setattr(CsvLog, "append", append_then_die)
    with pytest.raises(Killed):
        train_diffusion(cfg, data, out, cpu=True)
    monkeypatch.undo()
    return train_diffusion(cfg, data, out, resume=True, cpu=True).run_dir


def with_label_map_mask(data: Path, path: Path) -> tuple[Path, int]:
    """A copy of the prepared file `data` at `path` whose second training mask holds 255 for 1 (an 8-bit mask,
    which masks-taking commands must refuse), and that mask's row."""
    shutil.copy(data, path)
    row = int(np.flatnonzero(read_metadata(data)["split"] == "train")[1])
    with h5py.File(path, "a") as h5:
        mask = h5["masks"][row]
        mask[mask > 0] = 255
        h5["masks"][row] = mask
    return path, row
