"""Corpus-level text metrics with LAPDOG's definitions.

One module serves compute_metrics.py, evaluate.py and the in-loop evaluation so the three
can never disagree. Definitions (lapdog-behaviour.md, "Evaluation and metrics"):

- every "R:" is removed from prediction and reference, then surrounding whitespace;
- ``bleu``: sacreBLEU corpus BLEU, default 13a tokenization, cased;
- ``rouge1/rouge2/rougeL``: F-scores of the ``rouge`` package (1.0.1) per example, x100,
  averaged; an empty prediction or a scorer error counts 0 (errors are counted in
  ``rouge_errors``, empty predictions in ``empty_predictions``);
- ``f1`` / ``exact_match``: SQuAD-normalized token F1 / exact match, x100, averaged;
- ``dist1/dist2``: distinct n-grams / all n-grams over all generations (whitespace tokens), x100;
- ``length_ratio``: total hypothesis words / total reference words (a plain ratio, not x100);
- ``repeat3``: the share of predictions in which one word comes three times in a row ("a a a"),
  x100: the degenerate repetition of an untrained reader;
- ``loop3``: the share of predictions in which a run of three words comes twice ("i love hats .
  i love hats"), x100: the phrase loop that ``repeat3`` misses;
- ``precision`` / ``recall``: the two halves of ``f1`` (SQuAD-normalized tokens in common over the
  prediction's / the reference's), x100, averaged: whether F1 moved by better words or more words;
- ``generic``: the share of predictions equal to the most frequent prediction, x100 (a constant
  reply scores 100): a reader collapsed to one reply.
- ``copy_persona`` / ``copy_story`` (``copy_shares``, where the sources are known: evaluation):
  the share of predictions that repeat ``COPY_RUN`` (8) or more consecutive words of the persona /
  of a fused story verbatim, x100 (lowercased, punctuation split off): a reader that copies its
  input instead of replying. A prediction shorter than 8 words is never counted.

Next to them, clearly separate (``compute_standard_metrics``, keys prefixed ``rs_`` / ``nltk_``),
the implementations most dialogue papers report; the same "R:" stripping comes first:

- ``rs_rouge1/rs_rouge2/rs_rougeL``: F-scores of Google's ``rouge-score`` (0.1.2) per example,
  x100, averaged, its own tokenizer (lowercase, non-alphanumerics to spaces), no stemming;
  ``rs_rouge1_stem/...``: the same with its Porter stemmer (``use_stemmer=True``). ``rougeL`` is
  the sentence-level LCS (not ``rougeLsum``). An empty prediction scores 0.
- ``nltk_bleu1/nltk_bleu2/nltk_bleu4``: nltk's ``corpus_bleu`` with uniform weights over 1, 2 and
  4 n-gram orders, x100, smoothing ``SmoothingFunction().method1`` (epsilon 0.1 added to an
  order's matched count when it is 0), tokens = whitespace split (nltk's tokenizer data cannot be
  downloaded here), cased. As nltk does, every reply adds at least 1 to each order's denominator,
  even a reply shorter than that order; no unigram match in the corpus gives 0.
"""

import re
import string
from collections import Counter
from functools import lru_cache

from rouge import Rouge
from sacrebleu.metrics import BLEU

from src.data.prompts import strip_speaker

_ROUGE = Rouge()
_RS_TYPES = ("rouge1", "rouge2", "rougeL")
# Uniform weights per BLEU order; corpus_bleu takes the list and shares one n-gram pass.
_NLTK_BLEU_WEIGHTS = {"nltk_bleu1": (1.0,), "nltk_bleu2": (0.5, 0.5), "nltk_bleu4": (0.25,) * 4}
STANDARD_KEYS = tuple([f"rs_{t}" for t in _RS_TYPES] + [f"rs_{t}_stem" for t in _RS_TYPES]
                      + list(_NLTK_BLEU_WEIGHTS))
