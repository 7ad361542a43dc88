#!/usr/bin/env bash
# The main job on the built-in sample data, from a fresh clone: set up .venv/, build the small
# models, stage 1 (a reader taught to read stories), then from that one checkpoint and for the same
# number of steps and examples: (a) SFT continued (the control), (b) LAPDOG stage 2, (c) joint GRPO;
# evaluates all on the test split, prints a table, plots the runs' curves (their in-loop evaluations
# are on valid, where settings are chosen) and ends with one JSON line
#   {"before": {...}, "control": {...}, "lapdog": {...}, "joint_grpo": {...}}.
#   bash scripts/quickstart.sh                 # SEED=0
#   SEED=3 OUT=runs/qs3 bash scripts/quickstart.sh
# The methods are the recipes in configs/ (stage1_reads, control, lapdog_evidence,
# joint_grpo_evidence); this script sets only data, models and sizes.
# Budget knobs (environment): SEED, OUT, S1_STEPS, S2_STEPS, S1_BS, S2_BS, NPROC, EVAL_N.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_venv.sh
PY="${PYTHON:-$root/.venv/bin/python}"  # PYTHON: another interpreter (the recipe test records the commands)
: "${SEED:=0}" "${S1_STEPS:=600}" "${S2_STEPS:=100}" "${S1_BS:=16}" "${S2_BS:=32}" "${NPROC:=1}"
: "${OUT:=runs/quickstart-seed$SEED}" "${EVAL_N:=200}" "${TEXT_MAXLEN:=192}"
export WANDB_MODE="${WANDB_MODE:-offline}" TOKENIZERS_PARALLELISM=false
DATA=data/sample
launch() { if [ "$NPROC" -gt 1 ]; then "$PY" -m torch.distributed.launch --nproc_per_node="$NPROC" "$@"; else "$PY" "$@"; fi; }
t0=$(date +%s)

# A 1.3M-parameter T5 whose vocabulary is the ~2.8k word pieces the sample data uses (same
# tokenization of every sample text, a 10x smaller output layer: the step cost of small runs), with
# a copy head (src/model/pointer.py): from scratch, it is what lets a reader this small copy a story's facts.
if [ ! -f "$OUT/models/reader/config.json" ]; then
  "$PY" scripts/build_small_models.py --out "$OUT/models" --seed "$SEED" --vocab_from $DATA/*.jsonl \
    --d_model 128 --d_ff 512 --num_layers 2 --num_decoder_layers 2 --num_heads 4 --d_kv 32 --pointer_generator
fi
COMMON=(--seed="$SEED" --text_maxlength="$TEXT_MAXLEN" --train_data="$DATA/train.jsonl" --eval_data="$DATA/valid.jsonl"
        --passages="$DATA/stories.jsonl" --retriever_model_path="$OUT/models/retriever"
        --per_gpu_eval_batch_size=32 --max_eval_examples="$EVAL_N" --generation_length_penalty=1.0)

echo "== stage 1: reader trained to read stories ($S1_STEPS steps)"
launch train.py --config configs/stage1_reads.yaml "${COMMON[@]}" --per_gpu_batch_size="$S1_BS" \
  --total_steps="$S1_STEPS" --eval_freq=0 --save_freq="$S1_STEPS" --log_freq=50 --name=quickstart_stage1 \
  --checkpoint_dir="$OUT/stage1" --reader_model_type="$OUT/models/reader"
S1="$OUT/stage1/checkpoint/step-$S1_STEPS"

# Every arm: the same stage-1 checkpoint, steps and batch; in-loop evaluations on valid.
STAGE2=("${COMMON[@]}" --per_gpu_batch_size="$S2_BS" --total_steps="$S2_STEPS" --model_path="$S1"
        --eval_freq=$((S2_STEPS / 2)) --save_freq="$S2_STEPS" --log_freq=5 --n_context=1 --retriever_n_context=5)
echo "== (a) control: SFT continued ($S2_STEPS steps)"
launch train.py --config configs/control.yaml "${STAGE2[@]}" --name=quickstart_control --checkpoint_dir="$OUT/control"
echo "== (b) LAPDOG stage 2 ($S2_STEPS steps)"
# (its recipe sets --retriever_n_context 32, the pool; so it comes after the shared sizes)
launch train.py "${STAGE2[@]}" --config configs/lapdog_evidence.yaml --name=quickstart_lapdog --checkpoint_dir="$OUT/lapdog"
echo "== (c) joint GRPO ($S2_STEPS steps)"
launch train.py --config configs/joint_grpo_evidence.yaml "${STAGE2[@]}" --name=quickstart_joint_grpo \
  --checkpoint_dir="$OUT/joint_grpo"

evaluate() {  # $1 checkpoint, $2 output folder
  launch evaluate.py --model_path="$1" --eval_data="$DATA/test.jsonl" --passages="$DATA/stories.jsonl" \
    --retriever_model_path="$OUT/models/retriever" --n_context=1 --retriever_n_context=5 \
    --max_eval_examples="$EVAL_N" --per_gpu_eval_batch_size=32 --checkpoint_dir="$2" --write_results > "$2.log"
}
echo "== evaluation on test (top-1 retrieved story fused)"
evaluate "$S1" "$OUT/eval_before"
for arm in control lapdog joint_grpo; do evaluate "$OUT/$arm/checkpoint/latest" "$OUT/eval_$arm"; done

"$PY" scripts/plot_metrics.py "$OUT/control" "$OUT/lapdog" "$OUT/joint_grpo" --labels control lapdog joint_grpo \
  --out "$OUT/curves.png" > /dev/null || echo "(plot failed; the runs' metrics.jsonl are in $OUT)"
"$PY" scripts/quickstart_summary.py "$OUT" --seconds $(( $(date +%s) - t0 ))
