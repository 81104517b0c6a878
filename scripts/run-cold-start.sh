#!/usr/bin/env bash
# Reproduces the cold-start table of docs/cold-start.md: LightGCN, BPR-MF, VBPR, R2MR and QARM through the one
# cold-start protocol (training/experiments/cold_protocol.py) on the same held-out items (10 % of the items with
# interactions, split seed 2024: the --share/--split-seed defaults), training seeds 2024, 1 and 2. Every model is
# capped at 20 epochs (validation every 5; never a wall-clock cap), so a seed gives the same numbers on any machine.
# Writes docs/cold-start/<dataset>.json and the table in docs/cold-start.md.
# Usage: scripts/run-cold-start.sh [dataset ...]   (default: lfm2k ml100k-posters)
set -euo pipefail
cd "$(dirname "$0")/.."
MMREC=${MMREC:-.venv/bin/mmrec}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread per process: far faster than two on a busy 2-core machine
datasets=("${@:-lfm2k ml100k-posters}")
for ds in ${datasets[@]}; do
  $MMREC cold-start --dataset "$ds" \
    --model lightgcn --model bpr --model vbpr --model r2mr --model qarm \
    --seed 2024 --seed 1 --seed 2 --train epochs=20 --train eval_every=5
done
