#!/usr/bin/env bash
# The paper's per-modality table on BraTS 2020: prepare each modality (t1, t2, t1ce, flair) from one BraTS folder,
# train the paper's U-Net on it (configs/seg-brats-modality.yaml), score the test split, and print the test IoU
# and Dice next to the paper's average IoU (.8203 / .8307 / .7799 / .8312). The work is done by
# reproduce_brats_modalities.py (one process: the CLI's library calls, imported once).
#
#   scripts/reproduce_brats_modalities.sh BRATS_DIR [OUT_DIR]           # the experiment (GPU: hours)
#   scripts/reproduce_brats_modalities.sh --smoke BRATS_DIR [OUT_DIR]   # tiny: 32 px, width 16, 1 epoch (CI)
#   more options: --mixed-precision bf16, --cpu, --workers N, --config FILE (see --help)
#
# BRATS_DIR holds BraTS20_Training_XXX/ case folders (validation cases without seg are reported and skipped).
# Finished steps are reused when the command is repeated. PYTHON selects the interpreter (default python).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's genseg
exec "${PYTHON:-python}" "$REPO/scripts/reproduce_brats_modalities.py" "$@"
