"""--query_side_retriever_training: the passage side is a frozen copy, only the query side trains.

Both retriever objectives (LAPDOG's KL to the gold scores, joint GRPO's surrogate) score the pool
through LapdogModel._retriever_pool_logits, so both are checked here, plus a train.py run that
saves the frozen side, never refreshes the index, resumes exactly and evaluates. The pool's story
embeddings are the index's stored rows (make_batch's b.passage_embeddings): they must give the
scores that re-embedding every story with the frozen encoder gave (the path before the index held them), in
one process and two, keep no per-story state in the model, and not depend on the batches before.
"""

import json
import os
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import (
    SAMPLE,
    BruteForceRetrieval,
    assert_same_weights,
    crash_after,
    examples_with_story,
    fixed_rewards,
    frozen_copy,
    load_models,
    make_opts,
    run,
    sample_data,
    stage1,
    weights,
)

from src.data.prompts import retriever_passage_text
from src.infra.distributed import DistInfo
from src.infra.errors import UsageError
from src.model.lapdog import LapdogModel
from src.model.reader import dropout_disabled
from src.model.retriever import retrieval_scores
from src.retrieval.stories import StoryRetrieval
from src.run.batch import make_batch

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
    batch = make_batch(examples, [ex["answers"][0] for ex in examples], reader,
                       BruteForceRetrieval(stories[:10], opts, passage_encoder=passages), retriever, opts,
                       random.Random(0), model.device)
    frozen_before = {k: v.clone() for k, v in passages.state_dict().items()}
    query_before = {k: v.clone() for k, v in retriever.state_dict().items()}
    opt = torch.optim.SGD(list(reader.parameters()) + list(retriever.parameters()), lr=0.5)
    opt.zero_grad()
    torch.manual_seed(0)
    loss, stats, _, _ = model(kind, batch)
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
        got = model._retriever_pool_logits(batch.retrieval_queries, batch.passages, 1.0,
                                           passage_embeddings=batch.passage_embeddings)
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


@pytest.mark.slow
def test_quickstart_joint_grpo_recipe_resumes_bit_exactly(tmp_path, tiny_models, minilm_path):
    """configs/joint_grpo_evidence.yaml (query-side, evidence signal, posterior estimator), the
    quickstart's joint GRPO: a run killed after step 3 and resumed equals an uninterrupted one, bit
    for bit (the frozen passage side's embeddings must not depend on which batches came first). Two
    threads, as a user's run has them: with one (the other tests' OMP_NUM_THREADS=1) the kernels
    give the same bits whatever the batch; with two, stories embedded in other batches after a
    restart (the per-story cache the model used to keep) gave the retriever weights differences of order
    1e-6 (the reader stayed exact). Slow: three runs with MiniLM, the quickstart's retriever."""
    threads = {"OMP_NUM_THREADS": "2"}
    s1 = tmp_path / "s1"
    run(stage1(s1, tiny_models, steps=2))
    args = ["train.py", "--config", "configs/joint_grpo_evidence.yaml", "--per_gpu_batch_size=4", "--total_steps=6",
            "--eval_freq=0", "--save_freq=3", "--log_freq=1", "--text_maxlength=96", "--target_maxlength=16",
            "--generation_max_length=8", "--n_context=1", "--retriever_n_context=5",
            f"--train_data={SAMPLE}/train.jsonl", f"--passages={SAMPLE}/stories.jsonl",
            f"--model_path={s1 / 'checkpoint/step-2'}", f"--retriever_model_path={minilm_path}", "--name=qs"]
    a, b = tmp_path / "a", tmp_path / "b"
    run(args + [f"--checkpoint_dir={a}"], env=threads)
    run(args + [f"--checkpoint_dir={b}"], env=threads)
    crash_after(b, 3)
    p = run(args + [f"--checkpoint_dir={b}"], env=threads)
    assert "continuing at step 3" in p.stdout
    for part in ("reader", "retriever", "passage_retriever"):
        assert_same_weights(weights(a / "checkpoint/step-6", part), weights(b / "checkpoint/step-6", part))


# ------------------------------------------------------------------ pool scores from the index's stored rows

CPU = DistInfo(0, 1, 0, torch.device("cpu"))
N_STORIES = 41


def reembedded_pool_logits(query_model, frozen, queries, passage_lists, opts, temperature=1.0):
    """The earlier path: every pool story re-embedded by the frozen passage encoder (no
    gradient, no dropout, 64 per forward), the queries by ``query_model``."""
    texts = [retriever_passage_text(p, opts.retriever_format) for plist in passage_lists for p in plist]
    with torch.no_grad(), dropout_disabled(frozen):
        parts = []
        for start in range(0, len(texts), 64):
            enc = frozen.tokenize(texts[start:start + 64], opts.retriever_maxlength)
            parts.append(frozen(enc["input_ids"], enc["attention_mask"]))
        enc = query_model.tokenize(list(queries), opts.retriever_maxlength)
        q = query_model(enc["input_ids"], enc["attention_mask"])
    return retrieval_scores(q, torch.cat(parts).view(len(queries), -1, q.shape[-1])) / temperature


