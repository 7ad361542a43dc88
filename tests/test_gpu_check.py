"""scripts/gpu_check.sh end to end with --tiny (tiny shapes on the CPU): every part passes and is
reported in the last stdout line's JSON, a failing part is reported with its log and makes the exit
status non-zero, and chat.py talks to the joint GRPO checkpoint it trained (train.py's own output)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import ROOT, SAMPLE, run_script

TRAINING = ("stage1", "lapdog", "joint_grpo")


def gpu_check(*args):
    p = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--tiny", *map(str, args)], cwd=ROOT,
                       capture_output=True, text=True, timeout=900, env={**os.environ, "PY": sys.executable})
    return p.returncode, json.loads(p.stdout.strip().splitlines()[-1])["gpu_check"], p


@pytest.mark.slow
def test_tiny_gpu_check_passes_every_part_and_chat_talks_to_its_checkpoint(tmp_path):
    rc, report, p = gpu_check("--out", tmp_path)
    assert rc == 0, p.stdout[-3000:] + p.stderr[-3000:]
    parts = report["parts"]
    assert report["pass"] and report["device"] == "cpu" and report["tiny"]
    assert list(parts) == ["models", *TRAINING, "evaluate", "faiss"]  # no 2-process round without 2 GPUs
    assert all(part["status"] == "pass" and os.path.isfile(part["log"]) for part in parts.values())
    for name in TRAINING:
        assert parts[name]["s_per_step"] > 0 and parts[name]["peak_memory_mb"] > 0
    assert parts["joint_grpo"]["sampling_tokens_per_s"] > 0
    assert parts["faiss"]["recall@10"] >= 0.8 and parts["faiss"]["lookup_exact"]
    assert parts["faiss"]["placement"] == "cpu" and "CPU" in parts["faiss"]["placement_reason"]
    assert "bf16" in open(parts["stage1"]["log"]).readline()  # stage 1 ran in bf16

    # the joint GRPO checkpoint: query-side trained (passage_retriever/), a reader with a copy head
    ckpt = tmp_path / "joint_grpo" / "checkpoint" / "latest"
    assert (ckpt / "passage_retriever").is_dir()
    rc, out, err = run_script("chat.py", "--model_path", ckpt, "--persona", "i grew up riding horses. i like to read.",
                              "--once", "What does your horse like to eat?", "--show_stories", "2")
    assert rc == 0, err
    assert len([line for line in out.splitlines() if line.startswith("R: ")]) == 1
    assert len([line for line in out.splitlines() if line.startswith("   story ")]) == 2


@pytest.mark.slow
def test_a_failing_part_is_reported_with_its_log_and_fails_the_check(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(SAMPLE, data)
    (data / "train.jsonl").write_text('{"question": "no persona here", "answers": ["x"]}\n')
    rc, report, _ = gpu_check("--out", tmp_path / "out", "--data", data)
    assert rc == 1 and not report["pass"]
    parts = report["parts"]
    assert parts["stage1"]["status"] == "fail" and parts["stage1"]["reason"] == "exit status 2"
    assert "error: " in open(parts["stage1"]["log"]).read()  # the run's own one-line error, in the log
    assert all(parts[n]["status"] == "skipped" and "stage1" in parts[n]["reason"] for n in ("lapdog", "joint_grpo"))
    assert parts["evaluate"]["status"] == "skipped"
    assert parts["faiss"]["status"] == "pass"  # the parts that do not need stage 1 still run
