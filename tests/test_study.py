"""scripts/study.py and its helpers: persona split, plan, report tables; the tiny study end to end."""
import json
import os
import sys

import pytest

from conftest import SAMPLE
from scripts import study, study_report, study_split
from src.errors import UsageError


def _q(persona, context="Q: hi"):
    return f"persona: {persona} context:  {context}"


def _dialogues(path, personas, per_persona=3):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(per_persona):
            for p in personas:
                f.write(json.dumps({"question": _q(p, f"Q: turn {i}"), "answers": [f"reply {i} of {p}"]}) + "\n")
    return str(path)


# ---- split -----------------------------------------------------------------------------------

def test_persona_of():
    assert study_split.persona_of("persona: i like dogs. i am tall. context:  Q: hi") == "i like dogs. i am tall."
    with pytest.raises(ValueError):
        study_split.persona_of("context: Q: hi")


def test_split_counts_by_hand():
    assert study_split.split_counts(992, (0.8, 0.1, 0.1)) == (794, 99, 99)
    assert study_split.split_counts(5, (0.8, 0.1, 0.1)) == (3, 1, 1)  # at least one dev and test persona
    with pytest.raises(UsageError):
        study_split.split_counts(10, (0.5, 0.5, 0.5))
    with pytest.raises(UsageError):
        study_split.split_counts(2, (0.0, 0.5, 0.5))


def test_split_by_persona_is_disjoint_deterministic_and_seeded():
    personas = [f"p{i % 20}" for i in range(100)]
    a = study_split.split_by_persona(personas, seed=0)
    assert a == study_split.split_by_persona(list(personas), seed=0)
    assert a != study_split.split_by_persona(personas, seed=1)
    sets = {k: {personas[i] for i in v} for k, v in a.items()}
    assert not (sets["train"] & sets["dev"] or sets["train"] & sets["test"] or sets["dev"] & sets["test"])
    assert [len(sets[k]) for k in ("train", "dev", "test")] == [16, 2, 2]
    assert sorted(i for v in a.values() for i in v) == list(range(100))
    assert all(v == sorted(v) for v in a.values())  # input order kept


def test_write_split_files_and_manifest(tmp_path):
    src = _dialogues(tmp_path / "d.jsonl", [f"i am person {i}." for i in range(10)])
    m = study_split.write_split(src, str(tmp_path / "split"), seed=3)
    assert m["seed"] == 3 and m["source_sha256"] == study_split.sha256_of(src)
    assert {k: v["personas"] for k, v in m["splits"].items()} == {"train": 8, "dev": 1, "test": 1}
    assert sum(v["examples"] for v in m["splits"].values()) == 30
    lines = open(src).read().splitlines()
    for name in ("train", "dev", "test"):
        got = open(tmp_path / "split" / f"{name}.jsonl").read().splitlines()
        assert set(got) <= set(lines) and len(got) == m["splits"][name]["examples"]
    assert json.load(open(tmp_path / "split" / "split.json")) == m
    assert "split by persona (seed 3)" in study_split.describe(m)


