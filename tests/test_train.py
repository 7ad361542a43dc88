"""train.py / evaluate.py end to end: bad input, checkpoints, resume equivalence, several processes."""

import json
import os
import shutil

import pytest
import torch
from helpers import SAMPLE, assert_same_weights, crash_after, grpo_stage2, run, stage1, weights


@pytest.mark.parametrize("content, expected", [
    (b'{"question": "persona: a. context: Q: hi", "answers": ["x"]}\n{bad json\n', ":2: "),
    (b'{"question": "persona: a. context: Q: hi", "answers": []}\n', ":1: "),
    (b"", ": "),
    (b'{"question": "persona: a. context: Q: hi", "answers": ["caf\xe9"]}\n', ":1: "),
])
def test_bad_training_data_stops_before_training(tmp_path, tiny_models, content, expected):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    p = run(["train.py", "--closed_book", f"--train_data={bad}", f"--reader_model_type={tiny_models['reader']}",
             f"--checkpoint_dir={tmp_path / 'ck'}"], check=False)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}{expected}") and " — " in lines[0], p.stderr
    assert "Traceback" not in p.stderr
    assert not os.path.exists(tmp_path / "ck" / "checkpoint")


def test_bad_flag_is_one_line(tmp_path):
    p = run(["train.py", "--closed_book", "--train_data=x.jsonl", "--precision=fp16"], check=False)
    assert p.returncode == 2 and p.stderr.strip().startswith("error: --precision: fp16 needs a GPU"), p.stderr


@pytest.mark.slow
def test_stage1_checkpoints_resume_and_evaluate(tmp_path, tiny_models):
    """Checkpoint layout and round trip; N steps in one go == N/2 then the same command continued."""
    a, b = tmp_path / "a", tmp_path / "b"
    run(stage1(a, tiny_models))
    step4 = a / "checkpoint" / "step-4"
    assert os.path.realpath(a / "checkpoint" / "latest") == str(step4)
    assert {"reader", "options.json", "state.pt", "rng-rank0.pt"} <= set(os.listdir(step4))
    state = torch.load(step4 / "state.pt", weights_only=True)
    assert state["step"] == 4 and "reader" in state["optimizers"]
    torch.load(step4 / "rng-rank0.pt", weights_only=True)
    opts = json.load(open(step4 / "options.json"))
    assert opts["total_steps"] == 4 and opts["closed_book"] is True
    assert opts["run_info"]["command"].startswith("train.py --closed_book") and opts["run_info"]["git"]["commit"]
    from src.cli import options as options_module
    again = options_module.parse(["--config", str(step4 / "options.json")])[0]  # a checkpoint's options are a recipe
    assert (again.total_steps, again.checkpoint_dir, again.reader_model_type) == (4, str(a), tiny_models["reader"])
    from src.model.reader import FiDReader
    reader = FiDReader.from_pretrained(str(step4 / "reader"))
    saved = weights(step4)
    for k, v in reader.model.state_dict().items():
        if k in saved:
            assert torch.equal(v, saved[k])
    log = [json.loads(line) for line in open(a / "metrics.jsonl")]
    assert [r["step"] for r in log if "loss/reader" in r] == [1, 2, 3, 4]
    assert {"lr/reader", "grad_norm/reader", "examples_per_s", "memory/peak_mb", "wall_time", "elapsed_s"} <= set(log[0])
    summary = json.load(open(a / "summary.json"))
    assert summary["steps"] == 4 and summary["final"]["loss/reader"] == log[-1]["loss/reader"]
    card = (step4 / "reader" / "README.md").read_text()  # a model card in every saved reader/
    assert "(step 4)" in card and "closed book, stage 1" in card

    run(stage1(b, tiny_models))
    crash_after(b, 2)
    p = run(stage1(b, tiny_models))
    assert "continuing at step 2" in p.stdout
    assert_same_weights(weights(step4), weights(b / "checkpoint" / "step-4"))
    sa, sb = torch.load(step4 / "state.pt", weights_only=True), torch.load(b / "checkpoint/step-4/state.pt", weights_only=True)
    assert sa["sampler"] == sb["sampler"]

    # a larger --total_steps continues from latest
    run(stage1(b, tiny_models, steps=6))
    assert os.path.realpath(b / "checkpoint" / "latest").endswith("step-6")

    # evaluate.py: checkpoint options as defaults, results next to the checkpoint, input order
    p = run(["evaluate.py", f"--model_path={step4}", f"--eval_data={SAMPLE}/valid.jsonl", "--max_eval_examples=5",
             "--write_results", "--per_gpu_eval_batch_size=2"])
    out = str(step4.parent / "evaluate-step-4.valid.results.jsonl")  # evaluate.py's own name, next to the checkpoint
    assert f"results written to {out}" in p.stdout
    rows = [json.loads(line) for line in open(out)]
    valid = [json.loads(line) for line in open(f"{SAMPLE}/valid.jsonl")][:5]
    assert [r["query"] for r in rows] == [v["question"] for v in valid]
    assert all(set(r) >= {"query", "answers", "generation"} for r in rows)
    metrics = json.loads(p.stdout.strip().splitlines()[-1])["valid"]
    assert {"bleu", "f1", "rouge1", "rouge2", "rougeL", "dist1", "dist2", "length_ratio"} <= set(metrics)


