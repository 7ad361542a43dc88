"""The stage scripts (the original README's commands over the recipes in configs/) run end to end
at tiny sizes: stage 1, LAPDOG stage 2 and joint GRPO from it, evaluation."""

import os
import subprocess
import sys

import pytest
from helpers import ENV, ROOT, SAMPLE


def script(name, env, *args):
    p = subprocess.run(["bash", os.path.join("scripts", name), *map(str, args)], cwd=ROOT, capture_output=True,
                       text=True, timeout=900, env={**ENV, "PYTHON": sys.executable, "NPROC": "1", **env})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


@pytest.mark.slow
def test_stage_scripts_chain_at_tiny_sizes(tmp_path, tiny_models):
    data = {"TRAIN": f"{SAMPLE}/train.jsonl", "EVAL": f"{SAMPLE}/valid.jsonl", "PASSAGES": f"{SAMPLE}/stories.jsonl",
            "RETRIEVER": tiny_models["retriever"], "STEPS": "2", "BS": "2", "FREQ": "2"}
    small = ["--max_eval_examples=4", "--generation_max_length=8", "--text_maxlength=96"]
    s1 = tmp_path / "s1"
    script("stage1.sh", {**data, "READER": tiny_models["reader"], "CKPT": s1, "LR": "1e-3"}, *small)
    ckpt = s1 / "checkpoint" / "latest"
    script("stage2_lapdog.sh", {**data, "READER_CKPT": ckpt, "CKPT": tmp_path / "lapdog", "NCTX": "2"}, *small,
           "--max_passages=64", "--per_gpu_embedder_batch_size=32")
    script("stage2_grpo.sh", {**data, "READER_CKPT": ckpt, "CKPT": tmp_path / "grpo"}, *small, "--max_passages=64",
           "--grpo_retriever_pool_size=4", "--grpo_group_size=2", "--accumulation_steps=1")
    for run in ("lapdog", "grpo"):
        assert (tmp_path / run / "checkpoint" / "step-2" / "retriever").is_dir()
    p = script("evaluate.sh", {"MODEL": tmp_path / "grpo" / "checkpoint" / "latest", "EVAL": f"{SAMPLE}/valid.jsonl",
                               "PASSAGES": f"{SAMPLE}/stories.jsonl"}, *small[:2], "--max_passages=64")
    assert '"valid"' in p.stdout
