"""`genseg sample` and `genseg segment` over 2 real CPU processes (torchrun, accelerate launch; gloo): the merged
outputs equal a single process's (bit for bit but for the last bits of generated images), and a process that dies
leaves no output file behind."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from diffusion_helpers import tiny_generator
from genseg.distributed import TEST_EXIT_RANK
from genseg.io import _HOST
from genseg.pipeline.diffusion import SamplingSettings
from genseg.workflows.sampling import sample_to_file
from genseg.serve.testing import make_untrained_segmenter
from seg_helpers import phantom

REPO = Path(__file__).resolve().parents[1]
NUM = 5  # odd: the processes get 3 and 2 batches of one image
SAMPLING = ["--steps", "3", "--seed", "7", "--batch-size", "1"]


def _env(**extra) -> dict:
    """CUDA hidden: these are the CPU (gloo) runs whatever the machine has. One thread per process, set before
    start as torchrun sets it for its children: a CPU matrix product started with OMP_NUM_THREADS=1 can round
    differently from one in a 2-thread process (torch.set_num_threads later does not undo it), so the
    single-process reference runs as its own process under the same setting, never inside pytest."""
    return {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **extra}


def single_process(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "genseg", *map(str, args)], env=_env(), capture_output=True,
                          text=True, timeout=240)


def torchrun(*args, env=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "genseg",
           *map(str, args)]
    return subprocess.run(cmd, env=env or _env(), capture_output=True, text=True, timeout=240)


def accelerate_launch(*args) -> subprocess.CompletedProcess:
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), "-m", "genseg", *map(str, args)]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def generator(tmp_path_factory) -> Path:
    return tiny_generator(tmp_path_factory.mktemp("dist"))


def h5_contents(path: Path) -> tuple[dict, dict]:
    with h5py.File(path) as h5:
        return {name: h5[name][()] for name in h5}, dict(h5.attrs)


def assert_same_samples(one: Path, two: Path) -> None:
    """Two sample files hold the same slices: every dataset and attribute equal (but the time written), images
    to within float rounding. The images of a mask-conditioned run differed in the last bits of float32 (one
    float16 step in one pixel) between a plain process and a torchrun child with identical inputs, on an AMD
    EPYC CPU with AVX-512; any sharding or merging error moves them by far more."""
    (data1, attrs1), (data2, attrs2) = h5_contents(one), h5_contents(two)
    assert sorted(data1) == sorted(data2)
    for name in data1:
        assert data1[name].dtype == data2[name].dtype and data1[name].shape == data2[name].shape, name
        if name == "images":
            assert np.abs(data1[name].astype(np.float32) - data2[name].astype(np.float32)).max() <= 2e-3
        else:
            assert np.array_equal(data1[name], data2[name]), name
    assert {k: v for k, v in attrs1.items() if k != "created"} == {k: v for k, v in attrs2.items() if k != "created"}


def test_two_processes_write_the_single_process_file(generator, tmp_path):
    # the same file name in two folders: each slice's `sources` entry names the file
    one = tmp_path / "one" / "synth.h5"
    assert single_process("sample", "--checkpoint", generator, "-n", NUM, "--out", one, *SAMPLING).returncode == 0
    two = tmp_path / "two" / "synth.h5"
    done = torchrun("sample", "--checkpoint", generator, "-n", NUM, "--out", two, *SAMPLING)  # --num: see README
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("wrote 5 synthetic slices") == 1  # the main process's line only
    assert_same_samples(one, two)
    data, _ = h5_contents(two)
    assert sorted(data) == ["fold", "images", "labels", "masks", "patients", "slice_index", "sources", "split"]
    assert data["images"].shape == (NUM, 1, 16, 16) and data["masks"].any()
    assert [p.name for p in two.parent.iterdir()] == ["synth.h5"]  # the shard folder is gone


CONDITIONED = {  # mode: (model keys, more CLI arguments, the line it prints)
    "mask-conditioned": ({"mode": "mask-conditioned"}, ["--mask-augment", "flip,rotate", "--per-mask", 2],
                         "wrote 6 synthetic slices (3 given masks x 2)"),
    "inpaint": ({"mode": "inpaint", "crop_size": 8, "region_margin": 1}, [], "lesions placed"),
}


@pytest.mark.parametrize("mode", CONDITIONED)
def test_conditioned_sampling_over_two_processes_equals_one_process(tmp_path, mode):
    """`sample --masks-from` (`--inpaint-into`) over 2 processes: each denoises its share of the given masks
    (slices, masks and regions), and the merged file equals a single process's (the masks exactly as given)."""
    model, arguments, wrote = CONDITIONED[mode]
    run = tiny_generator(tmp_path, model)
    data = tmp_path / "phantoms.h5"  # the generator's training data: 4 training slices of 16 px
    given = ["--inpaint-into" if mode == "inpaint" else "--masks-from", data, *arguments]
    one, two = tmp_path / "one" / "synth.h5", tmp_path / "two" / "synth.h5"
    alone = single_process("sample", "--checkpoint", run, "-n", 3, *given, "--out", one, *SAMPLING)
    assert alone.returncode == 0 and wrote in alone.stdout, alone.stderr
    done = torchrun("sample", "--checkpoint", run, "-n", 3, *given, "--out", two, *SAMPLING)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(wrote) == 1
    assert_same_samples(one, two)


