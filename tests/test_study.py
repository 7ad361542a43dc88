"""The study (research/study/): persona split, plan, results.json and RESULTS.md from known numbers;
the tiny study end to end through research/study/run.py."""
import json
import os
import re

import pytest
from helpers import ROOT, SAMPLE, run_script

from research.study import plan as study_plan
from research.study import report as study_report
from research.study import split as study_split
from src.cli import options
from src.infra.errors import UsageError


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

PATHS = {"train": "s/train.jsonl", "dev": "s/dev.jsonl", "test": "s/test.jsonl", "stories": "st.jsonl",
         "index": "out/index", "reader_init": "out/models/reader", "retriever": "out/models/retriever",
         "reader": "out/pretrained/reader"}


def _flag(cmd, name):
    vals = [c.split("=", 1)[1] for c in cmd if c.startswith(f"--{name}=")]
    return vals[-1] if vals else None


def test_check_arms():
    study_plan.check_arms(list(study_plan.DEFAULT_ARMS))
    with pytest.raises(UsageError, match="unknown arm"):
        study_plan.check_arms(["control", "nope"])
    with pytest.raises(UsageError, match="control"):
        study_plan.check_arms(["grpo"])
    bad = dict(study_plan.ARMS, greedy={"config": "configs/grpo.yaml", "about": "", "flags": ["--total_steps=5"]})
    with pytest.raises(UsageError, match="--total_steps"):
        study_plan.check_arms(["control"], bad)
    missing = dict(study_plan.ARMS, other={"config": "configs/nope.yaml", "about": "", "flags": []})
    with pytest.raises(UsageError, match="nope.yaml"):
        study_plan.check_arms(["control"], missing)


def test_plan_every_arm_from_the_best_stage1_with_the_same_steps_and_batch_and_the_shared_index():
    sizes = study_plan.sizes_of("cpu", {"s2_steps": 40, "pretrain_steps": 100})
    steps = study_plan.plan(list(study_plan.ARMS), [0, 1], PATHS, sizes, "out")
    assert steps[0][0] == "pretrain" and sum(k == "pretrain" for k, *_ in steps) == 1  # shared by the seeds
    assert not any(k == "pretrain" for k, *_ in study_plan.plan(["control"], [0], PATHS, study_plan.sizes_of("cpu"), "o"))
    arms = [cmd for kind, label, _, cmd in steps if kind == "train" and "stage 1" not in label]
    assert len(arms) == 2 * len(study_plan.ARMS)
    for seed in (0, 1):
        mine = [c for c in arms if _flag(c, "seed") == str(seed)]
        assert {_flag(c, "model_path") for c in mine} == {f"out/seed{seed}/stage1/checkpoint/best"}
        assert {(_flag(c, "total_steps"), _flag(c, "per_gpu_batch_size"), _flag(c, "train_data")) for c in mine} == \
            {("40", str(sizes["s2_batch"]), "s/train.jsonl")}
    stage1 = [cmd for _, label, _, cmd in steps if "stage 1" in label]
    assert _flag(stage1[0], "save_index_path") == "out/index" and _flag(stage1[0], "load_index_path") is None
    others = [cmd for kind, label, _, cmd in steps if kind != "pretrain" and cmd is not stage1[0]
              and "--closed_book" not in cmd]
    assert all(_flag(c, "load_index_path") == "out/index" for c in others)
    # an index saved before (an interrupted stage 1, tune.py) is loaded, not built again
    resumed = [cmd for _, label, _, cmd in study_plan.plan(["control"], [0], PATHS, sizes, "out", index_saved=True)
               if "stage 1" in label]
    assert _flag(resumed[0], "load_index_path") == "out/index" and _flag(resumed[0], "save_index_path") is None
    # the recipe comes first, the shared sizes after it, an arm's own size override and the settings
    # chosen on dev last (where tune.py's --set adds them: the run tried on dev is the study's)
    joint = next(c for c in arms if _flag(c, "name") == "study_joint_grpo_seed0")
    assert joint[1:3] == ["--config", "configs/joint_grpo_evidence.yaml"]
    assert joint[-2:] == [f"--grpo_retriever_pool_size={sizes['pool']}", *study_plan.GRPO_CHOSEN]
    grpo_arms = [c for c in arms if c[2].startswith(("configs/grpo", "configs/joint_grpo"))]
    assert len(grpo_arms) == 2 * 3 and all(c[-1] == study_plan.GRPO_CHOSEN[-1] for c in grpo_arms)
    evals = [cmd for kind, label, _, cmd in steps if kind == "eval"]
    assert len(evals) == 2 * 3 * len(study_plan.ARMS)  # every arm with its story, a random one and none
    n_random, n_none = sum("--eval_stories=random" in c for c in evals), sum("--closed_book" in c for c in evals)
    assert n_random == n_none == 2 * len(study_plan.ARMS)
    assert all(_flag(c, "load_index_path") == "out/index" for c in evals if "--closed_book" not in c)


@pytest.mark.parametrize("scale", ["tiny", "cpu", "gpu"])
def test_every_command_passes_train_and_evaluate_option_checks(scale):
    """Every command of the plan, the MLM pretraining (tiny, gpu) included; every evaluation, in-loop
    or on test, decodes as configs/decoding_convai2.yaml says; stage 1 keeps its lowest dev loss."""
    import yaml

    decoding = yaml.safe_load(open(os.path.join(ROOT, study_plan.DECODING)))
    sizes = study_plan.sizes_of(scale)
    for kind, label, _, cmd in study_plan.plan(list(study_plan.ARMS), [0], PATHS, sizes, "out"):
        opts, _ = options.parse([os.path.join(ROOT, c) if c.startswith("configs/") else c for c in cmd[1:]])
        options.validate(opts)
        assert opts.total_steps >= 1, label
        if kind != "pretrain":
            assert {k: getattr(opts, k) for k in decoding} == decoding and decoding["generation_temperature"] > 0, label
        if "stage 1" in label:
            assert opts.keep_best and opts.early_stopping_metric == "eval_loss", label


# ---- numbers and report ---------------------------------------------------------------------------

