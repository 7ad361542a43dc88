"""Model-level tests of the LAPDOG objectives (src/model/lapdog.py, src/model/gold_scores.py) on tiny models.

The helpers here (options, models, a brute-force in-memory retrieval) are shared with
tests/test_grpo_model.py.
"""

import math
import random

import pytest
import torch
from helpers import (
    BruteForceRetrieval,
    closed_book_batch,
    examples_with_story,
    load_models,
    make_opts,
    retrieval_batch,
    sample_data,
)

from src.data.prompts import retrieval_query, retriever_passage_text
from src.model.gold_scores import MODES, gold_scores
from src.model.lapdog import LapdogModel
from src.model.reader import FiDReader
from src.model.retriever import Retriever, retrieval_scores
from src.objectives import retriever_losses
from src.objectives.schedule import training_kind
from src.run.batch import make_batch


def grad_norm(module):
    total = 0.0
    for p in module.parameters():
        if p.grad is not None:
            total += p.grad.float().pow(2).sum().item()
    return math.sqrt(total)


# ------------------------------------------------------------------------------------------ gold scores

ALL_MODES = ["ppmean", "pdist", "loop", "emdr", "emdr_seq", "evalnormsum", "adist", "bleudist", "bleudist_pdist",
             "f1rougebleudist"]


def test_every_documented_mode_is_known():
    assert set(ALL_MODES) == set(MODES)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_gold_scores_and_lapdog_loss(lapdog_setup, mode):
    reader, retriever, stories = lapdog_setup
    opts = make_opts("--train_retriever", "--gold_score_mode", mode, "--retriever_n_context", "3",
                     "--n_context", "2")
    model = LapdogModel(reader, retriever, opts)
    model.train()
    batch = retrieval_batch(model, examples_with_story("train", 2), stories)
    assert len(batch.passages) == 2 and all(len(p) == 3 for p in batch.passages)
    gold = gold_scores(mode, reader, batch.queries, batch.passages, batch.labels, batch.answers, opts)
    assert gold.shape == (2, 3)
    assert torch.isfinite(gold).all()
    assert not gold.requires_grad
    assert training_kind(opts, 0) == "lapdog"
    model.zero_grad()
    loss, stats, rollout, _ = model("lapdog", batch)
    assert rollout is None
    assert torch.isfinite(loss)
    assert math.isfinite(stats["loss/retriever"]) and math.isfinite(stats["gold_score/mean"])
    loss.backward()
    assert grad_norm(retriever) > 0
    assert grad_norm(reader) > 0  # reader cross-entropy is part of the lapdog loss unless --fix_reader


def test_gold_score_signs(lapdog_setup):
    """ppmean is −NLL, loop is the NLL with the story left out, emdr the sequence log-likelihood."""
    reader, retriever, stories = lapdog_setup
    opts = make_opts("--retriever_n_context", "3", "--n_context", "3")
    model = LapdogModel(reader, retriever, opts)
    batch = retrieval_batch(model, examples_with_story("train", 2), stories)
    pp = gold_scores("ppmean", reader, batch.queries, batch.passages, batch.labels, batch.answers, opts)
    em = gold_scores("emdr", reader, batch.queries, batch.passages, batch.labels, batch.answers, opts)
    n_tokens = (batch.labels != -100).sum(-1, keepdim=True).float()
    assert (pp < 0).all()
    assert torch.allclose(em, pp * n_tokens, rtol=1e-4, atol=1e-3)
    loop = gold_scores("loop", reader, batch.queries, batch.passages, batch.labels, batch.answers, opts)
    assert (loop > 0).all()


def test_fix_reader_trains_retriever_only(lapdog_setup):
    reader, retriever, stories = lapdog_setup
    opts = make_opts("--train_retriever", "--fix_reader", "--gold_score_mode", "ppmean",
                     "--retriever_n_context", "3")
    model = LapdogModel(reader, retriever, opts)
    batch = retrieval_batch(model, examples_with_story("train", 2), stories)
    model.zero_grad()
    loss, stats, _, _ = model("lapdog", batch)
    loss.backward()
    assert grad_norm(retriever) > 0
    assert grad_norm(reader) == 0
    assert "loss/reader" not in stats


