"""The study: every stage-2 method against its control on real data, one command.

    python research/study/run.py [--data_dir ../shared/data] [--scale cpu|gpu|tiny] [--seeds 0 1 2]
                                 [--arms control lapdog ...] [--out runs/study] [--publish results/study]

1. Splits the dialogues (default ``DATA_DIR/convai2/valid.jsonl``) by persona with a fixed seed
   into train / dev / test (research/study/split.py). Dev: in-loop curves, early stopping and
   every choice of setting; test: only the reported tables.
2. Baselines that need no model, on test, with the same metric code (src/evaluation/baselines.py).
3. Shared by all seeds: a small reader built with MiniLM's word embeddings, pretrained on the
   train split's dialogues and the stories with `train.py --task mlm` (scales whose pretrain_steps
   is not 0: tiny, gpu), and the index of the pretrained retriever. Per seed: stage 1
   (configs/stage1_convai2.yaml: its lowest dev loss kept), every arm from its best checkpoint with
   the same steps and examples, evaluation on test.
4. ``OUT/RESULTS.md`` and ``OUT/results.json``: baselines, every arm's mean ± std over seeds,
   perplexity, the generic-reply share, paired bootstrap 95% intervals of each arm minus the
   control (per-example F1, ROUGE-L, reward; pooled over seeds), collapse flags, the control
   against its targets, the retrieval ablations (every arm's checkpoint also evaluated with a
   random story and with none: what its retrieved story is worth, with a paired interval of
   retrieved − random); ``OUT/figures/``. No machine paths in either file.

Each step runs train.py / evaluate.py / scripts as a subprocess, logs to its folder, and is
skipped when re-run after it finished with the same command and recipes (another command, or a
recipe edited since, is refused: delete the folder to redo it); an arm whose exact run finished
while settings were tried on dev (research/study/tune.py) is linked, not trained again. Every
command is appended to ``OUT/commands.sh``. **One seed at a time**: ``--seeds 0`` today, ``--seeds 0 1`` tomorrow (seed
0's steps are reused): the report is rewritten for the seeds complete so far after each seed, and
says how many of those requested it holds; with ``--publish DIR`` each evaluation's metrics and
replies go to ``DIR/evaluations/seedS/`` as it finishes, each training run's curves to ``DIR/logs/``,
and the report after each seed, so a long study is committed as it goes. A seed published in DIR
whose steps are not in OUT (another machine ran it) is read back from DIR, not run again
(research/study/published.py). ``--report_only`` writes the report of whatever is complete
without running anything (after an interruption). ``--dry_run`` writes the split and prints the plan. ``--dialogues`` /
``--stories`` run it on other files (the test runs ``--scale tiny`` on the sample data).
Missing data: one ``error: ...`` line, exit 2; a failed step: one line naming its log, exit 1.
"""

import argparse
import datetime
import glob
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from research.study import plan as study_plan  # noqa: E402
from research.study import published, report, split  # noqa: E402
from src.data.dialogues import load_dialogues  # noqa: E402
from src.evaluation.results import read_results  # noqa: E402
from src.infra import exits  # noqa: E402
from src.infra.errors import UsageError  # noqa: E402

DONE = "study_done.json"


class StepFailed(Exception):
    pass


# Flags that name where a run writes, or whether the shared index is built or loaded: the same run
# either way (the first stage 1 saves the index that every later run loads).
_NOT_THE_RUN = ("--checkpoint_dir=", "--save_index_path=", "--load_index_path=")


def fingerprint(argv):
    """What makes a run this run: its command (less where it writes) and the content of every recipe
    it reads (``--config FILE``), so that an edited recipe is not mistaken for the one that ran."""
    args = [report.relative(a) for a in argv if not a.startswith(_NOT_THE_RUN)]
    recipes = {}
    for flag, value in zip(argv, argv[1:]):
        if flag == "--config":
            path = value if os.path.isabs(value) else os.path.join(ROOT, value)
            recipes[report.relative(value)] = split.sha256_of(path)
    return {"argv": args, "recipes": recipes}


