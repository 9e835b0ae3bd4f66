"""The model's scores of ranked candidates for ``tuna eval ranking``: the fused per-sequence log-likelihoods
of ``tuna score`` with the training length normalisation (:func:`tuna_kernels.length_normalised`)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from tuna_kernels import length_normalised

from ..data import RankedExample
from ..options import ScoringOptions
from ..pipeline.score import group_logprobs
from .ranking import ranking_metrics


def model_scores(model, tokenizer, examples: List[RankedExample], options: Optional[ScoringOptions] = None
                 ) -> List[List[float]]:
    """Per group, the model's score of each candidate: sum log p / tokens ** alpha (as in training)."""
    alpha = (options or ScoringOptions()).alpha
    return [[length_normalised(s, c, alpha) for s, c in zip(sums, counts)]
            for sums, counts in group_logprobs(model, tokenizer, examples, options)]


def evaluate_ranking(model, tokenizer, examples: List[RankedExample], options: Optional[ScoringOptions] = None
                     ) -> Dict[str, Any]:
    """Pairwise accuracy, Kendall tau and the score gap of the model's scores against each group's own ranking."""
    scores = model_scores(model, tokenizer, examples, options)
    return ranking_metrics(scores, [e.scores for e in examples])