_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def squad_normalize(s: str) -> str:
    """SQuAD answer normalization: lowercase, drop punctuation, drop a/an/the, collapse spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def squad_precision_recall(pred: str, ref: str) -> tuple[float, float]:
    """The token precision and recall (0-1) behind ``squad_f1``: the words pred and ref share (with
    multiplicity) over pred's / ref's words; (0, 0) when nothing overlaps."""
    pred_tokens = squad_normalize(pred).split()
    ref_tokens = squad_normalize(ref).split()
    same = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if same == 0:
        return 0.0, 0.0
    return same / len(pred_tokens), same / len(ref_tokens)


def _harmonic(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision else 0.0


def squad_f1(pred: str, ref: str) -> float:
    """Token F1 (0-1) between SQuAD-normalized pred and ref; 0 when nothing overlaps."""
    return _harmonic(*squad_precision_recall(pred, ref))


def squad_exact_match(pred: str, ref: str) -> float:
    """1.0 when the SQuAD-normalized strings are equal, else 0.0."""
    return float(squad_normalize(pred) == squad_normalize(ref))


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n (0-1): unique n-grams / all n-grams, n-grams taken within each text.

    Tokens are whitespace-split after removing "R:". Returns 0.0 when there is no n-gram.
    """
    if n < 1:
        raise ValueError(f"distinct_n needs n >= 1, got {n}")
    seen = set()
    total = 0
    for text in texts:
        tokens = strip_speaker(text).split()
        grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def has_repeat(text: str, times: int = 3) -> bool:
    """True when one whitespace token comes ``times`` times in a row in ``text`` ("i am a a a")."""
    tokens = text.split()
    return any(len(set(tokens[i:i + times])) == 1 for i in range(len(tokens) - times + 1))


def has_phrase_loop(text: str, n: int = 3) -> bool:
    """True when a run of ``n`` whitespace tokens comes twice in ``text`` ("i love hats . i love hats"):
    the phrase loop that ``has_repeat`` (one word three times in a row) does not see."""
    tokens = text.split()
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) < len(grams)


COPY_RUN = 8  # consecutive words in common that make a reply a verbatim copy of its source


def _copy_words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def copies_verbatim(prediction: str, source: str, run: int = COPY_RUN) -> bool:
    """True when ``prediction`` holds ``run`` consecutive words of ``source`` (lowercased, punctuation
    split off, so "dog." in a story matches "dog ." in a reply)."""
    pred, src = _copy_words(strip_speaker(prediction)), _copy_words(source)
    if len(pred) < run or len(src) < run:
        return False
    grams = {tuple(src[i:i + run]) for i in range(len(src) - run + 1)}
    return any(tuple(pred[i:i + run]) in grams for i in range(len(pred) - run + 1))


def copy_shares(generations: list[str], personas: list[str], stories: list[list[str]] | None = None) -> dict:
    """``copy_persona`` (and ``copy_story`` when ``stories`` is given: each example's fused story
    texts): the share of ``generations`` copying ``COPY_RUN`` words of that source verbatim, x100."""
    n = max(len(generations), 1)
    out = {"copy_persona": 100.0 * sum(copies_verbatim(g, p) for g, p in zip(generations, personas)) / n}
    if stories is not None:
        out["copy_story"] = 100.0 * sum(any(copies_verbatim(g, s) for s in ss)
                                        for g, ss in zip(generations, stories)) / n
    return out


def generic_share(texts: list[str]) -> float:
    """Share (0-1) of ``texts`` equal to the most frequent one (after stripping); 0.0 for none."""
    if not texts:
        return 0.0
    return Counter(t.strip() for t in texts).most_common(1)[0][1] / len(texts)


def _rouge_f(pred: str, ref: str):
    """(r1, r2, rL) F-scores in 0-1 and whether the scorer failed.

    The rouge package raises on a reference with no words and can hit the recursion limit on
    very long texts; LAPDOG scores such an example 0, and so do we, but report it.
    """
    try:
        s = _ROUGE.get_scores(pred, ref)[0]
    except Exception:  # "any scorer error counts 0" is part of the metric's definition
        return (0.0, 0.0, 0.0), True
    return (s["rouge-1"]["f"], s["rouge-2"]["f"], s["rouge-l"]["f"]), False


