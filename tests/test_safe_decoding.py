"""Issue 20: a hostile corpus (tests/hostile.py) is refused by `load_upload` and by `load_inputs` with a clear
DataError whose `problem` quotes nothing of the input, no file the input points at is ever read, and decoding
bombs keeps memory bounded. Good files still decode the same from bytes and from disk."""

from __future__ import annotations

import io
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
from PIL import Image

import hostile
from conftest import REPO
from genseg.data.figshare import read_figshare_mat
from genseg.data.folders import find_folder_pairs, read_image_pair
from genseg.data.prepared import PreparedWriter, open_prepared
from genseg.errors import DataError
from genseg.inference.files import load_inputs, load_upload

# name: (builder given the canary (text, hdf5) paths, suffix on disk, a regex `problem` must match)
CORPUS = {
    "external storage (label)": (lambda c: hostile.external_storage(c[0], "label"), ".mat",
                                 "cjdata/label keeps its data in external files"),
    "external storage (PID)": (lambda c: hostile.external_storage(c[0], "PID"), ".mat",
                               "cjdata/PID keeps its data in external files"),
    "virtual dataset": (lambda c: hostile.virtual_dataset(c[1]), ".mat", "cjdata/PID is a virtual dataset"),
    "external link": (lambda c: hostile.external_link(c[1]), ".mat", "cjdata/PID is a link to another"),
    "soft link": (lambda c: hostile.soft_link(), ".mat", "cjdata/label is a link to another"),
    "unknown filter": (lambda c: hostile.unknown_filter(), ".mat", "cjdata/image needs HDF5 filters other than"),
    "compound type": (lambda c: hostile.compound_field(), ".mat", "cjdata/label must hold booleans, integers"),
    "fill-value bomb": (lambda c: hostile.fill_value_bomb(), ".mat", "cjdata/image is longer than 4096"),
    "gzip chunk bomb": (lambda c: hostile.chunk_bomb(), ".mat", "cjdata/image has a compressed chunk that inflates"),
    "v5 zlib bomb": (lambda c: hostile.v5_bomb(), ".mat", "MATLAB v5 data would inflate to more than"),
    "v5 cell array": (lambda c: hostile.v5_cell_field(), ".mat", "cjdata/image must hold booleans, integers"),
    "marker in label": (lambda c: hostile.marker_fields(), ".mat", r"^label is not one of 1 \(meningioma\)"),
    "control characters in PID": (lambda c: hostile.control_characters_pid(), ".mat", "PID holds control"),
    "truncated HDF5": (lambda c: hostile.truncated_hdf5(), ".mat", "unreadable MATLAB v7.3 file"),
    "PNG bomb": (lambda c: hostile.png_bomb(), ".png", "image is larger than 4096 pixels along a side"),
    "truncated PNG": (lambda c: hostile.truncated_png(), ".png", "cannot read the image"),
    "pickled .npy": (lambda c: hostile.npy_pickle(), ".npy", ".npy array must hold plain numbers"),
    "structured .npy": (lambda c: hostile.npy_structured(), ".npy", ".npy array must hold plain numbers"),
    "2**40-element .npy": (lambda c: hostile.npy_huge_shape(), ".npy", "image is larger than 4096 pixels"),
    "broken .npy header": (lambda c: hostile.npy_broken_header(), ".npy", "unreadable .npy header"),
}
POLYGLOT_PROBLEM = {"upload": "cannot read the image", ".mat": r"not a MATLAB \.mat file", ".png": "cannot read"}


@pytest.fixture
def canary(tmp_path) -> tuple[Path, Path]:
    """The canary files, with an access time far older than their modification time: any read of them moves
    it (relatime updates it exactly then), which `assert_untouched` checks."""
    paths = hostile.write_canary(tmp_path)
    for path in paths:
        os.utime(path, (0, path.stat().st_mtime))
    control = tmp_path / "control"
    control.write_text("x")
    os.utime(control, (0, control.stat().st_mtime))
    control.read_text()
    if control.stat().st_atime == 0:
        pytest.skip("this file system does not record reads (noatime)")
    return paths


def assert_untouched(paths) -> None:
    assert all(path.stat().st_atime == 0 for path in paths), "a canary file was read"


def assert_quiet(exc: DataError) -> None:
    """Neither the problem nor the whole message shows MARKER, as text or as its character codes."""
    codes = [", ".join(fmt(c) for c in hostile.MARKER_CODES[:3]) for fmt in (str, lambda c: f"{c}.0")]
    for text in (exc.problem, str(exc)):
        assert hostile.MARKER not in text and not any(run in text for run in codes), text


