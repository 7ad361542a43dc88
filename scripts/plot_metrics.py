"""Training curves of one or several runs from their ``metrics.jsonl``, overlaid.

    python scripts/plot_metrics.py RUN_DIR [RUN_DIR ...] --out FILE.png
        [--keys PATTERN ...] [--labels NAME ...] [--smooth N] [--title TEXT]

RUN_DIR is a ``--checkpoint_dir`` of train.py (or a ``metrics.jsonl`` path). Without ``--keys``
the figure has one panel per key group that at least one run logged: reader / retriever loss,
mean reward, reward spread (``reward/std``, ``reward/story_std``), the story rewards' spread over the
pool and the relevant story's gap above its mean, how often the relevant story is in the pool and
drawn, KL to the references, GRPO clip
and zero-std fractions, gradient norms, and per eval set F1, BLEU, ROUGE-L, Distinct-1/2,
greedy reward, eval loss and recall@k. ``--keys`` takes metric names or shell patterns
(``'eval/*/f1'``, ``'*'`` for everything) and gives each matching key its own panel.
Colour = run (legend at the top), line style = key inside a panel (panel legend).

The drawing is ``src/evaluation/plots.py`` (``plot_runs``). Exit 2 with one ``error: ...`` line
when a run has no metrics.jsonl or nothing matches.
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from src.evaluation.plots import plot_runs  # noqa: E402
from src.infra.errors import UsageError  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="train.py --checkpoint_dir(s) or metrics.jsonl files")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--keys", nargs="+", help="metric names or shell patterns, one panel each (default: key groups)")
    parser.add_argument("--labels", nargs="+", help="legend name per run (default: folder names)")
    parser.add_argument("--smooth", type=int, default=0, help="moving average over N logged points (0: raw)")
    parser.add_argument("--title", help="figure title")
    args = parser.parse_args(argv)
    try:
        panels = plot_runs(args.runs, args.out, keys=args.keys, labels=args.labels, smooth=args.smooth,
                           title=args.title)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({len(panels)} panels: {', '.join(panels)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
