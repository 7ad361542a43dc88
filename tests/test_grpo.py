"""src.grpo checked against hand-computed values (arithmetic in the comments) and properties."""

import math

import pytest
import torch

from src.model import logprobs
from src.objectives import grpo, retriever_losses

LN2 = math.log(2.0)


def close(actual, expected, tol=1e-5):
    expected = torch.as_tensor(expected, dtype=torch.float32)
    actual = torch.as_tensor(actual).float()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, atol=tol, rtol=0), (actual, expected)


def logs(*ps):
    return torch.log(torch.tensor(ps, dtype=torch.float32))


# ----------------------------------------------------------------------------- advantages


def test_group_advantages_hand_values():
    # row 0: mean 2, unbiased var ((−1)² + 0² + 1²)/(3−1) = 1, std 1 -> (r−2)/(1+1e-4)
    # row 1: std 0 -> all advantages exactly 0, flagged
    adv, zero_std = grpo.group_advantages(torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]))
    close(adv[0], [-1 / 1.0001, 0.0, 1 / 1.0001], 1e-6)
    assert torch.equal(adv[1], torch.zeros(3))
    assert zero_std.tolist() == [False, True]


def test_group_advantages_unbiased_std_not_population():
    # [0,0,0,4]: mean 1, deviations −1,−1,−1,3, Σ² = 12, unbiased var 12/3 = 4, std 2
    # (the population std would be √3 ≈ 1.732) -> A = dev / (2 + 1e-4)
    adv, zero_std = grpo.group_advantages(torch.tensor([0.0, 0.0, 0.0, 4.0]))
    close(adv, [-1 / 2.0001, -1 / 2.0001, -1 / 2.0001, 3 / 2.0001], 1e-6)
    assert zero_std.shape == () and not bool(zero_std)


def test_group_advantages_properties():
    torch.manual_seed(0)
    rewards = torch.rand(5, 4, 6)
    adv, zero_std = grpo.group_advantages(rewards)
    assert adv.shape == rewards.shape and zero_std.shape == (5, 4)
    close(adv.mean(-1), torch.zeros(5, 4), 1e-6)
    # std + eps in the denominator: the unbiased std is just below 1
    assert ((adv.std(-1) < 1) & (adv.std(-1) > 0.99)).all()
    # a std just above the tolerance is normalized, one below is zeroed
    adv2, zs2 = grpo.group_advantages(torch.tensor([[0.0, 1e-5], [0.0, 1e-7]]))
    assert zs2.tolist() == [False, True] and torch.equal(adv2[1], torch.zeros(2))
    assert adv2[0, 1] > 0


def test_group_advantages_rejects_groups_of_one():
    with pytest.raises(ValueError, match="at least 2"):
        grpo.group_advantages(torch.ones(3, 1))
    with pytest.raises(ValueError, match="at least 2"):
        grpo.group_advantages(torch.tensor(1.0))


def test_zero_std_groups_give_finite_loss_and_zero_gradient():
    adv, zero_std = grpo.group_advantages(torch.full((1, 4), 0.7))
    assert zero_std.all()
    logp = torch.full((4, 3), -1.0, requires_grad=True)
    loss, stats = grpo.policy_loss(
        logp, logp.detach(), None, adv.reshape(-1), torch.ones(4, 3), 0.2, 0.1
    )
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(4, 3))


# ----------------------------------------------------------------------------- log-probs


def test_token_logprobs_hand_values():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]])  # [R=1, T=2, V=3]
    targets = torch.tensor([[2, 0]])
    # T=1: target 2 -> 3 − log(e + e² + e³) = 3 − log(30.192875) = 3 − 3.407606 = −0.407606
    # target 0 -> 1 − 3.407606 = −2.407606
    close(logprobs.token_logprobs(logits, targets), [[-0.407606, -2.407606]])
    # T=2: logits/2 = [0.5, 1, 1.5]; Σexp = 1.648721 + 2.718282 + 4.481689 = 8.848692,
    # log = 2.180269; target 2 -> 1.5 − 2.180269 = −0.680269, target 0 -> 0.5 − 2.180269
    close(logprobs.token_logprobs(logits, targets, 2.0), [[-0.680269, -1.680269]])


