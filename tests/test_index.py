import json
import logging
import math
import os
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open

from src.infra.errors import UsageError
from src.retrieval import index as index_module
from src.retrieval.index import (
    PassageIndex,
    RefreshSchedule,
    build_index,
    default_nlist,
    faiss_placement,
    import_faiss,
    recall_at_k,
    shard_bounds,
)

DIM, K = 16, 7
# Per-rank query counts for successive collective searches: unequal, zero on one rank, all zero.
QUERY_SPLITS = [(5, 0), (3, 7), (0, 0), (0, 4)]


def _corpus(n=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, DIM, generator=g), torch.randn(11, DIM, generator=g)


def _clustered(n, dim, n_clusters, n_queries, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_clusters, dim, generator=g) * 3
    x = centers[torch.randint(n_clusters, (n,), generator=g)] + torch.randn(n, dim, generator=g)
    q = centers[torch.randint(n_clusters, (n_queries,), generator=g)] + torch.randn(n_queries, dim, generator=g)
    return x, q


def test_shard_bounds_contiguous_and_balanced():
    for n in (0, 1, 5, 101):
        for world in (1, 2, 3, 8):
            bounds = [shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [e - s for s, e in bounds]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        shard_bounds(10, 2, 2)


def test_flat_and_faiss_flat_agree_and_match_bruteforce():
    corpus, queries = _corpus()
    flat = PassageIndex(DIM).build(corpus)
    ff = PassageIndex(DIM, mode="faiss", faiss_index_type="flat").build(corpus)
    s1, i1 = flat.search(queries, K)
    s2, i2 = ff.search(queries, K)
    assert i1.dtype == torch.long and s1.dtype == torch.float32 and i1.shape == (11, K)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(s1, s2, atol=1e-4, rtol=1e-5)
    exact = torch.topk(queries @ corpus.T, K)
    assert torch.equal(i1, exact.indices)


@pytest.mark.parametrize("mode", ["flat", "faiss"])
def test_search_local_pads_and_offsets(mode):
    corpus, queries = _corpus(n=4)
    idx = PassageIndex(DIM, mode=mode).build(corpus, start=10, n_total=20)
    assert (idx.start, idx.n_local, idx.n_total) == (10, 4, 20)
    scores, ids = idx.search_local(queries[:3], 6)
    assert ids.shape == (3, 6)
    assert set(ids[:, :4].flatten().tolist()) <= {10, 11, 12, 13}
    assert (ids[:, 4:] == -1).all() and torch.isinf(scores[:, 4:]).all()
    empty = PassageIndex(DIM, mode=mode).build(torch.empty(0, DIM), start=20, n_total=20)
    s, i = empty.search_local(queries[:2], 3)
    assert (i == -1).all() and (s == float("-inf")).all()
    s, i = idx.search_local(queries[:0], 3)
    assert s.shape == (0, 3) and i.shape == (0, 3)


def _dist_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        corpus, queries = _corpus()
        tiny_corpus, _ = _corpus(n=5, seed=1)
        results = {}
        for mode in ("flat", "faiss"):
            for name, data, k in (("big", corpus, K), ("tiny", tiny_corpus, 8)):
                lo, hi = shard_bounds(len(data), rank, world)
                idx = PassageIndex(DIM, mode=mode, faiss_index_type="flat")
                idx.build(data[lo:hi], start=lo, n_total=len(data))
                for j, split in enumerate(QUERY_SPLITS):
                    mine = queries[sum(split[:rank]):sum(split[:rank + 1])]
                    results[f"{mode}/{name}/{j}"] = idx.search(mine, k)
                for j, rows in enumerate(LOOKUPS[rank]):  # collective: every rank, unequal sizes
                    results[f"lookup/{mode}/{name}/{j}"] = idx.lookup(rows % len(data))
                try:  # a row out of range on one rank: every rank raises, none hangs
                    idx.lookup(torch.tensor([len(data)]) if rank == 0 else torch.tensor([0]))
                except ValueError:
                    results[f"lookup/{mode}/{name}/refused"] = torch.tensor(1)
                if mode == "flat" and name == "big":
                    idx.save(os.path.join(out_dir, "saved"), n_shards=3)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


# Rows each rank reads back in successive collective lookups (taken modulo the corpus size).
LOOKUPS = [[torch.tensor([[0, 100, 50], [51, 3, 99]]), torch.zeros(0, dtype=torch.long), torch.tensor([7])],
           [torch.zeros(0, 4, dtype=torch.long), torch.tensor([[100], [0]]), torch.arange(101)]]


def test_two_process_search_equals_single_process(tmp_path):
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    corpus, queries = _corpus()
    tiny_corpus, _ = _corpus(n=5, seed=1)
    for mode in ("flat", "faiss"):
        for name, data, k in (("big", corpus, K), ("tiny", tiny_corpus, 8)):
            single = PassageIndex(DIM, mode=mode).build(data)
            for j, split in enumerate(QUERY_SPLITS):
                want_s, want_i = single.search(queries[:sum(split)], k)
                got = [per_rank[r][f"{mode}/{name}/{j}"] for r in range(2)]
                assert [g[1].shape[0] for g in got] == list(split)
                got_s = torch.cat([g[0] for g in got])
                got_i = torch.cat([g[1] for g in got])
                assert torch.equal(got_i, want_i), (mode, name, j)
                torch.testing.assert_close(got_s, want_s, atol=1e-4, rtol=1e-5)
            for rank in range(2):  # the stored rows, bit for bit, whichever rank holds them
                for j, rows in enumerate(LOOKUPS[rank]):
                    got = per_rank[rank][f"lookup/{mode}/{name}/{j}"]
                    assert torch.equal(got, data[rows % len(data)]), (mode, name, rank, j)
                assert f"lookup/{mode}/{name}/refused" in per_rank[rank]
    # the collective save from 2 ranks into 3 shards: pieces cut at the rank boundary (51)
    meta = json.loads((tmp_path / "saved" / "meta.json").read_text())
    assert [(f["start"], f["end"]) for f in meta["files"]] == [(0, 34), (34, 51), (51, 68), (68, 101)]
    loaded = PassageIndex.load(str(tmp_path / "saved"))
    torch.testing.assert_close(loaded._embeddings, corpus)


def test_save_load_round_trip_shards_hold_only_their_rows(tmp_path):
    corpus, queries = _corpus(n=10)
    idx = PassageIndex(DIM).build(corpus)
    path = tmp_path / "index"
    idx.save(str(path), n_shards=3)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["n_total"] == 10 and meta["dim"] == DIM and meta["mode"] == "flat"
    assert len(meta["files"]) == 3
    for f in meta["files"]:
        with safe_open(str(path / f["file"]), "pt") as fh:
            rows = fh.get_tensor("embeddings")
            assert fh.metadata() == {"start": str(f["start"]), "end": str(f["end"])}
        assert rows.shape == (f["end"] - f["start"], DIM)
        torch.testing.assert_close(rows, corpus[f["start"]:f["end"]])
    one = PassageIndex.load(str(path))
    torch.testing.assert_close(one._embeddings, corpus)
    assert torch.equal(one.search(queries, 3)[1], idx.search(queries, 3)[1])
    for world in (2, 4):
        parts = []
        for rank in range(world):
            part = PassageIndex.load(str(path), rank=rank, world=world, mode="faiss",
                                     faiss_index_type="flat")
            lo, hi = shard_bounds(10, rank, world)
            assert (part.start, part.n_local, part.n_total) == (lo, hi - lo, 10)
            assert part.mode == "faiss"
            parts.append(part._embeddings)
        torch.testing.assert_close(torch.cat(parts), corpus)
    # a later save with fewer shards removes the stale shard files
    idx.save(str(path), n_shards=1)
    assert sorted(p for p in os.listdir(path) if p.endswith(".safetensors")) == \
        ["embeddings.000000000-000000010.safetensors"]


def test_load_errors(tmp_path):
    with pytest.raises(UsageError, match="^--load_index_path: no index folder"):
        PassageIndex.load(str(tmp_path / "nope"))
    (tmp_path / "half").mkdir()
    with pytest.raises(UsageError, match="no meta.json"):
        PassageIndex.load(str(tmp_path / "half"))
    PassageIndex(DIM).build(torch.randn(6, DIM)).save(str(tmp_path / "ok"), n_shards=2)
    os.remove(tmp_path / "ok" / "embeddings.000000003-000000006.safetensors")
    with pytest.raises(UsageError, match="missing shard file"):
        PassageIndex.load(str(tmp_path / "ok"), rank=1, world=2)
    assert PassageIndex.load(str(tmp_path / "ok"), rank=0, world=2).n_local == 3  # reads only its file


def test_bad_faiss_options():
    with pytest.raises(UsageError, match="^--faiss_index_type"):
        PassageIndex(DIM, mode="faiss", faiss_index_type="hnsw")
    with pytest.raises(UsageError, match="^--faiss_code_size"):
        PassageIndex(DIM, mode="faiss", faiss_index_type="pq", faiss_code_size=5)
    with pytest.raises(UsageError, match="^--faiss_code_size"):
        PassageIndex(DIM, mode="faiss", faiss_index_type="ivfpq", faiss_code_size=0)
    with pytest.raises(UsageError, match="^--faiss_code_size"):
        PassageIndex(DIM, mode="faiss", faiss_index_type="ivfflat", faiss_code_size=4)
    with pytest.raises(UsageError, match="^--index_mode"):
        PassageIndex(DIM, mode="annoy")
    with pytest.raises(UsageError, match="^--save_index_n_shards"):
        PassageIndex(DIM).build(torch.randn(3, DIM)).save("unused-index-path", n_shards=0)  # refused before anything is written
    assert PassageIndex(DIM, mode="faiss", faiss_index_type="pq").faiss_code_size == 2
    # flat mode ignores the FAISS options, as the original does
    PassageIndex(DIM, mode="flat", faiss_index_type="hnsw")


def test_trained_faiss_types_recall_vs_exact():
    x, q = _clustered(3000, 32, 30, 50)
    exact_ids = PassageIndex(32).build(x).search(q, 10)[1]
    recalls = {}
    for kind, extra in (("ivfflat", {"faiss_nprobe": 16}), ("ivfsq", {}), ("ivfpq", {"faiss_code_size": 8}),
                        ("pq", {"faiss_code_size": 8})):
        idx = PassageIndex(32, mode="faiss", faiss_index_type=kind, **extra).build(x)
        scores, ids = idx.search(q, 10)
        assert ((ids >= 0) & (ids < 3000)).all()
        assert (scores[:, :-1] >= scores[:, 1:] - 1e-4).all()
        recalls[kind] = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, exact_ids)) / ids.numel()
    print("recall@10 vs exact:", recalls)
    assert recalls["ivfflat"] >= 0.8
    assert recalls["ivfsq"] >= 0.5 and recalls["ivfpq"] > 0.05 and recalls["pq"] > 0.05
    assert default_nlist(3000) == 3000 // 39