def _row(arm, seed, f1, mode="retrieval", gens=None):
    gens = gens or ["i like dogs .", "hi", "i like dogs ."]
    metrics = {k: 1.0 for k in study_report.SUMMARY_KEYS}
    metrics.update(f1=sum(f1) / len(f1), dist1=10.0, dist2=20.0, rougeL=15.0, repeat3=0.0, n=len(f1),
                   empty_predictions=0, generic=50.0, ppl=30.0)
    return {"arm": arm, "eval": mode, "seed": seed, "metrics": metrics, "generations": gens,
            "per_example": {"f1": f1, "rougeL": [15.0] * len(f1), "reward": [0.5] * len(f1)}}


def test_results_json_intervals_targets_and_collapse():
    rows = [_row("control", s, [10.0, 20.0, 30.0]) for s in (0, 1)]
    rows += [_row("control", s, [10.0, 20.0, 30.0], "closed_book") for s in (0, 1)]
    rows += [_row("joint_grpo", s, [12.0, 22.0, 32.0]) for s in (0, 1)]  # +2 F1 on every example
    rows += [_row("joint_grpo", s, [10.0, 21.0, 29.0], "random_story") for s in (0, 1)]  # retrieved: +2, +1, +3
    rows += [_row("joint_grpo", s, [9.0, 20.0, 30.0], "closed_book") for s in (0, 1)]
    rows.append(_row("grpo", 0, [10.0, 20.0, 30.0]))
    rows[-1]["metrics"]["dist1"] = 1.0  # below half the control's 10: collapsed
    baselines = {"constant": {"metrics": {"f1": 16.0, "bleu": 2.0, "rougeL": 19.0, "dist1": 0.1, "dist2": 0.1},
                              "reply": "i do ."}}
    test = [{"question": "persona: i like dogs. context:  Q: hi R: hey Q: do you ?", "answers": ["yes"]}] * 3
    test[2] = {"question": "persona: i like dogs. context:  Q: hi R: do you ?", "answers": ["yes"]}  # the last turn, either side
    res = study_report.results_json(rows, baselines, ["control", "joint_grpo", "grpo"], [0, 1], test)
    # 5 samples spread over 3 examples: each once; every arm's retrieved-story reply, the first seed
    assert [ex["index"] for ex in res["samples"]] == [0, 1, 2] and res["samples"][1] == {
        "index": 1, "seed": 0, "persona": "i like dogs.", "said": "do you ?", "human": "yes",
        "replies": {"control": "hi", "joint_grpo": "hi", "grpo": "hi"}} and res["samples"][2]["said"] == "do you ?"
    assert res["baselines"]["constant"] == {"f1": 16.0, "bleu": 2.0, "rougeL": 19.0, "dist1": 0.1, "dist2": 0.1,
                                            "reply": "i do ."}
    joint = res["arms"]["joint_grpo"]
    assert joint["seeds"] == [0, 1] and joint["mean"]["f1"] == pytest.approx(22.0)
    assert joint["diff_vs_control"]["f1"] == pytest.approx(2.0) and joint["ci_vs_control"]["f1"] == [2.0, 2.0]
    assert joint["ci_vs_control"]["reward"] == [0.0, 0.0] and "ci_vs_control" not in res["arms"]["control"]
    assert res["arms"]["grpo"]["collapsed"]["0"].startswith("Dist-1 1.00 < 0.5 x control")
    assert "control_closed_book" in res["arms"]
    abl = res["ablations"]["joint_grpo"]  # retrieved − random per example: +2, +1, +3 on both seeds
    assert abl["retrieval"]["f1"] == pytest.approx(22.0) and abl["random_story"]["f1"] == pytest.approx(20.0)
    assert abl["closed_book"]["f1"] == pytest.approx(59 / 3, abs=1e-4) and abl["seeds"] == [0, 1]
    assert abl["diff_retrieved_vs_random"]["f1"] == pytest.approx(2.0) and abl["ci_retrieved_vs_random"]["reward"] == [0.0, 0.0]
    low, high = abl["ci_retrieved_vs_random"]["f1"]
    assert 1.0 <= low < 2.0 < high <= 3.0
    assert set(res["ablations"]) == {"joint_grpo"}  # only where the random-story evaluation exists
    assert joint["most_frequent_reply"]["0"] == {"reply": "i like dogs .", "share": 66.67}
    assert res["control_targets"]["f1"] == {"value": 20.0, "target": ">= 13.9", "met": True}
    assert res["control_targets"]["dist2"]["met"] and res["control_targets"]["repeat3"]["met"]
    json.dumps(res, allow_nan=False)  # strict JSON
    ctx = {"sizes": study_plan.sizes_of("tiny"), "scale": "tiny", "split": "d split by persona (seed 0)",
           "seeds": [0, 1], "arms": ["control", "joint_grpo", "grpo"], "figures": {},
           "machine": {"cpu": "x", "nproc": "2", "gpu": "none", "python": "3", "torch": "2"}, "steps_s": 60.0,
           "finished": "now", "command": "python research/study/run.py", "paths": {"stories": os.path.join(ROOT, "s.jsonl")}}
    md = study_report.render(res, rows, ctx)
    assert "| **control** |" in md and "+2.00 [+2.00, +2.00] **✓**" in md and "⚠ collapsed" in md
    assert "## Retrieval ablations" in md and "| joint_grpo | 22.00 / 20.00 / 19.67 |" in md
    arms_table = md[md.index("## Arms (test split"):md.index("## Retrieval ablations")]
    assert "| joint_grpo_random_story |" not in arms_table  # the ablations have their own table
    assert "best constant reply (chosen on train by F1): \"i do .\"" in md and ROOT not in md
    assert "- **#1** persona: i like dogs.\n  - they said: \"do you ?\"\n  - human: \"yes\"\n  - control: \"hi\"" in md
    halves = md[md.index("### F1's two halves"):md.index("## Retrieval ablations")]
    assert "| joint_grpo | 22.00 | 1.00 | 1.00 | 1.00 | 1.0 | 0.0 |" in halves and "random_story" not in halves
    assert study_report.relative(f"--x={ROOT}/runs/a") == "--x=runs/a" and study_report.relative("plain") == "plain"


