"""Stage 2 end to end: the LAPDOG command and the original LAPDOG-GRPO README's joint GRPO command under the 2-process
launcher, evaluate.py on a retrieval-augmented checkpoint, and a real-data smoke run."""

import glob
import json
import os

import pytest
from helpers import SAMPLE, SHARED_DATA, run, stage1


@pytest.fixture(scope="module")
def stage1_ckpt(tmp_path_factory, tiny_models):
    ck = tmp_path_factory.mktemp("stage1")
    run(stage1(ck, tiny_models, steps=2))
    return ck / "checkpoint" / "step-2"


def lapdog_stage2(ck, models, s1, data=SAMPLE, passages=None, extra=()):
    """The original LAPDOG stage-2 recipe with sizes shrunk (lapdog-behaviour.md)."""
    passages = passages or f"{data}/stories.jsonl"
    return ["train.py", "--shuffle", "--refresh_index=2", "--per_gpu_batch_size=2", "--total_steps=2",
            "--eval_freq=2", "--save_freq=2", "--per_gpu_embedder_batch_size=32", "--save_index_path", f"{ck}/index",
            "--gold_score_mode=f1rougebleudist", "--train_retriever", "--precision=fp32", "--shard_optim",
            "--shard_grads", "--target_maxlength=16", "--generation_max_length=8", f"--reader_model_type={models['reader']}",
            "--dropout=0.1", "--weight_decay=0.01", "--lr=5e-4", "--lr_retriever=5e-4", "--scheduler=linear",
            "--text_maxlength=96", "--retriever_from=persona", "--use_gradient_checkpoint_reader",
            "--use_gradient_checkpoint_retriever", "--n_context=2", "--retriever_n_context=3", "--log_freq=1",
            "--warmup_steps=1", "--write_results", "--task=qa", "--index_mode=flat", f"--passages={passages}",
            "--save_index_n_shards=4", "--temperature_score=0.8", "--temperature_gold=0.85", f"--model_path={s1}",
            "--load_reader_weights_only", f"--retriever_model_path={models['retriever']}", "--name=lapdog",
            f"--checkpoint_dir={ck}", f"--train_data={data}/train.jsonl" if data == SAMPLE else f"--train_data={data}",
            f"--eval_data={data}/valid.jsonl" if data == SAMPLE else f"--eval_data={data}", "--max_eval_examples=6",
            "--per_gpu_eval_batch_size=3", "--add_random_retrieval=0.3",
            "--metric_scale_factors={'bleu':0.01,'f1':0.01,'rouge':0.01}", "--scale_rouge", *extra]


@pytest.mark.slow
def test_lapdog_stage2_two_processes_then_evaluate(tmp_path, tiny_models, stage1_ckpt):
    ck = tmp_path / "lapdog"
    run(lapdog_stage2(ck, tiny_models, stage1_ckpt), nproc=2)
    step = ck / "checkpoint" / "step-2"
    assert {"reader", "retriever", "options.json", "state.pt"} <= set(os.listdir(step))
    shards = glob.glob(str(ck / "index" / "*.safetensors"))
    assert len(shards) >= 4
    log = [json.loads(line) for line in open(ck / "metrics.jsonl")]
    keys = set().union(*log)
    for k in ["loss/retriever", "grad_norm/retriever", "gold_score/mean", "time/retrieval", "time/index_refresh",
              "eval/valid/recall@1"]:
        assert k in keys, k
    rows = [json.loads(line) for line in open(ck / "results" / "step-2.valid.results.jsonl")]
    assert len(rows) == 6 and all(len(r["passages"]) == 3 for r in rows)

    # evaluate.py with only --model_path, --eval_data, --passages, --write_results
    p = run(["evaluate.py", f"--model_path={step}", f"--eval_data={SAMPLE}/valid.jsonl",
             f"--passages={SAMPLE}/stories.jsonl", "--write_results"])
    out = str(step.parent / f"evaluate-{step.name}.valid.results.jsonl")  # evaluate.py's own name
    rows = [json.loads(line) for line in open(out)]
    assert len(rows) == sum(1 for _ in open(f"{SAMPLE}/valid.jsonl"))
    assert {"id", "title", "score"} <= set(rows[0]["passages"][0])
    assert "recall@1" in p.stdout
    p = run(["evaluate.py", f"--model_path={step}", f"--eval_data={SAMPLE}/valid.jsonl", "--max_eval_examples=4",
             f"--passages={SAMPLE}/stories.jsonl", "--write_results", "--dont_write_passages",
             f"--checkpoint_dir={tmp_path / 'ev'}", f"--load_index_path={ck / 'index'}"], nproc=2)
    rows = [json.loads(line) for line in open(tmp_path / "ev" / "results" / "evaluate-step-2.valid.results.jsonl")]
    assert len(rows) == 4 and "passages" not in rows[0]


@pytest.mark.slow
def test_original_joint_grpo_command_two_processes(tmp_path, tiny_models, stage1_ckpt):
    """The original LAPDOG README's stage-2 command; only model ids, data paths, steps and batch sizes changed."""
    ck = tmp_path / "joint_grpo"
    env_dir = tmp_path / "wandb"
    run(["train.py", "--shuffle", "--per_gpu_batch_size=1", "--accumulation_steps=2", "--total_steps=2",
         "--eval_freq=2", "--save_freq=2", "--name=joint_grpo", f"--checkpoint_dir={ck}",
         "--gold_score_mode=f1rougebleudist", "--reader_rl_learning", "--use_grpo", "--grpo_group_size=4",
         "--grpo_train_retriever", "--grpo_retriever_group_size=4", "--grpo_kl_coeff=0.01",
         "--grpo_clip_epsilon=0.2", f"--reader_model_type={tiny_models['reader']}", "--lr=1e-5",
         "--warmup_steps=500", f"--train_data={SAMPLE}/train.jsonl", f"--eval_data={SAMPLE}/valid.jsonl",
         f"--passages={SAMPLE}/stories.jsonl", f"--model_path={stage1_ckpt}",
         "--generation_length_penalty=1.0", "--use_wandb", "--wandb_project=lapdog-grpo",
         f"--retriever_model_path={tiny_models['retriever']}",
         "--max_eval_examples=4", "--generation_max_length=8", "--text_maxlength=96"], nproc=2,
        env={"WANDB_DIR": str(env_dir)})
    assert os.path.isdir(ck / "checkpoint" / "step-2" / "retriever")
    assert glob.glob(str(env_dir / "wandb" / "offline-run-*" / "run-*.wandb"))


@pytest.mark.slow
def test_real_data_smoke(tmp_path, tiny_models, stage1_ckpt):
    convai = os.path.join(SHARED_DATA, "convai2", "valid.jsonl")
    stories = os.path.join(SHARED_DATA, "corpora", "story", "story.jsonl")
    if not (os.path.exists(convai) and os.path.exists(stories)):
        pytest.skip("../shared/data (real ConvAI2 + ROCStories) is absent")
    ck = tmp_path / "real"
    args = lapdog_stage2(ck, tiny_models, stage1_ckpt, data=convai, passages=stories,
                         extra=["--max_passages=2000", "--per_gpu_embedder_batch_size=128"])
    args = [a for a in args if a not in ("--shard_optim", "--shard_grads")]
    run(args)
    rows = [json.loads(line) for line in open(ck / "results" / "step-2.valid.results.jsonl")]
    assert len(rows) == 6 and all(int(p["id"]) >= 0 for p in rows[0]["passages"])
