"""Token log-probabilities of the reader's replies: gather kernels that never hold the full
[rows, tokens, vocabulary] logits (their backward rebuilt chunk by chunk), and EOS-blocked
log-probabilities. Pure tensor maths; ``src/model/reader.py`` calls them."""

import torch


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
