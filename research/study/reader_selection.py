"""The dev curves of stage-1 reader candidates: a Markdown table and a figure.

    python research/study/reader_selection.py RUN_DIR [RUN_DIR ...] --labels A B \
        [--pretraining pretrain_log.jsonl] --out OUT

Reads each run's in-loop dev evaluations from its metrics.jsonl (the first eval set) and writes
OUT.md (one row per evaluation: F1, ROUGE-L, Dist-2, generic share, length ratio, eval loss,
perplexity) and OUT.png (those curves, and the pretraining's held-out loss when given).
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from src.evaluation.plots import read_run  # noqa: E402
from src.infra import exits  # noqa: E402
from src.infra.errors import UsageError  # noqa: E402

COLUMNS = [("f1", "F1", 2), ("rougeL", "ROUGE-L", 2), ("dist2", "Dist-2", 2), ("generic", "generic %", 1),
           ("length_ratio", "len ratio", 2), ("eval_loss", "dev loss", 3), ("ppl", "ppl", 1)]


def dev_evaluations(run_dir):
    """[(step, {metric: value})] of the run's first eval set, in step order."""
    series = read_run(run_dir)  # {key: [(step, value)]}
    names = sorted({k.split("/")[1] for k in series if k.startswith("eval/")})
    if not names:
        raise UsageError(f"{run_dir}: no in-loop evaluation in its metrics.jsonl — train with --eval_freq N")
    prefix, by_step = f"eval/{names[0]}/", {}
    for key, points in series.items():
        if key.startswith(prefix):
            for step, value in points:
                by_step.setdefault(step, {})[key[len(prefix):]] = value
    return sorted(by_step.items())


def table(runs, labels):
    lines = ["| reader | step | " + " | ".join(c[1] for c in COLUMNS) + " |", "|---|---:|" + "---:|" * len(COLUMNS)]
    for label, evals in zip(labels, runs):
        for step, m in evals:
            lines.append(f"| {label} | {step} | " + " | ".join(
                f"{m[k]:.{d}f}" if isinstance(m.get(k), (int, float)) else "–" for k, _, d in COLUMNS) + " |")
    return "\n".join(lines)


def figure(runs, labels, path, pretraining=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("f1", "dev F1"), ("dist2", "dev Distinct-2"), ("generic", "dev generic replies (%)"),
            ("ppl", "dev perplexity (gold replies)")]
    n = len(keys) + (1 if pretraining else 0)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6))
    for ax, (key, title) in zip(axes, keys):
        for label, evals in zip(labels, runs):
            ax.plot([s for s, _ in evals], [m.get(key) for _, m in evals], marker="o", label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("stage-1 step")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    if pretraining:
        rows = [json.loads(line) for line in open(pretraining) if line.strip()]
        axes[-1].plot([r["step"] for r in rows], [r["heldout_loss"] for r in rows], marker="o", color="#555555")
        axes[-1].set_title("pretraining: held-out loss", fontsize=10)
        axes[-1].set_xlabel("pretraining step")
        axes[-1].grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="train.py --checkpoint_dir of each candidate")
    p.add_argument("--labels", nargs="+", help="one name per run (default: the folder names)")
    p.add_argument("--pretraining", help="pretrain_log.jsonl of scripts/pretrain_reader.py, drawn beside")
    p.add_argument("--out", required=True, help="path without extension: OUT.md and OUT.png are written")
    a = p.parse_args(argv)
    labels = a.labels or [os.path.basename(os.path.normpath(r)) for r in a.runs]
    if len(labels) != len(a.runs):
        raise UsageError(f"--labels: {len(labels)} names for {len(a.runs)} runs — give one per run")
    runs = [dev_evaluations(r) for r in a.runs]
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out + ".md", "w") as f:
        f.write(table(runs, labels) + "\n")
    figure(runs, labels, a.out + ".png", a.pretraining)
    print(f"wrote {a.out}.md and {a.out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(exits.run(main))