def _difference(old, new):
    """The first thing that differs between two fingerprints, in words."""
    for name in sorted(set(old["recipes"]) | set(new["recipes"])):
        if old["recipes"].get(name) != new["recipes"].get(name):
            return f"{name} was edited since"
    gone = [a for a in old["argv"] if a not in new["argv"]]
    added = [a for a in new["argv"] if a not in old["argv"]]
    if gone:
        return f"it ran with {gone[0]}, now {added[0] if added else 'without'}"
    return f"now with {added[0]}" if added else "its flags were in another order"


def run_step(label, folder, argv, commands_file):
    """Run one script in a subprocess; skipped when its folder holds study_done.json from the same
    command and recipes (refused when it holds another run's: delete the folder to redo it)."""
    done = os.path.join(folder, DONE)
    if os.path.exists(done):
        with open(done) as f:
            info = json.load(f)
        mine = fingerprint(argv)
        if "fingerprint" in info and info["fingerprint"] != mine:
            raise UsageError(f"{label}: {report.relative(folder)} finished with another run "
                             f"({_difference(info['fingerprint'], mine)}) — delete the folder to run it again")
        info = dict(info, wall_s=step_wall(folder, info["wall_s"]))
        print(f"== {label}: done before ({info['wall_s']:.0f} s), skipped", flush=True)
        return info
    os.makedirs(folder, exist_ok=True)
    cmd = [sys.executable, *argv]
    with open(commands_file, "a") as f:
        f.write(shlex.join(["python", *[report.relative(a) for a in argv]]) + "\n")
    log = os.path.join(folder, "study.log")
    print(f"== {label}", flush=True)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    env.setdefault("WANDB_MODE", "offline")
    t0 = time.time()
    with open(log, "w") as f:
        p = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    wall = time.time() - t0
    if p.returncode != 0:
        raise StepFailed(f"{label}: {argv[0]} exited {p.returncode} — see {log}")
    info = {"label": label, "wall_s": step_wall(folder, wall), "fingerprint": fingerprint(argv)}
    with open(done, "w") as f:
        json.dump(info, f)
    print(f"   {wall:.0f} s", flush=True)
    return info


def step_wall(folder, wall_s):
    """A step's seconds: a training stopped by one chunk's timeout and resumed by the next counts
    every chunk (train.py's summary.json adds its elapsed_s up over resumes), not only the
    invocation that finished it (``wall_s``)."""
    summary = os.path.join(folder, "summary.json")
    if not os.path.isfile(summary):
        return wall_s
    with open(summary) as f:
        return max(wall_s, float(json.load(f).get("elapsed_s") or 0.0))


def link_tuned_twin(folder, argv, tuning_dir):
    """An arm whose exact run (the same command and recipes, from the same stage 1) already finished
    while settings were tried on dev (research/study/tune.py: ``tuning_dir``) is not trained again:
    ``folder`` becomes a link to it. Returns the twin's folder, or None."""
    if os.path.lexists(folder) or not os.path.isdir(tuning_dir):
        return None
    mine = fingerprint(argv)
    for done in sorted(glob.glob(os.path.join(tuning_dir, "*", DONE))):
        with open(done) as f:
            if json.load(f).get("fingerprint") == mine:
                twin = os.path.dirname(done)
                os.makedirs(os.path.dirname(folder), exist_ok=True)
                os.symlink(os.path.relpath(twin, os.path.dirname(folder)), folder)
                return twin
    return None


