"""How good is a synthetic dataset? (`genseg evaluate-synthetic SYNTH.h5 --real DATASET.h5 [--segmenter RUN]`)

Three views, each next to a real-vs-real reference so the number means something:
- Memorisation. Images are average-pooled to at most 32x32 (robust to pixel noise, cheap) and compared by RMS
  pixel difference (L2 / sqrt(pixels), images in [0, 1]). Every synthetic slice gets the distance to its nearest
  real *training* slice (what the generator saw), mirror images included (diffusion training flips slices, so
  a memorised slice may come out mirrored). The reference is the real-to-real distance: each held-out real
  slice (split val/test; when there are none, each training slice with its own patient's slices left out) to
  the training set. `nn_ratio` = synthetic distance / median real-to-real distance: ~1 means "as far from the
  training set as an unseen real patient", 0 an exact copy. A slice is a near-copy when its ratio is below
  NEAR_COPY_RATIO (0.5: half the typical distance between different patients' slices); the same threshold
  applied to the held-out real slices is reported as the false-alarm reference.
- Distribution distance: KID (unbiased MMD^2, cubic polynomial kernel, genseg.evaluation.metrics.kid) between synthetic
  and real training images, and between held-out (val/test) real and real training images as the floor (None
  when the real file has no held-out slices), each as mean +- sd over bootstrap resamples of both sets (at most
  `kid_subset_size` rows drawn with replacement): the spread is the KID's own uncertainty, also for sets
  smaller than a subset, and `kid_reading` says in one sentence how far apart the two KIDs are. Features: with a segmenter,
  its encoder's bottleneck, global-average-pooled (a network trained on this domain); without one, a
  fixed-seed *randomly initialised* small CNN (random_feature_network), a much weaker proxy: random features
  react to intensity, texture and layout, not to anatomy. All features are divided by one scalar so that the
  real training features have mean square 1, which keeps x.y / d of order 1 whatever the network's activation
  scale (an untrained or narrow network would otherwise give KIDs near 0 for anything). KIDs from different
  feature networks are still not comparable with each other, only with the real reference beside them.
  At most `max_features` slices per set (synthetic, real training, real held-out; seeded choice) are encoded.
- Mask/image agreement (with a segmenter): Dice between each generated mask and the segmenter's prediction on
  the generated image (both empty = 1, genseg/evaluation/metrics.py), next to the same Dice on (up to `max_features`)
  held-out real slices, i.e. what the segmenter reaches on real pairs; plus tumour-size (mask area share) and class
  histograms of synthetic vs real training slices. Skipped for image-mode samples (metadata mask_source
  "none"): their empty masks are placeholders, not generated masks. For samples of a mask-conditioned model
  (mask_source "given") the same Dice is the *mask faithfulness*: does the generated image show the tumour it
  was asked for? It is reported under that name too (`mask_faithfulness_dice_mean` / `_median`).
- Lesion-only memorisation, for lesions placed by an inpaint model (`inpainted_lesion_memorisation`): outside its
  region an inpainted slice *is* its real host, so the whole-slice ratio above calls it a near-copy by
  construction; the placed lesion's window is compared with the real lesions' windows instead.
- Lesion-window KID (`lesion_kid`, every set whose masks hold lesions): the same KID on windows around the lesions
  only (the synthetic slices' lesions, for an inpaint set the placed ones; the real training lesions; the real
  held-out lesions as the reference), each window resized to the image size so the same features apply. The
  whole-slice KID scores everything on the slice, for an inpainted slice its real host (anatomy and own lesion)
  included; this view asks whether the lesions alone look like real ones.

Results are written into the synthetic file as per-slice datasets `quality_nn_ratio` and (with a segmenter)
`quality_agreement`, which `train-seg --min-nn-ratio / --min-agreement` filter on, and the summary as the file
attribute `quality` (JSON). The write is crash-safe: the file is copied to a temporary sibling, the copy is
edited, and the copy atomically replaces the original (genseg.io.atomic_path), so a crash leaves the old file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data.prepared import check_synthetic, read_metadata
from ..data.records import CLASS_NAMES
from ..errors import CheckpointError, DataError
from ..inference.segmenter import Segmenter, load_segmenter
from ..io import atomic_path
from ..viz import plot_bars
from .metrics import dice_from_counts, kid, nearest_neighbour_distances, overlap_counts

NEAR_COPY_RATIO = 0.5
NN_SIDE = 32  # images are average-pooled to at most this side before nearest-neighbour search
RANDOM_CNN_SIDE = 64  # the random CNN sees images resized to this side (its receptive field is ~half of it)
SIZE_EDGES = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16)  # tumour area-share histogram edges (slices with tumour)
RATIO_EDGES = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
LESION_SIDE = 16  # lesion windows are resized to this side for the lesion-only nearest-neighbour search
LESION_MARGIN = 3  # px a lesion window reaches past its lesion, for sets that record no region_margin of their own
AGREEMENT_EDGES = tuple(np.round(np.linspace(0.1, 0.9, 9), 1))


def random_feature_network(channels: int, seed: int = 0) -> nn.Module:
    """Untrained fixed-seed CNN: four stride-2 3x3 convolutions (32-64-128-256, ReLU, Kaiming-normal weights so
    activations keep their scale), global average pooling -> 256 features. Same seed, same features."""
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for cin, cout in zip((channels, 32, 64, 128), (32, 64, 128, 256)):
        conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1)
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu", generator=g)
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()


def _feature_extractor(segmenter: Segmenter | None, channels: int, seed: int) -> tuple[Callable, str]:
    if segmenter is not None:
        cfg = segmenter.model.config
        width = cfg.base_channels * 2**cfg.depth
        return segmenter.features, (f"segmenter encoder bottleneck, global-average-pooled ({width}-d) of "
                                    f"{segmenter.source or 'the given segmenter'}")
    net = random_feature_network(channels, seed)

    @torch.no_grad()
    def features(images: np.ndarray) -> np.ndarray:
        x = F.interpolate(torch.as_tensor(images), size=(RANDOM_CNN_SIDE, RANDOM_CNN_SIDE), mode="bilinear",
                          antialias=True, align_corners=False)
        return net(x).numpy()

    return features, (f"random CNN (untrained, seed {seed}, 4 conv layers, 256-d, input {RANDOM_CNN_SIDE}px): "
                      f"a weaker proxy than a trained encoder; pass --segmenter for domain features")


class _Pass:
    """Everything measured on one set of slices, read in chunks so RAM stays bounded."""

    def __init__(self):
        self.pooled, self.features, self.area, self.agreement = [], [], [], []

    def done(self) -> "_Pass":
        for key in ("pooled", "features", "area", "agreement"):
            parts = getattr(self, key)
            setattr(self, key, np.concatenate(parts) if parts else np.zeros(0))
        return self


def _measure(path: Path, rows: np.ndarray, feature_rows: np.ndarray, extract: Callable,
             segmenter: Segmenter | None, desc: str, progress: bool, all_agreement: bool = True,
             chunk: int = 128) -> _Pass:
    """Pooled images and mask areas of `rows`, features of `feature_rows` (a subset), and with a segmenter the
    mask/prediction Dice of every row (`all_agreement`) or of `feature_rows` only."""
    out = _Pass()
    wanted = set(feature_rows.tolist())
    with h5py.File(path, "r") as h5:
        images_ds, masks_ds = h5["images"], h5["masks"]
        for start in tqdm(range(0, len(rows), chunk), desc=desc, disable=not progress or len(rows) <= chunk):
            part = rows[start:start + chunk]
            images = images_ds[part].astype(np.float32)
            masks = masks_ds[part] > 0
            if images.min() < -1e-3 or images.max() > 1 + 1e-3 or not np.isfinite(images).all():
                raise DataError(path, f"images of rows {part[0]}..{part[-1]} are outside [0, 1] (or not finite); "
                                      f"the prepared format stores normalised images")
            pooled = torch.from_numpy(images)
            pooled = F.adaptive_avg_pool2d(pooled, NN_SIDE) if pooled.shape[-1] > NN_SIDE else pooled
            out.pooled.append(pooled.numpy())
            out.area.append(masks.mean(axis=(1, 2)))
            pick = np.array([r in wanted for r in part.tolist()], dtype=bool)
            if pick.any():
                out.features.append(extract(images[pick]))
            scored = slice(None) if all_agreement else pick
            if segmenter is not None and len(images[scored]):
                pred = segmenter.predict(images[scored]) >= segmenter.threshold
                out.agreement.append(dice_from_counts(*overlap_counts(pred, masks[scored])))
    return out.done()


def lesion_windows(images: np.ndarray, lesions: np.ndarray, margin: int, side: int = LESION_SIDE) -> np.ndarray:
    """For each slice whose `lesions` mask is not empty: the square window around the lesion grown by `margin`
    px (its side the grown lesion's larger extent, at most the image's; moved inside the image), resized to
    `side`: (N, C, side, side)."""
    from ..data.regions import bounding_box, dilate

    windows = []
    for image, lesion in zip(images, lesions):
        if not lesion.any():
            continue
        top, bottom, left, right = bounding_box(dilate(torch.from_numpy(np.asarray(lesion, np.uint8)), margin))
        size = image.shape[-1]
        extent = min(max(bottom - top, right - left) + 1, size)
        start = [min(max(0, (low + high + 1) // 2 - extent // 2), size - extent)
                 for low, high in ((top, bottom), (left, right))]
        window = torch.from_numpy(np.asarray(image, np.float32))[None, :, start[0]:start[0] + extent,
                                                                    start[1]:start[1] + extent]
        windows.append(F.interpolate(window, size=(side, side), mode="bilinear", antialias=True,
                                     align_corners=False)[0].numpy())
    return np.stack(windows) if windows else np.zeros((0, images.shape[1], side, side), np.float32)


def _read_rows(path: Path, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(images float32, masks bool) of `rows` of a prepared file, in that order (a row may repeat)."""
    unique, inverse = np.unique(rows, return_inverse=True)
    with h5py.File(path, "r") as h5:
        images, masks = h5["images"][unique.tolist()].astype(np.float32), h5["masks"][unique.tolist()] > 0
    return images[inverse], masks[inverse]


