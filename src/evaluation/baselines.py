"""Replies that need no model: the floor every trained reader must clear on the same split.

- ``best_constant_reply``: the one training reply that, said to every training example, has the
  highest mean F1 (found exactly, over every distinct training reply). The metric rewards generic
  replies: on ConvAI2 this constant beats readers that cannot talk.
- ``nearest_neighbour_replies``: the reply of the training example whose last utterance is most
  similar (TF-IDF cosine) to the test example's.
- ``persona_copy_replies``: the persona sentence sharing the most words with the last utterance.
- ``random_human_replies``: a human reply from another conversation (a random training reply).

Inputs are dialogue examples as ``load_dialogues`` returns them; F1 is ``squad_f1`` (the metric's
own definition), so the constant's training F1 is what ``compute_metrics`` would report for it.
"""

import math
import random
from collections import Counter

import numpy as np

from src.data.prompts import last_utterance, persona_sentences, split_persona_context, strip_speaker
from src.evaluation.metrics import squad_normalize


def best_constant_reply(replies):
    """(reply, its mean F1 in 0-1 against all ``replies``): the constant reply with the highest mean
    F1, among the distinct ``replies`` themselves. Exact: for candidate c and reference r the
    overlap is Σ_w min(c_w, r_w) over c's words, computed against all references at once, and
    F1 = 2·overlap / (|c| + |r|) when the overlap is positive (squad_f1)."""
    tokens = [squad_normalize(strip_speaker(r)).split() for r in replies]
    vocab = {w: i for i, w in enumerate(sorted({w for t in tokens for w in t}))}
    counts = np.zeros((len(vocab), len(tokens)), dtype=np.int16)  # word x reference
    for j, t in enumerate(tokens):
        for w, c in Counter(t).items():
            counts[vocab[w], j] = c
    lengths = np.array([len(t) for t in tokens], dtype=np.float64)
    best, best_f1, seen = None, -1.0, set()
    for reply, t in zip(replies, tokens):
        key = " ".join(t)
        if not t or key in seen:
            continue
        seen.add(key)
        overlap = np.zeros(len(tokens))
        for w, c in Counter(t).items():
            overlap += np.minimum(counts[vocab[w]], c)
        f1 = np.where(overlap > 0, 2 * overlap / (len(t) + lengths), 0.0).mean()
        if f1 > best_f1:
            best, best_f1 = reply, float(f1)
    if best is None:
        raise ValueError("best_constant_reply needs at least one non-empty reply")
    return best, best_f1


def _tfidf(words, idf, unseen):
    tf = Counter(words)
    vec = {w: n * idf.get(w, unseen) for w, n in tf.items()}
    norm = math.sqrt(sum(x * x for x in vec.values())) or 1.0
    return {w: x / norm for w, x in vec.items()}


def nearest_neighbour_replies(train, test):
    """For each test example, the reply of the training example whose last utterance has the
    highest TF-IDF cosine with its own (idf from the training utterances, smoothed: log(N/df) + 1;
    the first training example when nothing overlaps)."""
    docs = [last_utterance(ex["question"]).split() for ex in train]
    df = Counter(w for d in docs for w in set(d))
    idf = {w: math.log(len(docs) / n) + 1 for w, n in df.items()}
    unseen = math.log(len(docs)) + 1
    postings = {}
    for j, d in enumerate(docs):
        for w, x in _tfidf(d, idf, unseen).items():
            postings.setdefault(w, []).append((j, x))
    out = []
    for ex in test:
        score = Counter()
        for w, x in _tfidf(last_utterance(ex["question"]).split(), idf, unseen).items():
            for j, y in postings.get(w, ()):
                score[j] += x * y
        j = max(score.items(), key=lambda kv: (kv[1], -kv[0]))[0] if score else 0
        out.append(train[j]["answers"][0])
    return out


def persona_copy_replies(test):
    """For each test example, its persona sentence sharing the most distinct words with the last
    utterance (words as the F1 sees them: SQuAD-normalized; the first such sentence on ties)."""
    out = []
    for ex in test:
        sentences = persona_sentences(split_persona_context(ex["question"])[0])
        last = set(squad_normalize(last_utterance(ex["question"])).split())
        out.append(max(sentences, key=lambda s: len(set(squad_normalize(s).split()) & last)) if sentences else "")
    return out


def random_human_replies(train, test, seed=0):
    """For each test example, the reply of a random training example (another conversation)."""
    rng = random.Random(seed)
    return [rng.choice(train)["answers"][0] for _ in test]


def baseline_replies(train, test, seed=0):
    """{name: replies for ``test``} of every baseline, and the constant reply itself."""
    constant, _ = best_constant_reply([ex["answers"][0] for ex in train])
    return {"constant": [constant] * len(test), "nearest_neighbour": nearest_neighbour_replies(train, test),
            "persona_copy": persona_copy_replies(test), "random_human": random_human_replies(train, test, seed)}, constant
