"""Generation-based evaluation shared by train.py (in-loop) and evaluate.py.

Each rank generates for examples i ≡ rank (mod world); results are gathered and put back in input
order on rank 0, which writes one results file and computes the metrics with src/metrics.py.
Retrieval searches are collective, so every rank runs the same number of batches (ranks with
fewer examples search with empty batches).
"""

import json
import math
import os
import random

import torch
from tqdm import tqdm

from src import distributed
from src.data import eval_shard, interleave_results, reference_answer
from src.errors import UsageError
from src.index import recall_at_k
from src.lapdog import make_batch
from src.metrics import compute_metrics
from src.reader import dropout_disabled
from src.rewards import grpo_reward, reward_options


def output_paths(directory, step, name):
    """(results jsonl, metrics json) of evaluation `name` at `step`, the one naming of both entry
    points: `{directory}/step-{step}.{name}.results.jsonl` and `.metrics.json` beside it; the step
    in every name, so evaluations of different steps never overwrite each other. `step` None (a
    checkpoint folder not named step-N): `{name}` alone."""
    prefix = f"{name}" if step is None else f"step-{step}.{name}"
    return (os.path.join(directory, f"{prefix}.results.jsonl"), os.path.join(directory, f"{prefix}.metrics.json"))


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
    with dropout_disabled(reader):
        for i in tqdm(range(n_batches), desc=desc, disable=not info.is_main, leave=False):
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
                loss = reader(b.input_ids, b.attention_mask, b.labels)
                loss_sum, loss_n = loss_sum + loss.item() * len(exs), loss_n + len(exs)
                gens = reader.generate_text(b.input_ids, b.attention_mask, max_length=opts.generation_max_length,
                                            min_length=opts.generation_min_length, num_beams=opts.generation_num_beams)
            for j, ex, gen in zip(range(len(exs)), exs, gens):
                row = {"query": ex["question"], "answers": ex["answers"]}
                if gen is not None:
                    row["generation"] = gen
                if b.passages is not None:
                    row["passages"] = [{"id": p["id"], "title": p["title"], "score": float(s)}
                                       for p, s in zip(b.passages[j], b.retrieval_scores[j].tolist())]
                if ex.get("story_id") is not None:
                    row["story_id"] = ex["story_id"]
                rows.append(row)
    gathered = distributed.all_gather_objects((rows, loss_sum, loss_n))
    metrics = None
    if info.is_main and opts.retrieve_only:
        ordered = interleave_results([g[0] for g in gathered], len(examples))
        metrics = {"n": len(ordered), **retrieval_statistics(ordered, opts.retriever_n_context)}
        if results_path:
            _write_results(results_path, ordered, opts, metrics)
    elif info.is_main:
        ordered = interleave_results([g[0] for g in gathered], len(examples))
        metrics = compute_metrics([r["generation"] for r in ordered], [r["answers"][0] for r in ordered])
        total_n = sum(g[2] for g in gathered)
        gens, refs = [r["generation"] for r in ordered], [r["answers"][0] for r in ordered]
        metrics["reward"] = grpo_reward(gens, refs, **reward_options(opts))["reward"].mean().item()
        metrics["eval_loss"] = sum(g[1] for g in gathered) / max(total_n, 1)
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
    stats = {"retrieval/top1_score": sum(r["passages"][0]["score"] for r in rows) / max(len(rows), 1)}
    relevant = [r.get("story_id") for r in rows]
    if any(s is not None for s in relevant):
        retrieved = [[p["id"] for p in r["passages"]] for r in rows]
        stats["recall@1"] = 100 * recall_at_k(retrieved, relevant, 1)
        stats[f"recall@{k}"] = 100 * recall_at_k(retrieved, relevant, k)
    return stats
