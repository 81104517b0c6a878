#!/usr/bin/env bash
# Reproduces the baseline rows of docs/results.md (issue 2): grids searched on VALIDATION Recall@20.
# Usage: scripts/run-baselines.sh [dataset ...]   (default: ml100k-posters lfm2k amazon-baby)
# The grids are MMRec's, reduced where a full grid does not fit a 2-core CPU budget (docs/results.md says which).
set -euo pipefail
cd "$(dirname "$0")/.."
MMREC=${MMREC:-.venv/bin/mmrec}
datasets=("${@:-ml100k-posters lfm2k amazon-baby}")
for ds in ${datasets[@]}; do
  case "$ds" in
    amazon-baby) train=(--train eval_every=2 --train patience=10); bpr_grid="1e-1,1e-2,1e-3,1e-4,1e-5"; layers="2,3,4"; regs="1e-4" ;;
    ml100k-posters) train=(); bpr_grid="1e-1,1e-2,1e-3"; layers="2,3,4"; regs="1e-3,1e-4" ;;
    *)           train=(); bpr_grid="1.0,1e-1,1e-2,1e-3,1e-5"; layers="1,2,3,4"; regs="1e-3,1e-4,1e-5" ;;
  esac
  $MMREC train --dataset "$ds" --model popularity
  $MMREC tune --dataset "$ds" --model bpr --grid reg_weight=$bpr_grid "${train[@]}"
  $MMREC tune --dataset "$ds" --model lightgcn --grid n_layers=$layers --grid reg_weight=$regs "${train[@]}"
  if [ "$ds" != amazon-baby ]; then
    $MMREC tune --dataset "$ds" --model vbpr --grid reg_weight=1e-3,1e-4 "${train[@]}"
  fi
done
