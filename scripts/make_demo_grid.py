"""docs/demo_grid.png, docs/demo_anatomy_grid.png and docs/demo_ultrasound_grid.png: what the embedded demo data
looks like, read back the way training reads it.

Writes a small demo dataset to a temporary folder and reads every image through the dataset's reader (Figshare
for the brain MRI, procedural or real anatomy, BUSI for the ultrasound domain) and the shared preprocessing.
MRI and anatomy: for each tumour class the slices with the largest tumours (one per patient) with the tumour
outlined in the class colour, plus a row of tumour-free slices. Ultrasound: one row each of benign, malignant and
normal images, lesions outlined:
    python scripts/make_demo_grid.py [--domain mri|anatomy|ultrasound] [--out PNG] [--per-class 4] [--size 256]
                                     [--seed 0]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from genseg.data.demo import make_demo_dataset
from genseg.data.demo_anatomy import make_anatomy_dataset
from genseg.data.demo_ultrasound import make_ultrasound_dataset
from genseg.data.figshare import find_figshare_files, read_figshare_mat
from genseg.data.folders import find_busi_pairs, read_image_pair
from genseg.data.records import CLASS_NAMES, preprocess_pair
from genseg.viz import CLASS_COLORS, MASK_COLOR, grid_image, overlay, save_png

DEFAULT_OUT = {"mri": "docs/demo_grid.png", "anatomy": "docs/demo_anatomy_grid.png",
               "ultrasound": "docs/demo_ultrasound_grid.png"}


def pick_slices(records, per_class: int) -> list:
    """Per class, the largest-tumour slice of each of the first `per_class` patients; then tumour-free slices."""
    largest = {}
    for r in records:
        if r.mask.any() and r.mask.sum() > largest.get(r.patient, (None, 0))[1]:
            largest[r.patient] = (r, int(r.mask.sum()))
    rows = [[r for r, _ in largest.values() if r.label == label][:per_class] for label in (1, 2, 3)]
    rows.append([r for r in records if not r.mask.any()][:per_class])
    return [r for row in rows for r in row]


def mri_tiles(args, tmp: Path) -> tuple[list, list]:
    make = make_anatomy_dataset if args.domain == "anatomy" else make_demo_dataset
    make(tmp, patients=6 * args.per_class, slices_per_patient=8, size=args.size, seed=args.seed, progress=False)
    records = [read_figshare_mat(p) for p in find_figshare_files(tmp)]
    tiles, titles = [], []
    for r in pick_slices(records, args.per_class):
        image, mask = preprocess_pair(r.image, r.mask, args.tile)
        tiles.append(overlay(image[0], mask, CLASS_COLORS[r.label], alpha=0.0))
        titles.append(CLASS_NAMES[r.label] + ("" if mask.any() else ", no tumour"))
    return tiles, titles


def ultrasound_tiles(args, tmp: Path) -> tuple[list, list]:
    make_ultrasound_dataset(tmp, cases=3 * args.per_class, size=args.size, seed=args.seed, progress=False)
    tiles, titles = [], []
    for folder in ("benign", "malignant", "normal"):
        for pair in [p for p in find_busi_pairs(tmp) if p.image.parent.name == folder][:args.per_class]:
            r = read_image_pair(pair)
            image, mask = preprocess_pair(r.image, r.mask, args.tile)
            tiles.append(overlay(image[0], mask, MASK_COLOR, alpha=0.0))
            titles.append(pair.image.stem)
    return tiles, titles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domain", choices=list(DEFAULT_OUT), default="mri", help="Which demo domain to show.")
    parser.add_argument("--out", type=Path, help="PNG to write (default docs/demo_grid.png, "
                                                 "docs/demo_anatomy_grid.png or docs/demo_ultrasound_grid.png).")
    parser.add_argument("--per-class", type=int, default=4, help="Images per class (= grid columns).")
    parser.add_argument("--size", type=int, default=256, help="Demo image size in pixels.")
    parser.add_argument("--tile", type=int, default=160, help="Side of each tile in the picture.")
    parser.add_argument("--seed", type=int, default=0, help="Demo data seed.")
    args = parser.parse_args()
    out = args.out or Path(DEFAULT_OUT[args.domain])

    with tempfile.TemporaryDirectory() as tmp:
        make_tiles = ultrasound_tiles if args.domain == "ultrasound" else mri_tiles
        tiles, titles = make_tiles(args, Path(tmp) / "demo")
    out.parent.mkdir(parents=True, exist_ok=True)
    # A 256-colour palette keeps the noisy images under 300 KB for the README (grey levels plus outline colours).
    save_png(grid_image(tiles, ncols=args.per_class, titles=titles).quantize(256), out)
    print(f"Wrote {out} ({len(tiles)} images, {out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
