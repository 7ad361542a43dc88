"""Does a reader read its story? Greedy reward and F1 on sample-data examples with a relevant story,
fusing (a) that story, (b) a same-topic story holding other facts, (c) a random story.

    python research/probes/reading_probe.py CHECKPOINT [--data data/sample] [--seed 0]

A reader that ignores stories scores alike in (a), (b) and (c); one that reads the topic scores
(a) ≈ (b) > (c); one that copies facts scores (a) > (b) > (c).

``fact_copy_rate`` asks the last question directly: the relevant story's fact word that the reply
needs (src/data/posterior.py:FactSwap's choice) is replaced, in prompt and story, by a random rare corpus
word; the rate is the share of greedy replies that contain the replacement. Only copying gets it.
The last line is one JSON object.
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from src.evaluation.reading import probe  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a step-N folder (with reader/)")
    p.add_argument("--data", default=os.path.join(ROOT, "data", "sample"), help="folder with valid/stories jsonl")
    p.add_argument("--seed", type=int, default=0, help="seed of the same-topic and random story picks")
    p.add_argument("--split", default="valid", help="which {split}.jsonl of --data to probe (train shows memorization)")
    p.add_argument("--max_examples", type=int, default=None, help="probe only the first N examples with a story")
    a = p.parse_args(argv)
    res = probe(a.checkpoint, a.data, a.seed, split=a.split, max_examples=a.max_examples)
    for name in ("relevant", "same_topic", "random"):
        print(f"{name:11s} reward {res[name]['reward']:.3f}  F1 {res[name]['f1']:.2f}")
    print(f"fact copy rate {res.get('fact_copy_rate', float('nan')):.3f} of {res['n_swapped']} swapped facts")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