def test_tiny_trained_shard_is_usage_error():
    with pytest.raises(UsageError, match="^--faiss_index_type"):
        PassageIndex(DIM, mode="faiss", faiss_index_type="ivfflat").build(torch.randn(1, DIM))
    # a shard under 256 rows still trains a PQ (smaller codebooks)
    idx = PassageIndex(DIM, mode="faiss", faiss_index_type="pq").build(torch.randn(20, DIM))
    assert idx.search(torch.randn(2, DIM), 3)[1].shape == (2, 3)


def test_refresh_schedule():
    never = RefreshSchedule.parse("-1")
    assert never.never and not any(never.should_refresh(s) for s in range(0, 2000))
    every = RefreshSchedule.parse("10")
    assert [s for s in range(0, 35) if every.should_refresh(s)] == [10, 20, 30]
    sched = RefreshSchedule.parse("0-100:10, 100-1000000:500")
    got = [s for s in range(0, 1200) if sched.should_refresh(s)]
    assert got == list(range(10, 100, 10)) + [100, 600, 1100]
    assert not sched.should_refresh(1000000)
    assert [s for s in range(0, 30) if RefreshSchedule.parse("5-20:4").should_refresh(s)] == [5, 9, 13, 17]
    for bad in ("", "0", "-2", "abc", "1.5", "0-100", "100-0:5", "0-100:0", "0-100:10,50-200:5", "0-10:1,"):
        with pytest.raises(UsageError, match="^--refresh_index"):
            RefreshSchedule.parse(bad)


