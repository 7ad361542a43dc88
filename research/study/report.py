"""The study's numbers: baselines, per-run metrics, paired bootstrap intervals, results.json,
RESULTS.md and the figures (used by research/study/run.py).

``rows``: one dict per (arm, evaluation mode, seed): ``{"arm", "eval", "seed", "metrics": {...},
"per_example": {"f1": [...], "rougeL": [...], "reward": [...], ...}, "generations": [...]}``; metrics are
compute_metrics.py's keys (both blocks) plus evaluate.py's ppl, reward and eval_loss. Every
published path is relative to the repository (``relative``).
"""

import glob
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess

from research.study import published
from research.study.plan import ARMS, DECODING, STAGE1, evaluations, fill
from src.evaluation.baselines import baseline_replies
from src.evaluation.bootstrap import paired_bootstrap_ci, seed_t_interval
from src.evaluation.metrics import compute_metrics, per_example_scores
from src.evaluation.plots import plot_runs
from src.evaluation.results import read_results, results_metrics
from src.infra.errors import UsageError
from src.objectives.rewards import grpo_reward

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONTROL = ("control", "retrieval")
# The control's targets (the bar set for the study): the paper's T5-small SFT on ConvAI2 valid, and a reader
# that talks (distinct bigrams, no "a a a").
TARGETS = {"f1": (">=", 13.9), "rougeL": (">=", 14.2), "dist2": (">=", 10.0), "repeat3": ("<", 2.0)}
SUMMARY_KEYS = ("f1", "bleu", "rougeL", "dist1", "dist2", "ppl", "reward", "repeat3", "generic", "length_ratio",
                "copy_persona", "copy_story", "precision", "recall", "loop3")
CI_KEYS = ("f1", "rougeL", "reward")
BASELINE_NAMES = {"constant": "best constant reply (chosen on train by F1)",
                  "nearest_neighbour": "nearest-neighbour reply (TF-IDF on the last utterance, from train)",
                  "persona_copy": "persona copy (the persona sentence sharing most words with the last utterance)",
                  "random_human": "a human reply from another conversation (random train reply)"}
# A seed of an arm "collapses" when its Distinct-1 is below this fraction of the same seed's control
# or more than this share of its replies are empty: its seeds are then listed one by one.
COLLAPSE_DIST1_RATIO = 0.5
COLLAPSE_EMPTY_FRACTION = 0.1
_REWARD = {"scale": (0.01, 1.0, 1.0), "scale_rouge": False, "length_penalty_strength": 1.0}  # every arm alike


def relative(text):
    """``text`` with an absolute path (or ``--flag=/abs/path``) made relative to the repository."""
    if not isinstance(text, str):
        return text
    flag, sep, value = text.partition("=") if text.startswith("--") else ("", "", text)
    if os.path.isabs(value):
        value = os.path.relpath(value, ROOT)
    return f"{flag}{sep}{value}"


