"""The browser viewer of `genseg serve`: a page at / and the JSON routes it calls.

The page is plain HTML, JavaScript and CSS shipped as package data (no build step, nothing fetched from
elsewhere, so it works offline). It uploads one file as the raw body of POST /viewer/segment and gets back, per
slice, the image as an 8-bit PNG and the model's tumour probabilities as an 8-bit PNG at the model's resolution:
the page thresholds them itself, so moving the threshold never asks the server again. A volume comes a page of
slices at a time (?start=&count=, at most PAGE_SLICES), so a file with thousands of slices never becomes one
huge answer. Generation goes through the prediction route's own generate request. The routes sit behind the
same body limit, read timeout, decode memory budget and micro-batcher as the Vertex AI route, and answer errors
in the same {"error": {"message"}} shape.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ..data.decode import GZIP_SIGNATURE, MAX_SLICE_PIXELS, UPLOAD, decode_nifti, sniff
from ..data.dicom import UploadMember, decode_frames, read_headers
from ..data.records import normalize_intensity
from ..errors import DataError
from ..inference.files import load_upload, prepare_input
from .codec import MIN_SIDE, RequestError, png_b64

VIEWER_SEGMENT_ROUTE = "/viewer/segment"
PAGE_SLICES = 32  # most slices one answer carries
RAW_CONTENT_TYPE = "application/octet-stream"
STATIC_FILES = {"viewer.js": "text/javascript", "viewer.css": "text/css"}
# the page's own files and the data: / blob: images it draws; no other origin, no inline script
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
                                           "base-uri 'none'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
NIFTI_HEADER_SIZES = (348, 540)


@dataclass
class UploadedVolume:
    """Decoded slices of one upload, each (H, W) or (C, H, W), and the voxel-to-RAS affine of a volume with
    patient geometry (None for a picture)."""

    kind: str  # "png", "jpeg", "npy", "mat", "nifti" or "dicom"
    slices: list[np.ndarray]
    affine: np.ndarray | None


def upload_kind(data: bytes) -> str | None:
    """What the bytes are, from their magic numbers: sniff's kinds, "dicom" or "nifti" (plain or gzipped)."""
    if data[128:132] == b"DICM":
        return "dicom"
    if data[:2] == GZIP_SIGNATURE or any(size in (int.from_bytes(data[:4], "little"), int.from_bytes(data[:4], "big"))
                                         for size in NIFTI_HEADER_SIZES):
        return "nifti"
    return sniff(data)


def decode_upload(data: bytes, kind: str, max_pixels: int) -> UploadedVolume:
    """The upload's slices, decoded from memory by the decoders `genseg segment` uses, within `max_pixels`;
    RequestError (422) naming the kind of file and the rule it broke."""
    try:
        if kind == "nifti":
            image, voxels = decode_nifti(data, UPLOAD, max_pixels)
            return UploadedVolume(kind, [voxels[..., k] for k in range(voxels.shape[-1])], image.affine)
        if kind == "dicom":
            found = decode_frames(read_headers([UploadMember(Path(UPLOAD), data=data)], max_pixels), max_pixels)
            if not found.series:
                problem = found.skipped[0] if found.skipped else DataError(UPLOAD, "holds no DICOM image")
                raise problem
            return UploadedVolume(kind, list(found.frames[0]), found.series[0].affine)
        return UploadedVolume(kind, [s.image for s in load_upload(data, max_pixels)], None)
    except DataError as exc:
        raise RequestError(f"unreadable {kind} file: {exc.problem}", 422) from None
    except Exception:  # noqa: BLE001 - a damaged stream (zlib, EOF ...): the library's text stays out of the answer
        raise RequestError(f"unreadable {kind} file: the data is damaged or truncated", 422) from None


def page_bounds(query: Any, total: int) -> tuple[int, int]:
    """(start, count) of the requested page of `total` slices; RequestError for anything else."""
    values = {}
    for name, default in (("start", 0), ("count", PAGE_SLICES)):
        text = query.get(name)
        if text is not None and not text.isdigit():
            raise RequestError(f"{name} must be a whole number")
        values[name] = default if text is None else int(text)
    start, count = values["start"], values["count"]
    if not 1 <= count <= PAGE_SLICES:
        raise RequestError(f"count must be a whole number in [1, {PAGE_SLICES}]")
    if start >= total:
        raise RequestError(f"start must be below the number of slices ({total})")
    return start, min(count, total - start)