def test_recall_at_k():
    got = [["a", "b", "c"], ["d", "e", "f"], ["x"], ["1", "2"]]
    assert recall_at_k(got, ["c", "d", None, 2], k=2) == pytest.approx(2 / 3)
    assert recall_at_k(got, ["c", "d", None, 2], k=3) == 1.0
    assert math.isnan(recall_at_k(got[:1], [None], 1))
    with pytest.raises(ValueError):
        recall_at_k(got, ["a"], 1)


class _CountingRetriever:
    """Records which texts it embeds; embeddings are a deterministic hash of the text."""
    hidden_size = DIM

    def __init__(self):
        self.seen = []

    def embed_texts(self, texts, batch_size, max_length, device=None, show_progress=False):
        self.seen.extend(texts)
        rows = [torch.Generator().manual_seed(sum(map(ord, t)) + len(t)) for t in texts]
        return torch.stack([torch.randn(DIM, generator=g) for g in rows]) if texts else torch.empty(0, DIM)


def test_build_index_embeds_only_own_share():
    passages = [{"id": str(i), "title": f"t{i}" if i % 2 else "", "text": f"story {i}"} for i in range(7)]
    full = _CountingRetriever()
    whole = build_index(full, passages, mode="flat", faiss_index_type="flat", faiss_code_size=None,
                        batch_size=4, max_length=16, device="cpu", show_progress=False)
    assert full.seen[0] == "story 0" and full.seen[1] == "t1 story 1"  # format + strip
    parts = []
    for rank in range(3):
        r = _CountingRetriever()
        idx = build_index(r, passages, mode="faiss", faiss_index_type="flat", faiss_code_size=None,
                          batch_size=4, max_length=16, device="cpu", rank=rank, world=3,
                          show_progress=False)
        lo, hi = shard_bounds(7, rank, 3)
        assert len(r.seen) == hi - lo and idx.start == lo and idx.n_total == 7
        parts.append(idx._embeddings)
    torch.testing.assert_close(torch.cat(parts), whole._embeddings)
    with pytest.raises(UsageError, match="^--retriever_format"):
        build_index(full, passages, mode="flat", faiss_index_type="flat", faiss_code_size=None,
                    batch_size=4, max_length=16, retriever_format="{body}", device="cpu")


