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


def _add_target_grad(grad, target_idx, g, temperature):
    """Finish d(g·log softmax(z/t)[target])/dz in place: ``grad`` holds −g·softmax; add g at the
    targets (``target_idx`` with a trailing dim of 1, like ``g``) and apply the 1/t."""
    grad.scatter_add_(-1, target_idx, g)
    if temperature != 1.0:
        grad.div_(temperature)
    return grad


class _TargetLogProb(torch.autograd.Function):
    """log softmax(logits / t) at ``targets`` with a hand-written backward.

    Autograd's own graph for gather − logsumexp materializes four [R, T, V] tensors in backward
    (exp, product, the dense gather gradient, their sum); at V ≈ 30k each is ~100 MB and the step
    is bound by that memory traffic on CPU. Here backward builds one [R, T, V] buffer in place:
    −g·softmax, plus g at the target ids (3-10× faster backward measured on CPU).
    """

    @staticmethod
    def forward(ctx, logits, targets, temperature):
        scaled = logits if temperature == 1.0 else logits / temperature
        log_probs = torch.log_softmax(scaled, dim=-1)
        ctx.save_for_backward(log_probs, targets)
        ctx.temperature = temperature
        return log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def backward(ctx, grad_out):
        log_probs, targets = ctx.saved_tensors
        g = grad_out.unsqueeze(-1)
        grad = log_probs.exp().mul_(-g)  # −g · softmax
        return _add_target_grad(grad, targets.unsqueeze(-1), g, ctx.temperature), None, None


