"""``tuna score``: probabilistic ranking by a teacher's log-likelihoods.

For every response, the teacher's log-likelihood given the templated prompt (EOS included), computed with
the fused ``sequence_logprobs`` under ``torch.no_grad()`` (no [N, V] logits), in batches bounded by a
token budget. Each output record keeps its fields and gains ``scores`` (sum / tokens ** alpha; alpha = 1
is the mean, the method's choice), ``teacher`` (sum, tokens, mean per response) and ``ranking``: native
records that ``tuna train`` reads.

A teacher behind an OpenAI-compatible completions endpoint that echoes prompt log-probs (``echo`` +
``logprobs``, as vLLM serves them) works too: its sums cover the response's text tokens (the endpoint does
not echo an EOS). It is asked as ``tuna rank`` asks its judge (:func:`.pool.run_cached`): network faults
are retried by the client within its deadlines; every finished record (scored, or failed with its reason)
goes to ``<out>.cache.jsonl`` at once, so a killed or interrupted run resumes asking only what is missing (a
first Ctrl-C keeps the answers in flight, a second drops them: :mod:`.pool`); an
answer without usable log-probs (none, malformed, a response token with a null or non-finite log-prob, no
token in the response) fails its record, and so does a record that cannot be prompted; failed records go to
``<out>.failures.jsonl`` with their reason (file, record, line, id). Scores never come from non-finite
log-probs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from tuna_hf.model import fused_batch_forward
from tuna_kernels import length_normalised

from ..collate import pack, pad_id_of, tokenize_group
from ..data import RankedExample, contextual_prompt
from ..options import EndpointOptions, ScoreOptions, ScoringOptions, TextOptions
from ..progress import progress_bar
from ..schema import PROMPT_FIELDS, RESPONSE_FIELDS, first_field, record_name
from .http import JsonClient, RequestFailed
from .pool import require_counts, run_cached
from .store import JsonlStore, write_jsonl

logger = logging.getLogger(__name__)

#: bump when what a cached endpoint score means changes (which echoed tokens are summed): cached ones are redone
ENDPOINT_SCORE_VERSION = 1
#: failed records named one line each in the log (all of them are in <out>.failures.jsonl)
LOGGED_FAILURES = 10


def as_example(record: Dict[str, Any]) -> RankedExample:
    """Prompt and responses of a record (native, generated or formatted); its scores are not used."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    where = record_name(record)
    responses = first_field(record, RESPONSE_FIELDS)
    if not responses:
        raise ValueError(f"{where}: no 'responses' to score")
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise ValueError(f"{where}: the responses must be a list of strings, got "
                         f"{json.dumps(responses, default=str)[:60]}")
    text = [record.get(name) for name in PROMPT_FIELDS if name in record]
    if not text or not all(isinstance(t, str) for t in text) or not isinstance(record.get("input") or "", str):
        raise ValueError(f"{where}: needs a string 'instruction' (or 'prompt'), and an "
                         "'input' that is a string if any")
    if "instruct" in record and "generation" in record:  # a raw contextual record: `prompt` is the judge's
        prompt, formatted = contextual_prompt(record, list(responses), where)
        return RankedExample(prompt, list(responses), [0.0] * len(responses), prompt_is_formatted=formatted)
    if "prompt" in record:
        return RankedExample(record["prompt"], list(responses), [0.0] * len(responses), prompt_is_formatted=True)
    return RankedExample(record["instruction"], list(responses), [0.0] * len(responses), input=record.get("input"))


def _with_scores(record, sums: List[float], tokens: List[int], alpha: float, teacher: str) -> Dict[str, Any]:
    scores = [length_normalised(s, t, alpha) for s, t in zip(sums, tokens)]
    out = dict(record)
    out.pop("ranking", None)
    out.update(scores=scores, ranking=sorted(range(len(scores)), key=lambda i: -scores[i]),
               teacher={"model": teacher, "sum": sums, "tokens": tokens,
                        "mean": [length_normalised(s, t, 1.0) for s, t in zip(sums, tokens)], "alpha": alpha})
    return out


