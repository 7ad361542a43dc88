"""The quickstart's tables: each arm's metrics from its evaluation log, the project's bar on
them (``acceptance``), and the mean ± std table over several seeds (``across``).
``scripts/quickstart_summary.py`` is the command line."""

import json
import os
import statistics

ARMS = ["before", "control", "lapdog", "joint_grpo"]
KEYS = ["recall@1", "recall@5", "f1", "bleu", "rougeL", "reward", "dist1"]


def read_eval(path):
    """The metrics of one evaluate.py log (its last JSON line, keyed by the one eval set)."""
    lines = [line for line in open(path).read().splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"error: {path}: no JSON line from evaluate.py — see the log for what went wrong")
    row = json.loads(lines[-1])
    return next(iter(row.values()))


def summary(out):
    return {arm: {k: round(float(read_eval(os.path.join(out, f"eval_{arm}.log")).get(k, float("nan"))), 3)
                  for k in KEYS} for arm in ARMS}


def table(rows):
    lines = [f"{'':12}" + "".join(f"{arm:>12}" for arm in ARMS)]
    for k in KEYS:
        lines.append(f"{k:12}" + "".join(f"{rows[arm][k]:12.3f}" for arm in ARMS))
    return "\n".join(lines)


def acceptance(rows):
    """The criteria of the project's bar (results/quickstart.md) that ``rows`` misses; [] when met."""
    j, c, lap, b = rows["joint_grpo"], rows["control"], rows["lapdog"], rows["before"]
    checks = [(j["recall@1"] >= 20, f"joint_grpo recall@1 {j['recall@1']} < 20"),
              (j["recall@5"] >= 45, f"joint_grpo recall@5 {j['recall@5']} < 45"),
              (j["f1"] >= c["f1"] + 1.0, f"joint_grpo f1 {j['f1']} < control's {c['f1']} + 1"),
              (j["reward"] >= c["reward"], f"joint_grpo reward {j['reward']} < control's {c['reward']}"),
              (j["dist1"] >= c["dist1"] / 2, f"joint_grpo dist1 {j['dist1']} < half the control's {c['dist1']}"),
              (lap["recall@1"] >= b["recall@1"] + 5, f"lapdog recall@1 {lap['recall@1']} < before's {b['recall@1']} + 5")]
    return [why for ok, why in checks if not ok]


NAMES = {"recall@1": "recall@1 (%)", "recall@5": "recall@5 (%)", "f1": "F1", "bleu": "BLEU", "rougeL": "ROUGE-L",
         "reward": "reward", "dist1": "Distinct-1"}


def across(outs):
    """Markdown: mean ± std over the folders, then one row per folder with the bar checked."""
    runs = [summary(out) for out in outs]
    digits = {"reward": 3}
    lines = ["| metric | " + " | ".join(ARMS) + " |", "|---|" + "---:|" * len(ARMS)]
    for k in KEYS:
        d = digits.get(k, 2)
        cells = []
        for arm in ARMS:
            vals = [r[arm][k] for r in runs]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.{d}f} ± {sd:.{d}f}")
        lines.append(f"| {NAMES[k]} | " + " | ".join(cells) + " |")
    lines += ["", "| run | " + " | ".join(ARMS) + " | bar |", "|---|" + "---|" * (len(ARMS) + 1)]
    short = ["recall@1", "recall@5", "f1", "reward", "dist1"]
    met = 0
    for out, r in zip(outs, runs):
        cells = [" / ".join(f"{r[arm][k]:.3f}" if k == "reward" else f"{r[arm][k]:.1f}" for k in short) for arm in ARMS]
        missed = acceptance(r)
        met += not missed
        lines.append(f"| {os.path.basename(os.path.normpath(out))} | " + " | ".join(cells) + " | "
                     + ("met" if not missed else "missed: " + "; ".join(missed)) + " |")
    lines.append(f"\n(per run: {' / '.join(short)}; bar met on {met} of {len(runs)})")
    return "\n".join(lines)
