"""Self-supervised (input, target) pairs from raw text, for pretraining a reader from scratch.

T5's recipe, on whitespace words (the corpora here are space-tokenized):
- ``span_corruption``: about ``density`` of the words, in spans of mean length ``mean_span``,
  are replaced by sentinels ``<extra_id_k>``; the target lists each sentinel followed by the words
  it hid (Raffel et al. 2020, section 3.1.4). The reader's own task has the same shape: its prompt
  ends in ``<extra_id_0>`` and its target starts with it.
- ``prefix_lm``: the input is a text's beginning followed by ``<extra_id_0>``, the target the
  words that come next: the decoder practises writing whole clauses, as a reply needs.

``pretraining_texts`` turns dialogue files (each example: its persona, its context and the reply)
and story corpora (title and text) into one list of texts.

``mlm_example`` is Atlas's MLM task in train.py (``--task mlm``): one text becomes a reader
example whose prompt is the corrupted text itself and whose target the hidden spans; training
draws new spans each time a text comes round, evaluation scores fixed ones (``mlm_eval_examples``).
"""

import json
import random

from src.data.dialogues import load_dialogues, load_passages
from src.infra.errors import UsageError

N_SENTINELS = 10  # <extra_id_0> ... <extra_id_9>, the reader tokenizer's sentinels


def pretraining_texts(dialogue_files=(), story_files=()):
    """Every dialogue example as ``question R: reply`` and every story as ``title . text``."""
    texts = []
    for path in dialogue_files:
        texts += [f"{ex['question']} R: {ex['answers'][0]}" for ex in load_dialogues(path)]
    for path in story_files:
        texts += [f"{p['title']} . {p['text']}" if p.get("title") else p["text"] for p in load_passages(path)]
    return texts


def _segments(total, count, rng):
    """``count`` positive lengths that sum to ``total`` (a uniformly random composition)."""
    cuts = sorted(rng.sample(range(1, total), count - 1)) if count > 1 else []
    bounds = [0, *cuts, total]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def span_corruption(words, rng, density=0.15, mean_span=3.0):
    """(input, target) strings: spans of ``words`` replaced by sentinels, the target the hidden spans.

    T5's definition (``random_spans_noise_mask``): ``words`` needs at least 2 entries;
    round(density·n) words are hidden (at least 1 and at most n − 1), in round(hidden / mean_span)
    spans (at least 1); the hidden and the kept words are each cut into that many non-empty runs
    at random, and the runs alternate, a kept one first. Beyond T5: at most N_SENTINELS spans
    (the reader tokenizer has 10 sentinels) and at most n − hidden (each needs a kept run)."""
    n = len(words)
    if n < 2:
        raise ValueError(f"span_corruption needs at least 2 words, got {n}")
    hidden = min(max(1, round(n * density)), n - 1)
    spans = min(max(1, round(hidden / mean_span)), N_SENTINELS, n - hidden)
    hidden_lengths, kept_lengths = _segments(hidden, spans, rng), _segments(n - hidden, spans, rng)
    source, target, i = [], [], 0
    for k, (kept, gone) in enumerate(zip(kept_lengths, hidden_lengths)):
        source += words[i:i + kept] + [f"<extra_id_{k}>"]
        i += kept
        target += [f"<extra_id_{k}>"] + words[i:i + gone]
        i += gone
    return " ".join(source), " ".join(target)


def prefix_lm(words, rng, max_target_words=24):
    """(input, target): the first part of ``words`` and ``<extra_id_0>``; the next words (at most
    ``max_target_words``). The cut leaves at least a quarter of the words before it and 2 after."""
    n = len(words)
    if n < 3:
        raise ValueError(f"prefix_lm needs at least 3 words, got {n}")
    cut = rng.randint(max(1, n // 4), n - 2)
    return " ".join(words[:cut]) + " <extra_id_0>", "<extra_id_0> " + " ".join(words[cut:cut + max_target_words])


OBJECTIVES = ("span", "prefix", "mix")


def denoising_pair(text, rng, objective="mix", window=48):
    """One (input, target) pair from a random window of at most ``window`` words of ``text``;
    ``mix`` picks span corruption or the prefix LM with equal probability. Texts shorter than 4
    words are padded with "." so every text yields a pair."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
    words = text.split()
    if len(words) > window:
        start = rng.randint(0, len(words) - window)
        words = words[start:start + window]
    words += ["."] * (4 - len(words))
    kind = rng.choice(("span", "prefix")) if objective == "mix" else objective
    return span_corruption(words, rng) if kind == "span" else prefix_lm(words, rng)


MLM_WINDOW = 64  # words per MLM example: a story (~45 words) whole, a long dialogue prompt a random window


def mlm_example(text, rng, density=0.15, mean_span=3.0, window=MLM_WINDOW):
    """A reader example of Atlas's MLM task from one text: ``question`` the text (a random window of
    at most ``window`` words) with its spans replaced by sentinels, ``answers`` the target after its
    leading ``<extra_id_0>`` (``reader_target`` puts it back), ``retrieval_query`` the corrupted text
    without sentinels (what Atlas retrieves with), ``task`` "mlm" (the prompt is the text itself)."""
    words = text.split()
    if len(words) > window:
        start = rng.randint(0, len(words) - window)
        words = words[start:start + window]
    words += ["."] * (2 - len(words))
    source, target = span_corruption(words, rng, density, mean_span)
    kept = " ".join(w for w in source.split() if not w.startswith("<extra_id_"))
    return {"question": source, "answers": [target[len("<extra_id_0> "):]], "retrieval_query": kept, "task": "mlm"}


HELDOUT_SEED = 12345  # the evaluation's spans do not depend on --seed


def mlm_eval_examples(texts, density=0.15, mean_span=3.0):
    """Fixed MLM examples for evaluation: text i is corrupted with its own generator, so the same
    texts give the same spans in every run and on every process."""
    return [mlm_example(t, random.Random(HELDOUT_SEED * 1_000_003 + i), density, mean_span)
            for i, t in enumerate(texts)]


def load_texts(path):
    """The texts of one jsonl file for the MLM task: a dialogue file (lines with ``question`` and
    ``answers``: ``question R: reply``) or a story corpus (lines with ``text``: ``title . text``),
    told apart by its first line."""
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), None)
    try:
        keys = set(json.loads(first)) if first else set()
    except (json.JSONDecodeError, TypeError):
        keys = set()
    if "question" in keys:
        return pretraining_texts(dialogue_files=[path])
    if "text" in keys:
        return pretraining_texts(story_files=[path])
    raise UsageError(f"{path}: --task mlm reads dialogue lines (question, answers) or story lines (text), but its "
                     f"first line has {sorted(keys) or 'no JSON object'} — pass a dialogue or story jsonl file")


def eval_examples(path, task="qa", limit=None, density=0.15, mean_span=3.0):
    """The first ``limit`` evaluation examples of ``path`` for ``task``: dialogues as they are
    (``qa``), or fixed MLM examples of the file's texts (``mlm``)."""
    if task == "mlm":
        return mlm_eval_examples(load_texts(path)[:limit], density, mean_span)
    return load_dialogues(path)[:limit]
