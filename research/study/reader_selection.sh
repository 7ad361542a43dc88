#!/usr/bin/env bash
# The study's reader, chosen on the dev split: two stage-1 candidates, the same SFT recipe, from
#   A: the MiniLM-initialized reader pretrained 750 steps × 64 (scripts/pretrain_reader.py, mix)
#   B: the same reader without pretraining
# then their dev curves as a table and a figure (research/study/reader_selection.py).
#   bash research/study/reader_selection.sh [OUT]        # default runs/reader_selection
# Needs ../shared/data. About 2 hours on the 2-core CPU (the two SFT runs side by side, 1 thread each).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
PY="$root/.venv/bin/python"
OUT="${1:-runs/reader_selection}"
DATA="${DATA:-../shared/data}"
S="$DATA/corpora/story/story.jsonl"
"$PY" research/study/split.py "$DATA/convai2/valid.jsonl" --out "$OUT/split" --seed 0
[ -f "$OUT/models/reader/config.json" ] || "$PY" scripts/build_small_models.py --out "$OUT/models" \
  --init_embeddings minilm --vocab_from "$OUT/split/train.jsonl" "$S" --d_model 256 --d_ff 1024 --num_layers 4 \
  --num_heads 4 --d_kv 64
"$PY" scripts/pretrain_reader.py --reader "$OUT/models/reader" --out "$OUT/pretrained" --dialogues "$OUT/split/train.jsonl" \
  --stories "$S" --steps 750 --batch 64 --eval_every 250 --precision bf16
sft() {  # $1 name, $2 reader, $3 index flag
  OMP_NUM_THREADS=1 "$PY" train.py --config configs/stage1_reads.yaml --posterior_fact_swap=0 \
    --train_data="$OUT/split/train.jsonl" --eval_data="$OUT/split/dev.jsonl" --max_eval_examples=200 --passages="$S" \
    --retriever_model_path="$OUT/models/retriever" --reader_model_type="$2" --per_gpu_batch_size=32 \
    --per_gpu_eval_batch_size=50 --total_steps=1000 --eval_freq=200 --save_freq=100000 --log_freq=50 \
    --early_stopping_patience=2 --lr=1e-3 --warmup_steps=100 --scheduler=linear --text_maxlength=192 \
    --generation_max_length=32 --precision=bf16 --checkpoint_dir="$OUT/$1" --name="$1" "$3"
}
sft A_pretrained "$OUT/pretrained/reader" --save_index_path="$OUT/index" > "$OUT/A.log" 2>&1 &
while [ ! -f "$OUT/index/meta.json" ]; do sleep 20; done  # B loads the index A built
sft B_not_pretrained "$OUT/models/reader" --load_index_path="$OUT/index" > "$OUT/B.log" 2>&1
wait
"$PY" research/study/reader_selection.py "$OUT/A_pretrained" "$OUT/B_not_pretrained" --labels "A: pretrained" \
  "B: not pretrained" --pretraining "$OUT/pretrained/pretrain_log.jsonl" --out "$OUT/reader_selection"
