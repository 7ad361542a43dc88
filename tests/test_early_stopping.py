"""Early stopping (src/run/early_stopping.py): the rule by hand, and a run that stops, keeps its best
checkpoint, and stays stopped when its command is run again."""

import json
import math
import os

from helpers import run, stage1

from src.run.early_stopping import EarlyStopping


def test_patience_counts_evaluations_without_improvement():
    loss = EarlyStopping("eval_loss", 2, "dev")
    assert loss.update(1, {"eval/dev/eval_loss": 3.0}) == (True, False)
    assert loss.update(2, {"eval/dev/eval_loss": 2.5}) == (True, False)
    assert loss.update(3, {"eval/dev/eval_loss": 2.6}) == (False, False)
    assert loss.update(4, {"eval/dev/eval_loss": 2.4}) == (True, False)  # an improvement resets the count
    assert loss.update(5, {"eval/dev/eval_loss": math.nan}) == (False, False)
    assert loss.update(6, {"eval/dev/eval_loss": 2.4}) == (False, True)  # equal is no improvement
    assert (loss.best_step, loss.best) == (4, 2.4)
    f1 = EarlyStopping("f1", 1, "dev")  # higher is better
    assert f1.update(1, {"eval/dev/f1": 10.0}) == (True, False) and f1.update(2, {"eval/dev/f1": 9.0}) == (False, True)
    off = EarlyStopping("f1", 0, "dev").replay([(1, {"eval/dev/f1": 1.0}), (2, {"eval/dev/f1": 0.0})])
    assert off.best_step == 1 and not off.should_stop()
    other = EarlyStopping("f1", 1, "dev")
    assert other.update(1, {"eval/test/f1": 10.0}) == (False, False)  # another eval set is not watched


def test_run_stops_keeps_best_and_stays_stopped(tmp_path, tiny_models):
    # lr 0: every evaluation scores the same, so the second one is no improvement and patience 1 stops
    ck = tmp_path / "run"
    cmd = stage1(ck, tiny_models, steps=10, extra=["--lr=0", "--eval_freq=1", "--save_freq=100",
                                                   "--early_stopping_patience=1", "--early_stopping_metric=f1"])
    p = run(cmd)
    assert "stopping early at step 2" in p.stdout + p.stderr
    root = ck / "checkpoint"
    assert os.readlink(root / "best") == "step-1" and os.readlink(root / "latest") == "step-2"
    assert json.load(open(ck / "summary.json"))["steps"] == 2
    p = run(cmd)
    assert "stopped early before" in p.stdout + p.stderr and not (root / "step-3").exists()


def test_keep_best_points_best_at_the_lowest_dev_loss_and_runs_on(tmp_path, tiny_models):
    ck = tmp_path / "run"
    p = run(stage1(ck, tiny_models, steps=6, extra=["--eval_freq=2", "--save_freq=100", "--keep_best"]))
    assert "stopping early" not in p.stdout + p.stderr
    evals = [r for r in map(json.loads, open(ck / "metrics.jsonl")) if any(k.endswith("/eval_loss") for k in r)]
    losses = {r["step"]: next(v for k, v in r.items() if k.endswith("/eval_loss")) for r in evals}
    assert sorted(losses) == [2, 4, 6]
    best = min(losses, key=lambda s: (losses[s], s))
    root = ck / "checkpoint"
    assert os.readlink(root / "best") == f"step-{best}" and os.readlink(root / "latest") == "step-6"
    assert (root / f"step-{best}").is_dir()  # saved when it improved, though --save_freq is 100
    # summary.json names the same evaluation (it used to report the best F1's whatever the run kept)
    summary = json.load(open(ck / "summary.json"))
    assert [(b["step"], b["eval_loss"]) for b in summary["best_eval"].values()] == [(best, losses[best])]