def per_example_scores(generations: list[str], references: list[str]) -> dict:
    """Each example's scores, the ones ``compute_metrics`` averages (for paired comparisons of two
    systems on the same examples): lists ``f1``, ``precision``, ``recall``, ``rouge1``, ``rouge2``,
    ``rougeL`` (x100; an empty prediction scores 0 by ROUGE) and ``rouge_failed`` (the scorer raised:
    scored 0)."""
    keys = ("f1", "precision", "recall", "rouge1", "rouge2", "rougeL", "rouge_failed")
    out = {k: [] for k in keys}
    for g, ref in zip(generations, references, strict=True):
        p, r = strip_speaker(g), strip_speaker(ref)
        precision, recall = squad_precision_recall(p, r)
        (r1, r2, rl), failed = _rouge_f(p, r) if p else ((0.0, 0.0, 0.0), False)
        for k, v in zip(keys, (_harmonic(precision, recall), precision, recall, r1, r2, rl)):
            out[k].append(100.0 * v)
        out["rouge_failed"].append(failed)
    return out


def compute_metrics(generations: list[str], references: list[str], per_example: dict | None = None) -> dict:
    """Corpus metrics of N generations against N references (one reference each).

    Returns floats ``bleu, f1, rouge1, rouge2, rougeL, dist1, dist2, exact_match`` (x100),
    ``length_ratio`` (plain ratio; 0.0 when the references have no words), and ints ``n``,
    ``rouge_errors`` (examples where the rouge scorer raised, scored 0) and
    ``empty_predictions`` (predictions empty after stripping, scored 0 by ROUGE).
    With N = 0 every score is 0.0. ``per_example``: this pair's ``per_example_scores`` when the
    caller has them already (ROUGE is then not scored twice).
    """
    if len(generations) != len(references):
        raise ValueError(
            f"compute_metrics got {len(generations)} generations but {len(references)} references"
        )
    preds = [strip_speaker(g) for g in generations]
    refs = [strip_speaker(r) for r in references]
    n = len(preds)
    out = {"n": n, "rouge_errors": 0, "empty_predictions": sum(not p for p in preds)}
    if n == 0:
        for key in ("bleu", "f1", "rouge1", "rouge2", "rougeL", "dist1", "dist2",
                    "exact_match", "length_ratio", "repeat3", "generic", "precision", "recall", "loop3"):
            out[key] = 0.0
        return out
    per = per_example if per_example is not None else per_example_scores(generations, references)
    if len(per["f1"]) != n:
        raise ValueError(f"compute_metrics got per-example scores of {len(per['f1'])} examples for {n} generations")

    # ConvAI2 replies are pre-tokenized ("... ."); force=True only silences sacreBLEU's warning
    # about that, the score is unchanged.
    out["bleu"] = float(BLEU(force=True).corpus_score(preds, [refs]).score)
    # F1 and its two halves: a longer reply raises recall at a cost to precision, so F1 alone cannot
    # say whether a method found better words or only more of them
    for key in ("rouge1", "rouge2", "rougeL", "f1", "precision", "recall"):
        out[key] = sum(per[key]) / n
    out["rouge_errors"] = sum(per["rouge_failed"])
    out["exact_match"] = 100.0 * sum(squad_exact_match(p, r) for p, r in zip(preds, refs)) / n
    out["dist1"] = 100.0 * distinct_n(preds, 1)
    out["dist2"] = 100.0 * distinct_n(preds, 2)

    hyp_words = sum(len(p.split()) for p in preds)
    ref_words = sum(len(r.split()) for r in refs)
    out["length_ratio"] = hyp_words / ref_words if ref_words else 0.0
    out["repeat3"] = 100.0 * sum(has_repeat(p) for p in preds) / n
    out["loop3"] = 100.0 * sum(has_phrase_loop(p) for p in preds) / n
    out["generic"] = 100.0 * generic_share(preds)
    return out