def _made_lesions(synthetic: Path, metadata: dict, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray] | str:
    """(images, lesions) of `rows` of a synthetic set, the lesions being what its generator made: for an inpaint
    set the placed ones only (its mask minus the host's), else the whole masks; or why there are none."""
    if metadata.get("inpaint") == "erase":
        return "an erase set places no lesion"
    images, masks = _read_rows(synthetic, rows)
    if metadata.get("inpaint") == "place":
        hosts = Path(metadata["inpaint_into"])
        if not hosts.is_file():
            return f"host file {hosts} not found"
        masks &= ~_read_rows(hosts, np.asarray(metadata["host_rows"], np.int64)[rows])[1]
    return images, masks


def lesion_kid(synthetic: Path, metadata: dict, real: Path, rows: dict[str, np.ndarray], extract: Callable,
               size: int, kid_subsets: int, kid_subset_size: int, seed: int) -> dict[str, Any]:
    """KID between the windows around the synthetic slices' lesions and the real training lesions' windows, beside
    the real held-out lesions' windows against the same (module doc). `rows`: "synthetic", "train", "held" rows
    to read. For an inpaint set the lesion is the placed one (synthetic mask minus the host's); an erase set places
    none. Features as for the whole-slice KID, scaled by the real training windows' root mean square."""
    made = _made_lesions(synthetic, metadata, rows["synthetic"])
    if isinstance(made, str):
        return {"lesion_kid_reading": f"not measured: {made}"}
    margin = int(metadata.get("region_margin", LESION_MARGIN))
    windows = {"synthetic": lesion_windows(*made, margin, size)}
    for key in ("train", "held"):
        windows[key] = lesion_windows(*_read_rows(real, rows[key]), margin, size) if len(rows[key]) else \
            np.zeros((0,) + windows["synthetic"].shape[1:], np.float32)
    counts = {key: int(len(w)) for key, w in windows.items()}
    if counts["synthetic"] < 2 or counts["train"] < 2:
        return {"lesion_kid_windows": counts,
                "lesion_kid_reading": "not measured: fewer than 2 lesions in the synthetic or real training slices"}
    features = {key: extract(w) if len(w) else None for key, w in windows.items()}
    scale = float(np.sqrt(np.mean(np.square(features["train"], dtype=np.float64)))) or 1.0
    mean, std = kid(features["synthetic"] / scale, features["train"] / scale, kid_subsets, kid_subset_size, seed,
                    bootstrap=True)
    reference = kid(features["held"] / scale, features["train"] / scale, kid_subsets, kid_subset_size, seed,
                    bootstrap=True) if counts["held"] >= 2 else (None, None)
    return {"lesion_kid_mean": mean, "lesion_kid_std": std, "lesion_kid_real_reference": reference[0],
            "lesion_kid_real_reference_std": reference[1], "lesion_kid_windows": counts, "lesion_kid_margin": margin,
            "lesion_kid_reading": kid_reading(mean, std, *reference)}


