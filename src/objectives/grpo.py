"""Tensor maths for GRPO and REINFORCE: advantages, log-probs, KL, clipped surrogates, losses.

Nothing here touches a model, a tokenizer or a file. Every function takes and returns tensors on
the caller's device. Shapes used below:

- ``R`` replies (prompts × group size, flattened), ``T`` reply tokens, ``V`` vocabulary.
- ``B`` retrieval queries, ``M`` candidate stories in a query's pool, ``k`` sampled stories.
- ``G`` members of one group (the replies of one prompt, or the k stories of one query).

Masks are ``[R, T]`` bool or float; any nonzero entry is a real token. Masked positions are
zeroed with ``torch.where`` rather than multiplied, so an ``inf``/``NaN`` sitting on a padding
position (e.g. a log-prob of a pad id) cannot leak into a loss or its gradient.

Statistics are returned as 0-d detached float tensors (not python floats) so that the caller can
all-reduce them across processes and move them to the host once per step.

The fixes of the original's defects that live here (see lapdog-behaviour.md, "Do not reproduce"):
the REINFORCE sign (loss = −(r − b)·log p), ``old_logp`` is whatever policy sampled (the ratio is
not forced to 1 here), the KL is a real per-token mean, G = 1 is refused instead of giving NaN,
zero-std groups get A = 0 and are reported, and the retriever ratio compares log-probabilities of
the same pool distribution.
"""

import torch

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")


def _as_bool(mask):
    return mask if mask.dtype == torch.bool else mask != 0


def _zero_where_masked(x, mask):
    return torch.where(_as_bool(mask), x, torch.zeros((), dtype=x.dtype, device=x.device))


def group_advantages(rewards, eps=1e-4, zero_std_tol=1e-6):
    """Group-normalized advantages A = (r − mean) / (std + eps) over the last dim.

    rewards: [..., G] float (G ≥ 2). std is the unbiased (n − 1) standard deviation.
    Returns (advantages [..., G], zero_std [...] bool). A group whose std is below
    ``zero_std_tol`` (all members scored alike) carries no signal: its advantages are exactly 0,
    not the noise that (r − mean)/eps would amplify. Advantages carry no gradient.
    """
    if rewards.dim() == 0 or rewards.shape[-1] < 2:
        size = "a scalar" if rewards.dim() == 0 else f"group size {rewards.shape[-1]}"
        raise ValueError(f"group_advantages needs at least 2 members per group, got {size}")
    r = rewards.detach().float()
    mean = r.mean(dim=-1, keepdim=True)
    std = r.std(dim=-1, keepdim=True, correction=1)
    zero_std = std.squeeze(-1) < zero_std_tol
    adv = (r - mean) / (std + eps)
    adv = torch.where(zero_std.unsqueeze(-1), torch.zeros_like(adv), adv)
    return adv, zero_std


def kl_k3(logp, ref_logp):
    """Per-token k3 estimator of KL(π‖π_ref) on tokens sampled from π.

    logp, ref_logp: same shape (log-probs of the sampled tokens). With d = ref − logp the value
    is exp(d) − d − 1, which is ≥ 0 everywhere and 0 iff logp == ref_logp; its expectation
    under π is the exact KL.
    """
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def clipped_surrogate(logp, old_logp, advantages, clip_eps):
    """Elementwise PPO-clipped surrogate loss.

    logp: [...] log-probs under the current policy (with grad); old_logp: same shape, from the
    policy that sampled (treated as a constant); advantages: broadcastable to logp (e.g. [R, 1]
    against [R, T]), treated as a constant.
    ratio = exp(logp − old_logp); loss = −min(ratio·A, clip(ratio, 1−ε, 1+ε)·A).
    Returns (loss [...], clipped [...] bool): clipped is True where the clipped term is strictly
    the smaller one, i.e. where the gradient through the ratio is cut off.
    """
    adv = advantages.detach()
    ratio = torch.exp(logp - old_logp.detach())
    unclipped_obj = ratio * adv
    clipped_obj = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    loss = -torch.minimum(unclipped_obj, clipped_obj)
    clipped = (clipped_obj < unclipped_obj).detach()
    return loss, clipped


def masked_mean(x, mask, dim=None):
    """Mean of x over positions where mask is nonzero; empty selections give 0, not NaN.

    x: any shape; mask: broadcastable to x. dim None -> scalar; otherwise reduce that dim.
    """
    m = _as_bool(mask).expand_as(x)
    total = _zero_where_masked(x, m)
    if dim is None:
        return total.sum() / m.sum().clamp(min=1)
    return total.sum(dim=dim) / m.sum(dim=dim).clamp(min=1)


def dapo_normalizer(total_tokens, n_micro_batches, world_size):
    """The divisor of one micro-batch's token sum under TRL's ``dapo``.

    total_tokens: real reply tokens of the whole accumulated batch summed over all processes
    (N); the trainer divides each micro-batch loss by the number of micro-batches A and DDP
    averages the P processes, so dividing each micro-batch's token sum by N / (A·P) makes the
    update Σ(all tokens' losses) / N: every token of the optimizer step weighs the same (TRL
    divides by N / P and does not divide by A). N is clamped ≥ 1.
    """
    if n_micro_batches < 1 or world_size < 1:
        raise ValueError(f"need ≥ 1 micro-batch and process, got {n_micro_batches} and {world_size}")
    return max(float(total_tokens), 1.0) / (n_micro_batches * world_size)


