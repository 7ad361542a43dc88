"""Joint GRPO's retriever side (pure tensor maths): drawing stories from the pool, the exact
categorical KL to the reference retriever, and the four estimators' losses (``pool``,
``posterior``, ``rloo``, ``topk_heuristic``; README "Joint GRPO" states each one's objective)."""

import torch

from src.objectives.grpo import clipped_surrogate


def categorical_kl(logp, ref_logp, dim=-1):
    """Exact KL(π‖π_ref) = Σ π (log π − log π_ref) along ``dim``.

    logp, ref_logp: log-probability vectors (from log_softmax), same shape. Returns that shape
    without ``dim``; ≥ 0, and 0 when the two are equal. Entries with π = 0 (logp = −inf, e.g. a
    padded pool slot) contribute 0, and give no NaN gradient.
    """
    support = logp > float("-inf")
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    lp = torch.where(support, logp, zero)
    ref = torch.where(support, ref_logp, zero)
    terms = torch.where(support, torch.exp(lp) * (lp - ref), zero)
    return terms.sum(dim=dim)


@torch.no_grad()
def sample_without_replacement(logits, k, generator=None):
    """k distinct indices per row, drawn from softmax(logits) without replacement.

    logits: [B, M] (pass score/τ to sample at temperature τ); −inf marks unusable entries.
    Gumbel-top-k: the k largest of logits + Gumbel noise are distributed as k successive draws
    without replacement, in draw order (column 0 is the first draw). generator: an optional
    torch.Generator on logits' device, for reproducible draws. Returns [B, k] long.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, M], got {tuple(logits.shape)}")
    available = int((logits > float("-inf")).sum(dim=-1).min()) if logits.numel() else 0
    if k < 1 or k > available:
        raise ValueError(
            f"cannot draw k={k} distinct items from rows with {available} usable entries "
            f"(pool size {logits.shape[-1]})"
        )
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device)
    # The clamp keeps log(0) from producing an infinite key (probability ~2^-24 per entry).
    gumbel = -torch.log(-torch.log(uniform.clamp(min=torch.finfo(uniform.dtype).tiny)))
    return torch.topk(logits.float() + gumbel, k, dim=-1).indices


@torch.no_grad()
def sample_with_replacement(logits, k, generator=None):
    """k independent draws per row from softmax(logits) (repeats allowed), [B, M] -> [B, k] long.

    Each column is one draw from the same distribution, so log π(j) of a drawn index is exactly
    the log-probability of that sampling event: what an unbiased score-function estimator and a
    PPO importance ratio need (Gumbel top-k draws are not, see ``retriever_estimator_loss``).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, M], got {tuple(logits.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, k, replacement=True, generator=generator)


def leave_one_out_advantages(rewards):
    """RLOO advantages A_i = r_i − mean_{l≠i} r_l over the last dim (k ≥ 2 i.i.d. draws).

    The baseline of draw i uses only the other draws, which are independent of it, so
    E[A_i ∇log π(j_i)] = ∇E_{j~π}[R(j)] exactly (Kool et al., 2019, "Buy 4 REINFORCE samples").
    Centred, not divided by the std: a group whose rewards differ only by noise gives updates as
    small as that noise, instead of full-size ones. Equal rewards give exactly 0.
    """
    if rewards.dim() == 0 or rewards.shape[-1] < 2:
        raise ValueError("leave_one_out_advantages needs at least 2 draws per group")
    r = rewards.detach()
    r = r if r.is_floating_point() else r.float()
    k = r.shape[-1]
    # r_i − mean_{l≠i} r_l = k/(k−1)·(r_i − mean r); deviations from the first draw keep a group
    # of equal rewards at exactly 0 in floating point.
    d = r - r[..., :1]
    return (d - d.mean(dim=-1, keepdim=True)) * (k / (k - 1))


def _row_mean(per_row, rows):
    """Mean over all B rows of a [B] loss, rows outside ``rows`` ([B] bool, or None: all) counting 0
    and contributing no gradient at all (torch.where, not a product: no 0·noise)."""
    if rows is None:
        return per_row.mean()
    return torch.where(rows.to(per_row.device), per_row, torch.zeros_like(per_row)).sum() / max(per_row.shape[0], 1)


def _pool_kl_term(pool_logp, ref_pool_logp, kl_coeff, rows=None):
    """(kl_coeff · mean exact KL(π_θ‖π_ref) over the pool, the KL as a detached stat); zeros
    without a reference. Shared by the retriever losses. ``rows``: the rows the term applies to
    (None: all); the stat is the mean over every row."""
    zero = torch.zeros((), device=pool_logp.device)
    if ref_pool_logp is None:
        return zero, zero
    per_row = categorical_kl(pool_logp, ref_pool_logp.detach())
    term = kl_coeff * _row_mean(per_row, rows) if kl_coeff != 0 else zero
    return term, per_row.mean().detach()


def pool_policy_loss(pool_logp, old_pool_logp, ref_pool_logp, rewards, clip_eps, kl_coeff, rows=None):
    """The retriever's PPO surrogate taken in expectation over its whole candidate pool.

    Every story j of the pool has a reward R_j (deterministic: the reward of the reader's greedy
    reply given the query and story j alone). Instead of sampling stories and scoring the draws,
    the surrogate is averaged over j ~ π_old exactly:
        loss = −Σ_j π_old(j) · min(ρ_j A_j, clip(ρ_j, 1 ± ε) A_j) + β · KL(π_θ ‖ π_ref),
        ρ_j = π_θ(j) / π_old(j),  A_j = R_j − Σ_l π_old(l) R_l.
    At π_θ = π_old its gradient is exactly −∇_θ E_{j~π_θ}[R_j] (Σ_j π ∇log π = 0 makes the
    baseline free), with no variance from drawing stories: the expected reward of a story drawn
    from the retriever is the objective, and top-1 retrieval is its zero-temperature limit.

    pool_logp: [B, M] log_softmax(score/τ) with grad; old_pool_logp: [B, M] of the policy the
    rewards were scored for (detached; −inf marks unusable entries); ref_pool_logp: [B, M] or
    None; rewards: [B, M]; rows: [B] bool, the queries that carry a signal (None: all): the others
    give neither the surrogate nor the KL, so no gradient (chit-chat under --retriever_signal
    knowledge/evidence). Returns (loss, stats) with ``kl``, ``clip_frac`` (π_old-weighted),
    ``ratio_mean``, ``adv_abs`` (π_old-weighted mean |A|), as 0-d detached tensors.
    """
    if not (pool_logp.shape == old_pool_logp.shape == rewards.shape):
        raise ValueError(
            f"pool_logp, old_pool_logp and rewards must share shape [B, M], got {tuple(pool_logp.shape)}, "
            f"{tuple(old_pool_logp.shape)}, {tuple(rewards.shape)}"
        )
    old = old_pool_logp.detach()
    usable = old > float("-inf")
    zero = torch.zeros((), dtype=pool_logp.dtype, device=pool_logp.device)
    old_p = torch.where(usable, old.exp(), zero)
    r = torch.where(usable, rewards.detach().to(pool_logp.dtype), zero)
    adv = r - (old_p * r).sum(dim=-1, keepdim=True)
    log_ratio = torch.where(usable, pool_logp - torch.where(usable, old, zero), zero)
    surrogate, clipped = clipped_surrogate(log_ratio, torch.zeros_like(log_ratio), adv, clip_eps)
    loss = _row_mean((old_p * surrogate).sum(dim=-1), rows)
    kl_term, kl_stat = _pool_kl_term(pool_logp, ref_pool_logp, kl_coeff, rows)
    loss = loss + kl_term
    with torch.no_grad():
        rows = max(pool_logp.shape[0], 1)
        stats = {
            "kl": kl_stat,
            "clip_frac": (old_p * clipped.to(old_p.dtype)).sum() / rows,
            "ratio_mean": (old_p * log_ratio.exp()).sum() / rows,
            "adv_abs": (old_p * adv.abs()).sum() / rows,
        }
    return loss, stats


def pool_posterior_loss(pool_logp, old_pool_logp, ref_pool_logp, rewards, beta, kl_coeff, rows=None):
    """The retriever's KL-regularized improvement step over its whole pool, fitted by cross-entropy.

    The step that maximizes E_{j~π}[A_j] − β·KL(π ‖ π_old) has the closed form
        t_j = π_old(j) · exp(A_j / β) / Z,   A_j = R_j − Σ_l π_old(l) R_l,
    (the baseline cancels in Z); the retriever is moved toward it by the forward KL, i.e.
        loss = −Σ_j t_j · log π_θ(j) + kl_coeff · KL(π_θ ‖ π_ref).
    Its gradient on story j's score is (π_θ(j) − t_j)/τ: a good story the retriever ranks low still
    gets a full-size push, where the expected-reward gradient π(j)·A_j (``pool_policy_loss``)
    vanishes with π(j) — and drifts toward the stories already on top. β is in the rewards' units:
    a reward gap of β multiplies a story's odds by e. Equal rewards give t = π_old: no update
    (chit-chat, where no story helps). With R = log p(y | story) and β = 1, t is the Bayesian
    posterior over the pool of the story given the reply; β > 1 tempers the reader's evidence
    against the retriever's prior.

    pool_logp: [B, M] log_softmax(score/τ) with grad; old_pool_logp: [B, M] detached (−inf marks
    unusable entries); ref_pool_logp: [B, M] or None; rewards: [B, M]; rows: [B] bool, the queries
    that carry a signal (None: all). A row outside it gives neither the cross-entropy nor the KL:
    no gradient at all. (Its equal rewards give t = π_old, but only up to rounding: a gradient of
    float noise, which Adam scales up to full-size steps, and the KL's pull back to π_ref then
    overshoots: the retriever drifted on chit-chat, KL 0 → 0.2 in 4 steps at β_r = 0.01.)
    Returns (loss, stats) with ``kl``, ``moved`` (total-variation distance of t from π_old),
    ``target_entropy``, 0-d detached.
    """
    if not (pool_logp.shape == old_pool_logp.shape == rewards.shape):
        raise ValueError(
            f"pool_logp, old_pool_logp and rewards must share shape [B, M], got {tuple(pool_logp.shape)}, "
            f"{tuple(old_pool_logp.shape)}, {tuple(rewards.shape)}"
        )
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    old = old_pool_logp.detach().to(pool_logp.dtype)
    usable = old > float("-inf")
    r = torch.where(usable, rewards.detach().to(pool_logp.dtype), torch.zeros_like(old))
    target = torch.softmax(torch.where(usable, old + r / beta, old), dim=-1)
    safe_logp = torch.where(usable, pool_logp, torch.zeros_like(pool_logp))
    loss = _row_mean(-(target * safe_logp).sum(dim=-1), rows)
    kl_term, kl_stat = _pool_kl_term(pool_logp, ref_pool_logp, kl_coeff, rows)
    with torch.no_grad():
        old_p = torch.where(usable, old.exp(), torch.zeros_like(old))
        logt = torch.where(target > 0, target.log(), torch.zeros_like(target))
        stats = {"kl": kl_stat, "moved": 0.5 * (target - old_p).abs().sum(-1).mean(),
                 "target_entropy": -(target * logt).sum(-1).mean()}
    return loss + kl_term, stats


def retriever_policy_loss(
    pool_logp,
    old_sampled_logp,
    ref_pool_logp,
    sampled_idx,
    advantages,
    clip_eps,
    kl_coeff,
):
    """GRPO loss of the retriever over its candidate pool.

    pool_logp: [B, M] log_softmax(score/τ) over each query's pool (with grad);
    old_sampled_logp: [B, k] log-probs of the sampled stories under the sampling retriever,
    from the SAME pool and temperature (so the ratio is 1 on the first update);
    ref_pool_logp: [B, M] from the frozen reference retriever, or None; sampled_idx: [B, k];
    advantages: [B, k] (normalized across the k stories of a query).
    loss = mean over B·k of the clipped surrogate + kl_coeff · mean over B of the exact
    categorical KL(π_θ‖π_ref) over the pool. Returns (loss, stats) with ``kl``, ``clip_frac``,
    ``ratio_mean`` (0-d detached tensors).
    """
    if sampled_idx.shape != old_sampled_logp.shape or sampled_idx.shape != advantages.shape:
        raise ValueError(
            f"sampled_idx, old_sampled_logp and advantages must share shape [B, k], got "
            f"{tuple(sampled_idx.shape)}, {tuple(old_sampled_logp.shape)}, "
            f"{tuple(advantages.shape)}"
        )
    sampled_logp = pool_logp.gather(-1, sampled_idx.long())
    surrogate, clipped = clipped_surrogate(sampled_logp, old_sampled_logp, advantages, clip_eps)
    loss = surrogate.mean()
    kl_term, kl_stat = _pool_kl_term(pool_logp, ref_pool_logp, kl_coeff)
    loss = loss + kl_term
    with torch.no_grad():
        stats = {
            "kl": kl_stat,
            "clip_frac": clipped.float().mean(),
            "ratio_mean": torch.exp(sampled_logp - old_sampled_logp).mean(),
        }
    return loss, stats