def inpainted_lesion_memorisation(synthetic: Path, metadata: dict, real: Path, train_rows: np.ndarray,
                                  held_rows: np.ndarray, near_copy_ratio: float) -> dict[str, Any] | None:
    """Memorisation of the lesions an inpaint model placed, looking at the lesion only: every pixel outside the
    repainted region is the host's, so the whole-slice NN ratio calls each inpainted slice a near-copy of its host.
    Each placed lesion's window (synthetic mask minus the host's, grown by the region margin; lesion_windows) is
    compared to the windows of the real training lesions and their mirror images, as a ratio to the median
    distance of the real held-out lesions to the same set. Blind spot: the placed lesion was turned and zoomed,
    so a generator that pasted a training lesion back unchanged would still look new in pixel space. None for
    other sets; for erase sets, a missing host file or no held-out lesion, `lesion_memorisation` says why not."""
    if "inpaint_into" not in metadata:
        return None
    made = _made_lesions(synthetic, metadata, np.arange(len(metadata["host_rows"])))
    why = made if isinstance(made, str) else "the real file has no held-out slices" if not len(held_rows) else None
    if why:
        return {"lesion_memorisation": f"not measured: {why}"}
    margin = int(metadata["region_margin"])
    placed = lesion_windows(*made, margin)
    train, held = (lesion_windows(*_read_rows(real, rows), margin) for rows in (train_rows, held_rows))
    if not len(held) or not len(train) or not len(placed):
        return {"lesion_memorisation": "not measured: no lesion in the real training or held-out slices"}
    references = np.concatenate([train, train[..., ::-1]])
    real_distances = nearest_neighbour_distances(held, references)
    typical = max(float(np.median(real_distances)), 1e-12)
    ratio = nearest_neighbour_distances(placed, references) / typical
    return {"lesion_memorisation": (f"placed lesions' windows ({LESION_SIDE}px) to the real training lesions' "
                                    f"windows and their mirror images, over the real held-out lesions' median"),
            "lesion_windows": int(len(placed)), "lesion_nn_ratio_median": float(np.median(ratio)),
            "lesion_nn_ratio_min": float(ratio.min()),
            "lesion_near_copy_percent": round(100 * float((ratio < near_copy_ratio).mean()), 2),
            "lesion_real_near_copy_percent": round(100 * float((real_distances / typical < near_copy_ratio).mean()), 2)}


