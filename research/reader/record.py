"""Record one run of the reader search: results/reader/NAME.md (the lab note), results.json, RESULTS.md,
curves.png. Dev split only.

    python research/reader/record.py RUN_DIR --name NAME --command "..." --train FILE --decodings greedy ...
    python research/reader/record.py --flags sample_p0.9      # evaluate.py's flags for one decoding
    python research/reader/record.py --choose NAME DECODING --recipe configs/FILE.yaml
                                                             # the chosen reader: results.json's recipe and dev

RUN_DIR is a train.py run (metrics.jsonl, checkpoint/best) whose best checkpoint was evaluated on dev
into RUN_DIR/dev_<decoding>/ (research/reader/run.sh). A run recorded again replaces its entry.
"""

import argparse
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from research.study.reader_selection import dev_evaluations  # noqa: E402
from src.data.prompts import last_utterance  # noqa: E402

DECODINGS = {
    "greedy": [],
    "no_repeat3": ["--generation_no_repeat_ngram_size=3"],
    "penalty1.3": ["--generation_repetition_penalty=1.3", "--generation_no_repeat_ngram_size=3"],
    "sample_p0.9": ["--generation_temperature=0.7", "--generation_top_p=0.9"],
    # the temperature / top-p sweep around sample_p0.9 (chunk 2 of the search)
    "sample_t0.5_p0.9": ["--generation_temperature=0.5", "--generation_top_p=0.9"],
    "sample_t1.0_p0.9": ["--generation_temperature=1.0", "--generation_top_p=0.9"],
    "sample_t0.7_p0.8": ["--generation_temperature=0.7", "--generation_top_p=0.8"],
    "sample_t0.7_p0.95": ["--generation_temperature=0.7", "--generation_top_p=0.95"],
    "beam4_no_repeat3": ["--generation_num_beams=4", "--generation_no_repeat_ngram_size=3"],
}
KEYS = ("ppl", "f1", "rougeL", "dist1", "dist2", "repeat3", "generic")
# The targets on dev: a reader that talks (Dist-2, generic share, triple repeats) and scores
# like the paper's pretrained T5-small SFT (F1, ROUGE-L).
TARGETS = {"dist2": (">=", 10.0), "generic": ("<", 10.0), "repeat3": ("<", 2.0), "f1": (">=", 13.9),
           "rougeL": (">=", 14.2)}
OUT_DIR = os.path.join(ROOT, "results", "reader")


def meets(metrics):
    """{key: met?} for each target."""
    return {k: (metrics[k] >= v if op == ">=" else metrics[k] < v) for k, (op, v) in TARGETS.items()}


def dev_curve(run_dir):
    """[{step, eval_loss, KEYS...}] of the run's in-loop dev evaluations, in step order (a step that a
    resumed run logged twice: its last row)."""
    return [{"step": step, **{k: m.get(k) for k in ("eval_loss",) + KEYS}}
            for step, m in dev_evaluations(run_dir) if "eval_loss" in m]


def decoding_result(run_dir, name):
    folder = os.path.join(run_dir, f"dev_{name}")
    # evaluate.py writes into FOLDER/results/ (or FOLDER/ itself): the newest evaluation there
    found = glob.glob(os.path.join(folder, "**", "*.metrics.json"), recursive=True)
    if not found:
        raise SystemExit(f"error: {folder}: no *.metrics.json — run evaluate.py into it first (research/reader/run.sh)")
    saved = json.load(open(max(found, key=os.path.getmtime)))
    results = saved["results"] if os.path.isabs(saved["results"]) else os.path.join(ROOT, saved["results"])
    rows = [json.loads(line) for line in open(results)]
    samples = [{"last_utterance": last_utterance(r["query"]), "gold": r["answers"][0], "reply": r["generation"]}
               for r in rows[:5]]
    return {"decoding": name, "flags": DECODINGS[name], "n": saved["n_examples"],
            "metrics": {k: saved["metrics"][k] for k in KEYS}, "samples": samples}


