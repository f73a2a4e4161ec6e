"""Builders for a hostile input corpus: each function returns the bytes of one file a hostile client could send.

Files that try to reach other files point at a canary (`write_canary`) holding MARKER: a decoder that follows
them would put MARKER, or its character codes, into a record or a message. Bombs are small files that claim or
inflate to far more than any decoder may allocate; zlib streams are assembled from one repeated flushed block,
so building a bomb of hundreds of megabytes takes no time and little memory.
"""

from __future__ import annotations

import functools
import io
import pickle
import struct
import zlib
from pathlib import Path

import h5py
import numpy as np
import scipy.io

MARKER = "GENSEG-CANARY-7f3a"
MARKER_CODES = [ord(c) for c in MARKER]  # how a leak through a numeric field would show
BOMB_BYTES = 400 * 2**20  # what the bombs inflate to: past every bound, more than a test run may spend
MIB = bytes(2**20)


def write_canary(folder: Path) -> tuple[Path, Path]:
    """A text file and an HDF5 file (dataset /secret, MATLAB char codes) that hold MARKER: (text, hdf5)."""
    text, hdf5 = folder / "canary.txt", folder / "canary.h5"
    text.write_text(MARKER + "\n")
    with h5py.File(hdf5, "w") as f:
        f["secret"] = np.array(MARKER_CODES, np.uint16)[:, None]
    return text, hdf5


def mat73(image_side: int = 32, label: float = 1.0, pid: str = "P1", build=None) -> bytes:
    """A Figshare slice as MATLAB v7.3 writes it (512-byte header, HDF5 after it, arrays transposed);
    `build(cjdata_group)` may replace or add fields before the file is closed."""
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    with h5py.File(buffer, "w", userblock_size=512) as f:
        cjdata = f.create_group("cjdata")
        cjdata["image"] = rng.integers(0, 1000, (image_side, image_side)).astype(np.int16)
        cjdata["tumorMask"] = np.eye(image_side, dtype=np.uint8)
        cjdata["label"] = np.array([[label]])
        cjdata["PID"] = np.array([ord(c) for c in pid], np.uint16)[:, None]
        if build is not None:
            build(cjdata)
    data = buffer.getvalue()
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    return header.ljust(116) + bytes(8) + b"\x00\x02IM" + data[128:]


def _replace(name: str, **create):
    def build(cjdata):
        del cjdata[name]
        cjdata.create_dataset(name, **create)

    return build


def external_storage(canary_text: Path, field: str = "label") -> bytes:
    """cjdata/<field> keeps its bytes in the canary text file (HDF5 external raw storage)."""
    size = len(MARKER)
    return mat73(build=_replace(field, shape=(size, 1), dtype=np.uint8, external=[(str(canary_text), 0, size)]))


def virtual_dataset(canary_hdf5: Path) -> bytes:
    """cjdata/PID is a virtual dataset mapping the canary file's /secret."""
    def build(cjdata):
        del cjdata["PID"]
        layout = h5py.VirtualLayout(shape=(len(MARKER), 1), dtype=np.uint16)
        layout[:] = h5py.VirtualSource(str(canary_hdf5), "secret", shape=(len(MARKER), 1))
        cjdata.create_virtual_dataset("PID", layout)

    return mat73(build=build)


def external_link(canary_hdf5: Path) -> bytes:
    """cjdata/PID is an external link to the canary file's /secret."""
    def build(cjdata):
        del cjdata["PID"]
        cjdata["PID"] = h5py.ExternalLink(str(canary_hdf5), "/secret")

    return mat73(build=build)


def soft_link() -> bytes:
    """cjdata/label is a soft link to /secret, a dataset of MARKER codes elsewhere in the file."""
    def build(cjdata):
        cjdata.file["secret"] = np.array(MARKER_CODES, np.float64)[:, None]
        del cjdata["label"]
        cjdata["label"] = h5py.SoftLink("/secret")

    return mat73(build=build)