@pytest.mark.parametrize("mode, kind", [("flat", "flat"), ("faiss", "flat"), ("faiss", "ivfflat"), ("faiss", "ivfsq"),
                                        ("faiss", "pq")])
def test_lookup_reads_back_the_stored_rows_exactly(mode, kind):
    """Every mode and type, lossy codes included, reads back the float32 rows it was built from."""
    corpus, _ = _corpus(n=300)
    idx = PassageIndex(DIM, mode=mode, faiss_index_type=kind).build(corpus[100:], start=100, n_total=300)
    with pytest.raises(ValueError, match=r"rows must be in \[0, 300\)"):
        idx.lookup(torch.tensor([300]))
    full = PassageIndex(DIM, mode=mode, faiss_index_type=kind).build(corpus)
    rows = torch.tensor([[5, 299, 5], [0, 150, 42]])
    got = full.lookup(rows)
    assert got.shape == (2, 3, DIM) and got.dtype == torch.float32
    assert torch.equal(got, corpus[rows])
    assert full.lookup(torch.zeros(0, 3, dtype=torch.long)).shape == (0, 3, DIM)
    # a shard holds only its rows: the others read as zeros locally (the collective sums the ranks)
    part = idx.lookup_local(torch.tensor([0, 100, 299]))
    assert torch.equal(part[0], torch.zeros(DIM)) and torch.equal(part[1:], corpus[[100, 299]])


