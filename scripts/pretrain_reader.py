"""Pretrain a small reader on raw text before stage 1: T5's span corruption (and a prefix LM).

    python scripts/pretrain_reader.py --reader runs/models/reader --out runs/pretrained \
        --dialogues data/convai2/train.jsonl --stories data/corpora/story/story.jsonl \
        [--steps 1200] [--batch 64] [--lr 1e-3] [--objective mix] [--eval_every 200]

A reader trained from scratch on a few thousand dialogues cannot talk (the study's stage 1 without
this wrote "i'm a a a ..."); T5 itself is pretrained by span corruption first. This does that on
the text at hand: every dialogue example (persona, context, reply) and every story
(src/data/denoising.py). A held-out share of the texts (``--heldout``, the same texts and pairs
for every seed) gives the held-out loss every ``--eval_every`` steps; ``OUT/reader/`` is the reader
with the lowest one (an HF folder: pass it as ``--reader_model_type``), rewritten atomically at
each improvement. ``OUT/pretrain_log.jsonl`` holds the curve; the last stdout line is one JSON
object {"initial_heldout_loss", "best_heldout_loss", "best_step", "steps", "seconds"}. A rerun
into a folder with a finished ``summary.json`` does nothing (delete the folder to redo it).
"""

import argparse
import json
import os
import random
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from src.data.denoising import OBJECTIVES, denoising_pair, pretraining_texts  # noqa: E402
from src.infra import exits  # noqa: E402
from src.infra.errors import flag_error  # noqa: E402
from src.model.reader import FiDReader, dropout_disabled  # noqa: E402
from src.run.optim import lr_multiplier  # noqa: E402

HELDOUT_SEED = 12345  # the held-out texts and pairs do not depend on --seed


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--reader", required=True, help="reader folder to start from (scripts/build_small_models.py)")
    p.add_argument("--out", required=True, help="output folder: reader/, pretrain_log.jsonl, summary.json")
    p.add_argument("--dialogues", nargs="*", default=[], help="dialogue jsonl files (their training split only)")
    p.add_argument("--stories", nargs="*", default=[], help="story corpus jsonl files")
    p.add_argument("--steps", type=int, default=1200, help="optimizer steps")
    p.add_argument("--batch", type=int, default=64, help="pairs per step")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (linear warmup, then linear decay)")
    p.add_argument("--warmup", type=int, default=100, help="warmup steps")
    p.add_argument("--objective", choices=OBJECTIVES, default="mix",
                   help="span corruption, prefix LM, or each pair either with equal probability")
    p.add_argument("--window", type=int, default=40, help="words of a text per pair (a random window)")
    p.add_argument("--input_maxlength", type=int, default=80, help="input tokens")
    p.add_argument("--target_maxlength", type=int, default=32, help="target tokens")
    p.add_argument("--eval_every", type=int, default=200, help="held-out loss every N steps")
    p.add_argument("--heldout", type=float, default=0.02, help="share of the texts held out (at most 512 pairs)")
    p.add_argument("--dropout", type=float, default=0.1, help="reader dropout during pretraining")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: autocast the forward (CPUs with AMX/AVX512-BF16 and GPUs run it faster)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if not (a.dialogues or a.stories):
        raise flag_error("--dialogues/--stories", "no text to pretrain on", "pass dialogue and/or story jsonl files")
    for name in ("steps", "batch", "eval_every", "window", "input_maxlength", "target_maxlength"):
        if getattr(a, name) < 1:
            raise flag_error(f"--{name}", f"must be >= 1, got {getattr(a, name)}", "pass a positive integer")
    if not 0 < a.heldout < 0.5:
        raise flag_error("--heldout", f"must be in (0, 0.5), got {a.heldout}", "pass e.g. 0.02")
    return a


def autocast(a):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device, dtype=torch.bfloat16, enabled=a.precision == "bf16")