def test_token_logprobs_matches_log_softmax_and_tolerates_pad_ids():
    torch.manual_seed(1)
    logits = torch.randn(3, 4, 7, requires_grad=True)
    targets = torch.randint(0, 7, (3, 4))
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    out = logprobs.token_logprobs(logits, targets, temperature=0.7)
    close(out, expected.detach())
    out.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    padded = targets.clone()
    padded[:, -1] = -100  # HF's ignore id on masked positions must not crash the gather
    out_pad = logprobs.token_logprobs(logits.detach(), padded)
    assert torch.isfinite(out_pad).all()
    with pytest.raises(ValueError):
        logprobs.token_logprobs(logits, targets, temperature=0.0)


def test_token_logprobs_gradient_by_hand_and_against_autograd():
    # d logp / d logits = (onehot(target) − softmax) / T; softmax([1, 2, 3]) = [0.090031, 0.244728, 0.665241]
    logits = torch.tensor([[[1.0, 2.0, 3.0]]], requires_grad=True)
    logprobs.token_logprobs(logits, torch.tensor([[2]])).sum().backward()
    close(logits.grad[0], [[-0.090031, -0.244728, 0.334759]])
    # with T = 2 and an upstream gradient of 3: softmax([0.5, 1, 1.5]) = [0.186324, 0.307196, 0.506480]
    logits.grad = None
    (3 * logprobs.token_logprobs(logits, torch.tensor([[0]]), 2.0)).sum().backward()
    close(logits.grad[0], [[3 * (1 - 0.186324) / 2, -3 * 0.307196 / 2, -3 * 0.506480 / 2]])
    # random shapes, repeated targets, several temperatures: same values and gradients as autograd
    torch.manual_seed(3)
    for temp in (1.0, 0.7):
        x = torch.randn(4, 5, 11, dtype=torch.float64, requires_grad=True)
        t = torch.randint(0, 3, (4, 5))
        assert torch.autograd.gradcheck(lambda z: logprobs._TargetLogProb.apply(z, t, temp), (x,))  # float64 inside
        g = torch.randn(4, 5)
        ours = torch.autograd.grad((logprobs.token_logprobs(x.float(), t, temp) * g).sum(), x)[0]
        ref = torch.autograd.grad((torch.log_softmax(x.float() / temp, -1).gather(-1, t[..., None])[..., 0] * g).sum(), x)[0]
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, None])
@pytest.mark.parametrize("temp", [1.0, 0.6])
def test_linear_token_logprobs_equals_full_logits(chunk, temp):
    torch.manual_seed(4)
    h = torch.randn(2, 7, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 13, (2, 7))
    t[1, -1] = -100  # ignore ids are read as 0, like token_logprobs
    g = torch.randn(2, 7, dtype=torch.float64)
    ours = logprobs.linear_token_logprobs(h, w, t, temp, chunk_rows=chunk)
    gh, gw = torch.autograd.grad((ours * g).sum(), (h, w))
    ref = torch.log_softmax((h @ w.t()) / temp, -1).gather(-1, t.clamp(min=0)[..., None])[..., 0]
    rh, rw = torch.autograd.grad((ref * g).sum(), (h, w))
    assert ours.dtype == torch.float32 and ours.shape == (2, 7)
    torch.testing.assert_close(ours.double(), ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gh, rh, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw, rw, atol=1e-6, rtol=1e-5)


def test_linear_token_logprobs_by_hand_and_validation():
    # h = [1, 0], W rows [1, 0], [2, 0], [3, 0] -> logits [1, 2, 3]: target 2 -> −0.407606
    h = torch.tensor([[1.0, 0.0]], requires_grad=True)
    w = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]], requires_grad=True)
    out = logprobs.linear_token_logprobs(h, w, torch.tensor([2]))
    close(out, [-0.407606])
    out.sum().backward()
    # d/dh = W[2] − Σ softmax·W = 3 − (0.090031 + 2·0.244728 + 3·0.665241) = 0.424790 (first coordinate)
    close(h.grad, [[0.424790, 0.0]])
    # d/dW_j = (onehot − softmax)_j · h
    close(w.grad, [[-0.090031, 0.0], [-0.244728, 0.0], [0.334759, 0.0]])
    with pytest.raises(ValueError, match="temperature"):
        logprobs.linear_token_logprobs(h, w, torch.tensor([2]), 0.0)
    with pytest.raises(ValueError, match="does not match"):
        logprobs.linear_token_logprobs(h, w, torch.tensor([[2]]))
    hb, wb = h.detach().bfloat16().requires_grad_(True), w.detach().bfloat16().requires_grad_(True)
    out = logprobs.linear_token_logprobs(hb, wb, torch.tensor([2]))
    out.sum().backward()
    assert out.dtype == torch.float32 and hb.grad.dtype == wb.grad.dtype == torch.bfloat16


