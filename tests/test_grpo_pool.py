"""The pool estimator of the retriever (retriever_losses.pool_policy_loss): exact gradient, clipping, masks."""

import pytest
import torch

from src.objectives import retriever_losses


def _update(logits, rewards, old_logits=None, clip=0.2, ref=None, beta=0.0):
    lg = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(lg, -1)
    old = torch.log_softmax(logits if old_logits is None else old_logits, -1)
    loss, stats = retriever_losses.pool_policy_loss(logp, old, ref, rewards, clip, beta)
    loss.backward()
    return loss, lg.grad, stats


@pytest.mark.parametrize("M", [2, 3, 5, 6])
def test_pool_update_is_minus_the_true_gradient_of_expected_reward(M):
    g = torch.Generator().manual_seed(M)
    logits = torch.randn(3, M, generator=g, dtype=torch.float64)
    rewards = torch.rand(3, M, generator=g, dtype=torch.float64)
    lg = logits.clone().requires_grad_(True)
    objective = (torch.softmax(lg, -1) * rewards).sum(-1).mean()  # mean over queries of E_{j~π}[R_j]
    (true_grad,) = torch.autograd.grad(objective, lg)
    _, grad, stats = _update(logits, rewards)
    torch.testing.assert_close(grad, -true_grad, atol=1e-12, rtol=0)
    assert float(stats["ratio_mean"]) == pytest.approx(1.0) and float(stats["clip_frac"]) == 0.0


def test_pool_update_is_zero_when_every_story_scores_alike():
    logits = torch.randn(2, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    loss, grad, stats = _update(logits, torch.full((2, 5), 0.4, dtype=torch.float64))
    assert grad.abs().max() < 1e-15 and float(stats["adv_abs"]) < 1e-15


def test_pool_hand_values_with_a_moved_policy_and_clipping():
    # π_old = (0.5, 0.5), R = (1, 0): A = (0.5, −0.5). π_θ = (0.8, 0.2): ρ = (1.6, 0.4).
    old = torch.log(torch.tensor([[0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.8, 0.2]]))
    r = torch.tensor([[1.0, 0.0]])
    loss, _ = retriever_losses.pool_policy_loss(new, old, None, r, 0.2, 0.0)
    # story 0: −min(1.6·0.5, 1.2·0.5) = −0.6; story 1: −min(0.4·(−0.5), 0.8·(−0.5)) = 0.4
    assert float(loss) == pytest.approx(0.5 * -0.6 + 0.5 * 0.4)
    lg = new.clone().requires_grad_(True)
    loss, stats = retriever_losses.pool_policy_loss(torch.log_softmax(lg, -1), old, None, r, 0.2, 0.0)
    loss.backward()
    assert lg.grad.abs().max() == 0  # both terms clipped: the policy moved far enough
    assert float(stats["clip_frac"]) == pytest.approx(1.0)


def test_pool_ignores_unusable_entries_and_adds_the_kl():
    logits = torch.tensor([[0.3, -0.2, float("-inf")]])
    r = torch.tensor([[1.0, 0.0, 100.0]])  # the masked entry's reward must not leak into the baseline
    loss, grad, stats = _update(logits, r)
    assert torch.isfinite(grad).all() and grad[0, 2] == 0
    p = torch.softmax(logits[:, :2], -1)
    assert float(stats["adv_abs"]) == pytest.approx(float(2 * p[0, 0] * p[0, 1]), rel=1e-6)
    ref = torch.log_softmax(torch.tensor([[0.0, 0.0, float("-inf")]]), -1)
    loss_kl, _, stats = _update(logits, r, ref=ref, beta=0.5)
    assert float(loss_kl - loss) == pytest.approx(0.5 * float(stats["kl"])) and float(stats["kl"]) > 0
    with pytest.raises(ValueError, match="share shape"):
        retriever_losses.pool_policy_loss(torch.zeros(1, 3), torch.zeros(1, 2), None, torch.zeros(1, 3), 0.2, 0.0)