# ------------------------------------------------------------------------------------- GPU FAISS

def test_faiss_placement_asks_the_module_what_it_can():
    with_gpus = types.SimpleNamespace(StandardGpuResources=object, index_cpu_to_gpu=None, get_num_gpus=lambda: 2)
    no_gpu_seen = types.SimpleNamespace(StandardGpuResources=object, index_cpu_to_gpu=None, get_num_gpus=lambda: 0)
    cpu_build = types.SimpleNamespace(get_num_gpus=lambda: 0)
    assert faiss_placement("cuda", with_gpus) == ("gpu", 2)
    assert faiss_placement("cuda", with_gpus, "ivfsq") == ("gpu", 2)
    where, why = faiss_placement("cpu", with_gpus)
    assert where == "cpu" and "CPU" in why
    where, why = faiss_placement("cuda", cpu_build)
    assert where == "cpu" and "faiss-gpu" in why
    where, why = faiss_placement("cuda", no_gpu_seen)
    assert where == "cpu" and "get_num_gpus() == 0" in why
    where, why = faiss_placement("cuda", with_gpus, "pq")  # FAISS GPU has IVF-PQ only
    assert where == "cpu" and "pq" in why
    assert faiss_placement("cuda", import_faiss())[0] == "cpu"  # this machine's faiss-cpu


class FakeGpuFaiss(types.ModuleType):
    """This machine's faiss-cpu dressed as a GPU build: the "GPU" index is the CPU object it is
    handed, so training, adding and searching really run, and every move is recorded."""

    class StandardGpuResources:
        pass

    def __init__(self, n_gpus=2):
        super().__init__("faiss")
        self._real, self._n, self.moves = import_faiss(), n_gpus, []

    def __getattr__(self, name):
        return getattr(self._real, name)

    def get_num_gpus(self):
        return self._n

    def index_cpu_to_gpu(self, resources, device, index):
        assert isinstance(resources, FakeGpuFaiss.StandardGpuResources)
        self.moves.append(("to_gpu", device, type(index).__name__, bool(index.is_trained), int(index.ntotal)))
        return index

    def index_gpu_to_cpu(self, index):
        self.moves.append(("to_cpu",))
        return index


@pytest.fixture
def index_log(monkeypatch):
    """Lines logged by src/retrieval/index.py (a fresh once-only memory)."""
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    monkeypatch.setattr(index_module, "_said", set())
    monkeypatch.setattr(index_module, "_gpu_resources", {})
    index_module.log.addHandler(handler)
    yield lines
    index_module.log.removeHandler(handler)


