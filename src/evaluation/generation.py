"""Generation-based evaluation shared by train.py (in-loop) and evaluate.py.

Each rank generates for examples i ≡ rank (mod world); results are gathered and put back in input
order on rank 0, which writes one results file and computes the metrics with src/evaluation/metrics.py.
Retrieval searches are collective, so every rank runs the same number of batches (ranks with
fewer examples search with empty batches).
"""

import contextlib
import json
import logging
import math
import os
import random
import sys

import torch
from tqdm import tqdm

from src.data.prompts import reference_answer, split_persona_context
from src.data.sampler import eval_shard, interleave_results
from src.evaluation.metrics import compute_metrics, copy_shares, per_example_scores
from src.infra import distributed
from src.infra.errors import UsageError
from src.model.reader import dropout_disabled
from src.objectives.rewards import grpo_reward, reward_options
from src.retrieval.index import recall_at_k
from src.run.batch import make_batch

log = logging.getLogger("lapdog.evaluation")


def output_paths(directory, step, name, tag=None):
    """(results jsonl, metrics json) of evaluation `name` at `step`, the one naming of both entry
    points: `{directory}/step-{step}.{name}.results.jsonl` and `.metrics.json` beside it, the step in
    every name, so evaluations of different steps never overwrite each other; `step` None (a
    checkpoint folder not named step-N): `{name}` alone. `tag` (evaluate.py's "evaluate", numbered
    "evaluate-2", ... by `unused_output_paths`) goes first: `{tag}-step-{step}.{name}...`, a name
    train.py's in-loop evaluations (always `step-N.*`) never write."""
    prefix = f"{name}" if step is None else f"step-{step}.{name}"
    if tag:
        prefix = f"{tag}.{name}" if step is None else f"{tag}-{prefix}"
    return (os.path.join(directory, f"{prefix}.results.jsonl"), os.path.join(directory, f"{prefix}.metrics.json"))


def unused_output_paths(directory, step, name, tag="evaluate"):
    """evaluate.py's output_paths: tagged `evaluate`, then `evaluate-2`, `evaluate-3`, ... until
    neither file exists, so an evaluation never overwrites another one (train.py's in-loop files,
    or an earlier evaluate.py run with other options)."""
    n = 1
    while True:
        paths = output_paths(directory, step, name, tag if n == 1 else f"{tag}-{n}")
        if not any(os.path.exists(p) for p in paths):
            return paths
        n += 1


def decoding_options(opts):
    """``FiDReader.generate_text``'s keyword options from the --generation_* flags: how evaluation and
    chat decode replies."""
    return dict(max_length=opts.generation_max_length, min_length=opts.generation_min_length,
                num_beams=opts.generation_num_beams, no_repeat_ngram=opts.generation_no_repeat_ngram_size,
                repetition_penalty=opts.generation_repetition_penalty, temperature=opts.generation_temperature,
                top_p=opts.generation_top_p)


@contextlib.contextmanager
def sampling_seeded(active, seed, device):
    """While ``active`` (sampled replies): torch's RNG seeded with ``seed``, so an evaluation samples
    the same replies every time, and restored afterwards, so an in-loop evaluation leaves training's
    random stream where it was."""
    if not active:
        yield
        return
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def reply_nll(reader, batch):
    """([B] summed NLL, [B] token count) of each gold reply, teacher-forced: its words and EOS, not
    the ``<extra_id_0>`` sentinel that starts every target (always first, it would flatter the
    perplexity). Also the batch's mean token NLL over all label tokens (``eval_loss``'s term)."""
    nll, valid = reader.label_nll(batch.input_ids, batch.attention_mask, batch.labels)
    batch_loss = nll.sum() / valid.sum()
    sentinel = reader.tokenizer.convert_tokens_to_ids("<extra_id_0>")
    reply = valid.clone()
    reply[:, 0] &= batch.labels[:, 0] != sentinel
    return (nll * reply).sum(1), reply.sum(1), batch_loss


