"""The original LAPDOG modes as the original computes them (lapdog-behaviour.md)."""

import math

import pytest
import torch
from helpers import examples_with_story, make_opts, retrieval_batch

from src.cli import options
from src.model.gold_scores import cross_attention_story_scores, gold_scores
from src.model.lapdog import LapdogModel
from src.model.reader import FiDReader
from src.objectives import lapdog_losses


def test_lapdog_kl_mean_is_torchs_kldivloss_mean():
    target = torch.log_softmax(torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]]), -1)
    score = torch.log_softmax(torch.tensor([[0.0, 1.0, 0.0], [1.0, -1.0, 0.0]]), -1)
    kl_per_example = (target.exp() * (target - score)).sum(-1)  # hand KL(target ‖ score) per row
    original = torch.nn.KLDivLoss()(score, target.exp())  # reduction 'mean': over all 2·3 terms
    torch.testing.assert_close(lapdog_losses.lapdog_kl_loss(target, score), original)
    torch.testing.assert_close(lapdog_losses.lapdog_kl_loss(target, score), kl_per_example.sum() / 6)
    torch.testing.assert_close(lapdog_losses.lapdog_kl_loss(target, score, "batchmean"), kl_per_example.mean())
    with pytest.raises(ValueError):
        lapdog_losses.lapdog_kl_loss(target, score, "sum")


def test_evalnormsum_is_normalized_as_the_original(lapdog_setup):  # noqa: F811
    """Σ_layers Σ_reply tokens Σ_story tokens head-mean(attention·||v||) / (256 · n_layers · reply tokens)."""
    reader, retriever, stories = lapdog_setup
    opts = make_opts("--retriever_n_context", "2", "--n_context", "2")
    model = LapdogModel(reader, retriever, opts)
    batch = retrieval_batch(model, examples_with_story("train", 2), stories)
    from src.data.prompts import encoder_inputs
    texts = [encoder_inputs(q, plist, 2, opts.encoder_format) for q, plist in zip(batch.queries, batch.passages)]
    ids, mask = reader.tokenize_inputs(texts, opts.text_maxlength)
    with torch.no_grad():
        ours = cross_attention_story_scores(reader, ids, mask, batch.labels)
        # the original's arrangement: per layer the head-mean of ||v||·attention, masked, summed
        hidden, fmask = reader.encode(ids, mask)
        t5 = reader.model
        previous = t5.config._attn_implementation
        t5.set_attn_implementation("eager")
        from transformers.modeling_outputs import BaseModelOutput
        out = t5(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=fmask,
                 labels=batch.labels, output_attentions=True, return_dict=True)
        t5.set_attn_implementation(previous)
        B, N, L = ids.shape
        total = torch.zeros(B, N * L)
        for block, attn in zip(t5.decoder.block, out.cross_attentions):
            xa = block.layer[1].EncDecAttention
            v = xa.v(hidden).view(B, N * L, xa.n_heads, xa.key_value_proj_dim).transpose(1, 2)  # [B, h, S, d]
            norms = (v.norm(dim=-1)[:, :, None] * attn).mean(1)  # [B, T, S]
            norms = norms.masked_fill((batch.labels == -100)[:, :, None], 0.0)
            total += norms.sum(1)
        n_tgt = (batch.labels != -100).sum(1, keepdim=True)
        n_layers = len(t5.decoder.block)
        expected = (total * fmask).view(B, N, L).sum(-1) / (256 * n_layers * n_tgt)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-4)
    assert ours.sum(-1).max() < 1.0  # near-uniform softmax(g/τ_g) at the paper's τ_g = 0.85


def test_gold_score_replies_use_the_generation_options(lapdog_setup, monkeypatch):  # noqa: F811
    reader, retriever, stories = lapdog_setup
    opts = make_opts("--train_retriever", "--gold_score_mode", "bleudist", "--retriever_n_context", "2",
                     "--generation_num_beams", "3", "--generation_min_length", "2")
    model = LapdogModel(reader, retriever, opts)
    batch = retrieval_batch(model, examples_with_story("train", 2), stories)
    seen = []

    def fake_generate_text(self, ids, mask, max_length, min_length=0, num_beams=1):
        seen.append((max_length, min_length, num_beams))
        return ["hello"] * ids.shape[0]
    monkeypatch.setattr(FiDReader, "generate_text", fake_generate_text)
    gold_scores("bleudist", reader, batch.queries, batch.passages, batch.labels, batch.answers, opts)
    assert seen == [(opts.generation_max_length, 2, 3)]