@pytest.mark.slow
def test_two_process_stage1_trains_saves_evaluates(tmp_path, tiny_models):
    ck = tmp_path / "ddp"
    p = run(stage1(ck, tiny_models, steps=2, extra=["--eval_freq=2", "--write_results", "--max_eval_examples=7",
                                                     "--per_gpu_eval_batch_size=2"]), nproc=2)
    assert "2 process(es)" in p.stdout
    rows = [json.loads(line) for line in open(ck / "results" / "step-2.valid.results.jsonl")]
    assert json.load(open(ck / "results" / "step-2.valid.metrics.json"))["step"] == 2
    valid = [json.loads(line) for line in open(f"{SAMPLE}/valid.jsonl")][:7]
    assert [r["query"] for r in rows] == [v["question"] for v in valid]
    assert os.path.isdir(ck / "checkpoint" / "step-2" / "reader")
    # sharded optimizer state and gradients (fairscale OSS + ShardedDDP), saved and resumed
    ck2 = tmp_path / "oss"
    run(stage1(ck2, tiny_models, steps=2, extra=["--shard_optim", "--shard_grads"]), nproc=2)
    state = torch.load(ck2 / "checkpoint" / "step-2" / "state.pt", weights_only=True)
    assert state["optimizers"]["reader"]["state"]
    run(stage1(ck2, tiny_models, steps=3, extra=["--shard_optim", "--shard_grads"]), nproc=2)
    assert os.path.realpath(ck2 / "checkpoint" / "latest").endswith("step-3")


@pytest.mark.slow
def test_joint_grpo_resume_equals_uninterrupted(tmp_path, tiny_models):
    s1 = tmp_path / "s1"
    run(stage1(s1, tiny_models, steps=2))
    s1_step = s1 / "checkpoint" / "step-2"
    a, b = tmp_path / "a", tmp_path / "b"
    run(grpo_stage2(a, tiny_models, s1_step))
    run(grpo_stage2(b, tiny_models, s1_step))
    ref_before = weights(b / "reference", "reader")
    crash_after(b, 2)
    run(grpo_stage2(b, tiny_models, s1_step))
    for part in ("reader", "retriever"):
        assert_same_weights(weights(a / "checkpoint/step-4", part), weights(b / "checkpoint/step-4", part))
    # references: the stage-1 reader, saved once outside step-N, reused on resume
    assert_same_weights(ref_before, weights(b / "reference", "reader"))
    assert_same_weights(weights(s1_step, "reader"), ref_before)
    assert not os.path.exists(b / "checkpoint/step-4/reference")
    state = torch.load(b / "checkpoint/step-4/state.pt", weights_only=True)
    assert set(state["optimizers"]) == {"reader", "retriever"}
    log = [json.loads(line) for line in open(a / "metrics.jsonl")]
    keys = set().union(*log)
    for k in ["loss/reader", "loss/retriever", "kl/reader", "kl/retriever", "reward/mean", "reward/std",
              "reward/f1", "reward/rouge", "reward/bleu", "reward/length_ratio", "reward/distinct3", "grpo/frac_zero_std",
              "grpo/clip_frac", "reply_length", "lr/reader", "lr/retriever", "grad_norm/reader",
              "grad_norm/retriever", "memory/peak_mb", "time/sampling", "time/reward", "time/policy",
              "time/reference", "time/retriever", "time/index_refresh"]:
        assert k in keys, k


def test_rng_state_round_trip_includes_the_data_rng(tmp_path):
    """Answer picks and persona_rand queries continue exactly after a resume."""
    import random

    from src.run import checkpoint
    data_rng = random.Random(7)
    data_rng.random()
    checkpoint.write_rank_rng(str(tmp_path), 0, data_rng)
    expected = [data_rng.random() for _ in range(3)] + [random.random(), torch.rand(1).item()]
    restored = random.Random(0)
    checkpoint.set_rng_state(checkpoint.load_rank_rng(str(tmp_path), 0), restored)
    assert [restored.random() for _ in range(3)] + [random.random(), torch.rand(1).item()] == expected