def _histogram(values: np.ndarray, edges: tuple, empty_bin: bool = False) -> tuple[list[str], list[float]]:
    """Bin names and shares of `values`; with `empty_bin`, zeros get a bin of their own ("none")."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    names = [f"<{edges[0]:g}"] + [f"{a:g}-{b:g}" for a, b in zip(edges[:-1], edges[1:])] + [f">={edges[-1]:g}"]
    positive = values[values > 0] if empty_bin else values
    counts = np.bincount(np.searchsorted(edges, positive, side="right"), minlength=len(edges) + 1)
    if empty_bin:
        names, counts = ["none"] + names, np.concatenate([[np.sum(values == 0)], counts])
    return names, (counts / max(1, len(values))).round(4).tolist()


def _class_shares(labels: np.ndarray) -> dict[str, float]:
    ids, counts = np.unique(labels, return_counts=True)
    return {CLASS_NAMES.get(int(i), str(int(i))): round(float(c / max(1, len(labels))), 4)
            for i, c in zip(ids, counts)}


def _class_order(result: dict) -> list[str]:
    present = set(result["class_histogram"]["synthetic"]) | set(result["class_histogram"]["real"])
    return [name for name in CLASS_NAMES.values() if name in present] + sorted(present - set(CLASS_NAMES.values()))


def _seeded_subset(rows: np.ndarray, limit: int, seed: int) -> np.ndarray:
    if len(rows) <= limit:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, size=limit, replace=False))


def kid_reading(kid_mean: float | None, kid_std: float | None, reference: float | None,
                reference_std: float | None) -> str | None:
    """One sentence on what a KID means next to the real-vs-real reference (None when there is no reference)."""
    if kid_mean is None or reference is None:
        return None
    spread = float(np.hypot(kid_std, reference_std))
    if spread == 0:
        return "no spread over subsets to judge the difference against (too few slices)"
    z = (kid_mean - reference) / spread
    if abs(z) <= 2:
        return ("within two standard deviations of the real-vs-real reference: with this many slices these "
                "features cannot tell synthetic from real")
    if z < 0:
        return (f"{-z:.0f} standard deviations below the real-vs-real reference: the synthetic slices sit closer to "
                f"the training slices than unseen real patients do (look at the near-copies)")
    times = f", {kid_mean / reference:.0f}x it" if reference > 2 * reference_std else ""
    return (f"{z:.0f} standard deviations above the real-vs-real reference{times}: these features still tell "
            f"synthetic from real")


def evaluate_synthetic(synthetic: str | Path, real: str | Path, segmenter: str | Path | Segmenter | None = None,
                       near_copy_ratio: float = NEAR_COPY_RATIO, max_features: int = 1000,
                       kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0, write: bool = True,
                       out_dir: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Memorisation, KID and (with a segmenter) mask/image agreement of `synthetic` against `real` (module doc).

    Writes `quality_nn_ratio` / `quality_agreement` and the `quality` attribute into the synthetic file unless
    `write` is False, and a PNG of the histograms to `out_dir` (default: next to the synthetic file).
    Returns the summary dict (JSON-serialisable).
    """
    synthetic, real = Path(synthetic), Path(real)
    real_meta = read_metadata(real)
    if real_meta["attrs"].get("synthetic", False):
        raise DataError(real, "is marked synthetic; --real must be the real prepared dataset the generator was "
                              "trained on")
    train_rows = np.flatnonzero(real_meta["split"] == "train")
    if len(train_rows) < 2:
        raise DataError(real, f"has {'no' if not len(train_rows) else 'only one'} training slice (split 'train'); "
                              f"memorisation and KID are measured against the real training set")
    held_rows = np.flatnonzero(real_meta["split"] != "train")
    syn_meta = check_synthetic(synthetic, real_meta["attrs"])
    n = syn_meta["num_slices"]
    if n < 2:
        raise DataError(synthetic, f"holds {n} slice(s); the distribution distance needs at least 2")
    size, channels = int(real_meta["attrs"]["size"]), int(real_meta["attrs"]["channels"])
    if segmenter is not None and not isinstance(segmenter, Segmenter):
        segmenter = load_segmenter(segmenter)
    if segmenter is not None and (segmenter.size, segmenter.channels) != (size, channels):
        raise CheckpointError(f"{segmenter.source}: the segmenter expects {segmenter.size}x{segmenter.size} images "
                              f"with {segmenter.channels} channel(s), {synthetic} holds {size}x{size} with "
                              f"{channels}")
    extract, feature_network = _feature_extractor(segmenter, channels, seed)

    feature_rows = {"train": _seeded_subset(train_rows, max_features, seed),
                    "held": _seeded_subset(held_rows, max_features, seed + 1),
                    "synthetic": _seeded_subset(np.arange(n), max_features, seed + 2)}
    train = _measure(real, train_rows, feature_rows["train"], extract, None, "real train", progress)
    held = _measure(real, held_rows, feature_rows["held"], extract, segmenter,
                    "real held-out", progress, all_agreement=False) if len(held_rows) else None
    mask_source = (syn_meta["attrs"].get("metadata") or {}).get("mask_source")
    masks_generated = mask_source != "none"  # generated by a joint model, or given to a mask-conditioned one
    syn = _measure(synthetic, np.arange(n), feature_rows["synthetic"], extract,
                   segmenter if masks_generated else None, "synthetic", progress)

    # (a) memorisation, against the training slices and their mirror images (generators train with flips)
    references = np.concatenate([train.pooled, train.pooled[..., ::-1]])
    train_patients = real_meta["patients"][train_rows]
    if held is not None:
        real_nn = nearest_neighbour_distances(held.pooled, references)
        reference_kind = "held-out (val/test) real slices to the training set (and its mirror images)"
    else:
        real_nn = nearest_neighbour_distances(train.pooled, references, train_patients, np.tile(train_patients, 2))
        reference_kind = "training slices to the other patients' training slices (and their mirror images)"
    real_nn = real_nn[np.isfinite(real_nn)]
    if not len(real_nn):
        raise DataError(real, "needs held-out slices or at least two training patients for the real-to-real "
                              "nearest-neighbour reference")
    typical = float(np.median(real_nn))
    if typical <= 0:
        raise DataError(real, "real slices of different patients are pixel-identical (median nearest-neighbour "
                              "distance 0); the memorisation ratio is undefined")
    syn_nn = nearest_neighbour_distances(syn.pooled, references)
    ratio = syn_nn / typical
    real_ratio = real_nn / typical
    near = ratio < near_copy_ratio

    # (b) KID, on features scaled so the real training features have mean square 1 (module doc)
    scale = float(np.sqrt(np.mean(np.square(train.features, dtype=np.float64)))) or 1.0
    kid_mean, kid_std = kid(syn.features / scale, train.features / scale, kid_subsets, kid_subset_size, seed,
                            bootstrap=True)
    kid_ref = kid(held.features / scale, train.features / scale, kid_subsets, kid_subset_size, seed,
                  bootstrap=True) if held is not None and len(held.features) >= 2 else (None, None)

    # (c) agreement and histograms
    agreement = syn.agreement if segmenter is not None and masks_generated else None
    faithful = agreement is not None and mask_source == "given"
    syn_tumour, real_tumour = syn.area[syn.area > 0], train.area[train.area > 0]
    size_bins, syn_sizes = _histogram(syn.area, SIZE_EDGES, empty_bin=True)
    _, real_sizes = _histogram(train.area, SIZE_EDGES, empty_bin=True)
    ratio_bins, syn_ratios = _histogram(ratio, RATIO_EDGES)
    result: dict[str, Any] = {
        "synthetic": str(synthetic),
        "real": str(real),
        "segmenter": segmenter.source if segmenter is not None else None,
        "generator": syn_meta["attrs"].get("metadata"),
        "num_synthetic": n,
        "num_real_train": int(len(train_rows)),
        "num_real_heldout": int(len(held_rows)),
        "nn_image_side": int(syn.pooled.shape[-1]),
        "nn_reference": reference_kind,
        "nn_real_median_distance": typical,
        "nn_synthetic_median_distance": float(np.median(syn_nn)),
        "nn_ratio_median": float(np.median(ratio)),
        "nn_ratio_min": float(ratio.min()),
        "near_copy_threshold": near_copy_ratio,
        "near_copies": int(near.sum()),
        "near_copy_percent": round(100 * float(near.mean()), 2),
        "real_near_copy_percent": round(100 * float((real_ratio < near_copy_ratio).mean()), 2),
        "nn_ratio_histogram": {"bins": ratio_bins, "synthetic": syn_ratios,
                               "real": _histogram(real_ratio, RATIO_EDGES)[1]},
        "feature_network": feature_network,
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "kid_real_reference": kid_ref[0],
        "kid_real_reference_std": kid_ref[1],
        "kid_subsets": kid_subsets,
        "kid_subset_size": kid_subset_size,
        "kid_reading": kid_reading(kid_mean, kid_std, *kid_ref),
        "agreement_dice_mean": float(agreement.mean()) if agreement is not None else None,
        "agreement_dice_median": float(np.median(agreement)) if agreement is not None else None,
        # the same Dice on real held-out slices (the segmenter's own test Dice): what realistic pairs would reach
        "agreement_real_reference": float(held.agreement.mean()) if held is not None and len(held.agreement)
        else None,
        "agreement_histogram": ({"bins": _histogram(agreement, AGREEMENT_EDGES)[0],
                                 "synthetic": _histogram(agreement, AGREEMENT_EDGES)[1]}
                                if agreement is not None else None),
        "mask_source": mask_source,
        # given masks (mask-conditioned model): the agreement Dice measures how faithfully images follow them
        "mask_faithfulness_dice_mean": float(agreement.mean()) if faithful else None,
        "mask_faithfulness_dice_median": float(np.median(agreement)) if faithful else None,
        "threshold": segmenter.threshold if segmenter is not None else None,
        "masks_generated": masks_generated,  # false for image-mode samples: their empty masks are placeholders
        "tumour_slice_share": {"synthetic": round(float((syn.area > 0).mean()), 4),
                               "real": round(float((train.area > 0).mean()), 4)},
        "tumour_area_share_mean": {"synthetic": float(syn_tumour.mean()) if len(syn_tumour) else None,
                                   "real": float(real_tumour.mean()) if len(real_tumour) else None},
        "tumour_size_histogram": {"bins": size_bins, "synthetic": syn_sizes, "real": real_sizes},
        "class_histogram": {"synthetic": _class_shares(syn_meta["labels"]),
                            "real": _class_shares(real_meta["labels"][train_rows])},
        **(inpainted_lesion_memorisation(synthetic, syn_meta["attrs"].get("metadata") or {}, real, train_rows,
                                         held_rows, near_copy_ratio) or {}),
        **(lesion_kid(synthetic, syn_meta["attrs"].get("metadata") or {}, real, feature_rows, extract, size,
                      kid_subsets, kid_subset_size, seed) if masks_generated else {}),
    }
    out_dir = Path(out_dir) if out_dir is not None else synthetic.parent
    result["figure"] = str(_figure(result, out_dir / f"{synthetic.stem}_quality.png"))
    result["written"] = _write_quality(synthetic, ratio, agreement, result) if write else []
    return result


