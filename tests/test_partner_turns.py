"""The other speaker's turns as training targets (src/data/partner_turns.py,
scripts/add_partner_turns.py), on a hand-made dialogue and on the sample data."""

import json

from helpers import SAMPLE, run_script

from src.data.dialogues import load_dialogues
from src.data.partner_turns import partner_turn_examples
from src.data.prompts import context_turns, reader_query

EXAMPLES = [
    {"question": "persona: i like tea. context:  Q: hi , how are you ?", "answers": ["good , you ?"]},
    {"question": "persona: i like tea. context:  Q: hi , how are you ? R: good , you ? Q: fine . do you cook ?",
     "answers": ["i make tea ."]},
    {"question": "persona: i like tea. context:  Q: fine . do you cook ? R: i make tea . Q: nice !",
     "answers": ["thanks"]},
]


def test_turns_of_a_context():
    assert context_turns(EXAMPLES[1]["question"]) == [("Q", "hi , how are you ?"), ("R", "good , you ?"),
                                                      ("Q", "fine . do you cook ?")]


def test_each_partner_turn_once_seen_from_its_side_without_persona():
    added, stats = partner_turn_examples(EXAMPLES)
    pairs = [(ex["question"], ex["answers"][0]) for ex in added]
    assert pairs == [
        ("persona:  context:  ", "hi , how are you ?"),  # the opener, given nothing (once, though in two contexts)
        ("persona:  context:  R: hi , how are you ? Q: good , you ?", "fine . do you cook ?"),
        ("persona:  context:  R: fine . do you cook ? Q: i make tea .", "nice !"),
    ]
    assert stats == {"train": 3, "added": 3, "dropped_equal_to_eval": 0}
    # the reader's prompt then asks for the partner's next turn at the sentinel
    assert reader_query(added[1]["question"]).endswith("Q: good , you ? R: <extra_id_0>")
    added, stats = partner_turn_examples(EXAMPLES, exclude_replies=["Nice  !"])
    assert [ex["answers"][0] for ex in added] == ["hi , how are you ?", "fine . do you cook ?"]
    assert stats["dropped_equal_to_eval"] == 1


def test_script_on_the_sample_data(tmp_path):
    out = tmp_path / "train_both.jsonl"
    rc, stdout, err = run_script("scripts/add_partner_turns.py", "--train", f"{SAMPLE}/train.jsonl", "--exclude",
                                 f"{SAMPLE}/valid.jsonl", f"{SAMPLE}/test.jsonl", "--out", out)
    assert rc == 0, err
    stats = json.loads(stdout.strip().splitlines()[-1])
    train, written = load_dialogues(f"{SAMPLE}/train.jsonl"), load_dialogues(str(out))  # loads as training data
    assert stats["train"] == len(train) and len(written) == len(train) + stats["added"] and stats["added"] > 100
    assert [ex["question"] for ex in written[:len(train)]] == [ex["question"] for ex in train]
    eval_replies = {" ".join(r.lower().split()) for f in ("valid", "test")
                    for ex in load_dialogues(f"{SAMPLE}/{f}.jsonl") for r in ex["answers"]}
    assert not any(" ".join(ex["answers"][0].lower().split()) in eval_replies for ex in written[len(train):])