def _shown(image: np.ndarray, blank: bool) -> np.ndarray:
    """What the page draws: the slice normalised as `genseg segment`'s overlay shows it, channels last."""
    shown = np.zeros(image.shape, np.float32) if blank else normalize_intensity(image)
    return np.moveaxis(shown, 0, -1) if shown.ndim == 3 else shown


def add_viewer(app: FastAPI, state: dict[str, Any], settings, budget, batcher, predict_route: str) -> None:
    """Register the page, its files and its routes on the server's app (state, budget and batcher are the app's)."""
    static = resources.files(__package__).joinpath("static")
    page = static.joinpath("viewer.html").read_bytes()
    files = {name: static.joinpath(name).read_bytes() for name in STATIC_FILES}

    @app.get("/", include_in_schema=False)
    async def viewer_page() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    @app.get("/viewer/config", include_in_schema=False)
    async def viewer_config() -> JSONResponse:
        pipe, segmenter = state["pipeline"], state["segmenter"]
        classes = 0
        if pipe is not None:
            from ..pipeline.diffusion import num_classes

            classes = num_classes(pipe.unet)
        return JSONResponse({"ready": segmenter is not None, "generate": pipe is not None, "classes": classes,
                             "predict_route": predict_route, "segment_route": VIEWER_SEGMENT_ROUTE,
                             "page_slices": PAGE_SLICES, "max_body_bytes": settings.max_body_bytes,
                             "threshold": segmenter.threshold if segmenter is not None else 0.5})

    @app.get("/viewer/{name}", include_in_schema=False)
    async def viewer_file(name: str) -> Response:
        if name not in files:
            raise RequestError("no such route", status=404)
        return Response(files[name], media_type=STATIC_FILES[name], headers=PAGE_HEADERS)

    @app.post(VIEWER_SEGMENT_ROUTE, include_in_schema=False)  # the page's own route, not the Vertex AI contract
    async def viewer_segment(request: Request) -> JSONResponse:
        """Segment one uploaded file (raw body); ?start=&count= choose the page of slices answered."""
        segmenter = state["segmenter"]
        if segmenter is None:
            raise RequestError("the model is not loaded yet", status=503)
        data = await request.body()
        kind = upload_kind(data)
        if kind is None:
            raise RequestError("not a PNG, JPEG, .npy, MATLAB .mat, NIfTI or DICOM file", 422)
        pixels = settings.request_pixels if kind in ("nifti", "dicom") else MAX_SLICE_PIXELS
        async with budget.reserve(pixels):
            upload = await asyncio.to_thread(decode_upload, data, kind, pixels)
            del data
            start, count = page_bounds(request.query_params, len(upload.slices))
            chosen = upload.slices[start:start + count]
            shape = chosen[0].shape[-2:]
            if not all(MIN_SIDE <= side for side in shape):
                raise RequestError(f"image sides must be at least {MIN_SIDE} pixels", 422)
            try:
                inputs = await asyncio.to_thread(lambda: [prepare_input(s, segmenter.channels, segmenter.size)
                                                          for s in chosen])
            except DataError as exc:
                raise RequestError(exc.problem, 422) from None
            to_run = [x for x in inputs if x is not None]
            probabilities = iter(await batcher.submit(to_run) if to_run else [])
            size = segmenter.size
            slices = await asyncio.to_thread(lambda: [
                {"index": start + k, "blank": x is None, "image": png_b64(_shown(image, x is None)),
                 "probability": png_b64(next(probabilities) if x is not None else np.zeros((size, size), np.float32))}
                for k, (image, x) in enumerate(zip(chosen, inputs))])
        return JSONResponse({"kind": upload.kind, "total": len(upload.slices), "start": start, "count": count,
                             "shape": [int(side) for side in shape], "model_size": size,
                             "affine": None if upload.affine is None else np.asarray(upload.affine).tolist(),
                             "slices": slices})
