"""Flip TTA, small- and unsure-region removal (genseg.inference.postprocess) and their options in evaluate, segment,
the pipeline and the server (issue 14, item 4)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from seg_helpers import one_torch_thread, write_phantoms  # noqa: F401

from genseg.errors import ConfigError
from genseg.evaluation.evaluate import evaluate
from genseg.inference.files import segment_file
from genseg.inference.postprocess import (PostProcessed, check_postprocess, drop_regions, postprocessed,
                                          remove_small_components)
from genseg.inference.segmenter import Segmenter, load_segmenter
from genseg.models.unet import SegmentationUNet
from genseg.serve.testing import ServerProcess, make_untrained_segmenter, post_json

SIZE = 32


def random_segmenter(seed: int = 0, mirror_symmetric: bool = False) -> Segmenter:
    """An untrained U-Net; `mirror_symmetric` makes every kernel its own left-right mirror image, so the whole
    network commutes with the horizontal flip (2x2 pooling and up-sampling on even sides keep that)."""
    torch.manual_seed(seed)
    model = SegmentationUNet(base_channels=4, depth=2, sample_size=SIZE)
    if mirror_symmetric:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                    module.weight.copy_((module.weight + module.weight.flip(-1)) / 2)
    return Segmenter(model, device="cpu")


def images(n: int = 3, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, SIZE, SIZE), dtype=np.float32)


def test_hflip_tta_of_a_mirror_symmetric_model_is_the_plain_prediction():
    segmenter = random_segmenter(mirror_symmetric=True)
    x = images()
    assert np.allclose(segmenter.predict(x[..., ::-1].copy()), segmenter.predict(x)[..., ::-1], atol=1e-5)
    assert np.allclose(PostProcessed(segmenter, "hflip").predict(x), segmenter.predict(x), atol=1e-5)


def test_tta_averages_the_flipped_back_views_and_is_flip_equivariant():
    segmenter = random_segmenter()
    x = images()
    plain, mirrored = segmenter.predict(x), segmenter.predict(x[..., ::-1].copy())[..., ::-1]
    assert not np.allclose(plain, mirrored, atol=1e-4)  # this model is not symmetric by itself
    hflip = PostProcessed(segmenter, "hflip")
    assert np.allclose(hflip.predict(x), (plain + mirrored) / 2, atol=1e-6)
    assert np.allclose(hflip.predict(x[..., ::-1].copy()), hflip.predict(x)[..., ::-1], atol=1e-5)
    hv = PostProcessed(segmenter, "hvflip")
    for axes in ((-1,), (-2,), (-2, -1)):
        assert np.allclose(hv.predict(np.flip(x, axes).copy()), np.flip(hv.predict(x), axes), atol=1e-5)
    assert not np.allclose(hv.predict(x), hflip.predict(x), atol=1e-4)


def test_small_components_are_removed_slice_by_slice():
    masks = np.zeros((3, 12, 12), bool)
    masks[0, 1:3, 1:3] = True            # 4 pixels
    masks[0, 6:10, 6:9] = True           # 12 pixels
    masks[1, 0, 0] = masks[1, 1, 1] = masks[1, 2, 2] = True  # 3 pixels, touching only at corners: one region
    masks[1, 8, 8] = True                # a lone pixel
    kept = remove_small_components(masks, 3)
    assert kept[0].sum() == 16 and kept[0, 1:3, 1:3].all()  # both regions reach 3
    kept = remove_small_components(masks, 5)
    assert kept[0].sum() == 12 and not kept[0, 1:3, 1:3].any()
    assert kept[1].sum() == 0  # the largest region goes too when it is below the limit
    assert not kept[2].any()  # an empty slice stays empty
    diagonal_only = masks[1].copy()
    diagonal_only[8, 8] = False
    assert np.array_equal(remove_small_components(masks[1], 3), diagonal_only)  # one slice (H, W) works too
    for no_op in (0, 1):
        assert np.array_equal(remove_small_components(masks, no_op), masks)


def test_dropped_components_get_probability_zero_and_the_rest_is_untouched():
    probabilities = np.full((1, 10, 10), 0.2, np.float32)
    probabilities[0, 1, 1] = 0.9
    probabilities[0, 5:8, 5:8] = 0.7
    cleaned = drop_regions(probabilities, 0.5, 4)
    assert cleaned[0, 1, 1] == 0 and np.array_equal(cleaned[0, 5:8, 5:8], probabilities[0, 5:8, 5:8])
    assert (cleaned[0][probabilities[0] < 0.5] == 0.2).all()


def test_unsure_regions_go_whatever_their_size_and_sure_ones_keep_their_shape():
    probabilities = np.full((2, 16, 16), 0.1, np.float32)
    probabilities[0, 1:9, 1:9] = 0.7      # a large faint region (64 pixels)
    probabilities[0, 12:14, 12:14] = 0.6  # a small region, faint but for one sure pixel: kept whole
    probabilities[0, 12, 12] = 0.95
    probabilities[1, 3:5, 3:5] = 0.99     # a small sure lesion (4 pixels)
    cleaned = drop_regions(probabilities, 0.5, min_peak=0.8)
    assert (cleaned[0, 1:9, 1:9] == 0).all()
    assert np.array_equal(cleaned[0, 12:14, 12:14], probabilities[0, 12:14, 12:14])
    assert np.array_equal(cleaned[1], probabilities[1])
    assert (cleaned[probabilities < 0.5] == np.float32(0.1)).all()
    assert np.array_equal(drop_regions(probabilities, 0.5, min_peak=0.5), probabilities)  # every region reaches it
    both = drop_regions(probabilities, 0.5, min_component=5, min_peak=0.8)
    assert not (both >= 0.5).any()  # the sure regions have 4 pixels, the large one is faint
    sure = PostProcessed(random_segmenter(), min_peak=0.8)
    assert sure.min_peak == 0.8 and postprocessed(sure, min_peak=0.9).min_peak == 0.9


@pytest.mark.parametrize("tta, min_component, min_peak, words", [
    ("vflip", 0, 0.0, "tta must be one of none, hflip, hvflip, got 'vflip'"),
    ("none", -1, 0.0, "min_component must be a whole number of pixels >= 0, got -1"),
    ("none", 2.5, 0.0, "got 2.5"),
    ("none", True, 0.0, "got True"),
    ("none", 0, 1.5, "min_peak must be a probability in \\[0, 1\\], got 1.5"),
    ("none", 0, -0.1, "got -0.1"),
    ("none", 0, "0.8", "got '0.8'"),
    ("none", 0, True, "got True"),
])
def test_bad_settings_are_refused_naming_the_value(tta, min_component, min_peak, words):
    with pytest.raises(ConfigError, match=words):
        check_postprocess(tta, min_component, min_peak)
    with pytest.raises(ConfigError, match=words):
        postprocessed(random_segmenter(), tta, min_component, min_peak=min_peak)


def test_postprocessed_returns_the_plain_segmenter_when_idle_and_never_wraps_twice():
    segmenter = random_segmenter()
    assert postprocessed(segmenter) is segmenter
    once = postprocessed(segmenter, "hflip", 5)
    twice = postprocessed(once, "hvflip")
    assert twice.segmenter is segmenter and (twice.tta, twice.min_component) == ("hvflip", 0)
    assert postprocessed(once) is segmenter
    assert (once.size, once.channels, once.precision) == (segmenter.size, segmenter.channels, "fp32")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("post")
    return make_untrained_segmenter(root / "run", size=SIZE, base_channels=4, depth=2), \
        write_phantoms(root / "data.h5", n=40, size=SIZE)


def test_evaluate_records_and_applies_the_settings(tiny_run):
    run, data = tiny_run
    plain = evaluate(run, data, progress=False)
    assert (plain["tta"], plain["min_component"]) == ("none", 0)
    cleaned = evaluate(run, data, progress=False, tta="hvflip", min_component=10_000)
    assert (cleaned["tta"], cleaned["min_component"]) == ("hvflip", 10_000)
    # no region has 10 000 pixels at 32 px: every mask is empty, so Dice is 1 on the tumour-free slices, 0 elsewhere
    free = cleaned["tumour_free_slices"]
    assert cleaned["fp_rate"] == 0 and cleaned["dice_tumour"] == 0
    assert cleaned["dice"] == pytest.approx(free / cleaned["num_slices"])
    # nor is the untrained model ever sure: with min_peak 1 every region goes
    unsure = evaluate(run, data, progress=False, min_peak=1.0)
    assert plain["min_peak"] == 0.0 and unsure["min_peak"] == 1.0
    assert unsure["fp_rate"] == 0 and unsure["dice"] == pytest.approx(free / unsure["num_slices"])


def test_cli_evaluate_segment_and_pipeline_take_the_flags(tiny_run, tmp_path, genseg_cli):
    run, data = tiny_run
    result = json.loads(genseg_cli("evaluate", "--checkpoint", run, "--data", data, "--json", "--tta",
                                   "--min-component", 3, "--min-peak", 0.3).stdout)
    assert (result["tta"], result["min_component"], result["min_peak"]) == ("hflip", 3, 0.3)
    expected = evaluate(run, data, progress=False, tta="hflip", min_component=3, min_peak=0.3)
    assert result["dice"] == pytest.approx(expected["dice"])
    assert "TTA hflip, min component 3 px, min peak 0.9" in genseg_cli(
        "evaluate", "--checkpoint", run, "--data", data, "--tta", "hflip", "--min-component", 3,
        "--min-peak", 0.9).stdout
    refused = genseg_cli("evaluate", "--checkpoint", run, "--data", data, "--min-peak", 1.5, returncode=2)
    assert "1.5" in refused.stderr and "--min-peak" in refused.stderr

    picture = tmp_path / "slice.png"
    Image.fromarray((np.random.default_rng(0).random((SIZE, SIZE)) * 255).astype(np.uint8)).save(picture)
    genseg_cli("segment", picture, "--checkpoint", run, "--out", tmp_path / "cli", "--tta", "hvflip",
               "--min-component", 4)
    segment_file(PostProcessed(load_segmenter(run), "hvflip", 4), picture, tmp_path / "api")
    cli_mask, api_mask = (np.asarray(Image.open(tmp_path / d / "slice_mask.png")) for d in ("cli", "api"))
    assert np.array_equal(cli_mask, api_mask)
    segment_file(load_segmenter(run), picture, tmp_path / "plain")
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "plain" / "slice_mask.png")), api_mask)

    refused = genseg_cli("segment", picture, "--checkpoint", run, "--out", tmp_path / "x", "--min-component", -1,
                         returncode=2)
    assert "-1" in refused.stderr and "--min-component" in refused.stderr
    refused = genseg_cli("evaluate", "--checkpoint", run, "--data", data, "--tta", "flip", returncode=2)
    assert "'flip' is not one of 'none', 'hflip', 'hvflip'" in refused.stderr
    # the shipped demo pipeline's segmenter reads 64 px; segmenting a real file needs no generation
    genseg_cli("pipeline", "--input", picture, "--out", tmp_path / "pipe", "--tta", "--min-component", 4,
               "--min-peak", 0.6)
    assert (tmp_path / "pipe" / "slice_mask.png").exists()


def test_tta_on_data_of_another_size_names_both_sizes(tiny_run, tmp_path):
    run, _ = tiny_run
    other = write_phantoms(tmp_path / "other.h5", n=20, size=48)
    with pytest.raises(Exception, match="48x48.*32x32"):
        evaluate(run, other, progress=False, tta="hflip")


def test_server_takes_tta_min_component_and_min_peak_per_request(tiny_run, tmp_path):
    run, _ = tiny_run
    image = (np.random.default_rng(2).random((SIZE, SIZE)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    instance = {"b64": base64.b64encode(buffer.getvalue()).decode()}
    (tmp_path / "slice.png").write_bytes(buffer.getvalue())
    # the untrained model's probabilities sit just below 0.5: a threshold among them gives regions to drop
    threshold, segmenter = 0.499, load_segmenter(run)
    settings = {"plain": ({"tta": "hflip"}, PostProcessed(segmenter, "hflip", threshold=threshold)),
                "small": ({"tta": "hflip", "min_component": 6}, PostProcessed(segmenter, "hflip", 6, threshold)),
                "unsure": ({"tta": "hflip", "min_peak": 0.4994},
                           PostProcessed(segmenter, "hflip", threshold=threshold, min_peak=0.4994))}
    expected = {}
    for name, (_, post) in settings.items():
        segment_file(post, tmp_path / "slice.png", tmp_path / name, threshold=threshold)
        expected[name] = np.asarray(Image.open(tmp_path / name / "slice_mask.png")) > 0
    assert expected["small"].any() and expected["unsure"].any()
    assert not np.array_equal(expected["small"], expected["plain"])
    assert not np.array_equal(expected["unsure"], expected["plain"])
    with ServerProcess(run, max_batch=4) as server:
        for name, (parameters, _) in settings.items():
            status, body = post_json(server.port, "/predict", {"instances": [instance, instance],
                                                               "parameters": {**parameters, "threshold": threshold}})
            assert status == 200
            for prediction in body["predictions"]:
                served = np.asarray(Image.open(io.BytesIO(base64.b64decode(prediction["mask"]["data"])))) > 0
                assert np.array_equal(served, expected[name]), name
        for parameters, words in (({"tta": "sideways"}, "tta must be one of"),
                                  ({"min_component": -1}, "min_component must be a whole number"),
                                  ({"min_component": 2.5}, "min_component must be a whole number"),
                                  ({"min_peak": 1.5}, "min_peak must be a number in [0, 1]"),
                                  ({"min_peak": "high"}, "min_peak must be a number in [0, 1]"),
                                  ({"generate": 1, "tta": "hflip"}, "apply only to segmentation requests"),
                                  ({"generate": 1, "min_peak": 0.8}, "apply only to segmentation requests")):
            status, body = post_json(server.port, "/predict", {"instances": [instance], "parameters": parameters})
            assert 400 <= status < 500 and words in body["error"]["message"], (parameters, body)
