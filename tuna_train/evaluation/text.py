"""Metrics of generated text against references: ROUGE-L F (``rouge-score``, best over references) and exact
match, per record, per task and over tasks (each task counts once, as the paper does)."""

from __future__ import annotations

import functools
from typing import Any, Dict, List, Sequence

from rouge_score import rouge_scorer

from ..schema import references


@functools.lru_cache(maxsize=1)
def _rouge():
    return rouge_scorer.RougeScorer(["rougeL"])


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F of a prediction, best over its references."""
    return max(_rouge().score(reference, prediction)["rougeL"].fmeasure for reference in references)


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the prediction equals a reference (surrounding white space ignored), else 0.0."""
    return float(prediction.strip() in {reference.strip() for reference in references})


def generation_metrics(records: List[Dict[str, Any]], predictions: List[str]) -> Dict[str, Any]:
    """ROUGE-L and exact match per record, mean per task, and the mean over tasks (each task counts once, as
    the paper does for ROUGE-L)."""
    per_task: Dict[str, List[float]] = {}
    matches: Dict[str, List[float]] = {}
    for record, prediction in zip(records, predictions):
        task = str(record.get("task", "all"))
        per_task.setdefault(task, []).append(rouge_l(prediction, references(record)))
        matches.setdefault(task, []).append(exact_match(prediction, references(record)))
    task_means = {task: sum(v) / len(v) for task, v in sorted(per_task.items())}
    match_means = {task: sum(v) / len(v) for task, v in sorted(matches.items())}
    return {"rouge_l": sum(task_means.values()) / len(task_means) if task_means else None,
            "exact_match": sum(match_means.values()) / len(match_means) if match_means else None,
            "rouge_l_per_task": task_means, "records": len(records), "tasks": len(task_means)}
