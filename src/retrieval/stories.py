"""Story retrieval for training and evaluation: the index's life cycle and no-grad search.

The index holds embeddings made by the retriever at build time; the retriever is re-run with
gradient on the retrieved stories inside the training objectives (src/model/lapdog.py), except with
--query_side_retriever_training, whose frozen passage side is read back from the index
(``passage_embeddings``). Every method that searches or reads the index is collective under
several processes (all ranks call it the same number of times).
"""

import random
import time

import torch

from src.data.posterior import FactSwap, KnowledgeWords, PosteriorStories
from src.data.prompts import retrieval_query, retriever_passage_text
from src.infra import fingerprint
from src.infra.errors import flag_error
from src.objectives.schedule import retriever_frozen_at, retriever_trained
from src.retrieval.index import PassageIndex, RefreshSchedule, build_index


class StoryRetrieval:
    def __init__(self, passages, opts, info, dialogues=()):
        self.passages = passages
        self.opts = opts
        self.info = info
        self.index = None
        self.passage_encoder = None  # whatever embedded the index (--retrieve_with_rerank re-embeds with it)
        self.schedule = RefreshSchedule.parse(opts.refresh_index)
        self.posterior = PosteriorStories(passages) if opts.posterior_passages else None
        self.fact_swap = self.knowledge = None
        knowledge = getattr(opts, "retriever_signal", "reply") in ("knowledge", "evidence")
        if opts.posterior_fact_swap > 0 or knowledge:
            texts = [" ".join([ex["question"], *ex["answers"]]) for ex in dialogues]
        if opts.posterior_fact_swap > 0:
            self.fact_swap = FactSwap(self.posterior, texts)
        if knowledge:
            self.knowledge = KnowledgeWords(self.posterior or PosteriorStories(passages), texts)

    def build(self, retriever, allow_load=True):
        """Build (or load) the index with the current retriever; returns the seconds it took."""
        o, t0 = self.opts, time.perf_counter()
        self.passage_encoder = retriever
        if allow_load and o.load_index_path:
            self.index = PassageIndex.load(o.load_index_path, rank=self.info.rank, world=self.info.world,
                                           mode=o.index_mode, faiss_index_type=o.faiss_index_type,
                                           faiss_code_size=o.faiss_code_size, device=self.info.device)
            if self.index.n_total != len(self.passages):
                raise flag_error("--load_index_path", f"the index holds {self.index.n_total} stories, --passages has "
                                 f"{len(self.passages)}", "load an index built from the same corpus and --max_passages")
            check_index_fingerprint(self.index.saved_fingerprint, self.fingerprint(retriever), o.load_index_path)
        else:
            self.index = build_index(retriever, self.passages, mode=o.index_mode, faiss_index_type=o.faiss_index_type,
                                     faiss_code_size=o.faiss_code_size, batch_size=o.per_gpu_embedder_batch_size,
                                     max_length=o.retriever_maxlength, retriever_format=o.retriever_format,
                                     device=self.info.device, rank=self.info.rank, world=self.info.world,
                                     show_progress=self.info.is_main)
            if o.save_index_path:
                self.index.save(o.save_index_path, n_shards=o.save_index_n_shards, fingerprint=self.fingerprint(retriever))
        return time.perf_counter() - t0

    def fingerprint(self, retriever):
        """What an index of this corpus made by this retriever is made from (see src/infra/fingerprint.py)."""
        if getattr(self, "_corpus_fp", None) is None:
            self._corpus_fp = fingerprint.corpus(self.passages)
        return {"corpus": self._corpus_fp, "retriever": fingerprint.weights(retriever)}

    def should_refresh(self, step):
        o = self.opts
        if o.query_side_retriever_training:
            return False  # the passage side is frozen: the index built at the start stays exact
        return retriever_trained(o) and not retriever_frozen_at(o, step) and self.schedule.should_refresh(step)

    def query_texts(self, examples, rng):
        # an example may carry its own query (an MLM example: its text without the sentinels)
        return [ex["retrieval_query"] if "retrieval_query" in ex else
                retrieval_query(ex["question"], self.opts.retriever_from, rng) for ex in examples]

    @torch.no_grad()
    def search(self, retriever, query_texts, k):
        """Top-k stories per query: (list of lists of passage dicts, scores [Q,k], global rows [Q,k])."""
        if query_texts:
            q = retriever.embed_texts(query_texts, batch_size=max(len(query_texts), 1),
                                      max_length=self.opts.retriever_maxlength, device=self.info.device)
        else:
            q = torch.zeros(0, retriever.hidden_size, device=self.info.device)
        if not self.opts.retrieve_with_rerank:
            scores, rows = self.index.search(q, k)
            return [[self.passages[r] for r in row] for row in rows.tolist()], scores, rows
        n = min(max(k, self.opts.n_to_rerank_with_retrieve_with_rerank), len(self.passages))
        scores, rows = self.index.search(q, n)
        scores, rows = self._rerank(q, rows, k)
        return [[self.passages[r] for r in row] for row in rows.tolist()], scores, rows

    def passage_embeddings(self, rows):
        """[*rows.shape, H] float32: the index's stored embeddings of corpus ``rows`` (global
        rows, as ``search`` returns them), on ``rows.device``. COLLECTIVE (``PassageIndex.lookup``).
        With --query_side_retriever_training these are the frozen passage side's embeddings, made
        once when the index was built; reading them keeps no per-story state anywhere."""
        return self.index.lookup(torch.as_tensor(rows, dtype=torch.long))

    def _rerank(self, q, rows, k):
        """--retrieve_with_rerank (Atlas): the index's candidates re-embedded with the current
        passage encoder and re-ordered by fresh q·p; the top k kept. Local to this rank."""
        if q.shape[0] == 0:
            return q.new_zeros(0, k), rows[:, :k]
        o = self.opts
        texts = [retriever_passage_text(self.passages[r], o.retriever_format) for r in rows.reshape(-1).tolist()]
        p = self.passage_encoder.embed_texts(texts, batch_size=o.per_gpu_embedder_batch_size,
                                             max_length=o.retriever_maxlength, device=q.device)
        fresh = torch.einsum("qh,qnh->qn", q.float(), p.view(rows.shape[0], rows.shape[1], -1))
        top = torch.topk(fresh, k, dim=1)
        return top.values, rows.gather(1, top.indices.to(rows.device))

    def add_random(self, passage_lists, fraction, rng: random.Random, mode="original"):
        """Candidate augmentation (--add_random_retrieval, --add_random_retrieval_mode).

        ``original`` (the original LAPDOG): int(fraction·K) distinct random corpus stories first,
        then K − that many drawn *with replacement* from the retrieved list (its order is lost).
        ``replace_bottom``: the bottom round(fraction·K) retrieved stories replaced by distinct
        random stories not already in the list, the rest kept in rank order.
        """
        return self.augment(passage_lists, None, fraction, rng, mode)[0]

    def augment(self, passage_lists, rows, fraction, rng: random.Random, mode="original"):
        """``add_random`` that also carries each story's corpus row: ``rows`` [Q, K] (the rows
        ``search`` returned with ``passage_lists``) or None -> (passage lists, rows [Q, K] long or
        None). The draws are those of ``add_random`` for the same ``rng``."""
        if fraction <= 0:
            return passage_lists, rows
        if mode not in ("original", "replace_bottom"):
            raise ValueError(f"unknown --add_random_retrieval_mode {mode!r}")
        row_lists = rows.tolist() if torch.is_tensor(rows) else rows
        out, out_rows = [], []
        for i, plist in enumerate(passage_lists):
            # each pick: ("corpus", row) a random corpus story, ("kept", j) the j-th retrieved one
            if mode == "original":
                n_rand = int(fraction * len(plist))
                picks = [("corpus", r) for r in rng.sample(range(len(self.passages)), n_rand)]
                picks += [("kept", j) for j in rng.choices(range(len(plist)), k=len(plist) - n_rand)]
            else:
                n_rand = int(round(fraction * len(plist)))
                picks = [("kept", j) for j in range(len(plist) - n_rand)]
                have = {plist[j]["id"] for _, j in picks}
                while len(picks) < len(plist):
                    r = rng.randrange(len(self.passages))
                    if self.passages[r]["id"] not in have:
                        picks.append(("corpus", r))
                        have.add(self.passages[r]["id"])
            out.append([self.passages[x] if how == "corpus" else plist[x] for how, x in picks])
            if row_lists is not None:
                out_rows.append([x if how == "corpus" else row_lists[i][x] for how, x in picks])
        if row_lists is None:
            return out, None
        return out, torch.tensor(out_rows, dtype=torch.long) if out_rows else torch.zeros(0, 0, dtype=torch.long)


def check_index_fingerprint(saved, current, path):
    """A loaded index must come from this corpus and this retriever: an index of another corpus of
    the same size loads fine and retrieves the wrong stories (recall 100 -> 0, same scores)."""
    if saved is None:
        raise flag_error("--load_index_path", f"'{path}' does not record the corpus and retriever it was built from "
                         "(saved by an older version)", "rebuild it: drop --load_index_path and pass --save_index_path")
    for what, flag in (("corpus", "--passages / --max_passages"), ("retriever", "the retriever weights")):
        if saved.get(what) != current[what]:
            raise flag_error("--load_index_path", f"'{path}' was built from another {what} (fingerprint "
                             f"{str(saved.get(what))[:12]}, this run's {flag}: {current[what][:12]})",
                             "load the index saved with this corpus and retriever, or rebuild it")
