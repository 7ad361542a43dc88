"""--retriever_signal knowledge: the retriever learns only from the target's fact-like words.

Joint GRPO's pool stories are scored by knowledge recall of their greedy replies; LAPDOG fits its
gold scores only on examples whose target has such a word (chit-chat: KL 0, no gradient)."""

import random

import torch
from helpers import chit_chat_and_fact_examples, knowledge_retrieval, load_models, make_opts, sample_data

from src.model.lapdog import LapdogModel
from src.objectives import retriever_losses
from src.run.batch import make_batch


def test_make_batch_carries_the_targets_knowledge_words(tiny_models):
    reader, retriever = load_models(tiny_models)
    opts = make_opts("--train_retriever", "--gold_score_mode", "ppmean", "--retriever_n_context", "3",
                     "--retriever_signal", "knowledge")
    exs = chit_chat_and_fact_examples()
    retrieval = knowledge_retrieval(sample_data()[2][:12], opts)
    b = make_batch(exs, [ex["answers"][0] for ex in exs], reader, retrieval, retriever, opts, random.Random(0), "cpu")
    assert b.knowledge[0] == []  # "i am good , thanks ..." needs no story
    assert b.knowledge[1] and all(w in exs[1]["answers"][0].split() for w in b.knowledge[1])
    # evaluation batches carry none (no training signal is computed there)
    e = make_batch(exs, [ex["answers"][0] for ex in exs], reader, retrieval, retriever, opts, random.Random(0), "cpu",
                   train=False)
    assert "knowledge" not in e


def test_lapdog_fits_gold_scores_only_where_the_target_needs_knowledge(tiny_models, monkeypatch):
    reader, retriever = load_models(tiny_models)
    opts = make_opts("--train_retriever", "--gold_score_mode", "ppmean", "--retriever_n_context", "3",
                     "--retriever_signal", "knowledge")
    model = LapdogModel(reader, retriever.eval(), opts)  # eval: the same scores twice (no dropout)
    exs = chit_chat_and_fact_examples()
    b = make_batch(exs, [ex["answers"][0] for ex in exs], reader, knowledge_retrieval(sample_data()[2][:12], opts),
                   retriever, opts, random.Random(0), "cpu")
    gold = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 5.0]])  # peaked on both rows
    monkeypatch.setattr("src.model.lapdog.gold_scores", lambda *a, **k: gold)
    stats = {}
    loss = model._lapdog_retriever_objective(b, stats)
    with torch.no_grad():
        score_logp = torch.log_softmax(model._retriever_pool_logits(b.retrieval_queries, b.passages,
                                                                    opts.temperature_score), -1)
    kl = retriever_losses.categorical_kl(torch.log_softmax(gold / opts.temperature_gold, -1), score_logp)
    # 'mean' reduction over all B·K terms; the chit-chat row contributes nothing
    torch.testing.assert_close(loss.detach(), kl[1] / gold.numel())
    assert stats["retriever/knowledge_examples"] == 0.5
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in retriever.parameters())


def test_joint_pool_rewards_are_knowledge_recall_of_the_greedy_replies(tiny_models, monkeypatch):
    reader, retriever = load_models(tiny_models)
    opts = make_opts("--reader_rl_learning", "--use_grpo", "--grpo_train_retriever", "--grpo_retriever_pool_size", "3",
                     "--grpo_retriever_group_size", "2", "--retriever_signal", "knowledge")
    model = LapdogModel(reader, retriever, opts)
    exs = chit_chat_and_fact_examples()
    b = make_batch(exs, [ex["answers"][0] for ex in exs], reader, knowledge_retrieval(sample_data()[2][:12], opts),
                   retriever, opts, random.Random(0), "cpu")
    facts = b.knowledge[1]
    # the fact example's 3 stories: one reply with every fact, one with none, one with the first
    replies = ["i am good , thanks"] * 3 + [" ".join(facts), "no idea", facts[0]]
    monkeypatch.setattr(type(reader), "generate_text", lambda self, ids, mask, **kw: replies[:ids.shape[0]])
    r = model._pool_rewards(b)
    expected = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 1.0 / len(facts)]])
    torch.testing.assert_close(r, expected)
