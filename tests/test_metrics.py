"""Metrics against hand-computed values, and compute_metrics.py end to end."""
import json
import math
import os
import subprocess
import sys

import pytest

from src.data.prompts import strip_speaker
from src.evaluation.metrics import (
    STANDARD_KEYS,
    compute_metrics,
    compute_standard_metrics,
    copies_verbatim,
    copy_shares,
    distinct_n,
    format_metrics,
    generic_share,
    has_phrase_loop,
    has_repeat,
    nltk_corpus_bleu,
    per_example_scores,
    rouge_score_f,
    squad_f1,
    squad_normalize,
    squad_precision_recall,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "compute_metrics.py")


def test_strip_speaker_and_normalize():
    assert strip_speaker("  R: hi R:there ") == "hi there"
    assert squad_normalize("The Cat, sat!  on a mat.") == "cat sat on mat"
    assert squad_normalize("An apple") == "apple"
    # articles only as whole words
    assert squad_normalize("theatre answer") == "theatre answer"


def test_repetition_and_generic_share_by_hand():
    assert has_repeat("i'm a a a lot") and has_repeat("no no no") and not has_repeat("a a b a a")
    assert not has_repeat("") and not has_repeat("a a") and has_repeat("x y y", times=2)
    assert generic_share([]) == 0.0 and generic_share(["hi .", "hi . ", "ok"]) == pytest.approx(2 / 3)
    m = compute_metrics(["a a a b", "hi", "hi"], ["x", "y", "z"])
    assert m["repeat3"] == pytest.approx(100 / 3) and m["generic"] == pytest.approx(200 / 3)


def test_phrase_loops_and_f1_halves_by_hand():
    assert has_phrase_loop("i love hats . i love hats .") and has_phrase_loop("a a a a")
    assert not has_phrase_loop("i do . i do") and not has_phrase_loop("a a a") and not has_phrase_loop("")
    assert has_phrase_loop("x y x y", n=2) and not has_phrase_loop("x y z x", n=2)
    # pred "the cat sat sat" -> "cat sat sat" (3 words), ref "a cat sat down here" -> "cat sat down here" (4):
    # 2 in common ("sat" once: multiplicity), precision 2/3, recall 2/4, F1 = 2PR/(P+R) = 4/7
    p, r = squad_precision_recall("the cat sat sat", "a cat sat down here")
    assert (p, r) == (pytest.approx(2 / 3), pytest.approx(1 / 2))
    assert squad_f1("the cat sat sat", "a cat sat down here") == pytest.approx(4 / 7)
    assert squad_precision_recall("no overlap", "at all") == (0.0, 0.0) and squad_precision_recall("", "x") == (0.0, 0.0)
    m = compute_metrics(["the cat sat sat", "i love hats . i love hats ."], ["a cat sat down here", "hats"])
    # example 2: pred tokens "i love hats i love hats" (6) vs "hats" (1): 1 shared, P 1/6, R 1
    assert m["precision"] == pytest.approx(100 * (2 / 3 + 1 / 6) / 2)
    assert m["recall"] == pytest.approx(100 * (1 / 2 + 1) / 2)
    assert m["loop3"] == pytest.approx(50.0) and m["repeat3"] == 0.0  # the loop repeat3 misses
    assert compute_metrics([], [])["loop3"] == 0.0


def test_verbatim_copies_by_hand():
    persona = "i have two dogs and a cat named tom who sleeps all day. i like to read."
    # 8 consecutive words of the persona ("and a cat named tom who sleeps all"), punctuation split off
    assert copies_verbatim("R: yes , two dogs and a cat named tom who sleeps all day .", persona)
    assert copies_verbatim("and a cat named tom who sleeps all", persona)
    assert not copies_verbatim("a cat named tom who sleeps all", persona)  # 7 words: too short to count
    assert not copies_verbatim("i have two dogs and one cat named tom who sleeps", persona)  # runs of 5 and 6
    assert copies_verbatim("Day. I LIKE TO READ. and you ?", "all day . i like to read . and you ?")
    assert not copies_verbatim("", persona) and not copies_verbatim("one two three four five six seven eight", "")
    out = copy_shares(["and a cat named tom who sleeps all", "i like to read .", "the story goes on and on and on ."],
                      [persona] * 3, [[], ["x"], ["once upon a time the story goes on and on and on ."]])
    assert out == {"copy_persona": pytest.approx(100 / 3), "copy_story": pytest.approx(100 / 3)}
    assert copy_shares(["hi"], [persona]) == {"copy_persona": 0.0} and copy_shares([], []) == {"copy_persona": 0.0}


