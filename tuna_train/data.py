"""Ranked data: load records from JSON, JSON lines or Parquet, in any of four formats, and normalise them
to :class:`RankedExample` (a prompt and its candidates, best first).

Formats (detected from the first record, or named with ``data_format``):

- ``native``: ``{"prompt" | "instruction" [+ "input"], "responses": [...], "scores": [...] | "ranking": [...]}``;
  ``ranking`` lists response indices best first. With both, the scores decide; records whose ranking
  contradicts them are counted (``LoadReport.ranking_overruled``) and named in one warning per file.
- ``tuna_formatted``: the public Tuna training file, ``{"id", "instruction": <templated prompt>,
  "output": [...], "score": [...]}``.
- ``tuna_probabilistic``: raw probabilistic-ranking records, ``{"orig": {"instruction", "input", "output"},
  "text": [...], "avg_token_prob": [...], ...}``; scores are ``avg_token_prob``.
- ``tuna_contextual``: raw contextual-ranking records, ``{"prompt", "instruct", "generation": [...],
  "rank" | "ranks": [indices best first], "response_4", ...}``; index K is the judge's own response.

A malformed record raises :class:`DataError` naming the file, the record number (and line, for JSON lines and
CSV) and the field; with ``skip_bad_records`` such records are skipped and counted instead. Besides the fields
of its format, a record is refused when a text it trains on is not a string (a list in ``orig.input``) or is
not valid Unicode (a lone surrogate such as ``"\\ud800"``, or bytes that are not UTF-8 in a JSON list), so no
bad text reaches the tokenizer in the middle of a run.

Reading (:mod:`tuna_train.records`): JSON lines are decoded line by line (an error names the line;
``datasets``' JSON reader would infer one schema and fail or coerce on records of different shapes), JSON
lists element by element, CSV row by row, Parquet 1024 rows at a time; saved dataset directories are memory-
mapped and Hub names streamed by ``datasets``. Storing (:mod:`tuna_train.example_store`): ``load_ranked``
normalises each record as it is read and keeps the examples in a memory-mapped Arrow file in ``$TMPDIR``
(unlinked at once), not as Python objects, so resident memory grows by a small fraction of the file's size
(400k records, 80 MB: +16 MB, see docs/training.md); it returns a read-only sequence that builds a ``RankedExample`` on
each access. Split it with :func:`select_examples` (a view), not a list comprehension, to keep it compact.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .example_store import ExampleStoreBuilder, RankedExamples
from .records import DataError, iter_records, read_records, record_where
from .templates import format_prompt

logger = logging.getLogger(__name__)

__all__ = ["DataError", "FORMATS", "LoadReport", "RankedExample", "RankedExamples", "check_text", "detect_format",
           "examples_from_records", "load_ranked", "parse_record", "read_records",
           "select_examples"]

FORMATS = ("auto", "native", "tuna_formatted", "tuna_probabilistic", "tuna_contextual")


@dataclass
class RankedExample:
    """One instruction and its candidate responses, sorted best first.

    ``prompt`` is a complete prompt when ``prompt_is_formatted``; otherwise ``instruction`` and
    ``input`` are formatted with the configured template at tokenisation time.
    """

    instruction: str
    responses: List[str]
    scores: List[float]
    input: Optional[str] = None
    # a reference model's scores of the responses (same order, same length normalisation as training uses),
    # from the records' ``ref_scores`` field: the losses' reference with ``reference="field"``
    ref_scores: Optional[List[float]] = None
    prompt_is_formatted: bool = False
    source: str = ""
    meta: Dict[str, Any] = field(default_factory=dict)

    def prompt_text(self, template: str, tokenizer=None) -> str:
        if self.prompt_is_formatted:
            return self.instruction
        return format_prompt(self.instruction, self.input, template, tokenizer)


@dataclass
class LoadReport:
    path: str
    data_format: str
    loaded: int = 0
    skipped: int = 0
    first_errors: List[str] = field(default_factory=list)
    #: native records with both ``scores`` and a ``ranking`` that orders them otherwise (the scores decided)
    ranking_overruled: int = 0


def detect_format(record: Any) -> str:
    """The format of one record, from its fields."""
    if isinstance(record, dict):
        if "orig" in record and "text" in record:
            return "tuna_probabilistic"
        if "generation" in record:
            return "tuna_contextual"
        if "output" in record and "score" in record:
            return "tuna_formatted"
        if "responses" in record:
            return "native"
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise DataError(f"cannot tell the format of a record with fields {keys}; "
                    f"name it with data_format (one of {FORMATS[1:]})")


def _field(record: Dict[str, Any], name: str, kind, where: str):
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    if name not in record or record[name] is None:
        raise DataError(f"{where}: field '{name}' is missing")
    value = record[name]
    if not isinstance(value, kind):
        raise DataError(f"{where}: field '{name}' must be {kind.__name__ if isinstance(kind, type) else 'of ' + str(kind)},"
                        f" got {type(value).__name__}")
    return value


def _responses(record, name: str, where: str) -> List[str]:
    responses = _field(record, name, list, where)
    if not responses:
        raise DataError(f"{where}: field '{name}' is an empty list")
    for i, response in enumerate(responses):
        if not isinstance(response, str):
            raise DataError(f"{where}: field '{name}[{i}]' must be a string, got {type(response).__name__}")
    return responses


def _scores(record, name: str, count: int, where: str) -> List[float]:
    scores = _field(record, name, list, where)
    if len(scores) != count:
        raise DataError(f"{where}: field '{name}' has {len(scores)} entries for {count} responses")
    out = []
    for i, score in enumerate(scores):
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise DataError(f"{where}: field '{name}[{i}]' must be a finite number, got {score!r}")
        try:
            value = float(score)  # an int beyond float's range raises OverflowError
        except OverflowError:
            raise DataError(f"{where}: field '{name}[{i}]' must be a finite number, got an integer of "
                            f"{len(str(abs(score)))} digits") from None
        if not math.isfinite(value):
            raise DataError(f"{where}: field '{name}[{i}]' must be a finite number, got {score!r}")
        out.append(value)
    return out


def _ranking_scores(ranking, num_responses: int, name: str, where: str, drop: Sequence[int] = ()) -> Dict[int, float]:
    """{response index: score} from a ranking (indices best first): score = -position."""
    if not isinstance(ranking, list) or not ranking:
        raise DataError(f"{where}: field '{name}' must be a non-empty list of response indices")
    scores: Dict[int, float] = {}
    for position, index in enumerate(ranking):
        if isinstance(index, bool) or not isinstance(index, int):
            raise DataError(f"{where}: field '{name}[{position}]' must be an integer, got {index!r}")
        if not 0 <= index < num_responses:
            raise DataError(f"{where}: field '{name}[{position}]' = {index} names no response "
                            f"(there are {num_responses})")
        if index in scores:
            raise DataError(f"{where}: field '{name}' lists response {index} twice")
        if index not in drop:
            scores[index] = -float(position)
    return scores


def ranking_contradicts_scores(record: Any) -> bool:
    """Whether a native record has both ``scores`` and a ``ranking`` that puts some response above one its scores
    put higher, or that is not an order of its responses at all. ``parse_record`` uses the scores then; the
    ranking is ignored. Tied scores may be ranked either way."""
    if not isinstance(record, dict) or "scores" not in record or "ranking" not in record:
        return False
    scores, ranking = record["scores"], record["ranking"]
    if not isinstance(ranking, list) or len(set(map(repr, ranking))) != len(ranking) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(scores) for i in ranking):
        return True
    ranked = [scores[i] for i in ranking]
    return any(better < worse for better, worse in zip(ranked, ranked[1:]))


def _example(instruction, responses, scores, where, ref_scores=None, **kwargs) -> RankedExample:
    order = sorted(range(len(responses)), key=lambda i: -scores[i])  # stable: equal scores keep file order
    return RankedExample(instruction=instruction, responses=[responses[i] for i in order],
                         scores=[scores[i] for i in order], source=where,
                         ref_scores=None if ref_scores is None else [ref_scores[i] for i in order], **kwargs)


# "###Response 0:" ... : how the judge's prompt shows each candidate (the templated "### Response:" has no number)
_JUDGE_RESPONSE_BLOCK = re.compile(r"###\s*Response\s*(\d+)\s*:")
_TEMPLATED_END = "### Response:"


def contextual_prompt(record: Dict[str, Any], generations: Sequence[str], where: str) -> Tuple[str, bool]:
    """(training prompt, whether it is already templated) of a raw contextual record.

    The training prompt is ``instruct``, the instruction as the model saw it when it sampled the candidates
    (templated in the release, ending with "### Response:"; an ``instruct`` that does not end so is templated
    here, once). ``prompt`` is what the judge was sent (``instruct``, every candidate as "###Response j:",
    the judge's instructions): never trained on. A training prompt that shows the record's own candidates as
    "###Response j:" blocks is refused: each candidate would be conditioned on all of them.
    """
    instruct = _field(record, "instruct", str, where)
    for match in _JUDGE_RESPONSE_BLOCK.finditer(instruct):
        index = int(match.group(1))
        shown = generations[index].strip() if index < len(generations) else ""
        if index < len(generations) and (not shown or shown in instruct[match.end():]):
            raise DataError(f"{where}: field 'instruct' holds the judge's prompt (it shows the record's own "
                            f"candidate {index} as \"{match.group(0)}\"); 'instruct' must be the templated "
                            "instruction alone, the judge's prompt belongs in 'prompt'")
    return instruct, instruct.rstrip().endswith(_TEMPLATED_END)


def parse_record(record: Any, data_format: str, where: str, include_judge_response: bool = False) -> RankedExample:
    """One record of ``data_format`` -> RankedExample (best first). Raises DataError."""
    if data_format == "native":
        if isinstance(record, dict) and "prompt" in record:
            instruction, formatted = _field(record, "prompt", str, where), True
        else:
            instruction, formatted = _field(record, "instruction", str, where), False
        input_text = record.get("input") if not formatted else None
        if input_text is not None and not isinstance(input_text, str):
            raise DataError(f"{where}: field 'input' must be a string, got {type(input_text).__name__}")
        responses = _responses(record, "responses", where)
        ref_scores = _scores(record, "ref_scores", len(responses), where) if "ref_scores" in record else None
        if "scores" in record:
            scores = _scores(record, "scores", len(responses), where)
        elif "ranking" in record:
            by_index = _ranking_scores(record["ranking"], len(responses), "ranking", where)
            responses = [responses[i] for i in sorted(by_index)]
            scores = [by_index[i] for i in sorted(by_index)]
            ref_scores = None if ref_scores is None else [ref_scores[i] for i in sorted(by_index)]
        else:
            raise DataError(f"{where}: field 'scores' (or 'ranking') is missing")
        return _example(instruction, responses, scores, where, ref_scores, input=input_text,
                        prompt_is_formatted=formatted)
    if data_format == "tuna_formatted":
        prompt = _field(record, "instruction", str, where)
        responses = _responses(record, "output", where)
        scores = _scores(record, "score", len(responses), where)
        return _example(prompt, responses, scores, where, prompt_is_formatted=True, meta={"id": record.get("id")})
    if data_format == "tuna_probabilistic":
        orig = _field(record, "orig", dict, where)
        instruction = _field(orig, "instruction", str, where + ": field 'orig'")
        input_text = orig.get("input") or None
        responses = _responses(record, "text", where)
        scores = _scores(record, "avg_token_prob", len(responses), where)
        return _example(instruction, responses, scores, where, input=input_text)
    if data_format == "tuna_contextual":
        generations = _responses(record, "generation", where)
        name = "rank" if "rank" in record else "ranks"
        if name not in record:
            raise DataError(f"{where}: field 'rank' (or 'ranks') is missing")
        candidates = list(generations)
        judge_index = len(generations)
        if isinstance(record.get("response_4"), str):
            candidates.append(record["response_4"])
        by_index = _ranking_scores(record[name], len(candidates), name, where,
                                   drop=() if include_judge_response else (judge_index,))
        if not by_index:
            raise DataError(f"{where}: field '{name}' ranks no generated response")
        instruction, formatted = contextual_prompt(record, generations, where)
        kept = sorted(by_index)
        meta = {"id": record.get("id")}
        if isinstance(record.get("prompt"), str):
            meta["judge_prompt"] = record["prompt"]
        return _example(instruction, [candidates[i] for i in kept], [by_index[i] for i in kept], where,
                        prompt_is_formatted=formatted, meta=meta)
    raise DataError(f"unknown data_format {data_format!r}; one of {FORMATS}")


def _field_path(record: Any, found) -> Optional[str]:
    """The path (``'orig.input'``, ``'responses[2]'``) of the first value of ``record`` for which ``found``
    holds; walked with a stack, not recursion, since records may nest deeply."""
    stack: List[Tuple[str, Any]] = [("", record)]
    while stack:
        path, value = stack.pop()
        if path and found(value):
            return path
        if isinstance(value, dict):
            stack.extend((f"{path}.{key}" if path else str(key), item) for key, item in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in reversed(list(enumerate(value))))
    return None


def check_text(example: RankedExample, record: Any, where: str) -> None:
    """Refuse an example whose prompt, input or responses is not a string, or is a string the tokenizer
    cannot encode (a lone surrogate: ``"\\ud800"`` in JSON, or bytes that were not UTF-8); the error names
    the record's field. ``record`` is the raw record the example came from (to name the field)."""
    texts = [example.instruction, example.input, *example.responses]
    for text in texts:
        if text is None:
            continue
        if not isinstance(text, str):
            name = _field_path(record, lambda value: value is text) or "input"
            raise DataError(f"{where}: field '{name}' must be a string, got {type(text).__name__}")
        if text.isascii():
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            name = _field_path(record, lambda value: value is text or value == text) or "text"
            code = ord(text[error.start])
            what = (f"byte 0x{code - 0xDC00:02x} that is not UTF-8" if 0xDC80 <= code <= 0xDCFF
                    else f"a lone surrogate \\u{code:04x}")
            raise DataError(f"{where}: field '{name}' is not valid text: {what} at character {error.start}") from None


def load_ranked(path: str, data_format: str = FORMATS[0], skip_bad_records: bool = False,
                include_judge_response: bool = False) -> Tuple[RankedExamples, LoadReport]:
    """All examples of a file (a compact read-only sequence, see :mod:`tuna_train.example_store`), and a
    report of what was loaded and skipped."""
    if data_format not in FORMATS:
        raise DataError(f"data_format must be one of {FORMATS}, got {data_format!r}")
    store = ExampleStoreBuilder(str(path), RankedExample)
    report = LoadReport(path=str(path), data_format=data_format)
    try:
        for number, line_no, record in iter_records(str(path)):
            where = record_where(path, number, line_no)
            try:
                if isinstance(record, DataError):  # not decodable: not UTF-8, not JSON
                    raise record
                if report.data_format == "auto":
                    report.data_format = detect_format(record)
                example = parse_record(record, report.data_format, where, include_judge_response)
                check_text(example, record, where)
                if report.data_format == "native" and ranking_contradicts_scores(record):
                    report.ranking_overruled += 1
            except DataError as error:
                message = str(error) if str(error).startswith(str(path)) else f"{where}: {error}"
            except (TypeError, ValueError, OverflowError, RecursionError, AttributeError, KeyError,
                    IndexError) as error:
                # a shape parse_record does not foresee must still name its record, and be skippable
                message = f"{where}: cannot be used ({type(error).__name__}: {error})"
            else:
                store.add(example, number, line_no)
                continue
            if not skip_bad_records:
                raise DataError(message) from None
            report.skipped += 1
            if len(report.first_errors) < 5:
                report.first_errors.append(message)
    except BaseException:  # a bad record or a broken file: remove the half-written store
        store.abandon()
        raise
    examples = store.finish()
    report.loaded = len(examples)
    if report.ranking_overruled:  # once per file: both fields may be meant, but only one can order the group
        logger.warning("%s: %d record(s) have a 'ranking' that contradicts their 'scores'; the scores decide the "
                       "order of their responses (the ranking is ignored)", path, report.ranking_overruled)
    if not examples:
        raise DataError(f"{path}: no usable record" + (f" ({report.skipped} skipped)" if report.skipped else ""))
    return examples, report


def select_examples(examples: Sequence[RankedExample], indices: Sequence[int]) -> Sequence[RankedExample]:
    """The examples at ``indices``: a view (nothing copied) of a loaded file's RankedExamples, a list otherwise.
    Use it to split a loaded file, so the split does not turn the compact store into Python objects."""
    if isinstance(examples, RankedExamples):
        return examples.select(indices)
    return [examples[i] for i in indices]


def examples_from_records(records: Iterable[Dict[str, Any]], data_format: str = "native",
                          source: str = "<records>") -> List[RankedExample]:
    """Examples from in-memory records (the pipeline's stages and tests)."""
    out = []
    for number, record in enumerate(records, start=1):
        fmt = detect_format(record) if data_format == "auto" else data_format
        where = f"{source}: record {number}"
        example = parse_record(record, fmt, where)
        check_text(example, record, where)
        out.append(example)
    return out
