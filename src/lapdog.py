"""The LAPDOG model: FiD reader + retriever (+ frozen references) and the training objectives.

`LapdogModel.forward(kind, batch, rollout=None, step=0)` is the single entry point that DDP wraps, so
every gradient of a step flows through one wrapped call; `step` is the optimizer step the forward is
for (completed updates: --freeze_retriever_steps and LAPDOG's retriever loss depend on it). Kinds:
  sft        reader cross-entropy (stage 1, or stage 2 without a trained retriever)
  lapdog     reader cross-entropy + KL(softmax(gold/τ_g) ‖ softmax(score/τ_s)) on the retriever
  reinforce  REINFORCE on the reader (one sampled reply per example), optional LAPDOG retriever loss
  grpo       generator GRPO on the fused top n_context stories
  grpo_joint joint GRPO: k stories sampled from the retriever's pool, G replies per story
The batch (built by `make_batch`, outside the wrapped call) holds the texts, the retrieved stories
and the tokenized tensors; retrieval itself (an index search, collective) happens there too.
GRPO forwards return a `rollout` (samples, advantages, old and reference log-probs) so that
--grpo_num_iterations > 1 reuses the samples for further updates.
"""

import torch
import torch.nn as nn

from src import grpo, safety
from src.data import encoder_inputs, reader_query, reader_target, retriever_passage_text
from src.gold_scores import evidence_scores, emdr_token_logprobs, gold_scores
from src.reader import dropout_disabled
from src.retriever import retrieval_scores
from src.options import retriever_frozen_at
from src.rewards import grpo_reward, knowledge_recall, reward_options
from src.tracking import timed


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


def training_kind(opts, step):
    if opts.use_grpo:
        return "grpo_joint" if opts.grpo_train_retriever else "grpo"
    if opts.reader_rl_learning:
        return "reinforce"
    if lapdog_retriever_trained(opts, step):
        return "lapdog"
    return "sft"


def lapdog_retriever_trained(opts, step):
    """Whether LAPDOG's retriever loss (--train_retriever) acts at this step (completed updates)."""
    return bool(opts.train_retriever) and not retriever_frozen_at(opts, step)


def augments_candidates(opts, step, train):
    """--add_random_retrieval at this step: the original augments only while LAPDOG trains the
    retriever; replace_bottom in every training step."""
    if not train or opts.add_random_retrieval <= 0:
        return False
    return opts.add_random_retrieval_mode == "replace_bottom" or lapdog_retriever_trained(opts, step)


def sample_contexts(queries, passage_lists, n_context):
    """One {prompt, story} per reader input, for the logged sample rows: the reader prompt and
    the stories fused into it (title: text, joined by " || "; "" closed book)."""
    lists = passage_lists or [[] for _ in queries]
    return [{"prompt": q, "story": " || ".join(f"{p.get('title') or ''}: {p['text']}".lstrip(": ")
                                               for p in plist[:n_context])}
            for q, plist in zip(queries, lists)]


