"""The quickstart's table and its last stdout line, from the evaluation logs in OUT.

    python scripts/quickstart_summary.py OUT [--seconds N]

Reads OUT/eval_{before,control,lapdog,joint_grpo}.log (evaluate.py's stdout; its last line is one
JSON object keyed by eval set) and prints a table, then one JSON object
{"before": {...}, "control": {...}, "lapdog": {...}, "joint_grpo": {...}} as the last line.
"""

import argparse
import json
import os
import sys

ARMS = ["before", "control", "lapdog", "joint_grpo"]
KEYS = ["recall@1", "recall@5", "f1", "bleu", "rougeL", "reward", "dist1"]


def read_eval(path):
    """The valid metrics of one evaluate.py log (its last JSON line)."""
    lines = [line for line in open(path).read().splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"error: {path}: no JSON line from evaluate.py — see the log for what went wrong")
    row = json.loads(lines[-1])
    return row["valid"] if "valid" in row else next(iter(row.values()))


def summary(out):
    return {arm: {k: round(float(read_eval(os.path.join(out, f"eval_{arm}.log")).get(k, float("nan"))), 3)
                  for k in KEYS} for arm in ARMS}


def table(rows):
    lines = [f"{'':12}" + "".join(f"{arm:>12}" for arm in ARMS)]
    for k in KEYS:
        lines.append(f"{k:12}" + "".join(f"{rows[arm][k]:12.3f}" for arm in ARMS))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the quickstart's output folder")
    p.add_argument("--seconds", type=int, default=None, help="wall time to report (default: not reported)")
    a = p.parse_args(argv)
    rows = summary(a.out)
    print("\n== quickstart summary (data/sample/valid.jsonl; recall over examples with a relevant story)")
    print(table(rows))
    if a.seconds is not None:
        print(f"wall time {a.seconds // 60} min {a.seconds % 60} s; curves: {os.path.join(a.out, 'curves.png')}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