@pytest.mark.parametrize("flags, warned", [
    (["--train_retriever"], True),
    (["--train_retriever", "--refresh_index", "100"], False),
    (["--train_retriever", "--query_side_retriever_training"], False),
    (["--reader_rl_learning", "--use_grpo", "--grpo_train_retriever"], True),
    ([], False),
])
def test_stale_index_warning(flags, warned):
    lines = options.warnings(make_opts(*flags))
    assert bool(lines) == warned
    if warned:
        assert lines[0].startswith("warning: --refresh_index: ") and " — " in lines[0]


def _retrieval(n_corpus=100, *flags):
    from src.infra.distributed import DistInfo
    from src.retrieval.stories import StoryRetrieval
    corpus = [{"id": f"c{i}", "title": "t", "text": "x"} for i in range(n_corpus)]
    opts = make_opts("--retriever_n_context", "5", *flags)
    return StoryRetrieval(corpus, opts, DistInfo(0, 1, 0, torch.device("cpu"))), opts


def test_add_random_original_puts_int_kf_random_first_then_draws_with_replacement():
    import random
    retrieval, _ = _retrieval()
    retrieved = [[{"id": f"r{i}", "title": "t", "text": "y"} for i in range(5)] for _ in range(50)]
    out = retrieval.add_random(retrieved, 0.3, random.Random(0), mode="original")
    # K·f = 1.5: int gives 1 random story (banker's round would give 2), then 4 from the retrieved list
    for row in out:
        assert len(row) == 5 and row[0]["id"].startswith("c") and all(p["id"].startswith("r") for p in row[1:])
    assert any(len({p["id"] for p in row[1:]}) < 4 for row in out)  # with replacement: repeats occur
    half = retrieval.add_random(retrieved[:20], 0.5, random.Random(1), mode="original")
    assert all(row[0]["id"] != row[1]["id"] and row[1]["id"].startswith("c") for row in half)  # 2 distinct


def test_add_random_replace_bottom_keeps_rank_order():
    import random
    retrieval, _ = _retrieval()
    retrieved = [[{"id": f"r{i}", "title": "t", "text": "y"} for i in range(5)]]
    out = retrieval.add_random(retrieved, 0.3, random.Random(0), mode="replace_bottom")[0]
    assert [p["id"] for p in out[:3]] == ["r0", "r1", "r2"]  # round(1.5) = 2 replaced at the bottom
    assert all(p["id"].startswith("c") for p in out[3:]) and out[3]["id"] != out[4]["id"]


@pytest.mark.parametrize("flags, step, expected", [
    (["--train_retriever"], 0, True),
    (["--train_retriever", "--freeze_retriever_steps", "3"], 2, False),
    (["--train_retriever", "--freeze_retriever_steps", "3"], 3, True),
    ([], 0, False),  # stage 2 without a trained retriever: the original never augments
    (["--reader_rl_learning", "--use_grpo"], 0, False),
    (["--add_random_retrieval_mode", "replace_bottom"], 0, True),
])
def test_add_random_original_only_while_lapdog_trains_the_retriever(flags, step, expected):
    from src.objectives.schedule import augments_candidates
    opts = make_opts("--add_random_retrieval", "0.2", *flags)
    assert augments_candidates(opts, step, train=True) is expected
    assert augments_candidates(opts, step, train=False) is False


def test_emdr_token_loss_hand_values():
    # one example, K = 2 stories, T = 2 tokens (the second is padding)
    # token probs: story 0 -> 0.5, story 1 -> 0.1; π = (0.25, 0.75): mix = 0.125 + 0.075 = 0.2
    token_logp = torch.log(torch.tensor([[[0.5, 0.9], [0.1, 0.9]]]))
    score_logp = torch.log(torch.tensor([[0.25, 0.75]])).requires_grad_(True)
    loss = lapdog_losses.emdr_token_loss(token_logp, score_logp, torch.tensor([[1, 0]]))
    assert loss.item() == pytest.approx(-math.log(0.2))
    loss.backward()
    # d/d log π_k of −log Σ π p = −π_k p_k / Σ: −0.125/0.2, −0.075/0.2
    torch.testing.assert_close(score_logp.grad, torch.tensor([[-0.625, -0.375]]))


