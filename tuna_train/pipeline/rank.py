"""``tuna rank``: contextual ranking of each record's responses by a judge.

Each record (``instruction`` [+ ``input``], ``responses``) is sent to the judge with the method's prompt;
the ranking is parsed from the answer. A network fault is retried by the client (within its stated
deadlines); an answer that does not parse (no ranking, an index that names no response, an index twice,
message content that is not text) is asked again, up to ``parse_attempts`` times, then recorded as a
failure. A record the judge cannot judge at all (the rule judge and an instruction that is not a built-in task)
fails at once with the judge's reason. A malformed input record (no ``responses``, wrong types) is recorded as
a failure without asking. No single record can stop the run: whatever goes wrong with one ends as that
record's failure reason.

A judge's answer is stored (cache, output, failures) cut to its first :data:`MAX_STORED_ANSWER_CHARS`
characters, with :data:`CUT_MARKER` saying how many more there were; its ranking is parsed from the whole
answer. A Ctrl-C stops sending requests and keeps every answer received (:mod:`.pool`).

Every finished record (ranked or failed, with the judge's raw answers) goes to an on-disk cache as soon
as it is done, so a killed run resumes without asking again. The cache key is a hash of everything that
decides the judgement: the judge (name, model and sampling settings), the prompt it is sent (instruction,
input, responses), the task fields the rule judge reads and the parser version; not the record's ``id``.
So two records sharing an id get a judgement each, and changed responses or another judge are asked anew.
The output is native ranked records (``ranking`` best first) that ``tuna train`` reads; failures (with
their reasons) go to ``<out>.failures.jsonl``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..options import EndpointOptions, JudgeOptions
from ..schema import passed_through
from .http import RequestFailed
from .judge import JudgeNotApplicable, RankingParseError, judge_messages, judge_response, parse_ranking, parse_scores
from .pool import require_counts, run_cached
from .store import JsonlStore, write_jsonl

logger = logging.getLogger(__name__)

PARSER_VERSION = 1  # bump when parse_ranking changes what it accepts: cached judgements are then redone

# a judge's answer is a few KiB; one far longer (a runaway generation, a hostile endpoint) is stored cut to this
# many characters, so that it cannot blow up the cache and the output (each holds it once)
MAX_STORED_ANSWER_CHARS = 64 * 1024
CUT_MARKER = "\n[tuna rank: answer cut here, {} more characters not stored]"


def stored_answer(answer: str) -> str:
    """``answer`` as stored: whole, or its first MAX_STORED_ANSWER_CHARS characters and the cut marker."""
    if len(answer) <= MAX_STORED_ANSWER_CHARS:
        return answer
    return answer[:MAX_STORED_ANSWER_CHARS] + CUT_MARKER.format(len(answer) - MAX_STORED_ANSWER_CHARS)


def was_cut(answer: str) -> bool:
    """Whether a stored answer was cut (:func:`stored_answer`)."""
    return len(answer) > MAX_STORED_ANSWER_CHARS and answer[MAX_STORED_ANSWER_CHARS:].startswith(
        CUT_MARKER.split("{}")[0])


def record_problem(record: Any) -> Optional[str]:
    """Why a record cannot be sent to the judge (None if it can)."""
    if not isinstance(record, dict):
        return f"a record must be a JSON object, got {type(record).__name__}"
    instruction = record.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        return f"field 'instruction' must be a non-empty string, got {_shown(instruction)}"
    if record.get("input") is not None and not isinstance(record["input"], str):
        return f"field 'input' must be a string or null, got {_shown(record['input'])}"
    if "responses" not in record:
        return "no 'responses' field"
    responses = record["responses"]
    if not isinstance(responses, list) or not responses:
        return f"field 'responses' must be a non-empty list of strings, got {_shown(responses)}"
    for index, response in enumerate(responses):
        if not isinstance(response, str):
            return f"field 'responses': item {index} is {_shown(response)}, not a string"
    return None


def _shown(value: Any) -> str:
    return f"{type(value).__name__} {json.dumps(value, default=str)[:60]}"


def judgement_key(judge, record: Dict[str, Any]) -> str:
    """The cache key of a record's judgement: a hash of what decides it (see the module docstring)."""
    material = {"judge": getattr(judge, "identity", {"name": judge.name}), "parser": PARSER_VERSION,
                "prompt": judge_messages(record["instruction"], record.get("input"), record["responses"]),
                "task": [record.get("task"), record.get("length")]}
    if "constraints" in record:  # what the verifiable judge checks (absent elsewhere: other keys stay as they were)
        material["constraints"] = record["constraints"]
    text = json.dumps(material, sort_keys=True, default=str)  # ASCII: lone surrogates are escaped
    return "judgement:" + hashlib.sha256(text.encode()).hexdigest()[:32]


def rank_one(judge, record: Dict[str, Any], parse_attempts: int = JudgeOptions.parse_attempts) -> Dict[str, Any]:
    """The cache entry of one record: status ok (ranking) or failed (reason); raw answers kept (as stored)."""
    answers, errors = [], []
    for attempt in range(parse_attempts):
        try:
            answer = judge.ask(record, attempt)
        except (RequestFailed, JudgeNotApplicable) as error:  # asking again would not help
            return {"status": "failed", "reason": str(error), "answers": answers, "errors": errors}
        except Exception as error:  # a bad answer (content that is not text) or a judge fault: this record only
            errors.append(f"{type(error).__name__}: {error}"[:500])
            continue
        answers.append(stored_answer(answer))
        try:  # the whole answer: its ranking comes last, maybe past the cut
            return {"status": "ok", "ranking": parse_ranking(answer, len(record["responses"])),
                    "answers": answers, "errors": errors}
        except RankingParseError as error:
            errors.append(str(error))
    return {"status": "failed", "reason": f"unparsable after {parse_attempts} answers: {errors[-1]}",
            "answers": answers, "errors": errors}