def test_baseline_metrics_on_the_sample_data():
    from src.data.dialogues import load_dialogues

    train, test = load_dialogues(f"{SAMPLE}/train.jsonl"), load_dialogues(f"{SAMPLE}/valid.jsonl")
    b = study_report.baseline_metrics(train, test)
    assert set(b) == {"constant", "nearest_neighbour", "persona_copy", "random_human", "human"}
    assert b["human"]["metrics"]["f1"] == pytest.approx(100.0) and b["constant"]["metrics"]["dist1"] < 5


# ---- the command line and the tiny study end to end ---------------------------------------------

def test_missing_data_is_one_line_exit_2(tmp_path):
    rc, _, err = run_script("research/study/run.py", "--data_dir", tmp_path, "--out", tmp_path / "o")
    assert rc == 2 and err.strip().startswith("error: ") and "not found" in err and len(err.strip().splitlines()) == 1


def test_dry_run_writes_the_split_only(tmp_path):
    lines = open(f"{SAMPLE}/train.jsonl").read().splitlines()[:60]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    rc, out, err = run_script("research/study/run.py", "--dry_run", "--scale", "tiny", "--dialogues", tmp_path / "d.jsonl",
                              "--stories", f"{SAMPLE}/stories.jsonl", "--out", tmp_path / "o", "--seeds", "0")
    assert rc == 0, err
    assert "pretraining (shared): train.py --task=mlm --closed_book" in out and "seed 0 eval control (closed_book)" in out
    assert sorted(os.listdir(tmp_path / "o")) == ["split"]


@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path):
    """Split -> baselines -> models -> pretraining -> stage 1 -> every arm -> test evaluations ->
    results.json + RESULTS.md + figures, published; a re-run with other sizes is refused."""
    lines = open(f"{SAMPLE}/train.jsonl").read().splitlines()[:80]  # 15 personas
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "s.jsonl").write_text("\n".join(open(f"{SAMPLE}/stories.jsonl").read().splitlines()[:40]) + "\n")
    out, pub = tmp_path / "study", tmp_path / "pub"
    # three arms (every arm's command is checked by test_every_command_passes_train_and_evaluate_option_checks)
    arms = ["control", "lapdog", "joint_grpo"]
    data = ["--scale", "tiny", "--dialogues", tmp_path / "d.jsonl", "--stories", tmp_path / "s.jsonl", "--arms", *arms]
    args = [*data, "--seeds", "0", "1", "--out", out]
    # one seed first: it is reported and published on its own, each evaluation as it finishes
    rc, stdout, err = run_script("research/study/run.py", *data, "--seeds", "0", "--out", out, "--publish", pub, timeout=1500)
    assert rc == 0, stdout[-3000:] + err[-3000:]
    assert json.load(open(pub / "results.json"))["seeds_complete"] == [0] and "1 of 1 seeds complete" in stdout
    published = json.load(open(pub / "evaluations" / "seed0" / "joint_grpo-random_story.metrics.json"))
    assert {"f1", "copy_persona", "copy_story"} <= set(published["metrics"]) and ROOT not in json.dumps(published)
    # then both: seed 0's steps are reused, seed 1 runs
    rc, stdout, err = run_script("research/study/run.py", *args, "--publish", pub, timeout=1500)
    assert rc == 0, stdout[-3000:] + err[-3000:]
    assert "seed 0 stage 1: done before" in stdout and "2 of 2 seeds complete" in stdout
    results = json.load(open(out / "results.json"))
    assert set(results["baselines"]) == {"constant", "nearest_neighbour", "persona_copy", "random_human", "human"}
    assert set(results["arms"]) == {*arms, *(f"{a}_{m}" for a in arms for m in study_plan.ABLATIONS)}
    assert set(results["ablations"]) == set(arms)
    for arm, e in results["arms"].items():
        assert e["seeds"] == [0, 1] and {"f1", "bleu", "rougeL", "dist1", "dist2", "ppl", "reward"} <= set(e["mean"])
        if arm != "control":
            assert all(len(e["ci_vs_control"][k]) == 2 for k in ("f1", "rougeL", "reward"))
    md = (out / "RESULTS.md").read_text()
    assert "Tiny scale" in md and "## Baselines" in md and "Δ F1 [95% CI]" in md and "against its targets" in md
    for text in (md, open(out / "results.json").read()):  # no machine paths: all relative to the repository
        assert not re.search(r"(?<![.\w])" + re.escape(str(tmp_path)), text) and ROOT not in text
    for name in ("bars.png", "pretraining.png", "stage1.png", "curves_seed0.png"):
        assert (out / "figures" / name).stat().st_size > 10_000 and (pub / "figures" / name).exists()
    assert (pub / "RESULTS.md").exists() and (pub / "results.json").exists()
    # another machine (a fresh --out): both seeds are read back from what was published, nothing runs again
    logs = pub / "logs"
    assert (logs / "seed1" / "stage1.metrics.jsonl").exists() and (logs / "seed0" / "lapdog.metrics.jsonl").exists()
    rc, stdout, err = run_script("research/study/run.py", *data, "--seeds", "0", "1", "--out", tmp_path / "fresh",
                                 "--publish", pub, timeout=600)
    assert rc == 0 and "seed 0: published in" in stdout and "== seed 1 stage 1" not in stdout, stdout[-3000:] + err[-3000:]
    again = json.load(open(pub / "results.json"))
    for arm, e in results["arms"].items():  # the same numbers and intervals from the published replies
        assert again["arms"][arm]["mean"] == e["mean"] and again["arms"][arm].get("ci_vs_control") == e.get("ci_vs_control")
    assert again["arms"]["lapdog"]["seed_ci_seeds_vs_control"] == [0, 1] and (pub / "figures" / "curves_seed1.png").exists()
    # seed 0 as published before replies were kept: its means count, its examples do not, its figures stay
    for f in [*(pub / "evaluations" / "seed0").glob("*.replies.jsonl.gz"), *(pub / "logs" / "seed0").iterdir()]:
        f.unlink()
    rc, stdout, err = run_script("research/study/run.py", *data, "--seeds", "0", "1", "--out", tmp_path / "fresh2",
                                 "--publish", pub, "--report_only", timeout=600)
    assert rc == 0 and "2 of 2 seeds complete" in stdout, stdout[-3000:] + err[-3000:]
    carried = json.load(open(pub / "results.json"))
    assert carried["arms"]["lapdog"]["mean"] == pytest.approx(again["arms"]["lapdog"]["mean"], abs=2e-4)  # of rounded
    lapdog = carried["arms"]["lapdog"]
    assert lapdog["ci_seeds_vs_control"] == [1] and lapdog["seed_ci_seeds_vs_control"] == [0, 1]
    assert (pub / "figures" / "curves_seed0.png").exists() and (pub / "figures" / "stage1_seed1.png").exists()
    assert "pooled over seed 1" in (pub / "RESULTS.md").read_text()
    rc, _, err = run_script("research/study/run.py", *args[:-2], "--out", out, "--s2_steps", "3")
    assert rc == 2 and "made with other settings" in err
    # a seed with an unfinished step is left out of the report, which says so
    os.remove(out / "seed1" / "eval" / "lapdog-closed_book" / "study_done.json")
    rc, stdout, err = run_script("research/study/run.py", *args, "--report_only")
    assert rc == 0 and "1 of 2 seeds complete" in stdout, stdout[-2000:] + err[-2000:]
    assert json.load(open(out / "results.json"))["seeds_complete"] == [0]
    assert "1 of the 2 requested (0, 1) complete so far" in (out / "RESULTS.md").read_text()
    assert "--report_only" not in (out / "RESULTS.md").read_text()  # the command shown is the run's
    # the length-matched control: the study's own evaluation commands, the control at minimum lengths on dev,
    # then the chosen one on test; per seed
    # (two arms on seed 1: the second reuses the matched control and keeps the first arm's intervals)
    for stage in (["dev", "--min_lengths", "0", "6"], ["test", "--min_length", "6"],
                  ["test", "--min_length", "6", "--seed", "1", "--arm", "lapdog"], ["test", "--min_length", "6", "--seed", "1"]):
        rc, stdout, err = run_script("research/study/length_check.py", "--arm", "joint_grpo", *stage,
                                     "--publish", tmp_path / "lc", *data, "--out", out, timeout=600)
        assert rc == 0, stdout[-2000:] + err[-2000:]
    lc = tmp_path / "lc" / "seed0"
    assert sorted(f.name for f in lc.iterdir()) == [
        "control-min0-dev.metrics.json", "control-min6-dev.metrics.json", "control-min6-test.metrics.json",
        "intervals-joint_grpo-min6-test.json", "joint_grpo-dev.metrics.json"]
    assert sorted(f.name for f in (tmp_path / "lc" / "seed1").iterdir()) == [
        "control-min6-test.metrics.json", "intervals-joint_grpo-min6-test.json", "intervals-lapdog-min6-test.json"]
    assert list(json.load(open(tmp_path / "lc" / "seed1" / "intervals-lapdog-min6-test.json")))[1] == \
        "lapdog − control at min length 6"
    # on test, paired intervals: the matched control against the study's control, the arm against it
    found = json.load(open(lc / "intervals-joint_grpo-min6-test.json"))
    assert list(found) == ["control at min length 6 − control", "joint_grpo − control at min length 6"]
    for by_key in found.values():
        assert set(by_key) == {"f1", "rougeL", "reward"} and all(lo <= m <= hi for m, lo, hi in by_key.values())
    assert "| joint_grpo − control at min length 6 |" in stdout and "Δ reward [95% CI]" in stdout
    short, forced = (json.load(open(lc / f"control-min{n}-dev.metrics.json"))["metrics"] for n in (0, 6))
    assert forced["length_ratio"] >= short["length_ratio"] and "| control-min6-test |" in stdout
    commands = (out / "length_check" / "commands.sh").read_text()
    assert "--generation_min_length=6" in commands and "seed0/control/checkpoint/latest" in commands
    assert "seed1/control/checkpoint/latest" in commands and "length_check/seed1/control-min6-test" in commands
    assert ROOT not in (lc / "control-min6-test.metrics.json").read_text()
    rc, _, err = run_script("research/study/length_check.py", "test", "--min_length", "6", "--seed", "2",
                            "--publish", tmp_path / "lc", *data, "--out", out)
    assert rc == 2 and "seed2's control arm is not trained yet" in err and "--seeds" in err