def test_emdr_mixes_per_token_over_tau_gold(lapdog_setup):  # noqa: F811
    """The lapdog objective with emdr equals the original's formula from the model's full logits."""
    reader, retriever, stories = lapdog_setup
    opts = make_opts("--train_retriever", "--gold_score_mode", "emdr", "--retriever_n_context", "3",
                     "--n_context", "2", "--temperature_gold", "0.5", "--temperature_score", "0.8", "--fix_reader")
    model = LapdogModel(reader, retriever, opts)
    model.eval()
    batch = retrieval_batch(model, examples_with_story("train", 2), stories)
    loss, _, _, _ = model("lapdog", batch)
    from src.data.prompts import encoder_inputs
    with torch.no_grad():
        texts = [encoder_inputs(q, [p], 1, opts.encoder_format) for q, plist in zip(batch.queries, batch.passages)
                 for p in plist]
        ids, mask = reader.tokenize_inputs(texts, opts.text_maxlength)
        labels = batch.labels.repeat_interleave(3, 0)
        logits = reader.model(input_ids=ids[:, 0], attention_mask=mask[:, 0], labels=labels).logits
        gold = torch.log_softmax(logits / 0.5, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0].view(2, 3, -1)
        score = torch.log_softmax(model._retriever_pool_logits(batch.retrieval_queries, batch.passages, 0.8), -1)
        real = batch.labels != -100
        expected = -(torch.logsumexp(gold + score[..., None], 1) * real).sum() / real.sum()
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)


def test_retrieve_with_rerank_reorders_a_stale_index_by_fresh_embeddings(tiny_models):
    """The index is built, then the retriever moves: plain search returns the stale top-k, rerank
    over the whole corpus returns the current retriever's exact top-k."""
    from helpers import sample_data

    from src.data.prompts import retriever_passage_text
    from src.infra.distributed import DistInfo
    from src.model.retriever import Retriever
    from src.retrieval.stories import StoryRetrieval
    train, _, stories = sample_data()
    corpus = stories[:24]
    retriever = Retriever.from_pretrained(tiny_models["retriever"])
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    plain_opts = make_opts("--retriever_n_context", "4", "--max_passages", "24")
    rerank_opts = make_opts("--retriever_n_context", "4", "--retrieve_with_rerank",
                            "--n_to_rerank_with_retrieve_with_rerank", "24")
    plain, rerank = StoryRetrieval(corpus, plain_opts, info), StoryRetrieval(corpus, rerank_opts, info)
    plain.build(retriever)
    rerank.build(retriever)
    torch.manual_seed(0)
    with torch.no_grad():  # "training" moves the encoder after the index was built
        for prm in retriever.encoder.encoder.layer[-1].parameters():
            prm.add_(torch.randn_like(prm) * 0.5)
    queries = [ex["question"] for ex in train[:6]]
    q = retriever.embed_texts(queries, batch_size=8, max_length=64)
    p = retriever.embed_texts([retriever_passage_text(x, plain_opts.retriever_format) for x in corpus],
                              batch_size=8, max_length=plain_opts.retriever_maxlength)
    fresh = (q @ p.T).topk(4, dim=1)
    _, stale_scores, stale_rows = plain.search(retriever, queries, 4)
    _, scores, rows = rerank.search(retriever, queries, 4)
    assert torch.equal(rows, fresh.indices)
    torch.testing.assert_close(scores, fresh.values, atol=1e-4, rtol=1e-4)
    assert not torch.equal(stale_rows, rows)


def test_rerank_needs_enough_candidates():
    from src.infra.errors import UsageError
    with pytest.raises(UsageError, match="--n_to_rerank_with_retrieve_with_rerank"):
        make_opts("--retriever_n_context", "5", "--retrieve_with_rerank", "--n_to_rerank_with_retrieve_with_rerank", "3")


# Every option name of the original LAPDOG options.py (an Atlas fork).
ORIGINAL_OPTIONS = [
    "accumulation_steps", "add_null_retrieval", "add_random_retrieval", "alpha", "beta2", "checkpoint_dir",
    "clip", "closed_book", "compute_crossattention_stats", "decoder_format", "decoder_prompt_format",
    "dont_add_bos", "dont_write_passages", "dropout", "encoder_format", "epsilon", "eval_data", "eval_freq",
    "faiss_code_size", "faiss_index_type", "filtering_overretrieve_ratio", "fix_reader",
    "freeze_retriever_steps", "generation_length_penalty", "generation_max_length", "generation_min_length",
    "generation_num_beams", "gold_score_mode", "index_mode", "load_index_path", "load_reader_weights_only",
    "local_rank", "log_freq", "lr", "lr_retriever", "main_port", "max_lm_context_ratio", "max_passages",
    "metric_scale_factors", "min_lm_context_ratio", "min_words_per_lm_instance", "mlm_mean_noise_span_length",
    "mlm_noise_density", "model_path", "multiple_choice_eval_permutations", "multiple_choice_num_options",
    "multiple_choice_train_permutations", "n_context", "n_to_rerank_with_retrieve_with_rerank", "name",
    "passages", "per_gpu_batch_size", "per_gpu_embedder_batch_size", "per_gpu_eval_batch_size", "precision",
    "qa_prompt_format", "query_side_retriever_training", "reader_causallm", "reader_model_type",
    "reader_rl_learning", "refresh_index", "retrieve_only", "retrieve_with_rerank", "retriever_format",
    "retriever_from", "retriever_model_path", "retriever_n_context", "save_freq", "save_index_n_shards",
    "save_index_path", "save_optimizer", "scale_rouge", "scheduler", "scheduler_steps", "seed", "shard_grads",
    "shard_optim", "shuffle", "story_label", "target_maxlength", "task", "temperature_gold",
    "temperature_score", "text_maxlength", "total_steps", "train_data", "train_retriever", "use_file_passages",
    "use_gradient_checkpoint_reader", "use_gradient_checkpoint_retriever", "warmup_steps", "weight_decay",
    "write_results",
]


