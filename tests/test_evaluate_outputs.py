"""evaluate.py keeps what it computed: evaluate-step-N.<eval>.metrics.json (and results) that never
overwrite each other nor train.py's in-loop step-N.<eval>.* files, and the step `latest` resolved to."""

import json
import math
import os
import shutil

import pytest
from helpers import ROOT, SAMPLE, run_entry

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
        # per example, the scores whose means are the metrics (for paired comparisons)
        saved_metrics = json.load(open(metrics))["metrics"]
        for key in ("f1", "rougeL", "reward"):
            assert sum(r[key] for r in rows) / len(rows) == pytest.approx(saved_metrics[key]), key
        assert {"copy_persona"} <= set(saved_metrics) and "fused_texts" not in rows[0]


def test_docs_document_every_compute_metrics_key():
    """compute_metrics.py --json prints compute_metrics' dict: docs/evaluation.md's key table names each key."""
    import re

    from src.evaluation.metrics import compute_metrics, compute_standard_metrics, copy_shares

    text = open(os.path.join(ROOT, "docs", "evaluation.md"), encoding="utf-8").read()
    table = text[text.index("| key | meaning |"):].split("\n\n", 1)[0]
    documented = {k for row in table.splitlines()[2:] for k in re.findall(r"`([^`]+)`", row.split("|")[1])}
    preds, refs = ["i like dogs .", ""], ["i like cats .", "hello there ."]
    keys = set(compute_metrics(preds, refs)) | set(compute_standard_metrics(preds, refs))  # both --json blocks
    keys |= set(copy_shares(preds, ["i like dogs ."] * 2, [["a story ."], []]))  # evaluation's own
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


def test_random_stories_ablation_fuses_other_stories_and_copy_story_is_measured(tmp_path, tiny_models, capsys):
    """--eval_stories random: the same evaluation with random corpus stories in place of the
    retrieved ones (no retrieval score: the retriever did not choose them); both give copy_story."""
    ck = fake_run(tmp_path / "run", tiny_models["reader"], [1])
    common = [f"--model_path={ck / 'step-1'}", f"--passages={SAMPLE}/stories.jsonl", "--n_context=1",
              "--retriever_n_context=2", f"--retriever_model_path={tiny_models['retriever']}", "--write_results"]
    rows, metrics = {}, {}
    for mode in ("retrieved", "random"):
        evaluate_cli(capsys, *common, f"--checkpoint_dir={tmp_path / mode}", f"--eval_stories={mode}")
        results, metrics_path = output_paths(str(tmp_path / mode / "results"), 1, "valid", "evaluate")
        rows[mode] = [json.loads(line) for line in open(results)]
        metrics[mode] = json.load(open(metrics_path))["metrics"]
    retrieved = [[p["id"] for p in r["passages"]] for r in rows["retrieved"]]
    drawn = [[p["id"] for p in r["passages"]] for r in rows["random"]]
    assert retrieved != drawn and all(len(set(ids)) == 2 for ids in drawn)
    assert all(p["score"] is None for r in rows["random"] for p in r["passages"])
    assert all(isinstance(p["score"], float) for r in rows["retrieved"] for p in r["passages"])
    assert "retrieval/top1_score" in metrics["retrieved"] and "retrieval/top1_score" not in metrics["random"]
    assert {"copy_persona", "copy_story"} <= set(metrics["random"]) and "copy_story" in metrics["retrieved"]
    assert run_entry("evaluate.py", [*common, "--eval_stories=random", "--closed_book", f"--eval_data={SAMPLE}/valid.jsonl"]) == 2
    assert "error: --eval_stories: random stories are fused, but --closed_book fuses none" in capsys.readouterr().err


