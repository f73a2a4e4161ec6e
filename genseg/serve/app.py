"""The HTTP app: Vertex AI custom-container contract over FastAPI.

Routes come from AIP_HEALTH_ROUTE / AIP_PREDICT_ROUTE (defaults /health, /predict); the model from the
given path or AIP_STORAGE_URI: a segmentation run, or a saved GenSegPipeline folder, which also enables
generate requests (`parameters.generate = N`; a mask-conditioned pipeline takes its N masks as the instances).
Health answers 503 while the model loads and 200 once it is
ready. Every error is a JSON body {"error": {"message", "instance"?}}; nothing leaks a traceback, a path or a
value from the request, and no request can name a file for the server to read or write. The event loop only
routes: decoding, the model, resizing and encoding run on threads, so health answers while they work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data.decode import MAX_SLICE_PIXELS
from ..errors import ConfigError, DataError, GensegError
from ..evaluation.metrics import dice_iou
from ..inference.files import prepare_input, resize_mask
from ..inference.postprocess import drop_regions, flip_views, merge_views
from ..inference.segmenter import load_segmenter
from .batcher import MicroBatcher
from .codec import RequestError, decode_instance, describe_prediction, encode_mask, png_b64, read_instance
from .generation import GenerationQueue
from .guard import MemoryBudget, RequestGuard, error_response
from .schema import B64Instance, Parameters, PredictRequest, validation_message
from .storage import resolve_model_uri
from .viewer import VIEWER_SEGMENT_ROUTE, add_viewer

__all__ = ["MAX_BODY_BYTES", "ServeSettings", "create_app", "resolve_model_uri"]

MAX_BODY_BYTES = 1_500_000  # Vertex AI's public-endpoint limit
log = logging.getLogger("genseg.serve")


@dataclass
class ServeSettings:
    """Limits of one server process. Pixel budgets count decoded pixels: `request_pixels` is the most one
    request may carry in all its instances, `decode_pixels` what all requests may decode at the same time."""

    max_batch: int = 16
    max_instances: int = 64
    max_generate: int = 8
    generate_queue: int = 2  # generate requests that may wait behind the running one
    max_body_bytes: int = MAX_BODY_BYTES
    body_timeout_s: float = 30.0
    request_pixels: int = 64 * 2**20
    decode_pixels: int = 48 * 2**20
    compile: bool = False
    precision: str | None = None  # as load_segmenter's: int8 serves the model's int8 export on ONNX Runtime


def create_app(model_path: str | os.PathLike | None = None, *, pipeline_path: str | os.PathLike | None = None,
               settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    if model_path and pipeline_path:
        raise GensegError("give --checkpoint (a segmentation run) or --pipeline (a saved pipeline), not both")
    source = pipeline_path or model_path or os.environ.get("AIP_STORAGE_URI")
    if not source:
        raise GensegError("no model given: pass --checkpoint RUN_DIR, --pipeline DIR or set AIP_STORAGE_URI")
    state: dict[str, Any] = {"segmenter": None, "pipeline": None, "failed": None, "train_scheduler_config": None}
    batcher = MicroBatcher(lambda images: state["segmenter"].predict(images), max_batch=settings.max_batch)
    generation = GenerationQueue(settings.generate_queue)
    budget = MemoryBudget(settings.decode_pixels)
    predict_route = os.environ.get("AIP_PREDICT_ROUTE", "/predict")

    def load() -> None:
        try:
            state["pipeline"], state["segmenter"] = _load_model(str(source), bool(pipeline_path), settings)
            if state["pipeline"] is not None:  # requests swap the sampler; each new one starts from the trained one
                state["train_scheduler_config"] = state["pipeline"].scheduler.config
            log.info("model loaded from %s (%s)%s%s", source, state["segmenter"].precision,
                     " and compiled" if settings.compile else "",
                     "; generate requests enabled" if state["pipeline"] is not None else "")
        except Exception as exc:  # noqa: BLE001 - reported by the health route, not a crash
            state["failed"] = str(exc)
            log.error("could not load the model: %s", exc)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        loading = asyncio.get_running_loop().run_in_executor(None, load)
        yield
        generation.shutdown()
        await batcher.stop()
        await loading

    app = FastAPI(title="genseg", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher, app.state.generation = batcher, generation
    app.add_middleware(RequestGuard, max_body=settings.max_body_bytes, body_timeout=settings.body_timeout_s,
                       raw_routes=frozenset({VIEWER_SEGMENT_ROUTE}))
    _add_error_handlers(app, settings)

    @app.get(os.environ.get("AIP_HEALTH_ROUTE", "/health"))
    async def health() -> JSONResponse:
        if state["segmenter"] is not None:
            pipe = state["pipeline"]
            return JSONResponse({"status": "ready", "generate": pipe is not None,
                                 **({"generate_masks": pipe.mask_source} if pipe is not None else {})})
        if state["failed"]:
            return JSONResponse({"status": "failed", "message": "the model could not be loaded; see the server log"},
                                status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.post(predict_route,
              responses={code: {"description": "error", "content": {"application/json": {}}}
                         for code in (400, 408, 413, 415, 422, 499, 503)})
    async def predict(body: PredictRequest, request: Request) -> JSONResponse:
        segmenter = state["segmenter"]
        if segmenter is None:
            raise RequestError("the model is not loaded yet", status=503)
        parameters = body.parameters or Parameters()
        if parameters.generate is not None:
            return JSONResponse({"predictions": await _generate_route(request, body, parameters)})
        if not body.instances:
            raise RequestError('"instances" must be a non-empty list')
        if len(body.instances) > settings.max_instances:
            raise RequestError(f"at most {settings.max_instances} instances per request, got {len(body.instances)}",
                               status=413)
        async with budget.reserve(MAX_SLICE_PIXELS):  # the most one instance can hold while it is decoded
            inputs = await asyncio.to_thread(_prepare, body.instances, segmenter.channels, segmenter.size,
                                             settings.request_pixels)
        probabilities = await _predict(batcher, [x for x, _ in inputs if x is not None], parameters)
        predictions = await asyncio.to_thread(_describe, inputs, probabilities, segmenter.size, parameters)
        return JSONResponse({"predictions": predictions})

    async def _generate_route(request: Request, body: PredictRequest, parameters: Parameters) -> list[dict]:
        pipe = state["pipeline"]
        if pipe is None:
            raise RequestError("this server segments only: generate requests need a pipeline (genseg serve "
                               "--pipeline DIR)")
        if parameters.generate > settings.max_generate:
            raise RequestError(validation_message([{"loc": ("parameters", "generate")}], settings.max_generate)[0])
        if pipe.mode == "inpaint":
            raise RequestError("this pipeline's generator is an inpaint model: it repaints lesions into real slices, "
                               "which generate requests do not carry; use `genseg pipeline --inpaint-into DATA.h5` "
                               "or `genseg sample --inpaint-into DATA.h5`")
        masks = None
        if pipe.mask_source == "given":
            masks = await asyncio.to_thread(_request_masks, body.instances, parameters.generate, pipe.slice_size)
        elif any(not isinstance(instance, B64Instance) or instance.b64 is not None for instance in body.instances):
            raise RequestError('a generate request takes no image instances: send "instances": [] or [{}]')
        return await generation.run(request, lambda check: _generate(pipe, state["train_scheduler_config"],
                                                                     parameters, check, masks))

    add_viewer(app, state, settings, budget, batcher, predict_route)  # after the Vertex AI routes: they match first
    return app


def _load_model(source: str, is_pipeline: bool, settings: ServeSettings):
    """(pipeline or None, Segmenter) from a run directory, a pipeline folder or a gs:// copy of either."""
    path = resolve_model_uri(source)
    if is_pipeline or (path / "model_index.json").is_file():  # AIP_STORAGE_URI may hold either kind
        from ..pipeline.genseg_pipeline import GenSegPipeline

        pipe = GenSegPipeline.load(path)
        pipe.set_progress_bar_config(disable=True)  # a server's stderr is its log, not a terminal
        if settings.precision == "int8":
            pipe.use_predictor(load_segmenter(path, batch_size=settings.max_batch, compile=settings.compile,
                                              precision="int8"))
        segmenter = pipe.predictor(batch_size=settings.max_batch, compile=settings.compile)
    else:
        pipe, segmenter = None, load_segmenter(path, batch_size=settings.max_batch, compile=settings.compile,
                                               precision=settings.precision)
    if settings.compile:  # compile now, for the batch shapes requests will bring, not inside the first requests
        for n in sorted({1, settings.max_batch}):
            segmenter.predict(np.zeros((n, segmenter.channels, segmenter.size, segmenter.size), np.float32))
    return pipe, segmenter