def test_linear_token_logprobs_under_bf16_autocast():
    """bf16 training (train.py's autocast): bf16 states, a float32 head; products in bf16,
    log-probs and gradients close to the float32 computation, gradients in the inputs' dtypes."""
    torch.manual_seed(5)
    x = torch.randn(12, 16)
    w = (torch.randn(50, 16) * 0.3).requires_grad_(True)
    t = torch.randint(0, 50, (12,))
    ref = logprobs.linear_token_logprobs(x, w, t, 0.8, chunk_rows=5)
    (ref_gw,) = torch.autograd.grad(ref.sum(), (w,))
    h = x.bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = logprobs.linear_token_logprobs(h, w, t, 0.8, chunk_rows=5)
    gh, gw = torch.autograd.grad(out.sum(), (h, w))
    assert out.dtype == torch.float32 and gh.dtype == torch.bfloat16 and gw.dtype == torch.float32
    torch.testing.assert_close(out, ref.detach(), atol=0.1, rtol=0.02)
    torch.testing.assert_close(gw, ref_gw, atol=0.05, rtol=0.05)


def test_token_logprobs_bf16_logits_give_float32():
    logits = torch.randn(2, 3, 5).to(torch.bfloat16)
    out = logprobs.token_logprobs(logits, torch.zeros(2, 3, dtype=torch.long))
    assert out.dtype == torch.float32


def test_sequence_logprob_hand_value():
    token_logp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, float("nan")]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    # [−1 −2, −4 −5] = [−3, −9]; the NaN on the pad position is dropped, not multiplied by 0
    close(grpo.sequence_logprob(token_logp, mask), [-3.0, -9.0])


# ----------------------------------------------------------------------------- KL


def test_kl_k3_hand_values():
    # logp = ref -> d = 0 -> e⁰ − 0 − 1 = 0
    close(grpo.kl_k3(logs(0.3, 0.9), logs(0.3, 0.9)), [0.0, 0.0])
    # logp = ln .5, ref = ln .25: d = −ln2 -> 0.5 + 0.693147 − 1 = 0.193147
    # logp = ln .25, ref = ln .5: d = +ln2 -> 2 − 0.693147 − 1 = 0.306853
    close(grpo.kl_k3(logs(0.5, 0.25), logs(0.25, 0.5)), [0.193147, 0.306853])


def test_kl_k3_nonnegative():
    torch.manual_seed(2)
    a, b = torch.randn(1000) * 3, torch.randn(1000) * 3
    assert (grpo.kl_k3(a, b) >= 0).all()


def test_categorical_kl_hand_value_and_properties():
    # 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.346574 − 0.202733 = 0.143841
    close(retriever_losses.categorical_kl(logs(0.5, 0.5), logs(0.25, 0.75)), 0.143841)
    close(retriever_losses.categorical_kl(logs(0.2, 0.8), logs(0.2, 0.8)), 0.0)
    torch.manual_seed(3)
    p = torch.log_softmax(torch.randn(6, 5), -1)
    q = torch.log_softmax(torch.randn(6, 5), -1)
    kl = retriever_losses.categorical_kl(p, q)
    assert kl.shape == (6,) and (kl > 0).all()
    # along dim 0: same values as transposing
    close(retriever_losses.categorical_kl(p.T, q.T, dim=0), kl)


def test_categorical_kl_ignores_zero_probability_entries_without_nan_grad():
    # π = [0.5, 0.5, 0] vs [0.25, 0.5, 0.25]: 0.5 ln 2 + 0.5 ln 1 + 0 = 0.346574
    logits = torch.tensor([0.0, 0.0, float("-inf")], requires_grad=True)
    logp = torch.log_softmax(logits, -1)
    kl = retriever_losses.categorical_kl(logp, logs(0.25, 0.5, 0.25))
    close(kl, 0.5 * LN2)
    kl.backward()
    assert torch.isfinite(logits.grad).all()


# ----------------------------------------------------------------------------- surrogate