def test_a_process_that_dies_leaves_no_output(generator, tmp_path):
    out = tmp_path / "synth.h5"
    done = torchrun("sample", "--checkpoint", generator, "-n", NUM, "--out", out, *SAMPLING,
                    env=_env(**{TEST_EXIT_RANK: "1"}))  # rank 1 os._exit()s after its first image
    assert done.returncode != 0 and re.search(r"exitcode\s*:\s*17", done.stderr), done.stderr  # died as told
    assert not out.exists()
    left = [p for p in tmp_path.iterdir() if p.name != "synth.h5"]
    assert all(p.name.startswith(f".{out.name}.") and p.name.endswith(".tmp") for p in left), left
    # here gloo tells the main process its peer is gone and it removes its shard folder on the way out; a main
    # process killed outright cannot, and its folder (named after its pid) goes with the next write of the file
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".{out.name}.{_HOST}-{dead.pid}.0123abcd.tmp"
    stale.mkdir()
    (stale / "rank-00000.npz").write_bytes(b"half a shard")
    sample_to_file(generator, NUM, out, SamplingSettings(steps=3, seed=7, batch_size=1), progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["synth.h5"]  # the next run cleaned up
    with h5py.File(out) as h5:
        assert len(h5["images"]) == NUM


def segment_inputs(folder: Path) -> list[Path]:
    """5 PNG slices, a 3-slice NIfTI volume and one unreadable file: 7 inputs, split 4 + 3."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        image, _ = phantom(rng, 48, tumour=i % 2 == 0)
        Image.fromarray((image * 255).astype(np.uint8)).save(folder / f"scan{i}.png")
        paths.append(folder / f"scan{i}.png")
    volume = np.stack([(1000 * phantom(rng, 48, True)[0]).astype(np.int16) for _ in range(3)], -1)
    nib.save(nib.Nifti1Image(volume, np.diag([0.9, 0.9, 3.0, 1.0])), folder / "vol.nii.gz")
    (folder / "broken.png").write_bytes(b"not a picture")
    return paths[:3] + [folder / "vol.nii.gz", folder / "broken.png"] + paths[3:]


def test_segment_over_two_processes_equals_one_process(tmp_path):
    seg = make_untrained_segmenter(tmp_path / "seg", size=32)
    inputs = segment_inputs(tmp_path / "in")
    args = [*inputs, "--checkpoint", seg, "--threshold", "0.515"]  # this untrained model: ~0.513-0.516
    env = _env()
    one = subprocess.run([sys.executable, "-m", "genseg", "segment", *map(str, args), "--out", tmp_path / "one"],
                         env=env, capture_output=True, text=True, timeout=180)
    two = accelerate_launch("segment", *args, "--out", tmp_path / "two")
    assert one.returncode == 1 and two.returncode != 0, (one.stderr, two.stderr)  # broken.png fails in both
    files1 = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*"))
    files2 = sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*"))
    assert files1 == files2 and len(files1) == 5 * 2 + 3 * 2 + 1  # mask + overlay per slice, the volume's NIfTI
    for name in files1:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    masks = [np.asarray(Image.open(tmp_path / "one" / n)) for n in files1 if str(n).endswith("_mask.png")]
    assert any(m.any() for m in masks) and not all(m.all() for m in masks)  # not trivially equal
    assert "wrote 17 files" in one.stdout and two.stdout.count("wrote 17 files") == 1
    assert two.stderr.count("broken.png: cannot read") == 1  # the merged report, printed once
    # outputs are checked once, on the whole list, before anything is written: nothing is touched
    before = {name: (tmp_path / "two" / name).stat().st_mtime_ns for name in files1}
    again = accelerate_launch("segment", *args, "--out", tmp_path / "two")
    assert again.returncode != 0 and "already exists" in again.stderr
    assert before == {name: (tmp_path / "two" / name).stat().st_mtime_ns for name in files1}
