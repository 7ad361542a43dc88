"""Does the reader read its input? A dev file whose personas or contexts come from other dialogues.

    python research/reader/shuffle_inputs.py DEV.jsonl --part persona|context|both --out FILE [--seed 0]

The reader's dev loss on the gold replies, given their own persona and context, minus its loss given
another dialogue's, is what the input is worth to it: zero for a reader that ignores its input (a
language model of replies), large for one that answers the last turn in the persona's voice.

``persona``: every dialogue (examples sharing a persona) takes the persona of another dialogue (a
seeded derangement of the distinct personas, so none keeps its own). ``context``: every example
takes the context of an example drawn from another dialogue. ``both``: each example's whole
question is that of an example from another dialogue. The gold replies stay where they are.
"""

import argparse
import json
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from src.data.prompts import join_persona_context, split_persona_context  # noqa: E402

PARTS = ("persona", "context", "both")


def shuffle_inputs(rows, part, seed=0):
    """Copies of ``rows`` (dicts with ``question``) with the ``part`` of each question taken from another
    dialogue (module docstring). ValueError for an unknown part or fewer than two dialogues."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, not {part!r}")
    split = [split_persona_context(r["question"]) for r in rows]
    personas = sorted({p for p, _ in split})
    if len(personas) < 2:
        raise ValueError(f"{len(personas)} distinct persona(s): shuffling needs examples from at least two dialogues")
    rng = random.Random(seed)
    out = []
    if part == "persona":
        order = personas[:]
        rng.shuffle(order)  # each persona gives way to the next one in a random cycle: nobody keeps its own
        other = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}
        for row, (p, c) in zip(rows, split):
            out.append({**row, "question": join_persona_context(other[p], c)})
        return out
    for row, (p, c) in zip(rows, split):
        j = rng.randrange(len(rows))
        while split[j][0] == p:  # another dialogue (terminates: at least two personas)
            j = rng.randrange(len(rows))
        new = rows[j]["question"] if part == "both" else join_persona_context(p, split[j][1])
        out.append({**row, "question": new})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dev", help="a jsonl of examples with question and answers")
    ap.add_argument("--part", choices=PARTS, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rows = [json.loads(line) for line in open(args.dev) if line.strip()]
    try:
        shuffled = shuffle_inputs(rows, args.part, args.seed)
    except ValueError as exc:
        raise SystemExit(f"error: {args.dev}: {exc}")
    with open(args.out, "w") as f:
        for row in shuffled:
            f.write(json.dumps(row) + "\n")
    changed = sum(a["question"] != b["question"] for a, b in zip(rows, shuffled))
    print(f"{args.out}: {len(shuffled)} examples, {changed} questions changed ({args.part} from another dialogue)")


if __name__ == "__main__":
    main()
