"""evaluate.py keeps what it computed: evaluate-step-N.<eval>.metrics.json (and results) that never
overwrite each other nor train.py's in-loop step-N.<eval>.* files, and the step `latest` resolved to."""

import json
import math
import os
import shutil

import pytest
from helpers import SAMPLE, run_entry

from src.cli import options
from src.evaluation.generation import output_paths, unused_output_paths


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
    assert run_entry("evaluate.py", [f"--eval_data={SAMPLE}/valid.jsonl", "--max_eval_examples=3", "--generation_max_length=4",
                          "--per_gpu_eval_batch_size=3", *argv]) == 0
    return capsys.readouterr().out


def test_output_paths_carry_the_step():
    assert output_paths("d", 7, "valid") == ("d/step-7.valid.results.jsonl", "d/step-7.valid.metrics.json")
    assert output_paths("d", None, "valid") == ("d/valid.results.jsonl", "d/valid.metrics.json")
    assert output_paths("d", 7, "valid", "evaluate") == ("d/evaluate-step-7.valid.results.jsonl",
                                                         "d/evaluate-step-7.valid.metrics.json")
    assert output_paths("d", None, "valid", "evaluate-2")[1] == "d/evaluate-2.valid.metrics.json"


def test_evaluate_never_overwrites_another_evaluation(tmp_path):
    """evaluate.py --checkpoint_dir pointed at the training run used to overwrite its in-loop
    results/step-10.valid.metrics.json (n = 40) with its own (n = 4)."""
    d = tmp_path / "results"
    d.mkdir()
    (d / "step-10.valid.metrics.json").write_text("{}")  # the in-loop evaluation
    first = unused_output_paths(str(d), 10, "valid")
    assert first == output_paths(str(d), 10, "valid", "evaluate")
    open(first[0], "w").close()  # an earlier evaluate.py run (its results file is enough)
    assert unused_output_paths(str(d), 10, "valid") == output_paths(str(d), 10, "valid", "evaluate-2")


def test_evaluation_writes_metrics_per_step_and_names_latest(tmp_path, tiny_models, capsys):
    ck = fake_run(tmp_path / "run", tiny_models["reader"], [3, 5])
    out = evaluate_cli(capsys, f"--model_path={ck / 'latest'}")
    assert f"evaluating {ck / 'step-5'} (step 5, {ck / 'latest'} resolved)" in out
    saved = json.load(open(ck / "evaluate-step-5.valid.metrics.json"))
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
        results, metrics = output_paths(str(elsewhere / "results"), step, "valid", "evaluate")
        assert len(open(results).readlines()) == 3
        assert json.load(open(metrics))["step"] == step and json.load(open(metrics))["results"] == results
        assert f"metrics written to {metrics}" in out or step == 3
        # the perplexity is per gold-reply token, over the whole evaluation (not a mean of per-example ones)
        rows = [json.loads(line) for line in open(results)]
        by_hand = math.exp(sum(r["reply_nll"] for r in rows) / sum(r["reply_tokens"] for r in rows))
        assert json.load(open(metrics))["metrics"]["ppl"] == pytest.approx(by_hand)


def test_docs_document_every_compute_metrics_key():
    """compute_metrics.py --json prints compute_metrics' dict: docs/evaluation.md's key table names each key."""
    import re

    from helpers import ROOT

    from src.evaluation.metrics import compute_metrics, compute_standard_metrics

    text = open(os.path.join(ROOT, "docs", "evaluation.md"), encoding="utf-8").read()
    table = text[text.index("| key | meaning |"):].split("\n\n", 1)[0]
    documented = {k for row in table.splitlines()[2:] for k in re.findall(r"`([^`]+)`", row.split("|")[1])}
    preds, refs = ["i like dogs .", ""], ["i like cats .", "hello there ."]
    keys = set(compute_metrics(preds, refs)) | set(compute_standard_metrics(preds, refs))  # both --json blocks
    assert keys - documented == set(), f"undocumented compute_metrics keys: {keys - documented}"
    assert documented - keys == set(), f"documented keys it does not return: {documented - keys}"


def test_evaluate_in_a_training_run_keeps_its_in_loop_files_and_prints_every_number(tmp_path, tiny_models, capsys):
    """The console line has reward, eval_loss and ppl besides the overlap metrics; a second
    evaluate.py run gets its own numbered files; no progress bar where stderr is not a terminal."""
    ck = fake_run(tmp_path / "run", tiny_models["reader"], [10])
    results = tmp_path / "run" / "results"
    results.mkdir()
    (results / "step-10.valid.metrics.json").write_text('{"n_examples": 40}')
    argv = [f"--eval_data={SAMPLE}/valid.jsonl", "--max_eval_examples=3", f"--model_path={ck / 'step-10'}",
            f"--checkpoint_dir={tmp_path / 'run'}"]
    for tag in ("evaluate", "evaluate-2"):
        assert run_entry("evaluate.py", argv) == 0
        captured = capsys.readouterr()
        assert f"metrics written to {results / f'{tag}-step-10.valid.metrics.json'}" in captured.out
        # (pytest's captured stderr is no terminal: tqdm used to write its \r redraws there)
        assert "\r" not in captured.err
    assert json.load(open(results / "step-10.valid.metrics.json")) == {"n_examples": 40}
    line = next(ln for ln in captured.out.splitlines() if ln.startswith("valid: BLEU"))
    assert all(f"| {k} " in line for k in ("reward", "eval_loss", "ppl")), line


def test_all_empty_replies_are_a_warning(tmp_path, tiny_models, capsys, monkeypatch):
    from src.model.reader import FiDReader
    ck = fake_run(tmp_path / "run", tiny_models["reader"], [1])
    monkeypatch.setattr(FiDReader, "generate_text", lambda self, ids, *a, **k: [""] * ids.shape[0])
    assert run_entry("evaluate.py", [f"--eval_data={SAMPLE}/valid.jsonl", "--max_eval_examples=3",
                                     f"--model_path={ck / 'step-1'}"]) == 0
    err = capsys.readouterr().err
    assert "warning: eval valid: every generated reply is empty (3 examples)" in err