@pytest.mark.parametrize("name", CORPUS)
def test_upload_is_refused_without_quoting_or_reaching_anything(name, canary):
    build, _, problem = CORPUS[name]
    with pytest.raises(DataError) as info:
        load_upload(build(canary))
    assert re.search(problem, info.value.problem), info.value.problem
    assert info.value.path == "upload"
    assert_quiet(info.value)
    assert_untouched(canary)


@pytest.mark.parametrize("name", CORPUS)
def test_file_is_refused_the_same_way(name, canary, tmp_path):
    build, suffix, problem = CORPUS[name]
    path = tmp_path / f"input{suffix}"
    path.write_bytes(build(canary))
    with pytest.raises(DataError) as info:
        load_inputs(path)
    assert re.search(problem, info.value.problem), info.value.problem
    assert info.value.path == str(path)
    assert_quiet(info.value)
    assert_untouched(canary)


@pytest.mark.parametrize("where", POLYGLOT_PROBLEM)
def test_polyglot_is_read_as_what_its_magic_says(where, tmp_path):
    """PNG magic before a MATLAB v7.3 body: a PNG decoder refuses it, and it is no .mat file either (HDF5
    would find the superblock at byte 512 whatever precedes it)."""
    data = hostile.polyglot()
    if where == "upload":
        with pytest.raises(DataError, match=POLYGLOT_PROBLEM[where]):
            load_upload(data)
        return
    (tmp_path / f"x{where}").write_bytes(data)
    with pytest.raises(DataError, match=POLYGLOT_PROBLEM[where]):
        load_inputs(tmp_path / f"x{where}")


@pytest.mark.parametrize("build, problem", [(hostile.nifti_bomb, "image is larger than 4096 pixels along a side"),
                                            (hostile.nifti_extension_bomb, "cannot read")])
def test_nifti_bombs_are_refused(tmp_path, build, problem):
    (tmp_path / "bomb.nii.gz").write_bytes(build())
    with pytest.raises(DataError, match=problem):
        load_inputs(tmp_path / "bomb.nii.gz")


def test_problem_quotes_no_values_but_detail_keeps_them_for_the_owner():
    with pytest.raises(DataError) as info:
        read_figshare_mat(hostile.mat73(label=7))
    assert info.value.problem == "label is not one of 1 (meningioma), 2 (glioma), 3 (pituitary)"
    assert info.value.detail == "it is 7" and str(info.value).endswith("(it is 7)")
    again = pickle.loads(pickle.dumps(info.value))  # as it comes back from a prepare worker
    assert (again.path, again.problem, again.detail) == ("upload", info.value.problem, "it is 7")


def test_budget_refuses_before_decoding():
    """A server passes what is left of a request's pixel budget: 64 blank 4096 x 4096 PNGs cannot all decode."""
    with pytest.raises(DataError, match="image holds more than 1048576 pixels"):
        load_upload(hostile.blank_png(), max_pixels=1024 * 1024)


