"""--retriever_signal evidence and --grpo_retriever_estimator posterior.

The evidence of a story is the reader's log-likelihood of the target's fact-like words with that
story fused (src/model/gold_scores.py:evidence_scores); the posterior estimator fits the retriever to
π_old·exp(A/β) over the pool (src/objectives/retriever_losses.py:pool_posterior_loss)."""

import math
import random

import pytest
import torch
from helpers import chit_chat_and_fact_examples, knowledge_retrieval, load_models, make_opts, sample_data

from src.data.prompts import encoder_inputs, reader_target
from src.model.gold_scores import evidence_scores
from src.model.lapdog import LapdogModel
from src.objectives import retriever_losses
from src.run.batch import make_batch


# ------------------------------------------------------------------ pool_posterior_loss (pure maths)
def _posterior_update(logits, rewards, beta, ref=None, kl=0.0):
    lg = logits.clone().requires_grad_(True)
    loss, stats = retriever_losses.pool_posterior_loss(torch.log_softmax(lg, -1), torch.log_softmax(logits, -1), ref, rewards,
                                           beta, kl)
    loss.backward()
    return loss, lg.grad, stats


def test_posterior_target_by_hand():
    # π_old = (0.5, 0.25, 0.25), R = (0, ln 2, 0), β = 1: t ∝ (0.5, 0.5, 0.25) = (0.4, 0.4, 0.2)
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64))
    rewards = torch.tensor([[0.0, math.log(2), 0.0]], dtype=torch.float64)
    loss, grad, stats = _posterior_update(logits, rewards, beta=1.0)
    t = torch.tensor([[0.4, 0.4, 0.2]], dtype=torch.float64)
    torch.testing.assert_close(loss.detach(), -(t * torch.log_softmax(logits, -1)).sum())
    # gradient of the cross-entropy on the logits: π − t
    torch.testing.assert_close(grad, torch.softmax(logits, -1) - t)
    assert float(stats["moved"]) == pytest.approx(0.15)  # ½ Σ |t − π_old| = ½ (0.1 + 0.15 + 0.05)


def test_posterior_with_log_likelihood_rewards_is_bayes_posterior():
    # β = 1 and R_j = log p(y | j): t_j = π(j) p(y|j) / Σ_l π(l) p(y|l), enumerated
    prior = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    lik = torch.tensor([0.9, 0.05, 0.3, 0.01], dtype=torch.float64)
    lg = prior.log().clone()[None].requires_grad_(True)
    loss, _ = retriever_losses.pool_posterior_loss(torch.log_softmax(lg, -1), prior.log()[None], None, lik.log()[None], 1.0, 0.0)
    loss.backward()
    posterior = prior * lik / (prior * lik).sum()
    torch.testing.assert_close(-lg.grad[0] + prior, posterior)


def test_posterior_push_does_not_vanish_for_a_low_ranked_good_story():
    # the good story has π = 0.01: the expected-reward gradient on its logit is π·A ≈ 0.01, the
    # posterior step's is π − t, of order one
    logits = torch.log(torch.tensor([[0.01, 0.495, 0.495]], dtype=torch.float64))
    rewards = torch.tensor([[10.0, 0.0, 0.0]], dtype=torch.float64)
    _, grad, _ = _posterior_update(logits, rewards, beta=3.0)
    lg = logits.clone().requires_grad_(True)
    retriever_losses.pool_policy_loss(torch.log_softmax(lg, -1), torch.log_softmax(logits, -1), None, rewards, 0.2,
                          0.0)[0].backward()
    assert -grad[0, 0] > 0.2 and -lg.grad[0, 0] < 0.11