def test_every_original_option_is_accepted_or_refused_in_one_line():
    from src.infra.errors import UsageError
    parser = options.build_parser()
    known = {s[2:] for a in parser._actions for s in a.option_strings if s.startswith("--")}
    assert set(ORIGINAL_OPTIONS) <= known | {"local_rank"}
    make_opts("--save_optimizer", "--alpha", "1.0", "--filtering_overretrieve_ratio", "2", "--task", "qa")
    assert make_opts("--task", "mlm", "--mlm_noise_density", "0.3").mlm_noise_density == 0.3  # Atlas's MLM task runs
    for name, value in [("alpha", "0.5"), ("main_port", "12345"), ("reader_causallm", "llama"),
                        ("min_lm_context_ratio", "0.3"), ("use_file_passages", None)]:
        args = [f"--{name}"] + ([value] if value is not None else [])
        with pytest.raises(UsageError, match=f"--{name}: is not implemented: .* — drop it"):
            make_opts(*args)
    with pytest.raises(UsageError, match="--task: causal_chat"):
        make_opts("--task", "causal_chat")
    with pytest.raises(UsageError, match="--retriever_from: forward"):
        make_opts("--retriever_from", "forward")


def test_adamw_beta2_epsilon_and_scheduler_steps_are_used():
    from src.run.optim import make_optimizer
    opts = make_opts("--beta2", "0.98", "--epsilon", "1e-7", "--scheduler_steps", "10", "--total_steps", "100",
                     "--warmup_steps", "0")
    param = torch.nn.Parameter(torch.zeros(2))
    opt, sched = make_optimizer([param], 1.0, opts)
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-7
    for _ in range(5):
        opt.step(), sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.5)  # linear decay over 10 steps, not 100


def test_retrieve_only_evaluates_retrieval_without_running_the_reader(lapdog_setup, monkeypatch, tmp_path):  # noqa: F811
    import json

    from helpers import BruteForceRetrieval

    from src.evaluation.generation import evaluate
    from src.infra.distributed import DistInfo
    reader, retriever, stories = lapdog_setup
    opts = make_opts("--retrieve_only", "--retriever_n_context", "3", "--per_gpu_eval_batch_size", "2")
    model = LapdogModel(reader, retriever, opts)

    def never(*args, **kwargs):
        raise AssertionError("the reader ran")
    monkeypatch.setattr(FiDReader, "generate_text", never)
    monkeypatch.setattr(FiDReader, "forward", never)
    examples = examples_with_story("valid", 3)
    path = tmp_path / "r.jsonl"
    metrics = evaluate(model, BruteForceRetrieval(stories, opts), examples, opts, DistInfo(0, 1, 0, torch.device("cpu")),
                       results_path=str(path))
    assert metrics["n"] == 3 and {"retrieval/top1_score", "recall@1", "recall@3"} <= set(metrics)
    rows = [json.loads(line) for line in open(path)]
    assert len(rows) == 3 and all("generation" not in r and len(r["passages"]) == 3 for r in rows)


def test_retrieve_only_is_refused_by_train_py_and_without_retrieval(capsys):
    from helpers import run_entry

    from src.infra.errors import UsageError
    assert run_entry("train.py", ["--retrieve_only", "--passages", "x"]) == 2
    assert "error: --retrieve_only: is an evaluation mode" in capsys.readouterr().err
    with pytest.raises(UsageError, match="--retrieve_only: needs retrieval"):
        make_opts("--retrieve_only", "--closed_book")
