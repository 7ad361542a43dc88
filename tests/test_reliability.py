"""Issue 11, "never lose a run": non-finite steps, broken `latest`, stale references, resume with
changed options, mismatched evaluation inputs, one error line per user mistake, Ctrl-C, timeouts.

Error paths run train.py / evaluate.py in-process (they stop before any training, so this is fast);
the cases that need a real process (exit codes under signals, several ranks) use subprocesses.
"""

import json
import logging
import os
import re
import pickle
import shutil
import signal
import subprocess
import time

import pytest
import torch

from conftest import ROOT, SAMPLE
from test_train import ENV, PY, free_port, grpo_stage2, run, stage1

import evaluate
import train
from src import checkpoint, exits, options, preflight, resume, safety
from src.errors import UsageError


def main_rc(argv, capsys, fn=None):
    """(exit status, stderr lines) of train.py (or evaluate.py) run in this process."""
    rc = train.entry(fn or train.main, [str(a) for a in argv])
    err = capsys.readouterr().err
    return rc, [ln for ln in err.splitlines() if ln.strip()]


def assert_one_error_line(lines, start):
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(start) and " — " in errors[0], lines
    assert not any("Traceback" in ln for ln in lines), lines


@pytest.fixture(scope="module")
def s1(tmp_path_factory, tiny_models):
    """A finished 2-step stage-1 run (checkpoints at steps 1 and 2)."""
    ck = tmp_path_factory.mktemp("rel") / "s1"
    assert train.entry(train.main, stage1(ck, tiny_models, steps=2, extra=["--save_freq=1"])[1:]) == 0
    return ck


def copy_run(src, dst):
    shutil.copytree(src, dst, symlinks=True)
    return dst


# ------------------------------------------------------------------------------------ §1 NaN

def test_step_guard_skips_counts_and_stops_after_the_limit():
    g = safety.StepGuard(max_consecutive=2)
    assert g.check(0, {"loss/reader": 1.0, "grad_norm/reader": 2.0}, False, "cpu") == (True, False)
    assert g.check(1, {"loss/reader": float("nan")}, True, "cpu") == (False, True)
    assert g.log_values() == {"train/skipped_nonfinite": 1.0} and "loss/reader nan" in g.last
    assert g.check(1, {"loss/reader": 1.0, "grad_norm/reader": 3.0}, False, "cpu")[0]  # a good step resets
    assert not g.check(2, {"grad_norm/retriever": float("inf")}, False, "cpu")[0]
    # fp16 (GradScaler handles inf gradients itself): only the loss counts
    assert g.check(2, {"grad_norm/retriever": float("inf")}, False, "cpu", check_grads=False)[0]
    g.check(3, {"grad_norm/reader": float("nan")}, False, "cpu")
    with pytest.raises(safety.NonFiniteError, match=r"^step 5: grad_norm/reader nan for 2 consecutive steps"):
        g.check(4, {"grad_norm/reader": float("nan")}, False, "cpu")
    with pytest.raises(safety.NonFiniteError, match="retriever scores are NaN"):
        safety.require_finite(torch.tensor([[0.0, float("-inf"), float("nan")]]), "retriever scores", 1)
    safety.require_finite(torch.tensor([[0.0, float("-inf")]]), "retriever scores", 1)  # -inf = masked, fine


def test_diverging_run_stops_with_exit_3_and_writes_no_checkpoint(tmp_path, tiny_models):
    ck = tmp_path / "nan"
    p = run(stage1(ck, tiny_models, steps=6, extra=["--lr=1e10", "--warmup_steps=0", "--save_freq=3",
                                                     "--max_nonfinite_steps=2"]), check=False)
    assert p.returncode == 3, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "consecutive steps" in lines[0] and "--lr" in lines[0], p.stderr
    assert "update skipped" in p.stdout and not os.path.exists(ck / "checkpoint" / "step-3")


def test_nonfinite_weights_are_neither_saved_nor_loaded(tmp_path, tiny_models, capsys):
    from src.reader import FiDReader
    reader = FiDReader.from_pretrained(tiny_models["reader"])
    with torch.no_grad():
        next(reader.parameters())[0, 0] = float("nan")
    with pytest.raises(safety.NonFiniteError, match="refusing to save: reader weight"):
        checkpoint.write_main(str(tmp_path), {"reader": reader}, {}, {"step": 3})
    assert not os.path.exists(tmp_path / "state.pt")
    reader.save_pretrained(str(tmp_path / "bad" / "reader"))
    rc, lines = main_rc(stage1(tmp_path / "ck", tiny_models, steps=1)[1:] + [f"--model_path={tmp_path / 'bad'}"], capsys)
    assert rc == 2
    assert_one_error_line(lines, f"error: {tmp_path / 'bad'}: reader weight")


