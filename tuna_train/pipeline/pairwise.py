"""``tuna eval judge``: pairwise comparison of a model's answers with a baseline's, by a judge.

Each question is asked in both orders (the model's answer as Assistant A, then as Assistant B) to cancel
position bias: the model wins when both verdicts prefer it, loses when both prefer the baseline, and ties
otherwise. The win rate counts a tie as half a win; its 95% confidence interval is a percentile bootstrap
over questions with a fixed seed. Requests go through the same client and the same asking loop as ``tuna rank``
(retries, bounded concurrency, :func:`.pool.run_cached`): every verdict is cached on disk as it arrives, so a
rerun asks nothing twice, and a Ctrl-C sends nothing more, keeps the verdicts in flight (a second Ctrl-C drops
them) and raises :class:`.pool.Interrupted`.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..options import EndpointOptions, JudgeOptions
from ..stats import bootstrap_ratio_ci
from ..templates import alpaca_prompt
from .http import RequestFailed
from .judge import JudgeAnswerError
from .pool import require_counts, run_cached
from .store import JsonlStore, record_key

PAIRWISE_SYSTEM = ("Please act as an impartial judge and evaluate the quality of the responses provided by two AI "
                   "assistants to the user question below. Avoid any position bias: the order in which the "
                   "responses were presented must not influence your decision. After your explanation, output "
                   "your final verdict strictly in this format: \"[[A]]\" if assistant A is better, \"[[B]]\" if "
                   "assistant B is better, and \"[[C]]\" for a tie.")


def pairwise_messages(question: Dict[str, Any], answer_a: str, answer_b: str) -> List[Dict[str, str]]:
    user = (f"{alpaca_prompt(question['instruction'], question.get('input'))}\n\n"
            f"[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
            f"[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]")
    return [{"role": "system", "content": PAIRWISE_SYSTEM}, {"role": "user", "content": user}]


def parse_verdict(answer: str) -> Optional[str]:
    """"A", "B" or "C" (tie) from the last [[X]] of the answer; None when there is none."""
    found = re.findall(r"\[\[([ABC])\]\]", answer or "")
    return found[-1] if found else None


def _ask(judge, messages, parse_attempts: int) -> Dict[str, Any]:
    answers = []
    for _ in range(parse_attempts):
        try:
            answer = judge.chat(messages)
        except RequestFailed as error:
            return {"status": "failed", "reason": str(error), "answers": answers}
        except JudgeAnswerError:  # content that is not text: asked again, like an answer without a verdict
            continue
        answers.append(answer)
        verdict = parse_verdict(answer)
        if verdict:
            return {"status": "ok", "verdict": verdict, "answers": answers}
    return {"status": "failed", "reason": f"no verdict after {parse_attempts} answers", "answers": answers}


def outcome(model_first: Optional[str], model_second: Optional[str]) -> Optional[str]:
    """win / loss / tie of the model from its verdicts as A and as B (None if either is missing)."""
    if model_first is None or model_second is None:
        return None
    if model_first == "A" and model_second == "B":
        return "win"
    if model_first == "B" and model_second == "A":
        return "loss"
    return "tie"


def bootstrap_ci(outcomes: List[str], samples: int = 2000, seed: int = 0, level: float = 0.95):
    """Percentile bootstrap of the win rate ((wins + ties / 2) / n) over questions."""
    value = {"win": 1.0, "tie": 0.5, "loss": 0.0}
    return bootstrap_ratio_ci([value[o] for o in outcomes], samples=samples, seed=seed, level=level)


def judge_pairwise(judge, questions: List[Dict[str, Any]], model_answers: List[str], baseline_answers: List[str],
                   cache_path: Path, concurrency: int = EndpointOptions.concurrency,
                   parse_attempts: int = JudgeOptions.parse_attempts) -> Dict[str, Any]:
    """Ask both orders for every question; return counts, the win rate with its CI, and per-question rows.
    ``concurrency`` and ``parse_attempts`` must be >= 1 (checked before the cache is opened)."""
    require_counts(concurrency=concurrency, parse_attempts=parse_attempts)
    cache = JsonlStore(cache_path)
    jobs = {}
    for question, mine, theirs in zip(questions, model_answers, baseline_answers):
        key = record_key(question)
        jobs[f"{key}|model-first"] = pairwise_messages(question, mine, theirs)
        jobs[f"{key}|model-second"] = pairwise_messages(question, theirs, mine)
    pending = {k: v for k, v in jobs.items() if k not in cache}
    run_cached({k: functools.partial(_ask, judge, messages, parse_attempts) for k, messages in pending.items()},
               cache, concurrency, "judge", unit="verdict", abort=getattr(judge, "abort", None))
    rows, outcomes = [], []
    for question in questions:
        key = record_key(question)
        first, second = cache.entries[f"{key}|model-first"], cache.entries[f"{key}|model-second"]
        result = outcome(first.get("verdict"), second.get("verdict"))
        rows.append({"key": key, "outcome": result or "failed", "model_first": first, "model_second": second})
        if result:
            outcomes.append(result)
    low, high = bootstrap_ci(outcomes)
    n = len(outcomes)
    wins, ties, losses = (outcomes.count(o) for o in ("win", "tie", "loss"))
    return {"wins": wins, "ties": ties, "losses": losses, "failed": len(questions) - n, "asked": len(pending),
            "win_rate": (wins + ties / 2) / n if n else None, "win_rate_ci95": [low, high], "rows": rows}
