"""Bootstrap intervals shared by the benches: seeded, so the same measurements give the same interval.

Example:
    >>> low, high = bootstrap_median_ci([0.98, 1.0, 1.01, 1.02, 0.99, 1.0, 1.03])
    >>> low <= 1.0 <= high
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from studio.errors import StudioError

CI_LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 4000
BOOTSTRAP_SEED = 0


def _check_interval(level: float, resamples: int) -> None:
    if not 0 < level < 1:
        raise StudioError(f"interval level {level} must lie between 0 and 1 (0.95 = 95%)")
    if resamples < 1:
        raise StudioError(f"bootstrap resamples {resamples} must be at least 1")


def _check_samples(values, what: str) -> np.ndarray:
    """`values` as a float array, or a `StudioError` unless it is a non-empty flat list of finite numbers;
    `what` names them in the message ("bootstrap values", "training seed #0's samples")."""
    samples = np.asarray(values, dtype=float)
    if samples.ndim != 1 or samples.size == 0:
        raise StudioError(f"{what} must be a non-empty flat list of numbers, got shape {samples.shape}")
    if not np.all(np.isfinite(samples)):
        raise StudioError(f"{what} must be finite numbers, got {list(samples)!r}")
    return samples


def bootstrap_median_ci(values: Sequence[float], level: float = CI_LEVEL, resamples: int = BOOTSTRAP_RESAMPLES,
                        seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """The percentile-bootstrap interval of the median of `values`: (low, high), reproducible for a given seed.

    Example:
        >>> low, high = bootstrap_median_ci([0.98, 1.0, 1.01, 1.02, 0.99, 1.0, 1.03])
        >>> low <= 1.0 <= high
        True
    """
    samples = _check_samples(values, "bootstrap values")
    _check_interval(level, resamples)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, samples.size, size=(resamples, samples.size))
    medians = np.median(samples[picks], axis=1)
    low, high = np.quantile(medians, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def two_level_bootstrap_ci(per_seed: Sequence[Sequence[float]], level: float = CI_LEVEL,
                           resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean over training seeds of each seed's sample mean: (low, high).

    `per_seed` holds one list of per-sample values per training seed (1/0 for "is a star", or a
    per-prompt accuracy difference). Each resample draws the training seeds with replacement, then
    each drawn seed's samples with replacement, and averages the drawn seeds' sample means; the
    interval is the middle `level` of those averages. The same inputs and `seed` give the same interval.

    Example:
        >>> low, high = two_level_bootstrap_ci([[1, 1, 0, 1, 1, 0, 1, 1], [1, 0, 1, 1, 1, 1, 0, 1]])
        >>> low <= 0.75 <= high
        True
    """
    if len(per_seed) == 0:
        raise StudioError("bootstrap needs at least one training seed's samples, got none")
    groups = [_check_samples(values, f"training seed #{index}'s samples") for index, values in enumerate(per_seed)]
    _check_interval(level, resamples)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(groups), size=(resamples, len(groups)))  # level 1: which training seeds
    sample_means = np.empty(picks.shape)
    for index, group in enumerate(groups):  # level 2: each drawn seed's samples, drawn anew every time it is picked
        drawn = picks == index
        rows = rng.integers(0, group.size, size=(int(drawn.sum()), group.size))
        sample_means[drawn] = group[rows].mean(axis=1)
    low, high = np.quantile(sample_means.mean(axis=1), [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)