# ---- finished steps: reused only when they are the same run --------------------------------------

def test_an_evaluation_folder_is_read_by_its_newest_files_not_their_names(tmp_path):
    """evaluate.py run twice into one folder writes evaluate-step-N.* then evaluate-2-step-N.*,
    and the second sorts first by name: the report and the length check read the newest."""
    from research.study import report

    results = tmp_path / "results"
    results.mkdir()
    for stem, reply, when in (("evaluate-step-60", "old reply", 1_000), ("evaluate-2-step-60", "new reply", 2_000)):
        (results / f"{stem}.test.results.jsonl").write_text(json.dumps({"generation": reply, "answers": ["hi"]}) + "\n")
        (results / f"{stem}.test.metrics.json").write_text(json.dumps({"metrics": {"f1": when}}))
        for f in results.glob(f"{stem}.*"):
            os.utime(f, (when, when))
    gens, refs, own = report.read_eval(tmp_path, "test")
    assert gens == ["new reply"] and refs == ["hi"] and own == {"f1": 2_000}
    assert report.newest(tmp_path, "*.metrics.json").endswith("evaluate-2-step-60.test.metrics.json")
    assert report.newest(tmp_path, "*.nothing") is None


def test_fingerprint_is_the_command_and_the_recipes_content(tmp_path):
    from research.study import run as study_run

    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 1.0e-4\n")
    argv = ["train.py", "--config", str(recipe), "--lr=3e-5", f"--checkpoint_dir={tmp_path}/a",
            f"--load_index_path={tmp_path}/i"]
    fp = study_run.fingerprint(argv)
    # where it writes and whether the index is built or loaded do not make another run
    same = [a.replace("/a", "/b").replace("--load_index", "--save_index") for a in argv]
    assert study_run.fingerprint(same) == fp and "--lr=3e-5" in fp["argv"] and len(fp["recipes"]) == 1
    assert study_run.fingerprint(argv[:3] + ["--lr=1e-4"] + argv[4:]) != fp
    recipe.write_text("lr: 3.0e-5\n")  # the recipe edited: another run, though the command reads the same
    assert study_run.fingerprint(argv) != fp


