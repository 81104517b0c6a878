#!/usr/bin/env bash
# Reproduces the MP4SR rows of docs/results.md (issue 7, docs/mp4sr.md): SASRec, MP4SR (pre-training → fine-tuning),
# the text-only variant and the ablations on the sequential datasets. One job at a time, early stopping on
# VALIDATION Recall@20 (patience 10 evaluations); each stage is capped (2 shared CPU cores):
#   amazon-scientific:  3 minutes a run (epochs are seconds; the runs stop by early stopping or the cap)
#   ml100k-posters-seq: epochs (SASRec 30, pre-training 6, fine-tuning 20) with a 15-minute safety cap; the mixup
#     and cross-modality ablations fine-tune 10 epochs (tags *-ft10), to compare with MP4SR's 10-epoch run
# Fine-tuning uses lr 1e-3, chosen on amazon-scientific VALIDATION against the reference's 1e-4 + weight decay 1e-3.
# Usage: scripts/run-mp4sr.sh [dataset ...]   (default: amazon-scientific ml100k-posters-seq)
set -euo pipefail
cd "$(dirname "$0")/.."
MMREC=${MMREC:-.venv/bin/mmrec}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

train() {  # train CAP ARGS... → prints the run directory; CAP is "minutes=M" or "epochs=E"
  local cap=$1; shift
  local limit=(--train max_minutes=15 --train "${cap}")
  [[ $cap == minutes=* ]] && limit=(--train "max_${cap}")
  $MMREC train "$@" --train patience=10 "${limit[@]}" 2>/dev/null \
    | python3 -c 'import json, sys; text = sys.stdin.read(); print(json.loads(text[text.index("{"):])["run_dir"])'
}

datasets=("${@:-amazon-scientific ml100k-posters-seq}")
for ds in ${datasets[@]}; do
  case "$ds" in
    amazon-scientific) sasrec=minutes=3; pre=minutes=3; fine=minutes=3; ablations=false ;;  # text only: no image
    *)                 sasrec=epochs=30; pre=epochs=6;  fine=epochs=20; ablations=true ;;
  esac
  short=epochs=10
  ft=(--train learning_rate=1e-3)
  train "$sasrec" --dataset "$ds" --model sasrec
  $ablations || train "$sasrec" --dataset "$ds" --model sasrec --set dropout=0.2  # amazon: a second grid point each
  run=$(train "$pre" --dataset "$ds" --model mp4sr --set stage=pretrain --tag pretrain)
  train "$fine" --dataset "$ds" --model mp4sr --train "init_from=$run" "${ft[@]}"
  $ablations || train "$fine" --dataset "$ds" --model mp4sr --train "init_from=$run" --train learning_rate=1e-4 \
    --train weight_decay=1e-3  # the reference's fine-tuning optimiser, the other grid point behind lr 1e-3
  $ablations && train "$short" --dataset "$ds" --model mp4sr --train "init_from=$run" "${ft[@]}"  # equal budget
  $ablations && train "$short" --dataset "$ds" --model mp4sr --tag no-pretrain "${ft[@]}"
  train "$fine" --dataset "$ds" --model mp4sr --tag no-pretrain "${ft[@]}"
  if $ablations; then
    run=$(train "$pre" --dataset "$ds" --model mp4sr --set stage=pretrain --set modalities=text --tag text-only-pretrain)
    train "$fine" --dataset "$ds" --model mp4sr --set modalities=text --train "init_from=$run" --tag text-only "${ft[@]}"
    run=$(train "$pre" --dataset "$ds" --model mp4sr --set stage=pretrain --set mixup=false --tag no-mixup-pretrain)
    train "$short" --dataset "$ds" --model mp4sr --train "init_from=$run" --tag no-mixup-ft10 "${ft[@]}"
    run=$(train "$pre" --dataset "$ds" --model mp4sr --set stage=pretrain --set cross_modal_weight=0 \
          --tag no-cross-modal-pretrain)
    train "$short" --dataset "$ds" --model mp4sr --train "init_from=$run" --tag no-cross-modal-ft10 "${ft[@]}"
  fi
done
$MMREC results >/dev/null
