"""Can a reader of this shape learn to copy a word from its input, and at which learning rate?

    python research/probes/copy_lookup.py --reader runs/quickstart-seed0/models/reader --lr 5e-4 --batch 64 --steps 1000

Joint GRPO can only teach the retriever which story is relevant if the reader's reply depends on
the story's *facts* (a quickstart reader without the copy head reads the topic, never the fact). Copying a
fact is a key-value lookup through cross-attention: find the key ("named") in the encoder input
and emit the token after it. This diagnostic trains a fresh copy of ``--reader`` (a
build_small_models.py folder; its random initialization, re-seeded by ``--seed``) on that lookup
alone, with no language to learn: the input is ``find KEY: w1 … KEY wk …`` (six random vocabulary
words with KEY inserted at a random place), the target the word after KEY. Held-out exact-match
accuracy is printed every ``--eval_every`` steps; chance is 1/800 (and 1/6 for a model that
learned "one of the input words" but not which).

Measured on the quickstart's 1.3M-parameter reader shape (128 wide, 2+2 layers, batch 64): at lr
5e-4 the lookup forms abruptly and reaches 1.00 by step 800 (seeds 0, 2) or 1,250 (seed 1); at
1e-3 and at 2e-3, the quickstart's stage-1 peak rate, it stays at 0.00 through 1,000 steps. The
last stdout line is one JSON object.
"""

import argparse
import json
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from transformers import T5ForConditionalGeneration  # noqa: E402

from src.infra import exits  # noqa: E402
from src.infra.errors import flag_error  # noqa: E402
from src.model.reader import FiDReader, dropout_disabled  # noqa: E402

KEYS = ("named", "called", "at")


def lookup_words(tokenizer, n=800):
    """The first ``n`` whole, alphabetic, 4+ letter words of the reader's vocabulary (in id order)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    words = [w for w, _ in vocab if w.isalpha() and len(w) > 3 and w not in KEYS][:n]
    if len(words) < 7:
        raise flag_error("--reader", f"its vocabulary has only {len(words)} whole 4+ letter words",
                         "use a reader whose tokenizer covers ordinary words (build_small_models.py)")
    return words


def lookup_example(words, rng, n_words=6):
    """(encoder text, target word): the word that follows KEY in the text."""
    chosen = rng.sample(words, n_words)
    key = rng.choice(KEYS)
    at = rng.randrange(n_words)
    chosen.insert(at, key)
    return f"find {key}: {' '.join(chosen)}", chosen[at + 1]


def accuracy(reader, examples):
    with torch.no_grad(), dropout_disabled(reader):
        ids, mask = reader.tokenize_inputs([[text] for text, _ in examples], 32)
        replies = reader.generate_text(ids, mask, max_length=6)
    return sum(r.strip() == target for r, (_, target) in zip(replies, examples)) / len(examples)


def run(args):
    torch.manual_seed(args.seed)
    loaded = FiDReader.from_pretrained(args.reader)
    # A fresh initialization of the same shape (and dropout): what training can reach from scratch.
    reader = FiDReader(T5ForConditionalGeneration(loaded.model.config), loaded.tokenizer)
    words = lookup_words(reader.tokenizer, args.vocab)
    held_out = [lookup_example(words, random.Random(10_000 + args.seed)) for _ in range(args.eval_examples)]
    rng = random.Random(args.seed)
    optim = torch.optim.AdamW(reader.parameters(), lr=args.lr)
    curve, t0 = [], time.time()
    for step in range(1, args.steps + 1):
        batch = [lookup_example(words, rng) for _ in range(args.batch)]
        ids, mask = reader.tokenize_inputs([[text] for text, _ in batch], 32)
        labels = reader.tokenize_targets([target for _, target in batch], 8)
        loss = reader(ids, mask, labels)
        optim.zero_grad()
        loss.backward()
        optim.step()
        if step % args.eval_every == 0 or step == args.steps:
            curve.append({"step": step, "loss": round(loss.item(), 4), "accuracy": accuracy(reader, held_out),
                          "seconds": round(time.time() - t0, 1)})
            print(json.dumps(curve[-1]), flush=True)
    return {"lr": args.lr, "batch": args.batch, "steps": args.steps, "seed": args.seed,
            "final_accuracy": curve[-1]["accuracy"], "curve": curve}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reader", required=True, help="a reader folder of scripts/build_small_models.py (its shape)")
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (constant)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="initialization and data seed")
    p.add_argument("--vocab", type=int, default=800, help="how many vocabulary words the lookup draws from")
    p.add_argument("--eval_every", type=int, default=200)
    p.add_argument("--eval_examples", type=int, default=100)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not os.path.isfile(os.path.join(args.reader, "config.json")):
        raise flag_error("--reader", f"{args.reader} has no config.json",
                         "pass the reader/ folder written by scripts/build_small_models.py")
    if args.steps < 1 or args.batch < 1 or args.eval_every < 1:
        raise flag_error("--steps/--batch/--eval_every", "must be >= 1", "pass e.g. --steps 1000 --batch 64")
    print(json.dumps(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(exits.run(main))
