"""Per-reply scores: the GRPO reward and LAPDOG's retriever gold score (f1rougebleudist).

Scales of the components (chosen so the original LAPDOG's scale factors mean what they meant):
BLEU is sacreBLEU sentence BLEU in 0-100, F1 is unnormalized whitespace-token F1 in 0-1,
ROUGE is the rouge package's ROUGE-L F in 0-1 (x100 when ``scale_rouge``).
Speaker tags "R:" are stripped from hypotheses and references first, as in the metrics.
"""

import ast
import json
import math
from collections import Counter
from collections.abc import Mapping

import torch
from rouge import Rouge
from sacrebleu.metrics import BLEU

from src.data.prompts import strip_speaker
from src.infra.errors import flag_error

# Built once: both sit on the per-sample hot path of RL training.
_SENT_BLEU = BLEU(effective_order=True)
_ROUGE_L = Rouge(metrics=["rouge-l"], stats=["f"])

DEFAULT_SCALE = {"bleu": 0.01, "f1": 1.0, "rouge": 1.0}
_SCALE_KEYS = ("bleu", "f1", "rouge")


def sentence_bleu(hyp: str, ref: str) -> float:
    """sacreBLEU sentence BLEU with effective order, 0-100 (0 for an empty hypothesis)."""
    return float(_SENT_BLEU.sentence_score(hyp, [ref]).score)


