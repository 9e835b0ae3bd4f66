"""The fields of the records the commands read and write, named once: which field holds what under which
alias, what a stage copies from its input to its output, and how an error names a record. The four training
formats themselves (native, formatted, probabilistic, contextual) are parsed in :mod:`tuna_train.data`.
"""

from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence

#: a record's candidate responses, first present wins: native / generated, formatted, raw contextual
RESPONSE_FIELDS = ("responses", "output", "generation")
#: a record's prompt text: a templated prompt, the raw contextual record's templated instruction, the instruction
PROMPT_FIELDS = ("prompt", "instruct", "instruction")
#: a task's reference answers (``tuna eval generation``), first present wins
REFERENCE_FIELDS = ("references", "output", "answer")
#: a baseline's answer to a question (``tuna eval judge --baseline-answers``), first present wins
ANSWER_FIELDS = ("answer", "prediction", "output")
#: what ``tuna generate`` and ``tuna rank`` copy from each input record to its output, in this order: the
#: record's identity and prompt, and what later stages read (the task of ``tuna eval``, the constraints of
#: the verifiable judge)
PASS_THROUGH_FIELDS = ("id", "instruction", "input", "prompt", "task", "length", "constraints")


def record_name(record: Any) -> str:
    """How an error names a record: ``record <id>`` (``?`` without one)."""
    return f"record {record.get('id', '?') if isinstance(record, Mapping) else '?'}"


def first_field(record: Mapping[str, Any], names: Sequence[str]) -> Optional[Any]:
    """The value of the first of ``names`` that ``record`` holds with a value that is not empty, else None."""
    for name in names:
        value = record.get(name)
        if value:
            return value
    return None


def passed_through(record: Mapping[str, Any]) -> dict:
    """The :data:`PASS_THROUGH_FIELDS` that ``record`` has."""
    return {name: record[name] for name in PASS_THROUGH_FIELDS if name in record}


def references(record: Mapping[str, Any]) -> List[str]:
    """The reference answers of a task record, as a list; ValueError naming the record without any."""
    refs = first_field(record, REFERENCE_FIELDS)
    refs = [refs] if isinstance(refs, str) else list(refs or [])
    if not refs:
        raise ValueError(f"{record_name(record)}: no 'references' (or 'output') to score against")
    return refs
