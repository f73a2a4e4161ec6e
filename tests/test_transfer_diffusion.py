"""`train-diffusion --init-from`: a generator continues from a trained one (run or pipeline folder) on new data,
starting exactly at the source's weights; layouts that cannot be continued fail before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from genseg.errors import CheckpointError, ConfigError
from genseg.pipeline.diffusion import load_diffusion
from genseg.pipeline.genseg_pipeline import GenSegPipeline
from genseg.serve.testing import make_untrained_segmenter
from genseg.training.diffusion import DiffusionTrainConfig, train_diffusion
from genseg.training.transfer import initial_unet
from diffusion_helpers import tiny_config, tiny_generator
from seg_helpers import one_torch_thread, write_phantoms  # noqa: F401  (one_torch_thread: autouse fixture)

def config(model=None, **values) -> DiffusionTrainConfig:
    return tiny_config(model, max_steps=3, checkpoint_every_steps=3, **values)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return tiny_generator(tmp_path_factory.mktemp("source"), max_steps=3, checkpoint_every_steps=3)


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_starts_at_the_source_weights_and_records_it(source, tmp_path):
    started = initial_unet(config(init_from=str(source))).model
    assert same_weights(started, load_diffusion(source).unet)  # before any step: the source, exactly
    assert not same_weights(initial_unet(config()).model, started)  # (a fresh one is not)
    new_domain = write_phantoms(tmp_path / "other.h5", n=8, size=32, patients=4, seed=3)
    run = train_diffusion(config({"sample_size": 32}, init_from=str(source)), new_domain, tmp_path / "run",
                          cpu=True).run_dir
    record = json.loads((run / "run.json").read_text())["init_from"]
    assert record["source"] == str(source.resolve()) and record["size"] == [16, 32]
    assert "nothing to adapt" in record["size_note"] and "joint" in record["layout"]


def test_a_saved_pipeline_is_a_source_too(source, tmp_path):
    segmenter = make_untrained_segmenter(tmp_path / "seg", size=16, base_channels=8, depth=3)
    GenSegPipeline.from_runs(source, segmenter).save_pretrained(tmp_path / "pipe")
    started = initial_unet(config(init_from=str(tmp_path / "pipe"))).model
    assert same_weights(started, load_diffusion(source).unet)


@pytest.mark.parametrize("model, error, words", [
    ({"mode": "image"}, ConfigError, "image-only"),
    ({"num_classes": 4}, ConfigError, "4 class"),
    ({"block_out_channels": [16, 16]}, ConfigError, "block_out_channels: source [16, 32] vs run [16, 16]"),
])
def test_layouts_that_cannot_continue_fail_before_training(source, tmp_path, model, error, words):
    data = write_phantoms(tmp_path / "d.h5", n=4, size=16, patients=2)
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
        train_diffusion(config(model, init_from=str(source)), data, tmp_path / "run", cpu=True)
    assert not (tmp_path / "run").exists()


def test_sources_that_are_not_generators(tmp_path):
    data = write_phantoms(tmp_path / "d.h5", n=4, size=16, patients=2)
    segmenter = make_untrained_segmenter(tmp_path / "seg", size=16, base_channels=8, depth=3)
    for bad, words in [(tmp_path / "nowhere", "not found"), (segmenter, "not a diffusion run")]:
        with pytest.raises(CheckpointError, match=words):
            train_diffusion(config(init_from=str(bad)), data, tmp_path / "run", cpu=True)
        assert not (tmp_path / "run").exists()
