"""Request decoding and response encoding for the prediction server.

Nothing here touches the file system: instances arrive as bytes or numbers, and masks leave as bytes.
"""

from __future__ import annotations

import base64
import binascii
import io
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

MASK_FORMATS = ("png_b64", "rle", "none")
MIN_SIDE, MAX_SIDE = 8, 4096


class RequestError(Exception):
    """A problem with the request: answered with `status` and a JSON body naming the instance."""

    def __init__(self, message: str, status: int = 400, index: int | None = None):
        super().__init__(message)
        self.status = status
        self.index = index

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"message": str(self)}
        if self.index is not None:
            error["instance"] = self.index
        return {"error": error}


def decode_instance(instance: Any, index: int) -> np.ndarray:
    """An instance ({"b64": ...} with PNG/JPEG/.npy/.mat bytes, or a nested list) -> raw image (H, W) or (C, H, W).

    Files go through the very decoders `genseg segment` uses (genseg.inference.load_inputs), so a served mask
    equals the CLI's for the same file. The bytes are written to a private temporary file whose name the server
    picks from the content's magic number; nothing in a request names a path.
    """
    if isinstance(instance, dict):
        if set(instance) != {"b64"} or not isinstance(instance["b64"], str):
            raise RequestError('an object instance must be {"b64": "<base64 string>"}', index=index)
        try:
            data = base64.b64decode(instance["b64"], validate=True)
        except (binascii.Error, ValueError):
            raise RequestError("invalid base64 in 'b64'", index=index) from None
        image = _decode_bytes(data, index)
    elif isinstance(instance, list):
        try:
            image = np.asarray(instance, dtype=np.float32)
        except (ValueError, TypeError):
            raise RequestError("a list instance must be a rectangular nested list of numbers", index=index) from None
    else:
        raise RequestError('an instance must be {"b64": ...} or a nested list of numbers', index=index)
    if image.ndim not in (2, 3):
        raise RequestError(f"expected a 2-D image (H x W or C x H x W), got shape {list(image.shape)}", 422, index)
    if not (MIN_SIDE <= image.shape[-2] <= MAX_SIDE and MIN_SIDE <= image.shape[-1] <= MAX_SIDE):
        raise RequestError(f"image sides must be {MIN_SIDE}..{MAX_SIDE} pixels, got {list(image.shape[-2:])}",
                           422, index)
    return image


MAGIC_SUFFIXES = ((b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8\xff", ".jpg"), (b"MATLAB", ".mat"),
                  (b"\x89HDF", ".mat"))


def _decode_bytes(data: bytes, index: int) -> np.ndarray:
    if data.startswith(b"\x93NUMPY"):
        try:
            return np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32)
        except (ValueError, OSError, EOFError):
            raise RequestError("unreadable .npy array (object arrays are refused)", 422, index) from None
    suffix = next((s for magic, s in MAGIC_SUFFIXES if data.startswith(magic)), None)
    if suffix is None:
        raise RequestError("bytes are not a PNG, JPEG, .npy or MATLAB .mat file", 422, index)
    from ..errors import DataError
    from ..inference import load_inputs

    with tempfile.TemporaryDirectory(prefix="genseg-serve-") as tmp:
        path = Path(tmp) / f"instance{suffix}"
        path.write_bytes(data)
        try:
            slices = load_inputs(path)
        except DataError as exc:  # decoders may quote the file name: the temporary path is the server's business
            problem = exc.problem.replace(str(path), "the upload").replace(tmp, "")
            raise RequestError(f"unreadable {suffix[1:]} file: {problem}", 422, index) from None
    if len(slices) != 1:
        raise RequestError(f"expected one 2-D image, the file holds {len(slices)}", 422, index)
    return slices[0].image


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
