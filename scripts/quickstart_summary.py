"""The quickstart's table and its last stdout line, from the evaluation logs in OUT.

    python scripts/quickstart_summary.py OUT [--seconds N]
    python scripts/quickstart_summary.py --across runs/quickstart-seed*   # several seeds' OUTs

Reads OUT/eval_{before,control,lapdog,joint_grpo}.log (evaluate.py's stdout; its last line is one
JSON object keyed by eval set) and prints a table, whether the project's bar is met (``acceptance``),
then one JSON object {"before": {...}, "control": {...}, "lapdog": {...}, "joint_grpo": {...}} as
the last line. ``--across`` prints, for several output folders, the mean ± std table and one row per
folder (Markdown, as in the README's Results) with the bar checked on each.
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from src.evaluation.quickstart import acceptance, across, summary, table  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", help="the quickstart's output folder")
    p.add_argument("--seconds", type=int, default=None, help="wall time to report (default: not reported)")
    p.add_argument("--across", nargs="+", metavar="OUT", help="several output folders (e.g. seeds): tables over them")
    a = p.parse_args(argv)
    if a.across:
        print(across(a.across))
        return 0
    if a.out is None:
        p.error("give the quickstart's output folder, or --across OUT [OUT ...]")
    rows = summary(a.out)
    print("\n== quickstart summary (data/sample/test.jsonl; recall over examples with a relevant story)")
    print(table(rows))
    if a.seconds is not None:
        print(f"wall time {a.seconds // 60} min {a.seconds % 60} s; curves: {os.path.join(a.out, 'curves.png')}")
    missed = acceptance(rows)
    print("project bar (results/quickstart.md): " + ("met" if not missed else "missed: " + "; ".join(missed)))
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