def test_bomb_corpus_keeps_memory_bounded(tmp_path):
    """In a fresh process (peak RSS is per process): every bomb, as bytes and as a file, plus the largest
    allowed picture, raises the peak by well under what any one bomb would need decoded."""
    script = f"""
import resource, sys
sys.path.insert(0, {str(REPO / "tests")!r})
from pathlib import Path
import hostile
from genseg.errors import DataError
from genseg.inference.files import load_inputs, load_upload
folder = Path({str(tmp_path)!r})
bombs = {{"fill.mat": hostile.fill_value_bomb(), "chunk.mat": hostile.chunk_bomb(), "v5.mat": hostile.v5_bomb(),
         "bomb.png": hostile.png_bomb(), "huge.npy": hostile.npy_huge_shape(), "bomb.nii.gz": hostile.nifti_bomb(),
         "extension.nii.gz": hostile.nifti_extension_bomb()}}
for name, data in bombs.items():
    (folder / name).write_bytes(data)
(folder / "blank.png").write_bytes(hostile.blank_png())
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for name, data in bombs.items():
    for decode, source in ((load_upload, data), (load_inputs, folder / name)):
        if name.endswith(".nii.gz") and decode is load_upload:
            continue
        try:
            decode(source)
            sys.exit(name + " was decoded")
        except DataError:
            pass
assert load_inputs(folder / "blank.png")[0].image.shape == (4096, 4096)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) < 200, f"peak RSS grew by {done.stdout.split()[-1]} MB"


def _v5_bytes(image, mask, label=1.0, pid="P1") -> bytes:
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"cjdata": {"label": np.array([[label]]), "PID": pid, "image": image,
                                         "tumorMask": mask}})
    return buffer.getvalue()


def test_good_uploads_decode_like_files(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 255, (40, 48)).astype(np.uint8)
    colour = rng.integers(0, 255, (40, 48, 3)).astype(np.uint8)
    image, mask = rng.integers(0, 1000, (32, 32)).astype(np.int16), np.eye(32, dtype=bool)
    files = {"grey.png": grey, "colour.jpg": colour, "a.npy": rng.random((3, 40, 48)).astype(np.float32)}
    for name, array in files.items():
        if name.endswith(".npy"):
            np.save(tmp_path / name, array)
        else:
            Image.fromarray(array).save(tmp_path / name)
    (tmp_path / "v5.mat").write_bytes(_v5_bytes(image, mask))
    (tmp_path / "v73.mat").write_bytes(hostile.mat73())
    for name in [*files, "v5.mat", "v73.mat"]:
        from_file, = load_inputs(tmp_path / name)
        upload, = load_upload((tmp_path / name).read_bytes())
        assert np.array_equal(from_file.image, upload.image) and from_file.meta == upload.meta, name
    assert np.array_equal(load_inputs(tmp_path / "a.npy")[0].image, files["a.npy"])
    assert np.array_equal(load_inputs(tmp_path / "grey.png")[0].image, grey)
    assert np.array_equal(load_upload(_v5_bytes(image, mask))[0].image, image)
    assert load_upload(hostile.mat73(pid="P7"))[0].meta == {"format": "figshare", "label": 1, "patient": "P7"}


def test_unknown_bytes_are_refused():
    with pytest.raises(DataError, match="not a PNG, JPEG, .npy or MATLAB .mat file"):
        load_upload(b"GIF89a" + bytes(64))


def _prepared(path: Path) -> Path:
    with PreparedWriter(path, size=8) as writer:
        writer.append(np.zeros((8, 8)), np.zeros((8, 8)), 1, "p", "s")
        writer.close()
    return path


@pytest.mark.parametrize("attack", ["external link", "external storage", "virtual dataset"])
def test_prepared_file_cannot_point_elsewhere(tmp_path, canary, attack):
    path = _prepared(tmp_path / "data.h5")
    with h5py.File(path, "a") as h5:
        del h5["patients"]
        if attack == "external link":
            h5["patients"] = h5py.ExternalLink(str(canary[1]), "/secret")
        elif attack == "external storage":
            h5.create_dataset("patients", shape=(1,), dtype="S18", external=[(str(canary[0]), 0, 18)])
        else:
            layout = h5py.VirtualLayout(shape=(1,), dtype=np.uint16)
            layout[:] = h5py.VirtualSource(str(canary[1]), "secret", shape=(len(hostile.MARKER), 1))[0:1, 0]
            h5.create_virtual_dataset("patients", layout)
    with pytest.raises(DataError, match="patients (is a link|keeps its data in external files|is a virtual)"):
        open_prepared(path)
    assert_untouched(canary)
    with open_prepared(_prepared(tmp_path / "good.h5")) as h5:
        assert h5["images"].shape == (1, 1, 8, 8)


def test_prepare_checks_picture_sizes_before_decoding(tmp_path):
    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.png").write_bytes(hostile.png_bomb())
    pair, = find_folder_pairs(tmp_path)
    with pytest.raises(DataError, match="image is larger than 4096 pixels along a side"):
        read_image_pair(pair)


@pytest.mark.parametrize("claim, problem", [
    ({"frames": 100000}, "image holds more than 268435456 pixels"),
    ({"rows": 60000, "columns": 60000}, "image is larger than 4096 pixels along a side"),
    ({"deflated": True}, "deflated DICOM files are not read"),
])
def test_dicom_claims_are_checked_before_pixel_data(tmp_path, claim, problem):
    (tmp_path / "x.dcm").write_bytes(hostile.dicom(**claim))
    with pytest.raises(DataError, match=problem):
        load_inputs(tmp_path / "x.dcm")
    (tmp_path / "ok.dcm").write_bytes(hostile.dicom())
    assert load_inputs(tmp_path / "ok.dcm")[0].image.shape == (64, 64)


def test_pid_that_is_no_text_is_a_data_error():
    """Not a ValueError from chr() escaping the reader (prepare would stop on it instead of skipping the file)."""
    def nan_pid(cjdata):
        del cjdata["PID"]
        cjdata["PID"] = np.array([[np.nan], [70.0]])

    with pytest.raises(DataError, match="PID is not MATLAB text"):
        read_figshare_mat(hostile.mat73(build=nan_pid))