def _write_quality(path: Path, ratio: np.ndarray, agreement: np.ndarray | None, summary: dict) -> list[str]:
    """Per-slice datasets and the `quality` attribute, via an edited copy that atomically replaces the file."""
    values = {"quality_nn_ratio": ratio}
    if agreement is not None:
        values["quality_agreement"] = agreement
    about = {"quality_nn_ratio": "nearest real training slice distance / median real-to-real distance "
                                 "(genseg evaluate-synthetic); small = near-copy",
             "quality_agreement": "Dice of the generated mask vs the segmenter's prediction on the image"}
    try:
        with atomic_path(path) as tmp:
            shutil.copy2(path, tmp)
            with h5py.File(tmp, "a") as h5:
                for name, data in values.items():
                    if name in h5:
                        del h5[name]
                    h5.create_dataset(name, data=np.asarray(data, np.float32))
                    h5[name].attrs.update({"description": about[name], "real": summary["real"],
                                           "segmenter": summary["segmenter"] or ""})
                h5.attrs["quality"] = json.dumps({k: v for k, v in summary.items() if k not in ("written", "figure")})
    except OSError as exc:
        raise DataError(path, f"cannot write the quality datasets ({exc}); pass --no-write to only report") from None
    return list(values)


def _figure(result: dict, path: Path) -> Path:
    panels = {
        "nearest-neighbour ratio": (result["nn_ratio_histogram"]["bins"],
                                    {"synthetic": result["nn_ratio_histogram"]["synthetic"],
                                     "real held-out": result["nn_ratio_histogram"]["real"]}),
        "tumour area share": (result["tumour_size_histogram"]["bins"],
                              {"synthetic": result["tumour_size_histogram"]["synthetic"],
                               "real train": result["tumour_size_histogram"]["real"]}),
    }
    classes = _class_order(result)
    panels["class"] = (classes, {name: [result["class_histogram"][k].get(c, 0.0) for c in classes]
                                 for name, k in (("synthetic", "synthetic"), ("real train", "real"))})
    if result["agreement_histogram"] is not None:
        name = ("mask faithfulness (given mask vs segmenter Dice)" if result.get("mask_source") == "given"
                else "mask vs segmenter Dice")
        panels[name] = (result["agreement_histogram"]["bins"], {"synthetic": result["agreement_histogram"]["synthetic"]})
    return plot_bars(panels, path, title=f"{Path(result['synthetic']).name} vs {Path(result['real']).name}")


