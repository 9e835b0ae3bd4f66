"""``tuna rank``: contextual ranking of each record's responses by a judge.

Each record (``instruction`` [+ ``input``], ``responses``) is sent to the judge with the method's prompt;
the ranking is parsed from the answer. A network fault is retried by the client; an answer that does not
parse (no ranking, an index that names no response, an index twice) is asked again, up to
``parse_attempts`` times, then recorded as a failure. Every finished record (ranked or failed, with the
judge's raw answers) goes to an on-disk cache as soon as it is done, so a killed run resumes without
asking again. The output is native ranked records (``ranking`` best first) that ``tuna train`` reads;
failures go to ``<out>.failures.jsonl``.
"""

from __future__ import annotations

import concurrent.futures
import logging
from pathlib import Path
from typing import Any, Dict, List

from .http import RequestFailed
from .judge import RankingParseError, parse_ranking
from .store import JsonlStore, record_key, write_jsonl

logger = logging.getLogger(__name__)


def rank_one(judge, record: Dict[str, Any], parse_attempts: int = 3) -> Dict[str, Any]:
    """The cache entry of one record: status ok (ranking) or failed (reason); raw answers kept."""
    answers, errors = [], []
    for _ in range(parse_attempts):
        try:
            answer = judge.ask(record)
        except RequestFailed as error:
            return {"status": "failed", "reason": str(error), "answers": answers, "errors": errors}
        answers.append(answer)
        try:
            return {"status": "ok", "ranking": parse_ranking(answer, len(record["responses"])),
                    "answers": answers, "errors": errors}
        except RankingParseError as error:
            errors.append(str(error))
    return {"status": "failed", "reason": f"unparsable after {parse_attempts} answers: {errors[-1]}",
            "answers": answers, "errors": errors}


def ranked_record(record: Dict[str, Any], entry: Dict[str, Any], judge_name: str,
                  include_judge_response: bool = False) -> Dict[str, Any]:
    """A native ranked record; the judge's own response (index K) is left out of the ranking."""
    k = len(record["responses"])
    ranking = [i for i in entry["ranking"] if i < k or include_judge_response]
    out = {key: record[key] for key in ("id", "instruction", "input", "task", "length") if key in record}
    out.update(responses=list(record["responses"]), ranking=[i for i in ranking if i < k],
               judge={"name": judge_name, "answer": entry["answers"][-1], "ranking": entry["ranking"]})
    return out


def rank_records(records: List[Dict[str, Any]], judge, out: Path, concurrency: int = 4,
                 parse_attempts: int = 3, retry_failed: bool = False) -> Dict[str, int]:
    """Rank every record (bounded concurrency, cached); write ``out`` and ``out.failures.jsonl``."""
    out = Path(out)
    cache = JsonlStore(out.with_name(out.name + ".cache.jsonl"))
    keys = [record_key(r) for r in records]
    pending = [(key, r) for key, r in zip(keys, records)
               if key not in cache or (retry_failed and cache.entries[key]["status"] != "ok")]
    pending = list({key: (key, r) for key, r in pending}.values())
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = {pool.submit(rank_one, judge, record, parse_attempts): key for key, record in pending}
        for future in concurrent.futures.as_completed(futures):
            cache.put(futures[future], future.result())
    ranked, failed = [], []
    for key, record in zip(keys, records):
        entry = cache.entries[key]
        result = ranked_record(record, entry, judge.name) if entry["status"] == "ok" else None
        if result is not None and result["ranking"]:
            ranked.append(result)
        else:
            failed.append(dict(record, judge_failure=entry.get("reason", "empty ranking"),
                               judge_answers=entry["answers"]))
    write_jsonl(out, ranked)
    write_jsonl(out.with_name(out.name + ".failures.jsonl"), failed)
    stats = {"records": len(records), "ranked": len(ranked), "failed": len(failed), "asked": len(pending)}
    logger.info("rank: %s", stats)
    return stats