def unknown_filter() -> bytes:
    """cjdata/image declares a filter id no library registers (optional, so HDF5 lets it be written)."""
    def build(cjdata):
        del cjdata["image"]
        plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        plist.set_chunk((16, 16))
        plist.set_filter(32015, h5py.h5z.FLAG_OPTIONAL, ())
        space = h5py.h5s.create_simple((32, 32))
        h5py.h5d.create(cjdata.id, b"image", h5py.h5t.NATIVE_INT16, space, dcpl=plist)
        cjdata["image"][:] = np.arange(32 * 32, dtype=np.int16).reshape(32, 32)

    return mat73(build=build)


def compound_field() -> bytes:
    """cjdata/label of a compound type (fields r, i), as MATLAB stores complex numbers."""
    return mat73(build=_replace("label", data=np.array([[(1.0, 2.0)]], dtype=[("r", "<f8"), ("i", "<f8")])))


def fill_value_bomb() -> bytes:
    """cjdata/image claims 10000 x 10000 bytes that exist only as a fill value: a few KB of file."""
    return mat73(build=_replace("image", shape=(10000, 10000), dtype=np.uint8, chunks=(1000, 1000), fillvalue=1))


def chunk_bomb() -> bytes:
    """cjdata/image is a 1024 x 1024 gzip-chunked dataset whose one chunk (2 MiB of data, a stream of less)
    inflates to BOMB_BYTES."""
    def build(cjdata):
        del cjdata["image"]
        image = cjdata.create_dataset("image", shape=(1024, 1024), dtype=np.int16, chunks=(1024, 1024),
                                      compression="gzip")
        image.id.write_direct_chunk((0, 0), deflated_zeros(BOMB_BYTES))

    return mat73(build=build)


def v5_bomb() -> bytes:
    """A MATLAB v5 file whose one compressed element is a 20480 x 20480 uint8 'cjdata' (BOMB_BYTES)."""
    side = 20480

    def element(kind: int, payload: bytes) -> bytes:
        return struct.pack("<II", kind, len(payload)) + payload + bytes(-len(payload) % 8)

    flags = element(6, struct.pack("<II", 9, 0))  # miUINT32: class mxUINT8
    dims = element(5, struct.pack("<ii", side, side))  # miINT32
    name = element(1, b"cjdata")  # miINT8
    matrix_header = flags + dims + name + struct.pack("<II", 2, side * side)  # then miUINT8 data
    matrix_tag = struct.pack("<II", 14, len(matrix_header) + side * side)  # miMATRIX
    body = deflated_zeros(side * side, prefix=matrix_tag + matrix_header)
    header = b"MATLAB 5.0 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024".ljust(116)
    return header + bytes(8) + b"\x00\x01IM" + struct.pack("<II", 15, len(body)) + body


def marker_fields() -> bytes:
    """A v7.3 slice whose label holds MARKER's codes and whose PID is MARKER: a message quoting either leaks."""
    return mat73(pid=MARKER, build=_replace("label", data=np.array(MARKER_CODES, np.float64)[:, None]))


def control_characters_pid() -> bytes:
    """A v7.3 slice whose PID carries a terminal escape sequence (it would reach logs and the CLI's output)."""
    return mat73(pid="P1\x1b]0;owned\x07")


def v5_cell_field() -> bytes:
    """A MATLAB v5 slice whose image is a cell array (scipy hands cells over as object arrays)."""
    cell = np.empty((1, 1), dtype=object)
    cell[0, 0] = np.arange(16.0).reshape(4, 4)
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"cjdata": {"label": np.array([[1.0]]), "PID": "P1", "image": cell,
                                         "tumorMask": np.eye(4, dtype=bool)}})
    return buffer.getvalue()


def polyglot() -> bytes:
    """PNG magic, then a MATLAB v7.3 slice: HDF5 finds its superblock at byte 512 whatever precedes it."""
    return b"\x89PNG\r\n\x1a\n" + mat73()[8:]