def test_a_finished_step_is_skipped_only_when_it_is_the_same_run(tmp_path):
    from research.study import run as study_run

    recipe, folder, commands = tmp_path / "r.yaml", tmp_path / "step", tmp_path / "commands.sh"
    recipe.write_text("lr: 1.0e-4\n")
    argv = ["-c", "import sys; open(sys.argv[1], 'w').write('ran')", str(tmp_path / "ran.txt"), "--config", str(recipe)]
    study_run.run_step("one", str(folder), argv, str(commands))
    assert (tmp_path / "ran.txt").read_text() == "ran"
    (tmp_path / "ran.txt").unlink()
    assert study_run.run_step("one", str(folder), argv, str(commands))["fingerprint"] == study_run.fingerprint(argv)
    assert not (tmp_path / "ran.txt").exists()  # skipped
    recipe.write_text("lr: 3.0e-5\n")
    with pytest.raises(UsageError, match=r"r\.yaml was edited since\) — delete the folder"):
        study_run.run_step("one", str(folder), argv, str(commands))
    recipe.write_text("lr: 1.0e-4\n")
    with pytest.raises(UsageError, match=r"\(now with --lr=3e-5\)"):
        study_run.run_step("one", str(folder), argv + ["--lr=3e-5"], str(commands))
    # a step finished before fingerprints were recorded is trusted as it was
    (folder / study_run.DONE).write_text(json.dumps({"label": "one", "wall_s": 1.0}))
    assert study_run.run_step("one", str(folder), argv + ["--lr=3e-5"], str(commands))["wall_s"] == 1.0


def test_a_step_resumed_over_chunks_counts_every_chunk(tmp_path):
    from research.study import run as study_run

    folder, commands = tmp_path / "stage1", tmp_path / "commands.sh"
    # the invocation that finishes a resumed training takes 0.x s; train.py's summary counts 3992 s in all
    argv = ["-c", "import json, sys; json.dump({'elapsed_s': 3992.0}, open(sys.argv[1], 'w'))", str(folder / "summary.json")]
    assert study_run.run_step("stage 1", str(folder), argv, str(commands))["wall_s"] == 3992.0
    assert json.loads((folder / study_run.DONE).read_text())["wall_s"] == 3992.0
    # a step recorded before this was counted: corrected when it is skipped
    (folder / study_run.DONE).write_text(json.dumps({"label": "stage 1", "wall_s": 292.9}))
    assert study_run.run_step("stage 1", str(folder), argv, str(commands))["wall_s"] == 3992.0
    (folder / "summary.json").unlink()  # an evaluation: no summary, its own time
    assert study_run.run_step("stage 1", str(folder), argv, str(commands))["wall_s"] == 292.9
    assert study_run.step_wall(str(tmp_path / "nowhere"), 7.5) == 7.5
    # the report's wall time: the shared steps and the reported seeds' finished steps, each counted in full
    steps = [("train", "pretraining", str(tmp_path / "pre"), []), ("train", "seed 0 stage 1", str(folder), []),
             ("eval", "seed 1 eval control (retrieval)", str(tmp_path / "e1"), []),
             ("eval", "seed 0 eval control (retrieval)", str(tmp_path / "unfinished"), [])]
    for name, wall in (("pre", 10.0), ("e1", 100.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / study_run.DONE).write_text(json.dumps({"wall_s": wall}))
    assert study_run.recorded_wall(steps, [0]) == pytest.approx(10.0 + 292.9)
    assert study_run.recorded_wall(steps, [0, 1]) == pytest.approx(10.0 + 292.9 + 100.0)


def test_an_arm_that_ran_while_tuning_is_linked_not_trained_again(tmp_path):
    from research.study import run as study_run

    tuning = tmp_path / "tuning" / "seed0"
    argv = ["train.py", "--config", "configs/grpo.yaml", "--seed=0", f"--checkpoint_dir={tuning}/grpo,lr=3e-5", "--lr=3e-5"]
    (tuning / "grpo,lr=3e-5").mkdir(parents=True)
    (tuning / "grpo,lr=3e-5" / study_run.DONE).write_text(json.dumps({"wall_s": 5.0, "fingerprint": study_run.fingerprint(argv)}))
    (tuning / "grpo").mkdir()
    (tuning / "grpo" / study_run.DONE).write_text(json.dumps({"wall_s": 5.0, "fingerprint": study_run.fingerprint(argv[:-1])}))
    arm = tmp_path / "seed0" / "grpo"
    study_argv = argv[:4] + [f"--checkpoint_dir={arm}", "--lr=3e-5"]
    assert study_run.link_tuned_twin(str(arm), study_argv[:-1] + ["--lr=1e-5"], str(tuning)) is None  # no such run
    assert not os.path.lexists(arm)
    assert study_run.link_tuned_twin(str(arm), study_argv, str(tuning)) == str(tuning / "grpo,lr=3e-5")
    assert arm.is_symlink() and os.readlink(arm) == os.path.join("..", "tuning", "seed0", "grpo,lr=3e-5")
    assert study_run.run_step("grpo", str(arm), study_argv, str(tmp_path / "c.sh"))["wall_s"] == 5.0
    assert study_run.link_tuned_twin(str(arm), study_argv, str(tuning)) is None  # already there: left alone


# ---- tuning on dev -------------------------------------------------------------------------------

def test_tune_set_flags_and_run_names():
    from research.study import tune

    assert tune.set_flags(["lr=3e-5", "--grpo_kl_coeff=0.1"]) == ["--lr=3e-5", "--grpo_kl_coeff=0.1"]
    for bad, why in ((["lr"], "KEY=VALUE"), (["=3"], "KEY=VALUE"), (["total_steps=5"], "size flags"),
                     (["seed=3"], "size flags")):
        with pytest.raises(UsageError, match=why):
            tune.set_flags(bad)
    # the same settings in another order are the same run
    assert tune.run_name("grpo", ["lr=3e-5", "grpo_kl_coeff=0.1"]) == tune.run_name("grpo", ["grpo_kl_coeff=0.1", "lr=3e-5"])
    assert tune.run_name("control", []) == "control"


def test_tune_record_replaces_a_run_and_renders_its_last_evaluation(tmp_path):
    from research.study import tune

    def entry(name, f1, seed=0):
        return {"name": name, "arm": name.split(",")[0], "set": [], "seed": seed, "wall_s": 90.0, "command": f"tune {name}",
                "curve": [{"step": 30, "f1": 1.0}, {"step": 60, "f1": f1, "rougeL": 12.345, "generic": 40.0}]}

    tune.record(tmp_path, entry("grpo,lr=3e-5", 10.0))
    tune.record(tmp_path, entry("control", 11.0))
    runs = tune.record(tmp_path, entry("grpo,lr=3e-5", 12.5))  # recorded again: replaced, not added
    assert [r["name"] for r in runs] == ["control", "grpo,lr=3e-5"]
    md = (tmp_path / "TUNING.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| `grpo,lr=3e-5`"))
    assert row == "| `grpo,lr=3e-5` | 0 | 60 | 12.50 | 12.35 | – | – | – | – | 40.00 | – | – | – | 1.5 |"
    assert "tune control" in md and json.load(open(tmp_path / "tuning.json"))[1]["curve"][-1]["f1"] == 12.5
    # the same run on another seed is another entry
    runs = tune.record(tmp_path, entry("control", 9.0, seed=2))
    assert [(r["name"], r["seed"]) for r in runs] == [("control", 0), ("grpo,lr=3e-5", 0), ("control", 2)]


