"""A setting chosen on dev, read once on test: a tune.py run evaluated with the study's own test
command for its arm, paired against the study's evaluations of the same seed.

    python research/study/tuned_test.py --seed 2 --run "grpo,length_penalty_short_factor=1,reward_repetition_penalty=4" \
        [--publish results/study/tuned] [run.py's options: --data_dir --scale --out ...]

The run is OUT/tuning/seedS/RUN (research/study/tune.py); its arm is the name's first part. The
command is the study's evaluation of that arm with the retrieved story (research/study/plan.py) with
``--model_path`` and ``--checkpoint_dir`` replaced; a finished evaluation is skipped on a re-run.
Paired bootstrap 95 % intervals (F1, ROUGE-L, the study's reward: report.per_example; loop3) of the
run against the seed's control and its arm, from their study evaluations (which must exist: run
research/study/run.py for the seed first). Published to PUBLISH/seedS/RUN-test.metrics.json and
RUN-intervals-test.json; a table is printed.
"""

import argparse
import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from research.study import plan as study_plan  # noqa: E402
from research.study import report  # noqa: E402
from research.study import run as study_run  # noqa: E402
from src.evaluation.metrics import has_phrase_loop  # noqa: E402
from src.infra import exits  # noqa: E402
from src.infra.errors import UsageError  # noqa: E402


# what the run is compared on: the study's interval keys, and the share of replies that loop a phrase
KEYS = (*report.CI_KEYS, "loop3")


def scores(eval_dir, test_name):
    """Per-example F1, ROUGE-L, reward (the study's) and loop3 (x100) of one evaluation, and its summary."""
    gens, refs, _ = report.read_eval(eval_dir, test_name)
    per = report.per_example(gens, refs)
    per["loop3"] = [100.0 * has_phrase_loop(g) for g in gens]
    summary = {k: round(sum(per[k]) / len(per[k]), 4) for k in KEYS}
    summary["length_ratio"] = round(sum(len(g.split()) for g in gens) / max(sum(len(r.split()) for r in refs), 1), 3)
    return per, summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="the training seed of the tune.py run")
    p.add_argument("--run", required=True, help="the tune.py run's name, e.g. grpo,lr=3e-5")
    p.add_argument("--publish", default=os.path.join(ROOT, "results", "study", "tuned"))
    args, study_argv = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    study = study_run.parse_args([*study_argv, "--seeds", str(args.seed), "--dry_run"])
    out, sizes, _, paths = study_run.prepare(study)
    arm = args.run.split(",")[0]
    if arm not in study_plan.ARMS:
        raise UsageError(f"--run {args.run!r}: its arm {arm!r} is none of the study's ({', '.join(study_plan.ARMS)})")
    seed = f"seed{args.seed}"
    model = os.path.join(out, "tuning", seed, args.run, "checkpoint", "latest")
    if not os.path.exists(model):
        raise UsageError(f"no {report.relative(model)}: run research/study/tune.py --seed {args.seed} --arm {arm} "
                         "with the run's settings first")
    arms = ["control"] if arm == "control" else ["control", arm]
    steps = study_plan.plan(arms, [args.seed], paths, sizes, out, index_saved=True)
    evals = {label: (folder, cmd) for _, label, folder, cmd in steps}
    study_evals = {a: evals[f"seed {args.seed} eval {a} (retrieval)"][0] for a in arms}
    for a, folder in study_evals.items():
        if not os.path.exists(os.path.join(folder, "study_done.json")):
            raise UsageError(f"{seed}'s study evaluation of {a} is not done ({report.relative(folder)}): run "
                             f"research/study/run.py with {args.seed} among its --seeds first")
    folder = os.path.join(out, "tuned_test", seed, args.run)
    cmd = study_plan.with_flags(evals[f"seed {args.seed} eval {arm} (retrieval)"][1], model_path=model, checkpoint_dir=folder)
    study_run.run_step(f"{seed} {args.run} (test)", folder, cmd, os.path.join(out, "tuned_test", "commands.sh"))
    test_name = os.path.splitext(os.path.basename(paths["test"]))[0]
    per, summary = {}, {}
    for name, d in ((args.run, folder), *study_evals.items()):
        per[name], summary[name] = scores(d, test_name)
    found = {"run": args.run, "seed": args.seed, "per_run": summary,
             "intervals": report.paired_intervals(per, [(f"{args.run} − {a}", args.run, a) for a in study_evals], KEYS)}
    published = os.path.join(args.publish, seed)
    os.makedirs(published, exist_ok=True)
    target = os.path.join(published, f"{args.run}-test.metrics.json")
    shutil.copy(report.newest(folder, "*.metrics.json"), target)
    report.make_relative(target)
    with open(os.path.join(published, f"{args.run}-intervals-test.json"), "w") as f:
        json.dump(found, f, indent=1)
    print(report.paired_table(found["intervals"], KEYS))
    return 0


if __name__ == "__main__":
    sys.exit(exits.run(main))
