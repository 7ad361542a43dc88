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
"""

from src.data.dialogues import load_dialogues, load_passages

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

    ``words`` needs at least 2 entries; round(density·n) words are hidden (at least 1 and at most
    n − 1), in round(hidden / mean_span) spans (at least 1, at most N_SENTINELS), each hidden span
    preceded by a kept one."""
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
