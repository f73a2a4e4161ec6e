#!/usr/bin/env bash
# The paper's per-modality table on BraTS 2020: prepare each modality (t1, t2, t1ce, flair) from one BraTS folder,
# train the paper's U-Net on it (configs/seg-brats-modality.yaml), score the test split, and print the test IoU
# and Dice next to the paper's average IoU (.8203 / .8307 / .7799 / .8312).
#
#   scripts/reproduce_brats_modalities.sh BRATS_DIR [OUT_DIR]           # the experiment (GPU: hours)
#   scripts/reproduce_brats_modalities.sh --smoke BRATS_DIR [OUT_DIR]   # tiny: 32 px, width 16, 1 epoch (CI)
#
# BRATS_DIR holds BraTS20_Training_XXX/ case folders (validation cases without seg are reported and skipped).
# Finished steps are reused when the command is repeated (prepared files, runs with metrics.json).
# Environment: PYTHON (default python), CONFIG (default configs/seg-brats-modality.yaml), WORKERS (prepare
# processes, default 4), TRAIN_ARGS (extra train-seg flags, e.g. "--cpu" or "--mixed-precision bf16").
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's genseg
PYTHON="${PYTHON:-python}"
CONFIG="${CONFIG:-$REPO/configs/seg-brats-modality.yaml}"
WORKERS="${WORKERS:-4}"
SIZE=256
SMOKE=0
if [[ "${1:-}" == "--smoke" ]]; then
    SMOKE=1
    shift
fi
if [[ $# -lt 1 || $# -gt 2 ]]; then
    echo "usage: $0 [--smoke] BRATS_DIR [OUT_DIR]" >&2
    exit 2
fi
BRATS="$1"
OUT="${2:-brats-modalities}"
if [[ ! -d "$BRATS" ]]; then
    echo "Error: $BRATS: BraTS folder not found" >&2
    exit 2
fi
TRAIN=(--config "$CONFIG")
if [[ $SMOKE == 1 ]]; then
    SIZE=32
    WORKERS=1
    TRAIN=(--config "$REPO/configs/seg-cpu-small.yaml" --epochs 1 --batch-size 4)
fi
mkdir -p "$OUT"

for modality in t1 t2 t1ce flair; do
    data="$OUT/brats-$modality.h5"
    run="$OUT/seg-$modality"
    if [[ ! -f "$data" ]]; then
        "$PYTHON" -m genseg prepare "$BRATS" --format brats --modality "$modality" --size "$SIZE" \
            --workers "$WORKERS" --out "$data"
    fi
    if [[ ! -f "$run/metrics.json" ]]; then
        resume=()
        if compgen -G "$run/checkpoints/step-*" > /dev/null; then resume=(--resume); fi
        # shellcheck disable=SC2086  # TRAIN_ARGS is a list of flags
        "$PYTHON" -m genseg train-seg --data "$data" --size "$SIZE" --out "$run" "${TRAIN[@]}" "${resume[@]}" \
            ${TRAIN_ARGS:-}
    fi
done

"$PYTHON" - "$OUT" <<'PY'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
paper = {"t1": 0.8203, "t2": 0.8307, "t1ce": 0.7799, "flair": 0.8312}  # the paper's average IoU per modality
lines = ["| modality | test IoU | test Dice | test slices | paper IoU |", "|---|---|---|---|---|"]
for modality, paper_iou in paper.items():
    test = json.loads((out / f"seg-{modality}" / "metrics.json").read_text())["test"]
    lines.append(f"| {modality} | {test['iou']:.4f} | {test['dice']:.4f} | {test['num_slices']} | {paper_iou:.4f} |")
table = "\n".join(lines)
(out / "brats_modalities.md").write_text(table + "\n")
print(table)
PY