@torch.no_grad()
def group_logprobs(model, tokenizer, examples: List[RankedExample], options: Optional[ScoringOptions] = None
                   ) -> List[Tuple[List[float], List[int]]]:
    """Per group, each response's summed log-likelihood and its token count (EOS included), by the fused
    ``sequence_logprobs``; ``options`` (default: :class:`ScoringOptions`' defaults) give the template, max_length
    and the batches' size: as many groups as fit ``token_budget`` tokens (prompt shared)."""
    options = options or ScoringOptions()
    device = next(model.parameters()).device
    model.eval()
    groups = [tokenize_group(example, tokenizer, options.template, options.max_length) for example in examples]
    pad_id = pad_id_of(tokenizer)
    out: List[Tuple[List[float], List[int]]] = []
    with progress_bar(len(groups), "score", unit="group") as bar:
        start = 0
        while start < len(groups):
            end, tokens = start, 0
            while end < len(groups):
                size = len(groups[end].prompt_ids) + sum(map(len, groups[end].response_ids))
                if end > start and tokens + size > options.token_budget:
                    break
                tokens, end = tokens + size, end + 1
            batch = pack(groups[start:end], "shared", pad_id).to(device)
            sums, counts = fused_batch_forward(model, batch, scores_only=True)
            sums, counts = sums.double().cpu().tolist(), counts.cpu().tolist()
            seq = 0
            for group in groups[start:end]:
                k = len(group.response_ids)
                out.append((sums[seq:seq + k], counts[seq:seq + k]))
                seq += k
            bar.update(end - start)
            start = end
    return out


def score_with_model(model, tokenizer, records: List[Dict[str, Any]], options: Optional[ScoringOptions] = None,
                     teacher_name: str = "local") -> List[Dict[str, Any]]:
    """Scored records (see the module docstring); ``options`` as :func:`group_logprobs` takes them, and alpha."""
    options = options or ScoringOptions()
    examples = [as_example(record) for record in records]
    return [_with_scores(record, sums, counts, options.alpha, teacher_name)
            for record, (sums, counts) in zip(records, group_logprobs(model, tokenizer, examples, options))]


class EndpointAnswerError(ValueError):
    """The endpoint answered, but not with usable prompt log-probs."""


#: appended to the reason of a request failed by an HTTP error status: an endpoint that does not serve echoed prompt log-probs often refuses
#: or errs on the request instead of answering without them (transformers serve answers max_tokens 0 with HTTP 500
#: and ignores echo and logprobs)
REFUSED_HINT = (" (the teacher is asked /completions with max_tokens 0, echo and logprobs: the endpoint must serve "
                "echoed prompt log-probs, as vLLM does; transformers serve does not)")


def completion_request(model_name: str, text: str) -> Dict[str, Any]:
    """The completions request that echoes ``text`` with each token's log-prob, generating nothing."""
    return {"model": model_name, "prompt": text, "max_tokens": 0, "echo": True, "logprobs": 0, "temperature": 0}


def response_logprobs(answer: Any, start: int) -> List[float]:
    """The echoed log-probs of the tokens that begin at or after character ``start`` (the response's tokens).

    Raises EndpointAnswerError when the answer has no ``choices[0].logprobs`` with ``token_logprobs`` and
    ``text_offset`` lists of one entry per token, when a response token's log-prob is null (only the text's
    first token has none) or not a finite number, or when no token begins in the response."""
    try:
        logprobs = answer["choices"][0]["logprobs"]
        values, offsets = logprobs["token_logprobs"], logprobs["text_offset"]
    except (KeyError, IndexError, TypeError):
        raise EndpointAnswerError("the answer has no choices[0].logprobs.token_logprobs / text_offset: the endpoint "
                                  "must echo prompt log-probs (completions with echo and logprobs, as vLLM serves "
                                  "them)") from None
    if not (isinstance(values, list) and isinstance(offsets, list) and len(values) == len(offsets)
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise EndpointAnswerError("malformed logprobs: token_logprobs and text_offset must be lists of one entry per "
                                  f"token (got {type(values).__name__} and {type(offsets).__name__} of "
                                  f"{len(values) if isinstance(values, list) else '?'} and "
                                  f"{len(offsets) if isinstance(offsets, list) else '?'})")
    picked = []
    for index, (value, offset) in enumerate(zip(values, offsets)):
        if offset < start or (index == 0 and value is None):  # the prompt's tokens; the text's first has none
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise EndpointAnswerError(f"token {index} (in the response) has log-prob {value!r}, not a finite number")
        picked.append(float(value))
    if not picked:
        raise EndpointAnswerError("no token of the response was echoed (an empty response, or text offsets that "
                                  "end before it)")
    return picked


def endpoint_entry(client: JsonClient, model_name: str, prompt: str, responses: Sequence[str]) -> Dict[str, Any]:
    """The cache entry of one record: status ok (``sum`` and ``tokens`` per response) or failed (``reason``,
    naming the response). A request the client gave up on and an unusable answer both fail the record."""
    sums, tokens = [], []
    for index, response in enumerate(responses):
        try:
            picked = response_logprobs(client.post("/completions", completion_request(model_name, prompt + response)),
                                       len(prompt))
        except EndpointAnswerError as error:
            return {"status": "failed", "reason": f"response {index}: {error}"}
        except RequestFailed as error:  # an HTTP error (not a network fault) may be the endpoint refusing echo
            hint = REFUSED_HINT if re.search(r"HTTP [45]\d\d", str(error)) else ""
            return {"status": "failed", "reason": f"response {index}: {error}{hint}"}
        total = math.fsum(picked)
        if not math.isfinite(total):  # finite log-probs whose sum overflows
            return {"status": "failed", "reason": f"response {index}: the log-probs sum to {total}"}
        sums.append(total)
        tokens.append(len(picked))
    return {"status": "ok", "sum": sums, "tokens": tokens}


def endpoint_key(teacher: str, prompt: str, responses: Sequence[str]) -> str:
    """The cache key of a record's scores: a hash of what decides them (the teacher, the texts it is sent and
    the version of the token selection); not the record's id, nor alpha (applied when the output is written)."""
    material = {"teacher": teacher, "version": ENDPOINT_SCORE_VERSION, "prompt": prompt, "responses": list(responses)}
    return "score:" + hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]


