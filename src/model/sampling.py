"""Drawing one token per row from next-token distributions (pure tensor code, no model).

Why not ``torch.multinomial``: on CPU it draws one exponential variate per vocabulary entry
(``exponential_`` over [rows, V]), which at V ≈ 30k cost ~15 ms per decoding step here, about
half of all sampling time. Inverse-CDF sampling needs one uniform variate per row: a cumulative
sum and a binary search.
"""

import torch


def categorical(probs, generator=None):
    """One index per row of ``probs`` [R, V] (non-negative, rows need not sum to 1) -> [R] long.

    Inverse CDF: u ~ U[0, total) per row, the first index whose cumulative mass exceeds u.
    An entry of probability 0 is never drawn (its cumulative mass equals its left neighbour's).
    Uses torch's global RNG unless ``generator`` is given.
    """
    if probs.dim() != 2:
        raise ValueError(f"probs must be [rows, vocab], got shape {tuple(probs.shape)}")
    cdf = probs.float().cumsum(-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, device=probs.device) * total
    idx = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    # u < total, so idx ≤ V − 1 in exact arithmetic; the clamp guards float rounding at the top.
    return idx.clamp_(max=probs.shape[-1] - 1)


def nucleus(probs, top_p):
    """Keep each row's smallest set of most probable entries whose mass reaches ``top_p``
    (ties broken by index order); zero the rest. The result is not renormalized
    (``categorical`` does not need it). ``top_p`` >= 1 returns ``probs`` unchanged."""
    if not 0 < top_p:
        raise ValueError(f"top_p must be > 0, got {top_p}")
    if top_p >= 1:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_p.cumsum(-1) - sorted_p
    total = sorted_p.sum(-1, keepdim=True)
    # An entry is dropped once the entries before it already hold top_p of the mass; the most
    # probable entry (mass_before = 0) is always kept.
    drop_sorted = mass_before >= top_p * total
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return probs.masked_fill(drop, 0.0)
