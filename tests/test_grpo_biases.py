"""Small biases of the GRPO loss, fixed: the scored log-probs block EOS before
--generation_min_length as the sampler does, and dr_grpo divides by the most reply tokens."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import batch_one, eos_bias, tiny_t5

from src.model import logprobs
from src.model.lapdog import LapdogModel
from src.model.reader import FiDReader
from src.objectives.schedule import max_reply_tokens


def test_log1mexp_hand_values_and_finite_gradients():
    a = torch.tensor([math.log(0.5), math.log(0.9), math.log(1e-6), -50.0], requires_grad=True)
    out = logprobs.log1mexp(a)
    # log(1 − 0.5), log(0.1), log(1 − 1e-6) ≈ −1e-6, log(1 − e^−50) ≈ −e^−50
    torch.testing.assert_close(out.detach(), torch.tensor([math.log(0.5), math.log(0.1), -1e-6, 0.0]),
                               atol=1e-7, rtol=1e-5)
    out.sum().backward()
    # d/da log(1 − e^a) = −e^a / (1 − e^a): −1, −9, ≈ −1e-6, ≈ 0
    torch.testing.assert_close(a.grad, torch.tensor([-1.0, -9.0, -1e-6, 0.0]), atol=1e-6, rtol=1e-4)
    assert logprobs.log1mexp(torch.tensor([0.0])).item() == float("-inf")


def test_logprobs_without_token_hand_values():
    # p = (0.5 y, 0.3 other, 0.2 EOS): without EOS, p(y) = 0.5 / 0.8 = 0.625
    got = logprobs.logprobs_without_token(torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.2])))
    torch.testing.assert_close(got, torch.log(torch.tensor([0.625])))


def blocked_reference(reader, hidden, fmask, targets, temperature, min_length):
    """log softmax of the model's full logits with EOS at −inf before min_length − 1 tokens."""
    rep = targets.shape[0] // hidden.shape[0]
    logits = reader._decoder_pass(hidden.repeat_interleave(rep, 0), fmask.repeat_interleave(rep, 0),
                                  decoder_input_ids=reader.model._shift_right(targets)).logits.float()
    blocked = logits.clone()
    blocked[:, :min_length - 1, reader.eos_token_id] = float("-inf")
    return F.log_softmax(blocked / temperature, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("fused", [True, False])
def test_token_logprobs_block_eos_like_the_sampler(tokenizer, fused):
    """Values and gradients equal log softmax over the EOS-blocked logits, on both projection
    paths. EOS is made likely, p(EOS) up to about 0.98 (a 3.84-nat gap), so the blocked
    mass is large; float32 keeps 1e-4 while 1 − p(EOS) ≫ 1e-7 · |logits|."""
    reader = FiDReader(tiny_t5(tokenizer, seed=4), tokenizer)
    ids, mask, _ = batch_one(reader, n=2)
    hidden, fmask = reader.encode(ids, mask)
    hidden = hidden.detach()
    min_length, temp = 4, 0.8
    if fused:  # no hook on the fused path: point EOS's projection row along the mean decoder state
        from src.model.reader import _output_projection_removed
        start = torch.full((hidden.shape[0], min_length), reader.decoder_start_token_id)
        with torch.no_grad():
            with _output_projection_removed(reader.model):
                m = reader._decoder_pass(hidden, fmask, decoder_input_ids=start).logits.mean((0, 1))
            reader.model.lm_head.weight[reader.eos_token_id] = 12.0 * m / m.pow(2).sum()
    handle = None if fused else eos_bias(reader.model, 9.0)
    try:
        torch.manual_seed(0)
        replies = reader.sample(hidden, fmask, 3, max_length=8, temperature=temp, min_length=min_length)
        assert not (replies[:, :min_length - 1] == reader.eos_token_id).any()
        results = []
        for ours in (True, False):
            h = hidden.clone().requires_grad_(True)
            if ours:
                logp, tmask = reader.token_logprobs(h, fmask, replies, temperature=temp, min_length=min_length)
            else:
                logp = blocked_reference(reader, h, fmask, replies, temp, min_length)
            (logp * tmask).sum().backward()
            results.append((logp.detach(), h.grad))
        unblocked, _ = reader.token_logprobs(hidden, fmask, replies, temperature=temp)
    finally:
        if handle is not None:
            handle.remove()
    on = tmask.bool()
    torch.testing.assert_close(results[0][0][on], results[1][0][on], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-4, rtol=1e-3)
    gap = (results[0][0] - unblocked)[:, :min_length - 1]
    assert gap.min() > 0 and gap.max() > 1.0  # without the block the log-probs are biased low
    torch.testing.assert_close(results[0][0][:, min_length - 1:], unblocked[:, min_length - 1:])


def test_dr_grpo_divides_by_the_most_reply_tokens(tiny_models, monkeypatch):
    """μ = 1, β = 0: the per-token loss is −A, so dr_grpo's loss is −Σ_r A_r·len_r / (R·(max_length − 1)):
    --generation_max_length counts the decoder start token, which is never a reply token."""
    from helpers import closed_book_batch, examples_with_story, fixed_rewards, grpo_model

    monkeypatch.setattr(LapdogModel, "_rewards", fixed_rewards([1.0, 0.0, 0.0, 1.0]))
    model = grpo_model(tiny_models, "--grpo_loss_type", "dr_grpo", "--grpo_kl_coeff", "0")
    assert max_reply_tokens(model.opts) == model.opts.generation_max_length - 1
    batch = closed_book_batch(model, examples_with_story("train", 2))
    torch.manual_seed(0)
    loss, _, rollout, _ = model("grpo", batch)
    replies = rollout["replies"]
    assert replies.shape[1] <= max_reply_tokens(model.opts)
    lengths = model.reader.reply_mask(replies).sum(-1)
    expected = -(rollout["adv"] * lengths).sum() / (replies.shape[0] * (model.opts.generation_max_length - 1))
    torch.testing.assert_close(loss.detach(), expected, atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def tokenizer():
    from src.model.build import build_reader_tokenizer
    return build_reader_tokenizer()
