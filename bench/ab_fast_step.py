"""A/B timing of the fast joint GRPO step at two checkouts, interleaved to cancel machine drift.

bench/grpo_step.py measures fast and naive side by side in one process; this compares the *fast*
step of two versions of the code (e.g. main against an older commit in a git worktree), which a
regression check such as "no slowdown beyond 5%" needs. Each round runs one subprocess per
checkout, alternating which goes first, each with the same shapes, seed and thread count; the
table gives every round and the ratio of the means.

    git worktree add ../base e70a550
    OMP_NUM_THREADS=2 .venv/bin/python bench/ab_fast_step.py . ../base --rounds 4 --json

Both checkouts must have bench/grpo_step.py with ``bench_options``, ``make_batches`` and
``run_side`` (every commit since the benchmark's first version).
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from src.infra import exits  # noqa: E402
from src.infra.errors import flag_error  # noqa: E402

# Run inside the checkout being timed, so its own src/ and bench/ are imported.
CHILD = """
import json, sys, tempfile, torch  # noqa: E402
sys.path.insert(0, '.')
from bench import grpo_step as g  # noqa: E402
steps, warmup, shape = int(sys.argv[1]), int(sys.argv[2]), [int(x) for x in sys.argv[3:8]]
with tempfile.TemporaryDirectory() as tmp:
    models = g.resolve_models(sys.argv[8] if len(sys.argv) > 8 else None, tmp)
    opts = g.bench_options(models, *shape)
    batches, _, _ = g.make_batches(models, opts, torch.device('cpu'), warmup + steps + 1, 0)
    _, fast, _ = g.run_side(models, opts, batches, torch.device('cpu'), False, warmup, steps, 0)
print(json.dumps({k: v for k, v in fast.items() if k.startswith('time/')}))
"""


def time_checkout(root, args):
    cmd = [sys.executable, "-c", CHILD, str(args.steps), str(args.warmup),
           str(args.batch), str(args.G), str(args.k), str(args.M), str(args.gen_len)]
    if args.models:
        cmd.append(os.path.abspath(args.models))
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"timing {root} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(a_root, b_root, args):
    """{"rounds": [{"a": s, "b": s}], "a_mean", "b_mean", "a_over_b"} of the fast step time."""
    rounds = []
    for r in range(args.rounds):
        order = [("a", a_root), ("b", b_root)] if r % 2 == 0 else [("b", b_root), ("a", a_root)]
        times = {name: time_checkout(root, args) for name, root in order}
        rounds.append({"a": times["a"]["time/step"], "b": times["b"]["time/step"],
                       "a_sampling": times["a"].get("time/sampling"), "b_sampling": times["b"].get("time/sampling")})
        print(f"round {r + 1}: a {rounds[-1]['a']:.3f} s  b {rounds[-1]['b']:.3f} s", flush=True)
    a_mean = sum(x["a"] for x in rounds) / len(rounds)
    b_mean = sum(x["b"] for x in rounds) / len(rounds)
    return {"rounds": rounds, "a_mean": a_mean, "b_mean": b_mean, "a_over_b": a_mean / b_mean}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="checkout A (e.g. .)")
    p.add_argument("b", help="checkout B (e.g. a git worktree of the baseline commit)")
    p.add_argument("--models", default=None,
                   help="models folder of scripts/build_small_models.py (default: build the bench's own)")
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds (one run of each per round)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--G", type=int, default=4)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--M", type=int, default=8)
    p.add_argument("--gen_len", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print one line of JSON as the last line of stdout")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    for flag, root in (("a", args.a), ("b", args.b)):
        if not os.path.isfile(os.path.join(root, "bench", "grpo_step.py")):
            raise flag_error(flag, f"{root} has no bench/grpo_step.py",
                             "pass a checkout of this repository (git worktree add DIR COMMIT)")
    if args.rounds < 1 or args.steps < 1 or args.warmup < 0:
        raise flag_error("--rounds/--steps/--warmup", "need rounds >= 1, steps >= 1, warmup >= 0",
                         "pass e.g. --rounds 4 --steps 6 --warmup 3")
    out = compare(os.path.abspath(args.a), os.path.abspath(args.b), args)
    print("| round | A s | B s |\n|---|---:|---:|")
    for i, r in enumerate(out["rounds"], 1):
        print(f"| {i} | {r['a']:.3f} | {r['b']:.3f} |")
    print(f"| mean | {out['a_mean']:.3f} | {out['b_mean']:.3f} |")
    print(f"A / B fast step time: {out['a_over_b']:.3f} ({(out['a_over_b'] - 1) * 100:+.1f}%)")
    if args.json:
        print(json.dumps({"a": os.path.abspath(args.a), "b": os.path.abspath(args.b), **out}))
    return 0


if __name__ == "__main__":
    sys.exit(exits.run(main))
