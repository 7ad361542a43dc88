#!/usr/bin/env bash
# The main job on the built-in sample data, from a fresh clone: set up .venv/, build the small
# models, stage 1 (closed-book reader), evaluation with the pretrained retriever, joint GRPO
# (generator + retriever), evaluation again; prints reward and recall@1 before and after stage 2.
#   bash scripts/quickstart.sh
# Budget knobs (environment): OUT, S1_STEPS, S2_STEPS, S1_BS, S2_BS, NPROC, EVAL_N.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_venv.sh
PY="$root/.venv/bin/python"
: "${OUT:=runs/quickstart}" "${S1_STEPS:=300}" "${S2_STEPS:=40}" "${S1_BS:=16}" "${S2_BS:=2}" "${NPROC:=1}"
: "${EVAL_N:=198}" "${TEXT_MAXLEN:=192}"
export WANDB_MODE="${WANDB_MODE:-offline}" TOKENIZERS_PARALLELISM=false
DATA=data/sample
launch() { if [ "$NPROC" -gt 1 ]; then "$PY" -m torch.distributed.launch --nproc_per_node="$NPROC" "$@"; else "$PY" "$@"; fi; }

if [ ! -f "$OUT/models/reader/config.json" ]; then
  "$PY" scripts/build_small_models.py --out "$OUT/models"
fi

echo "== stage 1: closed-book reader ($S1_STEPS steps)"
launch train.py --closed_book --shuffle --per_gpu_batch_size="$S1_BS" --total_steps="$S1_STEPS" \
  --eval_freq=0 --save_freq="$S1_STEPS" --log_freq=50 --name=quickstart_stage1 --checkpoint_dir="$OUT/stage1" \
  --reader_model_type="$OUT/models/reader" --lr=1e-3 --warmup_steps=20 --scheduler=linear \
  --text_maxlength="$TEXT_MAXLEN" --train_data="$DATA/train.jsonl" --eval_data="$DATA/valid.jsonl"

evaluate() {  # $1 checkpoint, $2 output folder
  launch evaluate.py --model_path="$1" --eval_data="$DATA/valid.jsonl" --passages="$DATA/stories.jsonl" \
    --retriever_model_path="$OUT/models/retriever" --n_context=1 --retriever_n_context=5 \
    --max_eval_examples="$EVAL_N" --per_gpu_eval_batch_size=32 --checkpoint_dir="$2" --write_results \
    | tee "$2.log"
}
mkdir -p "$OUT"
echo "== evaluation before stage 2 (stage-1 reader, pretrained retriever, top-1 story fused)"
evaluate "$OUT/stage1/checkpoint/latest" "$OUT/eval_before"

echo "== stage 2: joint GRPO ($S2_STEPS steps)"
launch train.py --shuffle --per_gpu_batch_size="$S2_BS" --accumulation_steps=2 --total_steps="$S2_STEPS" \
  --eval_freq=0 --save_freq="$S2_STEPS" --log_freq=5 --name=quickstart_grpo --checkpoint_dir="$OUT/stage2" \
  --gold_score_mode=f1rougebleudist --reader_rl_learning --use_grpo --grpo_group_size=4 \
  --grpo_train_retriever --grpo_retriever_group_size=4 --grpo_retriever_pool_size=8 --grpo_kl_coeff=0.05 \
  --grpo_clip_epsilon=0.2 --grpo_temperature=0.7 --lr=5e-5 --lr_retriever=1e-5 --warmup_steps=5 --n_context=1 --retriever_n_context=5 \
  --refresh_index=10 --text_maxlength="$TEXT_MAXLEN" --train_data="$DATA/train.jsonl" \
  --eval_data="$DATA/valid.jsonl" --passages="$DATA/stories.jsonl" --model_path="$OUT/stage1/checkpoint/latest" \
  --retriever_model_path="$OUT/models/retriever" --generation_length_penalty=1.0

echo "== evaluation after stage 2"
evaluate "$OUT/stage2/checkpoint/latest" "$OUT/eval_after"

"$PY" - "$OUT/eval_before.log" "$OUT/eval_after.log" <<'PYEOF'
import json, sys
rows = [json.loads(open(p).read().strip().splitlines()[-1])["valid"] for p in sys.argv[1:]]
print("\n== quickstart summary (data/sample/valid.jsonl)")
print(f"{'':18}{'before':>10}{'after':>10}")
for key in ["reward", "recall@1", "recall@5", "f1", "bleu", "rougeL"]:
    print(f"{key:18}{rows[0][key]:10.3f}{rows[1][key]:10.3f}")
PYEOF
