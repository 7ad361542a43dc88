"""The README's main command, on a tiny budget."""

import json
import os
import subprocess

import pytest
from helpers import ROOT


@pytest.mark.slow
def test_quickstart_tiny_budget(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "qs"), S1_STEPS="4", S2_STEPS="2", S2_BS="8", EVAL_N="8", TEXT_MAXLEN="96",
               WANDB_MODE="offline", OMP_NUM_THREADS="1")
    p = subprocess.run(["bash", "scripts/quickstart.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "== quickstart summary" in p.stdout
    last = json.loads(p.stdout.strip().splitlines()[-1])  # the documented last line
    assert set(last) == {"before", "control", "lapdog", "joint_grpo"}
    for arm in last.values():
        assert set(arm) == {"recall@1", "recall@5", "f1", "bleu", "rougeL", "reward", "dist1"}
        assert all(isinstance(v, float) and v == v for v in arm.values())
    assert last["before"]["recall@1"] == last["control"]["recall@1"]  # the control does not touch the retriever
    assert os.path.isfile(tmp_path / "qs" / "curves.png")
    for arm in ("control", "lapdog", "joint_grpo"):
        assert os.path.isdir(tmp_path / "qs" / arm / "checkpoint" / "step-2" / "reader")
    assert os.path.isdir(tmp_path / "qs" / "joint_grpo" / "checkpoint" / "step-2" / "retriever")
