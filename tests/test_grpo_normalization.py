"""Loss normalisation across micro-batches and processes (dapo as TRL, bnpo), hand-computed.

The trainer divides each micro-batch loss by the number of micro-batches A and DDP averages the
gradients of the P processes; these tests replay that arithmetic on four micro-batches (A = 2,
P = 2) with different reply-token counts.
"""

import pytest
import torch

from src.infra.distributed import DistInfo
from src.objectives import grpo

# (rank, micro-batch) -> per-token losses [1, 3] and mask; token sums and counts in the comments
MICRO = {
    (0, 0): ([[1.0, 2.0, 9.0]], [[1, 1, 0]]),  # sum 3, 2 tokens
    (0, 1): ([[6.0, 9.0, 9.0]], [[1, 0, 0]]),  # sum 6, 1 token
    (1, 0): ([[1.0, 1.0, 1.0]], [[1, 1, 1]]),  # sum 3, 3 tokens
    (1, 1): ([[2.0, 2.0, 9.0]], [[1, 1, 0]]),  # sum 4, 2 tokens
}
A, P = 2, 2


def simulate(loss_type, normalizer=None):
    """The update a 2-process, 2-micro-batch step applies: (loss value, per-token gradients)."""
    xs = {key: torch.tensor(v, requires_grad=True) for key, (v, _) in MICRO.items()}
    per_rank = []
    for rank in range(P):
        total = 0.0
        for mb in range(A):
            x, mask = xs[(rank, mb)], torch.tensor(MICRO[(rank, mb)][1])
            total = total + grpo.aggregate_token_loss(x, mask, loss_type, normalizer=normalizer) / A
        per_rank.append(total)
    loss = sum(per_rank) / P  # DDP averages the ranks' gradients, i.e. of the ranks' losses
    loss.backward()
    return loss.item(), {key: x.grad for key, x in xs.items()}


def test_dapo_is_token_sum_over_the_whole_step_token_count():
    # N = 2 + 1 + 3 + 2 = 8 tokens over both processes, Σ = 3 + 6 + 3 + 4 = 16 -> 16 / 8 = 2.0
    normalizer = grpo.dapo_normalizer(8, A, P)
    assert normalizer == pytest.approx(8 / (A * P))  # = 2: each micro-batch's sum / 2, then / A, mean of P
    loss, grads = simulate("dapo", normalizer)
    assert loss == pytest.approx(2.0)
    for key, (_, mask) in MICRO.items():  # every real token of the step weighs 1/N, pads 0
        torch.testing.assert_close(grads[key], torch.tensor(mask, dtype=torch.float32) / 8)


def test_bnpo_is_the_mean_of_micro_batch_token_means():
    # per micro-batch token means 3/2, 6/1, 3/3, 4/2 = 1.5, 6, 1, 2 -> mean 2.625 (≠ dapo's 2.0)
    loss, grads = simulate("bnpo")
    assert loss == pytest.approx(2.625)
    # a token of the 1-token micro-batch weighs 1/(1·A·P) = 0.25, one of the 3-token one 1/12
    assert grads[(0, 1)][0, 0].item() == pytest.approx(0.25)
    assert grads[(1, 0)][0, 0].item() == pytest.approx(1 / 12)


def test_dapo_without_a_normalizer_is_the_local_token_mean_and_rejects_bad_ones():
    x, mask = torch.tensor(MICRO[(0, 0)][0]), torch.tensor(MICRO[(0, 0)][1])
    assert grpo.aggregate_token_loss(x, mask, "dapo").item() == pytest.approx(1.5)
    assert grpo.aggregate_token_loss(x, mask, "dapo", normalizer=0.5).item() == pytest.approx(6.0)
    with pytest.raises(ValueError, match="normalizer"):
        grpo.aggregate_token_loss(x, mask, "dapo", normalizer=0.0)
    assert grpo.dapo_normalizer(0, 2, 1) == pytest.approx(0.5)  # no tokens: N clamped to 1
    with pytest.raises(ValueError):
        grpo.dapo_normalizer(8, 0, 1)


def test_trainer_counts_the_reply_tokens_of_every_rollout():
    """dapo_normalizer sums generator and joint rollouts' tokens (one process: no all-reduce)."""
    from src.run.step import dapo_normalizer
    rollouts = [{"n_tokens": torch.tensor(3)}, {"gen": {"n_tokens": torch.tensor(5)}, "idx": torch.zeros(1)}]
    info = DistInfo(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    assert dapo_normalizer(rollouts, info) == pytest.approx(8 / 2)


def test_dapo_step_samples_first_then_divides_by_the_step_token_count(tiny_models, monkeypatch):
    """A sampling pass draws the rollout (zero loss, no policy log-probs); the loss pass then
    divides the token sum by the trainer's normalizer: with μ = 1, β = 0 and A = ±1 replies the
    per-token loss is −A, so the loss is −Σ_r A_r·len_r / normalizer."""
    from helpers import closed_book_batch, examples_with_story, fixed_rewards, grpo_model

    from src.model.lapdog import LapdogModel, rollout_reply_tokens

    monkeypatch.setattr(LapdogModel, "_rewards", fixed_rewards([1.0, 0.0, 0.0, 1.0]))
    model = grpo_model(tiny_models, "--grpo_loss_type", "dapo", "--grpo_kl_coeff", "0")
    batch = closed_book_batch(model, examples_with_story("train", 2))
    torch.manual_seed(0)
    with torch.no_grad():
        loss, stats, rollout, _ = model("grpo", batch, sampling_only=True)
    assert loss.item() == 0.0 and rollout["old_logp"] is None and "loss/reader" not in stats
    lengths = model.reader.reply_mask(rollout["replies"]).sum(-1)
    assert rollout_reply_tokens(rollout).item() == lengths.sum().item()
    loss, stats, _, _ = model("grpo", batch, rollout, token_normalizer=7.0)
    expected = -(rollout["adv"] * lengths).sum() / 7.0
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)
    assert stats["grpo/ratio_mean"] == 1.0


def test_dapo_training_logs_its_sampled_replies(tmp_path, tiny_models):
    """With --grpo_loss_type dapo the replies are drawn in a sampling pass before the loss pass;
    the rows of samples.jsonl are that pass's (a run used to log none: the loss pass, which
    reuses the rollout, samples nothing)."""
    import json

    from helpers import grpo_stage2, run, stage1

    s1 = tmp_path / "s1"
    run(stage1(s1, tiny_models, steps=2))
    ck = tmp_path / "dapo"
    run(grpo_stage2(ck, tiny_models, s1 / "checkpoint" / "latest", steps=2, extra=["--grpo_loss_type=dapo"]))
    rows = [json.loads(line) for line in open(ck / "samples.jsonl")]
    assert {r["step"] for r in rows} == {1, 2}
    assert all(r["reply"] is not None and r["reference"] and "reward" in r for r in rows)