def test_per_example_scores_average_to_the_corpus_metrics():
    gens, refs = ["i like dogs .", "R: hello there", "", "the cat"], ["i like cats .", "hi there", "x", "a cat"]
    pe, m = per_example_scores(gens, refs), compute_metrics(gens, refs)
    # "i like dogs" vs "i like cats": 2 of 3 tokens each way -> F1 2/3; empty prediction -> 0
    assert pe["f1"][0] == pytest.approx(200 / 3) and pe["f1"][2] == 0.0 and pe["rougeL"][2] == 0.0
    assert sum(pe["f1"]) / 4 == pytest.approx(m["f1"]) and sum(pe["rougeL"]) / 4 == pytest.approx(m["rougeL"])
    assert pe["precision"][0] == pytest.approx(200 / 3) and pe["recall"][1] == pytest.approx(50.0)  # "there" of "hi there"
    # scores the caller already has are used as they are (ROUGE is not scored twice) ...
    assert compute_metrics(gens, refs, pe) == m
    doctored = dict(pe, rougeL=[100.0] * 4)
    assert compute_metrics(gens, refs, doctored)["rougeL"] == 100.0
    # ... and must be of the same examples
    with pytest.raises(ValueError, match="per-example scores of 3 examples for 4"):
        compute_metrics(gens, refs, {k: v[:3] for k, v in pe.items()})


def test_squad_f1_by_hand():
    # normalized: "cat sat" vs "cat sat down": P = 2/2, R = 2/3 -> F1 = 0.8
    assert squad_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    assert squad_f1("dog", "cat") == 0.0
    assert squad_f1("", "cat") == 0.0
    # multiset overlap: "x x y" vs "x z": 1 shared -> P 1/3, R 1/2 -> 0.4
    assert squad_f1("x x y", "x z") == pytest.approx(0.4)


def test_distinct_n_by_hand():
    texts = ["R: a b a", "a b"]
    # unigrams a b a a b: 2 distinct of 5
    assert distinct_n(texts, 1) == pytest.approx(2 / 5)
    # bigrams (a b) (b a) (a b): 2 distinct of 3
    assert distinct_n(texts, 2) == pytest.approx(2 / 3)
    assert distinct_n(["one"], 2) == 0.0
    with pytest.raises(ValueError):
        distinct_n(texts, 0)


def test_identical_corpus_is_perfect():
    refs = ["i like to hike with my dog .", "R: my favorite color is blue"]
    m = compute_metrics(refs, refs)
    assert m["bleu"] == pytest.approx(100.0)
    assert m["f1"] == pytest.approx(100.0)
    assert m["exact_match"] == pytest.approx(100.0)
    for k in ("rouge1", "rouge2", "rougeL"):
        assert m[k] == pytest.approx(100.0, abs=1e-4)
    assert m["length_ratio"] == pytest.approx(1.0)
    assert m["n"] == 2 and m["rouge_errors"] == 0


def test_corpus_bleu_by_hand_and_cased():
    # all n-gram precisions 1, hyp 4 words vs ref 5: BP = exp(1 - 5/4)
    m = compute_metrics(["a b c d"], ["a b c d e"])
    assert m["bleu"] == pytest.approx(100 * math.exp(-0.25))
    assert compute_metrics(["Hello there my friend"], ["hello there my friend"])["bleu"] < 99


