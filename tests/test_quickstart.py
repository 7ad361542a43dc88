"""The README's main command, on a tiny budget."""

import os
import subprocess

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_quickstart_tiny_budget(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "qs"), S1_STEPS="4", S2_STEPS="2", EVAL_N="8", TEXT_MAXLEN="96",
               WANDB_MODE="offline", OMP_NUM_THREADS="1")
    p = subprocess.run(["bash", "scripts/quickstart.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = p.stdout[p.stdout.index("== quickstart summary"):]
    for key in ("reward", "recall@1", "f1"):
        assert key in summary
    assert os.path.isdir(tmp_path / "qs" / "stage2" / "checkpoint" / "step-2" / "retriever")
