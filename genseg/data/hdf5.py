"""Reading HDF5 files whose writer is not trusted (MATLAB v7.3 uploads, prepared files from elsewhere).

HDF5 lets a dataset keep its bytes outside the file (external raw storage, virtual datasets, external links),
name filters that libhdf5 would go looking for in plugin libraries, and claim any size through a fill value or
a compressed chunk that inflates far beyond its shape. So objects are reached one hard link at a time and every
dataset is checked before a byte of it is read: what is read comes from this file and fits a stated bound.
Messages name a dataset only by the path the caller asked for, never by names found in the file.
"""

from __future__ import annotations

import math
import posixpath
import zlib
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
from h5py import h5a, h5d, h5l, h5z

from ..errors import DataError

SHUFFLE, DEFLATE, LZF, FLETCHER32 = h5z.FILTER_SHUFFLE, h5z.FILTER_DEFLATE, h5z.FILTER_LZF, h5z.FILTER_FLETCHER32
FILTER_NAMES = {SHUFFLE: "shuffle", DEFLATE: "gzip", LZF: "lzf", FLETCHER32: "fletcher32"}
MAX_CHUNK_BYTES = 2**26  # one chunk's buffer; a slice row of our prepared files or a MATLAB chunk is far smaller
MAX_CHUNKS = 2**14  # gzip chunks per dataset: the inflation check visits each
MAX_ATTRIBUTE_VALUES = 16


class Spec(NamedTuple):
    """What a dataset may be. kinds: numpy dtype kinds, "T" for strings; max_values, max_side: None = no bound.

    filters: the allowed pipeline, in the order the writer applies them; a dataset's filters must be a
    subsequence of it (so no filter twice, and a checksum only outermost).
    """

    kinds: str = "biuf"
    max_values: int | None = None
    max_side: int | None = None
    filters: tuple[int, ...] = (SHUFFLE, DEFLATE, FLETCHER32)


def member(group: h5py.Group, name: str, where: str | Path) -> h5py.Group | h5py.Dataset | None:
    """The object the hard link `name` (one path component) in `group` points to; None when there is no link.

    Soft, external and user-defined links are refused from the link table, before anything follows them
    (indexing would, and following an external link opens another file).
    """
    label = posixpath.join(group.name, name).lstrip("/")
    key = name.encode()
    if not group.id.links.exists(key):
        return None
    if group.id.links.get_info(key).type != h5l.TYPE_HARD:
        raise DataError(where, f"{label} is a link to another object or file; only objects stored in this file "
                               f"are read")
    return group[name]


def dataset(group: h5py.Group, name: str, where: str | Path, spec: Spec) -> h5py.Dataset | None:
    """`member` that must be a dataset meeting `spec` (see `check_dataset`); None when absent."""
    obj = member(group, name, where)
    if obj is not None:
        check_dataset(obj, posixpath.join(group.name, name).lstrip("/"), where, spec)
    return obj


def check_dataset(obj, label: str, where: str | Path, spec: Spec) -> None:
    """DataError unless `obj` is a dataset whose bytes are in this file, whose filters are in `spec.filters`,
    that passes `check_values`, and whose chunks fit the bounds."""
    if not isinstance(obj, h5py.Dataset):
        raise DataError(where, f"{label} is not a dataset")
    plist = obj.id.get_create_plist()
    if plist.get_layout() == h5d.VIRTUAL:
        raise DataError(where, f"{label} is a virtual dataset (its data would come from other files)")
    if plist.get_layout() not in (h5d.COMPACT, h5d.CONTIGUOUS, h5d.CHUNKED):
        raise DataError(where, f"{label} has an unknown storage layout")
    if plist.get_external_count():
        raise DataError(where, f"{label} keeps its data in external files; only data stored in this file is read")
    filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
    if not _is_subsequence(filters, spec.filters):
        allowed = ", ".join(FILTER_NAMES[f] for f in spec.filters)
        raise DataError(where, f"{label} needs HDF5 filters other than {allowed} (in that order, each once)",
                        f"filter ids {filters}")
    check_values(obj, label, where, spec)
    if obj.chunks is not None:
        _check_chunks(obj, filters, label, where)