def query_side_setup(tiny_models, *flags, seed=1):
    """(reader, trained query side, frozen passage side, opts): the query side moved away from the
    frozen copy, so that scoring the stories with the wrong encoder shows."""
    reader, retriever = load_models(tiny_models)
    frozen = frozen_copy(retriever)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in retriever.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return reader, retriever.eval(), frozen, make_opts(*flags, "--query_side_retriever_training")


def index_batch(reader, retriever, frozen, opts, examples, info=CPU, step=0):
    retrieval = StoryRetrieval(sample_data()[2][:N_STORIES], opts, info)
    retrieval.build(frozen)
    b = make_batch(examples, [ex["answers"][0] for ex in examples], reader, retrieval, retriever, opts,
                   random.Random(0), torch.device("cpu"), step=step)
    return b, retrieval


def pool_logits(model, b):
    with torch.no_grad():
        return model._retriever_pool_logits(b.retrieval_queries, b.passages, 1.0, passage_embeddings=b.passage_embeddings)


@pytest.mark.parametrize("index", [["--index_mode", "flat"], ["--index_mode", "faiss", "--faiss_index_type", "flat"],
                                   ["--index_mode", "faiss", "--faiss_index_type", "ivfsq"]])
def test_pool_logits_from_index_rows_equal_reembedding(tiny_models, index):
    """Flat, exact FAISS and a lossy FAISS type (its codes rank, its float32 rows score): the scores
    of today's re-embedding path, to float noise (the index embedded the stories 128 per forward)."""
    reader, retriever, frozen, opts = query_side_setup(tiny_models, *LAPDOG, *index)
    b, _ = index_batch(reader, retriever, frozen, opts, examples_with_story("train", 3))
    assert b.passage_embeddings.shape == (3, opts.retriever_n_context, retriever.hidden_size)
    model = LapdogModel(reader, retriever, opts, passage_encoder=frozen)
    got = pool_logits(model, b)
    want = reembedded_pool_logits(retriever, frozen, b.retrieval_queries, b.passages, opts)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-6)
    tied = reembedded_pool_logits(retriever, retriever, b.retrieval_queries, b.passages, opts)
    assert not torch.allclose(got, tied, atol=1e-3)  # the frozen side's stories, not the query side's


def test_augmented_pools_carry_the_rows_of_their_random_stories(tiny_models):
    """--add_random_retrieval puts corpus stories the search did not return into the pool: their
    stored rows come along (StoryRetrieval.augment), in the pool's order."""
    reader, retriever, frozen, opts = query_side_setup(tiny_models, *LAPDOG, "--add_random_retrieval", "0.67")
    b, _ = index_batch(reader, retriever, frozen, opts, examples_with_story("train", 4))
    want = reembedded_pool_logits(retriever, frozen, b.retrieval_queries, b.passages, opts)
    torch.testing.assert_close(pool_logits(LapdogModel(reader, retriever, opts, passage_encoder=frozen), b), want,
                               atol=2e-6, rtol=1e-6)


def test_joint_grpo_reference_scores_the_frozen_stories(tiny_models, monkeypatch):
    """model=ref_ret goes through the same path: the reference's queries against the index's frozen
    stories (not re-encoded by the reference), and the policy's queries against the same stories."""
    reader, retriever, frozen, opts = query_side_setup(tiny_models, *JOINT)
    ref_ret = frozen_copy(frozen)
    model = LapdogModel(reader, retriever, opts, ref_reader=frozen_copy(reader), ref_retriever=ref_ret,
                        passage_encoder=frozen)
    monkeypatch.setattr(LapdogModel, "_rewards", fixed_rewards([1.0, 0.0, 3.0, 2.0]))
    monkeypatch.setattr(LapdogModel, "_pool_rewards",
                        lambda self, b: torch.arange(float(len(b.passages) * len(b.passages[0]))).view(len(b.passages), -1))
    b, _ = index_batch(reader, retriever, frozen, opts, examples_with_story("train", 2))
    model.eval()
    _, _, rollout, _ = model("grpo_joint", b)
    tau = opts.grpo_retriever_temperature
    ref_want = torch.log_softmax(reembedded_pool_logits(ref_ret, frozen, b.retrieval_queries, b.passages, opts) / tau, -1)
    torch.testing.assert_close(rollout["ref_pool_logp"], ref_want, atol=2e-5, rtol=1e-5)
    pol_want = torch.log_softmax(reembedded_pool_logits(retriever, frozen, b.retrieval_queries, b.passages, opts) / tau, -1)
    torch.testing.assert_close(rollout["old_pool_logp"], pol_want, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(rollout["ref_pool_logp"], rollout["old_pool_logp"], atol=1e-3)


def state_outside_modules(model):
    """Tensor elements plus container entries that ``model`` holds besides its modules (whose
    parameters and buffers are the model itself): a per-story cache shows up here."""
    seen, total = set(), 0

    def walk(x):
        nonlocal total
        if id(x) in seen or isinstance(x, torch.nn.Module):
            return
        seen.add(id(x))
        if torch.is_tensor(x):
            total += x.numel()
        elif isinstance(x, dict):
            total += len(x)
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple, set)):
            total += len(x)
            for v in x:
                walk(v)

    for key, value in vars(model).items():
        if key not in ("_modules", "_parameters", "_buffers"):
            walk(value)
    return total


