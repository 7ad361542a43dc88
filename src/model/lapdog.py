"""The LAPDOG model: FiD reader + retriever (+ frozen references) and the training objectives.

`LapdogModel.forward(kind, batch, rollout=None, step=0, token_normalizer=None, sampling_only=False)`
is the single entry point that DDP wraps, so every gradient of a step flows through one wrapped
call. It returns ``(loss, stats, rollout, samples)``: nothing is read from or left on the model.
`step` is the optimizer step the forward is for (completed updates: --freeze_retriever_steps and
LAPDOG's retriever loss depend on it). Kinds (``LapdogModel.forward``'s table):
  sft        reader cross-entropy (stage 1, or stage 2 without a trained retriever)
  lapdog     reader cross-entropy + KL(softmax(gold/τ_g) ‖ softmax(score/τ_s)) on the retriever
  reinforce  REINFORCE on the reader (one sampled reply per example), optional LAPDOG retriever loss
  grpo       generator GRPO on the fused top n_context stories
  grpo_joint joint GRPO: k stories sampled from the retriever's pool, G replies per story
The batch (built by `make_batch`, outside the wrapped call) holds the texts, the retrieved stories
and the tokenized tensors; retrieval itself (an index search, collective) happens there too.
GRPO forwards return a `rollout` (samples, advantages, old and reference log-probs) so that
--grpo_num_iterations > 1 reuses the samples for further updates; ``sampling_only`` draws the
rollout and returns a zero loss (dapo samples every micro-batch before any loss, to know the
step's token count, then passes its divisor as ``token_normalizer``).
"""

import dataclasses

import torch
import torch.nn as nn

from src.data.prompts import encoder_inputs, retriever_passage_text, sample_contexts
from src.infra import safety
from src.infra.tracking import timed
from src.model.gold_scores import emdr_token_logprobs, evidence_scores, gold_scores
from src.model.reader import dropout_disabled
from src.model.retriever import retrieval_scores
from src.objectives import grpo, lapdog_losses
from src.objectives.retriever_estimators import ESTIMATORS
from src.objectives.rewards import grpo_reward, knowledge_recall, reward_options
from src.objectives.schedule import lapdog_retriever_trained, max_reply_tokens, retriever_frozen_at


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


def rollout_reply_tokens(rollout):
    """Real reply tokens of a GRPO rollout (a 0-d long tensor): generator GRPO's own, or those of
    joint GRPO's generator rollout under "gen"."""
    return rollout["gen"]["n_tokens"] if "gen" in rollout else rollout["n_tokens"]


@dataclasses.dataclass
class Pass:
    """One forward's inputs besides the batch, and what it produces besides the loss and rollout."""
    step: int                                  # completed optimizer updates
    token_normalizer: float | None = None      # dapo's divisor (grpo.dapo_normalizer), else None
    sampling_only: bool = False                # GRPO: draw the rollout, return a zero loss
    stats: dict = dataclasses.field(default_factory=dict)
    samples: list = dataclasses.field(default_factory=list)  # {prompt, story, reference, reply, reward}


