"""Per-reply rewards against hand-computed values."""
import math

import pytest
import torch

from src.infra.errors import UsageError
from src.objectives.rewards import (
    DEFAULT_SCALE,
    distinct_ngram_share,
    grpo_reward,
    lapdog_gold_scores,
    length_penalty,
    parse_metric_scale_factors,
    reply_scores,
    rouge_l,
    scale_tuple,
    sentence_bleu,
    token_f1,
)


def test_sentence_bleu():
    assert sentence_bleu("i like my dog", "i like my dog") == pytest.approx(100.0)
    # effective order: hyp has no 4-gram, 1..3-gram precisions are 1; BP = exp(1 - 4/3)
    assert sentence_bleu("a b c", "a b c d") == pytest.approx(100 * math.exp(-1 / 3))
    assert sentence_bleu("", "a b") == 0.0
    assert sentence_bleu("Dog", "dog") < 100  # cased


def test_token_f1_unnormalized():
    # "The" != "the" and no article removal: overlap {cat, sat}: P 2/3, R 2/4 -> 4/7
    assert token_f1("The cat sat", "the cat sat down") == pytest.approx(4 / 7)
    assert token_f1("a a b", "a c") == pytest.approx(0.4)  # multiset: one "a" shared
    assert token_f1("", "a") == 0.0 and token_f1("a", "") == 0.0 and token_f1("x", "y") == 0.0


def test_rouge_l_by_hand():
    # LCS("a b c d", "a c d e f") = "a c d" = 3: P 3/4, R 3/5 -> F 2/3
    assert rouge_l("a b c d", "a c d e f") == pytest.approx(2 / 3, rel=1e-6)
    assert rouge_l("", "a") == 0.0 and rouge_l("a", "  ") == 0.0
    assert rouge_l("a b", ".") == 0.0  # the scorer raises on a sentence-less reference


def test_length_penalty_values():
    assert length_penalty(5, 10, 1.0) == pytest.approx(math.exp(-2 * 0.5))  # short: 2s
    assert length_penalty(15, 10, 1.0) == pytest.approx(math.exp(-0.5))
    assert length_penalty(10, 10, 3.0) == 1.0
    assert length_penalty(3, 10, 0.0) == 1.0 and length_penalty(0, 0, 0.0) == 1.0
    assert length_penalty(0, 0, 1.0) == pytest.approx(math.exp(-2.0))  # r treated as 1
    assert length_penalty(2, 0, 1.0) == pytest.approx(math.exp(-1.0))
    with pytest.raises(ValueError):
        length_penalty(1, 1, -0.5)
    # the short factor: 1 makes the penalty symmetric, the default 2 is the original's doubling
    assert length_penalty(5, 10, 1.0, short_factor=1.0) == pytest.approx(math.exp(-0.5))
    assert length_penalty(5, 10, 1.0, short_factor=3.0) == pytest.approx(math.exp(-1.5))
    assert length_penalty(15, 10, 1.0, short_factor=1.0) == pytest.approx(math.exp(-0.5))  # long: untouched
    assert length_penalty(15, 10, 1.0, short_factor=3.0) == pytest.approx(math.exp(-0.5))
    with pytest.raises(ValueError, match="short factor"):
        length_penalty(1, 2, 1.0, short_factor=0.0)


def test_reply_scores_strip_speaker():
    s = reply_scores(["R: a b c d", "x"], ["a c d e f", "R: y z"])
    assert set(s) == {"bleu", "f1", "rouge", "hyp_len", "ref_len"}
    assert s["hyp_len"] == [4.0, 1.0] and s["ref_len"] == [5.0, 2.0]
    assert s["f1"][0] == pytest.approx(2 / 3) and s["rouge"][0] == pytest.approx(2 / 3, rel=1e-6)
    assert s["f1"][1] == 0.0 and s["bleu"][1] == 0.0
    with pytest.raises(ValueError):
        reply_scores(["a"], [])


