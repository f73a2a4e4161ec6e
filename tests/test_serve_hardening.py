"""`genseg serve` against a hostile client, on a real server process on 127.0.0.1: slow and lying clients,
malformed JSON, the error shape of every status, no request byte in any answer, bounded memory under bombs,
a generate flood beside segmentation, SIGTERM, a safe gs:// download, and a schemathesis run from the schema."""

from __future__ import annotations

import base64
import http.client
import json
import signal
import socket
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest

import hostile
from test_safe_decoding import CORPUS
from genseg.errors import CheckpointError
from genseg.serve.storage import resolve_model_uri
from genseg.serve.testing import ServerProcess, make_untrained_segmenter, post_json, request

from diffusion_helpers import tiny_pipeline

SIZE = 32
GOOD = {"instances": [np.full((SIZE, SIZE), 3.0).tolist()]}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_untrained_segmenter(tmp_path_factory.mktemp("hard") / "seg", size=SIZE, base_channels=8, depth=2)


@pytest.fixture(scope="module")
def server(run_dir):
    with ServerProcess(run_dir, max_batch=4, extra_args=["--read-timeout", "2"]) as srv:
        yield srv


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode()}


def assert_error_shape(status: int, body: dict, expected: int | None = None) -> None:
    assert 400 <= status < 500, (status, body)
    assert expected is None or status == expected, (status, body)
    assert set(body) == {"error"} and isinstance(body["error"]["message"], str), body


def test_every_error_status_has_the_one_error_shape(server):
    assert_error_shape(*request(server.port, "GET", "/no-such-route"), 404)
    assert_error_shape(*request(server.port, "GET", "/predict"), 405)
    assert_error_shape(*request(server.port, "POST", "/predict", b"instances=1", {"Content-Type": "text/plain"}), 415)
    big = b"{" + b" " * 2_000_000 + b"}"
    assert_error_shape(*post_json(server.port, "/predict", big), 413)


@pytest.mark.parametrize("body", [
    b'{"instances": [' + b"9" * 310 + b"]}",  # overflows float32 and float64
    b'{"instances": [[' + b"1" * 4400 + b"]]}",  # past Python's integer-string limit
    b'{"instances": ' + b"[" * 1200 + b"]" * 1200 + b"}",  # deeper than the JSON parser's recursion
    b'{"instances": [' + b"[" * 200 + b"1" + b"]" * 200 + b"]}",  # nesting numpy cannot shape
    json.dumps({"instances": [[[1e308] * 16] * 16]}).encode(),
    json.dumps({"instances": [[[1, "a"], [2, 3]]]}).encode(),
    json.dumps({"instances": [{"b64": None}]}).encode(),
    json.dumps({"instances": [], "parameters": {"threshold": None}}).encode(),
    b'{"instances": [[1, 2]], "instances": 3}',
    b"[]", b"null", b'"instances"',
])
def test_malformed_bodies_get_a_4xx_never_a_500(server, body):
    status, got = post_json(server.port, "/predict", body)
    assert_error_shape(status, got)
    assert post_json(server.port, "/predict", GOOD)[0] == 200


def test_a_body_shorter_than_its_content_length_times_out_with_408(server):
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"instances\": [")
        answer = b""
        while b'"error"' not in answer and (chunk := s.recv(4096)):
            answer += chunk
    assert b" 408 " in answer.split(b"\r\n")[0] and b'"error"' in answer
    assert time.monotonic() - started < 8


def test_slow_headers_are_cut_off(server):
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
        assert s.recv(4096) == b""  # closed by the server
    assert time.monotonic() - started < 8
    assert request(server.port, "GET", "/health")[0] == 200


def test_no_byte_the_client_chose_comes_back(server, tmp_path):
    """A marker placed in every part of an upload a decoder reads (file names, fields, values, keys) never
    appears in any response."""
    marker = hostile.MARKER.encode()
    canary = hostile.write_canary(tmp_path)
    uploads = [hostile.marker_fields(), hostile.external_storage(canary[0], "PID"), hostile.external_link(canary[1]),
               hostile.virtual_dataset(canary[1]), hostile.soft_link(), marker + b"\x89PNG", b"\x89PNG\r\n\x1a\n" + marker]
    bodies = [{"instances": [b64(upload)]} for upload in uploads]
    bodies += [
        {"instances": [{"b64": marker.decode()}]},
        {"instances": [{marker.decode(): 1}]},
        {"instances": [[marker.decode()]]},
        {"instances": GOOD["instances"], "parameters": {marker.decode(): 1}},
        {"instances": GOOD["instances"], "parameters": {"mask_format": marker.decode()}},
        {marker.decode(): []},
    ]
    codes = ", ".join(str(c) for c in hostile.MARKER_CODES[:3]).encode()
    for body in bodies:
        data = json.dumps(body).encode()
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", "/predict", body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        raw = response.read()
        conn.close()
        assert 400 <= response.status < 500, raw
        assert marker.lower() not in raw.lower() and codes not in raw, raw
        assert base64.b64encode(marker)[:12] not in raw