def token_f1(hyp: str, ref: str) -> float:
    """Whitespace-token F1 (0-1) with multiset overlap, no normalization; 0 if either is empty."""
    h, r = hyp.split(), ref.split()
    if not h or not r:
        return 0.0
    same = sum((Counter(h) & Counter(r)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(h), same / len(r)
    return 2 * precision * recall / (precision + recall)


def rouge_l(hyp: str, ref: str) -> float:
    """ROUGE-L F (0-1) of the rouge package; 0 for an empty hyp/ref or when the scorer raises."""
    if not hyp.strip() or not ref.strip():
        return 0.0
    try:
        return float(_ROUGE_L.get_scores(hyp, ref)[0]["rouge-l"]["f"])
    except Exception:  # a failed score is a zero reward, as in LAPDOG's evaluation
        return 0.0


def length_penalty(hyp_len: int, ref_len: int, strength: float, short_factor: float = 2.0) -> float:
    """exp(-s * |1 - h/r|), with s times ``short_factor`` when h < r (the original doubles it: a
    too-short reply is punished more; 1.0 makes the penalty symmetric in h/r).

    strength 0 gives exactly 1.0. A reference with no words is treated as r = 1 so the ratio
    stays finite (an empty reply then gets penalty exp(-short_factor * s)).
    """
    if strength < 0:
        raise ValueError(f"length penalty strength must be >= 0, got {strength}")
    if short_factor <= 0:
        raise ValueError(f"length penalty short factor must be > 0, got {short_factor}")
    if strength == 0:
        return 1.0
    r = ref_len if ref_len > 0 else 1
    s = short_factor * strength if hyp_len < r else float(strength)
    return math.exp(-s * abs(1.0 - hyp_len / r))


def distinct_ngram_share(text: str, n: int = 3) -> float:
    """Distinct word n-grams / word n-grams of ``text`` (lowercased whitespace words): 1.0 for a
    reply that never repeats a run of n words, or has fewer than n words; "i love hats . i love
    hats ." has 4 distinct trigrams of 6 (0.667)."""
    words = text.lower().split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def reply_scores(hyps: list[str], refs: list[str]) -> dict[str, list[float]]:
    """Per-reply ``bleu`` (0-100), ``f1`` (0-1), ``rouge`` (ROUGE-L F, 0-1), ``hyp_len``,
    ``ref_len`` (whitespace word counts), each a list of len(hyps), after stripping "R:"."""
    if len(hyps) != len(refs):
        raise ValueError(f"reply_scores got {len(hyps)} hypotheses but {len(refs)} references")
    out = {"bleu": [], "f1": [], "rouge": [], "hyp_len": [], "ref_len": []}
    for hyp, ref in zip(hyps, refs):
        h, r = strip_speaker(hyp), strip_speaker(ref)
        out["bleu"].append(sentence_bleu(h, r))
        out["f1"].append(token_f1(h, r))
        out["rouge"].append(rouge_l(h, r))
        out["hyp_len"].append(float(len(h.split())))
        out["ref_len"].append(float(len(r.split())))
    return out


def scale_tuple(d) -> tuple[float, float, float]:
    """(a, b, c) weights of (BLEU, F1, ROUGE) from a scale dict; missing keys take defaults."""
    return tuple(float(d.get(k, DEFAULT_SCALE[k])) for k in _SCALE_KEYS)


def reward_options(opts) -> dict:
    """grpo_reward's keyword arguments as the options set them (--metric_scale_factors weights,
    --scale_rouge, --generation_length_penalty, --length_penalty_short_factor,
    --reward_repetition_penalty): the one place
    training, evaluation and the bench take the RL reward's settings from."""
    return {"scale": scale_tuple(opts.metric_scale), "scale_rouge": opts.scale_rouge,
            "length_penalty_strength": opts.generation_length_penalty,
            "length_penalty_short_factor": opts.length_penalty_short_factor,
            "repetition_penalty_strength": opts.reward_repetition_penalty}


def _as_tuple(scale) -> tuple[float, float, float]:
    if isinstance(scale, Mapping):
        return scale_tuple(scale)
    a, b, c = scale
    return float(a), float(b), float(c)


def grpo_reward(hyps: list[str], refs: list[str], scale=(0.01, 1.0, 1.0), scale_rouge=False,
                length_penalty_strength=0.0, repetition_penalty_strength=0.0, device=None,
                length_penalty_short_factor=2.0) -> dict[str, torch.Tensor]:
    """Reward of each reply, no normalization across the batch.

    reward = (a*BLEU + b*F1 + c*ROUGE_L) * LP * RP, ROUGE_L x100 when ``scale_rouge``; LP the length
    penalty (``length_penalty``, its short factor ``length_penalty_short_factor``), RP =
    distinct3 ** ``repetition_penalty_strength`` (distinct3: ``distinct_ngram_share``
    of the reply); both are 1.0 at strength 0. ``scale`` is (a, b, c) or a dict with keys
    bleu/f1/rouge.
    Returns float32 tensors of shape [len(hyps)] on ``device`` (default CPU): ``reward``,
    ``bleu``, ``f1``, ``rouge`` (the components as weighted), ``length_ratio`` (h / r, r = 1 when
    the reference is empty), ``length_penalty``, ``distinct3`` and ``repetition_penalty``.
    """
    if repetition_penalty_strength < 0:
        raise ValueError(f"repetition penalty strength must be >= 0, got {repetition_penalty_strength}")
    a, b, c = _as_tuple(scale)
    s = reply_scores(hyps, refs)
    rouge = [x * 100.0 for x in s["rouge"]] if scale_rouge else s["rouge"]
    ratio = [h / (r if r > 0 else 1.0) for h, r in zip(s["hyp_len"], s["ref_len"])]
    lp = [length_penalty(h, r, length_penalty_strength, length_penalty_short_factor)
          for h, r in zip(s["hyp_len"], s["ref_len"])]
    # F1 and ROUGE-L against one reference pay for recall, so a policy can climb them by saying
    # more, and looping a phrase is the cheapest way to say more: RP makes added length pay only
    # when it is new words
    distinct3 = [distinct_ngram_share(strip_speaker(h)) for h in hyps]
    rp = [x ** repetition_penalty_strength for x in distinct3]  # x ** 0 == 1.0 exactly
    reward = [(a * bl + b * f + c * ro) * p * q for bl, f, ro, p, q in zip(s["bleu"], s["f1"], rouge, lp, rp)]

    def t(xs):
        return torch.tensor(xs, dtype=torch.float32, device=device)

    return {"reward": t(reward), "bleu": t(s["bleu"]), "f1": t(s["f1"]), "rouge": t(rouge),
            "length_ratio": t(ratio), "length_penalty": t(lp), "distinct3": t(distinct3),
            "repetition_penalty": t(rp)}


def lapdog_gold_scores(hyps: list[str], refs: list[str], scale=(1.0, 1.0, 1.0), scale_rouge=False,
                       device=None) -> torch.Tensor:
    """LAPDOG's f1rougebleudist gold score, float32 [len(hyps)]:
    a*BLEU/||BLEU||_2 + b*F1 + c*ROUGE_L, the L2 norm taken over all BLEU scores of this call
    (the normalized BLEU is 0 when every BLEU is 0, never NaN); ROUGE_L x100 when scale_rouge."""
    a, b, c = _as_tuple(scale)
    s = reply_scores(hyps, refs)
    bleu = torch.tensor(s["bleu"], dtype=torch.float64)
    norm = torch.linalg.vector_norm(bleu)
    bleu_n = bleu / norm if norm > 0 else torch.zeros_like(bleu)
    rouge = torch.tensor(s["rouge"], dtype=torch.float64) * (100.0 if scale_rouge else 1.0)
    f1 = torch.tensor(s["f1"], dtype=torch.float64)
    return (a * bleu_n + b * f1 + c * rouge).to(dtype=torch.float32, device=device)


_SCALE_FIX = "pass a dict such as \"{'bleu':0.01,'f1':1.0,'rouge':1.0}\" (keys bleu, f1, rouge; numbers >= 0)"


def parse_metric_scale_factors(text: str | None) -> dict:
    """Parse ``--metric_scale_factors`` (a Python-literal or JSON dict) into
    ``{"bleu": a, "f1": b, "rouge": c}`` floats; None/empty gives DEFAULT_SCALE, missing keys
    take defaults. Anything else raises UsageError (via flag_error). Never evaluates code."""
    flag = "--metric_scale_factors"
    if text is None or not str(text).strip():
        return dict(DEFAULT_SCALE)
    text = str(text).strip()
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        try:
            value = json.loads(text)
        except ValueError:
            raise flag_error(flag, f"cannot parse {text!r} as a dict", _SCALE_FIX) from None
    if not isinstance(value, dict):
        raise flag_error(flag, f"{text!r} is a {type(value).__name__}, not a dict", _SCALE_FIX)
    out = dict(DEFAULT_SCALE)
    for key, v in value.items():
        if key not in _SCALE_KEYS:
            raise flag_error(flag, f"unknown key {key!r}", _SCALE_FIX)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise flag_error(flag, f"value of {key!r} is {v!r}, not a number", _SCALE_FIX)
        if not math.isfinite(v) or v < 0:
            raise flag_error(flag, f"value of {key!r} is {v!r}; it must be finite and >= 0",
                             _SCALE_FIX)
        out[key] = float(v)
    return out


def knowledge_recall(hyps: list[str], knowledge: list[list[str]]) -> torch.Tensor:
    """[N] share of each target's fact-like words (``knowledge[i]``, src/data/posterior.py:KnowledgeWords)
    that reply ``hyps[i]`` contains, as whitespace tokens; 0 where the target has none.

    The retriever's story reward with ``--retriever_signal knowledge``: a story is worth what its
    reply gets right of the facts the target needs. Chit-chat targets score 0 with every story, so
    they give the retriever no gradient instead of the noise of replies that vary with the story
    (measured on the sample data: 13 distinct greedy replies over a 16-story pool, reward std 0.30,
    on targets that need no story)."""
    if len(hyps) != len(knowledge):
        raise ValueError(f"{len(hyps)} replies but {len(knowledge)} knowledge lists")
    out = []
    for hyp, words in zip(hyps, knowledge):
        said = set(strip_speaker(hyp).split())
        out.append(sum(w in said for w in words) / len(words) if words else 0.0)
    return torch.tensor(out, dtype=torch.float32)