def test_tune_refuses_a_misspelt_setting_before_running_anything(tmp_path):
    lines = open(f"{SAMPLE}/train.jsonl").read().splitlines()[:60]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    data = ["--scale", "tiny", "--dialogues", tmp_path / "d.jsonl", "--stories", f"{SAMPLE}/stories.jsonl", "--out"]
    rc, _, err = run_script("research/study/tune.py", "--arm", "grpo", "--set", "grpo_kl_coef=0.1", "--eval_freq", "1",
                            *data, tmp_path / "o")
    assert rc == 2 and err.strip().startswith("error: ") and "grpo_kl_coef" in err, err
    assert not (tmp_path / "o" / "models").exists()
    # the tiny scale evaluates nothing in the loop: nothing to score on dev
    rc, _, err = run_script("research/study/tune.py", "--arm", "grpo", *data, tmp_path / "o2")
    assert rc == 2 and "eval_freq 0" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o2" / "models").exists()


@pytest.mark.slow
def test_tune_runs_an_arm_on_dev_from_the_study_stage1_which_the_study_reuses(tmp_path):
    lines = open(f"{SAMPLE}/train.jsonl").read().splitlines()[:80]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "s.jsonl").write_text("\n".join(open(f"{SAMPLE}/stories.jsonl").read().splitlines()[:40]) + "\n")
    data = ["--scale", "tiny", "--eval_freq", "1", "--dialogues", tmp_path / "d.jsonl", "--stories", tmp_path / "s.jsonl",
            "--out", tmp_path / "study"]
    rc, out, err = run_script("research/study/tune.py", "--arm", "grpo", "--set", "lr=3e-5", "grpo_kl_coeff=0.1",
                              "--record", tmp_path / "rec", *data, timeout=900)
    assert rc == 0, out[-3000:] + err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["name"] == "grpo,grpo_kl_coeff=0.1,lr=3e-5" and result["dev"]["step"] == 2 and "f1" in result["dev"]
    run_dir = tmp_path / "study" / "tuning" / "seed0" / result["name"]
    saved = json.load(open(run_dir / "checkpoint" / "latest" / "options.json"))
    cmd = open(tmp_path / "study" / "commands.sh").read().splitlines()[-1]
    assert "--lr=3e-5" in cmd and "--grpo_kl_coeff=0.1" in cmd and "--eval_data=" in cmd and "test.jsonl" not in cmd
    assert saved["lr"] == 3e-5 and saved["grpo_kl_coeff"] == 0.1 and saved["use_grpo"]
    runs = json.load(open(tmp_path / "rec" / "tuning.json"))
    assert [r["name"] for r in runs] == [result["name"]] and [p["step"] for p in runs[0]["curve"]] == [1, 2]
    # the control as the study runs it, tried on dev too
    rc, out, err = run_script("research/study/tune.py", "--arm", "control", *data, timeout=900)
    assert rc == 0, out[-3000:] + err[-3000:]
    # the study's own stage 1 was run there, so the study skips it; its control is that run, linked
    rc, out, err = run_script("research/study/run.py", *data, "--seeds", "0", "--arms", "control", timeout=900)
    assert rc == 0 and "seed 0 stage 1: done before" in out, out[-3000:] + err[-3000:]
    assert "seed 0 control: the same run finished on dev in" in out and (tmp_path / "study" / "seed0" / "control").is_symlink()
    # a dev run read once on test with the study's command, paired against the seed's study evaluations:
    # the control's dev run is the study's control, so every difference is exactly 0
    rc, out, err = run_script("research/study/tuned_test.py", "--run", "control", "--publish", tmp_path / "pub", *data,
                              timeout=900)
    assert rc == 0, out[-3000:] + err[-3000:]
    found = json.load(open(tmp_path / "pub" / "seed0" / "control-intervals-test.json"))
    assert list(found["intervals"]) == ["control − control"] and set(found["per_run"]) == {"control"}
    assert all(v == [0.0, 0.0, 0.0] for v in found["intervals"]["control − control"].values())
    assert (tmp_path / "pub" / "seed0" / "control-test.metrics.json").exists() and "| control − control |" in out
    # the GRPO run's arm has no study evaluation on this seed yet: refused, saying what to run
    rc, _, err = run_script("research/study/tuned_test.py", "--run", result["name"], *data, timeout=300)
    assert rc == 2 and "study evaluation of grpo is not done" in err and "run.py" in err, err


