"""The study's numbers -> RESULTS.md tables and the comparison bar figure (used by scripts/study.py).

Input everywhere: ``rows`` = a list of dicts, one per (arm, evaluation condition, seed):
``{"arm": "grpo", "eval": "retrieval", "seed": 0, "metrics": {...compute_metrics.py --json keys,
plus evaluate.py's reward / recall@k...}}``. Pure functions except ``plot_bars``.
"""

import math
import os
import statistics

# (key, column label, decimals). LAPDOG's definitions first: they are what the paper reports.
MAIN_COLUMNS = [("bleu", "BLEU", 2), ("f1", "F1", 2), ("rouge1", "ROUGE-1", 2), ("rouge2", "ROUGE-2", 2),
                ("rougeL", "ROUGE-L", 2), ("dist1", "Dist-1", 2), ("dist2", "Dist-2", 2),
                ("length_ratio", "len ratio", 3)]
STANDARD_COLUMNS = [("rs_rouge1", "RS R-1", 2), ("rs_rouge2", "RS R-2", 2), ("rs_rougeL", "RS R-L", 2),
                    ("rs_rougeL_stem", "RS R-L stem", 2), ("nltk_bleu1", "nltk B-1", 2),
                    ("nltk_bleu2", "nltk B-2", 2), ("nltk_bleu4", "nltk B-4", 2)]
EXTRA_COLUMNS = [("reward", "greedy reward", 3), ("recall@1", "recall@1", 2), ("empty_predictions", "empty", 0)]
BAR_METRICS = [("bleu", "BLEU"), ("f1", "F1"), ("rougeL", "ROUGE-L"), ("dist1", "Distinct-1"),
               ("dist2", "Distinct-2"), ("length_ratio", "length ratio")]

# A seed of an arm "collapses" when its Distinct-1 is below this fraction of the same seed's
# control (or it has more empty replies than this fraction): its seeds are then listed one by
# one, so a mean over a collapsed and a healthy seed cannot hide it.
COLLAPSE_DIST1_RATIO = 0.5
COLLAPSE_EMPTY_FRACTION = 0.1


def condition(row) -> str:
    return f"{row['arm']} ({row['eval']})"


