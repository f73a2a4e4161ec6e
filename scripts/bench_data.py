"""Data-layer throughput: raw .mat reading, `prepare` with 1 and 2 workers, and the prepared Dataset.

Builds its own raw data (MATLAB v7.3 files at 512 x 512, written the way the Figshare set is) in a temporary
folder, so it runs anywhere:  python scripts/bench_data.py [--slices 200] [--size 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from genseg.data.figshare import find_figshare_files, read_figshare_mat, write_cvind_mat, write_figshare_mat
from genseg.data.prepare import prepare
from genseg.data.prepared import PreparedDataset


def make_raw(folder: Path, n: int, size: int = 512) -> None:
    """Brain-like int16 slices: a bright ellipse with smooth shading and noise, a tumour disc, 4 slices per patient."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size] / size
    for i in range(n):
        brain = ((xx - 0.5) / 0.38) ** 2 + ((yy - 0.5) / 0.45) ** 2 <= 1
        cx, cy = rng.uniform(0.35, 0.65, 2)
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= rng.uniform(0.03, 0.08) ** 2
        image = brain * (600 + 200 * np.sin(6 * xx + i) * np.cos(4 * yy)) + 700 * mask + rng.normal(0, 30, brain.shape)
        write_figshare_mat(folder / f"{i + 1}.mat", image.clip(0, 4000).astype(np.int16), mask, 1 + i % 3,
                           f"P{i // 4}")
    write_cvind_mat(folder / "cvind.mat", [1 + (i // 4) % 5 for i in range(n)])


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def dataset_rate(path: Path, num_workers: int, min_slices: int = 4000, batch_size: int = 32) -> float:
    """Slices/s through a shuffling DataLoader, as training reads them; the first batch is not timed."""
    ds = PreparedDataset(path)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                        persistent_workers=num_workers > 0)
    next(iter(loader))
    seen, start = 0, time.perf_counter()
    while seen < min_slices:
        for batch in loader:
            seen += batch["image"].shape[0]
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200, help="raw v7.3 files to generate")
    parser.add_argument("--size", type=int, default=256, help="prepared slice size")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        raw, n = Path(tmp) / "raw", args.slices
        raw.mkdir()
        print(f"writing {n} v7.3 files at 512x512 ... ", end="", flush=True)
        print(f"{timed(lambda: make_raw(raw, n)):.1f} s")
        files = find_figshare_files(raw)
        rows = [("raw .mat read (h5py, transpose)", n / timed(lambda: [read_figshare_mat(p) for p in files]), "slices/s")]
        for workers in (1, 2):
            out = Path(tmp) / f"w{workers}.h5"
            seconds = timed(lambda: prepare(raw, out, size=args.size, workers=workers, progress=False))
            rows.append((f"prepare, {workers} worker(s), -> {args.size}x{args.size}", n / seconds, "slices/s"))
        for num_workers in (0, 2):
            rows.append((f"PreparedDataset via DataLoader, num_workers={num_workers}",
                         dataset_rate(Path(tmp) / "w1.h5", num_workers), "slices/s"))
        rows.append(("prepared file size per slice", (Path(tmp) / "w1.h5").stat().st_size / n / 1024, "KiB"))
    print(f"\n{'measure':<48}{'value':>10}  unit")
    for name, value, unit in rows:
        print(f"{name:<48}{value:>10.1f}  {unit}")
    print(f"(prepare speed-up with 2 workers: {rows[2][1] / rows[1][1]:.2f}x)")


if __name__ == "__main__":
    main()
