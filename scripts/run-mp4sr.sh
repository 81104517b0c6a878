#!/usr/bin/env bash
# Reproduces the MP4SR rows of docs/results.md (issue 7, docs/mp4sr.md): SASRec, MP4SR (pre-training → fine-tuning),
# the text-only variant and the ablations, on the sequential datasets. One job at a time; every run is capped in
# wall-clock minutes (2 shared CPU cores), early stopping on VALIDATION Recall@20 ends it sooner.
# Usage: scripts/run-mp4sr.sh [dataset ...]   (default: amazon-scientific ml100k-posters-seq)
# Stage minutes scale with MINUTES_SCALE (default 1).
set -euo pipefail
cd "$(dirname "$0")/.."
MMREC=${MMREC:-.venv/bin/mmrec}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
scale=${MINUTES_SCALE:-1}
finetune=(--train learning_rate=1e-3)  # chosen on amazon-scientific VALIDATION against the reference's 1e-4 (docs/mp4sr.md)

minutes() { python3 -c "print($1 * $scale)"; }
train() {  # train MINUTES ARGS... → prints the run directory
  local budget; budget=$(minutes "$1"); shift
  $MMREC train "$@" --train patience=10 --train "max_minutes=$budget" 2>/dev/null \
    | python3 -c 'import json, sys; text = sys.stdin.read(); print(json.loads(text[text.index("{"):])["run_dir"])'
}

datasets=("${@:-amazon-scientific ml100k-posters-seq}")
for ds in ${datasets[@]}; do
  case "$ds" in
    amazon-scientific) t_sasrec=3; t_pre=3; t_fine=3; t_text=0; t_ablation=0 ;;  # text only: no image ablations
    *)                 t_sasrec=5; t_pre=4; t_fine=5; t_text=3; t_ablation=3 ;;
  esac
  train "$t_sasrec" --dataset "$ds" --model sasrec
  pre=$(train "$t_pre" --dataset "$ds" --model mp4sr --set stage=pretrain --tag pretrain)
  train "$t_fine" --dataset "$ds" --model mp4sr --train "init_from=$pre" "${finetune[@]}"
  train "$t_fine" --dataset "$ds" --model mp4sr --tag no-pretrain "${finetune[@]}"
  if [ "$t_text" != 0 ]; then
    pre=$(train "$t_text" --dataset "$ds" --model mp4sr --set stage=pretrain --set modalities=text --tag text-only-pretrain)
    train "$t_text" --dataset "$ds" --model mp4sr --set modalities=text --train "init_from=$pre" --tag text-only "${finetune[@]}"
  fi
  if [ "$t_ablation" != 0 ]; then
    pre=$(train "$t_ablation" --dataset "$ds" --model mp4sr --set stage=pretrain --set mixup=false --tag no-mixup-pretrain)
    train "$((t_ablation + 1))" --dataset "$ds" --model mp4sr --set mixup=false --train "init_from=$pre" --tag no-mixup "${finetune[@]}"
    pre=$(train "$t_ablation" --dataset "$ds" --model mp4sr --set stage=pretrain --set cross_modal_weight=0 --tag no-cross-modal-pretrain)
    train "$((t_ablation + 1))" --dataset "$ds" --model mp4sr --set cross_modal_weight=0 --train "init_from=$pre" --tag no-cross-modal "${finetune[@]}"
  fi
done
$MMREC results >/dev/null