def make_batch(examples, answers, reader, retrieval, retriever, opts, rng, device, train=True, step=0):
    """Texts, retrieved stories and reader tensors for a micro-batch (retrieval is collective).
    ``step``: the optimizer step the batch is for (candidate augmentation depends on it)."""
    queries = [reader_query(ex["question"]) for ex in examples]
    b = Batch(queries=queries, answers=answers, examples=examples, passages=None, retrieval_queries=None)
    b["labels"] = reader.tokenize_targets([reader_target(a) for a in answers], opts.target_maxlength).to(device)
    posterior = train and opts.posterior_passages and training_kind(opts, 0) in ("sft", "lapdog")
    if retrieval is not None and not (posterior and opts.n_context == 1 and not opts.train_retriever):
        b["retrieval_queries"] = retrieval.query_texts(examples, rng)
        k = opts.grpo_retriever_pool_size if (train and opts.grpo_train_retriever) else opts.retriever_n_context
        passages, scores, rows = retrieval.search(retriever, b["retrieval_queries"], k)
        if augments_candidates(opts, step, train):
            passages = retrieval.add_random(passages, opts.add_random_retrieval, rng, mode=opts.add_random_retrieval_mode)
        b["passages"], b["retrieval_scores"] = passages, scores
    if train and getattr(retrieval, "knowledge", None) is not None:
        b["knowledge"] = [retrieval.knowledge(a) for a in answers]  # the original targets' fact-like words
        if opts.retriever_signal == "evidence":  # their tokens in the (original) labels
            b["fact_mask"] = reader.word_mask([reader_target(a) for a in answers], b.knowledge, opts.target_maxlength)
    if train and opts.grpo_train_retriever:
        return b  # joint GRPO builds one reader input per sampled story itself
    n_ctx = 1 if opts.closed_book else opts.n_context
    fused = b["passages"] or [None] * len(queries)
    reader_queries = queries
    if posterior:  # the story that best explains each target reply goes first (src/posterior.py)
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


def _relevance_stats(b, idx, pool_rewards=None):
    """Monitoring only (never a training signal): where examples record their relevant story
    (`story_id`, the sample data), how often it is in the pool and among the drawn stories, and
    (pool estimator) how far its reward sits above the pool's mean."""
    rel = [ex.get("story_id") for ex in b.examples]
    rows = [i for i, r in enumerate(rel) if r is not None]
    if not rows:
        return {}
    where = {i: [p["id"] for p in b.passages[i]].index(rel[i]) for i in rows
             if any(p["id"] == rel[i] for p in b.passages[i])}
    drawn = sum(b.passages[i][j]["id"] == rel[i] for i in rows for j in idx[i].tolist())
    out = {"retrieval/relevant_in_pool": len(where) / len(rows),
           "retrieval/relevant_drawn": drawn / (len(rows) * idx.shape[1])}
    if pool_rewards is not None and where:
        gaps = [float(pool_rewards[i, j] - pool_rewards[i].mean()) for i, j in where.items()]
        out["retrieval/relevant_reward_gap"] = sum(gaps) / len(gaps)
    return out
def max_reply_tokens(opts):
    """The most tokens a sampled reply can have (EOS included): --generation_max_length counts the
    decoder start token, as in transformers. dr_grpo's constant divisor (TRL's max_completion_length)."""
    return opts.generation_max_length - 1


def rollout_reply_tokens(rollout):
    """Real reply tokens of a GRPO rollout (a 0-d long tensor): generator GRPO's own, or those of
    joint GRPO's generator rollout under "gen"."""
    return rollout["gen"]["n_tokens"] if "gen" in rollout else rollout["n_tokens"]


