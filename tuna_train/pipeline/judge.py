"""Contextual ranking by a judge: the method's judge prompt, robust parsing, and three judges.

- ``openai:MODEL``: an OpenAI-compatible chat-completions endpoint (``--base-url``; key from an
  environment variable);
- ``local:PATH``: a local Hugging Face causal LM, greedy decoding of the same prompt (an answer asked again
  because it did not parse is sampled: greedy decoding would repeat it);
- ``rule``: the rule-based judge of the built-in synthetic tasks (their answers are verifiable); a record that
  is not a built-in task is refused at once (:class:`JudgeNotApplicable`), not asked again;
- ``verifiable``: the IFEval checkers of each record's ``constraints`` (:mod:`tuna_train.verifiable.judge`).

Every judge has ``ask(record, attempt)`` (attempt 0 first; later ones when an answer did not parse) and may
have ``abort()``, which ends what it is doing at once (a second Ctrl-C).
"""

from __future__ import annotations

import re
import threading
from typing import Any, Dict, List, Optional, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..model import Placement, load_tokenizer
from ..options import JudgeOptions
from ..synthetic import correct_answer, grade, parse_instruction
from ..templates import alpaca_prompt
from ..verifiable.checks import ConstraintSpecError
from ..verifiable.judge import VerifiableJudge
from .http import JsonClient

SYSTEM_PROMPT = ("You are an experienced data annotator. You judge responses to instructions carefully, "
                 "objectively and consistently.")