def test_hostile_corpus_is_refused_and_memory_stays_bounded(server, tmp_path):
    """Each upload of the corpus gets a 4xx JSON error; the canary file behind an HDF5 external storage is
    never read back; the server's RSS grows little across repeated bombs and it keeps answering."""
    canary = hostile.write_canary(tmp_path)
    corpus = {name: build(canary) for name, (build, _, _) in CORPUS.items()}
    corpus.update(polyglot=hostile.polyglot(), dicom=hostile.dicom(frames=5000), nifti=hostile.nifti_bomb())
    before = rss_mib(server.process.pid)
    for _ in range(3):
        for name, upload in corpus.items():
            status, body = post_json(server.port, "/predict", {"instances": [b64(upload)]})
            assert_error_shape(status, body)
            assert hostile.MARKER not in json.dumps(body), name
    bombs = {"instances": [b64(hostile.blank_png())] * 64}  # 64 x 16.8 Mpx in a small body
    status, body = post_json(server.port, "/predict", bombs)
    assert_error_shape(status, body, 413)
    grown = rss_mib(server.process.pid) - before
    assert grown < 400, f"RSS grew by {grown:.0f} MiB"
    assert post_json(server.port, "/predict", GOOD)[0] == 200


def test_health_answers_quickly_while_large_images_are_decoded(server):
    body = {"instances": [b64(hostile.blank_png())] * 3}
    results = []
    threads = [threading.Thread(target=lambda: results.append(post_json(server.port, "/predict", body, 120)[0]))
               for _ in range(3)]
    for t in threads:
        t.start()
    worst = 0.0
    while any(t.is_alive() for t in threads):
        started = time.perf_counter()
        assert request(server.port, "GET", "/health", timeout=5)[0] == 200
        worst = max(worst, time.perf_counter() - started)
        time.sleep(0.1)
    for t in threads:
        t.join()
    assert all(status in (200, 503) for status in results), results
    assert worst < 1.0, f"health took {worst:.2f} s under load"


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("gen"))


def test_generate_flood_neither_starves_segmentation_nor_outlives_its_clients(pipeline_dir):
    slow = json.dumps({"instances": [{}], "parameters": {"generate": 8, "steps": 1000, "scheduler": "ddpm"}}).encode()
    with ServerProcess(pipeline_dir, extra_args=["--generate-queue", "1", "--graceful-timeout", "3"]) as srv:
        # a client that gives up: its generation must stop, not run its 1000 steps
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=1)
        conn.request("POST", "/predict", body=slow, headers={"Content-Type": "application/json"})
        with pytest.raises(OSError):
            conn.getresponse()
        conn.close()
        deadline = time.monotonic() + 20
        while "generation cancelled" not in srv.output() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "generation cancelled" in srv.output()

        statuses = []
        flood = [threading.Thread(target=lambda: statuses.append(post_json(srv.port, "/predict", slow, 120)[0]))
                 for _ in range(4)]
        for t in flood:
            t.start()
        time.sleep(1.0)
        started = time.perf_counter()
        assert post_json(srv.port, "/predict", {"instances": [np.full((16, 16), 2.0).tolist()]}, 30)[0] == 200
        assert time.perf_counter() - started < 10
        started = time.perf_counter()
        assert request(srv.port, "GET", "/health", timeout=5)[0] == 200
        assert time.perf_counter() - started < 1.0
        deadline = time.monotonic() + 10
        while statuses.count(503) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert statuses.count(503) == 2  # 1 running + 1 waiting; the other two told to come back
        stopped = time.monotonic()
        srv.process.send_signal(signal.SIGTERM)
        srv.process.wait(timeout=15)
        assert time.monotonic() - stopped < 10
        for t in flood:
            t.join()


class _Blob:
    def __init__(self, name: str, data: bytes):
        self.name, self.data = name, data

    def download_to_filename(self, path: str) -> None:
        Path(path).write_bytes(self.data)


def _stand_in_storage(monkeypatch, names: list[str]) -> None:
    """google.cloud.storage stand-in: the real client needs a bucket and credentials that tests cannot have."""
    blobs = [_Blob(name, name.encode()) for name in names]
    client = types.SimpleNamespace(list_blobs=lambda bucket, prefix="": [b for b in blobs if b.name.startswith(prefix)])
    storage = types.SimpleNamespace(Client=lambda: client)
    cloud = types.ModuleType("google.cloud")
    cloud.storage = storage
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.cloud", cloud)
    monkeypatch.setitem(sys.modules, "google.cloud.storage", storage)


def test_gs_download_stays_inside_its_folder_and_its_prefix(monkeypatch, tmp_path):
    outside = tmp_path / "x"
    _stand_in_storage(monkeypatch, ["models/seg/model/config.json", f"models/seg/../../../../..{outside}"])
    with pytest.raises(CheckpointError, match="outside its folder"):
        resolve_model_uri("gs://bucket/models/seg")
    assert not outside.exists()

    _stand_in_storage(monkeypatch, ["models/seg/config.yaml", "models/seg/model/config.json",
                                    "models/seg-old/config.yaml", "models/seg-old/secret.txt"])
    target = resolve_model_uri("gs://bucket/models/seg/")
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()) == [
        "config.yaml", "model/config.json"]


def test_schemathesis_finds_no_5xx_and_no_leak(server):
    """Bodies generated from /openapi.json, valid and invalid: every answer is JSON, 2xx or 4xx."""
    import schemathesis  # an optional test dependency (genseg[test])
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(f"http://127.0.0.1:{server.port}/openapi.json")
    counts: dict[str, int] = {}
    for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
        operation = schema["/predict"]["POST"]

        @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case):
            response = case.call(base_url=f"http://127.0.0.1:{server.port}", timeout=60)
            counts[f"{response.status_code // 100}xx"] = counts.get(f"{response.status_code // 100}xx", 0) + 1
            assert response.status_code < 500, response.text
            assert "error" in response.json() or response.status_code == 200

        fuzz()
    print("schemathesis status classes:", counts)
    assert sum(counts.values()) >= 60 and counts.get("5xx", 0) == 0
    assert request(server.port, "GET", "/health")[0] == 200
