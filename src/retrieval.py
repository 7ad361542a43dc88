"""Story retrieval for training and evaluation: the index's life cycle and no-grad search.

The index holds embeddings made by the retriever at build time; the retriever is re-run with
gradient on the retrieved stories inside the training objectives (src/lapdog.py). Every method
that searches is collective under several processes (all ranks call it the same number of times).
"""

import random
import time

import torch

from src.data import retrieval_query
from src.errors import flag_error
from src.index import PassageIndex, RefreshSchedule, build_index
from src.options import retriever_frozen_at, retriever_trained


class StoryRetrieval:
    def __init__(self, passages, opts, info):
        self.passages = passages
        self.opts = opts
        self.info = info
        self.index = None
        self.schedule = RefreshSchedule.parse(opts.refresh_index)
        needed = max(opts.retriever_n_context, opts.grpo_retriever_pool_size if opts.grpo_train_retriever else 1)
        if len(passages) < needed:
            raise flag_error("--passages", f"the corpus has {len(passages)} stories but {needed} are retrieved per query",
                             "use a larger corpus or lower --retriever_n_context / --grpo_retriever_pool_size")

    def build(self, retriever, allow_load=True):
        """Build (or load) the index with the current retriever; returns the seconds it took."""
        o, t0 = self.opts, time.perf_counter()
        if allow_load and o.load_index_path:
            self.index = PassageIndex.load(o.load_index_path, rank=self.info.rank, world=self.info.world,
                                           mode=o.index_mode, faiss_index_type=o.faiss_index_type,
                                           faiss_code_size=o.faiss_code_size, device=self.info.device)
            if self.index.n_total != len(self.passages):
                raise flag_error("--load_index_path", f"the index holds {self.index.n_total} stories, --passages has "
                                 f"{len(self.passages)}", "load an index built from the same corpus and --max_passages")
        else:
            self.index = build_index(retriever, self.passages, mode=o.index_mode, faiss_index_type=o.faiss_index_type,
                                     faiss_code_size=o.faiss_code_size, batch_size=o.per_gpu_embedder_batch_size,
                                     max_length=o.retriever_maxlength, retriever_format=o.retriever_format,
                                     device=self.info.device, rank=self.info.rank, world=self.info.world,
                                     show_progress=self.info.is_main)
            if o.save_index_path:
                self.index.save(o.save_index_path, n_shards=o.save_index_n_shards)
        return time.perf_counter() - t0

    def should_refresh(self, step):
        o = self.opts
        return retriever_trained(o) and not retriever_frozen_at(o, step) and self.schedule.should_refresh(step)

    def query_texts(self, examples, rng):
        return [retrieval_query(ex["question"], self.opts.retriever_from, rng) for ex in examples]

    @torch.no_grad()
    def search(self, retriever, query_texts, k):
        """Top-k stories per query: (list of lists of passage dicts, scores [Q,k], global rows [Q,k])."""
        if query_texts:
            q = retriever.embed_texts(query_texts, batch_size=max(len(query_texts), 1),
                                      max_length=self.opts.retriever_maxlength, device=self.info.device)
        else:
            q = torch.zeros(0, retriever.hidden_size, device=self.info.device)
        scores, rows = self.index.search(q, k)
        rows_list = rows.tolist()
        return [[self.passages[r] for r in row] for row in rows_list], scores, rows

    def add_random(self, passage_lists, fraction, rng: random.Random):
        """Candidate augmentation: replace round(fraction·K) of each list with random corpus stories."""
        if fraction <= 0:
            return passage_lists
        out = []
        for plist in passage_lists:
            n_rand = int(round(fraction * len(plist)))
            keep = plist[: len(plist) - n_rand]
            have = {p["id"] for p in keep}
            while len(keep) < len(plist):
                cand = self.passages[rng.randrange(len(self.passages))]
                if cand["id"] not in have:
                    keep.append(cand)
                    have.add(cand["id"])
            out.append(keep)
        return out
