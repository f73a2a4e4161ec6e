"""Bounded decoding of input files and uploaded bytes into raw arrays (PNG/JPEG/TIFF/BMP, .npy, NIfTI).

Every decoder reads the size a file claims from its header and refuses it before allocating anything in
proportion to it, so a small hostile upload or a damaged file cannot exhaust memory; no decoder runs pickle,
external programs or plugins chosen by the file. MATLAB .mat files are read by genseg.data.figshare and DICOM by
genseg.data.dicom under the same bounds. Messages follow DataError's rule: `problem` never quotes the input, `detail` may.
"""

from __future__ import annotations

import gzip
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError

MAX_SIDE = 4096  # longest image side any decoder accepts
MAX_SLICE_PIXELS = MAX_SIDE * MAX_SIDE
MAX_CHANNELS = 4
MAX_FILE_PIXELS = 2**28  # default bound for a file on disk (`genseg segment`): a volume holds many slices
MAX_NIFTI_HEADER_BYTES = 2**20  # header plus extensions, before the voxels
UPLOAD = "upload"  # what DataError names when the input is bytes, not a file

# PIL's own decompression-bomb check (it refuses at twice this) backs up the size check made before decoding
Image.MAX_IMAGE_PIXELS = MAX_SLICE_PIXELS
PICTURE_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")  # the only PIL plugins tried: others would run Ghostscript etc.

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
GZIP_SIGNATURE = b"\x1f\x8b"
MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"), (b"\x93NUMPY", "npy"), (HDF5_SIGNATURE, "mat"),
         (b"MATLAB", "mat"))


def sniff(data: bytes) -> str | None:
    """The format of uploaded bytes from their magic number: "png", "jpeg", "npy", "mat" (v7.3/HDF5 or v5)."""
    return next((kind for magic, kind in MAGIC if data.startswith(magic)), None)


def check_size(where: str | Path, height: int, width: int, max_pixels: int, slices: int = 1,
               channels: int = 1) -> None:
    """DataError unless `slices` images of height x width with `channels` fit MAX_SIDE and `max_pixels`
    (pixels summed over slices, each pixel up to MAX_CHANNELS values)."""
    claimed = f"claimed {slices} slice(s) of {width} x {height} pixels, {channels} channel(s)"
    if min(height, width, slices, channels) < 1:
        raise DataError(where, "image is empty", claimed)
    if max(height, width) > MAX_SIDE:
        raise DataError(where, f"image is larger than {MAX_SIDE} pixels along a side", claimed)
    if height * width * slices > max_pixels:
        raise DataError(where, f"image holds more than {max_pixels} pixels", claimed)
    if channels > MAX_CHANNELS:
        raise DataError(where, f"image has more than {MAX_CHANNELS} channels", claimed)


def read_picture(source: Path | bytes, where: str | Path, max_pixels: int,
                 formats: tuple[str, ...] = PICTURE_FORMATS) -> Image.Image:
    """A PNG/JPEG/TIFF/BMP picture (PIL `formats` only), opened lazily, size-checked, then decoded."""
    im = None
    try:
        im = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=formats)
        check_size(where, im.height, im.width, max_pixels)
        im.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for damaged files
        if im is not None:
            im.close()
        if isinstance(exc, DataError):
            raise
        bomb = isinstance(exc, Image.DecompressionBombError)
        problem = (f"image is larger than {MAX_SIDE} pixels along a side" if bomb
                   else f"cannot read the image (not a valid {' or '.join(formats)} file)")
        raise DataError(where, problem, f"{type(exc).__name__}: {exc}") from None
    return im


def decode_picture(source: Path | bytes, where: str | Path, max_pixels: int,
                   formats: tuple[str, ...] = PICTURE_FORMATS) -> np.ndarray:
    """`read_picture` as float32 (H, W) or (C, H, W): grey and 16-bit kept, anything else as RGB."""
    with read_picture(source, where, max_pixels, formats) as im:
        if im.mode == "LA":
            im = im.convert("L")
        elif im.mode not in ("1", "L", "I", "I;16", "F", "RGB"):  # palette, alpha, CMYK...: plain RGB
            im = im.convert("RGB")
        array = np.asarray(im, dtype=np.float32)
    return np.moveaxis(array, -1, 0) if array.ndim == 3 else array


