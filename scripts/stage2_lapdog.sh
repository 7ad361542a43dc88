#!/usr/bin/env bash
# Stage 2, the original LAPDOG way (the retriever toward F1 + ROUGE + BLEU of the greedy reply each
# story leads to): the recipe configs/lapdog_paper.yaml at the original README's sizes (T5-XL,
# 6 stories fused). For the recipe that learns on the sample data: RECIPE=configs/lapdog_evidence.yaml.
#   NPROC=1 READER_CKPT=ckpt/stage1/checkpoint/latest RETRIEVER=runs/models/retriever \
#   TRAIN=data/sample/train.jsonl EVAL=data/sample/valid.jsonl PASSAGES=data/sample/stories.jsonl \
#   STEPS=100 BS=4 NCTX=2 bash scripts/stage2_lapdog.sh
set -euo pipefail
: "${NPROC:=2}" "${READER_CKPT:=ckpt/stage1/checkpoint/step-12000}" "${RETRIEVER:=facebook/contriever}"
: "${TRAIN:=data/convai2/train.jsonl}" "${EVAL:=data/convai2/valid.jsonl}" "${PASSAGES:=data/corpora/story/story.jsonl}"
: "${STEPS:=12000}" "${BS:=8}" "${FREQ:=1200}" "${CKPT:=ckpt/stage2_lapdog/}" "${NCTX:=6}" "${LR:=5e-4}"
: "${RECIPE:=configs/lapdog_paper.yaml}"
"${PYTHON:-python}" -m torch.distributed.launch --nproc_per_node="$NPROC" train.py \
  --config "$RECIPE" \
  --per_gpu_batch_size="$BS" --total_steps="$STEPS" --eval_freq="$FREQ" --save_freq="$FREQ" \
  --per_gpu_embedder_batch_size=128 --target_maxlength=32 --generation_max_length=32 --text_maxlength=512 \
  --retriever_from=persona --n_context="$NCTX" --retriever_n_context="$NCTX" --log_freq=1 --warmup_steps=50 \
  --write_results --index_mode=flat --lr="$LR" --scheduler=linear \
  --name=stage2_lapdog --checkpoint_dir="$CKPT" \
  --retriever_model_path="$RETRIEVER" --passages="$PASSAGES" \
  --train_data="$TRAIN" --eval_data="$EVAL" \
  --model_path="$READER_CKPT" --load_reader_weights_only \
  "$@"
