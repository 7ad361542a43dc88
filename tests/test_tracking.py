import glob
import json
import logging
import math
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from src.infra import tracking
from src.infra.tracking import Timer, Tracker, format_value, peak_memory_mb, timed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \| ")


def wandb_file_bytes(run_dir, needles, timeout=15.0):
    """The offline run file's bytes once all needles are in it: wandb's service process may
    finish writing it a moment after ``wandb.finish()`` returns."""
    deadline = time.monotonic() + timeout
    while True:
        files = glob.glob(os.path.join(run_dir, "run-*.wandb"))
        data = open(files[0], "rb").read() if len(files) == 1 else b""
        if all(n in data for n in needles) or time.monotonic() > deadline:
            return files, data
        time.sleep(0.05)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    """A HOME without .netrc or W&B settings, and no WANDB_DIR/API key from the outside."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("WANDB_DIR", "WANDB_API_KEY", "NETRC", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    return home


def test_format_value():
    assert format_value(2.3449) == "2.345"
    assert format_value(12.3) == "12.3"
    assert format_value(1e-4) == "1.0e-04"
    assert format_value(123456.0) == "1.2e+05"
    assert format_value(1234.4) == "1234"
    assert format_value(0.0) == "0"
    assert format_value(7) == "7"
    assert format_value(torch.tensor(0.5)) == "0.5"
    assert format_value(float("nan")) == "nan"
    assert format_value(float("-inf")) == "-inf"
    assert format_value(None) == "-"
    line = tracking.format_line(20, {"mem": 512.4, "ex/s": 12.31, "lr/reader": 1e-4,
                                     "loss/reader": 2.345, "time/sampling": 0.5, "eval/score": 3.0})
    assert line == "step 20 | loss/reader 2.345 | eval/score 3 | lr/reader 1.0e-04 | time/sampling 0.5s | ex/s 12.31 | mem 512MB"


def test_log_metrics_and_run_log(tmp_path, clean_env, capsys):
    ckpt = tmp_path / "ckpt"
    tr = Tracker(ckpt, "run", {"lr": 1e-4})
    tr.info("hello world")
    tr.log(10, {"loss/reader": torch.tensor(2.345), "lr/reader": 1e-4, "examples": 32})
    tr.log(20, {"loss/reader": float("nan"), "reward": float("inf"), "mem": 512.0})
    # Read back before close: every call must already be on disk.
    rows = read_jsonl(ckpt / "metrics.jsonl")
    for row in rows:  # wall-clock time and the run's elapsed seconds on every row
        assert abs(row.pop("wall_time") - time.time()) < 60 and 0 <= row.pop("elapsed_s") < 60
    assert rows[0] == {"step": 10, "loss/reader": pytest.approx(2.345), "lr/reader": 1e-4, "examples": 32}
    assert rows[1] == {"step": 20, "loss/reader": "NaN", "reward": "Infinity", "mem": 512.0}
    assert math.isnan(float(rows[1]["loss/reader"])) and float(rows[1]["reward"]) == math.inf
    tr.close()

    lines = (ckpt / "run.log").read_text().splitlines()
    assert all(TIMESTAMP.match(line) for line in lines), lines
    assert lines[0].endswith("| hello world")
    # the console keeps it short (metrics.jsonl has every key); s/step once two rows are known
    assert lines[1].endswith("| step 10 | loss/reader 2.345 | lr/reader 1.0e-04")
    assert re.search(r"\| step 20 \| loss/reader nan \| \S+ s/step$", lines[2]), lines[2]
    out = capsys.readouterr().out
    assert "step 10 | loss/reader 2.345" in out and "hello world" in out
    with pytest.raises(RuntimeError):
        tr.log(30, {"x": 1.0})


def test_handlers_not_duplicated_and_appending(tmp_path, clean_env, capsys):
    ckpt = tmp_path / "ckpt"
    first = Tracker(ckpt, "run", {})
    first.log(1, {"x": 1.0})
    second = Tracker(ckpt, "run", {})  # replaces (not adds to) the first one's handlers
    logger = logging.getLogger(tracking.LOGGER_NAME)

    def ours():  # pytest adds its own capture handlers; count only the Tracker's
        return [h for h in logger.handlers if getattr(h, tracking._HANDLER_TAG, False)]

    assert len(ours()) == 2
    second.info("once")
    # Module loggers under "lapdog." reach the same file.
    logging.getLogger("lapdog.data").info("from a module")
    second.log(2, {"x": 2.0})
    second.close()
    first.close()
    assert ours() == []
    text = (ckpt / "run.log").read_text()
    assert text.count("| once") == 1 and "from a module" in text
    assert capsys.readouterr().out.count("| once") == 1
    assert [r["step"] for r in read_jsonl(ckpt / "metrics.jsonl")] == [1, 2]


def test_rank1_writes_nothing(tmp_path, clean_env, capsys):
    ckpt = tmp_path / "ckpt1"
    with Tracker(ckpt, "run", {}, rank=1, use_wandb=True) as tr:
        tr.info("should not appear")
        tr.log(1, {"loss": 1.0})
        tr.log_samples(1, [{"prompt": "p", "reply": "r"}])
        tr.log_summary({"bleu": 1.0})
        tr.warning("disk nearly full")
        assert tr.wandb_run is None
    assert not ckpt.exists()
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "should not appear" not in captured.err
    assert re.search(r"\[rank 1\] .*warning: disk nearly full", captured.err)


def test_samples_summary_and_context_manager(tmp_path, clean_env):
    ckpt = tmp_path / "ckpt"
    with Tracker(ckpt, "run", {}) as tr:
        tr.log_samples(5, [{"prompt": "p1", "reply": "r1", "reward": torch.tensor(0.5)},
                           {"prompt": "p2", "reply": "r2 é", "reward": 1.0}])
        tr.log_samples(6, [{"prompt": "p3", "reply": "r3", "reward": float("nan")}])
        rows = read_jsonl(ckpt / "samples.jsonl")
        assert rows == [{"step": 5, "prompt": "p1", "reply": "r1", "reward": 0.5},
                        {"step": 5, "prompt": "p2", "reply": "r2 é", "reward": 1.0},
                        {"step": 6, "prompt": "p3", "reply": "r3", "reward": "NaN"}]
        tr.log_summary({"bleu": 3.5})
        tr.log_summary({"f1": torch.tensor(12.0)})
    assert json.loads((ckpt / "summary.json").read_text()) == {"bleu": 3.5, "f1": 12.0}
    assert "summary | f1 12" in (ckpt / "run.log").read_text()
    with pytest.raises(RuntimeError):
        tr.log_samples(7, [{"a": 1}])


def test_timer_timed_and_peak_memory():
    stats = {}
    for _ in range(2):
        with timed(stats, "time/sampling", device="cpu") as t:
            sum(range(20000))
        assert t.elapsed > 0
    assert stats["time/sampling"] > 0
    with pytest.raises(ZeroDivisionError):
        with timed(stats, "time/other"):
            1 / 0
    assert "time/other" in stats  # time spent before an error still counts
    timer = Timer(torch.device("cpu"))
    with timer:
        pass
    with timer:
        pass
    assert timer.total >= timer.elapsed >= 0
    mb = peak_memory_mb("cpu")
    assert 10 < mb < 1e6  # this process has imported torch: tens to hundreds of MB


def test_api_key_detection(tmp_path, clean_env, monkeypatch):
    assert not tracking.wandb_api_key_available()
    netrc_path = clean_env / ".netrc"
    netrc_path.write_text("machine example.com login u password p\n")
    netrc_path.chmod(0o600)
    assert not tracking.wandb_api_key_available()
    netrc_path.write_text("machine api.wandb.ai login user password 0123456789abcdef\n")
    assert tracking.wandb_api_key_available()
    netrc_path.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert tracking.wandb_api_key_available()


def test_wandb_not_imported_without_use_wandb(tmp_path):
    code = ("import sys; from src.infra.tracking import Tracker; "
            f"t = Tracker({str(tmp_path / 'c')!r}, 'r', {{}}); t.log(1, {{'x': 1.0}}); t.close(); "
            "assert 'wandb' not in sys.modules, 'wandb imported'")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_wandb_offline_run_and_resume(tmp_path, clean_env, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    ckpt = tmp_path / "ckpt"
    with Tracker(ckpt, "myrun", {"lr": 1e-4, "n_context": 2}, use_wandb=True) as tr:
        tr.log(1, {"loss/reader": 2.5, "reward/mean": 0.25})
        tr.log_samples(1, [{"prompt": "p", "reply": "r", "reward": 0.5}])
        tr.log_summary({"final/bleu": 1.5})
        first_dir = tr.wandb_run_dir
    run_id = (ckpt / "wandb_run_id.txt").read_text().strip()
    assert run_id and first_dir.startswith(str(ckpt / "wandb" / "offline-run-"))
    assert first_dir.endswith(run_id)
    files, data = wandb_file_bytes(first_dir, [b"loss/reader", b"reward/mean", b"n_context"])
    assert len(files) == 1 and len(data) > 0
    assert b"loss/reader" in data and b"reward/mean" in data and b"n_context" in data
    assert "wandb sync " + first_dir in (ckpt / "run.log").read_text()

    # A resumed run reuses the id saved on first init.
    with Tracker(ckpt, "myrun", {"lr": 1e-4}, use_wandb=True) as tr2:
        tr2.log(2, {"loss/reader": 2.0})
        second_dir = tr2.wandb_run_dir
    assert (ckpt / "wandb_run_id.txt").read_text().strip() == run_id
    # two runs started within one second get a '-1' suffix from wandb: the id is in the name either way
    assert second_dir != first_dir and run_id in os.path.basename(second_dir)
    assert len(glob.glob(str(ckpt / "wandb" / "offline-run-*"))) == 2


def test_wandb_falls_back_to_offline_without_key(tmp_path, clean_env, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    wandb_dir = tmp_path / "wandb_root"
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    ckpt = tmp_path / "ckpt"
    with Tracker(ckpt, "run", {}, use_wandb=True, wandb_project="proj") as tr:
        assert tr.wandb_run.settings.mode == "offline"
        tr.log(3, {"loss": 1.0})
        run_dir = tr.wandb_run_dir
    assert run_dir.startswith(str(wandb_dir / "wandb" / "offline-run-"))
    assert glob.glob(os.path.join(run_dir, "run-*.wandb"))
    log = (ckpt / "run.log").read_text()
    assert "no W&B API key found" in log and f"wandb sync {run_dir}" in log


def test_stat_window_divides_each_key_by_the_steps_that_produced_it():
    """μ = 2: the reward exists on the sampling step only; the window of both steps logs 0.5, not 0.25."""
    from src.infra.tracking import StatWindow
    w = StatWindow()
    w.add({"loss/reader": 1.0, "reward/f1": 0.5})
    w.add({"loss/reader": 3.0})
    assert w.means() == {"loss/reader": 2.0, "reward/f1": 0.5}


def test_stat_window_counts_examples_and_resets(monkeypatch):
    from src.infra import tracking
    clock = iter([10.0, 14.0, 20.0])
    monkeypatch.setattr(tracking.time, "perf_counter", lambda: next(clock))
    w = tracking.StatWindow(examples_per_step=8)  # t0 = 10
    w.add({"loss/reader": 1.0})
    w.add({"loss/reader": 2.0})
    assert w.examples == 16 and w.examples_per_s() == 16 / 4  # at 14
    w.reset()  # t0 = 20
    assert (w.means(), w.examples, w.t0) == ({}, 0, 20.0)
def test_console_line_is_short_and_keeps_speed_and_eta():
    values = {"loss/reader": 2.3456, "loss/retriever": 0.5, "reward/mean": 0.52, "reward/f1": 0.3, "kl/reader": 0.01,
              "lr/reader": 1e-4, "grad_norm/reader": 3.0, "time/sampling": 0.2, "memory/peak_mb": 900.0}
    line = tracking.console_line(20, values, total=1000, sec_per_step=0.41, eta=401)
    assert line == ("step 20/1000 | loss/reader 2.346 | loss/retriever 0.5 | reward 0.52 | lr/reader 1.0e-04 | "
                    "0.41 s/step | ETA 6m41s")
    evals = {"eval/valid/f1": 14.2, "eval/valid/bleu": 5.0, "eval/valid/dist1": 3.0, "eval/valid/rougeL": 20.0}
    assert tracking.console_line(20, evals) == "step 20 | eval/valid/f1 14.2 | eval/valid/bleu 5 | eval/valid/rougeL 20"
    assert tracking.console_line(4, {"time/index_refresh": 1.5}, total=8) == "step 4/8 | time/index_refresh 1.5s"
    assert [tracking.format_duration(x) for x in (5, 125, 7600)] == ["5s", "2m05s", "2h06m"]


def test_progress_bar_summary_and_resumed_history(tmp_path, clean_env, capsys):
    ckpt = tmp_path / "ckpt"
    with Tracker(ckpt, "run", {}) as tr:
        tr.start_progress(0, 10, force_bar=True)
        for step in range(1, 4):
            tr.advance(step)
        tr.log(2, {"loss/reader": 1.0})
        tr.log(3, {"loss/reader": 0.5, "reward/mean": 0.2})
        tr.log(3, {"eval/valid/f1": 10.0, "eval/valid/bleu": 1.0})
        assert tr.eval_at(3) == {"eval/valid/f1": 10.0, "eval/valid/bleu": 1.0} and tr.eval_at(2) == {}
    err = capsys.readouterr()
    assert "3/10" in err.err and "step" in err.err  # the bar: step / total, on stderr
    assert re.search(r"step 3/10 \| loss/reader 0.5 \| reward 0.2 \| \S+ s/step \| ETA \S+", err.out)

    time.sleep(0.01)
    with Tracker(ckpt, "run", {}) as tr:  # a resumed run: the history of metrics.jsonl counts
        elapsed_before = read_jsonl(ckpt / "metrics.jsonl")[-1]["elapsed_s"]
        assert tr.elapsed() >= elapsed_before
        tr.log(5, {"eval/valid/f1": 8.0, "eval/valid/bleu": 2.0})
        tr.log(6, {"loss/reader": 0.25})
        tr.finish(6, 10)
    summary = json.loads((ckpt / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["total_steps"] == 10 and summary["elapsed_s"] >= elapsed_before
    assert summary["final"] == {"loss/reader": 0.25, "reward/mean": 0.2}
    assert summary["last_eval"] == {"step": 5, "eval/valid/f1": 8.0, "eval/valid/bleu": 2.0}
    assert summary["best_eval"] == {"valid": {"step": 3, "f1": 10.0, "metrics": {"f1": 10.0, "bleu": 1.0}}}
    assert "finished: 6 steps in" in (ckpt / "run.log").read_text()
    with Tracker(ckpt, "run", {}) as tr:  # the best by a metric where lower is better (a loss)
        tr.log(7, {"eval/valid/eval_loss": 3.0})
        tr.log(8, {"eval/valid/eval_loss": 2.5})
        tr.log(9, {"eval/valid/eval_loss": 2.7})
        assert tr.best_eval("eval_loss")["valid"]["step"] == 7  # highest, unless told
        tr.finish(9, 10, "eval_loss", lower_is_better=True)
    assert json.loads((ckpt / "summary.json").read_text())["best_eval"]["valid"]["step"] == 8
    assert "best valid eval_loss 2.5 at step 8" in (ckpt / "run.log").read_text()


def test_speed_and_eta_leave_evaluations_out(tmp_path, clean_env, capsys, monkeypatch):
    """s/step and the ETA used to count the in-loop evaluations' time as training time."""
    clock = [0.0]
    monkeypatch.setattr(tracking.time, "time", lambda: clock[0])
    with Tracker(tmp_path / "ck", "run", {}) as tr:
        tr.start_progress(0, 10)
        clock[0] = 1.0
        tr.log(1, {"loss/reader": 1.0})
        with tr.not_training():  # a 10 s evaluation
            clock[0] = 11.0
        clock[0] = 12.0
        tr.log(2, {"loss/reader": 0.5})
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "step 2/10" in ln]
    assert lines and lines[-1].endswith("| 1 s/step | ETA 8s"), lines  # 2 s of training for 2 steps, 8 to go
    assert not os.path.exists(tmp_path / "none" / "metrics.jsonl")
    with Tracker(tmp_path / "none", "run", {}):  # a run that logs no row leaves no (empty) metrics.jsonl
        pass
    assert not os.path.exists(tmp_path / "none" / "metrics.jsonl")
