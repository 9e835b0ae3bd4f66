"""The IFEval constraint checkers of ``if-verifiable``, as the task set, the judge and the eval use them.

A constraint spec is ``{"id": "<IFEval instruction id>", "kwargs": {...}}``: the checker's id in
``if_verifiable.ifeval.instructions_registry.INSTRUCTION_DICT`` and the arguments it was built with. The checker
writes its own description text from them (``build_description``) and checks a response (``check_following``):
strict on the response as written, loose (IFEval's loose variants) when any of the response, the response
without its first line, its last line or both, each with and without asterisks, passes. IFEval's own rules hold
throughout: e.g. a response in which no language can be detected (no words) follows the language checker.

``if-verifiable`` is an optional dependency (``pip install tuna[verifiable]``): it is imported here only, on first
use, with an error naming the pip line when it is missing.
"""

from __future__ import annotations

import copy
import functools
import logging
from typing import Any, Dict, List, Mapping, Sequence, Tuple

PIP_LINE = "pip install -c requirements/constraints.txt if-verifiable==0.1.2  (or: pip install -e '.[verifiable]')"

#: IFEval checkers left out, with the reason (found by building and running each one here)
SKIPPED_KINDS = {
    "length_constraints:number_sentences": "needs NLTK's punkt_tab sentence tokenizer data, which is downloaded "
                                           "from the network (nltk.download), not installable here",
    "change_case:capital_word_frequency": "needs NLTK's punkt_tab word tokenizer data (nltk.word_tokenize), "
                                          "not installable here",
}


class MissingCheckers(ImportError):
    """``if-verifiable`` is not installed (the message names the pip line)."""


class ConstraintSpecError(ValueError):
    """A record's ``constraints`` field names no usable checker or arguments it does not take."""


@functools.lru_cache(maxsize=1)
def ifeval():
    """The ``if_verifiable`` modules ``(instructions_registry, common)``; MissingCheckers naming the pip line."""
    try:
        import langdetect
        from if_verifiable import common
        from if_verifiable.ifeval import instructions_registry
    except ImportError as error:
        raise MissingCheckers(f"the verifiable tasks, judge and eval need the package if-verifiable ({error}): "
                          f"{PIP_LINE}") from error
    # langdetect (the language and English-case checkers) is random unless seeded: the same response must get
    # the same verdict in every run, or a judgement would not be reproducible
    langdetect.DetectorFactory.seed = 0
    logging.getLogger().addFilter(_undetected_language)
    return instructions_registry, common


def _undetected_language(record: logging.LogRecord) -> bool:
    """False for IFEval's "Unable to detect language" error: it is logged (on the root logger) for every loose
    variant of every response without words, thousands of lines in a ``tuna rank`` that would bury its progress;
    the outcome is in the results (as in IFEval, the language checker then counts the response as following)."""
    return not (record.getMessage().startswith("Unable to detect language") and "if_verifiable" in record.pathname)


@functools.lru_cache(maxsize=1)
def usable_kinds() -> Tuple[str, ...]:
    """The IFEval instruction ids the task set draws from (every registered one but SKIPPED_KINDS), sorted."""
    return tuple(sorted(set(ifeval()[0].INSTRUCTION_DICT) - set(SKIPPED_KINDS)))


@functools.lru_cache(maxsize=1)
def conflicts() -> Dict[str, frozenset]:
    """IFEval's pairs of instruction ids that must not be given together (made symmetric, each with itself)."""
    registry = ifeval()[0]
    table = registry.conflict_make(copy.deepcopy(registry.INSTRUCTION_CONFLICTS))
    return {kind: frozenset(others) for kind, others in table.items()}


def checker(spec: Mapping[str, Any]):
    """The checker of one spec, built with its arguments (ConstraintSpecError when it cannot be)."""
    kind, kwargs = spec.get("id"), spec.get("kwargs") or {}
    if kind not in usable_kinds():
        reason = SKIPPED_KINDS.get(kind, "not an IFEval instruction id")
        raise ConstraintSpecError(f"constraint {kind!r}: {reason}")
    if not isinstance(kwargs, dict):
        raise ConstraintSpecError(f"constraint {kind!r}: 'kwargs' must be an object, got {type(kwargs).__name__}")
    instance = ifeval()[0].INSTRUCTION_DICT[kind](kind)
    try:
        instance.build_description(**kwargs)
    except (TypeError, ValueError) as error:
        raise ConstraintSpecError(f"constraint {kind!r}: arguments {kwargs} refused: {error}") from error
    return instance


def describe(spec: Mapping[str, Any]) -> str:
    """The checker's own description text of a spec (what the model is asked to do)."""
    return checker(spec).build_description(**(spec.get("kwargs") or {}))


def validate(constraints: Any, where: str = "record") -> List[Dict[str, Any]]:
    """``constraints`` as a list of specs, every one buildable; ConstraintSpecError naming the field else."""
    if not isinstance(constraints, list) or not constraints:
        raise ConstraintSpecError(f"{where}: field 'constraints' must be a non-empty list of "
                                  f"{{'id', 'kwargs'}} objects, got {str(constraints)[:60]!r}")
    for index, spec in enumerate(constraints):
        if not isinstance(spec, dict):
            raise ConstraintSpecError(f"{where}: field 'constraints' item {index} is not an object")
        try:
            checker(spec)
        except ConstraintSpecError as error:
            raise ConstraintSpecError(f"{where}: field 'constraints' item {index}: {error}") from None
    return constraints


def check(response: str, constraints: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """Per constraint, in order, ``{"id", "strict", "loose"}`` for one response (IFEval's evaluation; an empty
    response follows none). The specs must be valid (:func:`validate`)."""
    registry, common = ifeval()
    # an empty response, or one that is all "thinking", gets no results from IFEval: it follows nothing
    results = common.evaluate_instructions(response, [spec["id"] for spec in constraints],
                                           [dict(spec.get("kwargs") or {}) for spec in constraints], "",
                                           registry.INSTRUCTION_DICT)[0]
    if not results:
        return [{"id": spec["id"], "strict": False, "loose": False} for spec in constraints]
    return [{"id": result.instruction_id, "strict": result.strict_pass, "loose": result.loose_pass}
            for result in results]


def strict_fraction(results: Sequence[Mapping[str, Any]]) -> float:
    """The fraction of constraints a response follows, strictly (the judge's score)."""
    return sum(bool(r["strict"]) for r in results) / len(results)