def decode_npy(source: Path | bytes, where: str | Path, max_pixels: int) -> np.ndarray:
    """A .npy array (H, W) or (C, H, W) of plain numbers as float32: the header is parsed and checked first,
    pickles (object arrays) and structured types are refused, and exactly the claimed bytes are read."""
    with io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb") as fp:
        try:
            version = np.lib.format.read_magic(fp)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}[version]
            shape, fortran, dtype = read_header(fp)
        except Exception as exc:  # KeyError (version), ValueError, SyntaxError, tokenize errors...
            raise DataError(where, "unreadable .npy header", f"{type(exc).__name__}: {exc}") from None
        if dtype.kind not in "biuf" or dtype.fields or dtype.subdtype or dtype.itemsize > 8:
            raise DataError(where, ".npy array must hold plain numbers (no object, structured or sub-array types)",
                            f"dtype {dtype}")
        if len(shape) not in (2, 3):
            raise DataError(where, ".npy array must be a 2-D image (H x W or C x H x W)", f"shape {shape}")
        check_size(where, shape[-2], shape[-1], max_pixels, channels=shape[0] if len(shape) == 3 else 1)
        nbytes = math.prod(shape) * dtype.itemsize
        data = fp.read(nbytes + 1)
    if len(data) != nbytes:
        raise DataError(where, ".npy data is shorter or longer than its header says")
    array = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return array.astype(np.float32)


def decode_nifti(source: Path | bytes, where: str | Path, max_pixels: int):
    """A NIfTI-1/2 single file (.nii or .nii.gz, or its bytes, gzip told by its magic number): (nibabel image,
    float32 voxels (H, W, Z)).

    The fixed header is parsed first and only the bytes it accounts for are decompressed and handed to
    nibabel, so neither the voxel count nor header extensions can claim more than the bounds.
    """
    if isinstance(source, bytes):
        f = gzip.GzipFile(fileobj=io.BytesIO(source)) if source[:2] == GZIP_SIGNATURE else io.BytesIO(source)
    else:
        f = (gzip.open if source.name.lower().endswith(".gz") else open)(source, "rb")
    try:
        with f:
            head = f.read(540)
            image_class, header = _nifti_header(head, where)
            shape, dtype = header.get_data_shape(), header.get_data_dtype()
            offset = int(header["vox_offset"])
            if dtype.kind not in "biuf" or dtype.fields:
                raise DataError(where, "NIfTI voxels must be plain numbers (no RGB or complex types)",
                                f"dtype {dtype}")
            if len(shape) == 4 and shape[-1] == 1:
                shape = shape[:3]
            if len(shape) not in (2, 3):
                raise DataError(where, "expected a 2-D or 3-D volume", f"shape {shape}")
            check_size(where, shape[0], shape[1], max_pixels, slices=shape[2] if len(shape) == 3 else 1)
            if not header.sizeof_hdr <= offset <= MAX_NIFTI_HEADER_BYTES:
                raise DataError(where, f"NIfTI voxels must start after the header, within {MAX_NIFTI_HEADER_BYTES} "
                                       f"bytes", f"vox_offset {offset}")
            end = offset + math.prod(shape) * dtype.itemsize
            data = (head + f.read(max(0, end - len(head))))[:end]
    except (OSError, EOFError) as exc:
        raise DataError(where, "unreadable NIfTI file", f"{type(exc).__name__}: {exc}") from None
    img = image_class.from_bytes(data)
    voxels = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    return img, voxels if voxels.ndim == 3 else voxels[..., None]


def _nifti_header(head: bytes, where: str | Path):
    """(image class, fixed header) of a single-file NIfTI-1 or -2, extensions not parsed; DataError otherwise."""
    import nibabel as nib

    for image_class, size, magic, at in ((nib.Nifti1Image, 348, b"n+1\0", 344), (nib.Nifti2Image, 540, b"n+2\0", 4)):
        if len(head) >= size and size in (int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")):
            if head[at:at + 4] != magic:
                raise DataError(where, "not a single-file NIfTI image (a .hdr/.img pair or a damaged header)")
            return image_class, image_class.header_class(head[:size], check=False)
    raise DataError(where, "not a NIfTI-1 or NIfTI-2 file")