def tensors(reader, pairs, a):
    ids, mask = reader.tokenize_inputs([[source] for source, _ in pairs], a.input_maxlength)
    return ids, mask, reader.tokenize_targets([target for _, target in pairs], a.target_maxlength)


@torch.no_grad()
def heldout_loss(reader, pairs, a):
    """Mean token NLL of the held-out targets (dropout off)."""
    total = count = 0.0
    with dropout_disabled(reader):
        for start in range(0, len(pairs), 64):
            with autocast(a):
                nll, valid = reader.label_nll(*tensors(reader, pairs[start:start + 64], a))
            total, count = total + nll.sum().item(), count + valid.sum().item()
    return total / count


def save_reader(reader, folder):
    """Replace ``folder`` by the reader's files without ever leaving a half-written one."""
    tmp, old = folder + ".tmp", folder + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    reader.save_pretrained(tmp)
    if os.path.isdir(folder):
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    summary_path = os.path.join(a.out, "summary.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            print(f"{a.out} is already pretrained (delete the folder to redo it)\n{f.read().strip()}")
        return 0
    random.seed(a.seed)
    torch.manual_seed(a.seed)
    texts = pretraining_texts(a.dialogues, a.stories)
    order = list(range(len(texts)))
    random.Random(HELDOUT_SEED).shuffle(order)
    n_held = max(1, round(a.heldout * len(texts)))
    held = [texts[i] for i in order[:n_held]]
    train = [texts[i] for i in order[n_held:]]
    if not train:
        raise flag_error("--dialogues/--stories", f"only {len(texts)} texts: nothing left after the held-out share",
                         "pass more text or a smaller --heldout")
    pair_rng = random.Random(HELDOUT_SEED)
    held_pairs = [denoising_pair(t, pair_rng, a.objective, a.window) for t in held[:512]]
    reader = FiDReader.from_pretrained(a.reader, dropout=a.dropout).to("cuda" if torch.cuda.is_available() else "cpu")
    opt = torch.optim.AdamW(reader.parameters(), lr=a.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, a.warmup, a.steps, "linear"))
    os.makedirs(a.out, exist_ok=True)
    t0, rng = time.time(), random.Random(a.seed)
    first = best = heldout_loss(reader, held_pairs, a)
    best_step, window_loss, window_steps = 0, 0.0, 0
    save_reader(reader, os.path.join(a.out, "reader"))
    with open(os.path.join(a.out, "pretrain_log.jsonl"), "w") as log:
        log.write(json.dumps({"step": 0, "heldout_loss": first}) + "\n")
        reader.train()
        for step in tqdm(range(1, a.steps + 1), desc="pretraining", disable=not sys.stderr.isatty()):
            pairs = [denoising_pair(rng.choice(train), rng, a.objective, a.window) for _ in range(a.batch)]
            with autocast(a):
                loss = reader(*tensors(reader, pairs, a))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(reader.parameters(), 1.0)
            opt.step()
            sched.step()
            window_loss, window_steps = window_loss + loss.item(), window_steps + 1
            if step % a.eval_every == 0 or step == a.steps:
                held_now = heldout_loss(reader, held_pairs, a)
                row = {"step": step, "train_loss": window_loss / window_steps, "heldout_loss": held_now,
                       "seconds": round(time.time() - t0, 1)}
                window_loss, window_steps = 0.0, 0
                log.write(json.dumps(row) + "\n")
                log.flush()
                print(f"step {step}/{a.steps} | train loss {row['train_loss']:.3f} | held-out loss {held_now:.3f}",
                      flush=True)
                if held_now < best:
                    best, best_step = held_now, step
                    save_reader(reader, os.path.join(a.out, "reader"))
    summary = {"initial_heldout_loss": first, "best_heldout_loss": best, "best_step": best_step, "steps": a.steps,
               "seconds": round(time.time() - t0, 1), "texts": len(train), "heldout_texts": len(held)}
    with open(summary_path, "w") as f:
        json.dump(summary, f)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(exits.run(main))
