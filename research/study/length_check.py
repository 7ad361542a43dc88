"""Is the GRPO arms' F1 gain length? A seed's control decoded to an arm's reply length.

    python research/study/length_check.py dev [--seed 0] [--arm grpo] [--min_lengths 0 8 12 16] [run.py's options]
    python research/study/length_check.py test --min_length 16 [--seed 0] [run.py's options]

run.py's options (--data_dir, --scale, --out, --stories, ...) name the study; its own evaluation
commands for the seed (research/study/plan.py) are run again with another split, folder and
``--generation_min_length``. On dev: the arm, and the control at each minimum length; the length
taken to test is the control's whose dev length ratio is closest to the arm's (results/study/LOG.md).
Metrics in OUT/length_check/seedN/ and, relative, in --publish/seedN (default
results/study/length_check); a table of the seed's published ones is printed. On test, also paired
bootstrap intervals (F1, ROUGE-L, reward) of the matched control against the study's control and
of the arm against the matched control (``intervals-ARM-minN-test.json``). A finished evaluation is
skipped on a re-run.
"""

import argparse
import glob
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
from src.infra import exits  # noqa: E402
from src.infra.errors import UsageError  # noqa: E402


def table(published):
    rows = ["| run | F1 | precision | recall | length | loop3 % | Dist-2 | ROUGE-L |", "|---|" + "---:|" * 7]
    for path in sorted(glob.glob(os.path.join(published, "*.metrics.json"))):
        with open(path) as f:
            m = json.load(f)["metrics"]
        rows.append(f"| {os.path.basename(path).removesuffix('.metrics.json')} | {m['f1']:.2f} | {m['precision']:.2f} | "
                    f"{m['recall']:.2f} | {m['length_ratio']:.2f} | {m['loop3']:.1f} | {m['dist2']:.2f} | {m['rougeL']:.2f} |")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("split", choices=("dev", "test"))
    p.add_argument("--seed", type=int, default=0, help="the training seed whose arms are decoded (its study steps must be done)")
    p.add_argument("--arm", default="grpo", help="the arm whose reply length the control is decoded to")
    p.add_argument("--min_lengths", type=int, nargs="+", default=[0, 8, 12, 16], help="on dev")
    p.add_argument("--min_length", type=int, help="on test: the one chosen on dev")
    p.add_argument("--publish", default=os.path.join(ROOT, "results", "study", "length_check"))
    args, study_argv = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.split == "test" and args.min_length is None:
        p.error("test needs --min_length (the one chosen on dev)")
    study = study_run.parse_args([*study_argv, "--seeds", str(args.seed), "--dry_run"])
    out, sizes, _, paths = study_run.prepare(study)
    steps = study_plan.plan(["control", args.arm], [args.seed], paths, sizes, out, index_saved=True)
    evals = {label: (folder, cmd) for _, label, folder, cmd in steps}
    runs = [(args.arm, 0)] + [("control", n) for n in args.min_lengths] if args.split == "dev" else \
        [("control", args.min_length)]
    seed = f"seed{args.seed}"
    published = os.path.join(args.publish, seed)
    os.makedirs(published, exist_ok=True)
    for arm, n in runs:
        name = f"{arm}-{args.split}" if arm == args.arm else f"control-min{n}-{args.split}"
        folder = os.path.join(out, "length_check", seed, name)
        cmd = study_plan.with_flags(evals[f"seed {args.seed} eval {arm} (retrieval)"][1], eval_data=paths[args.split],
                                    checkpoint_dir=folder, generation_min_length=n)
        ckpt = next(c.split("=", 1)[1] for c in cmd if c.startswith("--model_path="))
        if not os.path.exists(ckpt):
            raise UsageError(f"{seed}'s {arm} arm is not trained yet (no {report.relative(ckpt)}): run "
                             f"research/study/run.py with {args.seed} among its --seeds first")
        study_run.run_step(f"{seed} {name}", folder, cmd, os.path.join(out, "length_check", "commands.sh"))
        metrics = report.newest(folder, "*.metrics.json")
        target = os.path.join(published, f"{name}.metrics.json")
        shutil.copy(metrics, target)
        report.make_relative(target)
    print(table(published))
    if args.split == "test":
        folder = os.path.join(out, "length_check", seed, f"control-min{args.min_length}-test")
        study_evals = {a: evals[f"seed {args.seed} eval {a} (retrieval)"][0] for a in ("control", args.arm)}
        found = intervals(folder, study_evals, os.path.splitext(os.path.basename(paths["test"]))[0],
                          f"control at min length {args.min_length}", args.arm)
        target = os.path.join(published, f"intervals-{args.arm}-min{args.min_length}-test.json")  # per arm: two arms, two files
        with open(target, "w") as f:
            json.dump(found, f, indent=1)
        print("\n" + report.paired_table(found))
    return 0


def intervals(matched_dir, study_evals, test_name, matched, arm):
    """{comparison: {key: [mean, low, high]}}: paired bootstrap 95 % intervals on the test examples
    (F1, ROUGE-L, the reward: the study's definitions, report.per_example) of the length-matched
    control against the study's control, and of the arm against the length-matched control."""
    per = {}
    for name, folder in (("matched", matched_dir), *study_evals.items()):
        gens, refs, _ = report.read_eval(folder, test_name)
        per[name] = report.per_example(gens, refs)
    return report.paired_intervals(per, [(f"{matched} − control", "matched", "control"),
                                         (f"{arm} − {matched}", arm, "matched")])


if __name__ == "__main__":
    sys.exit(exits.run(main))