def score_with_endpoint(client: JsonClient, model_name: str, records: List[Any], out: Path,
                        template: str = TextOptions.template, alpha: float = ScoreOptions.alpha,
                        concurrency: int = EndpointOptions.concurrency,
                        retry_failed: bool = False, where: Optional[List[str]] = None) -> Dict[str, int]:
    """Score every record by the endpoint (see the module docstring); write ``out`` (the scored records) and
    ``out.failures.jsonl`` (the others, each with ``score_failure``: where it is, its id and why).

    ``where[i]`` names record i in reasons (default "record i+1"; the CLI gives file, record and line);
    ``retry_failed`` asks again for records cached as failed. Returns the counts."""
    require_counts(concurrency=concurrency)
    if template == "chat":  # before any request: every record would fail the same way
        raise ValueError("--template chat needs the teacher's tokenizer, which an endpoint does not give: use "
                         "alpaca or none (a prompt already templated is taken as it is)")
    out = Path(out)
    cache = JsonlStore(out.with_name(out.name + ".cache.jsonl"))
    teacher = f"openai:{model_name}"
    where = where or [f"record {i + 1}" for i in range(len(records))]
    jobs: List[Any] = []  # per record: (key, prompt, responses), or why it cannot be sent
    for record in records:
        try:
            example = as_example(record)
            prompt = example.prompt_text(template)
            jobs.append((endpoint_key(teacher, prompt, example.responses), prompt, example.responses))
        except ValueError as error:
            jobs.append(str(error))
    pending = {job[0]: job for job in jobs if not isinstance(job, str)
               and (job[0] not in cache or (retry_failed and cache.entries[job[0]]["status"] != "ok"))}
    run_cached({key: functools.partial(endpoint_entry, client, model_name, prompt, responses)
                for key, (_, prompt, responses) in pending.items()}, cache, concurrency, "score", abort=client.abort)
    scored, failed = [], []
    for record, name, job in zip(records, where, jobs):
        entry = {"status": "failed", "reason": job} if isinstance(job, str) else cache.entries[job[0]]
        if entry["status"] == "ok":
            scored.append(_with_scores(record, entry["sum"], entry["tokens"], alpha, teacher))
            continue
        named = f"{name} (id {record['id']!r})" if isinstance(record, dict) and "id" in record else name
        reason = f"{named}: {entry['reason']}"
        failed.append(dict(record, score_failure=reason) if isinstance(record, dict)
                      else {"record": record, "score_failure": reason})
        if len(failed) <= LOGGED_FAILURES:
            logger.warning("not scored: %s", reason)
    failures = out.with_name(out.name + ".failures.jsonl")
    write_jsonl(out, scored)
    write_jsonl(failures, failed)
    if failed:
        logger.warning("%d records not scored%s: every reason is in %s (a rerun takes them from the cache; "
                       "--retry-failed asks them again)", len(failed),
                       f" ({len(failed) - LOGGED_FAILURES} more than shown)" if len(failed) > LOGGED_FAILURES else "",
                       failures)
    stats = {"records": len(records), "scored": len(scored), "failed": len(failed), "asked": len(pending)}
    logger.info("score: %s", stats)
    return stats