def test_rouge_and_length_ratio_by_hand():
    # "a b c d" vs "a c d e f": R1 P 3/4 R 3/5 -> 2/3; bigrams {ab,bc,cd} vs {ac,cd,de,ef}:
    # P 1/3 R 1/4 -> 2/7; LCS "a c d" = 3 -> 2/3
    m = compute_metrics(["a b c d"], ["a c d e f"])
    assert m["rouge1"] == pytest.approx(200 / 3, abs=1e-4)
    assert m["rouge2"] == pytest.approx(200 / 7, abs=1e-4)
    assert m["rougeL"] == pytest.approx(200 / 3, abs=1e-4)
    assert m["length_ratio"] == pytest.approx(4 / 5)
    m = compute_metrics(["R: a b c", "d"], ["a b", "c d e f"])
    assert m["length_ratio"] == pytest.approx(4 / 6)


def test_empty_prediction_and_scorer_error_count_zero():
    m = compute_metrics(["R:", "a b"], ["x y", "a b"])
    assert m["rouge1"] == pytest.approx(50.0, abs=1e-4)
    assert m["empty_predictions"] == 1 and m["rouge_errors"] == 0
    # a reference of only "." has no sentence for the rouge package: it raises, we score 0
    m = compute_metrics(["a b", "a b"], [".", "a b"])
    assert m["rouge_errors"] == 1
    assert m["rougeL"] == pytest.approx(50.0, abs=1e-4)


def test_mismatch_empty_and_format():
    with pytest.raises(ValueError):
        compute_metrics(["a"], [])
    z = compute_metrics([], [])
    assert z["n"] == 0 and z["bleu"] == 0.0 and z["length_ratio"] == 0.0
    line = format_metrics(compute_metrics(["a b"], ["a b"]))
    assert "\n" not in line and "F1 100.00" in line and "n 1" in line and line.startswith("BLEU ")


def test_rouge_score_by_hand_with_and_without_stemming():
    # same pair as LAPDOG's test above: R1 2/3, R2 2/7, RL 2/3 with either scorer
    assert rouge_score_f("a b c d", "a c d e f", stem=False) == pytest.approx((2 / 3, 2 / 7, 2 / 3))
    # stemming: [the cat are run] vs [a cat run quickli]: 2 shared of 4 -> R1 0.5, no shared
    # bigram, LCS "cat run" -> RL 0.5; unstemmed nothing is shared
    assert rouge_score_f("the cats are running", "a cat runs quickly", stem=True) == pytest.approx((0.5, 0.0, 0.5))
    assert rouge_score_f("the cats are running", "a cat runs quickly", stem=False) == (0.0, 0.0, 0.0)
    # rouge-score's own tokenizer: lowercase, punctuation dropped
    assert rouge_score_f("Hello, World!", "hello world", stem=False) == pytest.approx((1.0, 1.0, 1.0))


def test_nltk_bleu_by_hand_smoothing_and_corpus_level():
    # p1 = 2/3, p2 = 1/2, p3 = p4 = 0/1 -> method1 gives 0.1/1; equal lengths, BP = 1
    b = nltk_corpus_bleu(["a b c"], ["a b d"])
    assert b["nltk_bleu1"] == pytest.approx(2 / 3)
    assert b["nltk_bleu2"] == pytest.approx((2 / 3 * 1 / 2) ** 0.5)
    assert b["nltk_bleu4"] == pytest.approx((2 / 3 * 1 / 2 * 0.1 * 0.1) ** 0.25)
    # corpus level: counts summed before dividing: p1 = 3/4, p2 = 1/2 (not a mean of sentences)
    b = nltk_corpus_bleu(["a b", "c d"], ["a b", "c e"])
    assert b["nltk_bleu1"] == pytest.approx(3 / 4)
    assert b["nltk_bleu2"] == pytest.approx((3 / 8) ** 0.5)
    # brevity penalty: 4 hypothesis words, 5 reference words
    b = nltk_corpus_bleu(["a b c d"], ["a b c d e"])
    for k in ("nltk_bleu1", "nltk_bleu2", "nltk_bleu4"):
        assert b[k] == pytest.approx(math.exp(1 - 5 / 4))
    # a 2-word reply still adds 1 to the 3- and 4-gram denominators (nltk's rule): 0.1 each
    assert nltk_corpus_bleu(["a b"], ["a b"])["nltk_bleu4"] == pytest.approx(0.1 ** 0.5)
    # cased, whitespace tokens; no unigram match or no words at all -> 0
    assert nltk_corpus_bleu(["A b c"], ["a b c"])["nltk_bleu1"] == pytest.approx(2 / 3)
    assert nltk_corpus_bleu(["x"], ["a b"]) == {"nltk_bleu1": 0.0, "nltk_bleu2": 0.0, "nltk_bleu4": 0.0}
    assert nltk_corpus_bleu([""], ["a b"])["nltk_bleu1"] == 0.0


