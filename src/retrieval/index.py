"""The story index: passage embeddings sharded over ranks, exact (torch) or FAISS search.

Sharding: rank r of W holds the contiguous global rows ``shard_bounds(N, r, W)``. Search is
collective under torch.distributed (world > 1): every rank searches its rows for the queries of
all ranks and the per-rank top-k lists are merged, so for exact search (``mode="flat"`` or FAISS
``flat``) the result equals that of one index over the whole corpus.

On-disk format (``save``/``load``), a folder with
- ``meta.json``: ``{"format", "version", "n_total", "dim", "mode", "faiss_index_type",
  "faiss_code_size", "n_shards", "files": [{"file", "start", "end"}, ...]}``, written last, so
  a folder without it is an incomplete save;
- ``embeddings.{start:09d}-{end:09d}.safetensors``: one float32 tensor ``embeddings``
  [end-start, dim] holding ONLY the global rows [start, end).
Files are the pieces of the ``n_shards`` equal shards cut at rank boundaries, so a save from W
ranks writes at most ``n_shards + W - 1`` files. Ranks write to one folder (a shared filesystem
when there are several nodes, as in Atlas).

Stored rows (``lookup``): every mode keeps the float32 embeddings it was built from (flat: they
are the search structure; FAISS: the copy ``save`` writes), so the embedding of any global row can
be read back exactly, collectively under several processes, at no memory cost beyond the index.
--query_side_retriever_training scores its pools against these rows (src/run/batch.py).

GPU FAISS (``faiss_placement``): with ``mode="faiss"`` on a CUDA device and a FAISS built with GPU
support, each process's index lives on its own GPU (``index_cpu_to_gpu``; IVF k-means and PQ
training run there); anything that needs the FAISS structure itself (``memory_bytes``) reads its
CPU form (``index_gpu_to_cpu``), and ``save``/``load`` write and read the float32 rows, so a saved
index loads on CPU or GPU alike. Without GPU FAISS the index is the CPU one, said in one log line.
"""
import json
import logging
import math
import os
import re

import torch

from src.data.prompts import DEFAULT_RETRIEVER_FORMAT, retriever_passage_text
from src.infra.errors import flag_error
from src.infra.files import make_readable

FAISS_INDEX_TYPES = ("flat", "ivfflat", "ivfsq", "ivfpq", "pq")
INDEX_MODES = ("flat", "faiss")
_TRAINED_TYPES = ("ivfflat", "ivfsq", "ivfpq", "pq")
_FILE_RE = re.compile(r"^embeddings\.(\d+)-(\d+)\.safetensors$")
# Query rows per matmul block in flat search: bounds the [Q, n] score matrix to ~256 MB at n=1M.
_FLAT_SCORE_ELEMENTS = 1 << 26
# FAISS GPU has no IndexPQ (only IVF-PQ): a pq index on a CUDA run stays on the CPU.
_GPU_TYPES = ("flat", "ivfflat", "ivfsq", "ivfpq")
log = logging.getLogger("lapdog.index")
_said = set()  # fallback lines already logged by this process (one line, not one per refresh)
_gpu_resources = {}  # device id -> faiss.StandardGpuResources, one per process and GPU


def import_faiss():
    """The faiss module (imported on first use: flat-mode runs never need it). Tests replace this
    function to hand in a stand-in module."""
    import faiss

    return faiss


def faiss_placement(device_type, faiss_module, index_type="flat"):
    """Where a FAISS index of ``index_type`` goes on a run whose device is ``device_type``:
    ``("gpu", number of GPUs FAISS sees)`` or ``("cpu", why not the GPU)``. Pure: it only asks
    ``faiss_module`` whether it was built with GPU support (``StandardGpuResources``) and how many
    GPUs it sees (``get_num_gpus``)."""
    if device_type != "cuda":
        return "cpu", "the run is on the CPU"
    if not hasattr(faiss_module, "StandardGpuResources") or not hasattr(faiss_module, "index_cpu_to_gpu"):
        return "cpu", "this FAISS has no GPU support (install faiss-gpu: requirements-gpu.txt)"
    n = int(faiss_module.get_num_gpus()) if hasattr(faiss_module, "get_num_gpus") else 0
    if n < 1:
        return "cpu", "FAISS sees no GPU (get_num_gpus() == 0)"
    if index_type not in _GPU_TYPES:
        return "cpu", f"FAISS has no GPU version of --faiss_index_type {index_type}"
    return "gpu", n


