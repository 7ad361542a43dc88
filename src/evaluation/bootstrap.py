"""Paired bootstrap confidence intervals for "arm minus control" on the same test examples.

``differences[s][i]`` is the arm's score minus the control's on example i for seed s (each seed's
arm against the same seed's control). The statistic is the mean over seeds and examples; one
bootstrap replicate draws N example indices with replacement and takes the mean of those columns
over all seeds (examples are resampled, seeds pooled), so the interval reflects which test
examples happened to be chosen, and the seeds' spread enters through their mean. Percentile
interval: the replicates' (α/2, 1 − α/2) quantiles.
"""

import numpy as np


def paired_bootstrap_ci(differences, n_resamples=10_000, alpha=0.05, seed=0):
    """(mean, low, high) of the mean paired difference and its 1 − ``alpha`` percentile interval.

    ``differences``: [S, N] (S seeds, N examples) or [N]; a fixed ``seed`` makes it reproducible."""
    d = np.atleast_2d(np.asarray(differences, dtype=np.float64))
    if d.shape[1] == 0:
        raise ValueError("paired_bootstrap_ci needs at least one example")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    per_example = d.mean(axis=0)  # the mean over seeds of each example's difference
    rng = np.random.default_rng(seed)
    replicates = np.empty(n_resamples)
    for start in range(0, n_resamples, 1000):  # 1000 replicates at a time: [1000, N] indices
        size = min(1000, n_resamples - start)
        idx = rng.integers(0, d.shape[1], size=(size, d.shape[1]))
        replicates[start:start + size] = per_example[idx].mean(axis=1)
    low, high = np.quantile(replicates, [alpha / 2, 1 - alpha / 2])
    return float(per_example.mean()), float(low), float(high)


def seed_t_interval(values, alpha=0.05):
    """(mean, low, high) of per-seed values (each seed's arm − control mean, say): Student's t
    interval with S − 1 degrees of freedom, the seeds taken as the sample. Where the bootstrap above
    asks which test examples happened to be drawn, this asks which training seeds did; with 3 seeds
    it is wide (t = 4.30). low / high are nan with fewer than 2 seeds."""
    from scipy import stats  # here: the rest of the module needs only numpy

    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("seed_t_interval needs at least one value")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    mean = float(v.mean())
    if v.size < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(1 - alpha / 2, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    return mean, mean - half, mean + half
