"""The "posterior" story of a training reply: the corpus story that shares the most idf-weighted
words with the reply the reader must produce.

A closed-book stage 1 never shows the reader a story, so it learns to ignore them (measured: the
same greedy reply with the relevant story and with a random one on 125 of 137 sample examples),
and then no story reward can teach the retriever anything. Fusing the posterior story in stage 1
teaches the reader to copy facts from its input. It looks only at the reply text and the corpus,
never at a relevance label (`story_id`), so it works on real data. It is the retrieval analogue of
a posterior q(story | reply): the story that best explains the target.

score(story) = Σ_{w ∈ words(reply) ∩ words(story)} idf(w),  idf(w) = log(N / df(w)),
over lowercased whitespace tokens of title + text; ties go to the earlier story.
"""

import math
from collections import defaultdict


def _words(text):
    return set(text.lower().split())


class PosteriorStories:
    def __init__(self, passages):
        self.passages = passages
        df = defaultdict(int)
        self.postings = defaultdict(list)  # word -> story rows containing it
        for row, p in enumerate(passages):
            for w in _words(f"{p.get('title') or ''} {p['text']}"):
                df[w] += 1
                self.postings[w].append(row)
        n = len(passages)
        self.idf = {w: math.log(n / c) for w, c in df.items()}

    def scores(self, reply):
        """{story row: score} for the stories that share at least one word with ``reply``."""
        out = defaultdict(float)
        for w in _words(reply):
            weight = self.idf.get(w, 0.0)
            if weight > 0:
                for row in self.postings[w]:
                    out[row] += weight
        return out

    def best_row(self, reply):
        """Row of the posterior story (row 0 when the reply shares no informative word)."""
        s = self.scores(reply)
        return min(s, key=lambda r: (-s[r], r)) if s else 0

    def best(self, reply):
        return self.passages[self.best_row(reply)]


def _replace_word(text, old, new):
    return " ".join(new if w == old else w for w in text.split(" "))


class KnowledgeWords:
    """The fact-like words of a reply: words rare in the story corpus and rare in the dialogues.

    A word is fact-like when it is in at most ``max_story_df`` of the stories and at most
    ``max_dialogue_df`` of the dialogue examples (``dialogues``: their question + answers texts).
    The second test keeps chit-chat words that stories rarely use ("thanks", "always": in 5-9% of
    the sample dialogues) out; the sample's facts (names, colours, cities) are in 0.4-2.1%. No
    relevance label is used: only corpus and dialogue word counts. A reply without such a word
    (chit-chat) needs no story.
    """

    def __init__(self, posterior: PosteriorStories, dialogues, max_story_df=0.05, max_dialogue_df=0.03):
        counts = defaultdict(int)
        for text in dialogues:
            for w in _words(text):
                counts[w] += 1
        common = {w for w, c in counts.items() if c > max_dialogue_df * max(len(dialogues), 1)}
        limit = math.log(1 / max_story_df)
        self.words = {w for w, v in posterior.idf.items() if v >= limit and w.isalpha() and w not in common}

    def __contains__(self, word):
        return word in self.words

    def __call__(self, reply):
        """Sorted fact-like words of ``reply`` (empty for chit-chat)."""
        return sorted(w for w in _words(reply) if w in self.words)


class FactSwap:
    """Counterfactual augmentation that makes copying the only way to a fact.

    A reader trained on (prompt + posterior story -> reply) can lower its loss by memorizing each
    persona's facts or the most frequent one per slot ("a husky named buddy") instead of reading
    them off the story; measured on the sample data, a from-scratch reader after 400 steps gave
    the same reply with the relevant story and with a same-topic story holding other facts. Here
    the rarest word the reply shares with its posterior story is replaced, in the reply, the
    prompt and the story alike, by a random rare corpus word: no prior can predict it, the story
    can. No relevance label is used, only the reply/story overlap.
    """

    def __init__(self, posterior: PosteriorStories, dialogues, max_story_df=0.05, max_dialogue_df=0.03):
        """Fact-like words as ``KnowledgeWords`` defines them (same thresholds)."""
        self.posterior = posterior
        self.facts = KnowledgeWords(posterior, dialogues, max_story_df, max_dialogue_df).words
        self.candidates = sorted(self.facts)

    def shared_fact(self, reply, story):
        words = _words(f"{story.get('title') or ''} {story['text']}")
        shared = [w for w in _words(reply) & words if w in self.facts]
        return max(shared, key=lambda w: (self.posterior.idf[w], w)) if shared else None

    def __call__(self, question, reply, story, rng):
        """(question, reply, story) with the fact swapped; unchanged when nothing is shared."""
        old = self.shared_fact(reply, story)
        if old is None or not self.candidates:
            return question, reply, story
        taken = _words(reply) | _words(story["text"]) | _words(question)
        new = rng.choice(self.candidates)
        for _ in range(8):  # a word already in the example would make the swap ambiguous
            if new not in taken:
                break
            new = rng.choice(self.candidates)
        else:
            return question, reply, story
        swapped = dict(story, text=_replace_word(story["text"], old, new),
                       title=_replace_word(story.get("title") or "", old, new))
        return _replace_word(question, old, new), _replace_word(reply, old, new), swapped
