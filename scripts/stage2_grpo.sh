#!/usr/bin/env bash
# Stage 2: joint GRPO for the generator and the retriever (the seed README's command).
#   NPROC=1 READER_CKPT=ckpt/stage1/checkpoint/latest RETRIEVER=runs/models/retriever \
#   TRAIN=data/sample/train.jsonl EVAL=data/sample/valid.jsonl PASSAGES=data/sample/stories.jsonl \
#   STEPS=50 BS=2 bash scripts/stage2_grpo.sh
set -euo pipefail
: "${NPROC:=2}" "${READER_CKPT:=ckpt/stage1/checkpoint/step-12000}" "${RETRIEVER:=facebook/contriever}"
: "${TRAIN:=data/convai2/train.jsonl}" "${EVAL:=data/convai2/valid.jsonl}" "${PASSAGES:=data/corpora/story/story.jsonl}"
: "${STEPS:=12000}" "${BS:=2}" "${FREQ:=1000}" "${CKPT:=ckpt/joint_grpo/}" "${READER_TYPE:=t5-base}"
"${PYTHON:-python}" -m torch.distributed.launch --nproc_per_node="$NPROC" train.py \
  --shuffle \
  --per_gpu_batch_size="$BS" \
  --accumulation_steps=2 \
  --total_steps="$STEPS" \
  --eval_freq="$FREQ" \
  --save_freq="$FREQ" \
  --name=joint_grpo \
  --checkpoint_dir="$CKPT" \
  --gold_score_mode=f1rougebleudist \
  --reader_rl_learning \
  --use_grpo \
  --grpo_group_size=4 \
  --grpo_train_retriever \
  --grpo_retriever_group_size=4 \
  --grpo_kl_coeff=0.01 \
  --grpo_clip_epsilon=0.2 \
  --reader_model_type="$READER_TYPE" \
  --lr=1e-5 \
  --warmup_steps=500 \
  --train_data="$TRAIN" \
  --eval_data="$EVAL" \
  --passages="$PASSAGES" \
  --model_path="$READER_CKPT" \
  --retriever_model_path="$RETRIEVER" \
  --generation_length_penalty=1.0 \
  --use_wandb \
  --wandb_project=lapdog-grpo \
  "$@"