def test_no_per_story_state_grows(tiny_models):
    """LAPDOG forwards over batches that meet ever more stories leave the model's state unchanged
    (the frozen-side embeddings used to be cached per story: 3 GB at 1M stories × 768)."""
    reader, retriever, frozen, opts = query_side_setup(tiny_models, *LAPDOG)
    model = LapdogModel(reader, retriever, opts, passage_encoder=frozen)
    before = state_outside_modules(model)
    met = set()
    for start in (0, 3, 6):
        b, _ = index_batch(reader, retriever, frozen, opts, examples_with_story("train", 3, start=start))
        met |= {p["id"] for plist in b.passages for p in plist}
        with torch.no_grad():
            model("lapdog", b)
        assert state_outside_modules(model) == before
    assert len(met) > opts.retriever_n_context  # the batches did meet new stories


def test_pool_logits_do_not_depend_on_earlier_batches_or_a_restart(tiny_models, tmp_path):
    """Resume determinism: the pool scores of a batch are a function of the index alone. An
    uninterrupted run (forwards over other batches first) and a restarted one (a new model, the
    index rebuilt, or loaded from the first run's save) give the same scores bit for bit."""
    reader, retriever, frozen, opts = query_side_setup(tiny_models, *LAPDOG)
    model = LapdogModel(reader, retriever, opts, passage_encoder=frozen)
    for start in (3, 6):  # the batches before
        b, _ = index_batch(reader, retriever, frozen, opts, examples_with_story("train", 4, start=start))
        with torch.no_grad():
            model("lapdog", b)
    x = examples_with_story("train", 3)
    b, retrieval = index_batch(reader, retriever, frozen, opts, x)
    uninterrupted = pool_logits(model, b)
    retrieval.index.save(str(tmp_path / "index"), fingerprint=retrieval.fingerprint(frozen))

    restarted = LapdogModel(reader, retriever, opts, passage_encoder=frozen_copy(frozen))
    b2, _ = index_batch(reader, retriever, restarted.refs["passage_encoder"], opts, x)
    assert torch.equal(pool_logits(restarted, b2), uninterrupted)
    loaded_opts = make_opts(*LAPDOG, "--query_side_retriever_training", "--load_index_path", str(tmp_path / "index"))
    b3, _ = index_batch(reader, retriever, restarted.refs["passage_encoder"], loaded_opts, x)
    assert torch.equal(pool_logits(restarted, b3), uninterrupted)


SPLIT = (3, 1)  # examples per rank: unequal


def _pool_worker(rank, world, init_file, out_dir, tiny_models):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        reader, retriever, frozen, opts = query_side_setup(tiny_models, *LAPDOG)
        mine = examples_with_story("train", sum(SPLIT))[sum(SPLIT[:rank]):sum(SPLIT[:rank + 1])]
        b, retrieval = index_batch(reader, retriever, frozen, opts, mine, info=DistInfo(rank, world, 0, torch.device("cpu")))
        assert retrieval.index.n_local < N_STORIES  # sharded: the pool's rows come from both ranks
        logits = pool_logits(LapdogModel(reader, retriever, opts, passage_encoder=frozen), b)
        torch.save({"logits": logits, "ids": [[p["id"] for p in plist] for plist in b.passages]},
                   os.path.join(out_dir, f"pool{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_pool_logits_equal_one_process(tmp_path, tiny_models):
    mp.spawn(_pool_worker, args=(2, str(tmp_path / "init"), str(tmp_path), tiny_models), nprocs=2, join=True)
    per_rank = [torch.load(tmp_path / f"pool{r}.pt", weights_only=True) for r in range(2)]
    reader, retriever, frozen, opts = query_side_setup(tiny_models, *LAPDOG)
    b, _ = index_batch(reader, retriever, frozen, opts, examples_with_story("train", sum(SPLIT)))
    assert [ids for r in per_rank for ids in r["ids"]] == [[p["id"] for p in plist] for plist in b.passages]
    got = torch.cat([r["logits"] for r in per_rank])
    torch.testing.assert_close(got, pool_logits(LapdogModel(reader, retriever, opts, passage_encoder=frozen), b),
                               atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(got, reembedded_pool_logits(retriever, frozen, b.retrieval_queries, b.passages, opts),
                               atol=2e-6, rtol=1e-6)
