"""Stage-2 settings chosen on dev: one arm of the study, from the study's own stage-1 checkpoint,
with some of its recipe's settings changed, scored by its in-loop evaluations on the dev split.
The test split is never read here.

    python research/study/tune.py --arm grpo [--set lr=3e-5 grpo_kl_coeff=0.1] [--seed 0]
        [--record results/study/tuning] [the study's options: --data_dir --scale --out, size flags]

It works in the study's folder (--out, default runs/study): the split, the models and seed S's
stage 1 are the study's steps, run here when not yet done and reused by research/study/run.py
later (and the other way round). The arm trains with exactly the study's command for it plus
``--set``'s flags (``key=value`` -> ``--key=value``; steps, batch, data and models cannot be set)
into ``OUT/tuning/seedS/ARM[,key=value...]`` (a run the study would make, with its recipe as it
stands plus the settings chosen, is reused by it: research/study/run.py links it). Its dev curve
goes to ``RECORD/tuning.json`` (one entry per run, replaced when the same run is recorded again)
and the table ``RECORD/TUNING.md`` is rewritten: per run the dev metrics at its last evaluation
and the steps of its curve.
"""

import argparse
import json
import os
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from research.study import plan as study_plan  # noqa: E402
from research.study import report, run  # noqa: E402
from research.study.reader_selection import dev_evaluations  # noqa: E402
from src.cli import options  # noqa: E402
from src.infra import exits  # noqa: E402
from src.infra.errors import UsageError  # noqa: E402

# The columns of TUNING.md: dev metrics of the in-loop evaluation (train.py's names); dist1 is the
# study's collapse flag (below half the control's).
COLUMNS = ("f1", "rougeL", "dist1", "dist2", "ppl", "reward", "generic", "repeat3", "loop3", "length_ratio")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Every other option is the study's (python research/study/run.py --help).")
    p.add_argument("--arm", required=True, choices=sorted(study_plan.ARMS), help="the arm whose settings are tried")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="train.py options that replace the recipe's (e.g. lr=3e-5 grpo_kl_coeff=0.1)")
    p.add_argument("--seed", type=int, default=0, help="the training seed (its stage 1 is the study's)")
    p.add_argument("--record", help="folder for tuning.json and TUNING.md (e.g. results/study/tuning)")
    args, rest = p.parse_known_args(argv)
    study = run.parse_args(rest)
    return args, study


def set_flags(pairs):
    """['lr=3e-5', ...] -> ['--lr=3e-5', ...]; a setting the study shares between arms is refused."""
    flags = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise UsageError(f"--set {pair!r}: expected KEY=VALUE, e.g. lr=3e-5")
        if f"--{key}" in study_plan.SHARED:
            raise UsageError(f"--set {key}: steps, batch, data and models are the study's, the same for every arm "
                             "— change the size flags (e.g. --s2_steps) instead")
        flags.append(f"--{key}={value}")
    return flags


def run_name(arm, pairs):
    """The run's folder name: the arm and its settings, sorted (the same settings, the same run)."""
    return ",".join([arm, *sorted(p.strip().lstrip("-") for p in pairs)])


def dev_curve(run_dir):
    """[{step, metric: value}] of the run's in-loop dev evaluations, in step order (the columns only)."""
    return [{"step": step, **{k: m[k] for k in COLUMNS if k in m}} for step, m in dev_evaluations(run_dir)]


def record(record_dir, entry):
    """Add (or replace: the same name on the same seed) one run in RECORD/tuning.json and rewrite
    RECORD/TUNING.md."""
    os.makedirs(record_dir, exist_ok=True)
    path = os.path.join(record_dir, "tuning.json")
    runs = json.load(open(path)) if os.path.exists(path) else []
    runs = [r for r in runs if (r["name"], r["seed"]) != (entry["name"], entry["seed"])] + [entry]
    with open(path, "w") as f:
        json.dump(runs, f, indent=1)
    with open(os.path.join(record_dir, "TUNING.md"), "w") as f:
        f.write(render(runs))
    return runs


def render(runs):
    head = ["run", "seed", "steps", *COLUMNS, "wall (min)"]
    lines = ["# Stage-2 settings tried on dev", "",
             "Written by `research/study/tune.py`: each run is one arm of the study from its stage-1 checkpoint "
             "with the settings named, scored by its last in-loop evaluation on the dev split (never test). "
             "Curves: `tuning.json`.", "",
             "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in runs:
        last = r["curve"][-1]
        cells = [f"`{r['name']}`", str(r["seed"]), str(last.get("step", "–"))]
        cells += [f"{last[k]:.2f}" if isinstance(last.get(k), (int, float)) else "–" for k in COLUMNS]
        cells.append(f"{r['wall_s'] / 60:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Commands:", "", "```bash", *[r["command"] for r in runs], "```", ""]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args, study = parse_args(argv)
    extra = set_flags(args.set)
    out, sizes, _, paths = run.prepare(study)
    if not sizes["eval_freq"]:
        raise UsageError(f"--scale {study.scale}: the arms run no in-loop evaluation (eval_freq 0), so there is "
                         "nothing to score on dev — pass --eval_freq N")
    commands = os.path.join(out, "commands.sh")
    # the study's own steps up to this seed's stage 1: the same folders, so run.py reuses them
    steps = study_plan.plan([study_plan.CONTROL], [args.seed], paths, sizes, out, run.index_saved(paths))
    ahead = [s for s in steps if s[0] == "pretrain" or s[1] == f"seed {args.seed} stage 1"]
    name = run_name(args.arm, args.set)
    run_dir = os.path.join(out, "tuning", f"seed{args.seed}", name)
    stage1_best = os.path.join(ahead[-1][2], "checkpoint", "best")
    cmd = study_plan.arm_command(args.arm, paths, sizes, args.seed, stage1_best, run_dir) + extra
    opts, _ = options.parse([os.path.join(ROOT, c) if c.startswith("configs/") else c for c in cmd[1:]])
    options.validate(opts)  # a misspelt or impossible setting fails here, before stage 1 runs
    try:
        run.build_models(out, sizes, [paths["train"], paths["stories"]], commands)
        for _, label, folder, step in ahead:
            run.run_step(label, folder, step, commands)
        info = run.run_step(f"seed {args.seed} {name} (dev)", run_dir, cmd, commands)
    except run.StepFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    curve = dev_curve(run_dir)
    entry = {"name": name, "arm": args.arm, "set": sorted(args.set), "seed": args.seed, "wall_s": round(info["wall_s"], 1),
             "curve": curve, "command": shlex.join(["python", "research/study/tune.py", *[report.relative(a) for a in argv]])}
    if args.record:
        record(args.record, entry)
    print(json.dumps({"name": name, "dev": curve[-1]}))
    return 0


if __name__ == "__main__":
    sys.exit(exits.run(main))
