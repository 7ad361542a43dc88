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
