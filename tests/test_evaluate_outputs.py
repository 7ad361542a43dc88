"""evaluate.py keeps what it computed: step-N.<eval>.metrics.json (and results) that never overwrite
each other, the same names as train.py's in-loop evaluations, and the step `latest` resolved to."""

import json
import os
import shutil

from conftest import SAMPLE
from src import options
from src.evaluation import output_paths


def fake_run(root, reader_dir, steps):
    """{root}/checkpoint/step-N (a closed-book reader + options.json) for each N; latest -> the last."""
    opts = options.validate(options.parse(["--closed_book", "--train_data", "t.jsonl"])[0])
    for step in steps:
        d = root / "checkpoint" / f"step-{step}"
        shutil.copytree(reader_dir, d / "reader")
        (d / "options.json").write_text(json.dumps(options.to_json_dict(opts)))
    os.symlink(f"step-{steps[-1]}", root / "checkpoint" / "latest")
    return root / "checkpoint"


def evaluate_cli(capsys, *argv):
    import evaluate

    assert evaluate.main([f"--eval_data={SAMPLE}/valid.jsonl", "--max_eval_examples=3", "--generation_max_length=4",
                          "--per_gpu_eval_batch_size=3", *argv]) == 0
    return capsys.readouterr().out


def test_output_paths_carry_the_step():
    assert output_paths("d", 7, "valid") == ("d/step-7.valid.results.jsonl", "d/step-7.valid.metrics.json")
    assert output_paths("d", None, "valid") == ("d/valid.results.jsonl", "d/valid.metrics.json")


def test_evaluation_writes_metrics_per_step_and_names_latest(tmp_path, tiny_models, capsys):
    ck = fake_run(tmp_path / "run", tiny_models["reader"], [3, 5])
    out = evaluate_cli(capsys, f"--model_path={ck / 'latest'}")
    assert f"evaluating {ck / 'step-5'} (step 5, {ck / 'latest'} resolved)" in out
    saved = json.load(open(ck / "step-5.valid.metrics.json"))
    assert saved["step"] == 5 and saved["eval"] == "valid" and saved["n_examples"] == 3
    assert saved["model_path"] == str(ck / "step-5") and saved["results"] is None
    assert {"bleu", "f1", "rougeL", "eval_loss", "reward"} <= set(saved["metrics"])
    assert saved["metrics"] == json.loads(out.strip().splitlines()[-1])["valid"]

    # --checkpoint_dir: {dir}/results/, as train.py's in-loop evaluations; other steps keep their files
    elsewhere = tmp_path / "evals"
    for step in (3, 5):
        out = evaluate_cli(capsys, f"--model_path={ck / f'step-{step}'}", f"--checkpoint_dir={elsewhere}",
                           "--write_results")
        assert f"(step {step})" in out
    for step in (3, 5):
        results, metrics = output_paths(str(elsewhere / "results"), step, "valid")
        assert len(open(results).readlines()) == 3
        assert json.load(open(metrics))["step"] == step and json.load(open(metrics))["results"] == results
        assert f"metrics written to {metrics}" in out or step == 3


def test_readme_documents_every_compute_metrics_key():
    """compute_metrics.py --json prints compute_metrics' dict: the README's key table names each key."""
    import re

    from conftest import ROOT
    from src.metrics import compute_metrics, compute_standard_metrics

    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    table = text[text.index("| key | meaning |"):].split("\n\n", 1)[0]
    documented = {k for row in table.splitlines()[2:] for k in re.findall(r"`([^`]+)`", row.split("|")[1])}
    preds, refs = ["i like dogs .", ""], ["i like cats .", "hello there ."]
    keys = set(compute_metrics(preds, refs)) | set(compute_standard_metrics(preds, refs))  # both --json blocks
    assert keys - documented == set(), f"undocumented compute_metrics keys: {keys - documented}"
    assert documented - keys == set(), f"documented keys it does not return: {documented - keys}"