def test_clipped_surrogate_hand_values():
    eps = 0.2
    ratio = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0])
    logp = torch.log(ratio).requires_grad_()
    loss, clipped = grpo.clipped_surrogate(logp, torch.zeros(5), adv, eps)
    # r=1.5, A=+1: min(1.5, 1.2) = 1.2 (clipped)   -> −1.2
    # r=1.5, A=−1: min(−1.5, −1.2) = −1.5           -> +1.5
    # r=0.5, A=+1: min(0.5, 0.8) = 0.5              -> −0.5
    # r=0.5, A=−1: min(−0.5, −0.8) = −0.8 (clipped) -> +0.8
    # r=1.1, A=+2: inside the clip, 2.2 = 2.2       -> −2.2 (equal terms: not clipped)
    close(loss, [-1.2, 1.5, -0.5, 0.8, -2.2])
    assert clipped.tolist() == [True, False, False, True, False]
    loss.sum().backward()
    # d(−r·A)/d logp = −A·r where unclipped; 0 where the constant clipped term is active:
    # [0, 1·1.5, −1·0.5, 0, −2·1.1]
    close(logp.grad, [0.0, 1.5, -0.5, 0.0, -2.2])


def test_clipped_surrogate_ratio_one_gradient_is_minus_a_grad_logp():
    torch.manual_seed(4)
    logits = torch.randn(3, 4, requires_grad=True)
    targets = torch.tensor([1, 0, 3])
    adv = torch.tensor([[0.7], [-1.3], [2.0]])

    def logp_of(z):
        return torch.log_softmax(z, -1).gather(-1, targets[:, None])

    logp = logp_of(logits)
    loss, clipped = grpo.clipped_surrogate(logp, logp.detach(), adv, 0.2)
    assert not clipped.any()
    loss.sum().backward()
    reference = logits.detach().clone().requires_grad_()
    (-(adv * logp_of(reference))).sum().backward()
    close(logits.grad, reference.grad, 1e-6)


def test_clipped_surrogate_broadcasts_advantages():
    logp = torch.zeros(2, 3)
    loss, clipped = grpo.clipped_surrogate(logp, logp, torch.tensor([[2.0], [-1.0]]), 0.2)
    close(loss, [[-2.0] * 3, [1.0] * 3])
    assert clipped.shape == (2, 3)


# ----------------------------------------------------------------------------- aggregation


PER_TOKEN = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
MASK = [[1, 1, 0], [1, 1, 1]]


@pytest.mark.parametrize(
    "loss_type, max_len, expected",
    [
        # reply 0: (1+2)/2 = 1.5; reply 1: (4+5+6)/3 = 5; mean = 3.25
        ("grpo", None, 3.25),
        # Σ real tokens = 3 + 15 = 18; / (R·T) = 18/6 = 3.0; with max_len 4: 18/8 = 2.25
        ("dr_grpo", None, 3.0),
        ("dr_grpo", 4, 2.25),
        # 18 / 5 real tokens = 3.6
        ("dapo", None, 3.6),
    ],
)
def test_aggregate_token_loss_hand_values(loss_type, max_len, expected):
    per_token = torch.tensor(PER_TOKEN)
    per_token[0, 2] = float("nan")  # a pad position's value must not leak
    for mask in (torch.tensor(MASK), torch.tensor(MASK, dtype=torch.bool)):
        close(grpo.aggregate_token_loss(per_token, mask, loss_type, max_len), expected)


def test_aggregate_token_loss_empty_reply_and_gradient():
    x = torch.tensor(PER_TOKEN, requires_grad=True)
    mask = torch.tensor([[0, 0, 0], [1, 1, 1.0]])
    # the empty reply counts 0/max(0,1) = 0: (0 + 5)/2 = 2.5
    out = grpo.aggregate_token_loss(x, mask, "grpo")
    close(out, 2.5)
    out.backward()
    # d/dx = mask / count / R: row 0 zero, row 1 1/3/2 = 1/6
    close(x.grad, [[0.0, 0.0, 0.0], [1 / 6] * 3])
    close(grpo.aggregate_token_loss(x, torch.zeros(2, 3), "dapo"), 0.0)


def test_aggregate_token_loss_rejects_unknown_type_and_bad_shapes():
    with pytest.raises(ValueError, match="unknown loss_type"):
        grpo.aggregate_token_loss(torch.ones(2, 3), torch.ones(2, 3), "ppo")
    with pytest.raises(ValueError):
        grpo.aggregate_token_loss(torch.ones(2, 3), torch.ones(2, 4), "grpo")


