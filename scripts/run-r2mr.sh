#!/usr/bin/env bash
# Reproduces the R2MR rows of docs/results.md (issue 5, docs/r2mr.md): R2MR and its ablations (no rewriter, no
# reviewer, K = 3), each with seeds 2024, 1 and 2, then the modality-quality reports. R2MR's cold-start rows come
# from scripts/run-cold-start.sh (the one protocol, every model on the same held-out items: docs/cold-start.md).
# Selection on VALIDATION Recall@20; the baselines' rows come from
# scripts/run-baselines.sh and scripts/run-mm-baselines.sh. Runs end by early stopping (patience 20) or an epoch
# cap, so a seed gives the same model on any machine; the 30-minute wall-clock cap is a safety net that is reported
# (metrics.json stopped_by=safety_cap, a warning on stderr) if it ever fires. On 2 shared CPU cores (docs/r2mr.md):
#   lfm2k:          up to 200 epochs (every earlier run early-stopped by epoch 95: best epochs 36-73)
#   ml100k-posters: 80 epochs; batch 4096 and lr 2e-3 come from training/presets.toml [ml100k-posters.r2mr.train]
# Usage: scripts/run-r2mr.sh [dataset ...]   (default: lfm2k ml100k-posters)
set -euo pipefail
cd "$(dirname "$0")/.."
MMREC=${MMREC:-.venv/bin/mmrec}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

datasets=("${@:-lfm2k ml100k-posters}")
for ds in ${datasets[@]}; do
  case "$ds" in
    lfm2k) caps=(--train epochs=200 --train max_minutes=30) ;;
    *)     caps=(--train epochs=80 --train max_minutes=30) ;;
  esac
  for seed in 2024 1 2; do
    $MMREC train --dataset "$ds" --model r2mr "${caps[@]}" --seed $seed
    $MMREC train --dataset "$ds" --model r2mr --tag no-rewriter --set rewriter=false "${caps[@]}" --seed $seed
    $MMREC train --dataset "$ds" --model r2mr --tag no-reviewer --set reviewer=false "${caps[@]}" --seed $seed
    $MMREC train --dataset "$ds" --model r2mr --tag k3 --set n_interests=3 "${caps[@]}" --seed $seed
  done
  latest=$(ls -d var/runs/"$ds"/r2mr/*-s2024 | sort | tail -n1)
  $MMREC r2mr-report "$latest"
done
$MMREC results >/dev/null
