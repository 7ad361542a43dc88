"""Does a reader read its story? Greedy reward and F1 on sample-data examples with a relevant story,
fusing (a) that story, (b) a same-topic story holding other facts, (c) a random story (``probe``).

A reader that ignores stories scores alike in (a), (b) and (c); one that reads the topic scores
(a) ≈ (b) > (c); one that copies facts scores (a) > (b) > (c). ``fact_copy_rate`` asks the last
question directly: the relevant story's fact word that the reply needs (src/data/posterior.py:
FactSwap's choice) is replaced, in prompt and story, by a random rare corpus word; the rate is the
share of greedy replies that contain the replacement. Only copying gets it.
``research/probes/reading_probe.py`` is the command line.
"""

import json
import os
import random

import torch

from src.data.dialogues import load_passages
from src.data.posterior import FactSwap, PosteriorStories
from src.data.prompts import encoder_inputs, reader_query
from src.evaluation.metrics import compute_metrics
from src.model.reader import FiDReader, dropout_disabled
from src.objectives.rewards import grpo_reward


def greedy_replies(reader, questions, fused, text_maxlength=192, batch_size=32):
    """Greedy replies to each (question, fused story) pair."""
    texts = [encoder_inputs(reader_query(q), [p], 1) for q, p in zip(questions, fused)]
    replies = []
    with torch.no_grad(), dropout_disabled(reader):
        for i in range(0, len(texts), batch_size):
            ids, mask = reader.tokenize_inputs(texts[i:i + batch_size], text_maxlength)
            replies += reader.generate_text(ids, mask, max_length=32)
    return replies


def fact_copy_rate(reader, rows, gold, stories, dialogues, rng, text_maxlength=192):
    """(share of greedy replies containing the swapped-in word, number of swapped examples): each
    row's relevant story ``gold`` has the fact its reply needs replaced, in prompt and story, by a
    random rare corpus word (src/data/posterior.py:FactSwap); only copying gets it."""
    swap = FactSwap(PosteriorStories(stories), [" ".join([d["question"], *d["answers"]]) for d in dialogues])
    refs = [r["answers"][0] for r in rows]
    swapped = [swap(r["question"], ref, g, rng) for r, ref, g in zip(rows, refs, gold)]
    swapped = [(q, a, p, ref) for (q, a, p), ref in zip(swapped, refs) if a != ref]
    if not swapped:
        return float("nan"), 0
    replies = greedy_replies(reader, [q for q, _, _, _ in swapped], [p for _, _, p, _ in swapped], text_maxlength)
    new = [next(w for w in a.split() if w not in ref.split()) for _, a, _, ref in swapped]
    return sum(w in r.split() for w, r in zip(new, replies)) / len(swapped), len(swapped)


def probe(checkpoint, data_dir, seed=0, text_maxlength=192, batch_size=32, split="valid", max_examples=None):
    reader = FiDReader.from_pretrained(os.path.join(checkpoint, "reader")).eval()
    stories = load_passages(os.path.join(data_dir, "stories.jsonl"))
    by_id = {p["id"]: p for p in stories}
    rows = [json.loads(line) for line in open(os.path.join(data_dir, f"{split}.jsonl"))]
    rows = [r for r in rows if r.get("story_id") in by_id][:max_examples]
    rng = random.Random(seed)
    gold = [by_id[r["story_id"]] for r in rows]
    same = [rng.choice([p for p in stories if p["title"] == g["title"] and p["id"] != g["id"]] or stories)
            for g in gold]
    rand = [stories[rng.randrange(len(stories))] for _ in rows]
    refs = [r["answers"][0] for r in rows]

    def replies_to(questions, fused):
        return greedy_replies(reader, questions, fused, text_maxlength, batch_size)

    out = {}
    for name, fused in (("relevant", gold), ("same_topic", same), ("random", rand)):
        replies = replies_to([r["question"] for r in rows], fused)
        reward = grpo_reward(replies, refs, scale=(0.01, 1.0, 1.0), length_penalty_strength=1.0)["reward"]
        out[name] = {"reward": round(reward.mean().item(), 4), "f1": round(compute_metrics(replies, refs)["f1"], 2)}
    out["n"] = len(rows)
    dialogues = [json.loads(line) for line in open(os.path.join(data_dir, "train.jsonl"))]
    rate, n_swapped = fact_copy_rate(reader, rows, gold, stories, dialogues, rng, text_maxlength)
    if n_swapped:
        out["fact_copy_rate"] = round(rate, 4)
    out["n_swapped"] = n_swapped
    return out