def test_masked_mean_hand_values():
    x = torch.tensor(PER_TOKEN)
    mask = torch.tensor(MASK)
    close(grpo.masked_mean(x, mask), 3.6)  # 18 / 5
    close(grpo.masked_mean(x, mask, dim=1), [1.5, 5.0])
    close(grpo.masked_mean(x, mask, dim=0), [2.5, 3.5, 6.0])  # (1+4)/2, (2+5)/2, 6/1
    close(grpo.masked_mean(x, torch.zeros(2, 3)), 0.0)
    close(grpo.masked_mean(x, torch.tensor([[1], [0]])), 2.0)  # broadcast: row 0 only


# ----------------------------------------------------------------------------- policy loss


def _policy_example():
    logp = logs(0.5, 0.5, 0.25, 0.5).reshape(2, 2).requires_grad_()
    # ratios [[1, 2], [1, 10]]; the 10 sits on a masked position
    old_logp = logs(0.5, 0.25, 0.25, 0.05).reshape(2, 2)
    ref_logp = logs(0.25, 0.5, 0.25, 0.125).reshape(2, 2)
    advantages = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1], [1, 0]])
    return logp, old_logp, ref_logp, advantages, mask


@pytest.mark.parametrize(
    "loss_type, max_len, expected",
    [
        # surrogate: (0,0) r=1,A=1 -> −1; (0,1) r=2,A=1 -> −min(2, 1.2) = −1.2 (clipped);
        # (1,0) r=1,A=−1 -> +1.  k3: (0,0) d = ln.25 − ln.5 = −ln2 -> 0.193147; others d = 0.
        # per token with β = 0.1: [−1 + 0.0193147, −1.2, 1] = [−0.9806853, −1.2, 1]
        # grpo: ((−0.9806853 − 1.2)/2 + 1)/2 = (−1.0903426 + 1)/2 = −0.0451713
        ("grpo", None, -0.0451713),
        # dapo: (−0.9806853 − 1.2 + 1)/3 = −1.1806853/3 = −0.3935618
        ("dapo", None, -0.3935618),
        # dr_grpo, max_len 4: −1.1806853/(2·4) = −0.1475857
        ("dr_grpo", 4, -0.1475857),
    ],
)
def test_policy_loss_hand_values(loss_type, max_len, expected):
    logp, old_logp, ref_logp, advantages, mask = _policy_example()
    loss, stats = grpo.policy_loss(
        logp, old_logp, ref_logp, advantages, mask, 0.2, 0.1, loss_type, max_len
    )
    close(loss, expected)
    close(stats["kl"], 0.193147 / 3)  # 0.0643824; the masked 0.636 does not count
    close(stats["clip_frac"], 1 / 3)
    close(stats["ratio_mean"], 4 / 3)  # (1 + 2 + 1)/3
    close(stats["ratio_max"], 2.0)  # the masked 10 does not count
    for value in stats.values():
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    assert logp.grad[1, 1] == 0  # masked token gets no gradient


def test_policy_loss_gradient_grpo_hand_value():
    logp, old_logp, ref_logp, advantages, mask = _policy_example()
    loss, _ = grpo.policy_loss(logp, old_logp, ref_logp, advantages, mask, 0.2, 0.1)
    loss.backward()
    # grpo weights: (0,·) 1/2/2 = 1/4, (1,0) 1/1/2 = 1/2.
    # (0,0): d(−rA)/dlogp = −1·1 = −1; d k3/dlogp = 1 − e^d = 1 − 0.5 = 0.5, ·β = 0.05 -> −0.95/4
    # (0,1): clipped -> surrogate 0, k3' = 1 − e⁰ = 0 -> 0
    # (1,0): −(−1)·1 = 1, k3' = 0 -> 1/2
    close(logp.grad, [[-0.2375, 0.0], [0.5, 0.0]])


def test_policy_loss_kl_term():
    logp, old_logp, ref_logp, advantages, mask = _policy_example()
    _, same = grpo.policy_loss(logp, old_logp, logp.detach(), advantages, mask, 0.2, 0.1)
    assert same["kl"].item() == 0.0
    _, diff = grpo.policy_loss(logp, old_logp, ref_logp, advantages, mask, 0.2, 0.1)
    assert diff["kl"].item() > 0
    # β = 0 or no reference: surrogate alone, reply 0 (−1 − 1.2)/2 = −1.1, reply 1 +1,
    # mean (−1.1 + 1)/2 = −0.05
    no_kl, stats = grpo.policy_loss(logp, old_logp, ref_logp, advantages, mask, 0.2, 0.0)
    close(no_kl, -0.05)
    assert stats["kl"].item() > 0  # still reported
    no_ref, stats = grpo.policy_loss(logp, old_logp, None, advantages, mask, 0.2, 0.1)
    close(no_ref, -0.05)
    assert stats["kl"].item() == 0.0
    with pytest.raises(ValueError):
        grpo.policy_loss(logp, old_logp, None, advantages[:, None], mask, 0.2, 0.1)


