"""Joint GRPO's four estimators of the retriever's gradient, one function each, and their table.

Each estimator turns the pool's log-probabilities ``pool_logp`` [B, M] (with gradient), the
rollout its stories were drawn in, and the drawn stories' mean rewards ``story_reward`` [B, k]
into ``(loss, stats, zero_std)``: the retriever loss, the statistics it logs, and a [B] mask of
the queries whose rewards did not differ (no update, counted in ``grpo/retriever_frac_zero_std``).
README "Joint GRPO" states what each one estimates.

The rollout holds ``old_pool_logp`` / ``ref_pool_logp`` [B, M] (the policy that drew, the frozen
reference), ``old_sampled_logp`` and ``idx`` [B, k] (the draws) and, for the estimators that
score the whole pool, ``pool_rewards`` [B, M] and, with --retriever_signal knowledge/evidence,
``signal_rows`` [B] bool (the queries whose target has a fact-like word; the others give the
pool estimators no gradient, their KL to the reference included).
"""

import dataclasses
from typing import Callable

from src.objectives import grpo
from src.objectives.retriever_losses import (
    leave_one_out_advantages,
    pool_policy_loss,
    pool_posterior_loss,
    retriever_policy_loss,
    sample_with_replacement,
    sample_without_replacement,
)


def _no_spread(rewards):
    return rewards.std(-1) < 1e-6


def pool_estimator(pool_logp, rollout, story_reward, opts):
    """Every pool story's reward, the PPO surrogate in exact expectation over the pool."""
    loss, s = pool_policy_loss(pool_logp, rollout["old_pool_logp"], rollout["ref_pool_logp"], rollout["pool_rewards"],
                               opts.grpo_clip_epsilon, opts.grpo_retriever_kl_coeff, rows=rollout.get("signal_rows"))
    stats = {"grpo/retriever_clip_frac": float(s["clip_frac"]), "grpo/retriever_adv_abs": float(s["adv_abs"]),
             "kl/retriever": float(s["kl"])}
    return loss, stats, _no_spread(rollout["pool_rewards"])


def posterior_estimator(pool_logp, rollout, story_reward, opts):
    """Every pool story's reward, a KL-regularized improvement step π_old·exp(A/β) fitted by cross-entropy."""
    loss, s = pool_posterior_loss(pool_logp, rollout["old_pool_logp"], rollout["ref_pool_logp"],
                                  rollout["pool_rewards"], opts.grpo_retriever_target_temperature,
                                  opts.grpo_retriever_kl_coeff, rows=rollout.get("signal_rows"))
    stats = {"grpo/retriever_moved": float(s["moved"]), "grpo/retriever_target_entropy": float(s["target_entropy"]),
             "kl/retriever": float(s["kl"])}
    return loss, stats, _no_spread(rollout["pool_rewards"])


def _drawn_stories_loss(pool_logp, rollout, advantages, opts):
    loss, s = retriever_policy_loss(pool_logp, rollout["old_sampled_logp"], rollout["ref_pool_logp"], rollout["idx"],
                                    advantages, opts.grpo_clip_epsilon, opts.grpo_retriever_kl_coeff)
    return loss, {"kl/retriever": float(s["kl"]), "grpo/retriever_clip_frac": float(s["clip_frac"])}


def rloo_estimator(pool_logp, rollout, story_reward, opts):
    """k i.i.d. draws, each draw's baseline the mean of the others (unbiased for ∇E_{j~π}[R(j)])."""
    loss, stats = _drawn_stories_loss(pool_logp, rollout, leave_one_out_advantages(story_reward), opts)
    return loss, stats, _no_spread(story_reward)


def topk_heuristic_estimator(pool_logp, rollout, story_reward, opts):
    """The earlier, biased estimator kept for ablations: top-k draws scored as single draws."""
    advantages, zero = grpo.group_advantages(story_reward)
    loss, stats = _drawn_stories_loss(pool_logp, rollout, advantages, opts)
    return loss, stats, zero


@dataclasses.dataclass(frozen=True)
class RetrieverEstimator:
    loss: Callable          # (pool_logp, rollout, story_reward, opts) -> (loss, stats, zero_std)
    draw: Callable          # (pool_logp, k) -> [B, k] indices of the stories the reader gets
    scores_pool: bool       # needs the reward of every pool story (rollout["pool_rewards"])


ESTIMATORS = {
    "pool": RetrieverEstimator(pool_estimator, sample_with_replacement, scores_pool=True),
    "posterior": RetrieverEstimator(posterior_estimator, sample_with_replacement, scores_pool=True),
    "rloo": RetrieverEstimator(rloo_estimator, sample_with_replacement, scores_pool=False),
    "topk_heuristic": RetrieverEstimator(topk_heuristic_estimator, sample_without_replacement, scores_pool=False),
}
