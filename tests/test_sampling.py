"""src/model/sampling.py against hand-computed values and empirical frequencies."""

import pytest
import torch

from src.model.sampling import categorical, nucleus


class FixedUniform:
    """Stands in for torch.rand inside categorical: returns the given u values per row."""

    def __init__(self, values):
        self.values = torch.tensor(values).view(-1, 1)

    def __call__(self, shape, generator=None, device=None):
        assert tuple(shape) == tuple(self.values.shape)
        return self.values.clone()


def test_categorical_inverse_cdf_by_hand(monkeypatch):
    # cdf of [0.125, 0.0, 0.625, 0.25] is [0.125, 0.125, 0.75, 1.0] (exact in binary)
    probs = torch.tensor([[0.125, 0.0, 0.625, 0.25]] * 5)
    monkeypatch.setattr(torch, "rand", FixedUniform([0.0, 0.1249, 0.125, 0.7499, 0.75]))
    assert categorical(probs).tolist() == [0, 0, 2, 2, 3]  # index 1 (p = 0) is skipped
    # unnormalized rows: u is scaled by the row total (2.0 here), so 0.5·2 = 1.0 lands in index 1
    monkeypatch.setattr(torch, "rand", FixedUniform([0.5, 0.9999999]))
    assert categorical(torch.tensor([[0.5, 1.0, 0.5], [0.5, 1.0, 0.5]])).tolist() == [1, 2]


def test_categorical_frequencies_and_zero_mass():
    probs = torch.tensor([0.5, 0.0, 0.25, 0.125, 0.125]).repeat(20_000, 1)
    torch.manual_seed(0)
    draws = categorical(probs)
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert freq[1] == 0
    for got, p in zip(freq.tolist(), probs[0].tolist()):
        assert abs(got - p) < 4 * (p * (1 - p) / len(draws)) ** 0.5 + 1e-9
    torch.manual_seed(0)
    assert torch.equal(draws, categorical(probs))  # reproducible from the seed
    g = torch.Generator().manual_seed(5)
    assert categorical(probs[:3], generator=g).shape == (3,)
    with pytest.raises(ValueError, match="rows, vocab"):
        categorical(torch.ones(5))


def test_nucleus_by_hand():
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.25, 0.25, 0.5]])
    # row 0 sorted: 0.5, 0.3, 0.2; mass before: 0, 0.5, 0.8 -> top_p 0.8 keeps 0.5 and 0.3
    # row 1 sorted: 0.5, 0.25 (index 0), 0.25 (index 1); mass before 0, 0.5, 0.75
    kept = nucleus(probs, 0.8)
    assert torch.equal(kept, torch.tensor([[0.0, 0.5, 0.3], [0.25, 0.25, 0.5]]))
    kept = nucleus(probs, 0.6)
    assert torch.equal(kept, torch.tensor([[0.0, 0.5, 0.3], [0.25, 0.0, 0.5]])
                       ) or torch.equal(kept, torch.tensor([[0.0, 0.5, 0.3], [0.0, 0.25, 0.5]]))
    assert torch.equal(nucleus(probs, 0.1), torch.tensor([[0.0, 0.5, 0.0], [0.0, 0.0, 0.5]]))
    assert nucleus(probs, 1.0) is probs
    with pytest.raises(ValueError, match="top_p"):
        nucleus(probs, 0.0)


def test_nucleus_then_categorical_only_draws_kept_tokens():
    probs = torch.softmax(torch.randn(64, 50, generator=torch.Generator().manual_seed(1)), -1)
    kept = nucleus(probs, 0.5)
    torch.manual_seed(2)
    draws = categorical(kept)
    assert (kept.gather(1, draws[:, None]) > 0).all()
    # every row keeps the fewest tokens reaching 0.5: dropping its smallest kept entry falls below
    for row_p, row_k in zip(probs, kept):
        nz = row_k[row_k > 0]
        assert nz.sum() >= 0.5 - 1e-6 and nz.sum() - nz.min() < 0.5