# ------------------------------------------------------------------------------- §2 broken latest

def _fake_step(root, n, complete=True):
    d = root / f"step-{n}"
    (d / "reader").mkdir(parents=True)
    for f in ["options.json", "rng-rank0.pt"] + (["state.pt"] if complete else []):
        (d / f).write_text("{}")
    return d


def test_resume_skips_a_broken_latest_and_cleans_partial_saves(tmp_path):
    root = tmp_path / "checkpoint"
    s39 = _fake_step(root, 39)
    _fake_step(root, 40, complete=False)
    os.symlink("step-40", root / "latest")
    (root / ".tmp-step-41" / "reader").mkdir(parents=True)
    path, notes = checkpoint.resolve_resume(str(tmp_path))
    assert path == str(s39) and not os.path.exists(root / ".tmp-step-41")
    assert any(".tmp-step-41" in n for n in notes) and any("step-40, which is incomplete" in n for n in notes)
    os.remove(root / "latest")
    os.symlink("step-77", root / "latest")  # deleted target
    path, notes = checkpoint.resolve_resume(str(tmp_path))
    assert path == str(s39) and "does not exist" in notes[0]
    shutil.rmtree(s39)
    with pytest.raises(UsageError, match="no step folder .step-40. is complete"):
        checkpoint.resolve_resume(str(tmp_path))


def test_broken_latest_never_restarts_over_existing_checkpoints(tmp_path, tiny_models, s1, capsys):
    ck = copy_run(s1, tmp_path / "run")
    os.remove(ck / "checkpoint" / "step-2" / "state.pt")
    os.remove(ck / "checkpoint" / "step-1" / "state.pt")
    rc, lines = main_rc(stage1(ck, tiny_models, steps=2, extra=["--save_freq=1"])[1:], capsys)
    assert rc == 2
    assert_one_error_line(lines, f"error: {ck / 'checkpoint'}: `latest` points at")
    assert not os.path.exists(ck / "checkpoint" / "step-2" / "state.pt")  # nothing trained over it


# ------------------------------------------------------------------- §3 reference / nothing written

def test_a_late_error_leaves_nothing_behind(tmp_path, tiny_models, s1, capsys):
    ck = tmp_path / "g"
    argv = grpo_stage2(ck, tiny_models, s1 / "checkpoint" / "step-2", extra=["--max_passages=3"])[1:]
    rc, lines = main_rc(argv, capsys)
    assert rc == 2
    assert_one_error_line(lines, "error: --passages: the corpus has 3 stories but 4 are retrieved")
    assert not os.path.exists(ck)


def test_stale_reference_is_rebuilt_on_a_fresh_start(tmp_path, tiny_models):
    from src.distributed import DistInfo
    from src.reader import FiDReader
    opts, _ = options.parse(["--use_grpo", "--reader_rl_learning", f"--checkpoint_dir={tmp_path}"])
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    a = FiDReader.from_pretrained(tiny_models["reader"])
    b = FiDReader.from_pretrained(tiny_models["reader"])
    with torch.no_grad():
        next(b.parameters()).add_(1.0)
    logs = []
    ref, _ = train.reference_models(opts, a, None, info, taken_from="A", log=logs.append)
    ref, _ = train.reference_models(opts, a, None, info, taken_from="A", log=logs.append)  # same weights: reused
    assert "reusing" in logs[-1]
    ref, _ = train.reference_models(opts, b, None, info, taken_from="B", log=logs.append)
    assert "was taken from A" in logs[-1] and "rebuilding" in logs[-1]
    assert torch.equal(next(ref.parameters()), next(b.parameters()))
    saved = FiDReader.from_pretrained(str(tmp_path / "reference" / "reader"))
    assert torch.equal(next(saved.parameters()), next(b.parameters()))
    # a resumed run keeps its references whatever its current weights
    ref, _ = train.reference_models(opts, a, None, info, resumed=True, taken_from="B", log=logs.append)
    assert torch.equal(next(ref.parameters()), next(b.parameters()))
    shutil.rmtree(tmp_path / "reference")
    with pytest.raises(UsageError, match="missing or incomplete"):
        train.reference_models(opts, a, None, info, resumed=True, taken_from="B", log=logs.append)