class LapdogModel(nn.Module):
    def __init__(self, reader, retriever, opts, ref_reader=None, ref_retriever=None, passage_encoder=None):
        super().__init__()
        self.reader = reader
        self.retriever = retriever
        self.opts = opts
        # Frozen references live outside the module tree: DDP must not sync them, checkpoints must
        # not hold them (they are saved once under {checkpoint_dir}/reference/).
        # passage_encoder (--query_side_retriever_training): the frozen passage side of an untied
        # retriever, also outside the tree (no gradient, nothing for DDP to reduce). The index was
        # built with it, so its story embeddings come with the batch (b.passage_embeddings) and the
        # model keeps no per-story state.
        self.refs = {"reader": ref_reader, "retriever": ref_retriever, "passage_encoder": passage_encoder}

    @property
    def device(self):
        return next(self.reader.parameters()).device

    def forward(self, kind, batch, rollout=None, step=0, token_normalizer=None, sampling_only=False):
        """(loss, stats, rollout, samples) of objective `kind` on `batch` for optimizer step `step`
        (completed updates; the retriever's freeze and LAPDOG's retriever loss depend on it).
        ``samples``: rows of the replies this forward sampled, [] for objectives that sample none."""
        objectives = {"sft": self._sft, "lapdog": self._lapdog, "reinforce": self._reinforce,
                      "grpo": self._grpo, "grpo_joint": self._grpo_joint}
        if kind not in objectives:
            raise ValueError(f"unknown objective {kind!r}; expected one of {sorted(objectives)}")
        p = Pass(step, token_normalizer, sampling_only)
        loss, rollout = objectives[kind](batch, p, rollout)
        return loss, p.stats, rollout, p.samples

    # ---------------------------------------------------------------- supervised and LAPDOG
    def _sft(self, b, p, rollout):
        loss = self.reader(b.input_ids, b.attention_mask, b.labels)
        p.stats["loss/reader"] = loss.item()
        return loss, None

    def _retriever_pool_logits(self, queries, passage_lists, temperature, model=None, passage_embeddings=None):
        """Scores q·p/sqrt(H) of each query's stories, re-encoded (with gradient unless frozen).
        With --query_side_retriever_training the stories are not re-encoded: ``passage_embeddings``
        [B, M, H] (the batch's, read from the index) is their frozen passage side."""
        model = model or self.retriever
        o, dev = self.opts, self.device
        if self.refs["passage_encoder"] is not None:
            return self._query_side_pool_logits(model, queries, passage_embeddings, temperature)
        flat = [retriever_passage_text(x, o.retriever_format) for plist in passage_lists for x in plist]
        # Queries and stories in ONE forward: the word-embedding gradient is a dense [V, H]
        # buffer per forward call (47 MB for MiniLM), and building it twice cost more than the
        # padding of the shorter queries to the stories' length.
        enc = model.tokenize(list(queries) + flat, o.retriever_maxlength)
        emb = model(enc["input_ids"].to(dev), enc["attention_mask"].to(dev))
        q_emb, p_emb = emb[:len(queries)], emb[len(queries):].view(len(queries), -1, emb.shape[-1])
        return retrieval_scores(q_emb, p_emb) / temperature

    def _query_side_pool_logits(self, model, queries, passage_embeddings, temperature):
        """--query_side_retriever_training: queries through ``model`` (the trained query side, or a
        reference), stories as the index stores them: the frozen passage encoder's embeddings,
        made without gradient and without dropout when the index was built (``passage_embeddings``
        [B, M, H], looked up by make_batch). So the index is never stale, no story is re-encoded,
        nothing per story is kept, and the scores depend on the index alone (a resumed run, whose
        index is rebuilt or loaded from the same frozen encoder, scores exactly as an uninterrupted one)."""
        if passage_embeddings is None:
            raise ValueError("--query_side_retriever_training scores the pool against the index's stored story "
                             "embeddings, but the batch has no passage_embeddings (make_batch adds them)")
        o, dev = self.opts, self.device
        if passage_embeddings.shape[0] != len(queries):
            raise ValueError(f"passage_embeddings has {passage_embeddings.shape[0]} rows for {len(queries)} queries")
        enc = model.tokenize(list(queries), o.retriever_maxlength)
        q_emb = model(enc["input_ids"].to(dev), enc["attention_mask"].to(dev))
        return retrieval_scores(q_emb, passage_embeddings.to(device=q_emb.device, dtype=q_emb.dtype)) / temperature

    def _lapdog_retriever_loss(self, b, stats):
        with timed(stats, "time/retriever", self.device):
            loss = self._lapdog_retriever_objective(b, stats)
        stats["loss/retriever"] = loss.item()
        return loss

    def _lapdog_retriever_objective(self, b, stats):
        o = self.opts
        score_logits = self._retriever_pool_logits(b.retrieval_queries, b.passages, o.temperature_score,
                                                   passage_embeddings=b.get("passage_embeddings"))
        # The original targets: with --posterior_fact_swap the reader's own labels may be swapped ones.
        gold_labels = b.get("gold_labels", b.labels)
        if o.gold_score_mode == "emdr":
            # EMDR² as the original: per token, −log Σ_k softmax(s/τ_s)_k · p_τg(y_t | q, story k).
            token_logp, mask = emdr_token_logprobs(self.reader, b.queries, b.passages, gold_labels, o)
            loss = lapdog_losses.emdr_token_loss(token_logp, torch.log_softmax(score_logits, -1), mask)
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
            # whose gradient fits π to the tempered posterior π_k·p^(1/τ_g) (retriever_losses.pool_posterior_loss);
            # chit-chat rows (evidence 0) give 0, and no gradient: masked, since in floats their −log Σ π is
            # rounding noise whose gradient Adam scales up to full-size steps.
            evidence = gold / o.temperature_gold if "fact_mask" in b else gold
            per_row = -torch.logsumexp(torch.log_softmax(score_logits, -1) + evidence, dim=-1)
            if "fact_mask" in b:
                per_row = torch.where(b.fact_mask.any(-1).to(per_row.device), per_row, torch.zeros_like(per_row))
            loss = per_row.mean()
        else:
            target = torch.log_softmax(gold / o.temperature_gold, -1)
            score_logp = torch.log_softmax(score_logits, -1)
            if "knowledge" in b:  # --retriever_signal knowledge/evidence: chit-chat targets fit nothing (KL 0, no gradient)
                needs = torch.tensor([bool(k) for k in b.knowledge], device=target.device)[:, None]
                target = torch.where(needs, target, score_logp.detach())
                stats["retriever/knowledge_examples"] = needs.float().mean().item()
            rows = needs[:, 0] if "knowledge" in b else None  # (exactly: a KL of rounding noise is no zero gradient)
            loss = lapdog_losses.lapdog_kl_loss(target, score_logp, o.retriever_kl_reduction, rows=rows)
        stats["gold_score/mean"] = gold.mean().item()
        return loss

    def _lapdog(self, b, p, rollout):
        loss = self._lapdog_retriever_loss(b, p.stats)
        if not self.opts.fix_reader:
            reader_loss, _ = self._sft(b, p, None)
            loss = loss + reader_loss
        return loss, None

    # ---------------------------------------------------------------- REINFORCE
    def _reinforce(self, b, p, rollout):
        o, dev, stats = self.opts, self.device, p.stats
        with dropout_disabled(self.reader):
            hidden, mask = self.reader.encode(b.input_ids, b.attention_mask)
            source = self.reader.source_ids(b.input_ids)
            with timed(stats, "time/sampling", dev), torch.no_grad():
                replies = self.reader.sample(hidden.detach(), mask, 1, o.generation_max_length,
                                             temperature=1.0, min_length=o.generation_min_length, source_ids=source)
            with timed(stats, "time/reward", dev):
                r = self._rewards(replies, b.answers, p, sample_contexts(b.queries, b.passages, o.n_context))
            with timed(stats, "time/policy", dev):
                logp, tmask = self.reader.token_logprobs(hidden, mask, replies, min_length=o.generation_min_length,
                                                         source_ids=source)
        loss, rstats = grpo.reinforce_loss(grpo.sequence_logprob(logp, tmask), r["reward"].to(dev))
        stats["loss/reader"] = loss.item()
        if lapdog_retriever_trained(o, p.step):
            loss = loss + self._lapdog_retriever_loss(b, stats)
        return loss, None

    # ---------------------------------------------------------------- GRPO
    def _rewards(self, replies, answers, p, contexts, per_reply_answers=None):
        """Rewards of `replies` (n per answer), logged in ``p.stats``, their rows in ``p.samples``;
        `contexts` holds one (prompt, story) per answer."""
        o, stats = self.opts, p.stats
        texts = self.reader.decode(replies)
        refs = per_reply_answers or [a for a in answers for _ in range(len(texts) // len(answers))]
        r = grpo_reward(texts, refs, **reward_options(o))
        for key in ("f1", "rouge", "bleu", "length_ratio", "distinct3"):
            stats[f"reward/{key}"] = r[key].mean().item()
        stats["reward/mean"] = r["reward"].mean().item()
        n = len(texts) // len(contexts)
        p.samples = [{**contexts[i // n], "reference": ref, "reply": t, "reward": float(v)}
                     for i, (ref, t, v) in enumerate(zip(refs, texts, r["reward"].tolist()))]
        return r

    def _require_reference(self, name):
        if self.refs[name] is None:
            raise ValueError(f"GRPO needs the frozen reference {name}: pass ref_{name} to LapdogModel")
        return self.refs[name]

    def _generator_grpo(self, ids, mask_in, answers, p, rollout, contexts):
        """Clipped surrogate + β·KL on G replies per prompt; returns (loss, rollout)."""
        o, dev, G, stats = self.opts, self.device, self.opts.grpo_group_size, p.stats
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
                    r = self._rewards(replies, answers, p, contexts)
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
            if p.sampling_only:
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
                                        max_len=max_reply_tokens(o), normalizer=p.token_normalizer)
        rewards = rollout["rewards"]
        stats.update({"loss/reader": loss.item(), "kl/reader": float(pstats["kl"]),
                      "grpo/clip_frac": float(pstats["clip_frac"]), "grpo/ratio_mean": float(pstats["ratio_mean"]),
                      "grpo/frac_zero_std": rollout["zero_std"].float().mean().item(),
                      "reward/std": rewards.std(dim=-1, unbiased=True).mean().item(),
                      "reply_length": tmask.sum(-1).mean().item()})
        if "reward/mean" not in stats:
            stats["reward/mean"] = rewards.mean().item()
        return loss, rollout

    def _grpo(self, b, p, rollout):
        contexts = sample_contexts(b.queries, b.passages, self.opts.n_context)
        return self._generator_grpo(b.input_ids, b.attention_mask, b.answers, p, rollout, contexts)

    def _grpo_joint(self, b, p, rollout):
        o, dev, stats = self.opts, self.device, p.stats
        k, tau = o.grpo_retriever_group_size, o.grpo_retriever_temperature
        estimator = ESTIMATORS[o.grpo_retriever_estimator]
        train_retriever = not retriever_frozen_at(o, p.step)
        with timed(stats, "time/retriever", dev), dropout_disabled(self.retriever), \
                torch.set_grad_enabled(train_retriever):
            pool_logp = torch.log_softmax(self._retriever_pool_logits(
                b.retrieval_queries, b.passages, 1.0, passage_embeddings=b.get("passage_embeddings")) / tau, -1)
        safety.require_finite(pool_logp, "retriever scores", p.step)
        if rollout is None:
            with timed(stats, "time/retriever", dev), torch.no_grad():
                idx = estimator.draw(pool_logp.detach(), k)
                ref_ret = self._require_reference("retriever")
                with dropout_disabled(ref_ret):
                    # query side: the reference's queries against the same frozen stories as the policy's
                    ref_pool_logp = torch.log_softmax(self._retriever_pool_logits(
                        b.retrieval_queries, b.passages, 1.0, model=ref_ret,
                        passage_embeddings=b.get("passage_embeddings")) / tau, -1)
            chosen = [[b.passages[i][j] for j in row] for i, row in enumerate(idx.tolist())]
            texts = [encoder_inputs(q, [x], 1, o.encoder_format) for q, plist in zip(b.queries, chosen) for x in plist]
            ids, mask = self.reader.tokenize_inputs(texts, o.text_maxlength)
            rollout = {"idx": idx, "ref_pool_logp": ref_pool_logp, "ids": ids.to(dev), "mask": mask.to(dev),
                       "old_sampled_logp": pool_logp.detach().gather(1, idx), "gen": None,
                       "old_pool_logp": pool_logp.detach(),
                       "contexts": sample_contexts([q for q in b.queries for _ in range(k)],
                                                   [[x] for plist in chosen for x in plist], 1)}
            if estimator.scores_pool and train_retriever:
                with timed(stats, "time/pool_reward", dev):
                    rollout["pool_rewards"] = self._pool_rewards(b)
                if "knowledge" in b:  # --retriever_signal knowledge/evidence: rows without a fact give no gradient
                    facts = b.fact_mask.any(-1) if "fact_mask" in b else [bool(k) for k in b.knowledge]
                    rollout["signal_rows"] = torch.as_tensor(facts, dtype=torch.bool, device=dev)
        answers = [a for a in b.answers for _ in range(k)]
        gen_loss, rollout["gen"] = self._generator_grpo(rollout["ids"], rollout["mask"], answers, p, rollout["gen"],
                                                        rollout["contexts"])
        # A story's reward is the mean of its G replies' rewards; advantages across the k stories.
        story_reward = rollout["gen"]["rewards"].view(-1, k, o.grpo_group_size).mean(-1)
        loss = gen_loss
        if train_retriever:
            ret_loss, ret_stats, ret_zero = estimator.loss(pool_logp, rollout, story_reward, o)
            loss = loss + ret_loss
            stats.update(ret_stats)
            stats["loss/retriever"] = ret_loss.item()
            if estimator.scores_pool:
                pool_r = rollout["pool_rewards"]
                stats.update({"reward/pool_std": pool_r.std(-1).mean().item(), "reward/pool_mean": pool_r.mean().item()})
                stats.update(_relevance_stats(b, rollout["idx"], pool_r))
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
