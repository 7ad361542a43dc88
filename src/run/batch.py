"""One micro-batch's inputs: texts, retrieved stories and reader tensors (``make_batch``).

Built outside the DDP-wrapped forward because retrieval (an index search, and with
--query_side_retriever_training the read-back of the stories' stored embeddings) is a collective."""

import torch

from src.data.prompts import encoder_inputs, reader_prompt, reader_query, reader_target
from src.objectives.schedule import augments_candidates, training_kind


class Batch(dict):
    """A plain dict with attribute access (texts, passages, tensors of one micro-batch).

    A missing attribute raises AttributeError, not KeyError, so ``getattr(b, name, default)``,
    ``hasattr`` and copy/pickle behave as for any object.
    """

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"this batch has no {name!r} (it holds {sorted(self)})") from None


def make_batch(examples, answers, reader, retrieval, retriever, opts, rng, device, train=True, step=0):
    """Texts, retrieved stories and reader tensors for a micro-batch (retrieval is collective).
    ``step``: the optimizer step the batch is for (candidate augmentation depends on it)."""
    queries = [reader_prompt(ex) for ex in examples]
    b = Batch(queries=queries, answers=answers, examples=examples, passages=None, retrieval_queries=None)
    b["labels"] = reader.tokenize_targets([reader_target(a) for a in answers], opts.target_maxlength).to(device)
    posterior = train and opts.posterior_passages and training_kind(opts, 0) in ("sft", "lapdog")
    if retrieval is not None and not (posterior and opts.n_context == 1 and not opts.train_retriever):
        b["retrieval_queries"] = retrieval.query_texts(examples, rng)
        k = opts.grpo_retriever_pool_size if (train and opts.grpo_train_retriever) else opts.retriever_n_context
        passages, scores, rows = retrieval.search(retriever, b["retrieval_queries"], k)
        if not train and opts.eval_stories == "random":  # the ablation: as many random corpus stories
            passages, rows = retrieval.augment(passages, rows, 1.0, rng, mode="replace_bottom")
            scores = torch.full_like(scores, float("nan"))  # the retriever did not choose them
        if augments_candidates(opts, step, train):
            passages, rows = retrieval.augment(passages, rows, opts.add_random_retrieval, rng,
                                               mode=opts.add_random_retrieval_mode)
        b["passages"], b["retrieval_scores"] = passages, scores
        if train and opts.query_side_retriever_training:
            # [B, M, H]: the frozen passage side's embeddings of the pool, as the index stores them
            # (it was built with that encoder), so the pool scores need no story re-encoded
            b["passage_embeddings"] = retrieval.passage_embeddings(rows).to(device)
    if train and getattr(retrieval, "knowledge", None) is not None:
        b["knowledge"] = [retrieval.knowledge(a) for a in answers]  # the original targets' fact-like words
        if opts.retriever_signal == "evidence":  # their tokens in the (original) labels
            b["fact_mask"] = reader.word_mask([reader_target(a) for a in answers], b.knowledge, opts.target_maxlength)
    if train and opts.grpo_train_retriever:
        return b  # joint GRPO builds one reader input per sampled story itself
    n_ctx = 1 if opts.closed_book else opts.n_context
    fused = b["passages"] or [None] * len(queries)
    reader_queries = queries
    if posterior:  # the story that best explains each target reply goes first (src/data/posterior.py)
        reader_queries, targets, stories = _posterior_inputs(examples, answers, retrieval, opts, rng)
        fused = [[story] + list(ps or [])[: n_ctx - 1] for story, ps in zip(stories, fused)]
        if targets != answers:  # facts swapped: the reader's targets change, gold scores keep the originals
            b["gold_labels"] = b["labels"]
            b["labels"] = reader.tokenize_targets([reader_target(a) for a in targets], opts.target_maxlength).to(device)
    texts = [encoder_inputs(q, ps, n_ctx, opts.encoder_format) for q, ps in zip(reader_queries, fused)]
    ids, mask = reader.tokenize_inputs(texts, opts.text_maxlength)
    b["input_ids"], b["attention_mask"] = ids.to(device), mask.to(device)
    return b


def _posterior_inputs(examples, answers, retrieval, opts, rng):
    """(reader queries, targets, posterior stories), with --posterior_fact_swap applied."""
    out = []
    for ex, a in zip(examples, answers):
        story, question = retrieval.posterior.best(a), ex["question"]
        if opts.posterior_fact_swap > 0 and rng.random() < opts.posterior_fact_swap:
            question, a, story = retrieval.fact_swap(question, a, story, rng)
        out.append((reader_query(question), a, story))
    queries, targets, stories = (list(x) for x in zip(*out))
    return queries, targets, stories