# ------------------------------------------------------------------------ §4 resume, changed options

def test_resume_refuses_or_applies_changed_options(tmp_path, tiny_models, s1, capsys):
    ck = copy_run(s1, tmp_path / "run")  # continue from step-1 (no `latest`: the newest complete one)
    os.remove(ck / "checkpoint" / "latest")
    shutil.rmtree(ck / "checkpoint" / "step-2")
    argv = stage1(ck, tiny_models, steps=2, extra=["--save_freq=1", "--lr=5e-3"])[1:]
    rc, lines = main_rc(argv, capsys)
    assert rc == 2 and "lr 0.001 -> 0.005" in lines[-1] and "--allow_option_changes" in lines[-1]
    rc, _ = main_rc(argv + ["--allow_option_changes"], capsys)
    assert rc == 0
    state = torch.load(ck / "checkpoint" / "step-2" / "state.pt", weights_only=True)
    assert state["optimizers"]["reader"]["param_groups"][0]["initial_lr"] == 5e-3
    assert json.load(open(ck / "checkpoint" / "step-2" / "options.json"))["lr"] == 5e-3
    assert "resume applies a changed option: lr 0.001 -> 0.005" in open(ck / "run.log").read()
    # a stage-2 command pointed at a stage-1 run (used to be KeyError: 'retriever')
    rc, lines = main_rc(grpo_stage2(ck, tiny_models, ck / "checkpoint" / "step-1")[1:], capsys)
    assert rc == 2
    assert_one_error_line(lines, f"error: --checkpoint_dir: {ck} holds a stage-1 (closed-book) run")


def test_compare_names_world_size_and_schedule_changes(tmp_path):
    opts, _ = options.parse(["--closed_book", "--total_steps=20"])
    saved = dict(options.to_json_dict(opts), total_steps=10)
    (tmp_path / "rng-rank0.pt").write_text("")
    with pytest.raises(UsageError, match="world size 1 -> 2"):
        resume.compare(saved, opts, str(tmp_path), 2, allow=False)
    notes = resume.compare(saved, opts, str(tmp_path), 2, allow=True)
    assert any("world size 1 -> 2" in n for n in notes) and any("now ends at step 20" in n for n in notes)


# ------------------------------------------------------------------------------ §5 evaluation inputs

def test_evaluate_refuses_mismatched_inputs_before_generating(tmp_path, tiny_models, s1, capsys):
    step = copy_run(s1 / "checkpoint" / "step-2", tmp_path / "step-2")
    ev = ["evaluate.py", f"--model_path={step}", f"--eval_data={SAMPLE}/valid.jsonl", "--max_eval_examples=2"]
    # a results location that cannot be written: refused before any generation
    (tmp_path / "file").write_text("")
    rc, lines = main_rc(ev[1:] + ["--write_results", f"--checkpoint_dir={tmp_path / 'file' / 'out'}"], capsys,
                        evaluate.main)
    assert rc == 2
    assert_one_error_line(lines, "error: --checkpoint_dir: cannot create")
    # two eval files with one name
    os.makedirs(tmp_path / "other")
    shutil.copy(f"{SAMPLE}/valid.jsonl", tmp_path / "other" / "valid.jsonl")
    rc, lines = main_rc(ev[1:] + ["--eval_data", f"{SAMPLE}/valid.jsonl", str(tmp_path / "other" / "valid.jsonl")],
                        capsys, evaluate.main)
    assert rc == 2
    assert_one_error_line(lines, "error: --eval_data: ")
    # a broken options.json
    opts_file = step / "options.json"
    good = opts_file.read_text()
    opts_file.write_text(good[:40])
    rc, lines = main_rc(ev[1:], capsys, evaluate.main)
    assert rc == 2
    assert_one_error_line(lines, f"error: {opts_file}:")
    # trained with retrieval but retriever/ is gone: refused unless a retriever is named
    saved = json.loads(good)
    saved.update(closed_book=False, retriever_model_path=tiny_models["retriever"])
    opts_file.write_text(json.dumps(saved))
    ret = [f"--passages={SAMPLE}/stories.jsonl", "--max_passages=8", "--retriever_n_context=2"]
    rc, lines = main_rc(ev[1:] + ret, capsys, evaluate.main)
    assert rc == 2
    assert_one_error_line(lines, "error: --model_path: ")
    rc = train.entry(evaluate.main, ev[1:] + ret + [f"--retriever_model_path={tiny_models['retriever']}"])
    assert rc == 0 and f"retriever: {tiny_models['retriever']}" in capsys.readouterr().out


