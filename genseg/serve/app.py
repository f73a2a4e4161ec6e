"""The HTTP app: Vertex AI custom-container contract over FastAPI.

Routes come from AIP_HEALTH_ROUTE / AIP_PREDICT_ROUTE (defaults /health, /predict); the model from the
given path or AIP_STORAGE_URI: a segmentation run, or a saved GenSegPipeline folder, which also enables
generate requests (`parameters.generate = N`). Health answers 503 while the model loads and 200 once it is
ready. Every
error is a JSON body {"error": {"message", "instance"?}} with a 4xx status; nothing leaks a traceback or a
path, and no request can name a file for the server to read or write.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..errors import ConfigError, DataError, GensegError
from ..inference import load_segmenter, prepare_input, resize_mask
from ..metrics import dice_iou
from .batcher import MicroBatcher
from .codec import MASK_FORMATS, RequestError, decode_instance, describe_prediction, encode_mask, png_b64

MAX_BODY_BYTES = 1_500_000  # Vertex AI's public-endpoint limit
PREDICT_PARAMETERS = {"threshold", "mask_format", "return_probabilities"}
GENERATE_PARAMETERS = PREDICT_PARAMETERS | {"generate", "class", "steps", "seed", "scheduler", "guidance"}
MAX_GENERATE_STEPS = 1000
log = logging.getLogger("genseg.serve")


def create_app(model_path: str | os.PathLike | None = None, *, pipeline_path: str | os.PathLike | None = None,
               max_batch: int = 16, max_instances: int = 64, max_generate: int = 8,
               max_body_bytes: int = MAX_BODY_BYTES, compile: bool = False) -> FastAPI:
    health_route = os.environ.get("AIP_HEALTH_ROUTE", "/health")
    predict_route = os.environ.get("AIP_PREDICT_ROUTE", "/predict")
    if model_path and pipeline_path:
        raise GensegError("give --checkpoint (a segmentation run) or --pipeline (a saved pipeline), not both")
    source = pipeline_path or model_path or os.environ.get("AIP_STORAGE_URI")
    if not source:
        raise GensegError("no model given: pass --checkpoint RUN_DIR, --pipeline DIR or set AIP_STORAGE_URI")
    state: dict[str, Any] = {"segmenter": None, "pipeline": None, "failed": None}
    generating = threading.Lock()  # one generation at a time: the sampler is swapped per request

    def load() -> None:
        try:
            path = resolve_model_uri(str(source))
            if pipeline_path or (path / "model_index.json").is_file():  # AIP_STORAGE_URI may hold either kind
                from ..pipeline.genseg import GenSegPipeline

                pipe = GenSegPipeline.load(path)
                state["train_scheduler_config"] = pipe.scheduler.config
                segmenter = pipe.predictor(batch_size=max_batch, compile=compile)
            else:
                pipe, segmenter = None, load_segmenter(path, batch_size=max_batch, compile=compile)
            if compile:  # compile now, for the batch shapes requests will bring, not inside the first requests
                for n in sorted({1, max_batch}):
                    segmenter.predict(np.zeros((n, segmenter.channels, segmenter.size, segmenter.size), np.float32))
            state["pipeline"], state["segmenter"] = pipe, segmenter
            log.info("model loaded from %s%s%s", source, " and compiled" if compile else "",
                     "; generate requests enabled" if pipe is not None else "")
        except Exception as exc:  # noqa: BLE001 - reported by the health route, not a crash
            state["failed"] = str(exc)
            log.error("could not load the model: %s", exc)

    batcher = MicroBatcher(lambda images: state["segmenter"].predict(images), max_batch=max_batch)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        loading = asyncio.get_running_loop().run_in_executor(None, load)
        yield
        await batcher.stop()
        await loading

    app = FastAPI(title="genseg", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher = batcher

    @app.exception_handler(RequestError)
    async def request_error(_: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return JSONResponse({"error": {"message": "internal error"}}, status_code=500)

    @app.get(health_route)
    async def health() -> JSONResponse:
        if state["segmenter"] is not None:
            return JSONResponse({"status": "ready", "generate": state["pipeline"] is not None})
        if state["failed"]:
            return JSONResponse({"status": "failed", "message": "the model could not be loaded; see the server log"},
                                status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.post(predict_route)
    async def predict(request: Request) -> JSONResponse:
        segmenter = state["segmenter"]
        if segmenter is None:
            raise RequestError("the model is not loaded yet", status=503)
        body = await _read_body(request, max_body_bytes)
        instances, parameters = _parse(body, max_instances)
        if "generate" in parameters:
            return JSONResponse({"predictions": await asyncio.to_thread(_generate_locked, instances, parameters)})
        threshold, mask_format, return_probabilities = _parameters(parameters, PREDICT_PARAMETERS)
        raw, inputs = await asyncio.to_thread(_prepare, instances, segmenter.channels, segmenter.size)
        to_run = [x for x in inputs if x is not None]
        results = iter(await batcher.submit(to_run) if to_run else [])
        predictions = []
        for image, x in zip(raw, inputs):
            probabilities = next(results) if x is not None else None
            mask = _mask_like_cli(probabilities, threshold, image.shape[-2:])
            predictions.append(describe_prediction(mask, probabilities, segmenter.size, threshold, mask_format,
                                                   return_probabilities))
        return JSONResponse({"predictions": predictions})

    def _generate_locked(instances: list, parameters: dict) -> list[dict[str, Any]]:
        pipe = state["pipeline"]
        if pipe is None:
            raise RequestError("this server segments only: generate requests need a pipeline (genseg serve "
                               "--pipeline DIR)")
        if any(instance != {} for instance in instances):
            raise RequestError('a generate request takes no image instances: send "instances": [] or [{}]')
        with generating:
            return _generate(pipe, state["train_scheduler_config"], parameters, max_generate)

    return app


def _generate(pipe, train_scheduler_config, parameters: dict, max_generate: int) -> list[dict[str, Any]]:
    """Sample `generate` slices with the pipeline and describe each like a segmentation prediction, plus the
    generated image (8-bit PNG) and, in joint mode, the generator's own mask and its Dice with the prediction."""
    from ..models.diffusion import make_sampling_scheduler

    threshold, mask_format, return_probabilities = _parameters(parameters, GENERATE_PARAMETERS)
    num = _whole_number(parameters, "generate", 1, max_generate)
    steps = _whole_number(parameters, "steps", 1, MAX_GENERATE_STEPS, default=20)
    seed = _whole_number(parameters, "seed", 0, 2**31 - 1, default=0)
    class_label = _whole_number(parameters, "class", 0, 10**6, default=None)
    guidance = parameters.get("guidance", 1.0)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not 0 < guidance <= 50:
        raise RequestError(f"guidance must be a number in (0, 50], got {guidance!r}")
    try:
        pipe.scheduler = make_sampling_scheduler(str(parameters.get("scheduler", "dpmsolver")), train_scheduler_config)
        result = pipe(num, class_labels=class_label, guidance_scale=float(guidance), num_inference_steps=steps,
                      generator=seed, progress=False)
    except ConfigError as exc:  # unknown scheduler, class out of range, class of an unconditional model ...
        raise RequestError(str(exc)) from None
    size = int(pipe.unet.config.sample_size)
    predictions = []
    for i, (image, probabilities) in enumerate(zip(result.images, result.probabilities)):
        predicted = (probabilities >= threshold).astype(np.uint8)
        prediction = describe_prediction(predicted, probabilities, size, threshold, mask_format, return_probabilities)
        prediction.update({"index": i, "seed": seed, "image": {"format": "png_b64", "data": png_b64(image)}})
        if result.labels is not None:
            prediction["class"] = int(result.labels[i])
        if result.generated_masks is not None:
            generated = result.generated_masks[i]
            if mask_format != "none":
                prediction["generated_mask"] = encode_mask(generated, mask_format)
            prediction["dice_generated_vs_predicted"] = float(dice_iou(predicted[None], generated[None])[0][0])
        predictions.append(prediction)
    return predictions