def test_f1rougebleudist_all_zero_bleu_is_finite(lapdog_setup, monkeypatch):
    """Every greedy reply shares no word with its reference: BLEU is 0 everywhere, no NaN."""
    reader, retriever, stories = lapdog_setup
    opts = make_opts("--train_retriever", "--gold_score_mode", "f1rougebleudist", "--retriever_n_context", "3")
    model = LapdogModel(reader, retriever, opts)
    batch = retrieval_batch(model, examples_with_story("train", 2), stories)
    monkeypatch.setattr(FiDReader, "generate_text", lambda self, ids, mask, **kw: ["zzzq"] * ids.shape[0])
    gold = gold_scores("f1rougebleudist", reader, batch.queries, batch.passages, batch.labels, batch.answers, opts)
    assert gold.shape == (2, 3)
    assert torch.equal(gold, torch.zeros(2, 3))
    loss, _, _, _ = model("lapdog", batch)
    assert torch.isfinite(loss)


# ------------------------------------------------------------------------------------------ REINFORCE


def reply_logprob(reader, batch, replies):
    """[R] log p(reply) under the reader, dropout off, no gradient."""
    from src.model.reader import dropout_disabled
    from src.objectives.grpo import sequence_logprob
    with torch.no_grad(), dropout_disabled(reader):
        hidden, mask = reader.encode(batch.input_ids, batch.attention_mask)
        logp, tmask = reader.token_logprobs(hidden, mask, replies)
    return sequence_logprob(logp, tmask)


def test_reinforce_step_raises_the_rewarded_reply(tiny_models, monkeypatch):
    torch.manual_seed(0)
    reader, retriever = load_models(tiny_models, dropout=0.1)
    opts = make_opts("--reader_rl_learning", "--closed_book", "--per_gpu_batch_size", "4")
    assert training_kind(opts, 0) == "reinforce"
    model = LapdogModel(reader, retriever, opts)
    model.train()
    batch = closed_book_batch(model, examples_with_story("train", 4))

    seen = {}

    def rewards(self, replies, answers, stats, contexts, per_reply_answers=None):
        seen["replies"] = replies.clone()
        r = torch.zeros(replies.shape[0])
        r[1] = 1.0  # only the second example's reply is rewarded
        return {"reward": r}

    monkeypatch.setattr(LapdogModel, "_rewards", rewards)
    torch.manual_seed(1)
    loss, stats, _, _ = model("reinforce", batch)
    replies = seen["replies"]
    assert replies.shape[0] == 4
    before = reply_logprob(reader, batch, replies)
    opt = torch.optim.SGD(reader.parameters(), lr=0.05)
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = reply_logprob(reader, batch, replies)
    delta = after - before
    assert delta[1] > 0, delta
    assert delta[1] > delta[[0, 2, 3]].max(), delta
    assert reader.training  # dropout_disabled restored the train flag


# ------------------------------------------------------------------------------------------ learning

def recall_at_1(retriever, examples, stories, opts):
    q = retriever.embed_texts([retrieval_query(ex["question"], opts.retriever_from, None) for ex in examples],
                              batch_size=64, max_length=opts.retriever_maxlength)
    p = retriever.embed_texts([retriever_passage_text(s, opts.retriever_format) for s in stories],
                              batch_size=64, max_length=opts.retriever_maxlength)
    top = retrieval_scores(q, p).argmax(-1).tolist()
    return sum(stories[t]["id"] == ex["story_id"] for t, ex in zip(top, examples)) / len(examples)