def group(rows) -> dict:
    """{(arm, eval): {seed: metrics}} in first-seen order."""
    out = {}
    for r in rows:
        out.setdefault((r["arm"], r["eval"]), {})[r["seed"]] = r["metrics"]
    return out


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0.0 for a single value)."""
    vals = [float(v) for v in values]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def relative_change(value: float, control: float) -> float:
    """Percent change of value vs control; NaN when the control is 0 (no meaningful ratio)."""
    return 100.0 * (value - control) / control if control else float("nan")


def collapse_reason(metrics: dict, control: dict | None):
    """Why this seed counts as collapsed (a short text), or None."""
    n = metrics.get("n") or 0
    if n and metrics.get("empty_predictions", 0) / n > COLLAPSE_EMPTY_FRACTION:
        return f"{metrics['empty_predictions']}/{n} empty replies"
    if control and control.get("dist1") and metrics.get("dist1", 0) < COLLAPSE_DIST1_RATIO * control["dist1"]:
        return f"Dist-1 {metrics.get('dist1', 0):.2f} < {COLLAPSE_DIST1_RATIO:g} x control {control['dist1']:.2f}"
    return None


def _fmt(v, decimals):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{decimals}f}"


def _cell(per_seed: dict, key, decimals, control_mean=None):
    vals = [m[key] for m in per_seed.values() if key in m]
    if not vals:
        return "–"
    mean, std = mean_std(vals)
    text = _fmt(mean, decimals) + (f" ± {_fmt(std, decimals)}" if len(vals) > 1 else "")
    if control_mean is not None and not math.isnan(rel := relative_change(mean, control_mean)):
        text += f" ({rel:+.1f}%)"
    return text


def table(rows, columns, control=("control", "retrieval"), collapse_rows=True) -> str:
    """A markdown table: one line per (arm, eval) with mean ± std over seeds and, for the
    others, the relative change of the mean vs the control; then per-seed lines for any
    (arm, eval) with a collapsed seed."""
    groups = group(rows)
    ctrl = groups.get(control, {})
    ctrl_means = {k: mean_std([m[k] for m in ctrl.values() if k in m])[0] for k, _, _ in columns}
    header = "| arm (evaluation) | seeds | " + " | ".join(label for _, label, _ in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 2)]
    for (arm, ev), per_seed in groups.items():
        is_ctrl = (arm, ev) == control
        cells = [_cell(per_seed, k, d, None if is_ctrl or not ctrl else ctrl_means[k]) for k, _, d in columns]
        name = f"**{arm}** ({ev})" if is_ctrl else f"{arm} ({ev})"
        lines.append(f"| {name} | {len(per_seed)} | " + " | ".join(cells) + " |")
        if not collapse_rows:
            continue
        reasons = {s: collapse_reason(m, ctrl.get(s)) for s, m in per_seed.items()}
        if any(reasons.values()):
            for s, m in sorted(per_seed.items()):
                flag = f" ⚠ {reasons[s]}" if reasons[s] else ""
                cells = [_fmt(m.get(k), d) for k, _, d in columns]
                lines.append(f"| &nbsp;&nbsp;↳ seed {s}{flag} | 1 | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_seed_table(rows, columns) -> str:
    """Every (arm, eval, seed) on its own line: the raw numbers behind the means."""
    header = "| arm (evaluation) | seed | " + " | ".join(label for _, label, _ in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 2)]
    for r in sorted(rows, key=lambda r: (r["seed"],)):
        lines.append(f"| {condition(r)} | {r['seed']} | "
                     + " | ".join(_fmt(r["metrics"].get(k), d) for k, _, d in columns) + " |")
    return "\n".join(lines)


def collapsed_conditions(rows, control=("control", "retrieval")) -> list[str]:
    """``["grpo (retrieval) seed 1: Dist-1 ...", ...]`` for every collapsed seed."""
    groups = group(rows)
    ctrl = groups.get(control, {})
    out = []
    for (arm, ev), per_seed in groups.items():
        for s, m in sorted(per_seed.items()):
            reason = collapse_reason(m, ctrl.get(s))
            if reason:
                out.append(f"{arm} ({ev}) seed {s}: {reason}")
    return out


def plot_bars(rows, out, title=None, control=("control", "retrieval")):
    """Bars of the seed means per (arm, eval), one panel per metric, whiskers = ± std over
    seeds, every seed's own value as a dot (the spread the mean summarizes), and the control's
    mean as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group(rows)
    names = [f"{a}\n({e})" for a, e in groups]
    colours = [plt.get_cmap("tab10").colors[i % 10] for i in range(len(groups))]
    ncols = 3
    nrows = math.ceil(len(BAR_METRICS) / ncols)
    width = min(18.0, max(11.0, 0.9 * len(groups) * ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, 3.6 * nrows + 0.7), squeeze=False)
    ctrl = groups.get(control, {})
    for ax, (key, label) in zip(axes.flat, BAR_METRICS):
        ctrl_vals = [m[key] for m in ctrl.values() if key in m]
        if ctrl_vals:  # the reference line every other bar is compared with
            ax.axhline(mean_std(ctrl_vals)[0], color="#555555", linestyle="--", linewidth=1, zorder=0)
        for i, per_seed in enumerate(groups.values()):
            vals = [m[key] for m in per_seed.values() if key in m]
            if not vals:
                continue
            mean, std = mean_std(vals)
            ax.bar(i, mean, color=colours[i], alpha=0.75, width=0.7,
                   yerr=std if len(vals) > 1 else None, capsize=4, ecolor="#333333")
            offsets = [0.0] if len(vals) == 1 else [-0.18 + 0.36 * j / (len(vals) - 1) for j in range(len(vals))]
            ax.scatter([i + o for o in offsets], vals, color="black", s=14, zorder=3)
        ax.set_title(label, fontsize=11)
        ax.set_ylim(bottom=0)  # every bar metric is >= 0; a zero-based axis keeps heights honest
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(BAR_METRICS):]:
        ax.set_visible(False)
    fig.suptitle(title or "test split: mean over seeds (bars), ± std (whiskers), each seed (dots), "
                 "control mean (dashed)", fontsize=12)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
