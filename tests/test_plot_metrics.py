"""src/evaluation/plots.py and scripts/plot_metrics.py: reading metrics.jsonl (repeats, NaN,
truncation), panel choice, PNGs, the command line's one-line errors."""
import json
import os

import pytest
from helpers import run_script

from src.evaluation import plots as pm
from src.infra.errors import UsageError


def _write_run(d, rows, tail=""):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "metrics.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.write(tail)
    return str(d)


def test_parse_keeps_last_value_per_step_and_skips_junk():
    lines = [json.dumps({"step": 1, "loss/reader": 3.0, "note": "text", "flag": True}),
             json.dumps({"step": 2, "loss/reader": 2.0}),
             json.dumps({"step": 2, "eval/valid/f1": 10.0}),  # eval row at the same step: merged
             "",
             json.dumps({"step": 1, "loss/reader": 2.5}),  # resumed run repeats step 1: last wins
             json.dumps({"step": 3, "loss/reader": "NaN", "kl/reader": "Infinity"}),
             json.dumps({"loss/reader": 9.0}),  # no step
             '{"step": 4, "loss/rea']  # killed mid-write
    got = pm.parse_metrics_lines(lines)
    assert set(got) == {"loss/reader", "eval/valid/f1", "kl/reader"}
    steps = [s for s, _ in got["loss/reader"]]
    values = [v for _, v in got["loss/reader"]]
    assert steps == [1, 2, 3] and values[:2] == [2.5, 2.0] and values[2] != values[2]  # NaN
    assert got["kl/reader"] == [(3, float("inf"))]
    assert got["eval/valid/f1"] == [(2, 10.0)]


def test_moving_average_by_hand():
    assert pm.moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert pm.moving_average([1.0, float("nan"), 3.0], 3) == [1.0, 1.0, 2.0]
    assert pm.moving_average([1.0, 2.0], 0) == [1.0, 2.0]


def test_select_panels_defaults_drop_missing_groups_and_find_eval_sets():
    keys = {"loss/reader", "reward/mean", "reward/story_std", "kl/retriever", "lr/reader", "reward/pool_std",
            "eval/valid/f1", "eval/valid/recall@1", "eval/valid/recall@5", "eval/test/dist1"}
    panels = {t: k for t, k, _, _ in pm.select_panels(keys)}
    assert panels["reader loss (CE, or the GRPO surrogate)"] == ["loss/reader"]
    assert panels["reward spread"] == ["reward/story_std"]
    assert panels["story reward over the pool"] == ["reward/pool_std"]
    assert "relevant story in training" not in panels  # no key of that group was logged
    assert panels["KL to the frozen references"] == ["kl/retriever"]
    assert panels["eval valid: recall of the relevant story"] == ["eval/valid/recall@1", "eval/valid/recall@5"]
    assert panels["eval test: Distinct-1/2"] == ["eval/test/dist1"]
    assert "retriever loss" not in panels and "GRPO fractions" not in panels
    assert not any("lr/reader" in k for k in panels.values())  # not a default group
    # explicit keys: names or patterns, one panel each, no duplicates
    chosen = [t for t, _, _, _ in pm.select_panels(keys, ["eval/*/f1", "lr/reader", "eval/valid/f1"])]
    assert chosen == ["eval/valid/f1", "lr/reader"]
    assert pm.select_panels(keys, ["nothing/*"]) == []


def test_default_labels_disambiguate():
    assert pm.default_labels(["a/control", "b/grpo/"]) == ["control", "grpo"]
    assert pm.default_labels(["s0/grpo", "s1/grpo"]) == ["s0/grpo", "s1/grpo"]


def test_plot_runs_overlays_runs_with_different_keys(tmp_path):
    grpo = _write_run(tmp_path / "grpo", [
        {"step": s, "loss/reader": 1.0 / s, "reward/mean": 0.1 * s, "reward/std": 0.2, "kl/reader": 0.01 * s,
         "grpo/clip_frac": 0.0, "grad_norm/reader": 1.0 + s} for s in range(1, 41)]
        + [{"step": 20, "eval/valid/f1": 12.0, "eval/valid/recall@1": 3.0},
           {"step": 40, "eval/valid/f1": 13.0, "eval/valid/recall@1": 4.0}], tail='{"step": 41')
    control = _write_run(tmp_path / "control", [{"step": s, "loss/reader": 2.0 / s} for s in range(1, 41)]
                         + [{"step": 40, "eval/valid/f1": 11.0}])
    out = tmp_path / "fig" / "curves.png"
    panels = pm.plot_runs([grpo, control], str(out), smooth=5)
    assert "reader loss (CE, or the GRPO surrogate)" in panels and "eval valid: F1" in panels and "retriever loss" not in panels
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    with pytest.raises(UsageError, match="labels"):
        pm.plot_runs([grpo, control], str(out), labels=["only one"])


def test_cli_errors_are_one_line(tmp_path):
    rc, _, err = run_script("scripts/plot_metrics.py", tmp_path / "missing", "--out", tmp_path / "x.png")
    err = err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and "metrics.jsonl" in err[0]
    run = _write_run(tmp_path / "r", [{"step": 1, "loss/reader": 1.0}])
    rc, _, err = run_script("scripts/plot_metrics.py", run, "--out", tmp_path / "x.png", "--keys", "kl/*")
    err = err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "kl/*" in err[0]
    rc, _, _ = run_script("scripts/plot_metrics.py", run, "--out", tmp_path / "x.png", "--keys", "loss/*", "--title", "t")
    assert rc == 0
    assert (tmp_path / "x.png").exists()
