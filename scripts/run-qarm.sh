#!/usr/bin/env bash
# Reproduces the QARM numbers of docs/qarm.md (issue 6), one run at a time:
#   cold start (15% of items held out of training entirely), aligned codes and the unaligned ablation,
#   then the warm split (the code-based model vs LightGCN, same split).
# Each `mmrec qarm` run loads the best LightGCN run of its dataset by VALIDATION Recall@20, or trains one first.
# Usage: scripts/run-qarm.sh [dataset ...]   (default: lfm2k ml100k-posters)
set -euo pipefail
cd "$(dirname "$0")/.."
MMREC=${MMREC:-.venv/bin/mmrec}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
datasets=("${@:-lfm2k ml100k-posters}")
for ds in ${datasets[@]}; do
  $MMREC qarm --dataset "$ds" --cold-share 0.15
  $MMREC qarm --dataset "$ds" --cold-share 0.15 --set source=raw --tag unaligned
  $MMREC qarm --dataset "$ds"
done
$MMREC results