def token_logprobs(logits, targets, temperature=1.0):
    """log softmax(logits / temperature) at the target ids.

    logits: [R, T, V]; targets: [R, T] long. Returns [R, T] float32 (computed in float32 so a
    bf16 model still gets accurate ratios). Use the temperature the replies were sampled at, so
    that the scored policy is the sampling policy. Targets on padding positions are gathered
    anyway (negative ids such as −100 are read as id 0); the caller's mask discards them.
    Differentiable w.r.t. ``logits`` (a memory-lean custom backward, see ``_TargetLogProb``).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _TargetLogProb.apply(logits.float(), targets.long().clamp(min=0), float(temperature))


def _logprob_chunk_rows(vocab, device):
    """Rows per chunk of ``linear_token_logprobs``: ~16 MB of float32 logits on CPU (stays in
    cache, and below glibc's mmap threshold so buffers are reused instead of page-faulted in),
    ~1 GB on GPUs where fewer, larger kernels matter more."""
    budget = 2**30 if torch.device(device).type == "cuda" else 2**24
    return max(1, budget // (4 * vocab))


def _compute_dtype(hidden, weight):
    """dtype of the projection's products: autocast's when it is on (bf16 training), else the
    promotion of the inputs' dtypes (float32 states with a float32 head stay float32)."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk_logits(buf, hidden, weight, temperature):
    """float32 logits of the rows ``hidden`` (already in ``weight``'s dtype) written into the
    reused buffer ``buf``."""
    logits = buf[:hidden.shape[0]]
    if weight.dtype == torch.float32:
        torch.mm(hidden, weight.t(), out=logits)
    else:
        logits.copy_(hidden @ weight.t())
    if temperature != 1.0:
        logits.div_(temperature)
    return logits


class _LinearTargetLogProb(torch.autograd.Function):
    """log softmax(hidden @ weightᵀ / t) at ``targets``, chunked over rows, never holding the
    [N, V] logits: forward keeps only the inputs; backward recomputes each chunk's logits and
    turns them into the gradient (onehot − softmax)·g/t in place. One extra [chunk, d]×[d, V]
    product per chunk buys freedom from 4-5 full [N, V] float32 tensors (~120 MB each for 1k
    reply tokens at V = 30k). Every chunk reuses one buffer and works on it in place: on CPU a
    fresh multi-MB tensor per operation costs its page faults again, which measured as much as
    the matrix product itself. Products run in ``_compute_dtype`` (bf16 under bf16 autocast);
    the softmax, the log-probs and the weight gradient's accumulation are float32."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk):
        dtype = _compute_dtype(hidden, weight)
        w = weight.to(dtype)
        n = hidden.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        buf = torch.empty(min(chunk, n), weight.shape[0], dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk):
            logits = _chunk_logits(buf, hidden[s:s + chunk].to(dtype), w, temperature)
            picked = logits.gather(1, targets[s:s + chunk, None])[:, 0]
            top = logits.amax(1)
            out[s:s + chunk] = picked - logits.sub_(top[:, None]).exp_().sum(1).log_().add_(top)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.temperature, ctx.chunk, ctx.dtype = temperature, chunk, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets = ctx.saved_tensors
        temperature, chunk, dtype = ctx.temperature, ctx.chunk, ctx.dtype
        need_h, need_w = ctx.needs_input_grad[:2]
        w = weight.to(dtype)
        n = hidden.shape[0]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = None
        buf = torch.empty(min(chunk, n), weight.shape[0], dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk):
            h, g = hidden[s:s + chunk].to(dtype), grad_out[s:s + chunk, None].float()
            grad = _chunk_logits(buf, h, w, temperature)
            grad.sub_(grad.amax(1, keepdim=True)).exp_()
            grad.mul_(-g / grad.sum(1, keepdim=True))  # −g · softmax
            grad = _add_target_grad(grad, targets[s:s + chunk, None], g, temperature).to(dtype)
            if need_h:
                grad_h[s:s + chunk] = grad @ w
            if need_w:  # the first chunk allocates grad_w (no zero fill of a [V, d] buffer)
                if grad_w is None:
                    grad_w = (grad.t() @ h).float()
                elif dtype == torch.float32:
                    grad_w.addmm_(grad.t(), h)  # in place: no [V, d] temporary per chunk
                else:
                    grad_w.add_(grad.t() @ h)
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None


def linear_token_logprobs(hidden, weight, targets, temperature=1.0, chunk_rows=None):
    """``token_logprobs(hidden @ weightᵀ, targets, temperature)`` without the [.., V] logits.

    hidden: [..., d] (the states an output projection ``weight`` [V, d] turns into logits);
    targets: [...] long (negative ids read as 0, for the caller's mask to discard).
    Returns [...] float32, differentiable w.r.t. ``hidden`` and ``weight``. ``chunk_rows``:
    rows of logits formed at once (default: by device, see ``_logprob_chunk_rows``).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} does not match targets {tuple(targets.shape)}")
    chunk = chunk_rows or _logprob_chunk_rows(weight.shape[0], hidden.device)
    flat = _LinearTargetLogProb.apply(hidden.reshape(-1, hidden.shape[-1]), weight,
                                      targets.reshape(-1).long().clamp(min=0), float(temperature), int(chunk))
    return flat.view(targets.shape)


def log1mexp(a):
    """log(1 − exp(a)) for a ≤ 0, stable at both ends (−inf at a = 0); NaN-free gradients."""
    near_zero = a > -0.6931471805599453  # −ln 2: expm1 is exact there, log1p beyond
    safe = torch.full_like(a, -1.0)  # a value both branches handle, for the branch not taken
    return torch.where(near_zero, torch.log(-torch.expm1(torch.where(near_zero, a, safe))),
                       torch.log1p(-torch.exp(torch.where(near_zero, safe, a))))


def logprobs_without_token(logp, excluded_logp):
    """Log-probs under the distribution with one token removed and the rest renormalized:
    log p(y) − log(1 − p(x)), x the removed token (e.g. EOS before --generation_min_length).

    logp: log p(y) of the targets; excluded_logp: log p(x) at the same positions (same shape,
    from the same logits). Valid for targets y ≠ x (y = x has probability 0 there).
    """
    return logp - log1mexp(excluded_logp)


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


def lapdog_kl_loss(target_logp, score_logp, reduction="mean"):
    """LAPDOG's retriever loss KL(softmax(g/τ_g) ‖ softmax(s/τ_s)), reduced like torch's KLDivLoss.

    target_logp, score_logp: [B, K] log-probabilities (gold target, retriever). ``mean`` (the
    original's ``KLDivLoss()``): Σ_b KL_b / (B·K), a mean over all B·K terms; ``batchmean``:
    Σ_b KL_b / B, the mean KL per example (K times larger).
    """
    per_example = categorical_kl(target_logp, score_logp)
    if reduction == "mean":
        return per_example.sum() / target_logp.numel()
    if reduction == "batchmean":
        return per_example.mean()
    raise ValueError(f"unknown reduction {reduction!r}; expected mean or batchmean")


def emdr_token_loss(token_logp, score_logp, mask):
    """EMDR² as the original LAPDOG computes it: a per-token mixture over the K stories.

    token_logp: [B, K, T] log p(y_t | y_<t, query, story k) (the original takes them from
    log_softmax(logits / τ_g), held fixed); score_logp: [B, K] log softmax(s / τ_s) (with grad);
    mask: [B, T] real reply tokens. loss = −Σ_{b,t} log Σ_k π_bk·p_bk(y_t) / Σ mask: each token
    mixes the stories on its own (not the whole reply's likelihood).
    """
    mixed = torch.logsumexp(token_logp.detach() + score_logp.unsqueeze(-1), dim=1)  # [B, T]
    m = _as_bool(mask)
    return -_zero_where_masked(mixed, m).sum() / m.sum().clamp(min=1)


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


def _pool_kl_term(pool_logp, ref_pool_logp, kl_coeff):
    """(kl_coeff · mean exact KL(π_θ‖π_ref) over the pool, the KL as a detached stat); zeros
    without a reference. Shared by both retriever losses."""
    zero = torch.zeros((), device=pool_logp.device)
    if ref_pool_logp is None:
        return zero, zero
    kl = categorical_kl(pool_logp, ref_pool_logp.detach()).mean()
    return (kl_coeff * kl if kl_coeff != 0 else zero), kl.detach()


def pool_policy_loss(pool_logp, old_pool_logp, ref_pool_logp, rewards, clip_eps, kl_coeff):
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
    None; rewards: [B, M]. Returns (loss, stats) with ``kl``, ``clip_frac`` (π_old-weighted),
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
    loss = (old_p * surrogate).sum(dim=-1).mean()
    kl_term, kl_stat = _pool_kl_term(pool_logp, ref_pool_logp, kl_coeff)
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


def pool_posterior_loss(pool_logp, old_pool_logp, ref_pool_logp, rewards, beta, kl_coeff):
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
    unusable entries); ref_pool_logp: [B, M] or None; rewards: [B, M]. Returns (loss, stats) with
    ``kl``, ``moved`` (total-variation distance of t from π_old), ``target_entropy``, 0-d detached.
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
    loss = -(target * safe_logp).sum(dim=-1).mean()
    kl_term, kl_stat = _pool_kl_term(pool_logp, ref_pool_logp, kl_coeff)
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
