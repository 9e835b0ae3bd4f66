"""The ranking metrics, defined once: training (per batch, summed across processes), evaluation (ragged
groups of any order) and the pipeline all count with :func:`ranking_counts`.

Definitions, on a group's candidates ordered best first (``target_scores`` [G, K], higher is better, give the
ranking's own scores; pairs tied in them have no right order and are not counted):

- pair accuracy: the fraction of ordered pairs (j ranked above l, not tied) with s_j > s_l (a tie in the
  model's scores is not an agreement);
- score gap: the mean, over the groups with at least one ordered pair, of s[best] - s[worst] (the first and
  the last candidate present).
"""

from __future__ import annotations

from typing import Dict, Optional, Union

import torch

from .losses import ordered_pairs

#: keys of :func:`ranking_counts`; they add up across batches and processes
RANKING_COUNT_KEYS = ("correct_pairs", "pairs", "gap_sum", "gap_groups")


def ranking_counts(scores: torch.Tensor, valid: torch.Tensor,
                   target_scores: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Additive counts of a batch's ranking metrics (0-d tensors, no gradient).

    scores, valid, target_scores: [G, K], candidates best first; ``valid`` a bool of the candidates present.
    Without ``target_scores`` every pair of present candidates is ordered by position.
    """
    scores = scores.detach()
    pairs = ordered_pairs(valid, target_scores, skip_ties=target_scores is not None)
    agree = (scores[:, :, None] > scores[:, None, :]) & pairs
    positions = torch.arange(valid.shape[1], device=valid.device)
    first = torch.where(valid, positions, torch.full_like(positions, valid.shape[1])).amin(dim=1).clamp(
        max=valid.shape[1] - 1)
    last = torch.where(valid, positions, torch.zeros_like(positions)).amax(dim=1)
    has_pair = pairs.flatten(1).any(dim=1)
    gaps = scores.gather(1, first[:, None]).squeeze(1) - scores.gather(1, last[:, None]).squeeze(1)
    return {"correct_pairs": agree.sum(), "pairs": pairs.sum(),
            "gap_sum": torch.where(has_pair, gaps, torch.zeros_like(gaps)).sum(), "gap_groups": has_pair.sum()}


def ranking_summary(totals: Dict[str, Union[torch.Tensor, float]]) -> Dict[str, Union[torch.Tensor, float]]:
    """Pair accuracy and score gap from (summed) :func:`ranking_counts`: 0-d tensors stay tensors (no device
    sync in a training step), numbers give floats; NaN where there is nothing to count."""
    return {"pair_accuracy": _ratio(totals["correct_pairs"], totals["pairs"]),
            "score_gap": _ratio(totals["gap_sum"], totals["gap_groups"])}


def _ratio(numerator, denominator):
    if isinstance(numerator, torch.Tensor):
        return numerator.double() / denominator.double()  # 0 / 0 = NaN
    return numerator / denominator if denominator else float("nan")


def pairwise_accuracy(scores: torch.Tensor, valid: torch.Tensor,
                      target_scores: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pair accuracy of one batch as a 0-d tensor (NaN when the batch has no ordered pair)."""
    return ranking_summary(ranking_counts(scores, valid, target_scores))["pair_accuracy"]