def test_grpo_reward_formula():
    hyps, refs = ["a b c d", "x", "a b c d e f"], ["a c d e f"] * 3
    out = grpo_reward(hyps, refs, scale=(0.01, 1.0, 1.0), length_penalty_strength=1.0)
    for k in ("reward", "bleu", "f1", "rouge", "length_ratio", "length_penalty"):
        assert out[k].dtype == torch.float32 and out[k].shape == (3,)
    bleu0 = sentence_bleu("a b c d", "a c d e f")
    lp0 = math.exp(-2 * 1.0 * 0.2)  # h 4 < r 5
    assert out["length_penalty"][0].item() == pytest.approx(lp0, rel=1e-6)
    assert out["reward"][0].item() == pytest.approx((0.01 * bleu0 + 2 / 3 + 2 / 3) * lp0, rel=1e-5)
    assert out["reward"][1].item() == 0.0
    assert out["length_ratio"].tolist() == pytest.approx([0.8, 0.2, 1.2])
    assert out["length_penalty"][2].item() == pytest.approx(math.exp(-0.2), rel=1e-6)  # long: s
    # no batch normalization: a reply's reward does not depend on the others
    alone = grpo_reward(hyps[:1], refs[:1], length_penalty_strength=1.0)["reward"]
    assert alone[0].item() == pytest.approx(out["reward"][0].item())
    # scale_rouge multiplies ROUGE by 100; strength 0 -> LP exactly 1
    big = grpo_reward(hyps[:1], refs[:1], scale={"bleu": 0, "f1": 0, "rouge": 1}, scale_rouge=True)
    assert big["reward"][0].item() == pytest.approx(200 / 3, rel=1e-5)
    assert big["length_penalty"][0].item() == 1.0


def test_distinct_ngram_share_by_hand():
    # "i love hats . i love hats .": trigrams (i love hats) (love hats .) (hats . i) (. i love)
    # (i love hats) (love hats .): 4 distinct of 6
    assert distinct_ngram_share("i love hats . i love hats .") == pytest.approx(4 / 6)
    assert distinct_ngram_share("I love hats . i LOVE hats .") == pytest.approx(4 / 6)  # lowercased
    assert distinct_ngram_share("i love my two cats") == 1.0
    assert distinct_ngram_share("hi there") == 1.0 and distinct_ngram_share("") == 1.0  # no trigram
    assert distinct_ngram_share("a a a a") == pytest.approx(1 / 2)  # (a a a) twice
    assert distinct_ngram_share("a b a b", n=2) == pytest.approx(2 / 3)


def test_grpo_reward_repetition_penalty():
    loop, plain, ref = "R: i love hats . i love hats .", "i love hats . do you ?", "i love hats . do you ?"
    base = grpo_reward([loop, plain], [ref, ref], length_penalty_strength=1.0)
    assert base["distinct3"].tolist() == pytest.approx([4 / 6, 1.0])  # "R:" stripped first
    assert base["repetition_penalty"].tolist() == [1.0, 1.0]  # strength 0 (the default): off, exactly
    pen = grpo_reward([loop, plain], [ref, ref], length_penalty_strength=1.0, repetition_penalty_strength=2.0)
    assert pen["repetition_penalty"].tolist() == pytest.approx([(4 / 6) ** 2, 1.0])
    assert pen["reward"][0].item() == pytest.approx(base["reward"][0].item() * (4 / 6) ** 2, rel=1e-6)
    assert pen["reward"][1].item() == pytest.approx(base["reward"][1].item())  # no loop: unchanged
    with pytest.raises(ValueError, match="repetition penalty strength must be >= 0"):
        grpo_reward([loop], [ref], repetition_penalty_strength=-1.0)


def test_reward_options_carry_the_repetition_penalty_and_reject_a_negative_one():
    from src.cli import options
    from src.objectives.rewards import reward_options

    opts = options.validate(options.build_parser().parse_args(
        ["--use_grpo", "--reader_rl_learning", "--reward_repetition_penalty=1.5"]))
    assert reward_options(opts)["repetition_penalty_strength"] == 1.5
    with pytest.raises(UsageError, match="--reward_repetition_penalty"):
        options.validate(options.build_parser().parse_args(["--reward_repetition_penalty=-1"]))