def test_make_optimizer_is_fused_adamw_on_cpu_and_steps_like_foreach():
    """The single-process optimizer is torch's fused AdamW (CPU and CUDA) and updates exactly as
    the multi-tensor one does, with the scheduler's warm-up multiplier applied."""
    from src.cli import options
    from src.run.optim import lr_multiplier, make_optimizer

    opts, _ = options.parse(["--warmup_steps", "2", "--total_steps", "10", "--weight_decay", "0.1"])
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    start = params[0].detach().clone()
    opt, sched = make_optimizer(params, 0.01, opts)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True
    ref = torch.optim.AdamW(twins, lr=0.01, weight_decay=0.1, eps=1e-6, foreach=True)  # the original's ε
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref, lambda s: lr_multiplier(s, 2, 10, opts.scheduler))
    for step in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, twins, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step(), sched.step(), ref.step(), ref_sched.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)
    assert (params[0] - start).abs().max() > 1e-3  # it moved


@pytest.mark.slow
def test_joint_grpo_resume_mid_rollout_equals_uninterrupted(tmp_path, tiny_models):
    """μ = 2 (dapo, accumulation 2): a checkpoint saved after the first of a batch's two updates
    holds that batch's rollouts; the resumed run makes the reuse update, not a fresh batch."""
    s1 = tmp_path / "s1"
    run(stage1(s1, tiny_models, steps=2))
    s1_step = s1 / "checkpoint" / "step-2"
    mu2 = ["--grpo_num_iterations=2", "--grpo_loss_type=dapo", "--save_freq=1", "--grpo_clip_epsilon=0.05",
           "--lr=3e-3", "--lr_retriever=3e-3"]
    a, b = tmp_path / "a", tmp_path / "b"
    run(grpo_stage2(a, tiny_models, s1_step, extra=mu2))
    run(grpo_stage2(b, tiny_models, s1_step, extra=mu2 + ["--log_freq=2"]))
    assert os.path.isfile(b / "checkpoint/step-1/rollout-rank0.pt")
    assert not os.path.exists(b / "checkpoint/step-2/rollout-rank0.pt")  # a batch boundary
    # read before the resume: a resumed run drops the rows past the step it resumes from
    log_b = [json.loads(line) for line in open(b / "metrics.jsonl")]
    crash_after(b, 1)
    p = run(grpo_stage2(b, tiny_models, s1_step, extra=mu2 + ["--log_freq=2"]))
    assert "continuing at step 1" in p.stdout
    for part in ("reader", "retriever"):
        assert_same_weights(weights(a / "checkpoint/step-4", part), weights(b / "checkpoint/step-4", part))
    log_a = [json.loads(line) for line in open(a / "metrics.jsonl")]
    by_step = {r["step"]: r for r in log_a if "loss/reader" in r}
    assert by_step[2]["grpo/ratio_mean"] != pytest.approx(1.0, abs=1e-6)  # step 2 reuses step 1's samples
    assert "reward/f1" in by_step[1] and "reward/f1" not in by_step[2]
    # a window of steps 1-2 logs the sampling step's reward, not half of it
    first_b2 = next(r for r in log_b if r["step"] == 2 and "loss/reader" in r)
    for key in ("reward/f1", "reward/rouge", "reward/mean"):
        assert first_b2[key] == pytest.approx(by_step[1][key], rel=1e-6), key


def test_pointer_generator_flag_gives_a_new_reader_a_copy_head_and_checkpoints_keep_theirs(tmp_path, tiny_models):
    """--pointer_generator adds the copy head to the --reader_model_type reader of a new run; a
    reader started from --model_path keeps what its saved config says, whatever the flag."""
    import train
    from src.cli import options

    base = ["--closed_book", "--reader_model_type", tiny_models["reader"]]
    opts, _ = options.parse(base + ["--pointer_generator"])
    reader, _, _ = train.load_models(options.validate(opts), None)
    assert reader.copies
    opts, _ = options.parse(base)
    assert not train.load_models(options.validate(opts), None)[0].copies
    reader.save_pretrained(str(tmp_path / "step-1" / "reader"))
    shutil.copytree(tiny_models["reader"], tmp_path / "plain" / "reader")
    for folder, copies in (("step-1", True), ("plain", False)):
        opts, _ = options.parse(base + ["--pointer_generator", "--model_path", str(tmp_path / folder)])
        assert train.load_models(options.validate(opts), None)[0].copies is copies
