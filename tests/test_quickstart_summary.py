"""src/evaluation/quickstart.py and scripts/quickstart_summary.py: the bar check and the tables over
several seeds' output folders."""

import json

import pytest
from helpers import run_script

from src.evaluation.quickstart import ARMS, KEYS, acceptance, across

PASSING = {"before": dict(zip(KEYS, [2.9, 21.2, 20.0, 10.0, 22.0, 0.56, 9.5])),
           "control": dict(zip(KEYS, [2.9, 21.2, 19.5, 10.3, 23.0, 0.57, 9.0])),
           "lapdog": dict(zip(KEYS, [7.9, 40.0, 25.0, 18.0, 29.0, 0.75, 10.0])),
           "joint_grpo": dict(zip(KEYS, [20.0, 45.0, 20.5, 17.0, 33.0, 0.57, 4.5]))}


def write_run(folder, rows):
    folder.mkdir()
    for arm in ARMS:  # evaluate.py's stdout: progress text, then one JSON line keyed by eval set
        (folder / f"eval_{arm}.log").write_text("evaluating...\n" + json.dumps({"valid": rows[arm]}) + "\n")
    return str(folder)


def with_value(arm, key, value):
    rows = json.loads(json.dumps(PASSING))
    rows[arm][key] = value
    return rows


def test_acceptance_is_met_exactly_at_the_bar():
    assert acceptance(PASSING) == []


@pytest.mark.parametrize("arm,key,value,named", [
    ("joint_grpo", "recall@1", 19.9, "joint_grpo recall@1"),
    ("joint_grpo", "recall@5", 44.9, "joint_grpo recall@5"),
    ("joint_grpo", "f1", 20.4, "joint_grpo f1"),            # control 19.5 + 1 = 20.5
    ("joint_grpo", "reward", 0.569, "joint_grpo reward"),
    ("joint_grpo", "dist1", 4.49, "joint_grpo dist1"),       # half the control's 9.0
    ("lapdog", "recall@1", 7.8, "lapdog recall@1"),          # before's 2.9 + 5
])
def test_acceptance_names_each_missed_criterion(arm, key, value, named):
    missed = acceptance(with_value(arm, key, value))
    assert len(missed) == 1 and missed[0].startswith(named)


def test_across_tables_mean_std_and_per_run_bar(tmp_path):
    a = write_run(tmp_path / "seed0", PASSING)
    b = write_run(tmp_path / "seed1", with_value("joint_grpo", "recall@1", 10.0))
    text = across([a, b])
    assert "| recall@1 (%) | 2.90 ± 0.00 | 2.90 ± 0.00 | 7.90 ± 0.00 | 15.00 ± 7.07 |" in text
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| seed")}
    assert rows["| seed0"].endswith("| met |")
    assert "missed: joint_grpo recall@1 10.0 < 20" in rows["| seed1"]
    assert "bar met on 1 of 2" in text


def test_single_run_ends_with_the_json_line_after_the_bar(tmp_path):
    out = write_run(tmp_path / "qs", with_value("lapdog", "recall@1", 3.0))
    rc, stdout, _ = run_script("scripts/quickstart_summary.py", out)
    assert rc == 0
    lines = stdout.strip().splitlines()
    assert json.loads(lines[-1]) == with_value("lapdog", "recall@1", 3.0)
    assert lines[-2].startswith("project bar (results/quickstart.md): missed: lapdog recall@1 3.0")