def test_standard_metrics_block():
    m = compute_standard_metrics(["R: the cats are running", ""], ["a cat runs quickly", "R: x y"])
    assert set(m) == set(STANDARD_KEYS)
    assert m["rs_rouge1"] == 0.0
    # (0.5 + 0 for the empty reply) / 2, x100
    assert m["rs_rouge1_stem"] == pytest.approx(25.0)
    assert m["rs_rougeL_stem"] == pytest.approx(25.0)
    assert m["nltk_bleu1"] == 0.0
    refs = ["i like to hike with my dog .", "my favorite color is blue"]
    perfect = compute_standard_metrics(refs, refs)
    assert all(v == pytest.approx(100.0) for v in perfect.values())
    assert compute_standard_metrics([], []) == {k: 0.0 for k in STANDARD_KEYS}
    with pytest.raises(ValueError):
        compute_standard_metrics(["a"], [])
    # no key collides with LAPDOG's
    assert not set(m) & set(compute_metrics(["a"], ["a"]))


def _write(path, lines):
    path.write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    return str(path)


def _run(args, cwd):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)


def test_script_end_to_end(tmp_path):
    rows = [{"query": "q", "answers": ["R: i like dogs"], "generation": "i like cats"},
            {"query": "q", "answers": ["my car is red", "x"], "generation": "R: my car is red"},
            {"answer": "hello there", "generation": "hello"}]
    path = _write(tmp_path / "res.jsonl", [json.dumps(r) for r in rows] + [""])
    out = _run([path, "--json"], cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "ROUGE-L" in out.stdout and "Dist-2" in out.stdout and "length ratio" in out.stdout
    got = json.loads(out.stdout.strip().splitlines()[-1])
    want = compute_metrics(["i like cats", "my car is red", "hello"],
                           ["i like dogs", "my car is red", "hello there"])
    for k in ("bleu", "f1", "rouge1", "rouge2", "rougeL", "dist1", "dist2", "length_ratio"):
        assert got[k] == pytest.approx(want[k])
    assert got["length_ratio"] == pytest.approx(8 / 9)
    want_std = compute_standard_metrics(["i like cats", "my car is red", "hello"],
                                        ["i like dogs", "my car is red", "hello there"])
    for k in STANDARD_KEYS:
        assert got[k] == pytest.approx(want_std[k])
    assert "LAPDOG definitions" in out.stdout and "RS ROUGE-L" in out.stdout
    assert "nltk BLEU-4" in out.stdout and "method1" in out.stdout
    plain = _run([path], cwd="/")
    assert plain.returncode == 0 and not plain.stdout.strip().splitlines()[-1].startswith("{")


def test_script_bad_json_exits_2(tmp_path):
    path = _write(tmp_path / "bad.jsonl", ['{"generation": "a", "answers": ["b"]}', "{not json"])
    out = _run([path], cwd=str(tmp_path))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}:2: invalid JSON")
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("content, where, problem", [
    (None, "", "file not found"),
    ("", "", "no results"),
    ('{"answers": ["b"]}', ":1", "'generation'"),
    ('{"generation": "a"}', ":1", "no 'answers'"),
    ('{"generation": "a", "answers": []}', ":1", "'answers'"),
    ('[1, 2]', ":1", "not a JSON object"),
])
def test_script_bad_inputs_in_process(tmp_path, capsys, content, where, problem):
    from helpers import run_entry

    path = tmp_path / "r.jsonl"
    if content is not None:
        path.write_text(content + "\n", encoding="utf-8")
    assert run_entry("compute_metrics.py", [path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}{where}: ") and problem in err[0]