def write_metrics(path, metrics, **about):
    """`{**about, "metrics": metrics}` as JSON (what was evaluated, and its numbers), atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({**about, "metrics": metrics}, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


@torch.no_grad()
def evaluate(model, retrieval, examples, opts, info, results_path=None, desc="eval", metrics_path=None, about=None):
    """Metrics dict (same on every rank); writes results_path (jsonl, input order) when given, and
    metrics_path (`write_metrics`, with the `about` fields) when given."""
    reader, retriever = model.reader, model.retriever
    mine = eval_shard(len(examples), info.rank, info.world)
    bs = opts.per_gpu_eval_batch_size
    n_batches = max(math.ceil(len(eval_shard(len(examples), r, info.world)) / bs) for r in range(info.world))
    rng = random.Random(opts.seed)
    rows, loss_sum, loss_n = [], 0.0, 0
    with dropout_disabled(reader), sampling_seeded(opts.generation_temperature > 0, opts.seed + info.rank, info.device):
        # no bar where stderr is not a terminal (a log file would get every redraw)
        for i in tqdm(range(n_batches), desc=desc, disable=not info.is_main or not sys.stderr.isatty(), leave=False):
            idx = mine[i * bs:(i + 1) * bs]
            exs = [examples[j] for j in idx]
            answers = [reference_answer(ex) for ex in exs]
            if not exs:
                if retrieval is not None:  # keep the collective search in step with the other ranks
                    retrieval.search(retriever, [], opts.retriever_n_context)
                continue
            b = make_batch(exs, answers, reader, retrieval, retriever, opts, rng, info.device, train=False)
            if opts.retrieve_only:  # (the reader only tokenized the batch)
                gens = [None] * len(exs)
            else:
                nll, tokens, loss = reply_nll(reader, b)
                loss_sum, loss_n = loss_sum + loss.item() * len(exs), loss_n + len(exs)
                gens = reader.generate_text(b.input_ids, b.attention_mask, **decoding_options(opts))
            for j, ex, gen in zip(range(len(exs)), exs, gens):
                row = {"query": ex["question"], "answers": ex["answers"]}
                if gen is not None:
                    row["generation"] = gen
                    row["reply_nll"], row["reply_tokens"] = float(nll[j]), int(tokens[j])
                if b.passages is not None:
                    row["passages"] = [{"id": p["id"], "title": p["title"], "score": float(s) if math.isfinite(s) else None}
                                       for p, s in zip(b.passages[j], b.retrieval_scores[j].tolist())]
                    if not opts.closed_book:  # the stories the reader was given (for copy_story)
                        row["fused_texts"] = [f"{p.get('title') or ''} {p['text']}" for p in b.passages[j][:opts.n_context]]
                if ex.get("story_id") is not None:
                    row["story_id"] = ex["story_id"]
                rows.append(row)
    gathered = distributed.all_gather_objects((rows, loss_sum, loss_n))
    metrics = None
    if info.is_main and opts.retrieve_only:
        ordered = interleave_results([g[0] for g in gathered], len(examples))
        for r in ordered:
            r.pop("fused_texts", None)
        metrics = {"n": len(ordered), **retrieval_statistics(ordered, opts.retriever_n_context)}
        if results_path:
            _write_results(results_path, ordered, opts, metrics)
    elif info.is_main:
        ordered = interleave_results([g[0] for g in gathered], len(examples))
        gens, refs = [r["generation"] for r in ordered], [r["answers"][0] for r in ordered]
        per = per_example_scores(gens, refs)  # per example, for paired comparisons of two runs (research/study)
        metrics = compute_metrics(gens, refs, per)
        if ordered and not any(r["generation"].strip() for r in ordered):
            log.warning(f"warning: {desc}: every generated reply is empty ({len(ordered)} examples): the "
                        "metrics are those of empty replies — check the checkpoint (a reader that emits EOS "
                        "first) and --generation_min_length")
        total_n = sum(g[2] for g in gathered)
        rewards = grpo_reward(gens, refs, **reward_options(opts))["reward"].tolist()
        metrics["reward"] = sum(rewards) / max(len(rewards), 1)
        fused = [r.pop("fused_texts", []) for r in ordered]
        if opts.task != "mlm":  # an MLM prompt is a text with no persona, its target spans of that text
            personas = [split_persona_context(r["query"])[0] for r in ordered]
            metrics.update(copy_shares(gens, personas, fused if any(fused) else None))
        for r, f1, rouge_l, reward in zip(ordered, per["f1"], per["rougeL"], rewards):
            r["f1"], r["rougeL"], r["reward"] = f1, rouge_l, reward
        metrics["eval_loss"] = sum(g[1] for g in gathered) / max(total_n, 1)
        # per-token perplexity of the gold replies (ConvAI2's metric; a constant reply cannot game it)
        mean_nll = sum(r["reply_nll"] for r in ordered) / max(1, sum(r["reply_tokens"] for r in ordered))
        metrics["ppl"] = math.exp(mean_nll) if mean_nll < 700 else float("inf")
        if retrieval is not None:
            metrics.update(retrieval_statistics(ordered, opts.retriever_n_context))
        if results_path:
            _write_results(results_path, ordered, opts, metrics)
        if metrics_path:
            write_metrics(metrics_path, metrics, n_examples=len(examples), results=results_path, **(about or {}))
    return distributed.broadcast_object(metrics)


def _write_results(path, ordered, opts, metrics):
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            for r in ordered:
                if opts.dont_write_passages:
                    r = {k: v for k, v in r.items() if k != "passages"}
                f.write(json.dumps(r) + "\n")
    except OSError as exc:
        # The generations took long to compute: at least the metrics reach the user.
        raise UsageError(f"{path}: cannot write the results ({exc.strerror}) — metrics: "
                         f"{json.dumps(metrics)}") from None


def retrieval_statistics(rows, k):
    """Mean top-1 score and, where examples record their relevant story, recall@1 and recall@k."""
    top1 = [r["passages"][0]["score"] for r in rows if r["passages"][0]["score"] is not None]
    stats = {"retrieval/top1_score": sum(top1) / len(top1)} if top1 else {}  # none for random stories
    relevant = [r.get("story_id") for r in rows]
    if any(s is not None for s in relevant):
        retrieved = [[p["id"] for p in r["passages"]] for r in rows]
        stats["recall@1"] = 100 * recall_at_k(retrieved, relevant, 1)
        stats[f"recall@{k}"] = 100 * recall_at_k(retrieved, relevant, k)
    return stats
