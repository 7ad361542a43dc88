"""--query_side_retriever_training: the passage side is a frozen copy, only the query side trains.

Both retriever objectives (LAPDOG's KL to the gold scores, joint GRPO's surrogate) score the pool
through LapdogModel._retriever_pool_logits, so both are checked here, plus a train.py run that
saves the frozen side, never refreshes the index, resumes exactly and evaluates.
"""

import json
import os
import random

import pytest
import torch

from conftest import SAMPLE
from src.data import retriever_passage_text
from src.errors import UsageError
from src.lapdog import LapdogModel, make_batch
from src.retriever import retrieval_scores
from test_grpo_model import fixed_rewards
from test_objectives import BruteForceRetrieval, examples_with_story, frozen_copy, load_models, make_opts, sample_data
from test_train import assert_same_weights, crash_after, run, stage1, weights

JOINT = ["--reader_rl_learning", "--use_grpo", "--grpo_train_retriever", "--grpo_group_size", "2",
         "--grpo_retriever_group_size", "2", "--grpo_retriever_pool_size", "4", "--n_context", "1",
         "--retriever_n_context", "1", "--grpo_kl_coeff", "0.1"]
LAPDOG = ["--train_retriever", "--gold_score_mode", "ppmean", "--retriever_n_context", "3", "--n_context", "2"]


def embed(retriever, texts, opts):
    return retriever.embed_texts(texts, batch_size=64, max_length=opts.retriever_maxlength)


@pytest.mark.parametrize("kind, flags", [("lapdog", LAPDOG), ("grpo_joint", JOINT)])
def test_only_the_query_side_moves(tiny_models, monkeypatch, kind, flags):
    torch.manual_seed(0)
    reader, retriever = load_models(tiny_models, dropout=0.1)
    opts = make_opts(*flags, "--query_side_retriever_training")
    passages = frozen_copy(retriever)
    model = LapdogModel(reader, retriever, opts, ref_reader=frozen_copy(reader), ref_retriever=frozen_copy(retriever),
                        passage_encoder=passages)
    model.train()
    monkeypatch.setattr(LapdogModel, "_rewards", fixed_rewards([1.0, 0.0, 3.0, 2.0, 0.0, 0.5, 1.0, 1.5]))
    # the pool estimator scores every pool story by its greedy reply: distinct rewards, so it has a signal
    monkeypatch.setattr(LapdogModel, "_pool_rewards",
                        lambda self, b: torch.arange(float(len(b.passages) * len(b.passages[0]))).view(len(b.passages), -1))
    _, _, stories = sample_data()
    examples = examples_with_story("train", 2)
    batch = make_batch(examples, [ex["answers"][0] for ex in examples], reader, BruteForceRetrieval(stories[:10], opts),
                       retriever, opts, random.Random(0), model.device)
    frozen_before = {k: v.clone() for k, v in passages.state_dict().items()}
    query_before = {k: v.clone() for k, v in retriever.state_dict().items()}
    opt = torch.optim.SGD(list(reader.parameters()) + list(retriever.parameters()), lr=0.5)
    opt.zero_grad()
    torch.manual_seed(0)
    loss, stats, _ = model(kind, batch)
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in passages.parameters())
    assert all(torch.equal(v, frozen_before[k]) for k, v in passages.state_dict().items())
    assert any(not torch.equal(v, query_before[k]) for k, v in retriever.state_dict().items())

    # After the update the pool is scored with the trained query side against the frozen stories,
    # the embeddings the index was built with, not against the trained encoder's own.
    flat = [retriever_passage_text(p, opts.retriever_format) for plist in batch.passages for p in plist]
    q = embed(retriever, batch.retrieval_queries, opts)
    expected = retrieval_scores(q, embed(passages, flat, opts).view(len(q), -1, q.shape[-1]))
    tied = retrieval_scores(q, embed(retriever, flat, opts).view(len(q), -1, q.shape[-1]))
    model.eval()  # the query side's dropout off, as embed_texts has it
    with torch.no_grad():
        got = model._retriever_pool_logits(batch.retrieval_queries, batch.passages, 1.0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, tied, atol=1e-4)


def test_query_side_needs_a_trained_retriever():
    with pytest.raises(UsageError, match="--query_side_retriever_training: has no retriever to train"):
        make_opts("--query_side_retriever_training")


@pytest.mark.slow
def test_query_side_run_saves_frozen_side_resumes_and_evaluates(tmp_path, tiny_models):
    s1 = tmp_path / "s1"
    run(stage1(s1, tiny_models, steps=2))
    args = ["train.py", "--per_gpu_batch_size=2", "--total_steps=4", "--eval_freq=0", "--save_freq=2", "--log_freq=1",
            "--train_retriever", "--query_side_retriever_training", "--gold_score_mode=ppmean", "--refresh_index=1",
            "--lr=1e-3", "--lr_retriever=1e-2", "--warmup_steps=1", "--text_maxlength=96", "--target_maxlength=16",
            "--generation_max_length=8", "--retriever_n_context=2", "--n_context=2", f"--train_data={SAMPLE}/train.jsonl",
            f"--passages={SAMPLE}/stories.jsonl", "--max_passages=32", f"--model_path={s1 / 'checkpoint/step-2'}",
            "--load_reader_weights_only", f"--retriever_model_path={tiny_models['retriever']}", "--name=q"]
    a, b = tmp_path / "a", tmp_path / "b"
    run(args + [f"--checkpoint_dir={a}"])
    step4 = a / "checkpoint" / "step-4"
    initial = weights(os.path.dirname(tiny_models["retriever"]), "retriever")
    frozen = weights(step4, "passage_retriever")
    assert all(torch.equal(frozen[k], initial[k]) for k in initial)  # (the saved encoder adds an unused pooler)
    trained = weights(step4, "retriever")
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)
    log = [json.loads(line) for line in open(a / "metrics.jsonl")]
    assert not any("time/index_refresh" in r for r in log)  # --refresh_index=1 has nothing to refresh

    run(args + [f"--checkpoint_dir={b}"])
    crash_after(b, 2)
    run(args + [f"--checkpoint_dir={b}"])
    for part in ("reader", "retriever", "passage_retriever"):
        assert_same_weights(weights(step4, part), weights(b / "checkpoint/step-4", part))

    p = run(["evaluate.py", f"--model_path={step4}", f"--eval_data={SAMPLE}/valid.jsonl", "--max_eval_examples=3",
             f"--passages={SAMPLE}/stories.jsonl", "--max_passages=32"])
    assert "valid:" in p.stdout