def markdown_table(result: dict[str, Any]) -> str:
    """The headline numbers, synthetic next to the real reference."""

    def fmt(v, scale: float = 1.0) -> str:
        return "n/a" if v is None else f"{v * scale:.4g}"

    kid_ref = (f"{fmt(result['kid_real_reference'], 1e3)} ± {fmt(result['kid_real_reference_std'], 1e3)}"
               if result["kid_real_reference"] is not None else "n/a")
    shares = result["tumour_slice_share"]
    areas = result["tumour_area_share_mean"]
    lines = [
        f"Synthetic quality of {result['synthetic']} ({result['num_synthetic']} slices) against {result['real']} "
        f"({result['num_real_train']} training, {result['num_real_heldout']} held-out slices)", "",
        "| measure | synthetic | real reference |", "|---|---|---|",
        f"| nearest-neighbour ratio, median (1 = as far as an unseen real patient) | "
        f"{fmt(result['nn_ratio_median'])} | 1 |",
        f"| near-copies (ratio < {result['near_copy_threshold']:g}) | {result['near_copies']} "
        f"({result['near_copy_percent']:g} %) | {result['real_near_copy_percent']:g} % |",
        f"| KID x 1000 (mean ± sd over {result['kid_subsets']} bootstrap resamples) | "
        f"{fmt(result['kid_mean'], 1e3)} ± {fmt(result['kid_std'], 1e3)} | {kid_ref} |",
        ("| mask faithfulness: segmenter Dice on the generated image vs the given mask, mean (median) | "
         if result.get("mask_source") == "given" else "| mask vs segmenter Dice, mean (median) | ")
        + f"{fmt(result['agreement_dice_mean'])} ({fmt(result['agreement_dice_median'])}) | "
          f"{fmt(result['agreement_real_reference'])} |",
        f"| share of slices with tumour | {fmt(shares['synthetic'])} | {fmt(shares['real'])} |",
        f"| mean tumour area share (tumour slices) | {fmt(areas['synthetic'])} | {fmt(areas['real'])} |",
    ]
    if result.get("lesion_nn_ratio_median") is not None:
        lines += [f"| placed lesions only: nearest-neighbour ratio, median (min) | "
                  f"{fmt(result['lesion_nn_ratio_median'])} ({fmt(result['lesion_nn_ratio_min'])}) | 1 |",
                  f"| placed lesions only: near-copies | {result['lesion_near_copy_percent']:g} % | "
                  f"{result['lesion_real_near_copy_percent']:g} % |"]
    if result.get("lesion_kid_mean") is not None:
        reference = result["lesion_kid_real_reference"]
        counts = result["lesion_kid_windows"]
        lines.append(f"| KID x 1000 of the lesion windows only ({counts['synthetic']} synthetic, {counts['held']} "
                     f"held-out, {counts['train']} training lesions) | {fmt(result['lesion_kid_mean'], 1e3)} ± "
                     f"{fmt(result['lesion_kid_std'], 1e3)} | "
                     + (f"{fmt(reference, 1e3)} ± {fmt(result['lesion_kid_real_reference_std'], 1e3)} |"
                        if reference is not None else "n/a |"))
    for name in _class_order(result):
        lines.append(f"| class {name} share | {fmt(result['class_histogram']['synthetic'].get(name, 0.0))} | "
                     f"{fmt(result['class_histogram']['real'].get(name, 0.0))} |")
    lines += [""] + ([f"KID: {result['kid_reading']}"] if result["kid_reading"] else []) + (
        [f"Lesion-window KID: {result['lesion_kid_reading']}"] if result.get("lesion_kid_reading") else []) + [
              f"KID features: {result['feature_network']}",
              f"Nearest-neighbour reference: {result['nn_reference']}; images pooled to "
              f"{result['nn_image_side']}px, RMS pixel distance",
              f"Figure: {result['figure']}"]
    if result["written"]:
        lines.append(f"Wrote {', '.join(result['written'])} into {result['synthetic']} (for train-seg "
                     f"--min-nn-ratio / --min-agreement)")
    return "\n".join(lines)