def test_publish_copies_the_report_and_drops_figures_it_did_not_draw(tmp_path):
    from research.study import report

    out, dest = tmp_path / "out", tmp_path / "published"
    (out / "figures").mkdir(parents=True)
    (dest / "figures").mkdir(parents=True)
    for name in ("RESULTS.md", "results.json"):
        (out / name).write_text(name)
    (out / "figures" / "bars.png").write_bytes(b"new")
    (dest / "figures" / "bars.png").write_bytes(b"old")
    (dest / "figures" / "curves_seed2.png").write_bytes(b"an earlier study's")
    report.publish(str(out), str(dest), {"bars": str(out / "figures" / "bars.png")})
    assert sorted(p.name for p in (dest / "figures").iterdir()) == ["bars.png"]
    assert (dest / "figures" / "bars.png").read_bytes() == b"new" and (dest / "RESULTS.md").read_text() == "RESULTS.md"


# ---- published seeds: the report outlives the machine that ran them ---------------------------------

def _publish_seed(dest, seed, arms, gens, f1=12.0):
    from research.study import published

    for arm, mode in study_plan.evaluations(arms):
        metrics, replies = published.evaluation_files(str(dest), seed, arm, mode)
        os.makedirs(os.path.dirname(metrics), exist_ok=True)
        with open(metrics, "w") as f:
            json.dump({"metrics": {"f1": f1, "ppl": 30.0, "copy_persona": 0.0}}, f)
        published.write_replies(replies, gens)


def test_published_replies_round_trip_and_which_seeds_are_published(tmp_path):
    from research.study import published

    path = tmp_path / "r.jsonl.gz"
    published.write_replies(str(path), ["i like dogs .", "é \"quoted\"", ""])
    first = path.read_bytes()
    published.write_replies(str(path), ["i like dogs .", "é \"quoted\"", ""])
    assert published.read_replies(str(path)) == ["i like dogs .", "é \"quoted\"", ""] and path.read_bytes() == first
    arms = ["control", "grpo"]
    _publish_seed(tmp_path, 2, arms, ["hi"])
    assert published.seed_is_published(str(tmp_path), 2, arms, None)
    assert not published.seed_is_published(str(tmp_path), 2, ["control", "grpo", "lapdog"], None)
    assert not published.seed_is_published(None, 2, arms, None)
    os.remove(published.evaluation_files(str(tmp_path), 2, "grpo", "closed_book")[1])
    assert not published.seed_is_published(str(tmp_path), 2, arms, None)  # metrics without replies: not enough
    # a seed published before replies were kept: known by a results.json's per-seed numbers
    previous = {"arms": {("grpo" if m == "retrieval" else f"grpo_{m}"): {"per_seed": {"0": {"f1": 11.0}}}
                         for m in ("retrieval", *study_plan.ABLATIONS)}}
    previous["arms"] |= {("control" if m == "retrieval" else f"control_{m}"): {
        "per_seed": {"0": {"f1": 10.0}}, "most_frequent_reply": {"0": {"reply": "hi", "share": 5.0}}}
        for m in ("retrieval", *study_plan.ABLATIONS)}
    assert published.seed_is_published(str(tmp_path), 0, arms, previous)
    assert published.carried_numbers(previous, 0, "control", "retrieval") == {
        "metrics": {"f1": 10.0}, "most_frequent": {"reply": "hi", "share": 5.0}}
    assert published.carried_numbers(previous, 1, "control", "retrieval") is None
    assert published.same_settings(None, {"a": 1}, {}) and not published.same_settings({"sizes": {"a": 2}}, {"a": 1}, {})
    split = {"source": "a/d.jsonl", "source_sha256": "x", "seed": 0, "splits": {"test": {"path": "a/t.jsonl", "examples": 9}}}
    moved = split | {"source": "b/d.jsonl", "splits": {"test": {"path": "b/t.jsonl", "examples": 9}}}
    assert published.same_settings({"sizes": {"a": 1}, "split": split}, {"a": 1}, moved)  # the same split elsewhere
    assert not published.same_settings({"sizes": {"a": 1}, "split": split}, {"a": 1}, moved | {"source_sha256": "y"})
    # the figures of seeds whose curves are gone are kept; the others are redrawn
    (tmp_path / "figures").mkdir()
    for name in ("bars.png", "curves_seed0.png", "curves_seed2.png", "stage1_seed0_seed1.png", "stage1.png"):
        (tmp_path / "figures" / name).write_bytes(b"png")
    assert sorted(published.kept_figures(str(tmp_path), [0, 1])) == ["curves_seed0", "stage1_seed0_seed1"]
    assert sorted(published.kept_figures(str(tmp_path), [0])) == ["curves_seed0"] and published.kept_figures(None, [0]) == {}


