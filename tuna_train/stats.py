"""Confidence intervals shared by the evaluations (the pairwise judge's win rate, the verifiable figures)."""

from __future__ import annotations

import random
from typing import Optional, Sequence, Tuple


def bootstrap_ratio_ci(numerators: Sequence[float], denominators: Optional[Sequence[float]] = None,
                       samples: int = 2000, seed: int = 0, level: float = 0.95
                       ) -> Tuple[Optional[float], Optional[float]]:
    """Percentile bootstrap over units of ``sum(numerators) / sum(denominators)`` (denominators default to 1:
    the mean). Units are resampled whole, so a ratio over units of several items (a prompt's instructions)
    keeps each unit's items together. (None, None) when there is no unit or a resample's denominator is 0.

    numerators, denominators: [N] one value per unit.
    """
    n = len(numerators)
    if n == 0:
        return None, None
    denominators = [1.0] * n if denominators is None else list(denominators)
    rng = random.Random(seed)
    ratios = []
    for _ in range(samples):
        # randrange(n) draws as random.choice over n points does: the win rate's intervals are unchanged
        picks = [rng.randrange(n) for _ in range(n)]
        total = sum(denominators[i] for i in picks)
        if total == 0:
            return None, None
        ratios.append(sum(numerators[i] for i in picks) / total)
    ratios.sort()
    return ratios[int((1 - level) / 2 * samples)], ratios[min(samples - 1, int((1 + level) / 2 * samples))]