class LapdogModel(nn.Module):
    def __init__(self, reader, retriever, opts, ref_reader=None, ref_retriever=None, passage_encoder=None):
        super().__init__()
        self.reader = reader
        self.retriever = retriever
        self.opts = opts
        # Frozen references live outside the module tree: DDP must not sync them, checkpoints must
        # not hold them (they are saved once under {checkpoint_dir}/reference/).
        # passage_encoder (--query_side_retriever_training): the frozen passage side of an untied
        # retriever, also outside the tree (no gradient, nothing for DDP to reduce).
        self.refs = {"reader": ref_reader, "retriever": ref_retriever, "passage_encoder": passage_encoder}
        # Set by the trainer for GRPO (see train.py): sampling_pass makes a GRPO forward draw its
        # rollout and return a zero loss (dapo samples every micro-batch before any loss, to know
        # the step's token count); token_normalizer is dapo's divisor (grpo.dapo_normalizer).
        self.sampling_pass = False
        self.token_normalizer = None
        # Rows {prompt, story, reference, reply, reward} of the replies sampled by the last
        # forward (empty for objectives that sample none); train.py logs a few to samples.jsonl.
        self.samples = []

    @property
    def device(self):
        return next(self.reader.parameters()).device

    def forward(self, kind, batch, rollout=None, step=0):
        """(loss, stats, rollout) of objective `kind` on `batch` for optimizer step `step`
        (completed updates; the retriever's freeze and LAPDOG's retriever loss depend on it)."""
        stats = {}
        self.samples = []
        loss, rollout = getattr(self, "_" + kind)(batch, stats, rollout, step)
        return loss, stats, rollout

    # ---------------------------------------------------------------- supervised and LAPDOG
    def _sft(self, b, stats, rollout, step):
        loss = self.reader(b.input_ids, b.attention_mask, b.labels)
        stats["loss/reader"] = loss.item()
        return loss, None

    def _retriever_pool_logits(self, queries, passage_lists, temperature, model=None):
        """Scores q·p/sqrt(H) of each query's stories, re-encoded (with gradient unless frozen)."""
        model = model or self.retriever
        o, dev = self.opts, self.device
        flat = [retriever_passage_text(x, o.retriever_format) for plist in passage_lists for x in plist]
        frozen = self.refs["passage_encoder"]
        if frozen is not None:
            ids = [x["id"] for plist in passage_lists for x in plist]
            return self._query_side_pool_logits(model, frozen, queries, flat, temperature, ids)
        # Queries and stories in ONE forward: the word-embedding gradient is a dense [V, H]
        # buffer per forward call (47 MB for MiniLM), and building it twice cost more than the
        # padding of the shorter queries to the stories' length.
        enc = model.tokenize(list(queries) + flat, o.retriever_maxlength)
        emb = model(enc["input_ids"].to(dev), enc["attention_mask"].to(dev))
        q_emb, p_emb = emb[:len(queries)], emb[len(queries):].view(len(queries), -1, emb.shape[-1])
        return retrieval_scores(q_emb, p_emb) / temperature

    def _frozen_passage_embeddings(self, frozen, ids, texts):
        """[len(ids), H] embeddings of the frozen passage side, each story embedded once per run:
        the side is frozen, so a cached embedding is never stale, and re-encoding a pool of 24
        stories every step cost more than the rest of the joint GRPO step (measured)."""
        cache = self.__dict__.setdefault("_passage_cache", {})
        missing = [(i, t) for i, t in dict(zip(ids, texts)).items() if i not in cache]
        if missing:
            o, dev = self.opts, self.device
            with torch.no_grad(), dropout_disabled(frozen):
                for start in range(0, len(missing), 64):
                    chunk = missing[start:start + 64]
                    enc = frozen.tokenize([t for _, t in chunk], o.retriever_maxlength)
                    emb = frozen(enc["input_ids"].to(dev), enc["attention_mask"].to(dev))
                    cache.update({i: e for (i, _), e in zip(chunk, emb)})
        return torch.stack([cache[i] for i in ids])

    def _query_side_pool_logits(self, model, frozen, queries, flat_passages, temperature, ids=None):
        """--query_side_retriever_training: queries through ``model`` (the trained query side, or a
        reference), stories through the frozen passage encoder, without gradient and without
        dropout, as the index embedded them; so the index is never stale and needs no refresh."""
        o, dev = self.opts, self.device
        enc = model.tokenize(list(queries), o.retriever_maxlength)
        q_emb = model(enc["input_ids"].to(dev), enc["attention_mask"].to(dev))
        if ids is not None:
            p_emb = self._frozen_passage_embeddings(frozen, ids, flat_passages)
        else:
            with torch.no_grad(), dropout_disabled(frozen):
                enc = frozen.tokenize(flat_passages, o.retriever_maxlength)
                p_emb = frozen(enc["input_ids"].to(dev), enc["attention_mask"].to(dev))
        return retrieval_scores(q_emb, p_emb.view(len(queries), -1, p_emb.shape[-1])) / temperature

    def _lapdog_retriever_loss(self, b, stats):
        with timed(stats, "time/retriever", self.device):
            loss = self._lapdog_retriever_objective(b, stats)
        stats["loss/retriever"] = loss.item()
        return loss

    def _lapdog_retriever_objective(self, b, stats):
        o = self.opts
        score_logits = self._retriever_pool_logits(b.retrieval_queries, b.passages, o.temperature_score)
        # The original targets: with --posterior_fact_swap the reader's own labels may be swapped ones.
        gold_labels = b.get("gold_labels", b.labels)
        if o.gold_score_mode == "emdr":
            # EMDR² as the original: per token, −log Σ_k softmax(s/τ_s)_k · p_τg(y_t | q, story k).
            token_logp, mask = emdr_token_logprobs(self.reader, b.queries, b.passages, gold_labels, o)
            loss = grpo.emdr_token_loss(token_logp, torch.log_softmax(score_logits, -1), mask)
            # logged gold score: each story's reply log-likelihood at τ_g (one reader pass, not two)
            stats["gold_score/mean"] = (token_logp * mask.unsqueeze(1)).sum(-1).mean().item()
            return loss
        if "fact_mask" in b:  # --retriever_signal evidence: the reader's log-likelihood of the target's facts
            gold = evidence_scores(self.reader, b.queries, b.passages, gold_labels, b.fact_mask, o)
        else:
            gold = gold_scores(o.gold_score_mode, self.reader, b.queries, b.passages, gold_labels, b.answers, o)
        if o.gold_score_mode == "emdr_seq":
            # Sequence-level variant: −log Σ_k softmax(s/τ_s)_k · p(y | q, story k), no τ_g. With the
            # evidence, the facts' likelihood tempered by τ_g: −log Σ_k π_k · p(facts | q, story k)^(1/τ_g),
            # whose gradient fits π to the tempered posterior π_k·p^(1/τ_g) (grpo.pool_posterior_loss);
            # chit-chat rows (evidence 0) give exactly 0 and no gradient.
            evidence = gold / o.temperature_gold if "fact_mask" in b else gold
            loss = -torch.logsumexp(torch.log_softmax(score_logits, -1) + evidence, dim=-1).mean()
        else:
            target = torch.log_softmax(gold / o.temperature_gold, -1)
            score_logp = torch.log_softmax(score_logits, -1)
            if "knowledge" in b:  # --retriever_signal knowledge/evidence: chit-chat targets fit nothing (KL 0, no gradient)
                needs = torch.tensor([bool(k) for k in b.knowledge], device=target.device)[:, None]
                target = torch.where(needs, target, score_logp.detach())
                stats["retriever/knowledge_examples"] = needs.float().mean().item()
            loss = grpo.lapdog_kl_loss(target, score_logp, o.retriever_kl_reduction)
        stats["gold_score/mean"] = gold.mean().item()
        return loss

    def _lapdog(self, b, stats, rollout, step):
        loss = self._lapdog_retriever_loss(b, stats)
        if not self.opts.fix_reader:
            reader_loss, _ = self._sft(b, stats, None, step)
            loss = loss + reader_loss
        return loss, None

    # ---------------------------------------------------------------- REINFORCE
    def _reinforce(self, b, stats, rollout, step):
        o, dev = self.opts, self.device
        with dropout_disabled(self.reader):
            hidden, mask = self.reader.encode(b.input_ids, b.attention_mask)
            source = self.reader.source_ids(b.input_ids)
            with timed(stats, "time/sampling", dev), torch.no_grad():
                replies = self.reader.sample(hidden.detach(), mask, 1, o.generation_max_length,
                                             temperature=1.0, min_length=o.generation_min_length, source_ids=source)
            with timed(stats, "time/reward", dev):
                r = self._rewards(replies, b.answers, stats, sample_contexts(b.queries, b.passages, o.n_context))
            with timed(stats, "time/policy", dev):
                logp, tmask = self.reader.token_logprobs(hidden, mask, replies, min_length=o.generation_min_length,
                                                         source_ids=source)
        loss, rstats = grpo.reinforce_loss(grpo.sequence_logprob(logp, tmask), r["reward"].to(dev))
        stats["loss/reader"] = loss.item()
        if lapdog_retriever_trained(o, step):
            loss = loss + self._lapdog_retriever_loss(b, stats)
        return loss, None

    # ---------------------------------------------------------------- GRPO
    def _rewards(self, replies, answers, stats, contexts, per_reply_answers=None):
        """Rewards of `replies` (n per answer); `contexts` holds one (prompt, story) per answer."""
        o = self.opts
        texts = self.reader.decode(replies)
        refs = per_reply_answers or [a for a in answers for _ in range(len(texts) // len(answers))]
        r = grpo_reward(texts, refs, **reward_options(o))
        for key in ("f1", "rouge", "bleu", "length_ratio"):
            stats[f"reward/{key}"] = r[key].mean().item()
        stats["reward/mean"] = r["reward"].mean().item()
        n = len(texts) // len(contexts)
        self.samples = [{**contexts[i // n], "reference": ref, "reply": t, "reward": float(v)}
                        for i, (ref, t, v) in enumerate(zip(refs, texts, r["reward"].tolist()))]
        return r

    def _require_reference(self, name):
        if self.refs[name] is None:
            raise ValueError(f"GRPO needs the frozen reference {name}: pass ref_{name} to LapdogModel")
        return self.refs[name]

    def _generator_grpo(self, ids, mask_in, answers, stats, rollout, contexts):
        """Clipped surrogate + β·KL on G replies per prompt; returns (loss, rollout)."""
        o, dev, G = self.opts, self.device, self.opts.grpo_group_size
        reader = self.reader
        with dropout_disabled(reader):
            with timed(stats, "time/policy", dev):
                hidden, mask = reader.encode(ids, mask_in)  # encoder once per prompt, with gradient
                source = reader.source_ids(ids)
            if rollout is None:
                with timed(stats, "time/sampling", dev), torch.no_grad():
                    replies = reader.sample(hidden.detach(), mask, G, o.generation_max_length,
                                            temperature=o.grpo_temperature, top_p=o.grpo_top_p,
                                            min_length=o.generation_min_length, source_ids=source)
                with timed(stats, "time/reward", dev):
                    r = self._rewards(replies, answers, stats, contexts)
                    rewards = r["reward"].to(dev).view(-1, G)
                    adv, zero_std = grpo.group_advantages(rewards)
                with timed(stats, "time/reference", dev), torch.no_grad():
                    ref = self._require_reference("reader")
                    with dropout_disabled(ref):
                        ref_hidden, ref_mask = ref.encode(ids, mask_in)
                        ref_logp, _ = ref.token_logprobs(ref_hidden, ref_mask, replies, temperature=o.grpo_temperature,
                                                         min_length=o.generation_min_length, source_ids=source)
                rollout = {"replies": replies, "adv": adv.reshape(-1), "ref_logp": ref_logp, "old_logp": None,
                           "rewards": rewards, "zero_std": zero_std,
                           "n_tokens": reader.reply_mask(replies).sum().long()}
            if self.sampling_pass:
                return hidden.new_zeros(()), rollout
            with timed(stats, "time/policy", dev):
                logp, tmask = reader.token_logprobs(hidden, mask, rollout["replies"], temperature=o.grpo_temperature,
                                                    min_length=o.generation_min_length, source_ids=source)
        if rollout["old_logp"] is None:
            # μ = 1 (or the first of μ updates): the sampling policy is the current one, so the
            # old log-probs are the detached current ones and the ratio is exactly 1.
            rollout["old_logp"] = logp.detach()
        loss, pstats = grpo.policy_loss(logp, rollout["old_logp"], rollout["ref_logp"], rollout["adv"], tmask,
                                        o.grpo_clip_epsilon, o.grpo_kl_coeff, o.grpo_loss_type,
                                        max_len=max_reply_tokens(o), normalizer=self.token_normalizer)
        rewards = rollout["rewards"]
        stats.update({"loss/reader": loss.item(), "kl/reader": float(pstats["kl"]),
                      "grpo/clip_frac": float(pstats["clip_frac"]), "grpo/ratio_mean": float(pstats["ratio_mean"]),
                      "grpo/frac_zero_std": rollout["zero_std"].float().mean().item(),
                      "reward/std": rewards.std(dim=-1, unbiased=True).mean().item(),
                      "reply_length": tmask.sum(-1).mean().item()})
        if "reward/mean" not in stats:
            stats["reward/mean"] = rewards.mean().item()
        return loss, rollout

    def _grpo(self, b, stats, rollout, step):
        contexts = sample_contexts(b.queries, b.passages, self.opts.n_context)
        return self._generator_grpo(b.input_ids, b.attention_mask, b.answers, stats, rollout, contexts)

    def _grpo_joint(self, b, stats, rollout, step):
        o, dev = self.opts, self.device
        k, tau = o.grpo_retriever_group_size, o.grpo_retriever_temperature
        train_retriever = not retriever_frozen_at(o, step)
        with timed(stats, "time/retriever", dev), dropout_disabled(self.retriever), \
                torch.set_grad_enabled(train_retriever):
            pool_logp = torch.log_softmax(self._retriever_pool_logits(b.retrieval_queries, b.passages, 1.0) / tau, -1)
        safety.require_finite(pool_logp, "retriever scores", step)
        if rollout is None:
            with timed(stats, "time/retriever", dev), torch.no_grad():
                draw = (grpo.sample_without_replacement if o.grpo_retriever_estimator == "topk_heuristic"
                        else grpo.sample_with_replacement)
                idx = draw(pool_logp.detach(), k)
                ref_ret = self._require_reference("retriever")
                with dropout_disabled(ref_ret):
                    ref_pool_logp = torch.log_softmax(
                        self._retriever_pool_logits(b.retrieval_queries, b.passages, 1.0, model=ref_ret) / tau, -1)
            chosen = [[b.passages[i][j] for j in row] for i, row in enumerate(idx.tolist())]
            texts = [encoder_inputs(q, [p], 1, o.encoder_format) for q, plist in zip(b.queries, chosen) for p in plist]
            ids, mask = self.reader.tokenize_inputs(texts, o.text_maxlength)
            rollout = {"idx": idx, "ref_pool_logp": ref_pool_logp, "ids": ids.to(dev), "mask": mask.to(dev),
                       "old_sampled_logp": pool_logp.detach().gather(1, idx), "gen": None,
                       "old_pool_logp": pool_logp.detach(),
                       "contexts": sample_contexts([q for q in b.queries for _ in range(k)],
                                                   [[p] for plist in chosen for p in plist], 1)}
            if o.grpo_retriever_estimator in ("pool", "posterior") and train_retriever:
                with timed(stats, "time/pool_reward", dev):
                    rollout["pool_rewards"] = self._pool_rewards(b)
        answers = [a for a in b.answers for _ in range(k)]
        gen_loss, rollout["gen"] = self._generator_grpo(rollout["ids"], rollout["mask"], answers, stats, rollout["gen"],
                                                        rollout["contexts"])
        # A story's reward is the mean of its G replies' rewards; advantages across the k stories.
        story_reward = rollout["gen"]["rewards"].view(-1, k, o.grpo_group_size).mean(-1)
        loss = gen_loss
        if train_retriever and o.grpo_retriever_estimator in ("pool", "posterior"):
            pool_r = rollout["pool_rewards"]
            if o.grpo_retriever_estimator == "posterior":
                ret_loss, rstats = grpo.pool_posterior_loss(pool_logp, rollout["old_pool_logp"], rollout["ref_pool_logp"],
                                                            pool_r, o.grpo_retriever_target_temperature,
                                                            o.grpo_retriever_kl_coeff)
                stats.update({"grpo/retriever_moved": float(rstats["moved"]),
                              "grpo/retriever_target_entropy": float(rstats["target_entropy"])})
            else:
                ret_loss, rstats = grpo.pool_policy_loss(pool_logp, rollout["old_pool_logp"], rollout["ref_pool_logp"],
                                                         pool_r, o.grpo_clip_epsilon, o.grpo_retriever_kl_coeff)
                stats.update({"grpo/retriever_clip_frac": float(rstats["clip_frac"]),
                              "grpo/retriever_adv_abs": float(rstats["adv_abs"])})
            loss = loss + ret_loss
            ret_zero = pool_r.std(-1) < 1e-6
            stats.update({"loss/retriever": ret_loss.item(), "kl/retriever": float(rstats["kl"]),
                          "reward/pool_std": pool_r.std(-1).mean().item(),
                          "reward/pool_mean": pool_r.mean().item()})
            stats.update(_relevance_stats(b, rollout["idx"], pool_r))
        elif train_retriever:  # the drawn stories' rewards, compared with each other (k >= 2)
            if o.grpo_retriever_estimator == "rloo":
                # Unbiased for ∇E_{j~π}[R(j)] (README, "Joint GRPO"): i.i.d. draws, leave-one-out baseline.
                ret_adv = grpo.leave_one_out_advantages(story_reward)
                ret_zero = story_reward.std(-1) < 1e-6
            else:  # the biased heuristic, kept for ablations: top-k draws scored as single draws
                ret_adv, ret_zero = grpo.group_advantages(story_reward)
            ret_loss, rstats = grpo.retriever_policy_loss(pool_logp, rollout["old_sampled_logp"], rollout["ref_pool_logp"],
                                                          rollout["idx"], ret_adv, o.grpo_clip_epsilon,
                                                          o.grpo_retriever_kl_coeff)
            loss = loss + ret_loss
            stats.update({"loss/retriever": ret_loss.item(), "kl/retriever": float(rstats["kl"]),
                          "grpo/retriever_clip_frac": float(rstats["clip_frac"])})
        if train_retriever:
            stats["grpo/retriever_frac_zero_std"] = ret_zero.float().mean().item()
        if k > 1:  # one draw per query has no spread to report
            stats["reward/story_std"] = story_reward.std(-1).mean().item()
        if "retrieval/relevant_drawn" not in stats:
            stats.update(_relevance_stats(b, rollout["idx"]))
        return loss, rollout

    @torch.no_grad()
    def _pool_rewards(self, b):
        """[B, M] reward of each pool story for the pool estimators, deterministic (dropout off), so
        their advantages carry no reply-sampling noise: the reward of the greedy reply from the
        query and the story alone (the quantity top-1 evaluation measures), or with
        --retriever_signal evidence the reader's log-likelihood of the target's facts given it."""
        o, dev, reader = self.opts, self.device, self.reader
        if "fact_mask" in b:
            return evidence_scores(reader, b.queries, b.passages, b.labels, b.fact_mask, o).to(dev)
        texts = [encoder_inputs(q, [p], 1, o.encoder_format) for q, plist in zip(b.queries, b.passages) for p in plist]
        refs = [a for a, plist in zip(b.answers, b.passages) for _ in plist]
        replies = []
        with dropout_disabled(reader):
            for start in range(0, len(texts), 64):
                ids, mask = reader.tokenize_inputs(texts[start:start + 64], o.text_maxlength)
                replies += reader.generate_text(ids.to(dev), mask.to(dev), max_length=o.generation_max_length,
                                                min_length=o.generation_min_length)
        if "knowledge" in b:  # --retriever_signal knowledge: the share of the target's facts the reply gets
            r = knowledge_recall(replies, [k for k, plist in zip(b.knowledge, b.passages) for _ in plist])
        else:
            r = grpo_reward(replies, refs, **reward_options(o))["reward"]
        return r.to(dev).view(len(b.passages), -1)
