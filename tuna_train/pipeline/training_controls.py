"""Training controls of ``tuna pipeline`` (``controls:``): the same data and budget as Tuna_c, one ingredient
taken away, to tell what did the work.

- :func:`random_ranking` (``random_judge``): each ranked group's candidates shuffled among the judge's scores,
  seeded per record. Ties are *kept*: the scores stay where they were, so the control has exactly as many
  untied pairs (``skip_ties``) and as many fully tied groups as Tuna_c; only which response sits in the better
  place is random. (Ties made impossible would give the control more pairs than Tuna_c, a different budget.)
- :func:`best_only` (``best_only``): supervised training on each group's best candidate alone (rejection-sampling
  fine-tuning): a one-candidate group, whose loss is the MLE term only.

One-candidate groups (e.g. supervised examples mixed in) pass through both unchanged.
"""

from __future__ import annotations

import random
from typing import Any, Dict, List, Sequence

from .store import record_key

#: the controls a pipeline can train beside Tuna_c, by name
TRAINING_CONTROLS = ("random_judge", "best_only")

# the per-candidate lists of a ranked record that move with their candidate
_PER_CANDIDATE = ("responses", "finish_reasons", "constraint_results")


def random_ranking(records: Sequence[Dict[str, Any]], seed: int) -> List[Dict[str, Any]]:
    """Each record with its candidates (and their per-candidate fields) in a random order of their own (seeded
    by ``seed`` and the record's key), its ``ranking`` and ``scores`` unchanged: the k-th best place now holds
    a random candidate. Records must be ranked (responses best first, as ``tuna rank`` writes them)."""
    shuffled = []
    for record in records:
        order = list(range(len(record["responses"])))
        random.Random(f"{seed}|{record_key(record)}").shuffle(order)
        out = dict(record)
        for name in _PER_CANDIDATE:
            if isinstance(record.get(name), list) and len(record[name]) == len(order):
                out[name] = [record[name][i] for i in order]
        out["control"] = {"name": "random_judge", "order": order}
        shuffled.append(out)
    return shuffled


def best_only(records: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Each ranked record as a one-candidate group of its best response (the first: ``tuna rank`` writes them
    best first; the one Tuna_c's ``mle_on: best`` term trains on), with score 0."""
    kept = []
    for record in records:
        out = {key: value for key, value in record.items() if key not in ("ranking", "scores")}
        for name in _PER_CANDIDATE:
            if isinstance(record.get(name), list):
                out[name] = record[name][:1]
        out.update(scores=[0.0], control={"name": "best_only"})
        kept.append(out)
    return kept


def control_records(name: str, records: Sequence[Dict[str, Any]], seed: int) -> List[Dict[str, Any]]:
    """The training data of control ``name`` (one of :data:`TRAINING_CONTROLS`) made from Tuna_c's."""
    if name == "random_judge":
        return random_ranking(records, seed)
    if name == "best_only":
        return best_only(records)
    raise ValueError(f"unknown control {name!r}: the controls are {', '.join(TRAINING_CONTROLS)}")
