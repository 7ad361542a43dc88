"""Training curves of one or several runs from their ``metrics.jsonl``, overlaid (``plot_runs``).

Without ``keys`` the figure has one panel per key group that at least one run logged: reader /
retriever loss, mean reward, reward spread (``reward/std``, ``reward/story_std``), the story
rewards' spread over the pool and the relevant story's gap above its mean, how often the relevant
story is in the pool and drawn, KL to the references, GRPO clip and zero-std fractions, gradient
norms, and per eval set F1, BLEU, ROUGE-L, Distinct-1/2, greedy reward, eval loss and recall@k.
``keys`` takes metric names or shell patterns (``'eval/*/f1'``, ``'*'`` for everything) and gives
each matching key its own panel. Colour = run (legend at the top), line style = key inside a panel.
``scripts/plot_metrics.py`` is the command line.
"""


import fnmatch
import json
import math
import os

import matplotlib

matplotlib.use("Agg")  # files only; no display on the training machines
import matplotlib.pyplot as plt
import matplotlib.ticker  # noqa: F401

from src.infra.errors import UsageError

# The default panels: (title, key patterns, y label, log-y). Order = reading order of a run:
# what is optimized, what drives it, how far it moved, then the evaluation.
TRAIN_PANELS = [
    ("reader loss (CE, or the GRPO surrogate)", ["loss/reader"], "loss", False),
    ("retriever loss", ["loss/retriever"], "loss", False),
    ("reward (mean over samples)", ["reward/mean"], "reward", False),
    ("reward spread", ["reward/std", "reward/story_std"], "std", False),
    # Joint GRPO's pool: the spread of the story rewards (nats with --retriever_signal evidence) and
    # how far the relevant story stands above the pool mean; then how often it is in the pool and drawn.
    ("story reward over the pool", ["reward/pool_std", "retrieval/relevant_reward_gap"], "reward", False),
    ("relevant story in training", ["retrieval/relevant_in_pool", "retrieval/relevant_drawn"], "share", False),
    ("KL to the frozen references", ["kl/reader", "kl/retriever"], "KL (k3 / exact)", False),
    ("GRPO fractions", ["grpo/clip_frac", "grpo/frac_zero_std"], "fraction", False),
    ("gradient norm (before clipping)", ["grad_norm/reader", "grad_norm/retriever"], "L2 norm", True),
]
# Per eval set NAME (keys eval/NAME/<metric>): (title, metric patterns, y label).
EVAL_PANELS = [
    ("F1", ["f1"], "F1 (x100)"),
    ("BLEU", ["bleu"], "BLEU"),
    ("ROUGE-L", ["rougeL"], "ROUGE-L (x100)"),
    ("Distinct-1/2", ["dist1", "dist2"], "distinct (%)"),
    ("greedy reward", ["reward"], "reward"),
    ("eval loss", ["eval_loss"], "NLL"),
    ("recall of the relevant story", ["recall@*"], "recall (%)"),
]
_LINESTYLES = ["-", "--", ":", "-."]


# --------------------------------------------------------------------------------------------
# Reading (pure)

