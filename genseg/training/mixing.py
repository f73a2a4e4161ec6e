"""How real and synthetic slices are mixed into segmentation training (`train-seg --synthetic-ratio R`).

How an epoch is formed (R = synthetic_ratio, n_real = real training slices after `real_fraction`):
- epoch length L = n_real when R < 1, and the number of (filtered) synthetic slices when R = 1;
- round(R * L) positions of the epoch are synthetic slices, the other L - round(R * L) real slices;
- the real ones are a random subset without repetition (all of them when R = 0); the synthetic ones are drawn
  without repetition too, cycling through fresh permutations only if more are needed than the file holds;
- the L indices are shuffled together. Everything is a function of (seed, epoch), so every process of a
  multi-GPU run and a resumed run see exactly the same epoch.
So R changes what an epoch is made of, never how long it is: runs with different R cost the same compute.
`foreground_fraction` G (None = off) makes the real positions foreground-aware: round(G x real positions) of them
are slices with tumour pixels and the rest tumour-free slices, each drawn without repetition and cycling through
fresh permutations only when an epoch needs more of a kind than the data has (so G changes the mix, not the
length). Off, the real slices are drawn as they come, at the data's own share of tumour slices.
`real_fraction` F keeps a seeded random share of the real training *patients* (at least one), never a share of
slices, so a patient's slices stay together. Validation and test data are never mixed: they stay real.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..data.prepared import check_synthetic, open_prepared
from ..errors import ConfigError, DataError


class MixSampler(Sampler[int]):
    """Indices into `ConcatDataset([real, synthetic])`: real are 0..num_real-1, synthetic follow (module doc)."""

    def __init__(self, num_real: int, num_synthetic: int, ratio: float, seed: int = 0,
                 real_tumour: np.ndarray | None = None, foreground_fraction: float | None = None):
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(f"synthetic_ratio must be in [0, 1], got {ratio}")
        self.num_real, self.num_synthetic, self.seed, self.epoch = num_real, num_synthetic, seed, 0
        self.length = num_real if ratio < 1 else num_synthetic
        self.synthetic_per_epoch = round(ratio * self.length)
        self.real_per_epoch = self.length - self.synthetic_per_epoch
        if self.synthetic_per_epoch and not num_synthetic:
            raise ConfigError(f"synthetic_ratio {ratio} needs synthetic slices, but none are left")
        if self.real_per_epoch and not num_real:
            raise ConfigError(f"synthetic_ratio {ratio} needs real training slices, but there are none")
        self.kinds: tuple[np.ndarray, np.ndarray] | None = None  # (tumour, tumour-free) real indices
        self.tumour_per_epoch = 0
        if foreground_fraction is not None:
            if real_tumour is None or len(real_tumour) != num_real:
                raise ValueError("foreground_fraction needs real_tumour: one bool per real slice")
            self.kinds = (np.flatnonzero(real_tumour), np.flatnonzero(~np.asarray(real_tumour, dtype=bool)))
            self.tumour_per_epoch = round(foreground_fraction * self.real_per_epoch)
            for count, kind, name in zip((self.tumour_per_epoch, self.real_per_epoch - self.tumour_per_epoch),
                                         self.kinds, ("tumour", "tumour-free")):
                if count and not len(kind):
                    raise ConfigError(f"foreground_fraction {foreground_fraction} needs {name} training slices, "
                                      f"but the real training data has none")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.kinds is None:
            real = torch.randperm(self.num_real, generator=g)[: self.real_per_epoch]
        else:
            tumour, empty = self.kinds
            real = torch.cat([torch.from_numpy(tumour)[_draw(len(tumour), self.tumour_per_epoch, g)],
                              torch.from_numpy(empty)[_draw(len(empty), self.real_per_epoch - self.tumour_per_epoch, g)]])
        synthetic = _draw(self.num_synthetic, self.synthetic_per_epoch, g)
        order = torch.cat([real, self.num_real + synthetic])
        return iter(order[torch.randperm(self.length, generator=g)].tolist())


def _draw(available: int, count: int, g: torch.Generator) -> torch.Tensor:
    """`count` indices below `available`, without repetition while they last, cycling fresh permutations after."""
    rounds = math.ceil(count / available) if available else 0
    return torch.cat([torch.randperm(available, generator=g) for _ in range(rounds)]
                     or [torch.zeros(0, dtype=torch.long)])[:count]


class Tagged(Dataset):
    """Adds `synthetic: bool` to every item, so training can count what it really trained on."""

    def __init__(self, dataset: Dataset, synthetic: bool):
        self.dataset, self.synthetic = dataset, synthetic

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.dataset[i], "synthetic": self.synthetic}


def tumour_slices(path: str | Path, rows: np.ndarray) -> np.ndarray:
    """Whether each of these rows of a prepared file has any tumour pixel (its mask, not its label: a label may be
    unknown, and resizing may have erased a tiny tumour)."""
    with open_prepared(path) as h5:
        masks = h5["masks"]
        return np.array([bool(masks[int(row)].any()) for row in rows], dtype=bool)


def subsample_patients(patients: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask keeping the slices of a seeded random `fraction` of the patients (at least one patient)."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"real_fraction must be in (0, 1], got {fraction}")
    unique = np.unique(patients.astype(str))
    keep = max(1, round(fraction * len(unique)))
    chosen = np.random.default_rng(seed).permutation(unique)[:keep]
    return np.isin(patients.astype(str), chosen)


def kept_patient_ids(patients: np.ndarray, fraction: float) -> list[str] | None:
    """run.json's record of which patients a run learned from (None when it kept them all), so a generator and a
    segmenter trained with the same --real-fraction and --seed can be checked to have seen the same ones."""
    return None if fraction >= 1.0 else sorted(set(patients.astype(str).tolist()))


def select_synthetic(path: str | Path, real_attrs: dict, min_agreement: float | None = None,
                     min_nn_ratio: float | None = None) -> tuple[np.ndarray, dict]:
    """Rows of a synthetic file usable with the real data, and a provenance record for the run's log.

    The file must be marked synthetic and match the real data's image size and channels. `min_agreement`
    keeps slices whose `quality_agreement` (generated mask vs segmenter Dice; NaN = unknown fails) is at
    least that; `min_nn_ratio` keeps slices whose `quality_nn_ratio` is at least that (small = near-copy of a
    real training slice). Both datasets are written by `genseg evaluate-synthetic`.
    """
    meta = check_synthetic(path, real_attrs)
    keep = np.ones(meta["num_slices"], dtype=bool)
    filters = {"min_agreement": (min_agreement, "quality_agreement"), "min_nn_ratio": (min_nn_ratio, "quality_nn_ratio")}
    with open_prepared(path) as h5:
        for option, (threshold, name) in filters.items():
            if threshold is None:
                continue
            if name not in h5:
                raise DataError(path, f"has no `{name}` dataset needed by {option}; run `genseg evaluate-synthetic "
                                      f"{path} --real REAL.h5 --segmenter RUN_DIR` first")
            values = h5[name][:].astype(np.float64)
            keep &= np.nan_to_num(values, nan=-np.inf) >= threshold
    rows = np.flatnonzero(keep)
    provenance = {
        "path": str(path),
        "metadata": meta["attrs"].get("metadata"),
        "num_slices": meta["num_slices"],
        "num_kept": int(len(rows)),
        "min_agreement": min_agreement,
        "min_nn_ratio": min_nn_ratio,
    }
    return rows, provenance