def _entry(judge, record: Dict[str, Any], parse_attempts: int) -> Dict[str, Any]:
    return dict(rank_one(judge, record, parse_attempts), id=record.get("id"))


def ranked_record(record: Dict[str, Any], entry: Dict[str, Any], judge_name: str,
                  include_judge_response: bool = False, audit=None) -> Dict[str, Any]:
    """A native ranked record of the candidates the judge ranked, best first (``ranking`` is 0..n-1; a dropped
    duplicate is left out; the judge's own ranking of the record's indices stays under ``judge``).

    The judge's own reference response (index K) is a candidate in its place when ``include_judge_response``,
    the answer holds its text (:func:`judge_response`) and it repeats no other candidate; else it is left out.
    When the judge's scores (:func:`parse_scores`) cover every candidate and agree with its ranking, they are
    written as ``scores`` too: they carry its ties, which ``skip_ties`` then leaves out of the loss (a ranking
    alone orders tied candidates arbitrarily); tied candidates keep the judge's order. A judge with an ``audit``
    (record, response) -> results (the verifiable judge's per-constraint checks) has them stored as
    ``constraint_results``, one per ranked candidate."""
    answer = entry["answers"][-1]
    candidates = dict(enumerate(record["responses"]))
    k = len(candidates)
    # the judge's own response of a cut answer may be cut too: left out
    own = judge_response(answer, k) if include_judge_response and k in entry["ranking"] and not was_cut(answer) \
        else None
    if own is not None and own.strip() not in {candidates[i].strip() for i in entry["ranking"] if i < k}:
        candidates[k] = own
    ranked = [i for i in entry["ranking"] if i in candidates]
    out = passed_through(record)
    out.update(responses=[candidates[i] for i in ranked], ranking=list(range(len(ranked))))
    reasons = record.get("finish_reasons")  # tuna generate's ("stop" / "length"): each stays with its response
    if isinstance(reasons, list) and len(reasons) == k:  # None for the judge's own response: not generated
        out["finish_reasons"] = [reasons[i] if i < k else None for i in ranked]
    scores = parse_scores(answer)
    in_order = [scores.get(i) for i in ranked]
    if None not in in_order and all(a >= b for a, b in zip(in_order, in_order[1:])):
        out["scores"] = in_order
    if audit is not None:
        out["constraint_results"] = [audit(record, response) for response in out["responses"]]
    out["judge"] = {"name": judge_name, "answer": answer, "ranking": entry["ranking"]}
    return out


def rank_records(records: List[Dict[str, Any]], judge, out: Path, concurrency: int = EndpointOptions.concurrency,
                 parse_attempts: int = JudgeOptions.parse_attempts, retry_failed: bool = False,
                 include_judge_response: bool = False) -> Dict[str, int]:
    """Rank every record (bounded concurrency, cached); write ``out`` and ``out.failures.jsonl``. With
    ``include_judge_response`` a ranked record keeps the judge's own reference response as a candidate.

    Every record ends in one of the two files: ranked, or failed with its reason. ``concurrency`` and
    ``parse_attempts`` must be >= 1 (checked before the cache is opened). A Ctrl-C raises
    :class:`.pool.Interrupted` once every answer received is cached; the files are then not written.
    """
    require_counts(concurrency=concurrency, parse_attempts=parse_attempts)
    out = Path(out)
    cache = JsonlStore(out.with_name(out.name + ".cache.jsonl"))
    problems = [record_problem(r) for r in records]
    keys = [None if problem else judgement_key(judge, r) for r, problem in zip(records, problems)]
    pending = {key: r for key, r in zip(keys, records)
               if key is not None and (key not in cache or (retry_failed and cache.entries[key]["status"] != "ok"))}
    counts = {"ranked": 0, "failed": 0}

    def shown(entry: Dict[str, Any], bar) -> None:  # progress: how the records asked so far ended
        counts["ranked" if entry["status"] == "ok" else "failed"] += 1
        bar.set_postfix(counts, refresh=False)

    jobs = {key: functools.partial(_entry, judge, record, parse_attempts) for key, record in pending.items()}
    run_cached(jobs, cache, concurrency, "rank", abort=getattr(judge, "abort", None), on_entry=shown)
    ranked, failed = [], []
    for index, (key, record, problem) in enumerate(zip(keys, records, problems)):
        if problem is not None:
            reason = f"record {index + 1}: {problem}"
            failed.append(dict(record, judge_failure=reason, judge_answers=[]) if isinstance(record, dict)
                          else {"record": record, "judge_failure": reason, "judge_answers": []})
            continue
        entry = cache.entries[key]
        result = ranked_record(record, entry, judge.name, include_judge_response,
                                getattr(judge, "audit", None)) if entry["status"] == "ok" else None
        if result is not None and result["ranking"]:
            ranked.append(result)
        else:
            failed.append(dict(record, judge_failure=entry.get("reason", "empty ranking"),
                               judge_answers=entry.get("answers", [])))
    write_jsonl(out, ranked)
    write_jsonl(out.with_name(out.name + ".failures.jsonl"), failed)
    stats = {"records": len(records), "ranked": len(ranked), "failed": len(failed), "asked": len(pending)}
    logger.info("rank: %s", stats)
    return stats
