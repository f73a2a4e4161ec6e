"""Do evaluate-synthetic's numbers move the right way? Builds "synthetic" files from a real prepared file with known
defects and scores each: held-out real slices (should match the real reference), copies of training slices
(near-copies), blurred / noisy images, masks shifted off their tumours, and uniform noise. Prints a markdown table.

    genseg demo-data demo/raw --size 64 && genseg prepare demo/raw --out demo/demo64.h5 --size 64
    genseg train-seg --data demo/demo64.h5 --config configs/seg-cpu-small.yaml --size 64 --epochs 8 --out runs/seg64
    PYTHONPATH=$PWD python3 scripts/sanity_synthetic_quality.py demo/demo64.h5 [--segmenter runs/seg64]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import h5py
import numpy as np
from scipy import ndimage

from genseg.data.prepared import PreparedWriter, read_metadata
from genseg.evaluation.synthetic_quality import evaluate_synthetic


def defect_sets(real: Path, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    meta = read_metadata(real)
    held = np.flatnonzero(meta["split"] != "train")
    train = np.flatnonzero(meta["split"] == "train")[: len(held)]
    with h5py.File(real, "r") as h5:
        images, masks = h5["images"][:].astype(np.float32), h5["masks"][:]
    rng = np.random.default_rng(seed)
    image, mask, label = images[held], masks[held], meta["labels"][held]
    return {
        "held-out real slices": (image, mask, label),
        "copies of training slices": (images[train], masks[train], meta["labels"][train]),
        "blurred (Gaussian sigma 1.5 px)": (ndimage.gaussian_filter(image, (0, 0, 1.5, 1.5)), mask, label),
        "Gaussian noise sd 0.1": (np.clip(image + rng.normal(0, 0.1, image.shape), 0, 1), mask, label),
        "masks shifted 8 px": (image, np.roll(mask, 8, axis=-1), label),
        "uniform noise images": (rng.uniform(0, 1, image.shape).astype(np.float32), mask, label),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("real", type=Path, help="Real prepared file with train and held-out splits.")
    parser.add_argument("--segmenter", help="train-seg run directory (KID on its encoder, plus agreement).")
    args = parser.parse_args()
    size = int(read_metadata(args.real)["attrs"]["size"])
    print("| synthetic set | n | NN ratio median | near-copies % | KID x1000 | real KID x1000 | mask/seg Dice (real) |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for k, (name, (images, masks, labels)) in enumerate(defect_sets(args.real).items()):
            path = Path(tmp) / f"set{k}.h5"
            with PreparedWriter(path, size=size, channels=images.shape[1], synthetic=True,
                                metadata={"model": name}) as writer:
                for i, (image, mask, label) in enumerate(zip(images, masks, labels)):
                    writer.append(image, mask, label=int(label), patient=f"s{i}", source=name)
                writer.close()
            r = evaluate_synthetic(path, args.real, args.segmenter, write=False, out_dir=tmp, progress=False)
            agreement = "n/a" if r["agreement_dice_mean"] is None else \
                f"{r['agreement_dice_mean']:.3f} ({r['agreement_real_reference']:.3f})"
            print(f"| {name} | {r['num_synthetic']} | {r['nn_ratio_median']:.3f} | {r['near_copy_percent']:g} | "
                  f"{r['kid_mean'] * 1e3:.1f} ± {r['kid_std'] * 1e3:.1f} | {r['kid_real_reference'] * 1e3:.1f} ± "
                  f"{r['kid_real_reference_std'] * 1e3:.1f} | {agreement} |", flush=True)
    print(f"\nKID features: {r['feature_network']}")


if __name__ == "__main__":
    main()