# ----------------------------------------------------------------------------- sampling


def test_sample_without_replacement_first_and_second_draw_frequencies():
    n = 20000
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = torch.log(probs).expand(n, 3)
    gen = torch.Generator().manual_seed(5)
    idx = retriever_losses.sample_without_replacement(logits, 2, generator=gen)
    assert idx.shape == (n, 2) and idx.dtype == torch.long
    assert (idx[:, 0] != idx[:, 1]).all()
    first = torch.bincount(idx[:, 0], minlength=3).float() / n
    # binomial sd ≤ √(0.25/20000) = 0.0035; tolerance ~4 sd
    close(first, probs, 0.015)
    # second draw is item 1: first 0 (0.5) then 0.3/0.5 -> 0.3; first 2 (0.2) then 0.3/0.8
    # -> 0.075; total 0.375. Item 0: 0.3·0.5/0.7 + 0.2·0.5/0.8 = 0.214286 + 0.125 = 0.339286
    second = torch.bincount(idx[:, 1], minlength=3).float() / n
    close(second[:2], [0.339286, 0.375], 0.015)


def test_sample_without_replacement_distinct_reproducible_and_validated():
    torch.manual_seed(6)
    logits = torch.randn(50, 6)
    a = retriever_losses.sample_without_replacement(logits, 6, torch.Generator().manual_seed(7))
    b = retriever_losses.sample_without_replacement(logits, 6, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert torch.equal(a.sort(-1).values, torch.arange(6).expand(50, 6))
    masked = torch.tensor([[0.0, float("-inf"), 0.0, 0.0]]).expand(200, 4)
    idx = retriever_losses.sample_without_replacement(masked, 3, torch.Generator().manual_seed(8))
    assert not (idx == 1).any()
    with pytest.raises(ValueError):
        retriever_losses.sample_without_replacement(logits, 7)
    with pytest.raises(ValueError):
        retriever_losses.sample_without_replacement(masked, 4)
    with pytest.raises(ValueError):
        retriever_losses.sample_without_replacement(logits[0], 2)


# ----------------------------------------------------------------------------- retriever


def test_retriever_policy_loss_hand_value():
    pool_logp = logs(0.5, 0.3, 0.2).reshape(1, 3).requires_grad_()
    sampled_idx = torch.tensor([[0, 2]])
    old = logs(0.25, 0.2).reshape(1, 2)  # ratios 0.5/0.25 = 2, 0.2/0.2 = 1
    ref = logs(1 / 3, 1 / 3, 1 / 3).reshape(1, 3)
    adv = torch.tensor([[1.0, -1.0]])
    loss, stats = retriever_losses.retriever_policy_loss(pool_logp, old, ref, sampled_idx, adv, 0.2, 0.1)
    # surrogate: r=2,A=1 -> −min(2, 1.2) = −1.2 (clipped); r=1,A=−1 -> +1; mean −0.1
    # KL = Σ p ln(3p) = 0.5 ln1.5 + 0.3 ln0.9 + 0.2 ln0.6
    #    = 0.2027326 − 0.0316082 − 0.1021651 = 0.0689593
    # loss = −0.1 + 0.1·0.0689593 = −0.0931041
    close(loss, -0.0931041)
    close(stats["kl"], 0.0689593)
    close(stats["clip_frac"], 0.5)
    close(stats["ratio_mean"], 1.5)
    no_ref, stats = retriever_losses.retriever_policy_loss(pool_logp, old, None, sampled_idx, adv, 0.2, 0.1)
    close(no_ref, -0.1)
    assert stats["kl"].item() == 0.0
    with pytest.raises(ValueError):
        retriever_losses.retriever_policy_loss(pool_logp, old, ref, sampled_idx[:, :1], adv, 0.2, 0.1)


def test_retriever_policy_loss_gradient_sign():
    scores = torch.tensor([[0.3, -0.2, 0.1, 0.4]], requires_grad=True)
    tau = 0.5
    pool_logp = torch.log_softmax(scores / tau, -1)
    sampled = torch.tensor([[1, 3]])
    before = pool_logp.detach().clone()
    old = before.gather(-1, sampled)  # same pool, same temperature -> ratio 1
    ref = before.clone()
    loss, stats = retriever_losses.retriever_policy_loss(
        pool_logp, old, ref, sampled, torch.tensor([[1.0, -1.0]]), 0.2, 0.1
    )
    close(stats["ratio_mean"], 1.0)
    loss.backward()
    with torch.no_grad():
        after = torch.log_softmax((scores - 0.1 * scores.grad) / tau, -1)
    assert after[0, 1] > before[0, 1]  # positive-advantage story goes up
    assert after[0, 3] < before[0, 3]  # negative-advantage story goes down


# ----------------------------------------------------------------------------- REINFORCE


def test_reinforce_loss_hand_value():
    seq_logp = logs(0.5, 0.25).requires_grad_()
    rewards = torch.tensor([1.0, 0.0])
    loss, stats = grpo.reinforce_loss(seq_logp, rewards)
    # b = 0.5; terms −(0.5)(−0.693147) = 0.346574, −(−0.5)(−1.386294) = −0.693147
    # mean = −0.173287
    close(loss, -0.173287)
    close(stats["reward_mean"], 0.5)
    loss.backward()
    close(seq_logp.grad, [-0.25, 0.25])  # −(r − b)/R
    with pytest.raises(ValueError):
        grpo.reinforce_loss(seq_logp, torch.ones(3))


def test_reinforce_loss_raises_probability_of_rewarded_sample():
    logits = torch.zeros(4, requires_grad=True)
    samples = torch.tensor([0, 1, 2, 0])
    rewards = torch.tensor([1.0, 0.0, 0.2, 1.0])
    seq_logp = torch.log_softmax(logits, -1)[samples]
    loss, _ = grpo.reinforce_loss(seq_logp, rewards)
    loss.backward()
    with torch.no_grad():
        p = torch.softmax(logits - 0.5 * logits.grad, -1)
    assert p[0] > 0.25  # the rewarded reply
    assert p[1] < 0.25  # the worst reply


def test_reinforce_end_to_end_with_token_logprobs():
    # toy "reader": per-position logits; sequence 0 (tokens 1,1) rewarded over sequence 1 (2,2)
    logits = torch.zeros(1, 3, 4).expand(2, 3, 4).clone().requires_grad_()
    targets = torch.tensor([[1, 1, 0], [2, 2, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    seq = grpo.sequence_logprob(logprobs.token_logprobs(logits, targets), mask)
    loss, _ = grpo.reinforce_loss(seq, torch.tensor([1.0, 0.0]))
    loss.backward()
    new = grpo.sequence_logprob(logprobs.token_logprobs(logits - logits.grad, targets), mask)
    assert new[0] > seq[0] and new[1] < seq[1]
    assert torch.equal(logits.grad[:, 2], torch.zeros(2, 4))  # pad position untouched


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_everything_follows_the_cuda_device():
    dev = torch.device("cuda")
    logits = torch.randn(2, 3, 5, device=dev, requires_grad=True)
    targets = torch.randint(0, 5, (2, 3), device=dev)
    mask = torch.ones(2, 3, device=dev)
    logp = logprobs.token_logprobs(logits, targets)
    adv, _ = grpo.group_advantages(torch.rand(1, 2, device=dev))
    loss, stats = grpo.policy_loss(logp, logp.detach(), logp.detach() - 0.1, adv[0], mask, 0.2, 0.1)
    loss.backward()
    assert all(v.device.type == "cuda" for v in stats.values())
    gen = torch.Generator(device=dev).manual_seed(0)
    pool = torch.log_softmax(torch.randn(2, 6, device=dev, requires_grad=True), -1)
    idx = retriever_losses.sample_without_replacement(pool.detach(), 3, gen)
    rl, rs = retriever_losses.retriever_policy_loss(
        pool, pool.detach().gather(-1, idx), pool.detach(), idx, torch.randn(2, 3, device=dev),
        0.2, 0.1,
    )
    rl.backward()
    assert idx.device.type == "cuda" and rs["kl"].device.type == "cuda"


# ----------------------------------------------------------------------------- unbiased retriever estimator
def _expected_update(logits, rewards, k, estimator):
    """Exact expectation, over every possible draw of k stories, of the gradient (w.r.t. the pool
    logits) of the retriever loss at μ = 1, β = 0; also returns the probability mass covered."""
    import itertools

    M = logits.shape[-1]
    p = torch.softmax(logits, -1)
    total = torch.zeros_like(logits)
    mass = 0.0
    if estimator == "rloo":
        draws = itertools.product(range(M), repeat=k)

        def prob(seq):
            return float(torch.prod(p[list(seq)]))
    else:  # ordered draws without replacement (Plackett-Luce)
        draws = itertools.permutations(range(M), k)

        def prob(seq):
            pr, left = 1.0, 1.0
            for j in seq:
                pr *= float(p[j]) / left
                left -= float(p[j])
            return pr
    for seq in draws:
        w = prob(seq)
        mass += w
        lg = logits.clone().requires_grad_(True)
        pool_logp = torch.log_softmax(lg, -1).unsqueeze(0)
        idx = torch.tensor([seq])
        r = rewards[idx]
        adv = retriever_losses.leave_one_out_advantages(r) if estimator == "rloo" else grpo.group_advantages(r)[0]
        loss, _ = retriever_losses.retriever_policy_loss(pool_logp, pool_logp.detach().gather(1, idx), None, idx, adv, 0.2, 0.0)
        loss.backward()
        total += w * lg.grad
    return total, mass


@pytest.mark.parametrize("M,k", [(4, 2), (5, 3), (4, 4), (6, 2), (3, 3)])
def test_rloo_expected_update_is_the_true_gradient_by_exact_enumeration(M, k):
    g = torch.Generator().manual_seed(M * 10 + k)
    for _ in range(3):
        logits = torch.randn(M, generator=g, dtype=torch.float64)
        rewards = torch.rand(M, generator=g, dtype=torch.float64)
        lg = logits.clone().requires_grad_(True)
        objective = (torch.softmax(lg, -1) * rewards).sum()  # E_{j~π}[R(j)]
        (true_grad,) = torch.autograd.grad(objective, lg)
        expected, mass = _expected_update(logits, rewards, k, "rloo")
        assert mass == pytest.approx(1.0, abs=1e-12)
        # Descending the loss ascends the objective: E[∇loss] = −∇E_π[R], to 1e-6 and better.
        torch.testing.assert_close(expected, -true_grad, atol=1e-9, rtol=0)


@pytest.mark.parametrize("M,k", [(4, 2), (5, 3), (4, 4)])
def test_rloo_update_is_zero_when_every_story_scores_alike(M, k):
    logits = torch.randn(M, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected, _ = _expected_update(logits, torch.full((M,), 0.7, dtype=torch.float64), k, "rloo")
    assert expected.abs().max() == 0


def test_topk_heuristic_is_biased_where_rloo_is_not():
    # The reason the default changed: at k = M the heuristic draws every story, so its set objective
    # is constant, yet its expected update is not 0 and not the gradient of E_π[R].
    logits = torch.tensor([1.0, 0.0, -0.5, 0.3], dtype=torch.float64)
    rewards = torch.tensor([0.9, 0.1, 0.4, 0.2], dtype=torch.float64)
    lg = logits.clone().requires_grad_(True)
    (true_grad,) = torch.autograd.grad((torch.softmax(lg, -1) * rewards).sum(), lg)
    heuristic, mass = _expected_update(logits, rewards, 4, "topk_heuristic")
    assert mass == pytest.approx(1.0, abs=1e-12)
    assert heuristic.abs().max() > 1e-3
    assert (heuristic + true_grad).abs().max() > 1e-3


def test_leave_one_out_advantages_hand_values_and_validation():
    r = torch.tensor([[1.0, 2.0, 6.0], [0.5, 0.5, 0.5]])
    # draw 0: 1 − (2 + 6)/2 = −3; draw 1: 2 − 3.5 = −1.5; draw 2: 6 − 1.5 = 4.5
    torch.testing.assert_close(retriever_losses.leave_one_out_advantages(r), torch.tensor([[-3.0, -1.5, 4.5], [0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="at least 2"):
        retriever_losses.leave_one_out_advantages(torch.tensor([[1.0]]))


def test_sample_with_replacement_frequencies_and_repeats():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    g = torch.Generator().manual_seed(0)
    draws = retriever_losses.sample_with_replacement(logits.expand(20000, 3), 2, generator=g)
    assert draws.shape == (20000, 2)
    for col in range(2):  # every column is a draw from π itself
        freq = torch.bincount(draws[:, col], minlength=3).float() / 20000
        torch.testing.assert_close(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.015, rtol=0)
    repeats = (draws[:, 0] == draws[:, 1]).float().mean()
    assert repeats == pytest.approx(0.49 + 0.04 + 0.01, abs=0.015)
    with pytest.raises(ValueError):
        retriever_losses.sample_with_replacement(logits, 0)
