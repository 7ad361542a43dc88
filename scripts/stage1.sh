#!/usr/bin/env bash
# Stage 1: supervised fine-tuning of the reader, closed book (the seed README's command).
# Override with environment variables, e.g.
#   NPROC=1 READER=runs/models/reader TRAIN=data/sample/train.jsonl EVAL=data/sample/valid.jsonl \
#   STEPS=300 BS=16 bash scripts/stage1.sh
set -euo pipefail
: "${NPROC:=2}" "${READER:=t5-base}" "${TRAIN:=data/convai2/train.jsonl}" "${EVAL:=data/convai2/valid.jsonl}"
: "${STEPS:=12000}" "${BS:=64}" "${FREQ:=2000}" "${CKPT:=ckpt/stage1/}" "${LR:=5e-5}"
"${PYTHON:-python}" -m torch.distributed.launch --nproc_per_node="$NPROC" train.py \
  --closed_book \
  --shuffle \
  --per_gpu_batch_size="$BS" \
  --total_steps="$STEPS" \
  --eval_freq="$FREQ" \
  --save_freq="$FREQ" \
  --name=stage1_t5base \
  --checkpoint_dir="$CKPT" \
  --reader_model_type="$READER" \
  --lr="$LR" \
  --train_data="$TRAIN" \
  --eval_data="$EVAL" \
  "$@"
