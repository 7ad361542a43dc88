"""How fast can the retriever learn, given a perfect story reward? An upper bound for stage 2.

    python research/probes/retriever_oracle.py [--retriever DIR] [--batch 16] [--steps 100] [--lr 1e-4]
                                       [--temperature 0.1] [--pool 16] [--objective pool|supervised]

Joint GRPO's retriever objective (the pool estimator, src/objectives/retriever_losses.py:pool_policy_loss) is trained on
the sample data's train queries with the *oracle* reward R(j) = 1 for the query's relevant story
(``story_id``) and 0 for every other pool story, instead of the reward of the reader's reply. Only
the query side trains (the passage embeddings stay those of the start, as with
--query_side_retriever_training). Held-out recall@1/@5 over all stories is printed on the valid
examples (held-out stories, unseen personas) every ``--eval_every`` steps.

The reader's reward can only be worse than the oracle, so a budget (queries × steps, lr,
temperature, pool) in which the oracle does not raise held-out recall cannot work with a reader.
``--objective supervised`` is the in-batch-free ceiling: cross-entropy of the relevant story over
the whole corpus. ``story_id`` is used here as a reward, which no training recipe may do: this is
a diagnostic, not a method. The last stdout line is one JSON object.
"""

import argparse
import copy
import json
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from src.data.dialogues import load_dialogues, load_passages  # noqa: E402
from src.data.prompts import retriever_passage_text, split_persona_context  # noqa: E402
from src.model.build import minilm_path  # noqa: E402
from src.model.reader import dropout_disabled  # noqa: E402
from src.model.retriever import Retriever, retrieval_scores  # noqa: E402
from src.objectives import retriever_losses  # noqa: E402


def recall(retriever, examples, passage_emb, row_of, max_length):
    """(recall@1, recall@5) in % of ``examples`` (those with a story_id) over all stories."""
    queries = [split_persona_context(ex["question"])[0] for ex in examples]
    q = retriever.embed_texts(queries, batch_size=64, max_length=max_length)
    top = retrieval_scores(q, passage_emb).topk(min(5, passage_emb.shape[0]), dim=1).indices
    gold = torch.tensor([row_of[ex["story_id"]] for ex in examples])
    return (100 * (top[:, 0] == gold).float().mean().item(), 100 * (top == gold[:, None]).any(1).float().mean().item())


def run(args):
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    train = [ex for ex in load_dialogues(os.path.join(args.data, "train.jsonl")) if ex.get("story_id")]
    valid = [ex for ex in load_dialogues(os.path.join(args.data, "valid.jsonl")) if ex.get("story_id")]
    stories = load_passages(os.path.join(args.data, "stories.jsonl"))
    row_of = {s["id"]: i for i, s in enumerate(stories)}
    retriever = Retriever.from_pretrained(args.retriever)
    frozen = copy.deepcopy(retriever).eval()
    passages = frozen.embed_texts([retriever_passage_text(s) for s in stories], 64, args.max_length)
    optim = torch.optim.AdamW(retriever.parameters(), lr=args.lr, weight_decay=0.0)
    curve = [{"step": 0, "valid": recall(retriever, valid, passages, row_of, args.max_length)}]
    print(f"step    0  valid recall@1 {curve[0]['valid'][0]:5.1f}  recall@5 {curve[0]['valid'][1]:5.1f}", flush=True)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = rng.sample(train, args.batch)
        enc = retriever.tokenize([split_persona_context(ex["question"])[0] for ex in batch], args.max_length)
        with dropout_disabled(retriever):
            q = retriever(enc["input_ids"], enc["attention_mask"])
        gold = torch.tensor([row_of[ex["story_id"]] for ex in batch])
        if args.objective == "supervised":
            loss = torch.nn.functional.cross_entropy(retrieval_scores(q, passages) / args.temperature, gold)
        else:
            with torch.no_grad():
                pool = retrieval_scores(q, passages).topk(args.pool, dim=1).indices
            logp = torch.log_softmax(retrieval_scores(q, passages[pool]) / args.temperature, -1)
            reward = (pool == gold[:, None]).float()  # the oracle: 1 for the relevant story, when in the pool
            loss, _ = retriever_losses.pool_policy_loss(logp, logp.detach(), None, reward, clip_eps=0.2, kl_coeff=0.0)
        optim.zero_grad()
        loss.backward()
        optim.step()
        if step % args.eval_every == 0 or step == args.steps:
            r1, r5 = recall(retriever, valid, passages, row_of, args.max_length)
            curve.append({"step": step, "valid": (r1, r5)})
            print(f"step {step:4d}  valid recall@1 {r1:5.1f}  recall@5 {r5:5.1f}  ({time.perf_counter() - t0:.0f}s)",
                  flush=True)
    return {"config": {k: v for k, v in vars(args).items()}, "curve": curve,
            "before": curve[0]["valid"], "after": curve[-1]["valid"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.join(ROOT, "data", "sample"), help="folder with train/valid/stories jsonl")
    p.add_argument("--retriever", default=None, help="retriever folder (default: the pretrained all-MiniLM-L6-v2)")
    p.add_argument("--objective", choices=("pool", "supervised"), default="pool",
                   help="pool: joint GRPO's pool estimator with the oracle reward; supervised: corpus-wide CE")
    p.add_argument("--batch", type=int, default=16, help="train queries per step")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate of the query side")
    p.add_argument("--temperature", type=float, default=0.1, help="τ of softmax(q·p/√H / τ)")
    p.add_argument("--pool", type=int, default=16, help="M, stories per query's pool (pool objective)")
    p.add_argument("--max_length", type=int, default=128, help="retriever tokens per query/story")
    p.add_argument("--eval_every", type=int, default=25, help="steps between held-out evaluations")
    p.add_argument("--seed", type=int, default=0, help="seed of the batches")
    args = p.parse_args(argv)
    if args.retriever is None:
        args.retriever = str(minilm_path())
    return args


def main(argv=None):
    result = run(parse_args(argv))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
