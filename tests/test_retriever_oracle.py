"""research/probes/retriever_oracle.py runs and reports its curve as one JSON line."""
import json

from helpers import run_script


def test_oracle_run_prints_a_curve_and_one_json_line(tiny_models):
    rc, out, err = run_script("research/probes/retriever_oracle.py", "--retriever", tiny_models["retriever"], "--batch",
                              "4", "--steps", "2", "--eval_every", "1", "--pool", "4", "--max_length", "32")
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("step    0  valid recall@1")
    result = json.loads(lines[-1])
    assert [c["step"] for c in result["curve"]] == [0, 1, 2]
    assert result["before"] == result["curve"][0]["valid"] and result["after"] == result["curve"][-1]["valid"]
    assert all(0 <= v <= 100 for c in result["curve"] for v in c["valid"])


def test_supervised_ceiling_runs(tiny_models):
    rc, out, err = run_script("research/probes/retriever_oracle.py", "--retriever", tiny_models["retriever"], "--batch",
                              "4", "--steps", "1", "--objective", "supervised", "--max_length", "32")
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1])["config"]["objective"] == "supervised"
