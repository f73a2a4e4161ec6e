"""`genseg serve --pipeline`: generate requests on a real server process return the slices the same pipeline
generates in process, segmentation keeps working beside them, and bad generate requests get 4xx JSON errors."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from genseg.inference.files import segment_file
from genseg.models.diffusion import make_sampling_scheduler
from genseg.pipeline.diffusion import seed_generators
from genseg.pipeline.genseg_pipeline import GenSegPipeline
from genseg.serve.codec import rle_decode
from genseg.serve.testing import ServerProcess, free_port, post_json, request

from diffusion_helpers import quiet, tiny_pipeline

SIZE = 16


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("gen"))


@pytest.fixture(scope="module")
def server(pipeline_dir):
    """Started as Vertex AI would: the pipeline folder given only through AIP_STORAGE_URI."""
    env = {"AIP_HTTP_PORT": str(free_port()), "AIP_STORAGE_URI": str(pipeline_dir)}
    with ServerProcess(None, env=env, extra_args=["--max-generate", "4"]) as srv:
        yield srv


def generate(server, parameters, instances=None):
    return post_json(server.port, "/predict", {"instances": [{}] if instances is None else instances,
                                               "parameters": parameters})


def png(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))


def test_health_says_generate_is_available(server):
    assert request(server.port, "GET", "/health") == (200, {"status": "ready", "generate": True,
                                                            "generate_masks": "generated"})


def test_generated_slices_are_the_pipelines_own(server, pipeline_dir):
    parameters = {"generate": 3, "steps": 3, "seed": 5, "scheduler": "ddim", "mask_format": "rle"}
    status, body = generate(server, parameters)
    assert status == 200 and len(body["predictions"]) == 3
    assert generate(server, parameters, instances=[])[1] == body  # same seed, same slices; [] works too
    pipe = quiet(GenSegPipeline.load(pipeline_dir))
    pipe.scheduler = make_sampling_scheduler("ddim", pipe.scheduler.config)
    expected = pipe(3, num_inference_steps=3, generator=seed_generators(5, 3))
    for i, prediction in enumerate(body["predictions"]):
        image = png(prediction["image"]["data"])
        assert image.shape == (SIZE, SIZE)
        assert np.abs(image.astype(float) - expected.images[i] * 255).max() <= 0.5 + 1e-6
        assert np.array_equal(rle_decode(prediction["generated_mask"]), expected.generated_masks[i])
        assert np.array_equal(rle_decode(prediction["mask"]), expected.predicted_masks[i])
        assert prediction["tumour_area_px"] == int(expected.predicted_masks[i].sum())
        assert 0.0 <= prediction["dice_generated_vs_predicted"] <= 1.0 and prediction["seed"] == 5


def test_segmentation_still_works_on_a_pipeline_server(server, pipeline_dir, tmp_path):
    rng = np.random.default_rng(1)
    image = (rng.random((24, 24)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "x.png")
    from genseg.inference.segmenter import load_segmenter

    segment_file(load_segmenter(pipeline_dir), tmp_path / "x.png", tmp_path / "out")
    status, body = post_json(server.port, "/predict", {"instances": [image.tolist()]})
    assert status == 200
    cli_mask = np.asarray(Image.open(tmp_path / "out" / "x_mask.png")) > 0
    assert np.array_equal(png(body["predictions"][0]["mask"]["data"]) > 0, cli_mask)


@pytest.mark.parametrize("parameters, instances, words", [
    ({"generate": 0}, None, "generate must be"),
    ({"generate": 5}, None, "[1, 4]"),
    ({"generate": "2"}, None, "whole number"),
    ({"generate": 1, "steps": 0}, None, "steps"),
    ({"generate": 1, "steps": 5000}, None, "steps"),
    ({"generate": 1, "seed": -1}, None, "seed"),
    ({"generate": 1, "class": 1}, None, "unconditional"),
    ({"generate": 1, "scheduler": "euler-magic"}, None, "unknown scheduler"),
    ({"generate": 1, "guidance": "lots"}, None, "guidance"),
    ({"generate": 1, "mask_format": "gif"}, None, "mask_format"),
    ({"generate": 1, "save_to": "/tmp/x"}, None, "unknown parameter"),
    ({"generate": 1}, [np.ones((SIZE, SIZE)).tolist()], "no image instances"),
])
def test_bad_generate_requests_get_a_400_and_the_server_keeps_serving(server, parameters, instances, words):
    status, body = generate(server, parameters, instances)
    assert status == 400, body
    assert words.lower() in body["error"]["message"].lower()
    assert "Traceback" not in body["error"]["message"] and "/tmp/" not in body["error"]["message"]
    assert generate(server, {"generate": 1, "steps": 1})[0] == 200
