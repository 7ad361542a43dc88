"""research/reader/record.py: the reader search's lab note, results.json and table from a run folder."""

import json
import os

import pytest

from research.reader import record


def fake_run(root):
    os.makedirs(root / "checkpoint" / "step-500")
    os.symlink("step-500", root / "checkpoint" / "best")
    (root / "summary.json").write_text(json.dumps({"elapsed_s": 600.0}))
    evals = [{"step": s, "eval/dev/eval_loss": loss, "eval/dev/ppl": 2.718 ** loss, "eval/dev/f1": 5.0,
              "eval/dev/rougeL": 6.0, "eval/dev/dist1": 1.0, "eval/dev/dist2": 2.0, "eval/dev/repeat3": 0.0,
              "eval/dev/generic": 90.0} for s, loss in ((250, 4.7), (250, 4.5), (500, 4.2))]  # 250: resumed, logged twice
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [{"step": 50, "loss/reader": 5}] + evals))
    for name, dist2 in (("greedy", 0.5), ("sample_p0.9", 12.0)):
        d = root / f"dev_{name}"
        d.mkdir()
        rows = [{"query": f"persona: i like tea. context:  Q: hi {i} ?", "answers": ["hello ."],
                 "generation": f"reply {i}"} for i in range(6)]
        (d / "r.results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        metrics = {"ppl": 60.0, "f1": 14.0, "rougeL": 15.0, "dist1": 5.0, "dist2": dist2, "repeat3": 0.0,
                   "generic": 5.0 if dist2 > 10 else 50.0}
        (d / "evaluate-step-500.dev.metrics.json").write_text(json.dumps(
            {"n_examples": 6, "results": str(d / "r.results.jsonl"), "metrics": metrics}))


def test_record_writes_the_note_the_table_and_the_targets(tmp_path, monkeypatch):
    monkeypatch.setattr(record, "OUT_DIR", str(tmp_path / "out"))
    fake_run(tmp_path / "run")
    assert record.main([str(tmp_path / "run"), "--name", "a", "--command", "bash research/reader/run.sh a",
                        "--train", "train.jsonl", "--decodings", "greedy", "sample_p0.9"]) == 0
    note = open(tmp_path / "out" / "a.md").read()
    assert "best dev loss at step 500" in note and "| 250 | 4.500 |" in note and "| 250 | 4.700 |" not in note
    assert "| sample_p0.9 | 60.0 | 14.00 | 15.00 | 5.00 | 12.00 | 0.0 | 5.0 | 5 of 5 |" in note
    assert "| greedy | 60.0 | 14.00 | 15.00 | 5.00 | 0.50 | 0.0 | 50.0 | 3 of 5 |" in note
    assert note.count("reply: reply") == 10 and "Q: hi 0 ?" in note  # five replies per decoding
    saved = json.load(open(tmp_path / "out" / "results.json"))
    assert saved["recipe"] is None and [r["name"] for r in saved["runs"]] == ["a"]
    # recording the run again replaces it; another run is added beside it
    record.main([str(tmp_path / "run"), "--name", "a", "--decodings", "greedy"])
    record.main([str(tmp_path / "run"), "--name", "b", "--decodings", "greedy"])
    saved = json.load(open(tmp_path / "out" / "results.json"))
    assert [r["name"] for r in saved["runs"]] == ["a", "b"] and len(saved["runs"][0]["decodings"]) == 1
    table = open(tmp_path / "out" / "RESULTS.md").read()
    assert table.count("| [a](a.md) | 500 | 4.200 | greedy |") == 1
    assert os.path.isfile(tmp_path / "out" / "curves.png")
    assert record.meets({"dist2": 10, "generic": 9.9, "repeat3": 1, "f1": 13.8, "rougeL": 20}) == {
        "dist2": True, "generic": True, "repeat3": True, "f1": False, "rougeL": True}


def test_choose_sets_the_recipe_and_dev_numbers_and_a_later_record_keeps_them(tmp_path, monkeypatch):
    monkeypatch.setattr(record, "OUT_DIR", str(tmp_path / "out"))
    fake_run(tmp_path / "run")
    record.main([str(tmp_path / "run"), "--name", "a", "--decodings", "greedy", "sample_p0.9"])
    assert record.main(["--choose", "a", "sample_p0.9", "--recipe", "configs/stage1_reads.yaml"]) == 0
    saved = json.load(open(tmp_path / "out" / "results.json"))
    assert saved["recipe"] == "configs/stage1_reads.yaml"
    assert saved["dev"]["run"] == "a" and saved["dev"]["dist2"] == 12.0 and saved["dev"]["f1"] == 14.0
    assert saved["dev"]["flags"] == record.DECODINGS["sample_p0.9"] and all(saved["dev"]["targets_met"].values())
    record.main([str(tmp_path / "run"), "--name", "b", "--decodings", "greedy"])
    assert json.load(open(tmp_path / "out" / "results.json"))["recipe"] == "configs/stage1_reads.yaml"
    for argv, says in ((["--choose", "zzz", "greedy", "--recipe", "configs/stage1_reads.yaml"], "no recorded run"),
                       (["--choose", "a", "beam4_no_repeat3", "--recipe", "configs/stage1_reads.yaml"], "no decoding"),
                       (["--choose", "a", "greedy", "--recipe", "configs/nope.yaml"], "does not exist")):
        with pytest.raises(SystemExit, match=says):
            record.main(argv)


def _dialogue_rows():
    from src.data.prompts import dialogue_question
    rows = []
    for d, persona in enumerate([["i like cats."], ["i am a pilot."], ["i grow roses."]]):
        for t in range(2):
            turns = [("Q", f"hello {d} {t}"), ("R", f"reply {d} {t}"), ("Q", f"question {d} {t}")]
            rows.append({"question": dialogue_question(persona, turns), "answers": [f"gold {d} {t}"]})
    return rows


@pytest.mark.parametrize("part", ["persona", "context", "both"])
def test_shuffle_inputs_takes_the_part_from_another_dialogue_and_keeps_the_rest(part):
    from research.reader.shuffle_inputs import shuffle_inputs
    from src.data.prompts import split_persona_context
    rows = _dialogue_rows()
    for seed in range(5):
        out = shuffle_inputs(rows, part, seed)
        assert [r["answers"] for r in out] == [r["answers"] for r in rows]  # gold replies stay put
        for old, new in zip(rows, out):
            (p0, c0), (p1, c1) = split_persona_context(old["question"]), split_persona_context(new["question"])
            own_persona = p0.split()[-1]
            if part == "persona":
                assert c1 == c0 and p1 != p0
            elif part == "context":
                assert p1 == p0 and c1 != c0 and c1.split()[2] != c0.split()[2]  # another dialogue's turns
            else:
                assert p1 != p0 and own_persona not in p1 and c1 != c0
        if part == "persona":  # one persona per dialogue: both examples of a dialogue get the same one
            new_personas = [split_persona_context(r["question"])[0] for r in out]
            assert new_personas[0] == new_personas[1] and new_personas[2] == new_personas[3]


def test_shuffle_inputs_refuses_one_dialogue_and_unknown_parts():
    from research.reader.shuffle_inputs import shuffle_inputs
    rows = _dialogue_rows()
    with pytest.raises(ValueError, match="at least two dialogues"):
        shuffle_inputs(rows[:2], "persona")
    with pytest.raises(ValueError, match="part must be"):
        shuffle_inputs(rows, "reply")