def test_the_report_reads_seeds_from_what_was_published(tmp_path):
    """Seed 1's replies are published (scored here, as if run here); seed 0 is known only by a
    results.json's means: it counts in the means and the seed-level interval, not in the bootstrap."""
    from research.study import published

    arms = ["control", "grpo"]
    test = [{"question": "persona: i like dogs. context: Q: hi", "answers": [a]} for a in ("i like dogs", "hi there")]
    _publish_seed(tmp_path / "pub", 1, ["control"], ["i like dogs", "hello"])
    for arm, mode in study_plan.evaluations(["grpo"]):
        metrics, replies = published.evaluation_files(str(tmp_path / "pub"), 1, arm, mode)
        with open(metrics, "w") as f:
            json.dump({"metrics": {"ppl": 20.0}}, f)
        published.write_replies(replies, ["i like dogs", "hi there"])  # both right: F1 100
    keys = {k: 0.0 for k in study_report.SUMMARY_KEYS}
    previous = {"arms": {(a if m == "retrieval" else f"{a}_{m}"): {
        "per_seed": {"0": keys | {"f1": f1, "rougeL": f1, "reward": 0.1, "dist1": 10.0}},
        "most_frequent_reply": {"0": {"reply": "old", "share": 50.0}}}
        for a, f1 in (("control", 40.0), ("grpo", 70.0)) for m in ("retrieval", *study_plan.ABLATIONS)}}
    with pytest.raises(FileNotFoundError, match="none published for seed 2"):
        study_report.collect_rows(str(tmp_path / "out"), arms, [2], test, "test", str(tmp_path / "pub"), previous)
    rows = study_report.collect_rows(str(tmp_path / "out"), arms, [0, 1], test, "test", str(tmp_path / "pub"), previous)
    by = {(r["arm"], r["eval"], r["seed"]): r for r in rows}
    assert by[("control", "retrieval", 0)]["per_example"] is None and by[("control", "retrieval", 0)]["metrics"]["f1"] == 40.0
    one = by[("control", "retrieval", 1)]
    assert one["generations"] == ["i like dogs", "hello"] and one["per_example"]["f1"] == [100.0, 0.0]
    assert one["metrics"]["f1"] == 50.0 and one["metrics"]["ppl"] == 30.0  # scored here; ppl is evaluate.py's
    res = study_report.results_json(rows, {}, arms, [0, 1], test)
    grpo = res["arms"]["grpo"]
    assert grpo["mean"]["f1"] == pytest.approx(85.0) and grpo["seeds"] == [0, 1]
    # the bootstrap pools seed 1 only: +0 and +100 per example; the seed-level interval both: +30 and +50
    assert grpo["ci_seeds_vs_control"] == [1] and grpo["diff_vs_control"]["f1"] == pytest.approx(50.0)
    assert grpo["seed_ci_seeds_vs_control"] == [0, 1] and grpo["seed_diff_vs_control"]["f1"] == pytest.approx(40.0)
    assert grpo["seed_ci_vs_control"]["f1"] == pytest.approx([40.0 - 127.062, 40.0 + 127.062], abs=1e-2)  # t(1 df)
    assert grpo["most_frequent_reply"]["0"] == {"reply": "old", "share": 50.0}
    assert res["ablations"]["grpo"]["ci_seeds_retrieved_vs_random"] == [1]
    assert [s["seed"] for s in res["samples"]] == [1, 1]  # replies only where they were kept
    ctx = {"sizes": study_plan.sizes_of("tiny"), "scale": "tiny", "split": "d", "seeds": [0, 1], "arms": arms,
           "figures": {}, "machine": {"cpu": "x", "nproc": "2", "gpu": "none", "python": "3", "torch": "2"},
           "steps_s": 60.0, "finished": "now", "command": "c", "paths": {"stories": os.path.join(ROOT, "s.jsonl")}}
    md = study_report.render(res, rows, ctx)
    assert "pooled over seed 1, whose replies are at hand; seed 0 counts" in md and "### Over training seeds" in md
    assert "| grpo | 0, 1 | +40.00 [" in md


def test_earlier_intervals_are_kept_for_seeds_whose_replies_are_gone():
    from research.study import published

    old = {"seeds_complete": [0, 1], "arms": {"grpo": {"seeds": [0, 1], "diff_vs_control": {"f1": 3.1},
                                                       "ci_vs_control": {"f1": [2.5, 3.75]}}}}
    def earlier(entry, carried):
        return published.earlier_intervals(entry, "vs_control", old["seeds_complete"], carried)

    found = earlier(old["arms"]["grpo"], [0, 1])
    assert found == {"seeds": [0, 1], "diff": {"f1": 3.1}, "ci": {"f1": [2.5, 3.75]}}
    assert earlier(old["arms"]["grpo"], [0]) is None  # seed 1 was run here: not the same seeds
    assert earlier(old["arms"].get("control"), [0, 1]) is None
    # a report that carried them carries them on; an ablation entry names its seeds
    assert earlier({"earlier_ci_vs_control": found, "ci_vs_control": {}}, [0, 1, 2]) == found
    abl = {"ci_retrieved_vs_random": {"f1": [0.1, 1.0]}, "diff_retrieved_vs_random": {"f1": 0.6}, "seeds": [0, 1]}
    assert published.earlier_intervals(abl, "retrieved_vs_random", [0, 1], [0, 1])["diff"] == {"f1": 0.6}
    lines = study_report._ablation_table({"grpo": {"retrieval": {}, "diff_retrieved_vs_random": {"f1": None, "reward": None},
                                                   "ci_retrieved_vs_random": {"f1": [None, None], "reward": [None, None]},
                                                   "earlier_ci_retrieved_vs_random": {"seeds": [0, 1], "diff": {"f1": 0.6},
                                                                                      "ci": {"f1": [0.1, 1.0]}}}})
    assert lines[-1] == ("Seeds 0, 1 (replies not kept), F1 retrieved − random in the report that had their replies: "
                         "grpo +0.60 [+0.10, +1.00] **✓**.")
    entry = {"eval": "retrieval", "seed_ci_vs_control": {k: [None, None] for k in ("f1", "rougeL", "reward")},
             "seed_diff_vs_control": {k: None for k in ("f1", "rougeL", "reward")}, "seed_ci_seeds_vs_control": [0, 1, 2],
             "earlier_ci_vs_control": {"seeds": [0, 1], "diff": {"f1": 3.11, "rougeL": 1.0, "reward": 0.05},
                                       "ci": {"f1": [2.5, 3.75], "rougeL": [0.5, 1.5], "reward": [0.01, 0.09]}}}
    md = "\n".join(study_report._seed_level_table({"arms": {"grpo": entry}}))
    assert "Seeds 0, 1, whose replies were not kept" in md and "| grpo | 0, 1 | +3.11 [+2.50, +3.75] **✓** |" in md


def test_with_flags_replaces_a_commands_flags_and_paired_intervals_of_identical_runs_are_zero():
    cmd = ["python", "evaluate.py", "--model_path=a", "--seed=2", "--checkpoint_dir=b"]
    assert study_plan.with_flags(cmd, model_path="m", checkpoint_dir="f", generation_min_length=6) == [
        "python", "evaluate.py", "--seed=2", "--model_path=m", "--checkpoint_dir=f", "--generation_min_length=6"]
    per = {"a": {"f1": [1.0, 2.0, 4.0]}, "b": {"f1": [1.0, 2.0, 4.0]}, "c": {"f1": [0.0, 1.0, 3.0]}}
    found = study_report.paired_intervals(per, [("a − b", "a", "b"), ("a − c", "a", "c")], keys=("f1",))
    assert found == {"a − b": {"f1": [0.0, 0.0, 0.0]}, "a − c": {"f1": [1.0, 1.0, 1.0]}}
    assert study_report.paired_table(found, ("f1",)).splitlines()[-1] == "| a − c | +1.000 [+1.000, +1.000] |"
