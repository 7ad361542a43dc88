#!/usr/bin/env bash
# Stage 2: joint GRPO for the generator and the retriever, the recipe configs/joint_grpo_evidence.yaml
# (the quickstart's) at the original LAPDOG-GRPO README's sizes. Override with the environment, e.g.
#   NPROC=1 READER_CKPT=ckpt/stage1/checkpoint/latest RETRIEVER=runs/models/retriever \
#   TRAIN=data/sample/train.jsonl EVAL=data/sample/valid.jsonl PASSAGES=data/sample/stories.jsonl \
#   STEPS=50 BS=8 bash scripts/stage2_grpo.sh
# Extra arguments are passed last (they win). The original README's own flags (k 4 drawn stories
# scored by their replies, the pool estimator's defaults) are in docs/method.md, "Recipes".
set -euo pipefail
: "${NPROC:=2}" "${READER_CKPT:=ckpt/stage1/checkpoint/step-12000}" "${RETRIEVER:=facebook/contriever}"
: "${TRAIN:=data/convai2/train.jsonl}" "${EVAL:=data/convai2/valid.jsonl}" "${PASSAGES:=data/corpora/story/story.jsonl}"
: "${STEPS:=12000}" "${BS:=8}" "${FREQ:=1000}" "${CKPT:=ckpt/joint_grpo/}" "${LR:=1e-5}"
"${PYTHON:-python}" -m torch.distributed.launch --nproc_per_node="$NPROC" train.py \
  --config configs/joint_grpo_evidence.yaml \
  --per_gpu_batch_size="$BS" \
  --accumulation_steps=2 \
  --total_steps="$STEPS" \
  --eval_freq="$FREQ" \
  --save_freq="$FREQ" \
  --name=joint_grpo \
  --checkpoint_dir="$CKPT" \
  --lr="$LR" \
  --train_data="$TRAIN" \
  --eval_data="$EVAL" \
  --passages="$PASSAGES" \
  --model_path="$READER_CKPT" \
  --retriever_model_path="$RETRIEVER" \
  --use_wandb \
  --wandb_project=lapdog-grpo \
  "$@"