def test_loaded_index_must_match_corpus_and_retriever(tmp_path, tiny_models):
    from src.data import load_passages
    from src.distributed import DistInfo
    from src.retrieval import StoryRetrieval
    from src.retriever import Retriever
    stories = load_passages(f"{SAMPLE}/stories.jsonl", 16)
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    retriever = Retriever.from_pretrained(tiny_models["retriever"])
    base = ["--retriever_n_context=2", "--retriever_maxlength=32"]
    opts = options.validate(options.parse(base + [f"--save_index_path={tmp_path / 'ix'}"])[0])
    StoryRetrieval(stories[:8], opts, info).build(retriever)
    load = options.validate(options.parse(base + [f"--load_index_path={tmp_path / 'ix'}"])[0])
    StoryRetrieval(stories[:8], load, info).build(retriever)  # the same corpus and retriever load fine
    with pytest.raises(UsageError, match="built from another corpus"):
        StoryRetrieval(stories[8:], load, info).build(retriever)  # same size, other stories
    with torch.no_grad():
        next(retriever.parameters()).add_(1.0)
    with pytest.raises(UsageError, match="built from another retriever"):
        StoryRetrieval(stories[:8], load, info).build(retriever)


# ------------------------------------------------------------------------------- §6 one error line

def test_user_mistakes_are_one_line(tmp_path, tiny_models, s1, capsys):
    base = stage1(tmp_path / "ck", tiny_models, steps=1)[1:]
    for extra, start in [(["--seed=-1"], "error: --seed: must be in"),
                         (["--encoder_format={query"], "error: --encoder_format: '{query' is not a valid format"),
                         (["--per_gpu_batch", "2"], "error: command line: unrecognized arguments: --per_gpu_batch"),
                         ([f"--checkpoint_dir={SAMPLE}/train.jsonl/x"], "error: --checkpoint_dir: cannot create")]:
        rc, lines = main_rc(base + extra, capsys)
        assert rc == 2
        assert_one_error_line(lines, start)
    rc, lines = main_rc(grpo_stage2(tmp_path / "g", tiny_models, s1 / "checkpoint/step-2",
                                    extra=["--generation_max_length=1"])[1:], capsys)
    assert rc == 2
    assert_one_error_line(lines, "error: --generation_max_length: must be >= 2")
    assert not os.path.exists(tmp_path / "ck") and not os.path.exists(tmp_path / "g")
    # a truncated safetensors file in --model_path
    bad = copy_run(s1 / "checkpoint" / "step-2", tmp_path / "bad")
    weights = bad / "reader" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    rc, lines = main_rc(base + [f"--model_path={bad}"], capsys)
    assert rc == 2
    assert_one_error_line(lines, f"error: {bad}: cannot load the model weights")