def _number(v):
    """A float for numbers and tracking.py's "NaN"/"Infinity" strings; None for anything else."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if v in ("NaN", "Infinity", "-Infinity"):
        return float(v)
    return None


def metrics_path(run):
    return run if run.endswith(".jsonl") else os.path.join(run, "metrics.jsonl")


def parse_metrics_lines(lines):
    """{key: [(step, value), ...] sorted by step} from metrics.jsonl lines.

    A step logged twice (a resumed run repeats the steps after its last checkpoint; eval rows
    share a step with train rows) keeps the last value per key, as tracking.py documents.
    Blank or truncated lines (a run killed mid-write) are skipped; non-numeric values are ignored.
    """
    by_key = {}
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict) or _number(rec.get("step")) is None:
            continue
        step = int(rec["step"])
        for key, value in rec.items():
            x = _number(value)
            if key != "step" and x is not None:
                by_key.setdefault(key, {})[step] = x
    return {k: sorted(v.items()) for k, v in by_key.items()}


def read_run(run):
    path = metrics_path(run)
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no metrics.jsonl — pass a train.py --checkpoint_dir (or the file itself)")
    with open(path, encoding="utf-8", errors="replace") as f:
        return parse_metrics_lines(f)


def moving_average(values, window):
    """Trailing mean over the last ``window`` finite points (window <= 1: unchanged)."""
    if window <= 1:
        return list(values)
    out, buf = [], []
    for v in values:
        if math.isfinite(v):
            buf.append(v)
            buf = buf[-window:]
        out.append(sum(buf) / len(buf) if buf else float("nan"))
    return out


def default_labels(run_dirs):
    """Folder names; parent/name where two runs share a name."""
    names = [os.path.basename(os.path.normpath(r[:-len("/metrics.jsonl")] if r.endswith("/metrics.jsonl") else r))
             for r in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [os.path.join(os.path.basename(os.path.dirname(os.path.normpath(r))), n) for r, n in zip(run_dirs, names)]


def _eval_sets(all_keys):
    names = []
    for k in sorted(all_keys):
        parts = k.split("/")
        if parts[0] == "eval" and len(parts) >= 3 and parts[1] not in names:
            names.append(parts[1])
    return names


def _match(patterns, keys):
    return [k for p in patterns for k in sorted(keys) if fnmatch.fnmatchcase(k, p)]


def select_panels(all_keys, keys=None):
    """[(title, [keys], ylabel, logy)] for the keys present in any run; empty panels dropped."""
    all_keys = set(all_keys)
    if keys:
        chosen = []
        for k in _match(keys, all_keys):
            if k not in chosen:
                chosen.append(k)
        return [(k, [k], "value", False) for k in chosen]
    panels = []
    for title, patterns, ylabel, logy in TRAIN_PANELS:
        found = _match(patterns, all_keys)
        if found:
            panels.append((title, found, ylabel, logy))
    for name in _eval_sets(all_keys):
        for title, patterns, ylabel in EVAL_PANELS:
            found = _match([f"eval/{name}/{p}" for p in patterns], all_keys)
            if found:
                panels.append((f"eval {name}: {title}", found, ylabel, False))
    return panels


# --------------------------------------------------------------------------------------------
# Drawing

def _short(key, panel_keys):
    """The distinguishing tail of a key inside its panel (e.g. "reader" of "kl/reader")."""
    return key.split("/")[-1] if len({k.split("/")[-1] for k in panel_keys}) == len(panel_keys) else key


def _log_minor_label(v, _pos):
    mantissa = v / 10 ** math.floor(math.log10(v)) if v > 0 else 0
    return f"{v:g}" if any(abs(mantissa - m) < 1e-6 for m in (2, 3, 5)) else ""


def plot_runs(run_dirs, out, keys=None, labels=None, smooth=0, title=None):
    """Write the overlaid curves of ``run_dirs`` to ``out`` (PNG); returns the panel titles.

    keys: metric names / shell patterns (one panel each) or None for the default groups.
    labels: legend names, one per run (default: folder names). smooth: trailing moving
    average over that many logged points, the raw curve kept faint behind it.
    """
    run_dirs = list(run_dirs)
    if not run_dirs:
        raise UsageError("plot_runs: no run directories given")
    labels = list(labels) if labels else default_labels(run_dirs)
    if len(labels) != len(run_dirs):
        raise UsageError(f"--labels: {len(labels)} labels for {len(run_dirs)} runs — give one per run")
    runs = [read_run(r) for r in run_dirs]
    panels = select_panels(set().union(*runs), keys)
    if not panels:
        wanted = " ".join(keys) if keys else "the default key groups"
        raise UsageError(f"no metric of {wanted} in {', '.join(metrics_path(r) for r in run_dirs)}"
                         " — check --keys (shell patterns, e.g. 'eval/*/f1')")

    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.4 * ncols, 3.5 * nrows + (0.9 if title else 0.5)), squeeze=False)
    colours = plt.get_cmap("tab10").colors
    for ax, (ptitle, pkeys, ylabel, logy) in zip(axes.flat, panels):
        styles = {k: _LINESTYLES[i % len(_LINESTYLES)] for i, k in enumerate(pkeys)}
        for r, (run, colour) in enumerate(zip(runs, [colours[i % len(colours)] for i in range(len(runs))])):
            for k in pkeys:
                pts = run.get(k)
                if not pts:
                    continue
                steps = [s for s, _ in pts]
                vals = [v for _, v in pts]
                few = len(pts) <= 30  # sparse (eval) curves get markers so single points show
                marker = "o" if few else None
                if smooth > 1 and not few:
                    ax.plot(steps, vals, color=colour, linestyle=styles[k], alpha=0.2, linewidth=0.8)
                    vals = moving_average(vals, smooth)
                ax.plot(steps, vals, color=colour, linestyle=styles[k], marker=marker, markersize=3.5,
                        linewidth=1.6)
        if len(pkeys) > 1:  # line styles name the keys; colours are in the figure legend
            for k in pkeys:
                ax.plot([], [], color="0.3", linestyle=styles[k], label=_short(k, pkeys))
            ax.legend(fontsize=8, loc="best", frameon=False)
        if logy and all(v > 0 for run in runs for k in pkeys for _, v in run.get(k, []) if math.isfinite(v)):
            ax.set_yscale("log")
            # "2, 3, 5" rather than "2x10^0"; minor ticks labelled only on a short range, so
            # labels never crowd
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            lo, hi = ax.get_ylim()
            short = hi / lo < 30 if lo > 0 else False
            ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(_log_minor_label) if short
                                         else matplotlib.ticker.NullFormatter())
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # steps are integers
        ax.set_title(ptitle, fontsize=11)
        ax.set_xlabel("optimizer step", fontsize=9)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.tick_params(which="both", labelsize=8)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)

    # Header, top down: the title, then one legend of run colours shared by every panel.
    handles = [plt.Line2D([], [], color=colours[i % len(colours)], linewidth=2.5) for i in range(len(runs))]
    height = fig.get_figheight()
    y = 1.0
    if title:
        fig.suptitle(title, y=1 - 0.12 / height, va="top", fontsize=13)
        y -= 0.4 / height
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 6), frameon=False, fontsize=10,
               bbox_to_anchor=(0.5, y))
    fig.tight_layout(rect=(0, 0, 1, y - 0.32 / height))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return [p[0] for p in panels]
