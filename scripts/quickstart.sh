#!/usr/bin/env bash
# The main job on the built-in sample data, from a fresh clone: set up .venv/, build the small
# models, stage 1 (a reader taught to read stories), then from that one checkpoint and for the same
# number of steps: (a) SFT continued (the control), (b) LAPDOG stage 2, (c) joint GRPO; evaluates
# all on valid, prints a table, plots the runs' curves, and ends with one JSON line
#   {"before": {...}, "control": {...}, "lapdog": {...}, "joint_grpo": {...}}.
#   bash scripts/quickstart.sh                 # SEED=0
#   SEED=3 OUT=runs/qs3 bash scripts/quickstart.sh
# Budget knobs (environment): SEED, OUT, S1_STEPS, S2_STEPS, S1_BS, S2_BS, NPROC, EVAL_N.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_venv.sh
PY="$root/.venv/bin/python"
: "${SEED:=0}" "${S1_STEPS:=600}" "${S2_STEPS:=100}" "${S1_BS:=16}" "${S2_BS:=32}" "${NPROC:=1}"
: "${OUT:=runs/quickstart-seed$SEED}" "${EVAL_N:=198}" "${TEXT_MAXLEN:=192}"
export WANDB_MODE="${WANDB_MODE:-offline}" TOKENIZERS_PARALLELISM=false
DATA=data/sample
launch() { if [ "$NPROC" -gt 1 ]; then "$PY" -m torch.distributed.launch --nproc_per_node="$NPROC" "$@"; else "$PY" "$@"; fi; }
t0=$(date +%s)

# A 1.3M-parameter T5 whose vocabulary is the ~2.8k word pieces the sample data uses (same
# tokenization of every sample text, a 10x smaller output layer: the step cost of small runs), with
# a copy head (src/pointer.py): from scratch, it is what lets a reader this small copy a story's facts.
if [ ! -f "$OUT/models/reader/config.json" ]; then
  "$PY" scripts/build_small_models.py --out "$OUT/models" --seed "$SEED" --vocab_from $DATA/*.jsonl \
    --d_model 128 --d_ff 512 --num_layers 2 --num_decoder_layers 2 --num_heads 4 --d_kv 32 --pointer_generator
fi
COMMON=(--seed="$SEED" --text_maxlength="$TEXT_MAXLEN" --train_data="$DATA/train.jsonl" --eval_data="$DATA/valid.jsonl"
        --passages="$DATA/stories.jsonl" --retriever_model_path="$OUT/models/retriever" --n_context=1
        --per_gpu_eval_batch_size=32 --max_eval_examples="$EVAL_N" --generation_length_penalty=1.0)
# Stage 1 and the control fuse the posterior story (the one sharing the most rare words with the
# target reply), its fact swapped for a random one 90% of the time: the reader must copy from it.
READS=(--posterior_passages --posterior_fact_swap=0.9)

echo "== stage 1: reader trained to read stories ($S1_STEPS steps)"
launch train.py "${COMMON[@]}" "${READS[@]}" --shuffle --per_gpu_batch_size="$S1_BS" --total_steps="$S1_STEPS" \
  --retriever_n_context=1 --eval_freq=0 --save_freq="$S1_STEPS" --log_freq=50 --name=quickstart_stage1 \
  --checkpoint_dir="$OUT/stage1" --reader_model_type="$OUT/models/reader" --lr=2e-3 --warmup_steps=20
S1="$OUT/stage1/checkpoint/step-$S1_STEPS"

STAGE2=("${COMMON[@]}" --shuffle --per_gpu_batch_size="$S2_BS" --total_steps="$S2_STEPS" --model_path="$S1"
        --eval_freq=$((S2_STEPS / 2)) --save_freq="$S2_STEPS" --log_freq=5 --warmup_steps=5 --scheduler=fixed
        --retriever_n_context=5)
# Both retriever objectives learn from the reader's evidence (--retriever_signal evidence): each of a
# pool of 32 stories (the 24 stories of a topic fit in it) scores the log-likelihood the reader gives
# the target's fact-like words when that story alone is fused; chit-chat, whose words no story holds,
# moves nothing. Only the query side trains (the index stays exact), at τ = 0.05 (the scale of the
# score gaps between same-topic stories) and lr 3e-4. README, "Results", says why each was chosen.
RETRIEVER=(--query_side_retriever_training --retriever_signal=evidence --lr_retriever=3e-4)
echo "== (a) control: SFT continued ($S2_STEPS steps)"
launch train.py "${STAGE2[@]}" "${READS[@]}" --name=quickstart_control --checkpoint_dir="$OUT/control" --lr=1e-4
echo "== (b) LAPDOG stage 2 ($S2_STEPS steps)"
launch train.py "${STAGE2[@]}" "${READS[@]}" --name=quickstart_lapdog --checkpoint_dir="$OUT/lapdog" --lr=1e-4 \
  --train_retriever "${RETRIEVER[@]}" --retriever_n_context=32 --temperature_score=0.05 --gold_score_mode=emdr_seq \
  --temperature_gold=3
echo "== (c) joint GRPO ($S2_STEPS steps)"
launch train.py "${STAGE2[@]}" --name=quickstart_joint_grpo --checkpoint_dir="$OUT/joint_grpo" --lr=1e-4 \
  --reader_rl_learning --use_grpo --grpo_group_size=4 --grpo_temperature=0.7 --grpo_kl_coeff=0.02 \
  --grpo_train_retriever "${RETRIEVER[@]}" --grpo_retriever_pool_size=32 --grpo_retriever_group_size=1 \
  --grpo_retriever_temperature=0.05 --grpo_retriever_estimator=posterior --grpo_retriever_target_temperature=3 \
  --grpo_retriever_kl_coeff=0.001

evaluate() {  # $1 checkpoint, $2 output folder
  launch evaluate.py --model_path="$1" --eval_data="$DATA/valid.jsonl" --passages="$DATA/stories.jsonl" \
    --retriever_model_path="$OUT/models/retriever" --n_context=1 --retriever_n_context=5 \
    --max_eval_examples="$EVAL_N" --per_gpu_eval_batch_size=32 --checkpoint_dir="$2" --write_results > "$2.log"
}
echo "== evaluation on valid (top-1 retrieved story fused)"
evaluate "$S1" "$OUT/eval_before"
for arm in control lapdog joint_grpo; do evaluate "$OUT/$arm/checkpoint/latest" "$OUT/eval_$arm"; done

"$PY" scripts/plot_metrics.py "$OUT/control" "$OUT/lapdog" "$OUT/joint_grpo" --labels control lapdog joint_grpo \
  --out "$OUT/curves.png" > /dev/null || echo "(plot failed; the runs' metrics.jsonl are in $OUT)"
"$PY" scripts/quickstart_summary.py "$OUT" --seconds $(( $(date +%s) - t0 ))