def build_models(out, sizes, vocab_from, commands_file):
    """The reader to pretrain (MiniLM-initialized embeddings, the split's and stories' pieces)
    and the MiniLM retriever, once."""
    models = os.path.join(out, "models")
    cmd = ["scripts/build_small_models.py", f"--out={models}", "--init_embeddings=minilm", *sizes["reader_sizes"],
           "--vocab_from", *vocab_from]
    run_step("building the models", models, cmd, commands_file)
    return os.path.join(models, "reader"), os.path.join(models, "retriever")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=os.path.join(os.path.dirname(ROOT), "shared", "data"),
                   help="folder with convai2/valid.jsonl and corpora/story/story.jsonl (default ../shared/data)")
    p.add_argument("--dialogues", help="dialogue jsonl to split (default DATA_DIR/convai2/valid.jsonl)")
    p.add_argument("--stories", help="story corpus jsonl (default DATA_DIR/corpora/story/story.jsonl)")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "study"), help="output folder")
    p.add_argument("--scale", default="cpu", choices=sorted(study_plan.SCALES), help="size preset (plan.SCALES)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    p.add_argument("--arms", nargs="+", default=list(study_plan.DEFAULT_ARMS),
                   help=f"arms to run, from: {', '.join(study_plan.ARMS)}")
    p.add_argument("--split_seed", type=int, default=0)
    p.add_argument("--fractions", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "DEV", "TEST"))
    p.add_argument("--publish", help="also copy RESULTS.md, results.json and figures/ into this folder")
    p.add_argument("--dry_run", action="store_true", help="write the split, print the plan, run nothing")
    p.add_argument("--report_only", action="store_true",
                   help="run nothing: write (and --publish) the report of the seeds whose every step has finished")
    g = p.add_argument_group("sizes (override the scale)")
    for name in study_plan.SIZE_FLAGS:
        g.add_argument(f"--{name}", type=int, help="0 = all" if name in ("eval_n", "max_passages") else None)
    return p.parse_args(argv)