def _relative_all(value):
    if isinstance(value, dict):
        return {k: _relative_all(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative_all(v) for v in value]
    return relative(value)


def make_relative(path):
    """Rewrite a JSON file with every absolute path in it made relative to the repository."""
    with open(path) as f:
        data = json.load(f)
    with open(path, "w") as f:
        json.dump(_relative_all(data), f, indent=1, sort_keys=True)
        f.write("\n")


def relative_manifest(manifest):
    out = dict(manifest, source=relative(manifest["source"]))
    out["splits"] = {k: dict(v, path=relative(v["path"])) for k, v in manifest["splits"].items()}
    return out


# ------------------------------------------------------------------------------------ numbers

def per_example(generations, references):
    """Each reply's scores for paired comparisons: ``per_example_scores`` and the study's reward."""
    per = per_example_scores(generations, references)
    per["reward"] = grpo_reward(generations, references, **_REWARD)["reward"].tolist()
    return per


def paired_intervals(per, pairs, keys=CI_KEYS):
    """{label: {key: [mean, low, high]}}: paired bootstrap 95 % intervals over the test examples of
    run a minus run b, for each (label, a, b) in ``pairs``; ``per`` maps a run to its per-example scores."""
    return {label: {k: [round(v, 4) for v in paired_bootstrap_ci(
        [x - y for x, y in zip(per[a][k], per[b][k], strict=True)], seed=0)] for k in keys} for label, a, b in pairs}


def paired_table(found, keys=CI_KEYS):
    """Markdown rows of ``paired_intervals``' output."""
    rows = ["| test, paired | " + " | ".join(f"Δ {k} [95% CI]" for k in keys) + " |", "|---|" + "---:|" * len(keys)]
    for label, by_key in found.items():
        rows.append(f"| {label} | " + " | ".join("{:+.3f} [{:+.3f}, {:+.3f}]".format(*by_key[k]) for k in keys) + " |")
    return "\n".join(rows)


def scores_of(generations, references):
    """Both metric blocks and the per-example F1 / ROUGE-L / reward of a list of replies."""
    per = per_example(generations, references)
    metrics = results_metrics(generations, references, per)
    metrics["reward"] = statistics.fmean(per["reward"]) if per["reward"] else 0.0
    return metrics, per


def baseline_metrics(train, test):
    """{name: {"reply" (the constant only), "metrics"}} of every baseline on ``test``."""
    replies, constant = baseline_replies(train, test)
    refs = [ex["answers"][0] for ex in test]
    out = {}
    for name, gens in replies.items():
        metrics, _ = scores_of(gens, refs)
        out[name] = {"metrics": metrics, **({"reply": constant} if name == "constant" else {})}
    out["human"] = {"metrics": compute_metrics(refs, refs)}  # the references' own Dist-1/2
    return out


def _eval_dir(out, seed, arm, mode):
    return os.path.join(out, f"seed{seed}", "eval", f"{arm}-{mode}")


def newest(folder, pattern):
    """The most recently written file under ``folder`` matching ``pattern``, None if none. By time,
    not name: a folder evaluated twice holds evaluate-step-N.* and then evaluate-2-step-N.*."""
    found = glob.glob(os.path.join(folder, "**", pattern), recursive=True)
    return max(found, key=os.path.getmtime) if found else None


def read_eval(eval_dir, test_name):
    """(generations, references, evaluate.py's metrics) of one evaluation folder (its newest)."""
    found = newest(eval_dir, f"*{test_name}.results.jsonl")
    metrics_file = newest(eval_dir, f"*{test_name}.metrics.json")
    if not found or not metrics_file:
        raise FileNotFoundError(f"{eval_dir}: no {test_name} results / metrics written by evaluate.py")
    gens, refs = read_results(found)
    with open(metrics_file) as f:
        own = json.load(f)["metrics"]
    return gens, refs, own


def collect_rows(out, arms, seeds, test, test_name, dest=None, previous=None):
    """One row per (seed, arm, mode): from its evaluation folder in ``out``, else from what was
    published in ``dest`` (research/study/published.py): the replies, scored here against ``test``,
    or only the per-seed numbers of the ``previous`` results.json (``per_example`` None then)."""
    refs = [(ex.get("answers") or [""])[0] for ex in test]
    rows = []
    for seed in seeds:
        for arm, mode in evaluations(arms):
            row = {"arm": arm, "eval": mode, "seed": seed}
            folder = _eval_dir(out, seed, arm, mode)
            metrics_file, replies_file = published.evaluation_files(dest, seed, arm, mode) if dest else (None, None)
            if newest(folder, f"*{test_name}.results.jsonl"):
                gens, refs_here, own = read_eval(folder, test_name)
            elif replies_file and os.path.isfile(replies_file):
                gens = published.read_replies(replies_file)
                refs_here = refs[:len(gens)]  # --max_eval_examples N (the tiny scale) scores the first N
                with open(metrics_file) as f:
                    own = json.load(f)["metrics"]
            else:
                carried = published.carried_numbers(previous, seed, arm, mode)
                if carried is None:
                    raise FileNotFoundError(f"{folder}: no {test_name} results, and none published for seed {seed} "
                                            f"{arm} ({mode})")
                rows.append(row | carried | {"per_example": None, "generations": None})
                continue
            if len(gens) != len(refs_here) or not gens:
                raise ValueError(f"seed {seed} {arm} ({mode}): {len(gens)} replies for {len(refs_here)} test examples")
            metrics, per = scores_of(gens, refs_here)
            metrics.update({k: own[k] for k in ("ppl", "eval_loss", "copy_persona", "copy_story") if k in own})
            metrics.update({k: v for k, v in own.items() if k.startswith("recall@") or k == "retrieval/top1_score"})
            rows.append(row | {"metrics": metrics, "per_example": per, "generations": gens})
    return rows


def mean_std(values):
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def collapse_reason(metrics, control):
    n = metrics.get("n") or 0
    if n and metrics.get("empty_predictions", 0) / n > COLLAPSE_EMPTY_FRACTION:
        return f"{metrics['empty_predictions']}/{n} empty replies"
    if control and control.get("dist1") and metrics.get("dist1", 0) < COLLAPSE_DIST1_RATIO * control["dist1"]:
        return f"Dist-1 {metrics.get('dist1', 0):.2f} < {COLLAPSE_DIST1_RATIO:g} x control {control['dist1']:.2f}"
    return None


def target_check(metrics):
    """{key: {"value", "target", "met"}} of the control's targets (mean over seeds)."""
    out = {}
    for key, (op, bound) in TARGETS.items():
        value = metrics[key]
        met = value is not None and (value >= bound if op == ">=" else value < bound)
        out[key] = {"value": _num(value, 3), "target": f"{op} {bound:g}", "met": bool(met)}
    return out


def _num(value, digits=4):
    """``value`` rounded, or None when it is not a finite number (results.json is strict JSON)."""
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return round(float(value), digits)


def results_json(rows, baselines, arms, seeds, test):
    """The machine-readable results: baselines, every (arm, eval) with its seeds, means, spread,
    the paired bootstrap interval vs the control, the generic-reply share and collapse flags."""
    by = {}
    for r in rows:
        by.setdefault((r["arm"], r["eval"]), {})[r["seed"]] = r
    control = by[CONTROL]
    out = {"baselines": {name: {k: _num(b["metrics"][k], 3) for k in ("f1", "bleu", "rougeL", "dist1", "dist2",
                                                                        "precision", "recall", "length_ratio", "loop3")
                                if k in b["metrics"]}
                         | ({"reply": b["reply"]} if "reply" in b else {}) for name, b in baselines.items()},
           "n_test": len(test), "arms": {}}
    for (arm, mode), per_seed in by.items():
        key = arm if mode == "retrieval" else f"{arm}_{mode}"
        seeds_here = sorted(per_seed)
        entry = {"seeds": seeds_here, "eval": mode,
                 "mean": {k: _num(mean_std([per_seed[s]["metrics"].get(k) for s in seeds_here])[0])
                          for k in SUMMARY_KEYS},
                 "std": {k: _num(mean_std([per_seed[s]["metrics"].get(k) for s in seeds_here])[1])
                         for k in SUMMARY_KEYS},
                 "per_seed": {str(s): {k: _num(per_seed[s]["metrics"].get(k)) for k in SUMMARY_KEYS}
                              for s in seeds_here},
                 "generic_share": _num(mean_std([per_seed[s]["metrics"]["generic"] for s in seeds_here])[0], 2),
                 "most_frequent_reply": {str(s): _most_frequent(per_seed[s]["generations"])
                                         if per_seed[s]["generations"] is not None else per_seed[s].get("most_frequent")
                                         for s in seeds_here},
                 "collapsed": {str(s): collapse_reason(per_seed[s]["metrics"], control.get(s, {}).get("metrics"))
                               for s in seeds_here}}
        if (arm, mode) != CONTROL:
            entry.update(_intervals(per_seed, control, "vs_control"))
        out["arms"][key] = entry
    out["ablations"] = ablations(by)
    out["samples"] = sample_replies(rows, test)
    out["control_targets"] = target_check(out["arms"]["control"]["mean"])
    return out


def _intervals(per_seed, other, name):
    """Arm (``per_seed``: {seed: row}) minus ``other`` on CI_KEYS, two ways:
    ``diff_NAME`` / ``ci_NAME``: the paired bootstrap over test examples, pooled over the seeds whose
    replies are at hand (``ci_seeds_NAME``); ``seed_diff_NAME`` / ``seed_ci_NAME``: Student's t over
    every seed's mean difference (``seed_ci_seeds_NAME``; needs 2 seeds), which also counts seeds
    known only by their published means."""
    common = sorted(s for s in per_seed if s in other)
    with_examples = [s for s in common if per_seed[s]["per_example"] is not None and other[s]["per_example"] is not None]
    out = {f"diff_{name}": {}, f"ci_{name}": {}, f"ci_seeds_{name}": with_examples,
           f"seed_diff_{name}": {}, f"seed_ci_{name}": {}, f"seed_ci_seeds_{name}": common}
    for k in CI_KEYS:
        if with_examples:
            diffs = [[a - c for a, c in zip(per_seed[s]["per_example"][k], other[s]["per_example"][k])]
                     for s in with_examples]
            mean, low, high = paired_bootstrap_ci(diffs, seed=0)
        else:
            mean = low = high = None
        out[f"diff_{name}"][k], out[f"ci_{name}"][k] = _num(mean), [_num(low), _num(high)]
        seed_means = [per_seed[s]["metrics"].get(k) for s in common]
        if common and None not in seed_means and None not in [other[s]["metrics"].get(k) for s in common]:
            mean, low, high = seed_t_interval([m - other[s]["metrics"][k] for m, s in zip(seed_means, common)])
        else:
            mean = low = high = None
        out[f"seed_diff_{name}"][k], out[f"seed_ci_{name}"][k] = _num(mean), [_num(low), _num(high)]
    return out


def sample_replies(rows, test, k=5):
    """``k`` test examples spread evenly over the split (the same ones for every arm): the persona,
    the last thing said, the human reply and every arm's reply with its retrieved story, from the
    first reported seed. What the tables' numbers sound like."""
    retrieval = [r for r in rows if r["eval"] == "retrieval" and r["generations"] is not None]
    if not retrieval or not test:
        return []
    seed = min(r["seed"] for r in retrieval)
    replies = {r["arm"]: r["generations"] for r in retrieval if r["seed"] == seed}
    n = min(len(test), *(len(g) for g in replies.values()))
    samples = []
    for i in sorted({j * n // k for j in range(k)}):
        question = test[i].get("question", "")
        persona, _, context = question.partition(" context:")
        samples.append({"index": i, "seed": seed, "persona": persona.removeprefix("persona:").strip(),
                        "said": re.split(r"\s[QR]: ", " " + context)[-1].strip(), "human": (test[i].get("answers") or [""])[0],
                        "replies": {arm: gens[i] for arm, gens in replies.items()}})
    return samples


def ablations(by):
    """{arm: {mode: {k: mean over seeds}}, "diff_retrieved_vs_random", "ci_retrieved_vs_random"}: what
    each arm scores with its retrieved story, a random story and none, and the paired bootstrap
    interval of retrieved − random (per example, each seed against itself, seeds pooled)."""
    out = {}
    for (arm, mode), per_seed in by.items():
        if mode != "retrieval" or (arm, "random_story") not in by:
            continue
        entry = {m: {k: _num(mean_std([r["metrics"].get(k) for r in by[(arm, m)].values()])[0]) for k in CI_KEYS}
                 for m in ("retrieval", "random_story", "closed_book") if (arm, m) in by}
        random = by[(arm, "random_story")]
        entry["seeds"] = sorted(s for s in per_seed if s in random)
        entry.update(_intervals(per_seed, random, "retrieved_vs_random"))
        out[arm] = entry
    return out


def _most_frequent(generations):
    if not generations:
        return None
    text, n = max(((g, generations.count(g)) for g in set(generations)), key=lambda x: (x[1], x[0]))
    return {"reply": text, "share": round(100.0 * n / len(generations), 2)}


# ------------------------------------------------------------------------------------ figures

def plot_bars(results, path):
    """One panel per metric: the baselines (grey), every arm's seed mean (colour) with ± std
    whiskers and each seed as a dot; the control's mean dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("f1", "F1"), ("rougeL", "ROUGE-L"), ("bleu", "BLEU"), ("dist2", "Distinct-2"),
               ("ppl", "perplexity (gold replies)"), ("reward", "greedy reward")]
    arms = [(a, e) for a, e in results["arms"].items() if e["eval"] == "retrieval" or a == "control_closed_book"]
    base = [(n, b) for n, b in results["baselines"].items() if n != "human"]
    fig, axes = plt.subplots(2, 3, figsize=(17, 8.5))
    colours = plt.get_cmap("tab10").colors
    for ax, (key, label) in zip(axes.flat, metrics):
        names, x = [], 0
        for n, b in base:
            if key in b:
                ax.bar(x, b[key], color="#bbbbbb", width=0.7)
                names.append(n.replace("_", "\n"))
                x += 1
        ctrl = results["arms"]["control"]["mean"].get(key)
        if ctrl is not None and not math.isnan(ctrl):
            ax.axhline(ctrl, color="#555555", linestyle="--", linewidth=1, zorder=0)
        for i, (arm, e) in enumerate(arms):
            ax.bar(x, e["mean"][key], color=colours[i % 10], alpha=0.8, width=0.7,
                   yerr=e["std"][key] if len(e["seeds"]) > 1 else None, capsize=4, ecolor="#333333")
            vals = [v[key] for v in e["per_seed"].values() if v.get(key) is not None]
            offs = [0.0] if len(vals) == 1 else [-0.2 + 0.4 * j / max(1, len(vals) - 1) for j in range(len(vals))]
            ax.scatter([x + o for o in offs], vals, color="black", s=12, zorder=3)
            names.append(arm.replace("_", "\n"))
            x += 1
        ax.set_title(label, fontsize=11)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, fontsize=7)
        ax.grid(True, axis="y", alpha=0.3)
        if key == "ppl":
            ax.set_yscale("log")
    fig.suptitle("test split: baselines (grey), arms' mean over seeds (bars), ± std, each seed (dots), "
                 "control mean (dashed)", fontsize=12)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_pretraining(metrics_path, path):
    """The MLM pretraining's curve from its train.py metrics.jsonl: the held-out span loss (dev
    texts, fixed spans) and the training loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(metrics_path) if line.strip()]
    key = next((k for r in rows for k in r if k.startswith("eval/") and k.endswith("/eval_loss")), None)
    held = [r for r in rows if key in r]
    train = [r for r in rows if "loss/reader" in r]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([r["step"] for r in held], [r[key] for r in held], marker="o", label="held-out spans")
    ax.plot([r["step"] for r in train], [r["loss/reader"] for r in train], marker=".", label="train")
    ax.set_xlabel("step")
    ax.set_ylabel("token NLL")
    ax.set_title("reader pretraining (span corruption, train.py --task mlm)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_figures(rows, results, ctx):
    """{name: png}: bars, the pretraining curve, stage-1 dev curves, each seed's stage-2 dev curves.
    Curves come from the run folders here, else from the logs published with them (``ctx["dest"]``);
    a seed with neither keeps the figures published when it ran (published.kept_figures). A figure
    that cannot be drawn is left out with a warning: the numbers are the result."""
    out, fig_dir, dest = ctx["out"], os.path.join(ctx["out"], "figures"), ctx.get("dest")
    stage1 = {s: published.curves_of(out, dest, s, "stage1") for s in ctx["seeds"]}
    stage1 = {s: run for s, run in stage1.items() if run}
    jobs = [("bars", lambda p: plot_bars(results, p)),
            *([("pretraining", lambda p: plot_pretraining(os.path.join(out, "pretrained", "metrics.jsonl"), p))]
              if ctx["sizes"]["pretrain_steps"] else [])]
    if stage1:
        # named by its seeds when some are missing, so it does not replace the figure of those kept
        name = "stage1" if len(stage1) == len(ctx["seeds"]) else "stage1_" + "_".join(f"seed{s}" for s in stage1)
        jobs.append((name, lambda p: plot_runs(list(stage1.values()), p, labels=[f"seed {s}" for s in stage1],
                                               keys=["loss/reader", "eval/*/eval_loss", "eval/*/f1", "eval/*/dist2"],
                                               title="stage 1 (reader SFT), dev evaluations")))
    for seed in ctx["seeds"]:
        found = [(a, published.curves_of(out, dest, seed, a)) for a in ctx["arms"]]
        found = [(a, run) for a, run in found if run]
        if not found:
            continue
        jobs.append((f"curves_seed{seed}", lambda p, found=found, seed=seed: plot_runs(
            [run for _, run in found], p, labels=[a for a, _ in found], smooth=3,
            keys=["reward/mean", "loss/retriever", "eval/*/f1", "eval/*/rougeL", "eval/*/dist2", "eval/*/reward",
                  "eval/*/eval_loss", "kl/*"],
            title=f"stage 2, seed {seed}: training reward and dev evaluations (F1, ROUGE-L, Dist-2, reward)")))
    figs = {}
    for name, draw in jobs:
        path = os.path.join(fig_dir, f"{name}.png")
        try:
            draw(path)
            figs[name] = path
        except (UsageError, OSError, ValueError, KeyError) as exc:
            print(f"warning: figure {name} left out: {exc}")
    drawn_seeds = set(stage1) | {s for s in ctx["seeds"] if f"curves_seed{s}" in figs}
    kept = published.kept_figures(dest, [s for s in ctx["seeds"] if s not in drawn_seeds])
    return figs | {name: path for name, path in kept.items() if name not in figs}


# ------------------------------------------------------------------------------------ markdown

def _f(v, d=2):
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{d}f}"


def _ms(entry, key, d=2):
    m, s = entry["mean"][key], entry["std"][key]
    return _f(m, d) + (f" ± {_f(s, d)}" if len(entry["seeds"]) > 1 and s is not None else "")


def _ci(entry, key, d=2):
    if "ci_vs_control" not in entry:
        return "–"
    return _interval(entry["diff_vs_control"][key], *entry["ci_vs_control"][key], d=d)


def _interval(mean, lo, hi, d=2):
    if None in (lo, hi, mean):
        return "–"
    return f"{mean:+.{d}f} [{lo:+.{d}f}, {hi:+.{d}f}]" + (" **✓**" if lo > 0 else " **✗**" if hi < 0 else "")


def _earlier_interval(earlier, key, d=2):
    """One metric of an interval carried from an earlier report (published.earlier_intervals)."""
    return _interval((earlier.get("diff") or {}).get(key), *earlier["ci"].get(key, [None, None]), d=d)


def _seed_level_table(results):
    """Every arm minus the control (and retrieved − random) with Student's t interval over the seeds'
    mean differences: the seeds are the sample, so seeds known only by their published means count."""
    arms = {a: e for a, e in results["arms"].items() if "seed_ci_vs_control" in e and e["eval"] == "retrieval"}
    if not arms:
        return []
    lines = ["", "### Over training seeds", "",
             "The same differences with the seeds as the sample: the mean over seeds of each seed's arm − control "
             "(and retrieved − random) and its 95% Student's t interval (n − 1 degrees of freedom; with 3 seeds "
             "t = 4.30, so only a difference that every seed shows clears 0). The bootstrap intervals above ask "
             "which test examples were drawn; these ask which training seeds were.", "",
             "| arm | seeds | Δ F1 [95% t] | Δ ROUGE-L [95% t] | Δ reward [95% t] | F1 retrieved − random [95% t] |",
             "|---|---|---:|---:|---:|---:|"]
    abl = results.get("ablations", {})
    for arm, e in arms.items():
        cells = [_interval(e["seed_diff_vs_control"][k], *e["seed_ci_vs_control"][k], d=3 if k == "reward" else 2)
                 for k in ("f1", "rougeL", "reward")]
        a = abl.get(arm)
        cells.append(_interval(a["seed_diff_retrieved_vs_random"]["f1"], *a["seed_ci_retrieved_vs_random"]["f1"])
                     if a and "seed_ci_retrieved_vs_random" in a else "–")
        lines.append(f"| {arm} | {', '.join(map(str, e['seed_ci_seeds_vs_control']))} | " + " | ".join(cells) + " |")
    if "control" in abl and "seed_ci_retrieved_vs_random" in abl["control"]:
        a = abl["control"]
        lines.append(f"| control | {', '.join(map(str, a['seeds']))} | – | – | – | "
                     f"{_interval(a['seed_diff_retrieved_vs_random']['f1'], *a['seed_ci_retrieved_vs_random']['f1'])} |")
    earlier = {a: e["earlier_ci_vs_control"] for a, e in arms.items() if e.get("earlier_ci_vs_control")}
    if earlier:
        seeds = ", ".join(map(str, next(iter(earlier.values()))["seeds"]))
        lines += ["", f"Seeds {seeds}, whose replies were not kept, had these paired bootstrap intervals (seeds pooled) "
                  "in the report that had their replies:", "",
                  "| arm | seeds | Δ F1 [95% CI] | Δ ROUGE-L [95% CI] | Δ reward [95% CI] |", "|---|---|---:|---:|---:|"]
        for arm, e in earlier.items():
            lines.append(f"| {arm} | {', '.join(map(str, e['seeds']))} | " + " | ".join(
                _earlier_interval(e, k, d=3 if k == "reward" else 2) for k in ("f1", "rougeL", "reward")) + " |")
    return lines


def _pooled_seeds(results):
    """The seeds the paired bootstrap pools (those whose replies are at hand), in words."""
    pooled = sorted({s for e in results["arms"].values() for s in e.get("ci_seeds_vs_control", [])})
    every = sorted({s for e in results["arms"].values() for s in e["seeds"]})
    if pooled == every:
        return "seeds pooled"
    rest = [str(s) for s in every if s not in pooled]
    if not pooled:
        return (f"none here: the replies of seed{'s' if len(every) != 1 else ''} {', '.join(map(str, every))} were not "
                "kept; see the seed-level intervals below")
    return (f"pooled over seed{'s' if len(pooled) != 1 else ''} {', '.join(map(str, pooled))}, whose replies are "
            f"at hand; seed{'s' if len(rest) != 1 else ''} {', '.join(rest)} count{'' if len(rest) != 1 else 's'} in the "
            "means and in the seed-level intervals below, not here: their replies were not kept")


def _ablation_table(abl):
    """What each arm's retrieved story is worth: the same checkpoint with a random story and none."""
    if not abl:
        return []
    lines = ["", "## Retrieval ablations (test split)", "",
             "Each arm's checkpoint evaluated with its retrieved story, a random corpus story (`--eval_stories "
             "random`) and no story (`--closed_book`); mean over seeds. Retrieved − random: the mean paired "
             "difference with its 95% bootstrap interval (the seeds pooled as in the arms' table); ✓ / ✗: above / "
             "below 0.", "",
             "| arm | F1 retrieved / random / none | ROUGE-L retrieved / random / none | reward retrieved / random / none "
             "| F1 retrieved − random [95% CI] | reward retrieved − random [95% CI] |", "|---|---|---|---|---:|---:|"]
    for arm, e in abl.items():
        def three(k, d=2):
            return " / ".join(_f(e.get(m, {}).get(k), d) for m in ("retrieval", "random_story", "closed_book"))

        def diff(k, d=2):
            return _interval(e["diff_retrieved_vs_random"][k], *e["ci_retrieved_vs_random"][k], d=d)

        lines.append(f"| {arm} | {three('f1')} | {three('rougeL')} | {three('reward', 3)} | {diff('f1')} | "
                     f"{diff('reward', 3)} |")
    earlier = {a: e["earlier_ci_retrieved_vs_random"] for a, e in abl.items() if e.get("earlier_ci_retrieved_vs_random")}
    if earlier:
        seeds = ", ".join(map(str, next(iter(earlier.values()))["seeds"]))
        lines += ["", f"Seeds {seeds} (replies not kept), F1 retrieved − random in the report that had their replies: "
                  + "; ".join(f"{a} {_earlier_interval(e, 'f1')}" for a, e in earlier.items()) + "."]
    return lines


def _halves_table(results):
    """F1's precision and recall, the reply length and the phrase loops of every arm (and of the
    human references): whether an arm's F1 moved by better words or by more of them."""
    lines = ["", "### F1's two halves (test split, mean over seeds)", "",
             "`precision` / `recall`: F1's halves (words in common over the reply's / the reference's); "
             "`length`: reply words / reference words; `loop3`: share of replies in which a run of three words "
             "comes twice (\"i love hats . i love hats\"), which `repeat3` misses.", "",
             "| arm | F1 | precision | recall | length | loop3 % | repeat3 % |", "|---|" + "---:|" * 6]
    human = results["baselines"].get("human", {})
    if human.get("loop3") is not None:
        lines.append(f"| human references | 100.00 | 100.00 | 100.00 | 1.00 | {_f(human['loop3'], 1)} | – |")
    for arm, e in results["arms"].items():
        if e["eval"] != "retrieval":
            continue
        mean = e["mean"]
        lines.append(f"| {arm} | {_f(mean.get('f1'))} | {_f(mean.get('precision'))} | {_f(mean.get('recall'))} | "
                     f"{_f(mean.get('length_ratio'))} | {_f(mean.get('loop3'), 1)} | {_f(mean.get('repeat3'), 1)} |")
    return lines


def render(results, rows, ctx):
    """RESULTS.md."""
    sizes, m = ctx["sizes"], ctx["machine"]
    lines = [f"# The study: stage-2 methods against their control on ConvAI2 + ROCStories ({ctx['scale']} scale)", ""]
    if ctx["scale"] == "tiny":
        lines += ["> **Tiny scale**: a check that the pipeline runs end to end on a few examples with a tiny "
                  "model. These numbers mean nothing about the methods.", ""]
    n_test = results["n_test"] if not sizes["eval_n"] else min(sizes["eval_n"], results["n_test"])
    lines += [f"- **Split**: {ctx['split']}. Dev: every choice, early stopping, the in-loop curves; "
              f"test ({n_test} examples): these tables only.",
              f"- **Stories**: `{relative(ctx['paths']['stories'])}`"
              + (f" (first {sizes['max_passages']})" if sizes["max_passages"] else " (all)") + ".",
              "- **Reader**: `scripts/build_small_models.py --init_embeddings minilm "
              + " ".join(sizes["reader_sizes"]) + "`, vocabulary from the train split and the stories, "
              + (f"pretrained {sizes['pretrain_steps']} steps × {sizes['pretrain_batch']} (`train.py --task mlm`)"
                 if sizes["pretrain_steps"] else "not pretrained (chosen on dev: [reader_selection.md](reader_selection.md))")
              + ", shared by all seeds. **Retriever**: all-MiniLM-L6-v2.",
              f"- **Stage 1**: `{STAGE1['config']}`, at most {sizes['s1_steps']} steps × {sizes['s1_batch']}, "
              f"lr {sizes['s1_lr']}, dev loss every {sizes['s1_eval_freq']} steps, early stopping patience "
              f"{sizes['patience']}; every arm starts from its best checkpoint (the lowest dev loss).",
              f"- **Decoding**: `{DECODING}` in every evaluation, in-loop and on test.",
              f"- **Stage 2**: every arm {sizes['s2_steps']} steps × {sizes['s2_batch']} examples from that checkpoint, "
              f"the same examples in the same order; pools of {sizes['pool']} stories where an arm scores a pool; "
              "precision " + sizes["precision"] + ".",
              f"- **Seeds**: {', '.join(map(str, ctx['seeds']))} (training seeds; one split)"
              + (f"; {len(ctx['seeds'])} of the {len(ctx['seeds_requested'])} requested "
                 f"({', '.join(map(str, ctx['seeds_requested']))}) complete so far: a re-run of the same "
                 "command continues with the rest" if len(ctx.get("seeds_requested", ctx["seeds"])) > len(ctx["seeds"])
                 else "") + ".",
              f"- **Command**: `{ctx['command']}`",
              f"- **Machine**: {m['cpu']}; {m['nproc']} cores; GPU: {m['gpu']}; Python {m['python']}, torch {m['torch']}.",
              f"- **Wall time**: {ctx['steps_s'] / 60:.0f} min over all steps ({ctx['finished']}); per step in "
              "`timings.json`.", ""]
    lines += ["## Baselines (test split, the same metric code)", "",
              "| baseline | F1 | BLEU | ROUGE-L | Dist-1 | Dist-2 |", "|---|---:|---:|---:|---:|---:|"]
    for name, b in results["baselines"].items():
        label = BASELINE_NAMES.get(name, "human references themselves")
        if name == "constant":
            label += f": \"{b['reply']}\""
        lines.append(f"| {label} | {_f(b['f1'])} | {_f(b['bleu'])} | {_f(b['rougeL'])} | {_f(b['dist1'])} | "
                     f"{_f(b['dist2'])} |")
    lines += ["", "## Arms (test split, LAPDOG's metric definitions)", "",
              "Mean ± std over seeds. Δ vs control: the mean paired difference (arm − control, each seed against its "
              "own control) with its 95% bootstrap interval (10,000 resamples of the test examples, "
              f"{_pooled_seeds(results)}); "
              "✓ / ✗: the interval lies above / below 0. `generic`: share of replies equal to the arm's most frequent "
              "reply; `repeat3`: share with a word three times in a row; `copy`: share repeating 8+ consecutive "
              "words of the persona / of the fused story; `ppl`: per-token perplexity of the gold "
              "replies (the reader's tokens).", "",
              "| arm | F1 | ROUGE-L | BLEU | Dist-1 | Dist-2 | ppl | reward | generic % | repeat3 % | copy % "
              "persona / story | Δ F1 [95% CI] | Δ ROUGE-L [95% CI] | Δ reward [95% CI] |",
              "|---|" + "---:|" * 13]
    for arm, e in results["arms"].items():
        if e["eval"] != "retrieval" and arm != "control_closed_book":
            continue  # the ablations have a table of their own
        name = f"**{arm}**" if arm == "control" else arm
        lines.append(f"| {name} | {_ms(e, 'f1')} | {_ms(e, 'rougeL')} | {_ms(e, 'bleu')} | {_ms(e, 'dist1')} | "
                     f"{_ms(e, 'dist2')} | {_ms(e, 'ppl', 1)} | {_ms(e, 'reward', 3)} | {_f(e['generic_share'], 1)} | "
                     f"{_ms(e, 'repeat3', 1)} | {_f(e['mean'].get('copy_persona'), 1)} / {_f(e['mean'].get('copy_story'), 1)} | "
                     f"{_ci(e, 'f1')} | {_ci(e, 'rougeL')} | {_ci(e, 'reward', 3)} |")
        flagged = {s: why for s, why in e["collapsed"].items() if why}
        for s, why in flagged.items():
            lines.append(f"| &nbsp;&nbsp;↳ seed {s} ⚠ collapsed: {why} | " + " | ".join(
                _f(e["per_seed"][s].get(k), 1 if k == "ppl" else 3 if k == "reward" else 2)
                for k in ("f1", "rougeL", "bleu", "dist1", "dist2", "ppl", "reward")) + " | | | | | | |")
    lines += _seed_level_table(results)
    lines += _halves_table(results)
    lines += _ablation_table(results.get("ablations", {}))
    t = results["control_targets"]
    lines += ["", "**The control against its targets** (mean over seeds): " + "; ".join(
        f"{k} {_f(v['value'])} ({v['target']}: {'met' if v['met'] else 'missed'})" for k, v in t.items()) + ".", ""]
    lines += ["Most frequent reply per arm and seed (its share of the test replies):", ""]
    for arm, e in results["arms"].items():
        parts = [f"seed {s}: \"{r['reply']}\" ({r['share']:.1f}%)" for s, r in e["most_frequent_reply"].items() if r]
        lines.append(f"- {arm}: " + "; ".join(parts))
    if results.get("samples"):
        seed = results["samples"][0]["seed"]
        lines += ["", f"## Sample replies (test, seed {seed}, examples spread evenly over the split)", ""]
        for ex in results["samples"]:
            lines += [f"- **#{ex['index']}** persona: {ex['persona']}", f"  - they said: \"{ex['said']}\"",
                      f"  - human: \"{ex['human']}\""]
            lines += [f"  - {arm}: \"{reply}\"" for arm, reply in ex["replies"].items()]
    lines += ["", "## Test split, standard implementations", "",
              "rouge-score 0.1.2 F (RS), nltk corpus BLEU (whitespace tokens, smoothing method1); mean ± std over "
              "the seeds whose replies are at hand.", "",
              "| arm | RS R-1 | RS R-2 | RS R-L | RS R-L stem | nltk B-1 | nltk B-2 | nltk B-4 |",
              "|---|" + "---:|" * 7]
    by = {}
    for r in rows:
        if r["eval"] == "retrieval" or (r["arm"], r["eval"]) == ("control", "closed_book"):
            by.setdefault(r["arm"] if r["eval"] == "retrieval" else f"{r['arm']}_{r['eval']}", []).append(r["metrics"])
    for arm, ms in by.items():
        cells = []
        for k in ("rs_rouge1", "rs_rouge2", "rs_rougeL", "rs_rougeL_stem", "nltk_bleu1", "nltk_bleu2", "nltk_bleu4"):
            values = [x[k] for x in ms if x.get(k) is not None]  # seeds known only by their means lack these
            mean, std = mean_std(values)
            cells.append(_f(mean) + (f" ± {_f(std)}" if len(values) > 1 else ""))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "## Figures", ""]
    for name, path in ctx["figures"].items():
        lines += [f"![{name}](figures/{os.path.basename(path)})", ""]
    lines += ["## Arms", "", "| arm | what | recipe | size overrides |", "|---|---|---|---|"]
    for name in ctx["arms"]:
        arm = ARMS[name]
        lines.append(f"| {name} | {arm['about']} | `{arm['config']}` | `{' '.join(fill(arm['flags'], sizes)) or '–'}` |")
    lines += ["", f"Stage 1: `{STAGE1['config']}` with `{' '.join(fill(STAGE1['flags'], sizes))}`. Every command "
              "run is in `commands.sh`.", "", "## Every seed", "",
              "| arm | seed | F1 | ROUGE-L | BLEU | Dist-1 | Dist-2 | ppl | reward | generic % |", "|---|---|" + "---:|" * 8]
    for arm, e in results["arms"].items():
        for s, v in e["per_seed"].items():
            lines.append(f"| {arm} | {s} | " + " | ".join(_f(v.get(k), 1 if k == "ppl" else 3 if k == "reward" else 2)
                                                        for k in ("f1", "rougeL", "bleu", "dist1", "dist2", "ppl",
                                                                  "reward", "generic")) + " |")
    return "\n".join(lines) + "\n"


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_THREAD_LIMIT")}
    try:
        nproc = subprocess.run(["nproc"], capture_output=True, text=True, env=env).stdout.strip()
    except OSError:
        nproc = str(len(os.sched_getaffinity(0)))
    gpu = "none"
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
        gpu = ", ".join(q.stdout.split("\n")).strip(", ") if q.returncode == 0 and q.stdout.strip() else "none"
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "?"
    return {"cpu": cpu, "nproc": nproc, "gpu": gpu, "python": platform.python_version(), "torch": torch_version}


def publish(out, dest, figures):
    """RESULTS.md, results.json and the figures copied to ``dest``; a figure there that this report
    did not draw (an earlier study's seed, say) is removed, so RESULTS.md and figures/ agree."""
    os.makedirs(os.path.join(dest, "figures"), exist_ok=True)
    drawn = {os.path.basename(path) for path in figures.values()}
    for stale in glob.glob(os.path.join(dest, "figures", "*.png")):
        if os.path.basename(stale) not in drawn:
            os.remove(stale)
    for name in ("RESULTS.md", "results.json"):
        shutil.copy(os.path.join(out, name), os.path.join(dest, name))
    for path in figures.values():
        target = os.path.join(dest, "figures", os.path.basename(path))
        if os.path.abspath(path) != os.path.abspath(target):  # a kept figure is already there
            shutil.copy(path, target)