@pytest.mark.slow
@pytest.mark.learning
def test_lapdog_retriever_training_raises_recall(tiny_models, minilm_path):
    """gold_score_mode=ppmean, the real MiniLM retriever, and an *oracle-like* reader.

    The reader is the tiny random T5 after 100 supervised steps on (query + its own story ->
    reply) pairs of the training split, so that its likelihood of a reply is higher with the story
    the reply is about: the ppmean gold signal is then informative. The retriever is trained with
    the "lapdog" kind (--train_retriever --fix_reader) on training examples with a story_id, over
    a pool of 4 stories per query (the gold story plus 3 others, so the gold signal can act),
    and recall@1 of the story_id over all 288 stories is measured on the validation examples that
    have one, before and after.
    """
    torch.manual_seed(0)
    reader, _ = load_models(tiny_models)
    retriever = Retriever.from_pretrained(minilm_path)
    train, valid, stories = sample_data()
    by_id = {s["id"]: s for s in stories}
    opts = make_opts("--train_retriever", "--fix_reader", "--gold_score_mode", "ppmean", "--retriever_n_context",
                     "4", "--n_context", "1", "--retriever_from", "context",
                     "--temperature_gold", "0.1", "--temperature_score", "0.1", "--text_maxlength", "320")
    model = LapdogModel(reader, retriever, opts)
    tr = [ex for ex in train if ex.get("story_id")]
    va = [ex for ex in valid if ex.get("story_id")]
    rng = random.Random(0)

    def pools(examples):
        out = []
        for ex in examples:
            others = [s for s in rng.sample(stories, 4) if s["id"] != ex["story_id"]][:3]
            plist = others + [by_id[ex["story_id"]]]
            rng.shuffle(plist)
            out.append(plist)
        return out

    def batch_for(examples):
        answers = [ex["answers"][0] for ex in examples]
        b = make_batch(examples, answers, reader, None, None, opts, rng, model.device)
        b["passages"] = pools(examples)
        b["retrieval_queries"] = [retrieval_query(ex["question"], opts.retriever_from, rng) for ex in examples]
        return b

    # 1) make the reader favour the right story
    from src.data.prompts import encoder_inputs
    ropt = torch.optim.AdamW(reader.parameters(), lr=3e-3)
    reader.train()
    for step in range(100):
        exs = rng.sample(tr, 8)
        b = batch_for(exs)
        ids, mask = reader.tokenize_inputs(
            [encoder_inputs(q, [by_id[ex["story_id"]]], 1) for q, ex in zip(b.queries, exs)], opts.text_maxlength)
        loss = reader(ids, mask, b.labels)
        ropt.zero_grad()
        loss.backward()
        ropt.step()
    reader.eval()
    reader.requires_grad_(False)
    # the gold signal: how often the right story has the best ppmean score in a pool of 4
    b = batch_for(va[:32])
    gold = gold_scores("ppmean", reader, b.queries, b.passages, b.labels, b.answers, opts)
    best = gold.argmax(-1).tolist()
    gold_acc = sum(p[i]["id"] == ex["story_id"] for p, i, ex in zip(b.passages, best, va[:32])) / 32

    # Held out: the validation examples' own pools (their story among 3 others), fixed before training.
    held = batch_for(va[:48])
    held_gold = gold_scores("ppmean", reader, held.queries, held.passages, held.labels, held.answers, opts)
    target = torch.log_softmax(held_gold / opts.temperature_gold, -1)

    def held_out_kl():
        with torch.no_grad():
            logits = model._retriever_pool_logits(held.retrieval_queries, held.passages, opts.temperature_score)
            return float(retriever_losses.categorical_kl(target, torch.log_softmax(logits, -1)).mean())

    before_kl, before = held_out_kl(), recall_at_1(retriever, va, stories, opts)
    opt = torch.optim.AdamW(retriever.parameters(), lr=1e-4)
    retriever.train()
    for step in range(30):
        b = batch_for(rng.sample(tr, 8))
        loss, stats, _, _ = model("lapdog", b)
        opt.zero_grad()
        loss.backward()
        opt.step()
    retriever.eval()
    after_kl, after = held_out_kl(), recall_at_1(retriever, va, stories, opts)
    print(f"gold top-1 accuracy in pools of 4: {gold_acc:.3f}; held-out KL(gold || retriever) {before_kl:.4f} -> "
          f"{after_kl:.4f}; recall@1 over all stories {before:.3f} -> {after:.3f}")
    assert gold_acc > 0.35  # the reader reads: its likelihood prefers the right story (chance: 0.25)
    # The retriever learns what LAPDOG asks of it on examples it never trained on: its distribution
    # over their pools moves toward the reader's. recall@1 over all 288 stories is printed, not
    # asserted: it rose by 0-5 examples of 137 across thread counts.
    # measured (seed 0): 2 threads 0.2477 -> 0.1953 (−21%), gold top-1 0.469; 1 thread 0.1662 -> 0.1280
    # (−23%), gold top-1 0.594
    assert after_kl < 0.9 * before_kl