def check_same_settings(out, settings):
    """Finished steps are reused on a re-run, so they must come from the same settings: refuse an
    output folder made with other sizes, split or data (other seeds or arms are fine)."""
    path = os.path.join(out, "study.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        changed = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
        if changed:
            k = changed[0]
            raise UsageError(f"{out}: made with other settings ({k}: {old.get(k)} -> {settings.get(k)}) — "
                             "pass a new --out, or delete the folder to start over")
    os.makedirs(out, exist_ok=True)
    with open(path, "w") as f:
        json.dump(settings, f, indent=2)


def prepare(args):
    """What every use of the study's folder shares: the data checked, the sizes, the split written,
    the paths of every input and model. Returns (out, sizes, manifest, paths)."""
    dialogues = args.dialogues or os.path.join(args.data_dir, "convai2", "valid.jsonl")
    stories = os.path.abspath(args.stories or os.path.join(args.data_dir, "corpora", "story", "story.jsonl"))
    for what, path in (("dialogues", dialogues), ("stories", stories)):
        if not os.path.isfile(path):
            raise UsageError(f"{path}: {what} not found — the study needs ../shared/data beside the checkout, "
                             "or --data_dir / --dialogues / --stories")
    sizes = study_plan.sizes_of(args.scale, {k: getattr(args, k) for k in study_plan.SIZE_FLAGS})
    out = os.path.abspath(args.out)
    settings = {"sizes": sizes, "dialogues_sha256": split.sha256_of(dialogues), "split_seed": args.split_seed,
                "fractions": list(args.fractions), "stories_sha256": split.sha256_of(stories)}
    if not args.dry_run:
        check_same_settings(out, settings)
    manifest = split.write_split(dialogues, os.path.join(out, "split"), args.split_seed, tuple(args.fractions))
    print(split.describe(manifest), flush=True)
    parts = manifest["splits"]
    paths = {"train": parts["train"]["path"], "dev": parts["dev"]["path"], "test": parts["test"]["path"],
             "stories": stories, "index": os.path.join(out, "index-pretrained-retriever"),
             "reader_init": os.path.join(out, "models", "reader"), "retriever": os.path.join(out, "models", "retriever"),
             "reader": os.path.join(out, "pretrained", "checkpoint", "best", "reader") if sizes["pretrain_steps"] else
             os.path.join(out, "models", "reader")}
    return out, sizes, manifest, paths


def index_saved(paths):
    """Whether an earlier run (an interrupted stage 1, research/study/tune.py) saved the shared
    index: building it again costs minutes (8 for the 31k stories on 2 CPU cores)."""
    return os.path.isfile(os.path.join(paths["index"], "meta.json"))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    t_start = time.time()
    study_plan.check_arms(args.arms)
    out, sizes, manifest, paths = prepare(args)
    steps = study_plan.plan(args.arms, args.seeds, paths, sizes, out, index_saved(paths))
    if args.dry_run:
        for _, label, _, cmd in steps:
            print(f"{label}: {shlex.join(cmd)}")
        return 0

    dest = os.path.abspath(args.publish) if args.publish else None
    previous = published.read_previous(dest)
    if not published.same_settings(previous, sizes, report.relative_manifest(manifest)):
        print(f"note: {args.publish}/results.json was made with other sizes or another split: its seeds are not "
              "reused", flush=True)
        previous = None
    carried = [s for s in args.seeds if s not in complete_seeds(steps, [s])
               and published.seed_is_published(dest, s, args.arms, previous)]
    for s in carried:  # what is published is not run again (the run folders of another machine are gone)
        print(f"== seed {s}: published in {args.publish}, read from there (delete its evaluations there to run it again)",
              flush=True)
    steps = [step for step in steps if not any(step[1].startswith(f"seed {s} ") for s in carried)]
    if not any(label.startswith("seed ") for _, label, _, _ in steps):
        steps = []  # every seed published: the shared steps (index, pretraining) serve no run
    commands = os.path.join(out, "commands.sh")
    timings = []
    train, test = load_dialogues(paths["train"]), load_dialogues(paths["test"])
    baselines = report.baseline_metrics(train, test)
    context = {"args": args, "argv": argv, "out": out, "paths": paths, "sizes": sizes, "manifest": manifest,
               "baselines": baselines, "test": test, "timings": timings, "t_start": t_start, "steps": steps,
               "dest": dest, "previous": previous, "carried": carried}
    if args.report_only:
        return 0 if write_report(context) else 1
    # the last step of each seed: the report is rewritten (and published) as each seed finishes
    last_of_seed = {max(i for i, (_, label, _, _) in enumerate(steps) if label.startswith(f"seed {s} ")): s
                    for s in args.seeds if s not in carried}
    try:
        if steps:
            build_models(out, sizes, [paths["train"], paths["stories"]], commands)
        for i, (kind, label, folder, cmd) in enumerate(steps):
            if kind == "train":  # tune.py's runs sit in OUT/tuning/seedS/ beside the study's OUT/seedS/
                twin = link_tuned_twin(folder, cmd, os.path.join(out, "tuning", os.path.basename(os.path.dirname(folder))))
                if twin:
                    print(f"== {label}: the same run finished on dev in {report.relative(twin)}: reused", flush=True)
            timings.append(run_step(label, folder, cmd, commands))
            if kind == "eval" and dest:
                publish_evaluation(folder, dest, out, os.path.splitext(os.path.basename(paths["test"]))[0])
            elif kind == "train" and dest and label.startswith("seed "):
                published.publish_log(folder, dest, int(label.split()[1]))
            if i in last_of_seed:
                write_report(context)
        if not steps:
            write_report(context)
    except StepFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        if complete_seeds(steps, args.seeds):
            write_report(context)  # what finished is kept and reported
        return 1
    return 0


def complete_seeds(steps, seeds):
    """The seeds whose every step (stage 1, the arms, the evaluations) has finished."""
    return [s for s in seeds if all(os.path.exists(os.path.join(folder, DONE))
                                    for _, label, folder, _ in steps if label.startswith(f"seed {s} "))]


def recorded_wall(steps, seeds):
    """Seconds of every finished step that the report of ``seeds`` rests on (the shared steps and
    those seeds'), from their study_done.json: the same in a --report_only run as in the run itself."""
    total = 0.0
    for _, label, folder, _ in steps:
        done = os.path.join(folder, DONE)
        if os.path.exists(done) and (not label.startswith("seed ") or any(label.startswith(f"seed {s} ") for s in seeds)):
            with open(done) as f:
                total += step_wall(folder, json.load(f)["wall_s"])
    return total


def publish_evaluation(folder, dest, out, test_name):
    """One finished evaluation's metrics and replies, published at once (research/study/published.py),
    so that a study run one seed (or one arm) at a time can be committed as it goes and its report
    rebuilt on another machine."""
    found = report.newest(folder, f"*{test_name}.results.jsonl")
    metrics = report.newest(folder, f"*{test_name}.metrics.json")
    if not found or not metrics:
        return
    seed = int(os.path.relpath(os.path.dirname(folder), out).split(os.sep)[0].removeprefix("seed"))
    gens, _ = read_results(found)
    report.make_relative(published.publish_evaluation(folder, gens, metrics, dest, seed))


def carried_wall(c, seeds):
    """Seconds of the published seeds reported here, as their report recorded them: per seed where it
    did; a report from before that (seeds 0 and 1 of the CPU study) recorded only its total, which
    also holds the shared steps (the index) that a run here counts again."""
    carried = [s for s in seeds if s in c["carried"]]
    previous = c["previous"] or {}
    if not carried:
        return 0.0
    by_seed = previous.get("wall_s_by_seed") or {}
    if all(by_seed.get(str(s)) is not None for s in carried):
        return sum(by_seed[str(s)] for s in carried)
    return float(previous.get("wall_s") or 0.0)


def write_report(c):
    """RESULTS.md, results.json, timings.json and figures/ of the seeds complete so far (published
    with --publish); False when no seed is complete yet."""
    args, out = c["args"], c["out"]
    here = complete_seeds(c["steps"], [s for s in args.seeds if s not in c["carried"]])
    seeds = [s for s in args.seeds if s in here or s in c["carried"]]
    if not seeds:
        print("no seed has finished yet: nothing to report", file=sys.stderr)
        return False
    rows = report.collect_rows(out, args.arms, seeds, c["test"], os.path.splitext(os.path.basename(c["paths"]["test"]))[0],
                               c["dest"], c["previous"])
    results = report.results_json(rows, c["baselines"], args.arms, seeds, c["test"])
    wall = time.time() - c["t_start"]
    ctx = {"sizes": c["sizes"], "scale": args.scale, "split": split.describe(c["manifest"]), "manifest": c["manifest"],
           "seeds": seeds, "seeds_requested": args.seeds, "arms": args.arms, "machine": report.machine(),
           "wall_s": wall, "steps_s": recorded_wall(c["steps"], here) + carried_wall(c, seeds), "timings": c["timings"],
           "dest": c["dest"],
           "command": shlex.join(["python", "research/study/run.py",  # the run's command, also when --report_only wrote it
                                   *[report.relative(a) for a in c["argv"] if a != "--report_only"]]),
           "out": out, "finished": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "paths": c["paths"]}
    results.update({"sizes": c["sizes"], "split": report.relative_manifest(c["manifest"]), "machine": ctx["machine"],
                    "wall_s": round(ctx["steps_s"], 1), "command": ctx["command"], "finished": ctx["finished"],
                    "seeds_complete": seeds, "seeds_requested": list(args.seeds),
                    "wall_s_by_seed": {str(s): round(recorded_wall([st for st in c["steps"] if st[1].startswith(f"seed {s} ")],
                                                                   [s]), 1) if s in here
                                       else ((c["previous"] or {}).get("wall_s_by_seed") or {}).get(str(s))
                                       for s in seeds}})
    previous, gone = c["previous"] or {}, [s for s in seeds if s in c["carried"]]
    for block, name in (("arms", "vs_control"), ("ablations", "retrieved_vs_random")):
        for key, entry in results[block].items():  # example-level intervals of seeds whose replies are gone
            earlier = published.earlier_intervals((previous.get(block) or {}).get(key), name,
                                                  previous.get("seeds_complete"), gone)
            if earlier and f"ci_{name}" in entry and not set(earlier["seeds"]) & set(entry[f"ci_seeds_{name}"]):
                entry[f"earlier_ci_{name}"] = earlier
    ctx["figures"] = report.write_figures(rows, results, ctx)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "timings.json"), "w") as f:
        json.dump(c["timings"], f, indent=1)
    results_md = os.path.join(out, "RESULTS.md")
    with open(results_md, "w") as f:
        f.write(report.render(results, rows, ctx))
    print(f"wrote {results_md} and results.json: {len(seeds)} of {len(args.seeds)} seeds complete "
          f"({wall / 60:.1f} min)", flush=True)
    if args.publish:
        report.publish(out, os.path.abspath(args.publish), ctx["figures"])
        print(f"copied RESULTS.md, results.json and figures/ to {args.publish}", flush=True)
    return True


if __name__ == "__main__":
    sys.exit(exits.run(main))