def judge_messages(instruction: str, input_text: Optional[str], responses: Sequence[str]) -> List[Dict[str, str]]:
    """The judge prompt of the method (TUNA_METHOD.md), in structure."""
    k = len(responses)
    shown = "\n\n".join(f"###Response {j}:\n{text}" for j, text in enumerate(responses))
    user = (
        f"{alpaca_prompt(instruction, input_text)}\n\n{shown}\n\n"
        "Follow these steps:\n"
        "1. Decide whether the instruction is open-ended or closed-ended.\n"
        f"2. Write your own high-quality response as ###Response {k}, as a reference.\n"
        "3. Drop responses that duplicate another one.\n"
        "4. Score every remaining response from 0 to 15 as the sum of three 0-5 sub-scores (open-ended: "
        "relevance, level of detail, accuracy; closed-ended: accuracy, level of detail, clarity), written "
        "as \"Response k: [score]\".\n"
        "5. Finally output the ranking of the responses, best first, as \"rank: [i, j, k, ...]\"."
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


class RankingParseError(ValueError):
    pass


class JudgeAnswerError(ValueError):
    """The judge answered, but not with text (e.g. message content that is a number)."""


class JudgeNotApplicable(ValueError):
    """This judge cannot judge this record at all (asking again would give the same): the record fails at once,
    with this reason."""


def message_text(content) -> str:
    """The text of a chat message's ``content``: a string, or a list of content parts (OpenAI's
    ``[{"type": "text", "text": ...}, ...]``), whose text parts are joined; anything else is refused."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [part if isinstance(part, str) else part.get("text") for part in content
                 if isinstance(part, str) or (isinstance(part, dict) and part.get("type", "text") == "text")]
        if all(isinstance(text, str) for text in texts):
            return "".join(texts)
    raise JudgeAnswerError(f"the message content is {type(content).__name__}, not text: {str(content)[:80]!r}")


_RANK_RE = re.compile(r"\brank(?:ing)?\s*:\s*\[?([^\]\n]*)", re.IGNORECASE)


def parse_ranking(answer: str, num_responses: int) -> List[int]:
    """Indices best first from the judge's answer: every integer after the last "rank:" / "ranking:".

    Index ``num_responses`` is the judge's own reference response and is allowed; missing indices
    (duplicates the judge dropped) are allowed. An answer with no ranking, an index that names no
    response, or an index listed twice raises RankingParseError.
    """
    matches = _RANK_RE.findall(answer or "")
    if not matches:
        raise RankingParseError("no 'rank:' line in the answer")
    numbers = re.findall(r"-?\d+", matches[-1])
    if not numbers:
        raise RankingParseError("the 'rank:' line lists no index")
    indices = []
    for number in numbers:  # digits first: int() refuses over 4300 digits, and so many name no response anyway
        digits = number.lstrip("-").lstrip("0") or "0"
        if len(digits) > len(str(num_responses)):
            raise RankingParseError(f"the ranking names response {number[:20]}... ({len(number)} characters), "
                                    f"but there are {num_responses} (and the judge's own, {num_responses})")
        indices.append(-int(digits) if number.startswith("-") else int(digits))
    for index in indices:
        if not 0 <= index <= num_responses:
            raise RankingParseError(f"the ranking names response {index}, but there are {num_responses} "
                                    f"(and the judge's own, {num_responses})")
    if len(set(indices)) != len(indices):
        raise RankingParseError(f"the ranking lists a response twice: {str(indices)[:200]}")
    return indices


# a score line of step 4, "Response k: [score]", at the start of a line (list markers allowed; a "###" heading
# of a response is not one)
_SCORE_LINE = r"^[ \t>*-]*Response\s*(\d+)\s*:\s*\[\s*(-?\d+(?:\.\d+)?)\s*\]"
_SCORE_RE = re.compile(_SCORE_LINE, re.IGNORECASE | re.MULTILINE)
# where the judge's own response ends: a response heading, a score line or the rank line
_OWN_RESPONSE_END = re.compile(r"^[ \t]*###\s*Response\s*\d+\s*:|" + _SCORE_LINE + r"|^[ \t]*rank(?:ing)?\s*:",
                               re.IGNORECASE | re.MULTILINE)


def parse_scores(answer: str) -> Dict[int, float]:
    """The judge's scores, written "Response k: [score]" at the start of a line (step 4 of the method's prompt):
    {k: score}, the last one of each k; empty when it wrote none."""
    return {int(index): float(score) for index, score in _SCORE_RE.findall(answer or "")}


def judge_response(answer: str, num_responses: int) -> Optional[str]:
    """The judge's own reference response, under its ``###Response K:`` heading (K = ``num_responses``), up to
    the next response heading, score line ("Response k: [score]") or rank line (other headings, such as a
    Markdown "### Ingredients", are part of it); None when the answer has none or it is empty."""
    heading = re.search(rf"^[ \t]*###\s*Response\s*{num_responses}\s*:[ \t]*\n?", answer or "",
                        re.IGNORECASE | re.MULTILINE)
    if heading is None:
        return None
    end = _OWN_RESPONSE_END.search(answer, heading.end())
    text = answer[heading.end():end.start() if end else len(answer)].strip()
    return text or None


class ChatJudge:
    """An OpenAI-compatible chat-completions judge."""

    def __init__(self, model: str, client: JsonClient, temperature: float = 0.0,
                 max_tokens: int = JudgeOptions.judge_max_tokens) -> None:
        self.model, self.client = model, client
        self.temperature, self.max_tokens = temperature, max_tokens
        self.name = f"openai:{model}"
        # what, besides the prompt, decides the answer: part of the cache key of a judgement
        self.identity = {"name": self.name, "temperature": temperature, "max_tokens": max_tokens}

    def ask(self, record: Dict, attempt: int = 0) -> str:
        return self.chat(judge_messages(record["instruction"], record.get("input"), record["responses"]))

    def abort(self) -> None:
        self.client.abort()

    def chat(self, messages: List[Dict[str, str]]) -> str:
        answer = self.client.post("/chat/completions", {"model": self.model, "messages": messages,
                                                        "temperature": self.temperature,
                                                        "max_tokens": self.max_tokens})
        try:
            content = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            return ""  # an answer without content is unparsable: retried, then recorded
        return message_text(content)


class _Stopped(StoppingCriteria):
    """Ends a generation when its event is set (abort)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class LocalJudge:
    """A local causal LM as judge: greedy decoding of the prompt first; an answer asked again (it did not parse)
    is sampled at ``retry_temperature``, seeded by the attempt, since greedy decoding would repeat it word for
    word."""

    def __init__(self, path: str, max_new_tokens: int = 512, placement: Optional[Placement] = None,
                 retry_temperature: float = 0.7) -> None:
        if not retry_temperature > 0:
            raise ValueError(f"retry_temperature must be > 0, got {retry_temperature!r}")
        self.tokenizer = load_tokenizer(path)
        self.model = (placement or Placement()).load(path)
        self.max_new_tokens, self.retry_temperature = max_new_tokens, retry_temperature
        self.name = f"local:{path}"
        self.identity = {"name": self.name, "max_new_tokens": max_new_tokens, "retry_temperature": retry_temperature}
        self._aborted = threading.Event()
        self._seed_lock = threading.Lock()  # the sampling seed is global to torch: set it and sample together

    def ask(self, record: Dict, attempt: int = 0) -> str:
        return self.chat(judge_messages(record["instruction"], record.get("input"), record["responses"]), attempt)

    def abort(self) -> None:
        self._aborted.set()

    def chat(self, messages: List[Dict[str, str]], attempt: int = 0) -> str:
        """The answer to ``messages``: greedy at attempt 0, else sampled at ``retry_temperature`` (seed =
        attempt, so a rerun samples the same answers)."""
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = "\n\n".join(m["content"] for m in messages)
        ids = self.tokenizer(text, return_tensors="pt").to(self.model.device)
        options = dict(max_new_tokens=self.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                       stopping_criteria=StoppingCriteriaList([_Stopped(self._aborted)]))
        if self._aborted.is_set():
            raise RuntimeError("aborted (interrupted)")
        with torch.no_grad():
            if attempt == 0:
                out = self.model.generate(**ids, do_sample=False, **options)
            else:
                with self._seed_lock:
                    torch.manual_seed(attempt)
                    out = self.model.generate(**ids, do_sample=True, temperature=self.retry_temperature,
                                              top_k=0, top_p=1.0, **options)
        return self.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


