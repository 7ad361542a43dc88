"""LAPDOG's retriever losses (pure tensor maths): the KL to the gold-score target and EMDR²."""

import torch

from src.objectives.grpo import _as_bool, _zero_where_masked
from src.objectives.retriever_losses import categorical_kl


def lapdog_kl_loss(target_logp, score_logp, reduction="mean", rows=None):
    """LAPDOG's retriever loss KL(softmax(g/τ_g) ‖ softmax(s/τ_s)), reduced like torch's KLDivLoss.

    target_logp, score_logp: [B, K] log-probabilities (gold target, retriever). ``mean`` (the
    original's ``KLDivLoss()``): Σ_b KL_b / (B·K), a mean over all B·K terms; ``batchmean``:
    Σ_b KL_b / B, the mean KL per example (K times larger). ``rows``: [B] bool, the examples that
    count (None: all); the others give 0 and no gradient (the divisors stay B·K and B).
    """
    per_example = categorical_kl(target_logp, score_logp)
    if rows is not None:
        per_example = torch.where(rows.to(per_example.device), per_example, torch.zeros_like(per_example))
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