def _whole_number(parameters: dict, name: str, low: int, high: int, default: int | None = ...) -> int | None:
    value = parameters.get(name, default)
    if value is ...:
        raise RequestError(f"{name} is required")
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(f"{name} must be a whole number in [{low}, {high}], got {value!r}")
    return value


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"request body is larger than {limit} bytes", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(f"request body is larger than {limit} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(body: bytes, max_instances: int) -> tuple[list, dict]:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"malformed JSON ({exc.__class__.__name__})") from None
    if not isinstance(payload, dict) or "instances" not in payload:
        raise RequestError('the body must be a JSON object with an "instances" list')
    instances, parameters = payload["instances"], payload.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise RequestError('"parameters" must be an object')
    if not isinstance(instances, list) or not (instances or "generate" in parameters):
        raise RequestError('"instances" must be a non-empty list')
    if len(instances) > max_instances:
        raise RequestError(f"at most {max_instances} instances per request, got {len(instances)}", status=413)
    return instances, parameters


def _parameters(parameters: dict, allowed: set[str]) -> tuple[float, str, bool]:
    unknown = set(parameters) - allowed
    if unknown:
        raise RequestError(f"unknown parameter(s) {sorted(unknown)}")
    threshold = parameters.get("threshold", 0.5)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise RequestError(f"threshold must be a number in [0, 1], got {threshold!r}")
    mask_format = parameters.get("mask_format", "png_b64")
    if mask_format not in MASK_FORMATS:
        raise RequestError(f"mask_format must be one of {list(MASK_FORMATS)}, got {mask_format!r}")
    return_probabilities = parameters.get("return_probabilities", False)
    if not isinstance(return_probabilities, bool):
        raise RequestError("return_probabilities must be true or false")
    return float(threshold), mask_format, return_probabilities


def _prepare(instances: list, channels: int, size: int) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """Decode and preprocess every instance exactly as `genseg segment` does; the first bad one is reported.
    A blank (constant) image gives None: like the CLI, it gets an empty mask without running the model."""
    raw, inputs = [], []
    for index, instance in enumerate(instances):
        image = decode_instance(instance, index)
        try:
            inputs.append(prepare_input(image, channels, size))
        except DataError as exc:
            raise RequestError(exc.problem, status=422, index=index) from None
        raw.append(image)
    return raw, inputs


def _mask_like_cli(probabilities: np.ndarray | None, threshold: float, shape: tuple[int, int]) -> np.ndarray:
    """The binary mask at the input's resolution, computed the way `genseg segment` writes it."""
    if probabilities is None:
        return np.zeros(shape, np.uint8)
    return resize_mask((probabilities >= threshold).astype(np.uint8), tuple(shape))


def resolve_model_uri(uri: str) -> Path:
    """A local path as it is; a gs:// URI downloaded to a temporary folder (needs google-cloud-storage)."""
    if not uri.startswith("gs://"):
        return Path(uri)
    try:
        from google.cloud import storage
    except ImportError:
        raise GensegError(f"{uri}: reading gs:// needs google-cloud-storage: pip install 'genseg[gcs]'") from None
    import tempfile

    bucket_name, _, prefix = uri[len("gs://"):].partition("/")
    target = Path(tempfile.mkdtemp(prefix="genseg-model-"))
    for blob in storage.Client().list_blobs(bucket_name, prefix=prefix):
        relative = blob.name[len(prefix):].lstrip("/")
        if relative and not blob.name.endswith("/"):
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            blob.download_to_filename(str(target / relative))
    return target
