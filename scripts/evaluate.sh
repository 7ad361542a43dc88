#!/usr/bin/env bash
# Evaluate a checkpoint with retrieval (the original LAPDOG README's command).
set -euo pipefail
: "${MODEL:=ckpt/joint_grpo/checkpoint/step-12000}" "${EVAL:=data/convai2/valid.jsonl}"
: "${PASSAGES:=data/corpora/story/story.jsonl}"
"${PYTHON:-python}" evaluate.py --model_path="$MODEL" --eval_data="$EVAL" --passages="$PASSAGES" --write_results "$@"
