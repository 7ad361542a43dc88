#!/usr/bin/env bash
# One run of the reader search (issue: a reader that talks on ConvAI2), dev split only:
# stage 1 closed book on the study's persona split, then evaluate.py on dev with each decoding,
# then research/reader/record.py writes results/reader/NAME.md and updates results.json / RESULTS.md.
#   bash research/reader/run.sh NAME [train.py flags ...]
# Environment: DATA (../shared/data), OUT (runs/reader), STEPS (1500), TRAIN (the split's train.jsonl;
# e.g. $OUT/train_both.jsonl for both speakers' turns), READER (a reader folder; default: built here),
# DEV_N (500 dev examples), DECODINGS (names from research/reader/record.py's DECODINGS), SETUP_ONLY=1,
# PRETRAIN_STEPS (0: none; N: first N steps of train.py --task mlm, closed book, batch 64, on the stories and
# the split's train dialogues, into $OUT/mlm_N; stage 1 then starts from its best reader).
# A finished step is skipped when the command is run again (delete its folder to redo it).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
NAME="$1"; shift
PY="${PYTHON:-$root/.venv/bin/python}"
DATA="${DATA:-../shared/data}" OUT="${OUT:-runs/reader}" STEPS="${STEPS:-1500}" DEV_N="${DEV_N:-500}"
DECODINGS="${DECODINGS:-greedy no_repeat3 penalty1.3 sample_p0.9}"
S="$DATA/corpora/story/story.jsonl"
export WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
[ -f "$OUT/split/dev.jsonl" ] || "$PY" research/study/split.py "$DATA/convai2/valid.jsonl" --out "$OUT/split" --seed 0
[ -f "$OUT/train_both.jsonl" ] || "$PY" scripts/add_partner_turns.py --train "$OUT/split/train.jsonl" \
  --exclude "$OUT/split/dev.jsonl" "$OUT/split/test.jsonl" --out "$OUT/train_both.jsonl" > "$OUT/train_both.json"
# The study's reader size: d 256, 4+4 layers; MiniLM's vocabulary over the train split and the stories.
[ -f "$OUT/models/reader/config.json" ] || "$PY" scripts/build_small_models.py --out "$OUT/models" \
  --init_embeddings minilm --vocab_from "$OUT/split/train.jsonl" "$S" --d_model 256 --d_ff 1024 --num_layers 4 \
  --num_heads 4 --d_kv 64
[ "${SETUP_ONLY:-0}" = 1 ] && exit 0  # the split, the extra turns and the reader only (before runs side by side)
PRETRAIN_STEPS="${PRETRAIN_STEPS:-0}"
if [ "$PRETRAIN_STEPS" -gt 0 ]; then
  MLM="$OUT/mlm_$PRETRAIN_STEPS"
  [ -f "$MLM/summary.json" ] || "$PY" train.py --task mlm --closed_book --train_data "$S" "$OUT/split/train.jsonl" \
    --eval_data="$OUT/split/dev.jsonl" --max_eval_examples=200 --reader_model_type="$OUT/models/reader" \
    --per_gpu_batch_size=64 --per_gpu_eval_batch_size=50 --total_steps="$PRETRAIN_STEPS" \
    --eval_freq=$((PRETRAIN_STEPS / 4)) --save_freq=100000 --log_freq=50 --keep_best --lr=1e-3 --warmup_steps=50 \
    --text_maxlength=128 --target_maxlength=32 --checkpoint_dir="$MLM" --name="reader_mlm_$PRETRAIN_STEPS" \
    > "$MLM.log" 2>&1 || { echo "pretraining failed: see $MLM.log" >&2; exit 1; }
  READER="${READER:-$MLM/checkpoint/best/reader}"
fi
TRAIN="${TRAIN:-$OUT/split/train.jsonl}" READER="${READER:-$OUT/models/reader}"
RUN="$OUT/$NAME"
if [ ! -f "$RUN/summary.json" ]; then
  "$PY" train.py --config configs/stage1_closed_book.yaml --train_data="$TRAIN" --eval_data="$OUT/split/dev.jsonl" \
    --max_eval_examples=200 --reader_model_type="$READER" --per_gpu_batch_size=32 --per_gpu_eval_batch_size=50 \
    --total_steps="$STEPS" --eval_freq=250 --save_freq=100000 --log_freq=50 --keep_best --lr=1e-3 \
    --warmup_steps=100 --text_maxlength=128 --generation_max_length=32 --checkpoint_dir="$RUN" --name="reader_$NAME" \
    "$@" > "$RUN.log" 2>&1 || { echo "stage 1 failed: see $RUN.log" >&2; exit 1; }
fi
for d in $DECODINGS; do
  [ -f "$RUN/dev_$d/done" ] && continue
  "$PY" evaluate.py --model_path="$RUN/checkpoint/best" --eval_data="$OUT/split/dev.jsonl" --max_eval_examples="$DEV_N" \
    --per_gpu_eval_batch_size=50 --checkpoint_dir="$RUN/dev_$d" --write_results \
    $("$PY" research/reader/record.py --flags "$d") > "$RUN/dev_$d.log" 2>&1
  touch "$RUN/dev_$d/done"
done
"$PY" research/reader/record.py "$RUN" --name "$NAME" \
  --command "PRETRAIN_STEPS=$PRETRAIN_STEPS STEPS=$STEPS TRAIN=$TRAIN bash research/reader/run.sh $NAME $*" \
  --train "$TRAIN" --decodings $DECODINGS
