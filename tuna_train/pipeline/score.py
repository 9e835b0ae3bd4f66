"""``tuna score``: probabilistic ranking by a teacher's log-likelihoods.

For every response, the teacher's log-likelihood given the templated prompt (EOS included), computed with
the fused ``sequence_logprobs`` under ``torch.no_grad()`` (no [N, V] logits), in batches bounded by a
token budget. Each output record keeps its fields and gains ``scores`` (sum / tokens ** alpha; alpha = 1
is the mean, the method's choice), ``teacher`` (sum, tokens, mean per response) and ``ranking``: native
records that ``tuna train`` reads. A teacher behind an OpenAI-compatible completions endpoint that echoes
prompt log-probs (``echo`` + ``logprobs``, as vLLM serves them) works too (its sums cover the response's
text tokens; the endpoint does not echo an EOS).
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch

from tuna_hf.model import fused_batch_forward

from ..collate import pack, tokenize_group
from ..data import RankedExample, contextual_prompt
from ..progress import progress_bar
from .http import JsonClient


def as_example(record: Dict[str, Any]) -> RankedExample:
    """Prompt and responses of a record (native, generated or formatted); its scores are not used."""
    responses = record.get("responses") or record.get("output") or record.get("generation")
    if not responses:
        raise ValueError(f"record {record.get('id', '?')}: no 'responses' to score")
    if "instruct" in record and "generation" in record:  # a raw contextual record: `prompt` is the judge's
        prompt, formatted = contextual_prompt(record, list(responses), f"record {record.get('id', '?')}")
        return RankedExample(prompt, list(responses), [0.0] * len(responses), prompt_is_formatted=formatted)
    if "prompt" in record:
        return RankedExample(record["prompt"], list(responses), [0.0] * len(responses), prompt_is_formatted=True)
    return RankedExample(record["instruction"], list(responses), [0.0] * len(responses), input=record.get("input"))


def _with_scores(record, sums: List[float], tokens: List[int], alpha: float, teacher: str) -> Dict[str, Any]:
    scores = [s / max(t, 1) ** alpha for s, t in zip(sums, tokens)]
    out = dict(record)
    out.pop("ranking", None)
    out.update(scores=scores, ranking=sorted(range(len(scores)), key=lambda i: -scores[i]),
               teacher={"model": teacher, "sum": sums, "tokens": tokens,
                        "mean": [s / max(t, 1) for s, t in zip(sums, tokens)], "alpha": alpha})
    return out


@torch.no_grad()
def group_logprobs(model, tokenizer, examples: List[RankedExample], template: str = "alpaca", max_length: int = 512,
                   token_budget: int = 16384, impl: str = "auto") -> List[Tuple[List[float], List[int]]]:
    """Per group, each response's summed log-likelihood and its token count (EOS included), by the fused
    ``sequence_logprobs``; batches hold as many groups as fit ``token_budget`` tokens (prompt shared)."""
    device = next(model.parameters()).device
    model.eval()
    groups = [tokenize_group(example, tokenizer, template, max_length) for example in examples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: List[Tuple[List[float], List[int]]] = []
    with progress_bar(len(groups), "score", unit="group") as bar:
        start = 0
        while start < len(groups):
            end, tokens = start, 0
            while end < len(groups):
                size = len(groups[end].prompt_ids) + sum(map(len, groups[end].response_ids))
                if end > start and tokens + size > token_budget:
                    break
                tokens, end = tokens + size, end + 1
            batch = pack(groups[start:end], "shared", pad_id).to(device)
            sums, counts = fused_batch_forward(model, batch, scores_only=True, impl=impl)
            sums, counts = sums.double().cpu().tolist(), counts.cpu().tolist()
            seq = 0
            for group in groups[start:end]:
                k = len(group.response_ids)
                out.append((sums[seq:seq + k], counts[seq:seq + k]))
                seq += k
            bar.update(end - start)
            start = end
    return out


def score_with_model(model, tokenizer, records: List[Dict[str, Any]], template: str = "alpaca",
                     max_length: int = 512, token_budget: int = 16384, alpha: float = 1.0,
                     impl: str = "auto", teacher_name: str = "local") -> List[Dict[str, Any]]:
    """Scored records (see the module docstring)."""
    examples = [as_example(record) for record in records]
    sums_counts = group_logprobs(model, tokenizer, examples, template, max_length, token_budget, impl)
    return [_with_scores(record, sums, counts, alpha, teacher_name)
            for record, (sums, counts) in zip(records, sums_counts)]


def score_with_endpoint(client: JsonClient, model_name: str, records: List[Dict[str, Any]],
                        template: str = "alpaca", alpha: float = 1.0) -> List[Dict[str, Any]]:
    """Scores from an OpenAI-compatible completions endpoint that echoes prompt log-probs."""
    out = []
    for record in records:
        example = as_example(record)
        prompt = example.prompt_text(template)
        sums, tokens = [], []
        for response in example.responses:
            answer = client.post("/completions", {"model": model_name, "prompt": prompt + response, "max_tokens": 0,
                                                  "echo": True, "logprobs": 0, "temperature": 0})
            logprobs = answer["choices"][0]["logprobs"]
            picked = [lp for lp, offset in zip(logprobs["token_logprobs"], logprobs["text_offset"])
                      if offset >= len(prompt) and lp is not None]
            sums.append(float(sum(picked)))
            tokens.append(len(picked))
        out.append(_with_scores(record, sums, tokens, alpha, f"openai:{model_name}"))
    return out