def test_closed_book_evaluation_of_a_retriever_trained_checkpoint(tmp_path, tiny_models):
    """The no-story ablation of a stage-2 run: --closed_book on a checkpoint whose options train the
    retriever used to stop with "--closed_book: has no retriever to train"."""
    import evaluate

    opts = options.validate(options.parse(["--train_data", "t.jsonl", "--passages", f"{SAMPLE}/stories.jsonl",
                                           "--train_retriever", "--query_side_retriever_training"])[0])
    step = tmp_path / "checkpoint" / "step-1"
    shutil.copytree(tiny_models["reader"], step / "reader")
    (step / "options.json").write_text(json.dumps(options.to_json_dict(opts)))
    got, _ = evaluate.layered_options([f"--model_path={step}", "--closed_book", f"--eval_data={SAMPLE}/valid.jsonl"])
    assert got.closed_book and not got.train_retriever and not got.query_side_retriever_training
    again, _ = evaluate.layered_options([f"--model_path={step}", f"--eval_data={SAMPLE}/valid.jsonl"])
    assert again.train_retriever and not again.closed_book  # without --closed_book: as trained


@pytest.mark.parametrize("recipe", sorted(os.listdir(os.path.join(ROOT, "configs"))))
def test_every_recipes_checkpoint_can_be_evaluated_with_and_without_stories(tmp_path, tiny_models, recipe):
    import evaluate

    # (with an in-loop evaluation: a recipe may keep its best one, stage1_convai2.yaml does)
    opts = options.validate(options.parse(["--config", os.path.join(ROOT, "configs", recipe), "--train_data", "t.jsonl",
                                           "--passages", f"{SAMPLE}/stories.jsonl", "--eval_data", "v.jsonl",
                                           "--eval_freq", "5"])[0])
    step = tmp_path / "checkpoint" / "step-1"
    shutil.copytree(tiny_models["reader"], step / "reader")
    (step / "options.json").write_text(json.dumps(options.to_json_dict(opts)))
    base = [f"--model_path={step}", f"--eval_data={SAMPLE}/valid.jsonl"]
    assert evaluate.layered_options([*base, "--closed_book"])[0].closed_book
    random_stories, _ = evaluate.layered_options([*base, f"--passages={SAMPLE}/stories.jsonl", "--eval_stories=random"])
    assert random_stories.eval_stories == "random"


def test_decoding_flags_reach_the_replies_and_sampling_is_seeded(tmp_path, tiny_models, capsys):
    """evaluate.py's --generation_temperature / _top_p / _repetition_penalty decode the replies: the
    same seed samples the same replies, a tiny nucleus gives the greedy ones, and the evaluation
    leaves torch's random state as it found it (an in-loop evaluation must not move training's)."""
    ck = fake_run(tmp_path / "run", tiny_models["reader"], [3])

    def replies(*flags):
        evaluate_cli(capsys, f"--model_path={ck / 'latest'}", "--write_results", "--generation_max_length=8", *flags)
        newest = max((ck / n for n in os.listdir(ck) if n.endswith(".results.jsonl")), key=os.path.getmtime)
        return [json.loads(line)["generation"] for line in open(newest)]

    greedy = replies()
    hot = replies("--generation_temperature=3", "--seed=5")
    assert replies("--generation_temperature=3", "--seed=5") == hot
    assert replies("--generation_temperature=3", "--seed=6") != hot or hot != greedy
    assert replies("--generation_temperature=1", "--generation_top_p=0.000001") == greedy
    penal = replies("--generation_repetition_penalty=5")
    assert all(len(r.split()) == len(set(r.split())) for r in penal if r)  # 5x on any repeat: none here


def test_sampled_evaluation_leaves_the_random_state_as_it_found_it():
    import torch

    from src.evaluation.generation import sampling_seeded

    torch.manual_seed(0)
    state = torch.get_rng_state()
    with sampling_seeded(True, 7, torch.device("cpu")):
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), state)
    with sampling_seeded(True, 7, torch.device("cpu")):
        assert torch.equal(torch.rand(3), first)  # the same seed, the same draws
    with sampling_seeded(False, 7, torch.device("cpu")):
        torch.rand(1)  # greedy evaluation: nothing is forked or seeded
    assert not torch.equal(torch.get_rng_state(), state)