# nltk (which rouge-score imports for its stemmer) takes seconds to import; train.py and
# evaluate.py import this module but never need the standard block, so load it on first use.
@lru_cache(maxsize=2)
def _rouge_scorer(stem: bool):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(_RS_TYPES), use_stemmer=stem)


def rouge_score_f(pred: str, ref: str, stem: bool) -> tuple[float, float, float]:
    """(rouge1, rouge2, rougeL) F-scores in 0-1 from the ``rouge-score`` package."""
    s = _rouge_scorer(stem).score(ref, pred)  # rouge-score's order is (target, prediction)
    return tuple(s[t].fmeasure for t in _RS_TYPES)


def nltk_corpus_bleu(preds: list[str], refs: list[str]) -> dict:
    """nltk corpus BLEU-1/2/4 (0-1) on whitespace tokens, smoothing method1, one reference each."""
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu  # slow import: see _rouge_scorer

    hyps = [p.split() for p in preds]
    references = [[r.split()] for r in refs]
    if not any(hyps):
        return {k: 0.0 for k in _NLTK_BLEU_WEIGHTS}
    scores = corpus_bleu(references, hyps, weights=list(_NLTK_BLEU_WEIGHTS.values()),
                         smoothing_function=SmoothingFunction().method1)
    return {k: float(v) for k, v in zip(_NLTK_BLEU_WEIGHTS, scores)}


def compute_standard_metrics(generations: list[str], references: list[str]) -> dict:
    """The commonly reported implementations (module docstring), x100, keys ``STANDARD_KEYS``.

    Kept apart from ``compute_metrics`` so LAPDOG's numbers keep their exact meaning.
    With N = 0 every score is 0.0.
    """
    if len(generations) != len(references):
        raise ValueError(f"compute_standard_metrics got {len(generations)} generations "
                         f"but {len(references)} references")
    preds = [strip_speaker(g) for g in generations]
    refs = [strip_speaker(r) for r in references]
    out = {k: 0.0 for k in STANDARD_KEYS}
    if not preds:
        return out
    for stem, suffix in ((False, ""), (True, "_stem")):
        sums = [0.0, 0.0, 0.0]
        for p, r in zip(preds, refs):
            for i, f in enumerate(rouge_score_f(p, r, stem)):
                sums[i] += f
        for t, total in zip(_RS_TYPES, sums):
            out[f"rs_{t}{suffix}"] = 100.0 * total / len(preds)
    for k, v in nltk_corpus_bleu(preds, refs).items():
        out[k] = 100.0 * v
    return out


def format_metrics(d: dict) -> str:
    """One readable line, e.g. ``BLEU 1.23 | F1 15.00 | ... | len ratio 0.950 | reward 0.312 |
    eval_loss 3.456 | ppl 31.7 | n 100`` (reward, eval_loss and ppl where the evaluation has them)."""
    parts = []
    for key, label in (("bleu", "BLEU"), ("f1", "F1"), ("rouge1", "R-1"), ("rouge2", "R-2"),
                       ("rougeL", "R-L"), ("dist1", "Dist-1"), ("dist2", "Dist-2"),
                       ("exact_match", "EM")):
        if key in d:
            parts.append(f"{label} {d[key]:.2f}")
    if "length_ratio" in d:
        parts.append(f"len ratio {d['length_ratio']:.3f}")
    for key, fmt in (("reward", ".3f"), ("eval_loss", ".3f"), ("ppl", ".1f")):
        if key in d:
            parts.append(f"{key} {d[key]:{fmt}}")
    if "n" in d:
        parts.append(f"n {d['n']}")
    if d.get("rouge_errors"):
        parts.append(f"rouge errors {d['rouge_errors']}")
    return " | ".join(parts)
