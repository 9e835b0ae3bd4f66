"""The model's scores of ranked candidates for ``tuna eval ranking``: the fused per-sequence log-likelihoods
of ``tuna score`` with the training length normalisation (:func:`tuna_kernels.length_normalised`)."""

from __future__ import annotations

from typing import Any, Dict, List

from tuna_kernels import length_normalised

from ..data import RankedExample
from ..pipeline.score import group_logprobs
from .ranking import ranking_metrics


def model_scores(model, tokenizer, examples: List[RankedExample], template: str = "alpaca", max_length: int = 512,
                 alpha: float = 1.0, token_budget: int = 16384, impl: str = "auto") -> List[List[float]]:
    """Per group, the model's score of each candidate: sum log p / tokens ** alpha (as in training)."""
    return [[length_normalised(s, c, alpha) for s, c in zip(sums, counts)]
            for sums, counts in group_logprobs(model, tokenizer, examples, template, max_length, token_budget, impl)]


def evaluate_ranking(model, tokenizer, examples: List[RankedExample], **options) -> Dict[str, Any]:
    scores = model_scores(model, tokenizer, examples, **options)
    return ranking_metrics(scores, [e.scores for e in examples])
