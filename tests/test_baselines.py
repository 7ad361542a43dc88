"""Model-free baselines (src/evaluation/baselines.py) and the paired bootstrap
(src/evaluation/bootstrap.py), on hand-made examples with known answers."""

import math

import numpy as np
import pytest

from src.data.prompts import last_utterance
from src.evaluation.baselines import (
    baseline_replies,
    best_constant_reply,
    nearest_neighbour_replies,
    persona_copy_replies,
    random_human_replies,
)
from src.evaluation.bootstrap import paired_bootstrap_ci, seed_t_interval
from src.evaluation.metrics import squad_f1


def ex(persona, context, reply):
    return {"question": f"persona: {persona} context:  {context}", "answers": [reply]}


def test_best_constant_reply_by_hand_and_against_brute_force():
    replies = ["i like dogs .", "i like cats .", "hello .", "I like DOGS"]
    best, f1 = best_constant_reply(replies)
    # "i like dogs" scores 1, 2/3, 0 and 1 against the four (SQuAD normalization: case, punctuation)
    assert best == "i like dogs ." and f1 == pytest.approx((1 + 2 / 3 + 0 + 1) / 4)
    brute = max(sum(squad_f1(c, r) for r in replies) / len(replies) for c in replies)
    assert f1 == pytest.approx(brute)
    rng = np.random.default_rng(0)
    words = "i you like dogs cats do what love my a".split()
    many = [" ".join(rng.choice(words, size=rng.integers(1, 6))) for _ in range(60)]
    best, f1 = best_constant_reply(many)
    assert f1 == pytest.approx(max(sum(squad_f1(c, r) for r in many) / 60 for c in many))
    with pytest.raises(ValueError):
        best_constant_reply(["", " . "])


def test_nearest_neighbour_persona_copy_and_random_human():
    train = [ex("i sing.", "Q: hi ! R: hello . Q: do you have dogs ?", "yes , a poodle ."),
             ex("i run.", "Q: what do you do for a living ?", "i am a nurse ."),
             ex("i read.", "Q: how are you today ?", "great , thanks .")]
    test = [ex("i am a chef. i have a cat.", "Q: hey ! R: hi ! Q: what do you do for work ?", "i cook ."),
            ex("i like tea. i have two dogs.", "Q: do you have dogs ?", "yes !")]
    assert last_utterance(test[0]["question"]) == "what do you do for work ?"
    assert nearest_neighbour_replies(train, test) == ["i am a nurse .", "yes , a poodle ."]
    assert persona_copy_replies(test) == ["i am a chef.", "i have two dogs."]
    picks = random_human_replies(train, test * 10, seed=3)
    assert picks == random_human_replies(train, test * 10, seed=3) and set(picks) <= {t["answers"][0] for t in train}
    replies, constant = baseline_replies(train, test)
    assert set(replies) == {"constant", "nearest_neighbour", "persona_copy", "random_human"}
    assert replies["constant"] == [constant] * 2 and all(len(v) == 2 for v in replies.values())


def test_paired_bootstrap_known_answers():
    # every example differs by exactly 0.5: the interval is that point
    assert paired_bootstrap_ci(np.full((3, 50), 0.5)) == pytest.approx((0.5, 0.5, 0.5))
    # a 0/1 difference with mean 0.3 on 4000 examples: the normal interval 0.3 ± 1.96·sqrt(0.21/4000)
    d = np.zeros(4000)
    d[:1200] = 1.0
    mean, low, high = paired_bootstrap_ci(d, n_resamples=4000, seed=1)
    half = 1.96 * math.sqrt(0.3 * 0.7 / 4000)
    assert mean == pytest.approx(0.3) and low == pytest.approx(0.3 - half, abs=0.003)
    assert high == pytest.approx(0.3 + half, abs=0.003)
    # seeds are pooled per example: two seeds that cancel on every example give exactly 0
    assert paired_bootstrap_ci(np.stack([d, -d])) == pytest.approx((0.0, 0.0, 0.0))
    assert paired_bootstrap_ci(d, seed=5) == paired_bootstrap_ci(d, seed=5)
    with pytest.raises(ValueError):
        paired_bootstrap_ci(np.zeros((2, 0)))


def test_seed_t_interval_by_hand():
    # [1, 2, 3]: mean 2, sd 1, se 1/sqrt(3), t(0.975, 2 df) = 4.302653 -> half-width 2.484138
    mean, low, high = seed_t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and low == pytest.approx(2 - 2.484138, abs=1e-6) and high == pytest.approx(2 + 2.484138, abs=1e-6)
    # two seeds: t(0.975, 1 df) = 12.706205; [0, 2]: sd sqrt(2), se 1 -> 1 ± 12.706205
    assert seed_t_interval([0.0, 2.0])[1:] == pytest.approx((1 - 12.706205, 1 + 12.706205), abs=1e-6)
    mean, low, high = seed_t_interval([4.0])  # one seed: no interval
    assert mean == 4.0 and math.isnan(low) and math.isnan(high)
    assert seed_t_interval([5.0, 5.0, 5.0]) == (5.0, 5.0, 5.0)
    with pytest.raises(ValueError):
        seed_t_interval([])
