#!/usr/bin/env bash
# Is the GRPO arms' F1 gain length? The control decoded to their length, seed 0.
#   bash research/study/length_check.sh dev            # the control at several minimum lengths + grpo, on dev
#   bash research/study/length_check.sh test MIN_LEN   # the control at the length chosen on dev, on test
# Needs a finished study in runs/study (seed 0's control and grpo; STUDY, STORIES, PUB, ARM, MIN_LENGTHS
# override). Metrics: runs/study/length_check/,
# copied to results/study/length_check/. The choice of MIN_LEN: the control's dev length ratio
# closest to grpo's on dev (results/study/LOG.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
STUDY=${STUDY:-runs/study}                                     # the study's --out
STORIES=${STORIES:-../shared/data/corpora/story/story.jsonl}  # its story corpus
PUB=${PUB:-results/study/length_check}
ARM=${ARM:-grpo}                                               # the arm whose length the control is decoded to
MIN_LENGTHS=${MIN_LENGTHS:-0 8 12 16}
OUT=$STUDY/length_check
split=${1:?dev or test}
mkdir -p "$OUT" "$PUB"

evaluate() {  # ARM NAME MIN_LEN DATA: the study's retrieved-story evaluation, with a minimum reply length
  local dir=$OUT/$2
  [ -f "$dir/done" ] && { echo "== $2: done before"; return; }
  echo "== $2"
  $PY evaluate.py --config configs/decoding_convai2.yaml --model_path=$STUDY/seed0/$1/checkpoint/latest \
    --eval_data=$STUDY/split/$4.jsonl --write_results --checkpoint_dir=$dir --per_gpu_eval_batch_size=50 \
    --seed=0 --generation_length_penalty=1.0 --precision=fp32 --passages="$STORIES" \
    --retriever_model_path=$STUDY/models/retriever --n_context=1 --retriever_n_context=1 \
    --load_index_path=$STUDY/index-pretrained-retriever --generation_min_length="$3" > "$dir.log" 2>&1
  touch "$dir/done"
  cp "$(ls "$dir"/results/*.metrics.json | tail -1)" "$PUB/$2.metrics.json"
  PYTHONPATH=. $PY -c "import sys; from research.study import report; report.make_relative(sys.argv[1])" "$PUB/$2.metrics.json"
}

if [ "$split" = dev ]; then
  evaluate "$ARM" "$ARM-dev" 0 dev
  for n in $MIN_LENGTHS; do evaluate control "control-min$n-dev" "$n" dev; done
else
  evaluate control "control-min${2:?MIN_LEN chosen on dev}-test" "$2" test
fi
PYTHONPATH=. $PY - "$PUB" <<'PYEOF'
import glob, json, os, sys
print("| run | F1 | precision | recall | length | loop3 % | Dist-2 | ROUGE-L |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.metrics.json"))):
    m = json.load(open(path))["metrics"]
    name = os.path.basename(path).replace(".metrics.json", "")
    print(f"| {name} | {m['f1']:.2f} | {m['precision']:.2f} | {m['recall']:.2f} | {m['length_ratio']:.2f} | "
          f"{m['loop3']:.1f} | {m['dist2']:.2f} | {m['rougeL']:.2f} |")
PYEOF