def aggregate_token_loss(per_token, mask, loss_type, max_len=None, normalizer=None):
    """Reduce a [R, T] per-token loss to a scalar.

    - ``grpo``: mean over each reply's own tokens (count clamped ≥ 1), then mean over replies;
      every reply weighs the same whatever its length.
    - ``dr_grpo``: sum over all real tokens / (R × max_len); max_len is the maximum number of
      reply tokens (TRL's max_completion_length; defaults to T), a constant, so no per-length
      normalization bias.
    - ``dapo``: sum over all real tokens / ``normalizer`` (``dapo_normalizer`` of the whole
      accumulated batch's token count across processes, as TRL); without one, this batch's own
      token count (the two agree for one micro-batch on one process).
    - ``bnpo``: sum over this micro-batch's real tokens / their number (clamped ≥ 1); averaged
      over micro-batches and processes by the trainer, it is a mean of per-micro-batch token
      means (TRL's ``bnpo``).
    """
    if per_token.dim() != 2 or per_token.shape != mask.shape:
        raise ValueError(
            f"per_token and mask must both be [R, T], got {tuple(per_token.shape)} "
            f"and {tuple(mask.shape)}"
        )
    m = _as_bool(mask)
    x = _zero_where_masked(per_token, m)
    if loss_type == "grpo":
        per_reply = x.sum(dim=-1) / m.sum(dim=-1).clamp(min=1)
        return per_reply.mean()
    if loss_type == "dr_grpo":
        length = per_token.shape[1] if max_len is None else max_len
        if length < 1:
            raise ValueError(f"max_len must be ≥ 1, got {length}")
        return x.sum() / (per_token.shape[0] * length)
    if loss_type == "dapo" and normalizer is not None:
        if not normalizer > 0:
            raise ValueError(f"the dapo normalizer must be > 0, got {normalizer}")
        return x.sum() / normalizer
    if loss_type in ("dapo", "bnpo"):
        return x.sum() / m.sum().clamp(min=1)
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")


def policy_loss(
    logp,
    old_logp,
    ref_logp,
    advantages,
    mask,
    clip_eps,
    kl_coeff,
    loss_type="grpo",
    max_len=None,
    normalizer=None,
):
    """GRPO loss of the generator.

    logp: [R, T] current log-probs of the sampled tokens (with grad); old_logp: [R, T] from the
    policy that sampled; ref_logp: [R, T] from the frozen reference, or None; advantages: [R]
    (one per reply, every token of a reply shares it); mask: [R, T].
    per-token = clipped_surrogate + kl_coeff · kl_k3(logp, ref_logp), reduced with
    aggregate_token_loss(loss_type, max_len, normalizer). ref_logp None or kl_coeff == 0 -> no KL term.
    Returns (loss scalar, stats) with stats 0-d detached tensors: ``kl`` (masked mean k3; 0 when
    ref_logp is None), ``clip_frac`` (masked fraction of clipped tokens), ``ratio_mean``,
    ``ratio_max`` (over real tokens; 1 when there are none).
    """
    if advantages.dim() != 1 or advantages.shape[0] != logp.shape[0]:
        raise ValueError(
            f"advantages must be [R] with R = {logp.shape[0]}, got {tuple(advantages.shape)}"
        )
    surrogate, clipped = clipped_surrogate(logp, old_logp, advantages.unsqueeze(-1), clip_eps)
    m = _as_bool(mask)
    per_token = surrogate
    if ref_logp is not None:
        k3 = kl_k3(logp, ref_logp.detach())
        if kl_coeff != 0:
            per_token = per_token + kl_coeff * k3
        kl_stat = masked_mean(k3.detach(), m)
    else:
        kl_stat = torch.zeros((), device=logp.device)
    loss = aggregate_token_loss(per_token, m, loss_type, max_len, normalizer)
    with torch.no_grad():
        ratio = torch.exp(logp - old_logp)
        if m.any():
            ratio_max = ratio[m].max()
        else:
            ratio_max = torch.ones((), device=logp.device)
        stats = {
            "kl": kl_stat,
            "clip_frac": masked_mean(clipped.float(), m),
            "ratio_mean": masked_mean(ratio, m),
            "ratio_max": ratio_max,
        }
    return loss, stats


def sequence_logprob(token_logp, mask):
    """log p(reply) = sum of the real tokens' log-probs. token_logp, mask: [R, T] -> [R]."""
    return _zero_where_masked(token_logp, mask).sum(dim=-1)


def reinforce_loss(seq_logp, rewards):
    """REINFORCE with a mean-reward baseline: loss = mean(−(r − b) · log p), b = mean(r).

    seq_logp: [R] log-probability of each sampled reply (with grad); rewards: [R].
    Descending this loss raises log p of above-baseline replies and lowers the others (the
    original minimized −R·NLL, which has the opposite sign). Returns (loss, stats) with
    ``reward_mean`` and ``seq_logp_mean`` (0-d detached tensors).
    """
    if seq_logp.shape != rewards.shape:
        raise ValueError(
            f"seq_logp and rewards must have the same shape, got {tuple(seq_logp.shape)} "
            f"and {tuple(rewards.shape)}"
        )
    r = rewards.detach().to(seq_logp.dtype)
    baseline = r.mean()
    loss = -((r - baseline) * seq_logp).mean()
    stats = {"reward_mean": baseline.detach(), "seq_logp_mean": seq_logp.detach().mean()}
    return loss, stats
