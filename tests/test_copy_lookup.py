"""research/probes/copy_lookup.py: the copy-lookup diagnostic's task is what it says, and it runs."""

import json
import random

from helpers import run_script

from research.probes import copy_lookup


def test_lookup_target_is_the_word_after_the_key():
    words = [f"word{c}" for c in "abcdefghij"]
    rng = random.Random(0)
    for _ in range(50):
        text, target = copy_lookup.lookup_example(words, rng)
        head, body = text.split(": ", 1)
        key = head.split()[1]
        tokens = body.split()
        assert key in copy_lookup.KEYS and len(tokens) == 7 and tokens.count(key) == 1
        assert tokens[tokens.index(key) + 1] == target and target in words


def test_runs_and_reports_a_curve(tiny_models):
    rc, out, err = run_script("research/probes/copy_lookup.py", "--reader", tiny_models["reader"], "--steps", "4",
                              "--batch", "4", "--eval_every", "2", "--eval_examples", "8", "--vocab", "50")
    assert rc == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert [c["step"] for c in result["curve"]] == [2, 4]
    assert all(0.0 <= c["accuracy"] <= 1.0 for c in result["curve"])


def test_missing_reader_is_one_error_line(tmp_path):
    rc, _, err = run_script("research/probes/copy_lookup.py", "--reader", tmp_path)
    assert rc == 2 and err.strip().startswith("error: --reader")
