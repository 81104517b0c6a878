#!/usr/bin/env bash
# Reproduces the MMMLP rows of docs/results.md (issue 16, docs/models/mmmlp.md) beside SASRec and MP4SR's
# (scripts/run-mp4sr.sh), with the caps those rows had, early stopping on VALIDATION Recall@20 (patience 10):
#   ml100k-posters-seq: 50 epochs a run; the grid fusion_layers ∈ {1 (the paper's Fusion Mixer Layer), 0 (the
#     authors' code: LayerNorm + Linear only)} at seed 2024, then seeds 1 and 2 at the point validation chose;
#   amazon-scientific (text only): 100 epochs a run, fusion_layers 1, seeds 2024, 1, 2.
# Usage: scripts/run-mmmlp.sh [dataset ...]   (default: ml100k-posters-seq amazon-scientific)
set -euo pipefail
cd "$(dirname "$0")/.."
MMREC=${MMREC:-.venv/bin/mmrec}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

train() {  # train EPOCHS ARGS... → prints the run directory
  local epochs=$1; shift
  $MMREC train "$@" --train patience=10 --train "epochs=${epochs}" 2>/dev/null \
    | python3 -c 'import json, sys; text = sys.stdin.read(); print(json.loads(text[text.index("{"):])["run_dir"])'
}

datasets=("${@:-ml100k-posters-seq amazon-scientific}")
for ds in ${datasets[@]}; do
  if [[ $ds == amazon-scientific ]]; then
    for seed in 2024 1 2; do train 100 --dataset "$ds" --model mmmlp --train "seed=${seed}"; done
    continue
  fi
  train 50 --dataset "$ds" --model mmmlp
  train 50 --dataset "$ds" --model mmmlp --set fusion_layers=0
  for seed in 1 2; do train 50 --dataset "$ds" --model mmmlp --train "seed=${seed}"; done  # the chosen point
done
$MMREC results >/dev/null
