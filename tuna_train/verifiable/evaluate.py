"""``tuna eval verifiable``: IFEval's four figures on records with ``constraints`` (:mod:`.checks`).

- prompt-level: the fraction of prompts whose response follows *every* one of its constraints;
- instruction-level: the fraction of all constraints (over all prompts) followed;

each strict (the response as written) and loose (IFEval's loose variants), each with a 95% percentile bootstrap
interval over prompts (a prompt's constraints are resampled together, :func:`tuna_train.stats.bootstrap_ratio_ci`).
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

from ..stats import bootstrap_ratio_ci
from . import checks

#: the reported figures, as (level, mode)
FIGURES = tuple(f"{level}_{mode}" for level in ("prompt", "instruction") for mode in ("strict", "loose"))


def check_records(records: Sequence[Dict[str, Any]], source: str = "records") -> List[List[Dict[str, Any]]]:
    """Every record's ``constraints``, checked usable (ConstraintSpecError naming ``source``, the line and the
    id of the first that is not)."""
    return [checks.validate(record.get("constraints") if isinstance(record, dict) else None,
                            f"{source} line {line} (id {record.get('id') if isinstance(record, dict) else None!r})")
            for line, record in enumerate(records, 1)]


def verifiable_rows(records: Sequence[Dict[str, Any]], predictions: Sequence[str], source: str = "records"
                    ) -> List[Dict[str, Any]]:
    """Each record with its prediction and per-constraint results (``constraint_results``)."""
    return [dict(record, prediction=prediction, constraint_results=checks.check(prediction, constraints))
            for record, prediction, constraints in zip(records, predictions, check_records(records, source))]


def figure_counts(rows: Sequence[Dict[str, Any]], figure: str) -> Tuple[List[float], List[float]]:
    """Per prompt, (followed, out of) for one figure: prompt-level counts a prompt as 1 of 1 or 0 of 1,
    instruction-level counts its constraints."""
    level, mode = figure.split("_")
    followed, total = [], []
    for row in rows:
        passes = [bool(result[mode]) for result in row["constraint_results"]]
        followed.append(float(all(passes)) if level == "prompt" else float(sum(passes)))
        total.append(1.0 if level == "prompt" else float(len(passes)))
    return followed, total


def verifiable_metrics(rows: Sequence[Dict[str, Any]], samples: int = 2000, seed: int = 0) -> Dict[str, Any]:
    """The four figures (``FIGURES``) and ``<figure>_ci95`` [low, high] of :func:`verifiable_rows`' rows."""
    metrics: Dict[str, Any] = {}
    for figure in FIGURES:
        followed, total = figure_counts(rows, figure)
        metrics[figure] = sum(followed) / sum(total) if rows else None
        metrics[f"{figure}_ci95"] = list(bootstrap_ratio_ci(followed, total, samples=samples, seed=seed))
    metrics.update(prompts=len(rows), instructions=sum(len(row["constraint_results"]) for row in rows))
    return metrics
