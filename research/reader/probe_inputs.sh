#!/usr/bin/env bash
# Does a reader of the search read its input? Its dev loss and replies given its own persona and context,
# then given another dialogue's persona, context, or both (research/reader/shuffle_inputs.py), on the same
# DEV_N dev examples with the same decoding; prints a markdown table (the gap in dev loss is what the input is
# worth to the reader).
#   bash research/reader/probe_inputs.sh RUN_DIR      (a run of research/reader/run.sh, e.g. runs/reader/sft_long)
# Environment: OUT (runs/reader: where the split is), DEV_N (500), DECODING (sample_t0.7_p0.8: research/reader/record.py).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
RUN="$1"
PY="${PYTHON:-$root/.venv/bin/python}"
OUT="${OUT:-runs/reader}" DEV_N="${DEV_N:-500}" DECODING="${DECODING:-sample_t0.7_p0.8}"
export WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
[ -d "$RUN/checkpoint/best" ] || { echo "error: $RUN/checkpoint/best: no checkpoint (run research/reader/run.sh first)" >&2; exit 1; }
head -n "$DEV_N" "$OUT/split/dev.jsonl" > "$RUN/probe_own.jsonl"
for part in persona context both; do
  "$PY" research/reader/shuffle_inputs.py "$RUN/probe_own.jsonl" --part "$part" --out "$RUN/probe_$part.jsonl"
done
for cond in own persona context both; do
  [ -f "$RUN/probe_$cond/done" ] && continue
  "$PY" evaluate.py --model_path="$RUN/checkpoint/best" --eval_data="$RUN/probe_$cond.jsonl" \
    --per_gpu_eval_batch_size=50 --checkpoint_dir="$RUN/probe_$cond" $("$PY" research/reader/record.py --flags "$DECODING") \
    > "$RUN/probe_$cond.log" 2>&1
  touch "$RUN/probe_$cond/done"
done
"$PY" - "$RUN" "$DECODING" <<'PY'
import glob, json, os, sys
run, decoding = sys.argv[1:]
print(f"| input ({os.path.basename(run)}, {decoding}) | dev loss | gap | ppl | F1 | ROUGE-L | Dist-2 |")
print("|---|---:|---:|---:|---:|---:|---:|")
names = {"own": "own persona and context", "persona": "another dialogue's persona",
         "context": "another dialogue's context", "both": "another dialogue's persona and context"}
own = None
for cond in ("own", "persona", "context", "both"):
    found = glob.glob(os.path.join(run, f"probe_{cond}", "**", "*.metrics.json"), recursive=True)
    m = json.load(open(max(found, key=os.path.getmtime)))["metrics"]
    loss = m["eval_loss"]  # train.py's dev loss: mean NLL per gold token, EOS included
    own = loss if own is None else own
    print(f"| {names[cond]} | {loss:.3f} | {loss - own:+.3f} | {m['ppl']:.1f} | {m['f1']:.2f} | {m['rougeL']:.2f} | {m['dist2']:.1f} |")
PY