def test_tampered_state_is_refused_without_weights_only_advice(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    (tmp_path / "reader").mkdir()
    with open(tmp_path / "state.pt", "wb") as f:
        pickle.dump({"step": Evil()}, f)
    with pytest.raises(UsageError) as e:
        checkpoint.load_state(str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and "weights_only" not in msg and "state.pt: not a valid checkpoint state file" in msg


def test_disk_full_timeouts_and_interrupts_map_to_one_line(capsys):
    def disk_full(argv):
        with open("/dev/full", "w") as f:
            f.write("x")
            f.flush()
    exits.note_output("/dev")
    assert exits.run(disk_full) == 2
    assert capsys.readouterr().err.startswith("error: /dev: no space left on device — ")

    def interrupted(argv):
        raise KeyboardInterrupt
    assert exits.run(interrupted) == 130
    assert capsys.readouterr().err.startswith("interrupted:")


def test_invalid_json_message_has_no_at_at(tmp_path):
    from src.data import load_dialogues
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"question": "unterminated\n')
    with pytest.raises(UsageError) as e:
        load_dialogues(str(bad))
    assert " at at " not in str(e.value) and "Unterminated string starting at column" in str(e.value)


@pytest.mark.slow
def test_error_is_printed_once_under_two_processes(tmp_path):
    p = run(["train.py", "--closed_book", f"--train_data={SAMPLE}/train.jsonl", "--seed=-1",
             f"--checkpoint_dir={tmp_path}"], nproc=2, check=False)
    assert p.returncode != 0
    assert p.stderr.count("error: --seed") == 1, p.stderr


# ----------------------------------------------------------------------------------- §7 the rest

def test_ctrl_c_saves_at_the_step_boundary_and_exits_130(tmp_path, tiny_models):
    ck = tmp_path / "int"
    cmd = [PY] + stage1(ck, tiny_models, steps=10000, extra=["--save_freq=0"])
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    for line in iter(proc.stdout.readline, ""):
        if re.search(r"\bstep 2(/\d+)? \|", line) or time.time() > deadline:  # "step 2/10000 | ..."
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("interrupted: Ctrl-C: stopped after step"), err
    latest = checkpoint.resolve_resume(str(ck), clean=False)[0]
    assert latest and checkpoint.is_complete(latest)
    # every file of a checkpoint is readable like the rest (safetensors writes 0600)
    modes = {f: os.stat(os.path.join(r, f)).st_mode & 0o777 for r, _, fs in os.walk(latest) for f in fs}
    mask = os.umask(0)
    os.umask(mask)
    assert set(modes.values()) == {0o666 & ~mask}, modes


def test_dist_timeout_ends_a_rank_that_waits_for_a_missing_peer(tmp_path):
    env = dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    p = run(["train.py", "--closed_book", f"--train_data={SAMPLE}/train.jsonl", "--dist_timeout=0.05",
             f"--checkpoint_dir={tmp_path}"], check=False, env=env, timeout=300)  # without the flag: 30 min
    assert p.returncode == 1
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "--dist_timeout" in lines[0] and "Traceback" not in p.stderr, p.stderr[-2000:]


def test_metrics_rows_after_the_resumed_step_are_dropped(tmp_path):
    rows = [{"step": s, "loss": 1.0} for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')
    assert resume.drop_rows_after(str(tmp_path), 2) == 3
    assert [json.loads(x)["step"] for x in open(tmp_path / "metrics.jsonl")] == [1, 2]


def test_keep_last_n_checkpoints(tmp_path):
    root = tmp_path / "checkpoint"
    for n in (1, 2, 3, 4):
        _fake_step(root, n)
    _fake_step(root, 5, complete=False)
    os.symlink("step-2", root / "latest")
    removed = checkpoint.prune(str(tmp_path), 1)
    assert sorted(os.path.basename(p) for p in removed) == ["step-1", "step-3"]
    assert sorted(os.listdir(root)) == ["latest", "step-2", "step-4", "step-5"]
    assert checkpoint.prune(str(tmp_path), 0) == []


def test_warnings_for_suspicious_inputs(tmp_path, tiny_models):
    from src.data import clip_for_tokenizer, load_dialogues
    from src.reader import FiDReader
    d = tmp_path / "d.jsonl"
    huge = "persona: a. context: Q: " + "hello world " * 20000
    d.write_text(json.dumps({"question": "persona: a. context: Q: hi", "answers": [""]}) + "\n"
                 + json.dumps({"question": huge, "answers": ["x"]}) + "\n")
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("lapdog").addHandler(handler)
    try:
        load_dialogues(str(d))
        opts, _ = options.parse(["--closed_book", "--passages=s.jsonl"])
        preflight.check_options(opts)
    finally:
        logging.getLogger("lapdog").removeHandler(handler)
    text = "\n".join(r.getMessage() for r in records)
    assert "only empty answers (first: line 1)" in text and "longer than 100000 characters (first: line 2)" in text
    assert "--passages s.jsonl is ignored with --closed_book" in text
    # a huge text is cut before the tokenizer sees it, without changing the kept tokens
    reader = FiDReader.from_pretrained(tiny_models["reader"])
    assert len(clip_for_tokenizer([huge], 16)[0]) == 16 * 64
    full = reader.tokenizer([huge], truncation=True, max_length=16)["input_ids"]
    ids, _ = reader.tokenize_inputs([[huge]], 16)
    assert ids[0, 0].tolist() == full[0]