def _add_error_handlers(app: FastAPI, settings: ServeSettings) -> None:
    """Every error leaves in the one {"error": {"message", "instance"?}} shape, 4xx for the client's faults."""

    @app.exception_handler(RequestError)
    async def request_error(_: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, index = validation_message(list(exc.errors()), settings.max_generate)
        error: dict[str, Any] = {"message": message}
        if index is not None:
            error["instance"] = index
        return JSONResponse({"error": error}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        messages = {400: "malformed JSON body",  # FastAPI's own parse failures (huge numbers, deep nesting, ...)
                    404: "no such route", 405: "method not allowed on this route"}
        message = messages.get(exc.status_code, exc.detail if isinstance(exc.detail, str) else "request refused")
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return error_response(500, "internal error")


def _prepare(instances: list, channels: int, size: int, request_pixels: int) -> list[tuple[np.ndarray | None, tuple]]:
    """(model input or None for a blank image, original H x W) per instance, decoded and preprocessed exactly as
    `genseg segment` does, one at a time so only one raw image is held; the first bad one is reported. Decoding
    stops (413) once the request's images would hold more than `request_pixels` in total."""
    uploads = [read_instance(instance, index) for index, instance in enumerate(instances)]
    inputs, left = [], request_pixels
    for index, upload in enumerate(uploads):
        if left <= 0:
            raise RequestError(f"the request's images hold more than {request_pixels} pixels in total; send fewer "
                               f"or smaller images per request", status=413)
        image = decode_instance(upload, index, min(left, MAX_SLICE_PIXELS))
        left -= image.size
        try:
            inputs.append((prepare_input(image, channels, size), tuple(image.shape[-2:])))
        except DataError as exc:
            raise RequestError(exc.problem, status=422, index=index) from None
        uploads[index] = image = None  # release the upload and its raw image before decoding the next
    return inputs


async def _predict(batcher: MicroBatcher, to_run: list[np.ndarray], parameters: Parameters) -> list[np.ndarray]:
    """Probabilities of the preprocessed images through the shared batcher, with the request's flip TTA (its flipped
    copies join the queue like more images) and small- and unsure-region removal (genseg.inference.postprocess)."""
    if not to_run:
        return []
    views = await batcher.submit(list(flip_views(np.stack(to_run), parameters.tta)))
    merged = merge_views(np.stack(views), parameters.tta)
    return list(drop_regions(merged, parameters.threshold, parameters.min_component, parameters.min_peak))


def _describe(inputs: list, probabilities: list, model_size: int, parameters: Parameters) -> list[dict[str, Any]]:
    """The JSON of each instance; the mask at the input's resolution, computed the way `genseg segment` writes it."""
    results = iter(probabilities)
    predictions = []
    for x, shape in inputs:
        probs = next(results) if x is not None else None
        mask = (np.zeros(shape, np.uint8) if probs is None
                else resize_mask((probs >= parameters.threshold).astype(np.uint8), shape))
        predictions.append(describe_prediction(mask, probs, model_size, parameters.threshold, parameters.mask_format,
                                               parameters.return_probabilities))
    return predictions


def _request_masks(instances: list, count: int, size: int) -> np.ndarray:
    """The masks a mask-conditioned pipeline generates for: one instance per image (a PNG, .npy or nested list of
    the generator's size), holding 0 and 1, or 0 and 255 (an 8-bit mask PNG); the first bad one is reported."""
    if len(instances) != count:
        raise RequestError(f"this pipeline generates one image per given mask: send as many mask instances as "
                           f"parameters.generate ({count}), got {len(instances)}")
    masks = []
    for index, instance in enumerate(instances):
        mask = decode_instance(read_instance(instance, index), index, size * size)
        if mask.shape != (size, size):
            raise RequestError(f"a mask must be one {size}x{size} channel (the generator's size)", 422, index)
        values = set(np.unique(mask).tolist())
        if not (values <= {0, 1} or values <= {0, 255}):
            raise RequestError("a mask must hold 0 and 1 only (0 and 255 in an 8-bit PNG)", 422, index)
        masks.append((mask > 0).astype(np.uint8))
    return np.stack(masks)


def _generate(pipe, train_scheduler_config, parameters: Parameters, check_cancelled, masks: np.ndarray | None = None
              ) -> list[dict[str, Any]]:
    """Sample `generate` slices with the pipeline (for the given `masks` when it is mask-conditioned) and describe
    each like a segmentation prediction, plus the image (8-bit PNG) and, with the generator's own mask (joint) or
    the given one, that mask and its Dice with the prediction (`generated_mask` / `given_mask`, and
    `dice_generated_vs_predicted` / `dice_given_vs_predicted`: mask faithfulness)."""
    from ..pipeline.diffusion import SamplingSettings

    sampling = SamplingSettings(scheduler=parameters.scheduler, steps=parameters.steps,
                                class_label=parameters.class_label, guidance=parameters.guidance, seed=parameters.seed,
                                batch_size=parameters.generate)
    try:
        result = sampling.sample(pipe, parameters.generate, train_scheduler_config, masks=masks,
                                 callback_on_step_end=lambda *_: check_cancelled())
    except ConfigError as exc:  # class out of range, class of an unconditional model ...: our own messages
        raise RequestError(str(exc)) from None
    size = pipe.slice_size
    threshold, mask_format = parameters.threshold, parameters.mask_format
    predictions = []
    for i, (image, probabilities) in enumerate(zip(result.images, result.probabilities)):
        predicted = (probabilities >= threshold).astype(np.uint8)
        prediction = describe_prediction(predicted, probabilities, size, threshold, mask_format,
                                         parameters.return_probabilities)
        prediction.update({"index": i, "seed": parameters.seed,
                           "image": {"format": "png_b64", "data": png_b64(image)}})
        if result.labels is not None:
            prediction["class"] = int(result.labels[i])
        if result.generated_masks is not None:
            source, generated = pipe.mask_source, result.generated_masks[i]
            if mask_format != "none":
                prediction[f"{source}_mask"] = encode_mask(generated, mask_format)
            prediction[f"dice_{source}_vs_predicted"] = float(dice_iou(predicted[None], generated[None])[0][0])
        predictions.append(prediction)
    return predictions
