"""Write a training file with the other speaker's turns added as targets (src/data/partner_turns.py).

    python scripts/add_partner_turns.py --train data/convai2/train.jsonl \
        --exclude data/convai2/valid.jsonl data/convai2/test.jsonl --out runs/data/train_both.jsonl

OUT holds every example of --train, then each distinct turn of the other speaker given the turns
before it (no persona), leaving out any whose reply equals a reply of an --exclude file. The last
stdout line is one JSON object: {"train", "added", "dropped_equal_to_eval", "out"}.
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from src.data.dialogues import load_dialogues  # noqa: E402
from src.data.partner_turns import partner_turn_examples  # noqa: E402
from src.infra import exits  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", nargs="+", required=True, help="training dialogue jsonl file(s): the turns come from these")
    p.add_argument("--exclude", nargs="*", default=[],
                   help="evaluation dialogue files: no added reply may equal one of their replies")
    p.add_argument("--out", required=True, help="the training file to write (the original examples first)")
    a = p.parse_args(argv)
    train = [ex for path in a.train for ex in load_dialogues(path)]
    excluded = [r for path in a.exclude for ex in load_dialogues(path) for r in ex["answers"]]
    added, stats = partner_turn_examples(train, excluded)
    lines = [json.dumps({k: v for k, v in ex.items() if k != "_line"}) for ex in train + added]
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out + ".tmp", "w") as f:  # a crash never leaves a half-written training file
        f.write("\n".join(lines) + "\n")
    os.replace(a.out + ".tmp", a.out)
    print(json.dumps({**stats, "out": a.out}))
    return 0


if __name__ == "__main__":
    sys.exit(exits.run(main))