def test_split_errors(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        study_split.write_split(str(tmp_path / "missing.jsonl"), str(tmp_path / "o"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": _q("a.")}) + "\n" + json.dumps({"question": "no markers"}) + "\n")
    with pytest.raises(UsageError, match=r"bad.jsonl:2: "):
        study_split.write_split(str(bad), str(tmp_path / "o"))


# ---- plan --------------------------------------------------------------------------------------

def _flag(cmd, name):
    vals = [c.split("=", 1)[1] for c in cmd if c.startswith(f"--{name}=")]
    return vals[-1] if vals else None


def test_check_arms():
    study.check_arms(list(study.DEFAULT_ARMS))
    with pytest.raises(UsageError, match="unknown arm"):
        study.check_arms(["control", "nope"])
    with pytest.raises(UsageError, match="control"):
        study.check_arms(["grpo"])
    bad = dict(study.ARMS, greedy={"retrieval": True, "evals": ("retrieval",), "about": "",
                                   "flags": ["--total_steps=5"]})
    with pytest.raises(UsageError, match="--total_steps"):
        study.check_arms(["control"], bad)


def test_plan_shares_checkpoint_steps_and_batch():
    args = study.parse_args(["--scale", "cpu", "--s2_steps", "40", "--arms", *study.ARMS])
    sizes = study.sizes_of(args)
    assert sizes["s2_steps"] == 40 and sizes["refresh"] == 10
    paths = {k: f"/{k}" for k in ("train", "dev", "test", "stories", "reader", "retriever")}
    steps = study.plan(list(study.ARMS), [0, 1], paths, sizes, "/out")
    trains = [s for s in steps if s[0] == "train" and "stage 1" not in s[1]]
    assert len(trains) == 2 * len(study.ARMS)
    for _, label, _, cmd in trains:
        seed = label.split()[1]
        assert _flag(cmd, "model_path") == f"/out/seed{seed}/stage1/checkpoint/latest"
        assert (_flag(cmd, "total_steps"), _flag(cmd, "per_gpu_batch_size"), _flag(cmd, "accumulation_steps")) \
            == ("40", "4", "1")
        assert _flag(cmd, "train_data") == "/train" and _flag(cmd, "eval_data") == "/dev"
    evals = {s[1]: s[3] for s in steps if s[0] == "eval"}
    closed = evals["seed 0 eval control (closed_book)"]
    assert _flag(closed, "passages") is None and _flag(closed, "eval_data") == "/test"
    assert _flag(evals["seed 0 eval control (retrieval)"], "passages") == "/stories"
    assert all(_flag(c, "generation_length_penalty") == "1.0" for c in evals.values())
    lap = next(c for _, label, _, c in trains if label == "seed 0 lapdog")
    assert (_flag(lap, "temperature_score"), _flag(lap, "temperature_gold")) == ("0.8", "0.85")
    joint = next(c for _, label, _, c in trains if label == "seed 0 joint_grpo")
    assert "--grpo_train_retriever" in joint and _flag(joint, "grpo_retriever_pool_size") == "8"


def test_plan_shares_the_pretrained_index_except_where_the_passage_side_trains():
    sizes = study.sizes_of(study.parse_args(["--scale", "cpu"]))
    paths = {k: f"/{k}" for k in ("train", "dev", "test", "stories", "reader", "retriever")}
    steps = {label: cmd for _, label, _, cmd in study.plan(list(study.ARMS), [0, 1], paths, sizes, "/out")}
    shared = "/out/index-pretrained"
    assert _flag(steps["seed 0 stage 1"], "save_index_path") == shared
    assert _flag(steps["seed 1 stage 1"], "load_index_path") == shared
    for label in ("seed 1 control", "seed 0 grpo", "seed 0 joint_grpo", "seed 1 eval control (retrieval)",
                  "seed 0 eval joint_grpo (retrieval)"):
        assert _flag(steps[label], "load_index_path") == shared, label
    # LAPDOG re-embeds the corpus with its trained passage side; closed book needs no index.
    for label in ("seed 0 lapdog", "seed 0 eval lapdog (retrieval)", "seed 0 eval control (closed_book)"):
        assert _flag(steps[label], "load_index_path") is None and _flag(steps[label], "save_index_path") is None


@pytest.mark.parametrize("scale", ["tiny", "cpu", "gpu"])
def test_every_command_passes_train_and_evaluate_option_checks(scale):
    """Every arm's recipe at every scale is accepted by the options train.py / evaluate.py use
    (the end-to-end test runs only two arms, to stay fast)."""
    from src import options
    sizes = study.sizes_of(study.parse_args(["--scale", scale]))
    paths = {k: f"/{k}" for k in ("train", "dev", "test", "stories", "reader", "retriever")}
    steps = study.plan(list(study.ARMS), [0], paths, sizes, "/out")
    assert len([s for s in steps if s[0] == "train"]) == 1 + len(study.ARMS)
    for _, label, _, cmd in steps:
        opts, _ = options.parse(cmd[1:])
        options.validate(opts)  # raises UsageError with the offending flag


def test_missing_data_is_one_line_exit_2(tmp_path, capsys):
    assert study.main(["--data_dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "not found" in err[0]


def test_an_output_folder_keeps_its_settings(tmp_path):
    out = str(tmp_path / "o")
    study.check_same_settings(out, {"sizes": {"s2_steps": 10}, "split_seed": 0})
    study.check_same_settings(out, {"sizes": {"s2_steps": 10}, "split_seed": 0})  # same: fine
    with pytest.raises(UsageError, match=r"sizes: .*s2_steps.* -> .*20"):
        study.check_same_settings(out, {"sizes": {"s2_steps": 20}, "split_seed": 0})


def test_dry_run_writes_the_split_only(tmp_path, capsys):
    src = _dialogues(tmp_path / "d.jsonl", [f"i am person {i}." for i in range(10)])
    out = tmp_path / "o"
    assert study.main(["--dry_run", "--dialogues", src, "--stories", f"{SAMPLE}/stories.jsonl",
                       "--out", str(out), "--seeds", "0"]) == 0
    printed = capsys.readouterr().out
    assert "seed 0 joint_grpo: train.py" in printed and "split by persona" in printed
    assert sorted(os.listdir(out)) == ["split"]


def test_eval_metrics_reads_results_and_evaluate_json(tmp_path):
    rows = [{"query": "q", "answers": ["a b c"], "generation": "a b c"},
            {"query": "q", "answers": ["x y"], "generation": "x"}]
    (tmp_path / "test.results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    own = {"test": {"bleu": 1.0, "reward": 0.25, "eval_loss": 2.0, "recall@1": 50.0, "recall@4": 75.0}}
    (tmp_path / "study.log").write_text("loading\neval test: 100%|#| 1/1\r" + "test: BLEU 1.0\n"
                                         "eval test: 100%\r" + json.dumps(own) + "\n")
    m = study.eval_metrics(str(tmp_path), "/somewhere/test.jsonl")
    assert m["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2) and "rs_rougeL_stem" in m
    assert (m["reward"], m["eval_loss"], m["recall@1"], m["recall@4"]) == (0.25, 2.0, 50.0, 75.0)
    assert m["bleu"] != 1.0  # corpus metrics come from the results file, not evaluate's line


def test_run_step_runs_once_then_skips_and_names_the_log_on_failure(tmp_path):
    commands = str(tmp_path / "commands.sh")
    script = tmp_path / "ok.py"
    script.write_text("print('hello')\n")
    folder = str(tmp_path / "step")
    info = study.run_step("step", folder, [str(script)], 1, commands)
    assert open(os.path.join(folder, "study.log")).read() == "hello\n"
    assert study.run_step("step", folder, [str(script), "--changed"], 1, commands) == info  # skipped
    assert open(commands).read().splitlines() == [f"{sys.executable} {script}"]
    bad = tmp_path / "bad.py"
    bad.write_text("raise SystemExit(3)\n")
    with pytest.raises(study.StepFailed, match=r"bad: .* exited 3 — see .*study.log"):
        study.run_step("bad", str(tmp_path / "bad"), [str(bad)], 1, commands)
    assert not os.path.exists(tmp_path / "bad" / study.DONE)


# ---- report ----------------------------------------------------------------------------------

def _m(**kw):
    base = {"n": 10, "empty_predictions": 0, "bleu": 2.0, "f1": 10.0, "rouge1": 12.0, "rouge2": 2.0, "rougeL": 11.0,
            "dist1": 8.0, "dist2": 30.0, "length_ratio": 1.0}
    return {**base, **kw}


ROWS = [{"arm": "control", "eval": "retrieval", "seed": 0, "metrics": _m(f1=10.0)},
        {"arm": "control", "eval": "retrieval", "seed": 1, "metrics": _m(f1=12.0)},
        {"arm": "grpo", "eval": "retrieval", "seed": 0, "metrics": _m(f1=13.0, dist1=7.0)},
        {"arm": "grpo", "eval": "retrieval", "seed": 1, "metrics": _m(f1=15.0, dist1=1.0)}]


def test_mean_std_and_relative_change_by_hand():
    assert study_report.mean_std([10.0, 12.0]) == pytest.approx((11.0, 2 ** 0.5))
    assert study_report.mean_std([3.0]) == (3.0, 0.0)
    assert study_report.relative_change(14.0, 11.0) == pytest.approx(300 / 11)
    assert study_report.relative_change(1.0, 0.0) != study_report.relative_change(1.0, 0.0)  # NaN


def test_table_shows_change_vs_control_and_collapsed_seeds():
    md = study_report.table(ROWS, study_report.MAIN_COLUMNS)
    lines = md.splitlines()
    control = next(line for line in lines if line.startswith("| **control**"))
    assert "11.00 ± 1.41" in control and "%" not in control
    grpo = next(line for line in lines if line.startswith("| grpo"))
    assert "14.00 ± 1.41 (+27.3%)" in grpo
    seed1 = next(line for line in lines if "seed 1" in line)
    assert "⚠ Dist-1 1.00 < 0.5 x control 8.00" in seed1 and "| 15.00 |" in seed1
    assert study_report.collapsed_conditions(ROWS) == ["grpo (retrieval) seed 1: Dist-1 1.00 < 0.5 x control 8.00"]
    empty = [dict(ROWS[0], metrics=_m(empty_predictions=2))]
    assert "2/10 empty" in study_report.collapsed_conditions(empty)[0]
    assert len(study_report.per_seed_table(ROWS, study_report.MAIN_COLUMNS).splitlines()) == 2 + len(ROWS)


def test_plot_bars_writes_png(tmp_path):
    out = study_report.plot_bars(ROWS, str(tmp_path / "bars.png"))
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


# ---- end to end --------------------------------------------------------------------------------

@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path, tiny_models):
    """Split -> stage 1 -> control + joint GRPO -> test evaluations -> RESULTS.md + figures."""
    lines = open(f"{SAMPLE}/train.jsonl").read().splitlines()[:60]  # 11 personas
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "s.jsonl").write_text("\n".join(open(f"{SAMPLE}/stories.jsonl").read().splitlines()[:40]) + "\n")
    out = tmp_path / "study"
    args = ["--tiny", "--dialogues", str(tmp_path / "d.jsonl"), "--stories", str(tmp_path / "s.jsonl"),
            "--reader_model", tiny_models["reader"], "--retriever_model", tiny_models["retriever"],
            "--seeds", "0", "--arms", "control", "joint_grpo", "--out", str(out), "--publish", str(tmp_path / "pub")]
    assert study.main(args) == 0
    md = (out / "RESULTS.md").read_text()
    assert "Tiny mode" in md and "split by persona (seed 0)" in md and "nproc" in md
    for row in ("**control** (retrieval)", "control (closed_book)", "joint_grpo (retrieval)"):
        assert row in md
    assert "RS R-L" in md and "nltk B-4" in md and "commands.sh" in md
    results = json.load(open(out / "results.json"))
    assert {(r["arm"], r["eval"]) for r in results["rows"]} == \
        {("control", "retrieval"), ("control", "closed_book"), ("joint_grpo", "retrieval")}
    assert all("rs_rougeL" in r["metrics"] and "reward" in r["metrics"] for r in results["rows"])
    for name in ("bars.png", "curves_seed0.png", "stage1.png"):
        assert (out / "figures" / name).stat().st_size > 10_000
        assert (tmp_path / "pub" / "figures" / name).exists()
    assert (tmp_path / "pub" / "RESULTS.md").exists()
    assert len(open(out / "commands.sh").read().splitlines()) == 6  # stage 1, 2 arms, 3 evaluations