def test_f1rougebleudist_default_weights_are_lapdogs(lapdog_setup, monkeypatch):
    """Without --metric_scale_factors the gold score is BLEU/||BLEU|| + F1 + ROUGE-L (weights 1, not the
    reward's 0.01 for BLEU, which would scale the already-normalized BLEU twice); with the flag, its weights."""
    from src.objectives.rewards import lapdog_gold_scores
    reader, retriever, stories = lapdog_setup
    opts = make_opts("--retriever_n_context", "2")
    model = LapdogModel(reader, retriever, opts)
    batch = retrieval_batch(model, examples_with_story("train", 2), stories)
    fake = ["i have a dog named max", "max loves his stick", "i like to sing", "the stick"]
    monkeypatch.setattr(FiDReader, "generate_text", lambda self, ids, mask, **kw: fake[:ids.shape[0]])
    refs = [a for a in batch.answers for _ in range(2)]
    gold = gold_scores("f1rougebleudist", reader, batch.queries, batch.passages, batch.labels, batch.answers, opts)
    expected = lapdog_gold_scores(fake, refs, scale=(1.0, 1.0, 1.0)).view(2, 2)
    assert torch.allclose(gold, expected)
    assert not torch.allclose(gold, lapdog_gold_scores(fake, refs, scale=(0.01, 1.0, 1.0)).view(2, 2))
    opts = make_opts("--retriever_n_context", "2", "--metric_scale_factors", "{'bleu':0.5,'f1':2,'rouge':0}")
    gold = gold_scores("f1rougebleudist", reader, batch.queries, batch.passages, batch.labels, batch.answers, opts)
    assert torch.allclose(gold, lapdog_gold_scores(fake, refs, scale=(0.5, 2.0, 0.0)).view(2, 2))


def test_posterior_fact_swap_trains_the_reader_on_swapped_targets_and_scores_gold_on_the_originals(
        lapdog_setup, monkeypatch):
    """--posterior_passages --posterior_fact_swap 1: the reader's labels are the swapped replies,
    fused with their posterior story; LAPDOG's gold scores see the original replies."""
    from src.data.posterior import FactSwap, PosteriorStories

    reader, retriever, _ = lapdog_setup
    train, _, stories = sample_data()
    opts = make_opts("--train_retriever", "--posterior_passages", "--posterior_fact_swap", "1", "--retriever_n_context",
                     "2", "--gold_score_mode", "ppmean", "--text_maxlength", "256")
    model = LapdogModel(reader, retriever, opts)
    retrieval = BruteForceRetrieval(stories, opts)
    retrieval.posterior = PosteriorStories(stories)
    retrieval.fact_swap = FactSwap(retrieval.posterior, [ex["question"] + " " + ex["answers"][0] for ex in train])
    exs = [ex for ex in examples_with_story("train", 12) if retrieval.fact_swap.shared_fact(
        ex["answers"][0], retrieval.posterior.best(ex["answers"][0]))][:3]
    assert len(exs) == 3
    answers = [ex["answers"][0] for ex in exs]
    b = make_batch(exs, answers, reader, retrieval, retriever, opts, random.Random(0), model.device)
    original = reader.tokenize_targets([f"<extra_id_0> {a}" for a in answers], opts.target_maxlength)
    assert torch.equal(b.gold_labels, original) and not torch.equal(b.labels, original)
    fused = reader.tokenizer.batch_decode(b.input_ids[:, 0], skip_special_tokens=True)
    swapped = reader.tokenizer.batch_decode(b.labels.clamp(min=0), skip_special_tokens=True)
    for text, reply, a in zip(fused, swapped, answers):
        new = [w for w in reply.split() if w not in a.split()]
        assert new and all(w in text for w in new)  # the swapped fact is in the fused story/prompt
    seen = {}

    def fake_gold(mode, reader_, queries, passages, labels, references, o):
        seen["labels"] = labels
        return torch.zeros(len(passages), len(passages[0]))
    monkeypatch.setattr("src.model.lapdog.gold_scores", fake_gold)
    model("lapdog", b)
    assert torch.equal(seen["labels"], original)
