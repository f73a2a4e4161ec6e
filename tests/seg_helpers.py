"""Small synthetic prepared files for the segmentation tests: a grey 'brain' ellipse with a brighter ellipse as
tumour (labels 1..3), and some tumour-free slices (label 0). Preprocessed like `genseg prepare` and written with
the real PreparedWriter, so a model trained on them segments raw phantoms run through `genseg segment`."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from genseg.data.prepared import PreparedWriter
from genseg.data.records import preprocess_pair


def phantom(rng: np.random.Generator, size: int, tumour: bool) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size] / size
    brain = ((yy - 0.5) / 0.42) ** 2 + ((xx - 0.5) / 0.36) ** 2 < 1
    image = brain * (0.35 + 0.1 * np.sin(12 * yy + rng.uniform(0, 6))) + rng.normal(0, 0.03, (size, size))
    mask = np.zeros((size, size), np.uint8)
    if tumour:
        cy, cx = rng.uniform(0.3, 0.7, 2)
        ry, rx = rng.uniform(0.06, 0.14, 2)
        mask = ((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) < 1).astype(np.uint8)
        image = image + 0.45 * mask
    return np.clip(image, 0, 1).astype(np.float32), mask


def write_phantoms(path: str | Path, n: int = 40, size: int = 32, patients: int = 10, empty_every: int = 4,
                   seed: int = 0, channels: int = 1, **attrs) -> Path:
    """n slices from `patients` patients spread over 5 patient-wise folds; every `empty_every`-th is tumour-free."""
    rng = np.random.default_rng(seed)
    with PreparedWriter(path, size=size, channels=channels, source_format="test", **attrs) as writer:
        for i in range(n):
            tumour = i % empty_every != 0
            image, mask = preprocess_pair(*phantom(rng, size, tumour), size)  # as `genseg prepare` would
            writer.append(np.repeat(image, channels, 0), mask, label=(1 + i % 3) if tumour else 0,
                          patient=f"p{i % patients}", source=f"slice{i}")
        folds = np.array([1 + (i % patients) % 5 for i in range(n)])
        return writer.close(folds=folds)


def write_synthetic(path: str | Path, n: int = 12, size: int = 32, seed: int = 1, quality: bool = True, **kw) -> Path:
    """A file marked synthetic, optionally with the per-slice quality datasets evaluate-synthetic writes."""
    import h5py

    write_phantoms(path, n=n, size=size, patients=n, seed=seed, synthetic=True,
                   metadata={"model": "test-ddpm", "scheduler": "dpmsolver", "steps": 20, "seed": seed}, **kw)
    if quality:
        with h5py.File(path, "a") as h5:
            h5["quality_agreement"] = np.linspace(0, 1, n, dtype=np.float32)
            nn = np.linspace(0, 2, n, dtype=np.float32)
            nn[0] = np.nan
            h5["quality_nn_ratio"] = nn
    return Path(path)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny convolutions on a shared 2-core machine run several times faster on one thread than on two that
    wait for each other; restored afterwards. Test modules opt in with `from seg_helpers import one_torch_thread`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ROOT = Path(__file__).resolve().parents[1]


def cli_env() -> dict:
    """The environment for `python -m genseg` subprocesses: this checkout's genseg, one thread."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def kill_after_first_checkpoint(args: list[str], run: Path) -> None:
    """Start `ARGS` (a genseg training command writing to `run`), SIGKILL it once its first checkpoint exists."""
    proc = subprocess.Popen(args, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((run / "checkpoints").glob("step-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
