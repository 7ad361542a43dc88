"""Never lose a run: non-finite steps, broken `latest`, stale references, resume with
changed options, mismatched evaluation inputs, one error line per user mistake, Ctrl-C, timeouts.

Error paths run train.py / evaluate.py in-process (they stop before any training, so this is fast);
the cases that need a real process (exit codes under signals, several ranks) use subprocesses.
"""

import errno
import json
import logging
import os
import pickle
import re
import shutil
import signal
import subprocess
import time

import pytest
import torch
from helpers import ENV, PY, ROOT, SAMPLE, free_port, grpo_stage2, run, run_entry, stage1

from src.cli import options, preflight
from src.infra import exits, safety
from src.infra.errors import NonFiniteError, UsageError
from src.run import checkpoint, resume
from src.run.models import reference_models


def main_rc(argv, capsys, script="train.py"):
    """(exit status, stderr lines) of train.py (or evaluate.py) run in this process."""
    rc = run_entry(script, argv)
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
    assert run_entry("train.py", stage1(ck, tiny_models, steps=2, extra=["--save_freq=1"])[1:]) == 0
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
    with pytest.raises(NonFiniteError, match=r"^step 5: grad_norm/reader nan for 2 consecutive steps"):
        g.check(4, {"grad_norm/reader": float("nan")}, False, "cpu")
    with pytest.raises(NonFiniteError, match="retriever scores are NaN"):
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
    from src.model.reader import FiDReader
    reader = FiDReader.from_pretrained(tiny_models["reader"])
    with torch.no_grad():
        next(reader.parameters())[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="refusing to save: reader weight"):
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
    from src.infra.distributed import DistInfo
    from src.model.reader import FiDReader
    opts, _ = options.parse(["--use_grpo", "--reader_rl_learning", f"--checkpoint_dir={tmp_path}"])
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    a = FiDReader.from_pretrained(tiny_models["reader"])
    b = FiDReader.from_pretrained(tiny_models["reader"])
    with torch.no_grad():
        next(b.parameters()).add_(1.0)
    logs = []
    ref, _ = reference_models(opts, a, None, info, taken_from="A", log=logs.append)
    ref, _ = reference_models(opts, a, None, info, taken_from="A", log=logs.append)  # same weights: reused
    assert "reusing" in logs[-1]
    ref, _ = reference_models(opts, b, None, info, taken_from="B", log=logs.append)
    assert "was taken from A" in logs[-1] and "rebuilding" in logs[-1]
    assert torch.equal(next(ref.parameters()), next(b.parameters()))
    saved = FiDReader.from_pretrained(str(tmp_path / "reference" / "reader"))
    assert torch.equal(next(saved.parameters()), next(b.parameters()))
    # a resumed run keeps its references whatever its current weights
    ref, _ = reference_models(opts, a, None, info, resumed=True, taken_from="B", log=logs.append)
    assert torch.equal(next(ref.parameters()), next(b.parameters()))
    shutil.rmtree(tmp_path / "reference")
    with pytest.raises(UsageError, match="missing or incomplete"):
        reference_models(opts, a, None, info, resumed=True, taken_from="B", log=logs.append)


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
                        "evaluate.py")
    assert rc == 2
    assert_one_error_line(lines, "error: --checkpoint_dir: cannot create")
    # two eval files with one name
    os.makedirs(tmp_path / "other")
    shutil.copy(f"{SAMPLE}/valid.jsonl", tmp_path / "other" / "valid.jsonl")
    rc, lines = main_rc(ev[1:] + ["--eval_data", f"{SAMPLE}/valid.jsonl", str(tmp_path / "other" / "valid.jsonl")],
                        capsys, "evaluate.py")
    assert rc == 2
    assert_one_error_line(lines, "error: --eval_data: ")
    # a broken options.json
    opts_file = step / "options.json"
    good = opts_file.read_text()
    opts_file.write_text(good[:40])
    rc, lines = main_rc(ev[1:], capsys, "evaluate.py")
    assert rc == 2
    assert_one_error_line(lines, f"error: {opts_file}:")
    # trained with retrieval but retriever/ is gone: refused unless a retriever is named
    saved = json.loads(good)
    saved.update(closed_book=False, retriever_model_path=tiny_models["retriever"])
    opts_file.write_text(json.dumps(saved))
    ret = [f"--passages={SAMPLE}/stories.jsonl", "--max_passages=8", "--retriever_n_context=2"]
    rc, lines = main_rc(ev[1:] + ret, capsys, "evaluate.py")
    assert rc == 2
    assert_one_error_line(lines, "error: --model_path: ")
    rc = run_entry("evaluate.py", ev[1:] + ret + [f"--retriever_model_path={tiny_models['retriever']}"])
    assert rc == 0 and f"retriever: {tiny_models['retriever']}" in capsys.readouterr().out