def test_the_length_penalty_short_factor_reaches_the_reward_from_the_options():
    from src.cli import options
    from src.objectives.rewards import reward_options

    short, ref = "i love hats", "i love red hats so much"  # h/r = 3/6
    opts = options.validate(options.build_parser().parse_args(
        ["--use_grpo", "--reader_rl_learning", "--generation_length_penalty=1", "--length_penalty_short_factor=1"]))
    kwargs = reward_options(opts)
    assert kwargs["length_penalty_short_factor"] == 1.0
    assert grpo_reward([short], [ref], **kwargs)["length_penalty"].item() == pytest.approx(math.exp(-0.5))
    default = options.validate(options.build_parser().parse_args(["--generation_length_penalty=1"]))
    assert grpo_reward([short], [ref], **reward_options(default))["length_penalty"].item() == pytest.approx(math.exp(-1.0))
    with pytest.raises(UsageError, match="--length_penalty_short_factor"):
        options.validate(options.build_parser().parse_args(["--length_penalty_short_factor=0"]))


def test_lapdog_gold_scores():
    # every BLEU 0: the normalized BLEU is 0, not NaN
    z = lapdog_gold_scores(["x", "y z"], ["a", "b c"])
    assert torch.isfinite(z).all() and z.dtype == torch.float32 and z.shape == (2,)
    assert z.tolist() == [0.0, 0.0]
    # BLEU normalized over the call: [b0, b1] / sqrt(b0^2 + b1^2)
    b = [sentence_bleu("y z", "y w"), sentence_bleu("p q r", "p q r")]
    g = lapdog_gold_scores(["y z", "p q r"], ["y w", "p q r"], scale=(1.0, 0.0, 0.0))
    assert g.tolist() == pytest.approx([x / math.hypot(*b) for x in b], rel=1e-6)
    # two perfect replies: BLEU [100, 100] / L2 norm -> 1/sqrt(2) each, F1 1, ROUGE 1
    g = lapdog_gold_scores(["my dog is big", "i eat red apples"], ["my dog is big", "i eat red apples"])
    assert g.tolist() == pytest.approx([1 / math.sqrt(2) + 2] * 2, rel=1e-6)
    g = lapdog_gold_scores(["my dog is big"], ["my dog is big"], scale=(2.0, 0.0, 1.0), scale_rouge=True)
    assert g.item() == pytest.approx(2.0 + 100.0, rel=1e-6)


def test_parse_metric_scale_factors():
    assert parse_metric_scale_factors("{'bleu':0.01,'f1':0.01,'rouge':0.01}") == {
        "bleu": 0.01, "f1": 0.01, "rouge": 0.01}
    assert parse_metric_scale_factors('{"f1": 2}') == {"bleu": 0.01, "f1": 2.0, "rouge": 1.0}
    assert parse_metric_scale_factors(None) == DEFAULT_SCALE
    assert parse_metric_scale_factors("  ") == DEFAULT_SCALE
    assert scale_tuple({"bleu": 0.5}) == (0.5, 1.0, 1.0)
    assert scale_tuple(DEFAULT_SCALE) == (0.01, 1.0, 1.0)


@pytest.mark.parametrize("bad", ["{'bleu': 'x'}", "__import__('os')", "{'foo':1}", "[1, 2]",
                                 "{'bleu': -1}", "{'bleu': True}", "{'bleu': 1e999}",
                                 "{'bleu': float('nan')}", "{bleu: 1}", "{'rouge': None}"])
def test_parse_metric_scale_factors_rejects(bad):
    with pytest.raises(UsageError) as info:
        parse_metric_scale_factors(bad)
    msg = str(info.value)
    assert msg.startswith("--metric_scale_factors: ") and "\n" not in msg and " — " in msg


def test_knowledge_recall_by_hand():
    from src.objectives.rewards import knowledge_recall

    r = knowledge_recall(["his name is max , a boxer", "his name is rex", "R: max", "i am fine"],
                         [["boxer", "max"], ["max"], ["max"], []])
    assert r.tolist() == [1.0, 0.0, 1.0, 0.0]  # both facts; the wrong name; speaker tag dropped; chit-chat: 0
    r = knowledge_recall(["a boxer named buddy"], [["boxer", "max"]])
    assert r.tolist() == [0.5]
    with pytest.raises(ValueError, match="knowledge lists"):
        knowledge_recall(["a"], [])
