#!/usr/bin/env bash
# Stage 2, the original LAPDOG way: the retriever trained toward F1 + ROUGE + BLEU (f1rougebleudist),
# the reader by cross-entropy on the fused stories. LAPDOG's recipe, sizes overridable:
#   NPROC=1 READER_CKPT=ckpt/stage1/checkpoint/latest RETRIEVER=runs/models/retriever \
#   TRAIN=data/sample/train.jsonl EVAL=data/sample/valid.jsonl PASSAGES=data/sample/stories.jsonl \
#   STEPS=100 BS=4 bash scripts/stage2_lapdog.sh
set -euo pipefail
: "${NPROC:=2}" "${READER_CKPT:=ckpt/stage1/checkpoint/step-12000}" "${RETRIEVER:=facebook/contriever}"
: "${TRAIN:=data/convai2/train.jsonl}" "${EVAL:=data/convai2/valid.jsonl}" "${PASSAGES:=data/corpora/story/story.jsonl}"
: "${STEPS:=12000}" "${BS:=8}" "${FREQ:=1200}" "${CKPT:=ckpt/stage2_lapdog/}" "${NCTX:=6}"
"${PYTHON:-python}" -m torch.distributed.launch --nproc_per_node="$NPROC" train.py \
  --shuffle --refresh_index="$FREQ" --per_gpu_batch_size="$BS" --total_steps="$STEPS" \
  --eval_freq="$FREQ" --save_freq="$FREQ" --per_gpu_embedder_batch_size=128 \
  --gold_score_mode=f1rougebleudist --train_retriever --precision=fp32 \
  --target_maxlength=32 --generation_max_length=32 --dropout=0.1 --weight_decay=0.01 \
  --lr=5e-4 --lr_retriever=5e-4 --scheduler=linear --text_maxlength=512 --retriever_from=persona \
  --n_context="$NCTX" --retriever_n_context="$NCTX" --log_freq=1 --warmup_steps=50 --write_results \
  --task=qa --index_mode=flat --temperature_score=0.8 --temperature_gold=0.85 \
  --name=stage2_lapdog --checkpoint_dir="$CKPT" \
  --retriever_model_path="$RETRIEVER" --passages="$PASSAGES" \
  --train_data="$TRAIN" --eval_data="$EVAL" \
  --model_path="$READER_CKPT" --load_reader_weights_only \
  "$@"
