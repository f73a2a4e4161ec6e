"""Request decoding and response encoding for the prediction server.

Nothing here touches the file system: instances arrive as bytes or numbers and are decoded from memory, and
masks leave as bytes.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
from typing import Any

import numpy as np
from PIL import Image

from ..data.decode import MAX_SIDE, sniff
from ..errors import DataError
from ..inference.files import load_upload

MIN_SIDE = 8
log = logging.getLogger("genseg.serve")


class RequestError(Exception):
    """A problem with the request: answered with `status` and a JSON body naming the instance. Messages name
    the rule broken, never a value taken from the request."""

    def __init__(self, message: str, status: int = 400, index: int | None = None):
        super().__init__(message)
        self.status = status
        self.index = index

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"message": str(self)}
        if self.index is not None:
            error["instance"] = self.index
        return {"error": error}


def read_instance(instance: Any, index: int) -> bytes | np.ndarray:
    """The upload's bytes (a {"b64": ...} instance) or the float32 array of a nested-list instance."""
    if isinstance(instance, list):
        try:
            return np.asarray(instance, dtype=np.float32)
        except (ValueError, TypeError, OverflowError, RecursionError):
            raise RequestError("a list instance must be a rectangular nested list of numbers", index=index) from None
    data = getattr(instance, "b64", None)
    if not isinstance(data, str):
        raise RequestError('an object instance must be {"b64": "<base64 string>"}', index=index)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("invalid base64 in 'b64'", index=index) from None


def decode_instance(upload: bytes | np.ndarray, index: int, max_pixels: int) -> np.ndarray:
    """A read instance -> raw image (H, W) or (C, H, W), decoded from memory by the very decoders `genseg segment`
    uses (genseg.inference.files.load_upload), so a served mask equals the CLI's for the same file. Nothing larger
    than `max_pixels` is allocated."""
    if isinstance(upload, np.ndarray):
        image = upload
    else:
        try:
            slices = load_upload(upload, max_pixels=max_pixels)
        except DataError as exc:
            raise _unreadable(exc, sniff(upload) or "upload", index) from None
        if len(slices) != 1:
            raise RequestError(f"expected one 2-D image, the file holds {len(slices)}", 422, index)
        image = slices[0].image
    if image.ndim not in (2, 3):
        raise RequestError(f"expected a 2-D image (H x W or C x H x W), got {image.ndim} dimensions", 422, index)
    if not (MIN_SIDE <= image.shape[-2] <= MAX_SIDE and MIN_SIDE <= image.shape[-1] <= MAX_SIDE):
        raise RequestError(f"image sides must be {MIN_SIDE}..{MAX_SIDE} pixels", 422, index)
    return image


def _unreadable(exc: DataError, kind: str, index: int) -> RequestError:
    """The client hears the kind of file and the rule it broke; the detail (library text) stays in the log."""
    log.info("instance %d: %s", index, exc)
    return RequestError(f"unreadable {kind} file: {exc.problem}", 422, index)


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """Row-major run lengths of a binary mask, starting with a run of zeros (possibly of length 0)."""
    flat = np.asarray(mask, dtype=bool).ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    values = np.arange(len(rle["counts"])) % 2
    return np.repeat(values, rle["counts"]).astype(np.uint8).reshape(rle["size"])


def png_b64(image: np.ndarray) -> str:
    """A binary mask (uint8/bool: 0 or 255) or a [0, 1] float image (8-bit grey) as base64 PNG bytes."""
    image = np.asarray(image)
    pixels = (np.clip(image, 0, 1) * 255).round() if image.dtype.kind == "f" else (image > 0) * 255
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def encode_mask(mask: np.ndarray, mask_format: str) -> dict[str, Any] | None:
    """A binary mask in the requested response format (None for "none")."""
    if mask_format == "png_b64":
        return {"format": "png_b64", "data": png_b64(np.asarray(mask, dtype=bool))}
    if mask_format == "rle":
        return {"format": "rle", **rle_encode(mask)}
    return None


def describe_prediction(mask: np.ndarray, probabilities: np.ndarray | None, model_size: int, threshold: float,
                        mask_format: str, return_probabilities: bool) -> dict[str, Any]:
    """The JSON for one instance. `mask` is at the input's resolution, exactly what `genseg segment` writes;
    `probabilities` are the model's (S, S) map, None for a blank image that was not run through the model."""
    mask = np.asarray(mask, dtype=bool)
    area = int(mask.sum())
    rows, cols = np.nonzero(mask)
    if probabilities is None:
        probabilities = np.zeros((model_size, model_size), np.float32)
    confident = probabilities >= threshold
    prediction: dict[str, Any] = {
        "tumour_area_px": area,
        "tumour_share": area / mask.size,
        "bbox": [int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())] if area else None,
        "mean_probability": float(probabilities[confident].mean()) if confident.any() else 0.0,
        "max_probability": float(probabilities.max()),
        "image_size": list(mask.shape),
        "input_size": [model_size, model_size],
    }
    if mask_format != "none":
        prediction["mask"] = encode_mask(mask, mask_format)
    if return_probabilities:
        step = max(1, model_size // 32)  # block means down to about 32 x 32 keep responses small
        side = model_size // step
        pooled = probabilities[: side * step, : side * step].reshape(side, step, side, step).mean(axis=(1, 3))
        prediction["probabilities"] = np.round(pooled, 3).tolist()
    return prediction