def test_posterior_equal_rewards_move_nothing_and_large_beta_tends_to_no_update():
    logits = torch.randn(3, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    _, grad, stats = _posterior_update(logits, torch.full((3, 6), -4.0, dtype=torch.float64), beta=3.0)
    assert grad.abs().max() < 1e-12 and float(stats["moved"]) < 1e-12
    rewards = torch.rand(3, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _, g_small, _ = _posterior_update(logits, rewards, beta=1.0)
    _, g_large, _ = _posterior_update(logits, rewards, beta=1e6)
    assert g_large.abs().max() < 1e-5 < g_small.abs().max()


def test_posterior_masks_unusable_entries_and_huge_rewards_stay_finite():
    logits = torch.tensor([[0.0, 1.0, float("-inf")]])
    lg = logits.clone().requires_grad_(True)
    loss, stats = retriever_losses.pool_posterior_loss(torch.log_softmax(lg, -1), torch.log_softmax(logits, -1), None,
                                           torch.tensor([[1e4, 0.0, 5e4]]), 1.0, 0.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lg.grad).all() and lg.grad[0, 2] == 0
    assert lg.grad[0, 0] < 0  # the first story is the only usable one with a large reward


def test_posterior_reference_kl_and_bad_inputs():
    logits = torch.randn(2, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = torch.log_softmax(torch.zeros(2, 4, dtype=torch.float64), -1)
    rewards = torch.zeros(2, 4, dtype=torch.float64)
    loss0, _, _ = _posterior_update(logits, rewards, 1.0)
    loss1, _, stats = _posterior_update(logits, rewards, 1.0, ref=ref, kl=0.5)
    kl = retriever_losses.categorical_kl(torch.log_softmax(logits, -1), ref).mean()
    torch.testing.assert_close(loss1.detach() - loss0.detach(), 0.5 * kl)
    torch.testing.assert_close(stats["kl"], kl)
    with pytest.raises(ValueError, match="beta"):
        retriever_losses.pool_posterior_loss(torch.zeros(1, 2), torch.zeros(1, 2), None, torch.zeros(1, 2), 0.0, 0.0)
    with pytest.raises(ValueError, match="share shape"):
        retriever_losses.pool_posterior_loss(torch.zeros(1, 2), torch.zeros(1, 3), None, torch.zeros(1, 2), 1.0, 0.0)


# ------------------------------------------------------------------ the reader's fact tokens and evidence
def test_word_mask_marks_every_piece_of_the_fact_words(tiny_models):
    reader, _ = load_models(tiny_models)
    targets = [reader_target("mostly catfish , they are tasty ."), reader_target("i am good , thanks .")]
    labels = reader.tokenize_targets(targets, 32)
    mask = reader.word_mask(targets, [["catfish", "tasty"], []], 32)
    assert mask.shape == labels.shape and not mask[1].any()
    pieces = reader.tokenizer.convert_ids_to_tokens(labels[0][mask[0]].tolist())
    expected = reader.tokenizer.tokenize("catfish") + reader.tokenizer.tokenize("tasty")
    assert pieces == expected
    with pytest.raises(ValueError, match="word lists"):
        reader.word_mask(targets, [[]], 32)


def test_evidence_is_the_fact_tokens_log_likelihood_and_zero_for_chit_chat(tiny_models):
    reader, _ = load_models(tiny_models)
    opts = make_opts()
    stories = sample_data()[2][:3]
    queries = ["dialog with R's persona: a R: <extra_id_0>", "dialog with R's persona: b R: <extra_id_0>"]
    targets = [reader_target("i am good , thanks ."), reader_target("mostly catfish , they are tasty .")]
    labels = reader.tokenize_targets(targets, 32)
    fact_mask = reader.word_mask(targets, [[], ["catfish"]], 32)
    got = evidence_scores(reader, queries, [stories, stories], labels, fact_mask, opts, chunk=2)
    assert (got[0] == 0).all()
    ids, mask = reader.tokenize_inputs([encoder_inputs(queries[1], [s], 1) for s in stories], opts.text_maxlength)
    with torch.no_grad():
        nll, _ = reader.label_nll(ids, mask, labels[1:].repeat(3, 1))
    torch.testing.assert_close(got[1], -(nll * fact_mask[1]).sum(-1))
    assert (got[1] < 0).all()


def _evidence_batch(reader, retriever, opts):
    exs = chit_chat_and_fact_examples()
    retrieval = knowledge_retrieval(sample_data()[2][:12], opts)
    return make_batch(exs, [ex["answers"][0] for ex in exs], reader, retrieval, retriever, opts, random.Random(0), "cpu")


@pytest.mark.parametrize("k", [1, 2])  # k = 1: one drawn story is the reader's input, the pool is the retriever's
def test_joint_posterior_estimator_learns_from_the_evidence(tiny_models, monkeypatch, k):
    reader, retriever = load_models(tiny_models)
    opts = make_opts("--reader_rl_learning", "--use_grpo", "--grpo_train_retriever", "--grpo_retriever_pool_size", "3",
                     "--grpo_retriever_group_size", str(k), "--retriever_signal", "evidence",
                     "--grpo_retriever_estimator", "posterior", "--grpo_retriever_kl_coeff", "0")
    model = LapdogModel(reader, retriever, opts, ref_reader=load_models(tiny_models)[0],
                        ref_retriever=load_models(tiny_models)[1])
    b = _evidence_batch(reader, retriever, opts)
    assert b.fact_mask.shape == b.labels.shape and not b.fact_mask[0].any() and b.fact_mask[1].any()
    r = model._pool_rewards(b)
    torch.testing.assert_close(r, evidence_scores(reader, b.queries, b.passages, b.labels, b.fact_mask, opts))
    assert (r[0] == 0).all() and (r[1] < 0).all()
    loss, stats, _, samples = model("grpo_joint", b)
    loss.backward()
    assert "grpo/retriever_moved" in stats and stats["grpo/retriever_moved"] > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in retriever.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in reader.parameters())  # the generator's GRPO
    assert ("reward/story_std" in stats) == (k > 1) and len(samples) == k * len(b.queries) * opts.grpo_group_size


def test_lapdog_with_evidence_fits_the_evidence_only_where_the_target_has_facts(tiny_models, monkeypatch):
    reader, retriever = load_models(tiny_models)
    opts = make_opts("--train_retriever", "--retriever_n_context", "3", "--retriever_signal", "evidence",
                     "--temperature_gold", "3")
    model = LapdogModel(reader, retriever.eval(), opts)
    b = _evidence_batch(reader, retriever, opts)
    monkeypatch.setattr("src.model.lapdog.gold_scores", lambda *a, **k: pytest.fail("evidence replaces the gold scores"))
    evidence = evidence_scores(reader, b.queries, b.passages, b.labels, b.fact_mask, opts)
    loss = model._lapdog_retriever_objective(b, {})
    with torch.no_grad():
        score_logp = torch.log_softmax(model._retriever_pool_logits(b.retrieval_queries, b.passages,
                                                                    opts.temperature_score), -1)
    kl = retriever_losses.categorical_kl(torch.log_softmax(evidence / 3, -1), score_logp)
    torch.testing.assert_close(loss.detach(), kl[1] / evidence.numel())


def test_lapdog_emdr_seq_with_evidence_is_the_tempered_marginal_likelihood_of_the_facts(tiny_models):
    reader, retriever = load_models(tiny_models)
    opts = make_opts("--train_retriever", "--retriever_n_context", "3", "--retriever_signal", "evidence",
                     "--gold_score_mode", "emdr_seq", "--temperature_gold", "3")
    model = LapdogModel(reader, retriever.eval(), opts)
    b = _evidence_batch(reader, retriever, opts)
    evidence = evidence_scores(reader, b.queries, b.passages, b.labels, b.fact_mask, opts)
    loss = model._lapdog_retriever_objective(b, {})
    score_logp = torch.log_softmax(model._retriever_pool_logits(b.retrieval_queries, b.passages,
                                                                opts.temperature_score), -1)
    per_row = -torch.logsumexp(score_logp.detach() + evidence / 3, dim=-1)
    assert per_row[0].abs() < 1e-6  # chit-chat: no story explains it, nothing to fit
    torch.testing.assert_close(loss.detach(), per_row.mean())
    # its gradient is that of the posterior step with β = τ_g (taken at the current retriever)
    params = [p for p in retriever.parameters() if p.requires_grad]
    g_emdr = torch.autograd.grad(loss, params, allow_unused=True)
    ref, _ = retriever_losses.pool_posterior_loss(score_logp, score_logp.detach(), None, evidence, 3.0, 0.0,
                                                  rows=b.fact_mask.any(-1))  # chit-chat: no gradient in either
    g_post = torch.autograd.grad(ref, params, allow_unused=True)
    pairs = [(a, c) for a, c in zip(g_emdr, g_post) if a is not None]
    assert pairs and any(a.abs().sum() > 0 for a, _ in pairs)
    # float32 sums in another order: agree to 1e-4 of the largest gradient entry (worst seen: 3.6e-5)
    scale = max(a.abs().max().item() for a, _ in pairs)
    for a, c in pairs:
        torch.testing.assert_close(a, c, atol=1e-4 * scale, rtol=1e-4)


# ------------------------------------------------------------------ chit-chat moves nothing
def test_rows_without_a_signal_give_no_gradient_at_all_kl_included():
    """pool_posterior_loss / pool_policy_loss with ``rows``: a masked row's logits get exactly zero
    gradient, its KL to the reference included; the other rows' loss is what it was."""
    g = torch.Generator().manual_seed(0)
    logits, ref = torch.randn(3, 5, generator=g), torch.log_softmax(torch.randn(3, 5, generator=g), -1)
    rewards = torch.randn(3, 5, generator=g)
    rows = torch.tensor([True, False, True])
    for loss_fn, arg in ((retriever_losses.pool_posterior_loss, 3.0), (retriever_losses.pool_policy_loss, 0.2)):
        lg = logits.clone().requires_grad_(True)
        loss, stats = loss_fn(torch.log_softmax(lg, -1), torch.log_softmax(logits, -1), ref, rewards, arg, 0.5, rows=rows)
        loss.backward()
        assert torch.equal(lg.grad[1], torch.zeros(5)) and lg.grad[0].abs().sum() > 0
        full = logits.clone().requires_grad_(True)
        every, _ = loss_fn(torch.log_softmax(full, -1), torch.log_softmax(logits, -1), ref, rewards, arg, 0.5)
        every.backward()
        torch.testing.assert_close(lg.grad[[0, 2]], full.grad[[0, 2]])  # rows with a signal: unchanged
        assert float(stats["kl"]) > 0  # the KL stat still watches every row


def test_chit_chat_with_the_evidence_signal_moves_no_retriever_weight(tiny_models):
    """--retriever_signal evidence on targets without fact words: the pool's evidence is 0 for every
    story, so the posterior step's target is π_old, but only up to rounding; Adam scaled that noise
    (and then the KL's pull back to the reference) to full-size steps: kl/retriever grew 0 -> 0.2 in
    4 steps at β_r 0.01 (2e-5 at β_r 0). Rows without a fact now give no gradient at all."""
    torch.manual_seed(0)
    reader, retriever = load_models(tiny_models)
    opts = make_opts("--reader_rl_learning", "--use_grpo", "--grpo_train_retriever", "--grpo_retriever_pool_size", "6",
                     "--grpo_retriever_group_size", "1", "--retriever_signal", "evidence",
                     "--grpo_retriever_estimator", "posterior", "--grpo_retriever_target_temperature", "3",
                     "--grpo_retriever_temperature", "0.05", "--grpo_retriever_kl_coeff", "0.01", "--grpo_group_size", "2")
    model = LapdogModel(reader, retriever, opts, ref_reader=load_models(tiny_models)[0],
                        ref_retriever=load_models(tiny_models)[1])
    retrieval = knowledge_retrieval(sample_data()[2][:12], opts)
    chit = [ex for ex in sample_data()[0] if not retrieval.knowledge(ex["answers"][0])][:3]
    before = {k: v.clone() for k, v in retriever.state_dict().items()}
    opt = torch.optim.AdamW(retriever.parameters(), lr=1e-3, eps=1e-6, weight_decay=0.0)  # as src/run/optim.py
    for step in range(3):
        b = make_batch(chit, [ex["answers"][0] for ex in chit], reader, retrieval, retriever, opts,
                       random.Random(step), "cpu")
        assert not b.fact_mask.any()
        opt.zero_grad()
        loss, stats, rollout, _ = model("grpo_joint", b, step=step)
        loss.backward()
        opt.step()
        assert abs(stats["kl/retriever"]) < 1e-6 and not rollout["signal_rows"].any()  # (rounding of two forwards)
        assert stats["loss/retriever"] == 0.0
    assert all(torch.equal(v, before[k]) for k, v in retriever.state_dict().items())


@pytest.mark.parametrize("mode", ["emdr_seq", "ppmean"])  # the quickstart's LAPDOG arm, and a KL mode
def test_lapdog_on_chit_chat_gives_the_retriever_no_gradient(tiny_models, mode):
    """-log Σ_k π_k·p^0 is 0 only in exact arithmetic: its rounding noise had a gradient (1e-5), and
    the quickstart's LAPDOG arm moved its retriever by 2e-4 in 3 steps on data without fact words."""
    reader, retriever = load_models(tiny_models)
    opts = make_opts("--train_retriever", "--retriever_n_context", "4", "--retriever_signal", "evidence",
                     "--gold_score_mode", mode, "--temperature_gold", "3", "--temperature_score", "0.05")
    model = LapdogModel(reader, retriever.eval(), opts)
    retrieval = knowledge_retrieval(sample_data()[2][:12], opts)
    chit = [ex for ex in sample_data()[0] if not retrieval.knowledge(ex["answers"][0])][:3]
    b = make_batch(chit, [ex["answers"][0] for ex in chit], reader, retrieval, retriever, opts, random.Random(0), "cpu")
    loss = model._lapdog_retriever_objective(b, {})
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in retriever.parameters())