def _say_once(line):
    """Log ``line`` once per process, from rank 0 (every rank decides alike)."""
    if line not in _said and _dist_world()[0] == 0:
        _said.add(line)
        log.warning(line)


def shard_bounds(n, rank, world):
    """Contiguous rows ``(start, end)`` of ``rank`` out of ``world`` for ``n`` items.

    The first ``n % world`` ranks get one extra row, so sizes differ by at most 1.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank} world={world}")
    base, extra = divmod(int(n), world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _dist_world():
    """(rank, world) of the default process group, or (0, 1) when not distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _comm_device():
    """nccl only moves CUDA tensors; gloo is fastest (and fully supported) on CPU tensors."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather(tensor):
    """all_gather of equally shaped tensors -> [world, *shape]."""
    import torch.distributed as dist

    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts)


def default_nlist(n):
    """IVF list count: ~4·sqrt(n) (FAISS's usual guidance), capped so that every list gets at
    least 39 training points (FAISS's minimum per centroid before it warns)."""
    return max(1, min(int(round(4 * math.sqrt(max(n, 1)))), n // 39))


def default_nprobe(nlist):
    """Lists visited per query: 2·sqrt(nlist), at least 16 (all lists when fewer). On the story
    corpus this keeps IVF recall@10 near that of exact search (see results/BENCHMARKS.md)."""
    return max(1, min(nlist, max(16, int(round(2 * math.sqrt(nlist))))))


class PassageIndex:
    """One rank's share of the passage index.

    ``mode="flat"``: exact inner product, ``queries @ embeddings.T`` + topk on ``device``.
    ``mode="faiss"``: a FAISS index of ``faiss_index_type`` (inner-product metric), on this
      process's GPU when ``device`` is CUDA and FAISS has GPU support (``faiss_placement``), else
      on the CPU:
      ``flat`` exact; ``ivfflat`` / ``ivfsq`` (8-bit scalar quantizer) / ``ivfpq`` inverted
      lists with ``faiss_nlist`` lists (default ``default_nlist(n_local)``) and ``faiss_nprobe``
      visited lists (default ``default_nprobe(nlist)``); ``pq`` / ``ivfpq`` product quantizers
      with ``faiss_code_size`` bytes per vector = sub-quantizers of 8 bits (must divide ``dim``;
      default ``dim // 8``; fewer bits when a rank has under 256 passages to train on; the
      codebooks are coarse below ~10k passages per rank).
      Trained types train on this rank's own embeddings.
    Attributes: ``dim``, ``n_local``, ``start`` (global row of local row 0), ``n_total``,
    ``faiss_on`` ("gpu" / "cpu", None for flat mode).
    """

    def __init__(self, dim, mode="flat", faiss_index_type="flat", faiss_code_size=None,
                 device="cpu", faiss_nlist=None, faiss_nprobe=None):
        if mode not in INDEX_MODES:
            raise flag_error("--index_mode", f"unknown index mode '{mode}'",
                             f"use one of {', '.join(INDEX_MODES)}")
        self.dim = int(dim)
        self.mode = mode
        self.device = torch.device(device)
        self.faiss_index_type = faiss_index_type
        self.faiss_code_size = faiss_code_size
        self.faiss_nlist = faiss_nlist
        self.faiss_nprobe = faiss_nprobe
        if mode == "faiss":
            self._validate_faiss_options()
        self.start = 0
        self.n_local = 0
        self.n_total = 0
        self._embeddings = torch.empty(0, self.dim)  # flat: on device; faiss: CPU copy (save, lookup)
        self._faiss = None
        self.faiss_on = None

    def _validate_faiss_options(self):
        kind = self.faiss_index_type
        if kind not in FAISS_INDEX_TYPES:
            raise flag_error("--faiss_index_type", f"unknown FAISS index type '{kind}'",
                             f"use one of {', '.join(FAISS_INDEX_TYPES)}")
        code = self.faiss_code_size
        if kind in ("pq", "ivfpq"):
            if code is None:
                code = max(1, self.dim // 8)
                while self.dim % code:
                    code -= 1
            if isinstance(code, bool) or not isinstance(code, int) or code < 1:
                raise flag_error("--faiss_code_size", f"must be a positive integer, got {code!r}",
                                 f"pass the bytes per vector, a divisor of the dimension {self.dim}")
            if self.dim % code:
                raise flag_error("--faiss_code_size",
                                 f"{code} does not divide the embedding dimension {self.dim}",
                                 "pass a divisor of the dimension (bytes per vector, e.g. "
                                 f"{self.dim // 8 or 1})")
            self.faiss_code_size = code
        elif code is not None:
            raise flag_error("--faiss_code_size",
                             f"only used by --faiss_index_type pq or ivfpq, not '{kind}'",
                             "drop --faiss_code_size or pick pq/ivfpq")
        for flag, value in (("--faiss_nlist", self.faiss_nlist), ("--faiss_nprobe", self.faiss_nprobe)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise flag_error(flag, f"must be a positive integer, got {value!r}",
                                 "pass a positive integer or leave it unset")

    # ----------------------------------------------------------------------------- building
    def build(self, embeddings, start=0, n_total=None):
        """Index ``embeddings`` [n_local, dim] (any device/float dtype) as global rows
        [start, start + n_local). ``n_total`` (corpus size) defaults to ``start + n_local``."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"expected embeddings [n, {self.dim}], got {tuple(embeddings.shape)}")
        self.start = int(start)
        self.n_local = int(embeddings.shape[0])
        self.n_total = int(n_total) if n_total is not None else self.start + self.n_local
        if self.start + self.n_local > self.n_total:
            raise ValueError(f"rows [{self.start}, {self.start + self.n_local}) exceed n_total={self.n_total}")
        emb = embeddings.detach().to(torch.float32)
        if self.mode == "flat":
            self._embeddings = emb.to(self.device).contiguous()
            self._faiss = None
            return self
        self._embeddings = emb.cpu().contiguous()
        self._faiss = self._build_faiss(self._embeddings.numpy())
        return self

    def _build_faiss(self, x):
        faiss = import_faiss()
        n, kind = x.shape[0], self.faiss_index_type
        ip = faiss.METRIC_INNER_PRODUCT
        self.faiss_on = "cpu"
        if n == 0:
            return None  # an empty shard searches to padding; nothing to train on
        if kind in _TRAINED_TYPES and n < 2:
            raise flag_error("--faiss_index_type",
                             f"'{kind}' must be trained, but this rank holds only {n} passage",
                             "use --faiss_index_type flat (or --index_mode flat) for tiny corpora")
        # PQ codebooks need >= 2**nbits training points; shrink the codebook for tiny shards.
        nbits = min(8, int(math.log2(n)))
        nlist = self.faiss_nlist or default_nlist(n)
        nlist = min(nlist, n)
        if kind == "flat":
            index = faiss.IndexFlatIP(self.dim)
        elif kind == "pq":
            index = faiss.IndexPQ(self.dim, self.faiss_code_size, nbits, ip)
        else:
            quantizer = faiss.IndexFlatIP(self.dim)
            if kind == "ivfflat":
                index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, ip)
            elif kind == "ivfsq":
                index = faiss.IndexIVFScalarQuantizer(quantizer, self.dim, nlist,
                                                      faiss.ScalarQuantizer.QT_8bit, ip)
            else:
                index = faiss.IndexIVFPQ(quantizer, self.dim, nlist, self.faiss_code_size, nbits, ip)
            # k-means cost grows with training points x nlist; FAISS samples 256 points per list
            # by default, 64 is within its guidance (>= 39) at a quarter of the training time.
            index.cp.max_points_per_centroid = 64
            index.nprobe = self.faiss_nprobe or default_nprobe(nlist)
            index.nprobe = min(index.nprobe, nlist)
        if kind in ("pq", "ivfpq"):
            # Codebooks trained on < 39 points per code print a warning at every refresh;
            # small per-rank shards are expected here, and the coarseness is documented above.
            index.pq.cp.min_points_per_centroid = 1
            index.pq.cp.max_points_per_centroid = 64  # 16k training points per codebook at most
        index = self._placed(faiss, index)  # before training: k-means and PQ training run on the GPU
        if not index.is_trained:
            index.train(x)
        index.add(x)
        return index

    def _placed(self, faiss, index):
        """``index`` (untrained) on this process's GPU when ``faiss_placement`` says so, else itself."""
        where, detail = faiss_placement(self.device.type, faiss, self.faiss_index_type)
        if where == "cpu":
            if self.device.type == "cuda":
                _say_once(f"--index_mode faiss: the FAISS index stays on the CPU: {detail}")
            return index
        device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        if device_id not in _gpu_resources:
            _gpu_resources[device_id] = faiss.StandardGpuResources()
        try:
            gpu = faiss.index_cpu_to_gpu(_gpu_resources[device_id], device_id, index)
        except RuntimeError as exc:  # e.g. an IVF-PQ code size or bit count FAISS GPU does not implement
            reason = " ".join(str(exc).split())[:160]
            _say_once(f"--index_mode faiss: the FAISS index stays on the CPU: FAISS GPU refused "
                      f"--faiss_index_type {self.faiss_index_type} ({reason})")
            return index
        if hasattr(index, "nprobe") and hasattr(gpu, "nprobe"):
            gpu.nprobe = index.nprobe
        if hasattr(index, "cp") and hasattr(gpu, "cp"):
            gpu.cp.max_points_per_centroid = index.cp.max_points_per_centroid
        self.faiss_on = "gpu"
        return gpu

    def cpu_faiss(self):
        """The FAISS structure in its CPU form (a copy for a GPU index: ``index_gpu_to_cpu``), or None."""
        if self._faiss is None or self.faiss_on != "gpu":
            return self._faiss
        return import_faiss().index_gpu_to_cpu(self._faiss)


    # ----------------------------------------------------------------------------- searching
    def search_local(self, queries, k):
        """Search this rank's rows: queries [Q, dim] -> (scores [Q, k] float32, ids [Q, k] long
        global rows), both on ``queries.device``; missing results are (-inf, -1)."""
        if queries.dim() != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"expected queries [Q, {self.dim}], got {tuple(queries.shape)}")
        n_q, out_device = queries.shape[0], queries.device
        scores = torch.full((n_q, k), float("-inf"), dtype=torch.float32)
        ids = torch.full((n_q, k), -1, dtype=torch.long)
        k_eff = min(k, self.n_local)
        if n_q == 0 or k_eff == 0:
            return scores.to(out_device), ids.to(out_device)
        if self.mode == "flat":
            q = queries.detach().to(device=self.device, dtype=torch.float32)
            scores, ids = scores.to(self.device), ids.to(self.device)
            block = max(1, _FLAT_SCORE_ELEMENTS // max(self.n_local, 1))
            for b in range(0, n_q, block):
                top = torch.topk(q[b:b + block] @ self._embeddings.T, k_eff, dim=1)
                scores[b:b + block, :k_eff] = top.values
                ids[b:b + block, :k_eff] = top.indices + self.start
            return scores.to(out_device), ids.to(out_device)
        q = queries.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
        dist, lab = self._faiss.search(q, k_eff)
        lab_t = torch.from_numpy(lab).long()
        found = lab_t >= 0
        scores[:, :k_eff] = torch.where(found, torch.from_numpy(dist).float(),
                                        torch.tensor(float("-inf")))
        ids[:, :k_eff] = torch.where(found, lab_t + self.start, torch.tensor(-1))
        return scores.to(out_device), ids.to(out_device)

    def search(self, queries, k):
        """Top-k over the whole corpus for queries [Q, dim] -> (scores [Q, k], ids [Q, k]).

        COLLECTIVE when torch.distributed is initialized with world > 1: every rank must call
        it (Q may differ between ranks, 0 included). The queries of all ranks are gathered,
        each rank searches its rows for all of them, the per-rank top-k are gathered and merged,
        and each rank gets the rows for its own queries back on ``queries.device``.
        """
        rank, world = _dist_world()
        if world == 1:
            return self.search_local(queries, k)
        out_device = queries.device
        comm = _comm_device()
        q = queries.detach().to(device=comm, dtype=torch.float32)
        sizes = _all_gather(torch.tensor([q.shape[0]], dtype=torch.long, device=comm)).view(-1).tolist()
        n_all, n_max = sum(sizes), max(sizes)
        if n_all == 0:
            return self.search_local(queries, k)
        padded = torch.zeros(n_max, self.dim, dtype=torch.float32, device=comm)
        padded[:q.shape[0]] = q
        gathered = _all_gather(padded)
        all_q = torch.cat([gathered[r, :sizes[r]] for r in range(world)])
        scores, ids = self.search_local(all_q, k)
        all_scores = _all_gather(scores.to(comm))  # [world, n_all, k]
        all_ids = _all_gather(ids.to(comm))
        own = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
        cand_scores = all_scores[:, own].permute(1, 0, 2).reshape(sizes[rank], world * k)
        cand_ids = all_ids[:, own].permute(1, 0, 2).reshape(sizes[rank], world * k)
        top = torch.topk(cand_scores, k, dim=1)
        merged_ids = torch.gather(cand_ids, 1, top.indices)
        return top.values.to(out_device), merged_ids.to(out_device)

    def lookup_local(self, rows):
        """This rank's stored embeddings of global ``rows`` (long, any shape) -> float32
        [*rows.shape, dim] on the storage device; rows this rank does not hold give zeros."""
        store = self._embeddings
        local = rows.reshape(-1).to(device=store.device, dtype=torch.long) - self.start
        mine = (local >= 0) & (local < self.n_local)
        if self.n_local == 0:
            return torch.zeros(*rows.shape, self.dim, dtype=torch.float32, device=store.device)
        out = store[local.clamp(0, self.n_local - 1)]
        if not bool(mine.all()):
            out = torch.where(mine[:, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
        return out.view(*rows.shape, self.dim)

    def _check_rows(self, rows):
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.n_total):
            raise ValueError(f"rows must be in [0, {self.n_total}), got {int(rows.min())}..{int(rows.max())}")

    def lookup(self, rows):
        """The stored float32 embeddings of global ``rows`` (long, any shape) -> [*rows.shape, dim]
        on ``rows.device``: exactly what the index was built from, for every mode and FAISS type
        (lossy types search their codes, but the rows read back are the float32 copy).

        COLLECTIVE when torch.distributed is initialized with world > 1 (every rank calls it; the
        number of rows may differ between ranks, 0 included): the rows of all ranks are gathered,
        each rank fills in those it holds (zeros elsewhere), and one all_reduce sums the parts; a
        row is held by exactly one rank, so the sum is that rank's row bit for bit."""
        import torch.distributed as dist

        rank, world = _dist_world()
        if world == 1:
            self._check_rows(rows)
            return self.lookup_local(rows).to(rows.device)
        comm = _comm_device()
        flat = rows.reshape(-1).to(device=comm, dtype=torch.long)
        sizes = _all_gather(torch.tensor([flat.numel()], dtype=torch.long, device=comm)).view(-1).tolist()
        n_max = max(sizes)
        if n_max == 0:
            return torch.zeros(*rows.shape, self.dim, dtype=torch.float32, device=rows.device)
        padded = torch.zeros(n_max, dtype=torch.long, device=comm)  # row 0 as padding: in range, dropped below
        padded[:flat.numel()] = flat
        every = _all_gather(padded)  # [world, n_max]
        self._check_rows(torch.cat([every[r, :sizes[r]] for r in range(world)]))  # the same on every rank
        parts = self.lookup_local(every).to(comm)
        dist.all_reduce(parts)
        return parts[rank, :flat.numel()].reshape(*rows.shape, self.dim).to(rows.device)

    def memory_bytes(self):
        """Bytes of the search structure (flat: the float32 matrix; faiss: the serialized index,
        not counting the float32 copy kept for ``save``)."""
        if self.mode == "flat" or self._faiss is None:
            return self._embeddings.numel() * 4 if self.mode == "flat" else 0
        return int(import_faiss().serialize_index(self.cpu_faiss()).size)

    # ----------------------------------------------------------------------------- save / load
    def save(self, path, n_shards=1, fingerprint=None):
        """Write the index folder (see the module docstring). COLLECTIVE when distributed.
        `fingerprint`: what the embeddings were made from (corpus and retriever), kept in meta.json."""
        import torch.distributed as dist
        from safetensors.torch import save_file

        if isinstance(n_shards, bool) or not isinstance(n_shards, int) or n_shards < 1:
            raise flag_error("--save_index_n_shards", f"must be a positive integer, got {n_shards!r}",
                             "pass e.g. --save_index_n_shards 1")
        rank, world = _dist_world()
        if world > 1:
            mine = torch.tensor([self.start, self.n_local], dtype=torch.long, device=_comm_device())
            layout = [tuple(r) for r in _all_gather(mine).cpu().tolist()]
        else:
            layout = [(self.start, self.n_local)]
        covered = sorted((s, s + n) for s, n in layout if n > 0)
        edge = 0
        for s, e in covered:
            if s != edge:
                raise RuntimeError(f"index shards do not tile the corpus: gap/overlap at row {edge}")
            edge = e
        if edge != self.n_total:
            raise RuntimeError(f"index shards cover {edge} rows, n_total is {self.n_total}")

        meta_path = os.path.join(path, "meta.json")
        if rank == 0:
            os.makedirs(path, exist_ok=True)
            if os.path.exists(meta_path):
                os.remove(meta_path)  # until the new meta lands, the folder reads as incomplete
        if world > 1:
            dist.barrier()
        files = []
        for r, (r_start, r_n) in enumerate(layout):
            for s in range(n_shards):
                a, b = shard_bounds(self.n_total, s, n_shards)
                a, b = max(a, r_start), min(b, r_start + r_n)
                if a >= b:
                    continue
                name = f"embeddings.{a:09d}-{b:09d}.safetensors"
                files.append({"file": name, "start": a, "end": b})
                if r == rank:
                    rows = self._embeddings[a - self.start:b - self.start].detach().cpu().contiguous()
                    tmp = os.path.join(path, name + f".tmp{rank}")
                    save_file({"embeddings": rows}, tmp, metadata={"start": str(a), "end": str(b)})
                    os.replace(tmp, os.path.join(path, name))
        if world > 1:
            dist.barrier()
        if rank == 0:
            meta = {"format": "lapdog-passage-index", "version": 1, "n_total": self.n_total,
                    "dim": self.dim, "mode": self.mode, "faiss_index_type": self.faiss_index_type,
                    "faiss_code_size": self.faiss_code_size, "n_shards": n_shards, "files": files,
                    "fingerprint": fingerprint}
            listed = {f["file"] for f in files}
            for old in os.listdir(path):
                if _FILE_RE.match(old) and old not in listed:
                    os.remove(os.path.join(path, old))  # stale shards of an earlier save
            with open(meta_path + ".tmp", "w") as fh:
                json.dump(meta, fh, indent=1)
            os.replace(meta_path + ".tmp", meta_path)
            make_readable(path)
        if world > 1:
            dist.barrier()

    @classmethod
    def load(cls, path, rank=0, world=1, mode=None, faiss_index_type=None, faiss_code_size=None,
             device="cpu", faiss_nlist=None, faiss_nprobe=None):
        """Load rows ``shard_bounds(n_total, rank, world)`` of a saved index, reading only the
        files that overlap them (any world size, not only the one that saved). ``mode`` and
        ``faiss_index_type`` default to the saved ones; the FAISS structure is rebuilt."""
        from safetensors import safe_open

        fix = "pass a folder written by --save_index_path (it must contain meta.json)"
        if not os.path.isdir(path):
            raise flag_error("--load_index_path", f"no index folder at '{path}'", fix)
        meta_path = os.path.join(path, "meta.json")
        if not os.path.isfile(meta_path):
            raise flag_error("--load_index_path", f"'{path}' has no meta.json (incomplete save?)", fix)
        try:
            with open(meta_path) as fh:
                meta = json.load(fh)
            n_total, dim, files = int(meta["n_total"]), int(meta["dim"]), list(meta["files"])
            spans = sorted((int(f["start"]), int(f["end"]), str(f["file"])) for f in files)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise flag_error("--load_index_path", f"unreadable {meta_path}: {exc}", fix) from None
        edge = 0
        for s, e, _ in spans:
            if s != edge or e <= s:
                raise flag_error("--load_index_path",
                                 f"{meta_path}: shard files do not cover rows from {edge}", fix)
            edge = e
        if edge != n_total:
            raise flag_error("--load_index_path",
                             f"{meta_path}: shard files cover {edge} of {n_total} rows", fix)
        if mode is None:
            mode = meta.get("mode", "flat")
        if faiss_index_type is None:
            faiss_index_type = meta.get("faiss_index_type") or "flat"
            if faiss_code_size is None and faiss_index_type in ("pq", "ivfpq"):
                faiss_code_size = meta.get("faiss_code_size")
        index = cls(dim, mode=mode, faiss_index_type=faiss_index_type,
                    faiss_code_size=faiss_code_size, device=device,
                    faiss_nlist=faiss_nlist, faiss_nprobe=faiss_nprobe)
        lo, hi = shard_bounds(n_total, rank, world)
        parts = []
        for s, e, name in spans:
            a, b = max(s, lo), min(e, hi)
            if a >= b:
                continue
            file_path = os.path.join(path, name)
            if not os.path.isfile(file_path):
                raise flag_error("--load_index_path", f"missing shard file {file_path}", fix)
            try:
                with safe_open(file_path, framework="pt") as fh:
                    piece = fh.get_slice("embeddings")
                    shape = piece.get_shape()
                    if list(shape) != [e - s, dim]:
                        raise ValueError(f"shape {shape}, expected {[e - s, dim]}")
                    parts.append(piece[a - s:b - s].to(torch.float32))
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                raise flag_error("--load_index_path", f"bad shard file {file_path}: {exc}", fix) from None
        emb = torch.cat(parts) if parts else torch.empty(0, dim)
        index = index.build(emb, start=lo, n_total=n_total)
        index.saved_fingerprint = meta.get("fingerprint")
        return index


def build_index(retriever, passages, *, mode="flat", faiss_index_type="flat", faiss_code_size=None,
                batch_size=128, max_length=200, retriever_format=DEFAULT_RETRIEVER_FORMAT, device="cpu",
                rank=0, world=1, show_progress=True, faiss_nlist=None, faiss_nprobe=None):
    """Embed this rank's share ``shard_bounds(len(passages), rank, world)`` of ``passages``
    (dicts with id/title/text, identical on every rank) with ``retriever.embed_texts`` and index
    it. Passage text: ``src.data.retriever_passage_text`` (the same text the objectives re-encode)."""
    index = PassageIndex(retriever.hidden_size, mode=mode, faiss_index_type=faiss_index_type,
                         faiss_code_size=faiss_code_size, device=device,
                         faiss_nlist=faiss_nlist, faiss_nprobe=faiss_nprobe)
    lo, hi = shard_bounds(len(passages), rank, world)
    texts = [retriever_passage_text(p, retriever_format) for p in passages[lo:hi]]
    emb = retriever.embed_texts(texts, batch_size=batch_size, max_length=max_length,
                                device=device if mode == "flat" else "cpu",
                                show_progress=show_progress and rank == 0)
    return index.build(emb, start=lo, n_total=len(passages))


class RefreshSchedule:
    """When to re-embed the corpus during training (the initial build at step 0 is separate).

    Spec (``--refresh_index``):
    - ``"-1"``: never refresh after the initial build;
    - ``"N"`` (N >= 1): refresh at every step with ``step % N == 0`` (N, 2N, ...);
    - ``"a-b:n,c-d:m,..."``: within each half-open range [a, b) refresh when
      ``(step - a) % n == 0`` (Atlas's rule: counting restarts at each range's start); steps in
      no range never refresh. ``"0-100:10,100-1000000:500"`` refreshes at 10, 20, ..., 90, then
      100, 600, 1100, ...
    """

    def __init__(self, ranges, spec):
        self.ranges = list(ranges)  # [(start, end, every)], end may be math.inf
        self.spec = spec

    @classmethod
    def parse(cls, spec):
        text = str(spec).strip()
        fix = 'use "-1" (never), "N" (every N steps) or "0-100:10,100-1000000:500"'

        def bad(problem):
            return flag_error("--refresh_index", f"{problem} in {text!r}", fix)

        if re.fullmatch(r"[+-]?\d+", text):
            every = int(text)
            if every == -1:
                return cls([], text)
            if every < 1:
                raise bad("the refresh interval must be >= 1 (or -1 for never)")
            return cls([(0, math.inf, every)], text)
        ranges = []
        for part in text.split(","):
            m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*:\s*(\d+)\s*", part)
            if not m:
                raise bad(f"cannot read the range {part.strip()!r} (expected START-END:EVERY)")
            a, b, n = (int(g) for g in m.groups())
            if a >= b:
                raise bad(f"empty range {a}-{b}")
            if n < 1:
                raise bad(f"the interval of range {a}-{b} must be >= 1")
            ranges.append((a, b, n))
        ranges.sort()
        for (a1, b1, _), (a2, _, _) in zip(ranges, ranges[1:]):
            if a2 < b1:
                raise bad(f"ranges {a1}-{b1} and {a2}-... overlap")
        return cls(ranges, text)

    @property
    def never(self):
        return not self.ranges

    def should_refresh(self, step):
        """True when the index should be rebuilt after optimizer step ``step`` (>= 1); False
        for step 0, whose build is the initial one."""
        if step < 1:
            return False
        for a, b, every in self.ranges:
            if a <= step < b:
                return (step - a) % every == 0
        return False

    def __repr__(self):
        return f"RefreshSchedule({self.spec!r})"


def recall_at_k(retrieved_ids, relevant_ids, k):
    """Fraction of examples whose relevant id is among their first ``k`` retrieved ids.

    Examples whose relevant id is None are skipped; NaN when none has one.
    """
    if len(retrieved_ids) != len(relevant_ids):
        raise ValueError(f"{len(retrieved_ids)} retrieval lists for {len(relevant_ids)} examples")
    hits = total = 0
    for got, want in zip(retrieved_ids, relevant_ids):
        if want is None:
            continue
        total += 1
        hits += str(want) in [str(x) for x in list(got)[:k]]
    return hits / total if total else float("nan")
