#!/usr/bin/env bash
# Reproduces the QARM numbers of docs/qarm.md (issue 6), one run at a time:
#   cold start (the one protocol of docs/cold-start.md: 10% of the items held out, split seed 2024 — the same items
#   as scripts/run-cold-start.sh), aligned codes and the unaligned ablation,
#   then the warm split (the code-based model vs LightGCN, same split).
# Each `mmrec qarm` run loads the best LightGCN run of its dataset by VALIDATION Recall@20, or trains one first.
# Usage: scripts/run-qarm.sh [dataset ...]   (default: lfm2k ml100k-posters)
set -euo pipefail
cd "$(dirname "$0")/.."
MMREC=${MMREC:-.venv/bin/mmrec}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
datasets=("${@:-lfm2k ml100k-posters}")
for ds in ${datasets[@]}; do
  $MMREC qarm --dataset "$ds" --cold-share 0.1
  $MMREC qarm --dataset "$ds" --cold-share 0.1 --set source=raw --tag unaligned
  $MMREC qarm --dataset "$ds"
done
$MMREC results