def test_loaded_index_must_match_corpus_and_retriever(tmp_path, tiny_models):
    from src.data.dialogues import load_passages
    from src.infra.distributed import DistInfo
    from src.model.retriever import Retriever
    from src.retrieval.stories import StoryRetrieval
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
    from src.data.dialogues import load_dialogues
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

@pytest.mark.parametrize("sig, name", [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")])
def test_ctrl_c_saves_at_the_step_boundary_and_exits_130(tmp_path, tiny_models, sig, name):
    """SIGTERM (a scheduler's preemption, `kill`) used to end the run at once without saving."""
    ck = tmp_path / "int"
    cmd = [PY] + stage1(ck, tiny_models, steps=10000, extra=["--save_freq=0"])
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    for line in iter(proc.stdout.readline, ""):
        if re.search(r"\bstep 2(/\d+)? \|", line) or time.time() > deadline:  # "step 2/10000 | ..."
            break
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1].startswith(f"interrupted: {name}: stopped after step"), err
    assert "Traceback" not in err
    assert f"interrupted: {name}: stopped after step" in (ck / "run.log").read_text()  # the last line, also logged
    assert not os.path.exists(ck / "run.lock")
    latest = checkpoint.resolve_resume(str(ck), clean=False)[0]
    assert latest and checkpoint.is_complete(latest)
    # every file of a checkpoint is readable like the rest (safetensors writes 0600)
    modes = {f: os.stat(os.path.join(r, f)).st_mode & 0o777 for r, _, fs in os.walk(latest) for f in fs}
    mask = os.umask(0)
    os.umask(mask)
    assert set(modes.values()) == {0o666 & ~mask}, modes


@pytest.mark.parametrize("sig, name, delay", [(signal.SIGINT, "Ctrl-C", 1.0), (signal.SIGTERM, "SIGTERM", 5.0)])
def test_a_signal_while_starting_is_one_line_and_leaves_nothing(tmp_path, tiny_models, sig, name, delay):
    """Ctrl-C during the start (torch loading; then data, models) used to print a traceback."""
    ck = tmp_path / "start"
    proc = subprocess.Popen([PY] + stage1(ck, tiny_models, steps=10000), cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert lines[-1].startswith(f"interrupted: {name}") and sum(ln.startswith("interrupted:") for ln in lines) == 1
    if not os.path.exists(ck / "run.log"):  # stopped before writing: no folder, no lock left
        assert not os.path.exists(ck), os.listdir(ck)
    assert not os.path.exists(ck / "run.lock")


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
    from src.data.dialogues import clip_for_tokenizer, load_dialogues
    from src.model.reader import FiDReader
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


# ------------------------------------------------------------------ §8 one writer, exact resume, one line for every fault

HOLD_LOCK = ("import sys, time; sys.path.insert(0, sys.argv[1]); from src.infra.lock import RunLock; "
             "RunLock(sys.argv[2], command='train.py (the other run)').acquire(); print('locked', flush=True); "
             "time.sleep(120)")


def hold_lock(folder):
    """A process holding `folder`'s run lock, as a running training does."""
    proc = subprocess.Popen([PY, "-c", HOLD_LOCK, ROOT, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_is_refused_and_a_dead_ones_lock_taken_over(tmp_path, tiny_models, s1, capsys):
    """Two trainings in one --checkpoint_dir used to both run and interleave metrics.jsonl."""
    ck = copy_run(s1, tmp_path / "run")
    argv = stage1(ck, tiny_models, steps=3, extra=["--save_freq=1"])[1:]
    metrics_before = (ck / "metrics.jsonl").read_text()
    other = hold_lock(ck)
    try:
        rc, lines = main_rc(argv, capsys)
        assert rc == 2
        assert_one_error_line(lines, f"error: --checkpoint_dir: {ck} is in use by another run (pid {other.pid} on ")
        assert "train.py (the other run)" in lines[-1] and "lock" in lines[-1]
        assert (ck / "metrics.jsonl").read_text() == metrics_before  # nothing touched
        assert not os.path.exists(ck / "checkpoint" / "step-3")
    finally:
        other.kill()
        other.wait()
    # the holder died (SIGKILL: no cleanup): its lock is taken over, the run goes on and says so
    rc, _ = main_rc(argv, capsys)
    assert rc == 0 and os.path.isdir(ck / "checkpoint" / "step-3")
    assert f"took over {ck / 'run.lock'} from a run that is no longer running (pid {other.pid}" in \
        (ck / "run.log").read_text()
    assert not os.path.exists(ck / "run.lock")  # given back at the end
    # ... and on a refused start (a changed option): no lock left behind either
    rc, _ = main_rc(argv + ["--lr=0.5"], capsys)
    assert rc == 2 and not os.path.exists(ck / "run.lock")


def test_without_flock_a_stale_owner_file_is_taken_over_and_a_live_one_refused(tmp_path, monkeypatch):
    """On a file system without flock the owner file decides: pid alive (and started when the file
    says) on this host: refused; dead: taken over; another host: refused with the file to delete."""
    import errno
    import fcntl
    import json as json_

    from src.infra import lock

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_flock)
    d = tmp_path / "run"
    d.mkdir()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        owner = {"pid": sleeper.pid, "host": lock.socket.gethostname(), "started": "x",
                 "process_start": lock._process_start(sleeper.pid)}
        (d / "run.lock").write_text(json_.dumps(owner))
        with pytest.raises(UsageError, match=f"in use by another run \\(pid {sleeper.pid} on "):
            lock.RunLock(str(d)).acquire()
        (d / "run.lock").write_text(json_.dumps(dict(owner, process_start=owner["process_start"] - 1)))
        held = lock.RunLock(str(d))  # the pid was reused by a later process: stale
        assert "no longer running" in held.acquire()[0]
        held.release()
        (d / "run.lock").write_text(json_.dumps(dict(owner, host="elsewhere")))
        with pytest.raises(UsageError, match="if that run is over, delete"):
            lock.RunLock(str(d)).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    (d / "run.lock").write_text(json_.dumps(owner))  # now dead
    held = lock.RunLock(str(d))
    assert "no longer running" in held.acquire()[0]
    held.release()
    assert not os.path.exists(d / "run.lock")


def test_resume_refuses_every_changed_option_models_and_data_included(tmp_path, tiny_models, s1, capsys):
    """A new --model_path / --reader_model_type used to be ignored, and other data of the same size,
    another --text_maxlength or --dropout applied, without a word."""
    ck = copy_run(s1, tmp_path / "run")
    base = stage1(ck, tiny_models, steps=3, extra=["--save_freq=1"])[1:]
    lines_of = open(f"{SAMPLE}/train.jsonl").readlines()
    swapped = tmp_path / "swapped.jsonl"  # the same size, other contents
    swapped.write_text("".join([lines_of[1], lines_of[0], *lines_of[2:]]))
    assert os.path.getsize(swapped) == os.path.getsize(f"{SAMPLE}/train.jsonl")
    other_reader = tmp_path / "other_reader"
    shutil.copytree(tiny_models["reader"], other_reader)
    for extra, shown in [([f"--train_data={swapped}"], f"train_data ['{SAMPLE}/train.jsonl'] -> ['{swapped}']: "
                                                        "other contents (sha256 "),
                         (["--text_maxlength=64"], "text_maxlength 96 -> 64"),
                         (["--dropout=0.2"], "dropout 0.1 -> 0.2"),
                         ([f"--reader_model_type={other_reader}"], "reader_model_type "),
                         ([f"--model_path={s1 / 'checkpoint' / 'step-1'}"], "model_path None -> ")]:
        rc, lines = main_rc(base + extra, capsys)
        assert rc == 2, extra
        assert_one_error_line(lines, f"error: --checkpoint_dir: resuming {ck / 'checkpoint' / 'step-2'} with changed "
                                     "options (")
        assert shown in lines[-1] and "--allow_option_changes" in lines[-1], (extra, lines[-1])
    assert "(a resume ignores it: the weights come from the checkpoint)" in lines[-1]
    # the same contents under another path: not a change
    same = tmp_path / "same.jsonl"
    shutil.copy(f"{SAMPLE}/train.jsonl", same)
    rc, _ = main_rc(stage1(ck, tiny_models, steps=3, extra=["--save_freq=1", f"--train_data={same}",
                                                              "--log_freq=2", "--name=renamed"])[1:], capsys)
    assert rc == 0
    # --allow_option_changes: applied (or, for the weights' source, ignored) with one warning each
    rc, _ = main_rc(stage1(ck, tiny_models, steps=4, extra=["--save_freq=1", f"--train_data={swapped}",
                                                              f"--reader_model_type={other_reader}",
                                                              "--allow_option_changes"])[1:], capsys)
    assert rc == 0
    log = (ck / "run.log").read_text()
    assert f"warning: resume applies a changed option: train_data ['{same}'] -> ['{swapped}']: other contents" in log
    assert f"warning: resume ignores a changed option: reader_model_type {tiny_models['reader']} -> {other_reader}" in log
    saved = json.load(open(ck / "checkpoint" / "step-4" / "options.json"))
    assert len(saved["run_info"]["data"]["train_data"][0]) == 64  # the SHA-256 of the contents


def _fails_writing(monkeypatch, target, match, exc):
    """Make `target` (module, attribute) raise `exc` when its first argument's path contains `match`."""
    module, name = target
    real = getattr(module, name)

    def failing(*args, **kwargs):
        where = " ".join(str(a) for a in args[:3]) + " " + " ".join(str(v) for v in kwargs.values())
        if match in where:
            raise exc
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, failing)


def test_a_full_or_read_only_disk_is_one_line_naming_the_file(tmp_path, tiny_models, capsys, monkeypatch):
    """torch.save, safetensors, the tokenizers library and logging each report a full disk their own
    way; they used to end the run with a traceback (exit 1), or go on after a logging traceback."""
    import safetensors
    import transformers.modeling_utils

    from src.infra import tracking
    from src.model.reader import FiDReader
    cases = [
        ("state", (torch, "save"), "state.pt",
         RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
         "state.pt: no space left on device — "),
        ("weights", (transformers.modeling_utils, "safe_save_file"), "model.safetensors",
         safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
         "reader: no space left on device — "),
        ("tokenizer", (type(FiDReader.from_pretrained(tiny_models["reader"]).tokenizer), "_save_pretrained"), "reader",
         Exception("No space left on device (os error 28)"), "reader: no space left on device — "),
        ("read-only", (transformers.modeling_utils, "safe_save_file"), "model.safetensors",
         safetensors.SafetensorError("Error while serializing: I/O error: Read-only file system (os error 30)"),
         "reader: cannot write (read-only file system) — "),
    ]
    for name, target, match, exc, expected in cases:
        with monkeypatch.context() as m:
            _fails_writing(m, target, match, exc)
            rc, lines = main_rc(stage1(tmp_path / name, tiny_models, steps=1)[1:], capsys)
        assert rc == 2, (name, lines)
        assert_one_error_line(lines, f"error: {tmp_path / name / 'checkpoint' / '.tmp-step-1'}")
        assert expected in lines[-1], (name, lines[-1])
        assert lines[-1] in (tmp_path / name / "run.log").read_text()  # the ending line is in run.log too
        assert not os.path.exists(tmp_path / name / "checkpoint" / "step-1")
        assert not os.path.exists(tmp_path / name / "run.lock")

    # the file system turns read-only mid-run: run.log's next line fails (logging used to print a
    # traceback per line and go on), then metrics.jsonl
    class ReadOnly:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            raise OSError(errno.EROFS, "Read-only file system")

        def __getattr__(self, name):
            return getattr(self.f, name)
    real_open = tracking._RunLogHandler._open
    with monkeypatch.context() as m:
        m.setattr(tracking._RunLogHandler, "_open", lambda self: ReadOnly(real_open(self)))
        rc, lines = main_rc(stage1(tmp_path / "ro", tiny_models, steps=1)[1:], capsys)
    assert rc == 2
    assert_one_error_line(lines, f"error: {tmp_path / 'ro' / 'run.log'}: cannot write (read-only file system) — ")
    real_file_open = open
    with monkeypatch.context() as m:
        m.setattr("builtins.open", lambda f, mode="r", *a, **k: ReadOnly(real_file_open(f, mode, *a, **k))
                  if str(f).endswith("metrics.jsonl") and "a" in mode else real_file_open(f, mode, *a, **k))
        rc, lines = main_rc(stage1(tmp_path / "ro2", tiny_models, steps=1)[1:], capsys)
    assert rc == 2
    assert_one_error_line(lines, f"error: {tmp_path / 'ro2' / 'metrics.jsonl'}: cannot write (read-only file system)")


def test_damaged_or_nonfinite_references_are_refused_at_load(tmp_path, tiny_models, s1, capsys):
    """A truncated reference/reader/model.safetensors used to be a traceback; NaN weights in
    reference/retriever went unchecked: 5 skipped steps, then advice to lower --lr."""
    from safetensors.torch import load_file, save_file
    ck = tmp_path / "g"
    argv = grpo_stage2(ck, tiny_models, s1 / "checkpoint" / "step-2", steps=1, extra=["--max_passages=8"])[1:]
    assert run_entry("train.py", argv) == 0
    resume_argv = grpo_stage2(ck, tiny_models, s1 / "checkpoint" / "step-2", steps=2, extra=["--max_passages=8"])[1:]
    reader_file = ck / "reference" / "reader" / "model.safetensors"
    good = reader_file.read_bytes()
    reader_file.write_bytes(good[:1000])
    rc, lines = main_rc(resume_argv, capsys)
    assert rc == 2
    assert_one_error_line(lines, f"error: {ck / 'reference' / 'reader'}: cannot load the model weights")
    reader_file.write_bytes(good)
    ret_file = ck / "reference" / "retriever" / "model.safetensors"
    tensors = load_file(ret_file)
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, ret_file)
    rc, lines = main_rc(resume_argv, capsys)
    assert rc == 2
    assert_one_error_line(lines, f"error: {ret_file}: retriever weight ")
    assert f"{name}' holds NaN/inf — " in lines[-1]
    assert "lower --lr" not in lines[-1] and not os.path.exists(ck / "checkpoint" / "step-2")


def test_a_truncated_index_shard_is_one_line(tmp_path, tiny_models, s1, capsys):
    ev = ["evaluate.py", f"--model_path={s1 / 'checkpoint' / 'step-2'}", f"--eval_data={SAMPLE}/valid.jsonl",
          "--max_eval_examples=2", f"--passages={SAMPLE}/stories.jsonl", "--max_passages=8", "--retriever_n_context=2",
          f"--retriever_model_path={tiny_models['retriever']}", f"--checkpoint_dir={tmp_path / 'ev'}"]
    assert run_entry("evaluate.py", ev[1:] + [f"--save_index_path={tmp_path / 'ix'}"]) == 0
    shard = next(p for p in (tmp_path / "ix").iterdir() if p.name != "meta.json")
    shard.write_bytes(shard.read_bytes()[:100])
    capsys.readouterr()
    for script, argv in (("evaluate.py", ev[1:]),
                         ("train.py", grpo_stage2(tmp_path / "g", tiny_models, s1 / "checkpoint" / "step-2",
                                                  extra=["--max_passages=8"])[1:])):
        rc, lines = main_rc(argv + [f"--load_index_path={tmp_path / 'ix'}"], capsys, script)
        assert rc == 2, script
        assert_one_error_line(lines, "error: --load_index_path: ")
        assert f"cannot load the index in {shard} (" in lines[-1] and "--save_index_path" in lines[-1], lines


def test_query_side_checkpoint_without_its_passage_side_is_refused(tmp_path, tiny_models, s1, capsys):
    """Its retriever/ is the trained query side; embedding the stories with it (what evaluate.py
    did when passage_retriever/ was missing) scores them against the wrong encoder, silently."""
    step = copy_run(s1 / "checkpoint" / "step-2", tmp_path / "step-2")
    shutil.copytree(tiny_models["retriever"], step / "retriever")
    saved = json.loads((step / "options.json").read_text())
    saved.update(closed_book=False, train_retriever=True, query_side_retriever_training=True,
                 retriever_model_path=tiny_models["retriever"])
    (step / "options.json").write_text(json.dumps(saved))
    ev = [f"--model_path={step}", f"--eval_data={SAMPLE}/valid.jsonl", "--max_eval_examples=2",
          f"--passages={SAMPLE}/stories.jsonl", "--max_passages=8", "--retriever_n_context=2"]
    rc, lines = main_rc(ev, capsys, "evaluate.py")
    assert rc == 2
    assert_one_error_line(lines, f"error: --model_path: '{step}' was trained query-side")
    assert "--passage_retriever_path" in lines[-1]
    assert run_entry("evaluate.py", ev + [f"--passage_retriever_path={tiny_models['retriever']}"]) == 0
    captured = capsys.readouterr()
    assert f"stories embedded by {tiny_models['retriever']}" in captured.out
    assert "\r" not in captured.err  # no embedding / evaluation bar where stderr is no terminal
    shutil.copytree(tiny_models["retriever"], step / "passage_retriever")  # restored: used as before
    assert run_entry("evaluate.py", ev) == 0
    rc, lines = main_rc(stage1(tmp_path / "t", tiny_models, steps=1)[1:] + [f"--passage_retriever_path={step}"], capsys)
    assert rc == 2 and lines[-1].startswith("error: --passage_retriever_path: is an evaluation option")


def test_run_log_has_the_ending_line_and_data_warnings_and_a_failed_load_leaves_nothing(tmp_path, tiny_models,
                                                                                         capsys):
    """run.log used to lack the error:/interrupted: line that ends a run and the data checks'
    warnings (printed before it existed); a run failing at model load left run.log and an empty
    metrics.jsonl."""
    data = tmp_path / "d.jsonl"
    rows = [json.loads(x) for x in open(f"{SAMPLE}/train.jsonl")][:8]
    rows[0]["answers"] = [""]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ck = tmp_path / "ck"
    argv = stage1(ck, tiny_models, steps=4, extra=[f"--train_data={data}", "--lr=1e10", "--warmup_steps=0",
                                                   "--max_nonfinite_steps=1"])[1:]
    rc, lines = main_rc(argv, capsys)
    assert rc == 3 and lines[-1].startswith("error: step ")
    log = (ck / "run.log").read_text()
    assert lines[-1] in log  # the ending line
    assert f"warning: {data}: 1 example(s) have only empty answers (first: line 1)" in log  # from before run.log
    # a model that fails to load: nothing written (no run.log, no empty metrics.jsonl, no folder)
    rc, lines = main_rc(stage1(tmp_path / "bad", tiny_models, steps=1,
                               extra=[f"--reader_model_type={tmp_path / 'no_such_reader'}"])[1:], capsys)
    assert rc == 2 and lines[-1].startswith("error: ")
    assert not os.path.exists(tmp_path / "bad")