class RuleJudge:
    """The built-in tasks' judge: reads the task back from the instruction, writes its correct answer as its own
    reference response (###Response K, step 2 of the method's prompt), ranks the responses and its own by edit
    distance to that answer, drops duplicates (its own too, when a response already is the answer), and writes
    its answer in the same form as a model judge would, so it goes through the same parsers."""

    name = "rule"
    identity = {"name": "rule", "writes_reference": True}

    def ask(self, record: Dict, attempt: int = 0) -> str:
        if parse_instruction(record["instruction"]) is None:
            raise JudgeNotApplicable("the rule judge ranks only instructions of the built-in tasks, and this is "
                                     f"not one: {record['instruction'][:80]!r}")
        responses = list(record["responses"])
        reference = correct_answer(record["instruction"])
        seen, kept = set(), []
        for index, response in enumerate(responses + [reference]):  # index K: its own
            if response.strip() not in seen:
                seen.add(response.strip())
                kept.append(index)
        grades = {i: 0.0 if i == len(responses) else grade(record["instruction"], responses[i]) for i in kept}
        order = sorted(kept, key=lambda i: (-grades[i], i))
        scores = "\n".join(f"Response {i}: [{max(0, 15 + int(grades[i]))}]" for i in kept)
        return (f"closed-ended\n###Response {len(responses)}:\n{reference}\n\n{scores}\n"
                f"rank: [{', '.join(map(str, order))}]")


class CheckedConstraintsJudge(VerifiableJudge):
    """The ``verifiable`` judge, whose record with unusable ``constraints`` fails at once: checking again would
    give the same (:class:`JudgeNotApplicable`), not a parse failure asked three times."""

    def ask(self, record: Dict[str, Any], attempt: int = 0) -> str:
        try:
            return super().ask(record, attempt)
        except ConstraintSpecError as error:
            raise JudgeNotApplicable(str(error)) from error


def make_judge(spec: str, options: JudgeOptions = JudgeOptions(), placement: Optional[Placement] = None):
    """``openai:MODEL`` (asked as ``options`` say: a :class:`.options.JudgeOptions`, or a configuration that mixes
    it in) | ``local:PATH`` (loaded with ``placement``) | ``rule`` | ``verifiable``."""
    if spec == "rule":
        return RuleJudge()
    if spec == "verifiable":
        return CheckedConstraintsJudge()
    if spec.startswith("openai:"):
        client = JsonClient(options.base_url or "https://api.openai.com/v1", options.api_key_env, options.timeout,
                            options.max_retries, max_backoff=options.max_backoff)
        return ChatJudge(spec.split(":", 1)[1], client, max_tokens=options.judge_max_tokens)
    if spec.startswith("local:"):
        return LocalJudge(spec.split(":", 1)[1], placement=placement)
    raise ValueError(f"--judge must be openai:MODEL, local:PATH, rule or verifiable, got {spec!r}")