def test_faiss_on_cuda_moves_the_untrained_index_to_the_gpu(monkeypatch, tmp_path, index_log):
    x, q = _clustered(2000, 32, 20, 30)
    fake = FakeGpuFaiss()
    monkeypatch.setattr(index_module, "import_faiss", lambda: fake)
    idx = PassageIndex(32, mode="faiss", faiss_index_type="ivfflat", device="cuda:1", faiss_nprobe=7).build(x)
    # moved before training and adding, to this process's GPU: k-means runs there
    assert fake.moves == [("to_gpu", 1, "IndexIVFFlat", False, 0)] and idx.faiss_on == "gpu"
    assert idx._faiss.nprobe == 7 and idx._faiss.ntotal == 2000
    cpu = PassageIndex(32, mode="faiss", faiss_index_type="ivfflat", faiss_nprobe=7)
    monkeypatch.setattr(index_module, "import_faiss", lambda: fake._real)
    cpu.build(x)
    monkeypatch.setattr(index_module, "import_faiss", lambda: fake)
    assert torch.equal(idx.search(q, 5)[1], cpu.search(q, 5)[1])
    assert idx.memory_bytes() == cpu.memory_bytes() and fake.moves[-1] == ("to_cpu",)  # serialized in CPU form
    idx.save(str(tmp_path / "saved"))  # the float32 rows: loads on CPU or GPU alike
    back = PassageIndex.load(str(tmp_path / "saved"), device="cuda:0", faiss_nprobe=7)
    assert back.faiss_on == "gpu" and fake.moves[-1][:2] == ("to_gpu", 0)
    assert torch.equal(back.search(q, 5)[1], cpu.search(q, 5)[1]) and torch.equal(back.lookup(torch.arange(5)), x[:5])
    assert index_log == []  # nothing to say: it is on the GPU


def test_faiss_on_cuda_without_gpu_faiss_falls_back_with_one_line(monkeypatch, index_log):
    x, q = _clustered(500, DIM, 10, 5)
    for _ in range(2):  # a refresh rebuilds: still one line
        idx = PassageIndex(DIM, mode="faiss", faiss_index_type="ivfsq", device="cuda:0").build(x)
        assert idx.faiss_on == "cpu" and idx.search(q, 3)[1].shape == (5, 3)
    assert len(index_log) == 1 and "stays on the CPU" in index_log[0] and "faiss-gpu" in index_log[0]
    fake = FakeGpuFaiss(n_gpus=1)
    monkeypatch.setattr(index_module, "import_faiss", lambda: fake)
    pq = PassageIndex(DIM, mode="faiss", faiss_index_type="pq", device="cuda:0").build(x)  # no GPU IndexPQ
    assert pq.faiss_on == "cpu" and fake.moves == [] and "pq" in index_log[-1]
    on_cpu = PassageIndex(DIM, mode="faiss", faiss_index_type="flat").build(x)  # a CPU run says nothing
    assert on_cpu.faiss_on == "cpu" and len(index_log) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
def test_gpu_faiss_search_matches_cpu(tmp_path):
    where, why = faiss_placement("cuda", import_faiss(), "ivfflat")
    if where != "gpu":
        pytest.skip(f"no GPU FAISS here: {why}")
    x, q = _clustered(20000, 64, 100, 64)
    dev = torch.device("cuda:0")
    for kind in ("flat", "ivfflat", "ivfsq", "ivfpq"):
        gpu = PassageIndex(64, mode="faiss", faiss_index_type=kind, device=str(dev)).build(x)
        cpu = PassageIndex(64, mode="faiss", faiss_index_type=kind).build(x)
        assert gpu.faiss_on == "gpu", kind
        got, want = gpu.search(q.to(dev), 10)[1].cpu(), cpu.search(q, 10)[1]
        overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(got, want)) / want.numel()
        assert overlap >= (0.99 if kind == "flat" else 0.8), (kind, overlap)
        assert gpu.memory_bytes() > 0  # serialized through index_gpu_to_cpu
        rows = torch.randint(20000, (8, 4), device=dev)
        assert torch.equal(gpu.lookup(rows).cpu(), x[rows.cpu()])
    gpu.save(str(tmp_path / "saved"))
    back = PassageIndex.load(str(tmp_path / "saved"), device=str(dev))
    assert back.faiss_on == "gpu" and back.search(q.to(dev), 10)[1].shape == (64, 10)