def check_values(obj, label: str, where: str | Path, spec: Spec) -> None:
    """DataError unless `obj` (a dataset or an array) holds plain numbers (or strings) of `spec.kinds` in a shape
    within the bounds."""
    _check_type(obj.dtype, label, where, spec.kinds)
    if obj.shape is None:
        raise DataError(where, f"{label} has no data space")
    if spec.max_side is not None and any(side > spec.max_side for side in obj.shape):
        raise DataError(where, f"{label} is longer than {spec.max_side} along a side", f"shape {obj.shape}")
    if spec.max_values is not None and math.prod(obj.shape) > spec.max_values:
        raise DataError(where, f"{label} holds more than {spec.max_values} values", f"shape {obj.shape}")


def small_attribute(obj, name: str) -> np.ndarray | None:
    """A numeric attribute of a few values (e.g. MATLAB_empty); None when absent or anything else."""
    key = name.encode()
    if not h5a.exists(obj.id, key):
        return None
    attr = h5a.open(obj.id, key)
    if attr.dtype.kind not in "biuf" or attr.dtype.fields or attr.dtype.subdtype or attr.shape is None \
            or math.prod(attr.shape) > MAX_ATTRIBUTE_VALUES:
        return None
    value = np.empty(attr.shape, dtype=attr.dtype)
    attr.read(value)
    return value


def _is_subsequence(items: list[int], allowed: tuple[int, ...]) -> bool:
    remaining = iter(allowed)
    return all(any(item == a for a in remaining) for item in items)


def _check_type(dtype: np.dtype, label: str, where: str | Path, kinds: str) -> None:
    string = dtype.kind in "US" or h5py.check_string_dtype(dtype) is not None
    plain = dtype.kind in "biuf" and not dtype.fields and dtype.subdtype is None and dtype.itemsize <= 8
    if not (("T" in kinds and string) or (plain and dtype.kind in kinds)):
        wanted = {"b": "booleans", "i": "integers", "u": "integers", "f": "floats", "T": "strings"}
        names = ", ".join(dict.fromkeys(wanted[k] for k in kinds))
        raise DataError(where, f"{label} must hold {names} (no compound, array, reference or object types)")


def _check_chunks(obj: h5py.Dataset, filters: list[int], label: str, where: str | Path) -> None:
    """Bound chunk sizes and counts, and inflate every deflated chunk with a bound first, so neither libhdf5's
    chunk buffers nor its inflater (which grows its buffer to whatever a stream yields) can be driven past them."""
    chunk_bytes = math.prod(obj.chunks) * obj.dtype.itemsize
    if chunk_bytes > MAX_CHUNK_BYTES:
        raise DataError(where, f"{label} has chunks over {MAX_CHUNK_BYTES} bytes", f"chunks {obj.chunks}")
    if DEFLATE not in filters:
        return
    if math.prod(-(-side // chunk) for side, chunk in zip(obj.shape, obj.chunks)) > MAX_CHUNKS:
        raise DataError(where, f"{label} is split into more than {MAX_CHUNKS} gzip chunks", f"chunks {obj.chunks}")
    deflate_bit = 1 << filters.index(DEFLATE)
    trailer = 4 if filters[-1] == FLETCHER32 else 0  # the checksum is appended after deflating
    for i in range(obj.id.get_num_chunks()):
        info = obj.id.get_chunk_info(i)
        if info.size > 2 * chunk_bytes + 64:  # a deflate stream never grows its input that much
            raise DataError(where, f"{label} has a stored chunk larger than its data could be")
        mask, raw = obj.id.read_direct_chunk(info.chunk_offset)
        if mask & deflate_bit:  # written without deflate (filter skipped for this chunk)
            continue
        try:
            inflated = zlib.decompressobj().decompress(raw[:len(raw) - trailer], chunk_bytes + 1)
        except zlib.error as exc:
            raise DataError(where, f"{label} has a damaged compressed chunk", str(exc)) from None
        if len(inflated) > chunk_bytes:
            raise DataError(where, f"{label} has a compressed chunk that inflates beyond its chunk size")
