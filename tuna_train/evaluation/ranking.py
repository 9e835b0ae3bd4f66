"""Ranking metrics of held-out groups: pairwise accuracy and score gap (counted by
:func:`tuna_kernels.ranking_counts`) and Kendall's tau-b, over ragged groups in any order. Needs torch and
tuna_kernels only: the trainer's evaluation and controls import it without loading any pipeline stage."""

from __future__ import annotations

import itertools
import math
from typing import Any, Dict, Optional, Sequence

import torch

from tuna_kernels import ranking_counts, ranking_summary


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Kendall's tau-b between two score lists (ties in either handled); None when undefined."""
    concordant = discordant = ties_x = ties_y = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = x[i] - x[j], y[i] - y[j]
        if dx == 0 and dy == 0:
            continue
        if dx == 0:
            ties_x += 1
        elif dy == 0:
            ties_y += 1
        elif (dx > 0) == (dy > 0):
            concordant += 1
        else:
            discordant += 1
    denominator = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return None if denominator == 0 else (concordant - discordant) / denominator


def ranking_metrics(model_scores: Sequence[Sequence[float]], target_scores: Sequence[Sequence[float]]) -> Dict[str, Any]:
    """Pairwise accuracy and mean best-minus-worst gap (as :func:`tuna_kernels.ranking_counts` defines them)
    and mean Kendall tau-b over ragged groups, candidates in any order."""
    counts = ranking_counts(*ragged_to_matrices(model_scores, target_scores))
    summary = ranking_summary(counts)
    taus = [tau for tau in (kendall_tau_b(model, target) for model, target in zip(model_scores, target_scores))
            if tau is not None]
    defined = lambda value: None if math.isnan(value) else value  # noqa: E731
    return {"pair_accuracy": defined(float(summary["pair_accuracy"])), "pairs": int(counts["pairs"]),
            "kendall_tau": sum(taus) / len(taus) if taus else None, "groups_with_tau": len(taus),
            "score_gap": defined(float(summary["score_gap"])), "groups": len(model_scores)}


def ragged_to_matrices(model_scores: Sequence[Sequence[float]], target_scores: Sequence[Sequence[float]]):
    """Ragged groups -> ``(scores, valid, targets)`` [G, K] float64, each group sorted best first by its target
    (stable: among tied candidates the earlier one comes first), as the ranking metrics take them."""
    width = max((len(group) for group in model_scores), default=0)
    scores = torch.zeros(len(model_scores), max(width, 1), dtype=torch.float64)
    targets = torch.zeros_like(scores)
    valid = torch.zeros_like(scores, dtype=torch.bool)
    for row, (model, target) in enumerate(zip(model_scores, target_scores)):
        order = sorted(range(len(target)), key=lambda k: -target[k])
        scores[row, :len(order)] = torch.tensor([float(model[k]) for k in order], dtype=torch.float64)
        targets[row, :len(order)] = torch.tensor([float(target[k]) for k in order], dtype=torch.float64)
        valid[row, :len(order)] = True
    return scores, valid, targets
