"""``tuna rank --judge verifiable``: a judge that needs no model and no endpoint, like ``rule``: it checks each
candidate against the record's ``constraints`` (:mod:`.checks`) and ranks the candidates by the fraction of
them followed strictly.

It writes its answer in the form a model judge does (a score line per candidate, "Response k: [score]", and
"rank: [...]"), so the answer goes through the same parsers; equal fractions are equal scores, which
``tuna rank`` keeps as the record's ``scores``, so tied candidates stay tied (``skip_ties`` leaves them out of
the loss). :meth:`VerifiableJudge.audit` gives the per-constraint results that the ranked record stores.
"""

from __future__ import annotations

from typing import Any, Dict, List

from ..schema import record_name
from . import checks


class VerifiableJudge:
    name = "verifiable"
    # what decides a judgement besides the record: the checkers' package version (the record's constraints are
    # part of the cache key too, see tuna_train.pipeline.rank.judgement_key)
    identity = {"name": "verifiable", "checkers": "if-verifiable==0.1.2 ifeval"}

    def __init__(self) -> None:
        checks.ifeval()  # a missing package is said now, once, not as every record's failure

    def audit(self, record: Dict[str, Any], response: str) -> List[Dict[str, Any]]:
        """Per constraint of ``record``, ``{"id", "strict", "loose"}`` for one response."""
        return checks.check(response, checks.validate(record.get("constraints"), record_name(record)))

    def ask(self, record: Dict[str, Any], attempt: int = 0) -> str:
        """The judgement of ``record["responses"]`` (``attempt`` is ignored: a check gives the same answer)."""
        responses = list(record["responses"])
        scores = [checks.strict_fraction(self.audit(record, response)) for response in responses]
        order = sorted(range(len(responses)), key=lambda i: (-scores[i], i))
        lines = "\n".join(f"Response {i}: [{scores[i]!r}]" for i in range(len(responses)))
        return f"closed-ended\n{lines}\nrank: [{', '.join(map(str, order))}]"
