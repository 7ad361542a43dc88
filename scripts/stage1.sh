#!/usr/bin/env bash
# Stage 1: supervised fine-tuning of the reader, closed book: the original LAPDOG README's command
# over the recipe configs/stage1_closed_book.yaml (for our recipe that teaches the reader to read
# stories: RECIPE=configs/stage1_reads.yaml). Sizes, models and data from the environment, e.g.
#   NPROC=1 READER=runs/models/reader TRAIN=data/sample/train.jsonl EVAL=data/sample/valid.jsonl \
#   STEPS=300 BS=16 LR=1e-3 bash scripts/stage1.sh
# Extra arguments are passed last (they win).
set -euo pipefail
: "${NPROC:=2}" "${READER:=t5-base}" "${TRAIN:=data/convai2/train.jsonl}" "${EVAL:=data/convai2/valid.jsonl}"
: "${STEPS:=12000}" "${BS:=64}" "${FREQ:=2000}" "${CKPT:=ckpt/stage1/}" "${LR:=5e-5}"
: "${RECIPE:=configs/stage1_closed_book.yaml}"
"${PYTHON:-python}" -m torch.distributed.launch --nproc_per_node="$NPROC" train.py \
  --config "$RECIPE" \
  --per_gpu_batch_size="$BS" \
  --total_steps="$STEPS" \
  --eval_freq="$FREQ" \
  --save_freq="$FREQ" \
  --name=stage1 \
  --checkpoint_dir="$CKPT" \
  --reader_model_type="$READER" \
  --lr="$LR" \
  --train_data="$TRAIN" \
  --eval_data="$EVAL" \
  "$@"
