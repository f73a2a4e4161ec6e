"""`genseg serve` as a real process on 127.0.0.1: the Vertex AI contract, predictions equal to `genseg segment`,
and every kind of bad request answered with a 4xx JSON error while the server keeps serving."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

from genseg.data.figshare import write_figshare_mat
from genseg.errors import GensegError
from genseg.inference.files import segment_file
from genseg.inference.segmenter import load_segmenter
from genseg.serve.app import MAX_BODY_BYTES, resolve_model_uri
from genseg.serve.batcher import MicroBatcher
from genseg.serve.codec import rle_decode, rle_encode
from genseg.serve.testing import ServerProcess, make_untrained_segmenter, post_json, request

SIZE = 64
ROUTES = {"AIP_HEALTH_ROUTE": "/v1/health", "AIP_PREDICT_ROUTE": "/v1/predict"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_untrained_segmenter(tmp_path_factory.mktemp("serve") / "seg", size=SIZE, base_channels=8, depth=3)


@pytest.fixture(scope="module")
def server(run_dir):
    """Configured only through the AIP_* variables, as Vertex AI starts a custom container."""
    from genseg.serve.testing import free_port

    env = {**ROUTES, "AIP_HTTP_PORT": str(free_port()), "AIP_STORAGE_URI": str(run_dir)}
    with ServerProcess(None, max_batch=4, env=env, extra_args=["--max-instances", "8"]) as srv:
        yield srv


def predict(server, body, timeout=60):
    return post_json(server.port, ROUTES["AIP_PREDICT_ROUTE"], body, timeout)


def b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode()}


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png_mask(prediction: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(prediction["mask"]["data"]))))


def brain_like(seed: int, side: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side] / side
    image = ((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.16) * 120 + rng.normal(0, 20, (side, side)) + 60
    return image.clip(0, 255).astype(np.uint8)


def test_health_and_custom_routes(server):
    assert request(server.port, "GET", "/v1/health") == (200, {"status": "ready", "generate": False})
    assert request(server.port, "GET", "/health")[0] == 404  # the AIP routes replaced the defaults


def test_served_masks_equal_segment_for_the_same_files(server, run_dir, tmp_path):
    """PNG and a MATLAB v7.3 Figshare slice: the served mask is bit for bit the mask `segment` writes."""
    png_file = tmp_path / "slice.png"
    png_file.write_bytes(png_bytes(brain_like(1)))
    mat_file = tmp_path / "7.mat"
    mask = np.zeros((80, 80), np.uint8)
    mask[30:40, 35:50] = 1
    write_figshare_mat(mat_file, (brain_like(2, 80).astype(np.int16) * 7), mask, 2, "P7")
    segment_file(load_segmenter(run_dir), png_file, tmp_path / "out")
    segment_file(load_segmenter(run_dir), mat_file, tmp_path / "out")

    status, body = predict(server, {"instances": [b64(png_file.read_bytes()), b64(mat_file.read_bytes())],
                                    "parameters": {"threshold": 0.5}})
    assert status == 200 and len(body["predictions"]) == 2
    for prediction, stem in zip(body["predictions"], ["slice", "7"]):
        cli_mask = np.asarray(Image.open(tmp_path / "out" / f"{stem}_mask.png"))
        served = decode_png_mask(prediction)
        assert served.shape == cli_mask.shape and np.array_equal(served > 0, cli_mask > 0)
        assert prediction["tumour_area_px"] == int((cli_mask > 0).sum())
        assert prediction["input_size"] == [SIZE, SIZE]
    assert body["predictions"][1]["image_size"] == [80, 80]


def test_formats_and_parameters(server):
    image = brain_like(3, SIZE).astype(np.float32)
    npy = io.BytesIO()
    np.save(npy, image)
    status, body = predict(server, {"instances": [image.tolist(), b64(npy.getvalue())],
                                    "parameters": {"mask_format": "rle", "threshold": 0.3,
                                                   "return_probabilities": True}})
    assert status == 200
    first, second = body["predictions"]
    assert first["mask"] == second["mask"]  # the same pixels as a list and as .npy
    mask = rle_decode(first["mask"])
    assert mask.shape == (SIZE, SIZE) and int(mask.sum()) == first["tumour_area_px"]
    if first["tumour_area_px"]:
        x0, y0, x1, y1 = first["bbox"]
        rows, cols = np.nonzero(mask)
        assert [x0, y0, x1, y1] == [cols.min(), rows.min(), cols.max(), rows.max()]
    probs = np.asarray(first["probabilities"])
    assert probs.shape == (32, 32) and 0 <= probs.min() and probs.max() <= 1

    status, body = predict(server, {"instances": [image.tolist()], "parameters": {"mask_format": "none"}})
    assert status == 200 and "mask" not in body["predictions"][0]


def test_a_blank_slice_gives_an_empty_mask(server):
    status, body = predict(server, {"instances": [b64(png_bytes(np.zeros((SIZE, SIZE), np.uint8)))]})
    assert status == 200
    prediction = body["predictions"][0]
    assert prediction["tumour_area_px"] == 0 and prediction["bbox"] is None
    assert not decode_png_mask(prediction).any()


def test_one_request_is_one_ordered_batch(server):
    images = [brain_like(seed, SIZE).astype(np.float32).tolist() for seed in range(5)]
    singles = [predict(server, {"instances": [im], "parameters": {"mask_format": "rle"}})[1]["predictions"][0]
               for im in images]
    status, body = predict(server, {"instances": images, "parameters": {"mask_format": "rle"}})
    assert status == 200
    assert [p["mask"] for p in body["predictions"]] == [p["mask"] for p in singles]


def test_concurrent_clients_each_get_their_own_answer(server):
    images = [brain_like(seed, SIZE).astype(np.float32).tolist() for seed in range(12)]
    expected = [predict(server, {"instances": [im], "parameters": {"mask_format": "rle"}})[1] for im in images]
    results = [None] * len(images)

    def client(i):
        results[i] = predict(server, {"instances": [images[i]], "parameters": {"mask_format": "rle"}})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(status == 200 for status, _ in results)
    assert [body for _, body in results] == expected


GOOD = {"instances": [np.full((SIZE, SIZE), 3.0).tolist()]}
NAN_IMAGE = np.ones((SIZE, SIZE)).tolist()
NAN_IMAGE[5][5] = float("nan")
COLOUR = np.zeros((SIZE, SIZE, 3), np.uint8)
COLOUR[..., 0] = 200


@pytest.mark.parametrize("body, status, index, words", [
    (b'{"instances": [', 400, None, "malformed JSON"),
    (b"\xff\xfe not utf-8", 400, None, "malformed JSON"),
    ({"inputs": [[1, 2]]}, 400, None, "instances"),
    ({"instances": []}, 400, None, "non-empty"),
    ({"instances": [GOOD["instances"][0], {"b64": "***not base64***"}]}, 400, 1, "base64"),
    ({"instances": [b64(b"just some text, no image at all")]}, 422, 0, "not a PNG"),
    ({"instances": [b64(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)]}, 422, 0, "unreadable mat"),
    ({"instances": [b64(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)]}, 422, 0, "unreadable png"),
    ({"instances": [[1.0, 2.0, 3.0] * 20]}, 422, 0, "2-D"),
    ({"instances": [np.zeros((2, 2, SIZE, SIZE)).tolist()]}, 422, 0, "2-D"),
    ({"instances": [[[1, 2], [3]]]}, 400, 0, "rectangular"),
    ({"instances": [np.zeros((4, 4)).tolist()]}, 422, 0, "sides"),
    ({"instances": [GOOD["instances"][0], NAN_IMAGE]}, 422, 1, "NaN"),
    ({"instances": [b64(png_bytes(COLOUR))]}, 422, 0, "channel"),
    ({"instances": [{"path": "/etc/passwd"}]}, 400, 0, "b64"),
    ({"instances": ["/etc/passwd"]}, 400, 0, "instance"),
    ({**GOOD, "parameters": {"mask_format": "jpeg"}}, 400, None, "mask_format"),
    ({**GOOD, "parameters": {"threshold": 2}}, 400, None, "threshold"),
    ({**GOOD, "parameters": {"output_path": "/tmp/x"}}, 400, None, "unknown parameter"),
    ({"instances": GOOD["instances"] * 9}, 413, None, "at most 8"),
    ({"instances": [], "parameters": {"generate": 2}}, 400, None, "segments only"),
    ({"instances": [{}], "parameters": {"generate": 1, "seed": 1}}, 400, None, "pipeline"),
])
def test_bad_requests_get_a_4xx_json_error_and_the_server_keeps_serving(server, body, status, index, words):
    got_status, got = predict(server, body)
    assert got_status == status, got
    error = got["error"]
    assert words.lower() in error["message"].lower()
    assert error.get("instance") == index
    assert "Traceback" not in error["message"] and "/tmp" not in error["message"] and "/work" not in error["message"]
    assert predict(server, GOOD)[0] == 200


def test_a_body_over_the_limit_is_413(server):
    body = json.dumps({"instances": [{"b64": "A" * (MAX_BODY_BYTES + 10)}]}).encode()
    status, got = predict(server, body)
    assert status == 413 and "larger than" in got["error"]["message"]
    assert predict(server, GOOD)[0] == 200


def test_a_model_that_fails_to_load_keeps_health_at_503(tmp_path):
    missing = tmp_path / "no-such-run"
    with ServerProcess(missing, wait_ready=False) as srv:
        status, body = request(srv.port, "GET", "/health")
        for _ in range(100):  # loading runs in the background: wait until it has given up
            if body.get("status") == "failed":
                break
            time.sleep(0.2)
            status, body = request(srv.port, "GET", "/health")
        assert status == 503 and body["status"] == "failed" and str(tmp_path) not in json.dumps(body)
        status, body = post_json(srv.port, "/predict", GOOD)
        assert status == 503 and "not loaded" in body["error"]["message"]


def test_gs_uri_without_the_extra_says_what_to_install():
    try:
        import google.cloud.storage  # noqa: F401
    except ImportError:
        with pytest.raises(GensegError, match=r"genseg\[gcs\]"):
            resolve_model_uri("gs://bucket/model")
    else:
        raise AssertionError("google-cloud-storage is installed here; this test checks the message without it")


def test_rle_round_trip():
    rng = np.random.default_rng(0)
    for mask in [rng.random((7, 9)) > 0.5, np.ones((3, 4)), np.zeros((5, 5))]:
        assert np.array_equal(rle_decode(rle_encode(mask)), mask.astype(np.uint8))


def test_micro_batcher_is_first_come_first_served_and_bounded():
    batches = []

    def run_batch(images):
        batches.append([int(x[0, 0, 0]) for x in images])
        return images[:, 0] * 2

    async def scenario():
        batcher = MicroBatcher(run_batch, max_batch=3)
        batcher.start()
        requests = [[np.full((1, 2, 2), 10 * r + i, np.float32) for i in range(n)] for r, n in enumerate([2, 4, 1])]
        results = await asyncio.gather(*(batcher.submit(images) for images in requests))
        await batcher.stop()
        return requests, results

    requests, results = asyncio.run(scenario())
    for images, outputs in zip(requests, results):
        assert [float(o[0, 0]) for o in outputs] == [2 * float(im[0, 0, 0]) for im in images]
    assert all(len(b) <= 3 for b in batches)
    assert sum(batches, []) == [0, 1, 10, 11, 12, 13, 20]  # arrival order, nothing dropped


def test_compiled_server_is_ready_only_after_compiling_and_predicts_like_eager(run_dir):
    """--compile: the warm-up compile happens before health turns 200, and the compiled network's answers
    match the eager segmenter's probabilities."""
    image = brain_like(5, SIZE)
    with ServerProcess(run_dir, max_batch=2, extra_args=["--compile"], startup_timeout=240) as srv:
        assert "compiled" in srv.output()
        started = time.perf_counter()
        status, body = post_json(srv.port, "/predict", {"instances": [image.tolist()],
                                                         "parameters": {"return_probabilities": True}})
        first_request_s = time.perf_counter() - started
    assert status == 200
    eager = load_segmenter(run_dir, device="cpu")
    from genseg.inference.files import prepare_input

    expected = eager.predict(prepare_input(image.astype(np.float32), 1, SIZE)[None])[0]
    step = SIZE // 32
    pooled = expected.reshape(32, step, 32, step).mean(axis=(1, 3))
    assert np.abs(np.asarray(body["predictions"][0]["probabilities"]) - pooled).max() < 2e-3
    assert first_request_s < 20  # nothing left to compile inside the first request
