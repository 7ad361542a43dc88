#!/usr/bin/env bash
# One command that checks the product on a GPU machine, in about 5 minutes on one GPU, offline:
# a t5-base-shaped reader (copy head) and a BERT-base-shaped retriever built locally from random
# init, then stage 1 (3 steps, bf16), LAPDOG stage 2 and joint GRPO (the quickstart's recipes,
# 3 steps each), evaluate.py and a GPU FAISS search; with >= 2 GPUs the same again under 2-process
# torchrun. The last stdout line is one JSON object (per part: pass/fail, s/step, sampling tokens/s,
# peak GPU memory, the log); the exit status is non-zero when a part failed. scripts/gpu_check.py
# says what each part runs.
#   bash scripts/gpu_check.sh                  # OUT defaults to runs/gpu_check
#   bash scripts/gpu_check.sh --out runs/gc_a   # elsewhere
#   bash scripts/gpu_check.sh --tiny           # tiny shapes on the CPU (a smoke run of the check itself)
# Python: $PY, else .venv/bin/python when it exists, else python3.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ -z "${PY:-}" ]; then
  if [ -x "$root/.venv/bin/python" ]; then PY="$root/.venv/bin/python"; else PY=python3; fi
fi
export WANDB_MODE="${WANDB_MODE:-offline}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$PY" scripts/gpu_check.py "$@"