def truncated_hdf5() -> bytes:
    data = mat73(image_side=128)
    return data[:len(data) // 2]


def png(width: int, height: int, bit_depth: int = 8, rows: bytes | None = None) -> bytes:
    """A grey PNG of zeros (or of the given filtered rows), written by hand so a bomb costs nothing to build."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    row_bytes = 1 + (width * bit_depth + 7) // 8  # filter byte + packed samples
    idat = deflated_zeros(row_bytes * height) if rows is None else zlib.compress(rows)
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png_bomb() -> bytes:
    """10000 x 10000 1-bit PNG of a few KB: 100 M pixels once decoded."""
    return png(10000, 10000, bit_depth=1)


def blank_png() -> bytes:
    """A blank 4096 x 4096 PNG: the largest picture allowed, tiny on the wire (a request may carry 64)."""
    return png(4096, 4096)


def truncated_png() -> bytes:
    rows = b"".join(b"\0" + bytes(range(64)) for _ in range(64))
    data = png(64, 64, rows=rows)
    return data[:len(data) - 30]


def dicom(rows: int = 64, columns: int = 64, frames: int = 1, deflated: bool = False) -> bytes:
    """An MR image written by pydicom, claiming `frames` frames of rows x columns but holding one frame."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian if deflated else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = np.arange(64 * 64, dtype=np.int16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def npy(header: str, payload: bytes = b"") -> bytes:
    """A version 1.0 .npy file with a literal header (padded the way numpy pads it)."""
    text = header.encode("latin1")
    text += b" " * (-(10 + len(text) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + payload


def npy_pickle() -> bytes:
    """An object array: np.load(allow_pickle=True) would unpickle the payload."""
    return npy("{'descr': '|O', 'fortran_order': False, 'shape': (1,), }", pickle.dumps([MARKER]))


def npy_structured() -> bytes:
    return npy("{'descr': [('a', '<f4'), ('b', '<i4')], 'fortran_order': False, 'shape': (8, 8), }", bytes(512))


def npy_huge_shape() -> bytes:
    return npy("{'descr': '<f4', 'fortran_order': False, 'shape': (1048576, 1048576), }", bytes(64))


def npy_broken_header() -> bytes:
    return npy("{'descr': '<f4', 'fortran_order': False, 'shape': (8, 8, ", bytes(256))


def nifti_bomb() -> bytes:
    """A .nii.gz of a few KB whose header claims 12288 x 12288 uint8 voxels, all of them present as zeros."""
    import nibabel as nib

    side = 12288
    header = nib.Nifti1Header()
    header.set_data_shape((side, side, 1))
    header.set_data_dtype(np.uint8)
    header["vox_offset"] = 352
    return deflated_zeros(side * side, prefix=header.binaryblock + bytes(4), gzip=True)


def nifti_extension_bomb() -> bytes:
    """An 8 x 8 .nii.gz whose header extension claims 2 GB; the stream then inflates to BOMB_BYTES of zeros."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape((8, 8, 1))
    header.set_data_dtype(np.uint8)
    header["vox_offset"] = 368
    extension = struct.pack("<ii", 2**31 - 16, 6)  # esize, ecode (comment)
    return deflated_zeros(BOMB_BYTES, prefix=header.binaryblock + b"\1\0\0\0" + extension, gzip=True)


@functools.lru_cache(maxsize=None)
def deflated_zeros(nbytes: int, prefix: bytes = b"", gzip: bool = False) -> bytes:
    """A zlib (or gzip) stream of `prefix` then `nbytes` zeros, built from one fully flushed 1 MiB block
    repeated, so it costs neither time nor memory; the checksum trailer is computed the same way."""
    whole, rest = divmod(nbytes, len(MIB))
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31 if gzip else 15)
    head = compressor.compress(prefix) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(MIB) + compressor.flush(zlib.Z_FULL_FLUSH)
    tail = compressor.compress(bytes(rest)) + compressor.flush()
    checksum = zlib.crc32 if gzip else zlib.adler32
    value = checksum(prefix)
    for _ in range(whole):
        value = checksum(MIB, value)
    value = checksum(bytes(rest), value)
    if gzip:
        trailer = struct.pack("<II", value, (len(prefix) + nbytes) % 2**32)
    else:
        trailer = struct.pack(">I", value)
    return head + block * whole + tail[:-len(trailer)] + trailer
