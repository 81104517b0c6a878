#!/usr/bin/env bash
# Reproduces the R2MR rows of docs/results.md (issue 5, docs/r2mr.md): R2MR and its ablations (no rewriter, no
# reviewer, K = 3), each with seeds 2024, 1 and 2, then the modality-quality reports. R2MR's cold-start rows come
# from scripts/run-cold-start.sh (the one protocol, every model on the same held-out items: docs/cold-start.md). Selection on VALIDATION Recall@20; the baselines' rows come from
# scripts/run-baselines.sh and scripts/run-mm-baselines.sh. Caps for 2 shared CPU cores (docs/r2mr.md):
#   lfm2k:          a 6-minute wall-clock cap per run (batch 2048, lr 1e-3: the trainer's defaults)
#   ml100k-posters: 80 epochs, batch 4096, lr 2e-3, a 12-minute safety cap
# Usage: scripts/run-r2mr.sh [dataset ...]   (default: lfm2k ml100k-posters)
set -euo pipefail
cd "$(dirname "$0")/.."
MMREC=${MMREC:-.venv/bin/mmrec}
PYTHON=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

datasets=("${@:-lfm2k ml100k-posters}")
for ds in ${datasets[@]}; do
  case "$ds" in
    lfm2k) caps=(--train max_minutes=6) ;;
    *)     caps=(--train epochs=80 --train batch_size=4096 --train learning_rate=2e-3 --train max_minutes=12) ;;
  esac
  for seed in 2024 1 2; do
    $MMREC train --dataset "$ds" --model r2mr "${caps[@]}" --seed $seed
    $MMREC train --dataset "$ds" --model r2mr --tag no-rewriter --set rewriter=false "${caps[@]}" --seed $seed
    $MMREC train --dataset "$ds" --model r2mr --tag no-reviewer --set reviewer=false "${caps[@]}" --seed $seed
    $MMREC train --dataset "$ds" --model r2mr --tag k3 --set n_interests=3 "${caps[@]}" --seed $seed
  done
  latest=$(ls -d var/runs/"$ds"/r2mr/*-s2024 | sort | tail -n1)
  $PYTHON -m training.experiments.r2mr_report "$latest"
done
$MMREC results >/dev/null
