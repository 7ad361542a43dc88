import json

from scripts import retriever_oracle


def test_oracle_run_prints_a_curve_and_one_json_line(tiny_models, capsys):
    retriever_oracle.main(["--retriever", tiny_models["retriever"], "--batch", "4", "--steps", "2",
                           "--eval_every", "1", "--pool", "4", "--max_length", "32"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("step    0  valid recall@1")
    result = json.loads(lines[-1])
    assert [c["step"] for c in result["curve"]] == [0, 1, 2]
    assert result["before"] == result["curve"][0]["valid"] and result["after"] == result["curve"][-1]["valid"]
    assert all(0 <= v <= 100 for c in result["curve"] for v in c["valid"])


def test_supervised_ceiling_runs(tiny_models, capsys):
    retriever_oracle.main(["--retriever", tiny_models["retriever"], "--batch", "4", "--steps", "1",
                           "--objective", "supervised", "--max_length", "32"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["config"]["objective"] == "supervised"