def lab_note(run):
    lines = [f"# Reader search: {run['name']}", "", f"Command: `{run['command']}`", "",
             f"Training file: `{run['train']}`; best dev loss at step {run['best_step']} (checkpoint/best, "
             f"--keep_best); {run['seconds'] / 60:.0f} min of training on {run['machine']}.", "",
             "## Dev curve (200 dev examples, greedy)", "",
             "| step | dev loss | ppl | F1 | ROUGE-L | Dist-2 | triple repeats % | top reply % |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in run["curve"]:
        lines.append(f"| {r['step']} | {r['eval_loss']:.3f} | {r['ppl']:.1f} | {r['f1']:.2f} | {r['rougeL']:.2f} | "
                     f"{r['dist2']:.2f} | {r['repeat3']:.1f} | {r['generic']:.1f} |")
    lines += ["", f"## The best checkpoint on {run['decodings'][0]['n']} dev examples, by decoding", "",
              "| decoding | ppl | F1 | ROUGE-L | Dist-1 | Dist-2 | triple repeats % | top reply % | targets met |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for d in run["decodings"]:
        m, ok = d["metrics"], meets(d["metrics"])
        lines.append(f"| {d['decoding']} | {m['ppl']:.1f} | {m['f1']:.2f} | {m['rougeL']:.2f} | {m['dist1']:.2f} | "
                     f"{m['dist2']:.2f} | {m['repeat3']:.1f} | {m['generic']:.1f} | "
                     f"{sum(ok.values())} of {len(ok)} |")
    for d in run["decodings"]:
        lines += ["", f"### Five dev replies, {d['decoding']}", ""]
        lines += [f"- Q: {s['last_utterance']}  \n  gold: {s['gold']}  \n  reply: {s['reply']}" for s in d["samples"]]
    return "\n".join(lines) + "\n"


def choose(name, decoding, recipe):
    """results.json's recipe and dev numbers: one recorded run's best checkpoint with one decoding."""
    path = os.path.join(OUT_DIR, "results.json")
    saved = json.load(open(path))
    run = next((r for r in saved["runs"] if r["name"] == name), None)
    if run is None:
        raise SystemExit(f"error: --choose: no recorded run '{name}' in {path} — record it first")
    found = next((d for d in run["decodings"] if d["decoding"] == decoding), None)
    if found is None:
        raise SystemExit(f"error: --choose: run '{name}' has no decoding '{decoding}' — "
                         f"pick from {', '.join(d['decoding'] for d in run['decodings'])}")
    if not os.path.isfile(os.path.join(ROOT, recipe)):
        raise SystemExit(f"error: --recipe: {recipe} does not exist")
    dev = {"run": name, "decoding": decoding, "flags": found["flags"], "n": found["n"], **found["metrics"],
           "targets_met": meets(found["metrics"])}
    write_summary(saved["runs"], recipe=recipe, dev=dev)
    return dev


def write_summary(runs, recipe=None, dev=None):
    """results.json (recipe and dev: the chosen reader, null until one is chosen, kept when a run is
    recorded afterwards) and RESULTS.md."""
    path = os.path.join(OUT_DIR, "results.json")
    old = json.load(open(path)) if os.path.exists(path) else {}
    json.dump({"recipe": recipe or old.get("recipe"), "dev": dev or old.get("dev"), "targets": TARGETS,
               "runs": runs}, open(path, "w"), indent=1)
    lines = ["# Reader search (dev split only)", "",
             "Targets on dev: Dist-2 ≥ 10, top reply's share < 10 %, triple repeats < 2 %, F1 ≥ 13.9, "
             "ROUGE-L ≥ 14.2 (the paper's pretrained T5-small SFT); perplexity as low as the budget allows "
             "(a unigram model: e^5.75 ≈ 314). The lab log of each chunk: [LOG.md](LOG.md). "
             "One lab note per run beside this file; made by "
             "`research/reader/run.sh` and `research/reader/record.py`.", "",
             "| run | best step | dev loss | decoding | ppl | F1 | ROUGE-L | Dist-2 | triple repeats % | top reply % |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        best = next(r for r in run["curve"] if r["step"] == run["best_step"])
        for d in run["decodings"]:
            m = d["metrics"]
            lines.append(f"| [{run['name']}]({run['name']}.md) | {run['best_step']} | {best['eval_loss']:.3f} | "
                         f"{d['decoding']} | {m['ppl']:.1f} | {m['f1']:.2f} | {m['rougeL']:.2f} | {m['dist2']:.2f} | "
                         f"{m['repeat3']:.1f} | {m['generic']:.1f} |")
    with open(os.path.join(OUT_DIR, "RESULTS.md"), "w") as f:
        f.write("\n".join(lines) + "\n\n![dev curves](curves.png)\n")
    plot(runs)


def plot(runs):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for run in runs:
        steps = [r["step"] for r in run["curve"]]
        for ax, key in zip(axes, ("eval_loss", "dist2", "generic")):
            ax.plot(steps, [r[key] for r in run["curve"]], marker="o", label=run["name"])
    for ax, title in zip(axes, ("dev loss (nats/token)", "Dist-2 (greedy)", "top reply's share % (greedy)")):
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT_DIR, "curves.png"), dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", nargs="?")
    p.add_argument("--flags", help="print evaluate.py's flags for this decoding and exit")
    p.add_argument("--name")
    p.add_argument("--command")
    p.add_argument("--train")
    p.add_argument("--decodings", nargs="+", default=list(DECODINGS))
    p.add_argument("--choose", nargs=2, metavar=("NAME", "DECODING"), help="set the chosen reader in results.json")
    p.add_argument("--recipe", help="with --choose: the recipe file in configs/")
    a = p.parse_args(argv)
    if a.flags:
        print(" ".join(DECODINGS[a.flags]))
        return 0
    if a.choose:
        if not a.recipe:
            p.error("--choose needs --recipe configs/FILE.yaml")
        print(json.dumps(choose(*a.choose, a.recipe)))
        return 0
    summary = json.load(open(os.path.join(a.run_dir, "summary.json")))
    best = os.readlink(os.path.join(a.run_dir, "checkpoint", "best"))
    import platform
    run = {"name": a.name, "command": a.command, "train": a.train, "best_step": int(best.split("-")[-1]),
           "seconds": summary["elapsed_s"],
           "machine": f"{os.cpu_count()}-core CPU ({platform.machine()})",
           "curve": dev_curve(a.run_dir), "decodings": [decoding_result(a.run_dir, d) for d in a.decodings]}
    os.makedirs(OUT_DIR, exist_ok=True)
    with open(os.path.join(OUT_DIR, f"{a.name}.md"), "w") as f:
        f.write(lab_note(run))
    path = os.path.join(OUT_DIR, "results.json")
    runs = [r for r in (json.load(open(path))["runs"] if os.path.exists(path) else []) if r["name"] != a.name]
    write_summary(runs + [run])
    print(f"recorded {a.name}: {OUT_DIR}/{a.name}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
