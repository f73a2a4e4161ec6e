"""A real server process on 127.0.0.1 for tests and benchmarks, and a tiny HTTP client for it."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_untrained_segmenter(run_dir: str | Path, size: int = 64, base_channels: int = 8, depth: int = 3,
                             channels: int = 1, seed: int = 0) -> Path:
    """A valid segmentation run directory (config.yaml + model/) with seeded random weights, in a second.

    Serving speed and the server's contract do not depend on what the weights learned, so tests and the load
    benchmark use this instead of training.
    """
    import torch

    from ..config import save_config
    from ..models.unet import SegmentationUNet
    from ..runs import SegTrainConfig

    run_dir = Path(run_dir)
    torch.manual_seed(seed)
    model = SegmentationUNet(in_channels=channels, base_channels=base_channels, depth=depth, sample_size=size)
    model.save_pretrained(run_dir / "model")
    save_config(SegTrainConfig(size=size, base_channels=base_channels, depth=depth, seed=seed), run_dir / "config.yaml")
    return run_dir


def make_untrained_int8(run_dir: str | Path, images: int = 8, seed: int = 0, weight_format: str = "auto",
                        out: str | Path | None = None) -> Path:
    """The int8 export of a `make_untrained_segmenter` run, where `--precision int8` finds it, calibrated on
    uniform random images instead of a training split: an untrained model has no Dice to keep, and int8 speed
    does not depend on the weights or the ranges, so benchmarks of speed use this. `weight_format` as in
    `export_onnx`; `out` defaults to where `--precision int8` looks."""
    import numpy as np

    from ..inference.onnx import INT8_FILE, cpu_features, int8_format
    from ..inference.segmenter import model_folder
    from ..workflows.export import export_onnx, quantize_int8

    model_dir, _ = model_folder(run_dir)
    out = Path(out) if out is not None else model_dir / INT8_FILE
    with tempfile.TemporaryDirectory() as work:
        fp32 = export_onnx(run_dir, Path(work) / "fp32.onnx")
        shape = (images, fp32["channels"], fp32["size"], fp32["size"])
        calibration = np.random.default_rng(seed).random(shape, dtype=np.float32)
        quantize_int8(Path(fp32.pop("path")), out, calibration, fp32, int8_format(weight_format, cpu_features()))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port: int, method: str, route: str, body: bytes | None = None,
            headers: dict | None = None, timeout: float = 60) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, route, body=body, headers=headers or {})
        response = conn.getresponse()
        raw = response.read()
        try:
            return response.status, json.loads(raw)
        except json.JSONDecodeError:
            return response.status, {"raw": raw.decode(errors="replace")}
    finally:
        conn.close()


def post_json(port: int, route: str, body: bytes | dict, timeout: float = 60) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return request(port, "POST", route, data, {"Content-Type": "application/json"}, timeout)


class ServerProcess:
    """`python -m genseg serve` in a subprocess on 127.0.0.1; by default waits until health answers 200.

    `checkpoint=None` leaves the model to AIP_STORAGE_URI and `port=None` to AIP_HTTP_PORT in `env`, as in a
    Vertex AI container.
    """

    def __init__(self, checkpoint: Path | str | None, max_batch: int = 16, env: dict | None = None,
                 port: int | None = None, wait_ready: bool = True, startup_timeout: float = 120, extra_args=()):
        self.env = {**os.environ, **(env or {})}
        self.env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2]) + os.pathsep + self.env.get("PYTHONPATH", "")
        self.port = int(self.env["AIP_HTTP_PORT"]) if port is None and "AIP_HTTP_PORT" in self.env else port or free_port()
        self.health_route = self.env.get("AIP_HEALTH_ROUTE", "/health")
        self.command = [sys.executable, "-m", "genseg", "serve", "--host", "127.0.0.1", "--max-batch", str(max_batch),
                        *extra_args]
        if checkpoint is not None:
            self.command += ["--checkpoint", str(checkpoint)]
        if "AIP_HTTP_PORT" not in self.env or port is not None:
            self.command += ["--port", str(self.port)]
        self.wait_ready = wait_ready
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "ServerProcess":
        self.log = tempfile.TemporaryFile()  # not a pipe: a full pipe buffer would stall the server
        self.process = subprocess.Popen(self.command, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.output()}")
            try:
                status = request(self.port, "GET", self.health_route, timeout=2)[0]
                if status == 200 or not self.wait_ready:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        self.__exit__(None, None, None)
        raise TimeoutError(f"server did not answer on {self.health_route} within {self.startup_timeout} s")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
