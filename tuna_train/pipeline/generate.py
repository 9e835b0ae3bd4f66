"""``tuna generate``: K diverse sampled responses per instruction (the method's candidate generation).

Sampling uses top-p (1.0) and a temperature that starts at ``temperature``; if any two of the K
responses have ROUGE-L F >= ``rouge_threshold``, the instruction is sampled again with the temperature
raised by ``temperature_step``, up to ``max_tries``, and the most diverse set seen (lowest largest
pairwise ROUGE-L) is kept. Instructions are sampled in batches; every finished record is stored at once,
so a killed run resumes where it stopped. Output records: ``{"id", "instruction", "input", "responses",
"generation": {"temperature", "tries", "max_rouge_l"}}`` plus the input's other fields.
"""

from __future__ import annotations

import functools
import itertools
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from rouge_score import rouge_scorer

from ..progress import progress_bar
from .score import as_example
from .store import JsonlStore, record_key, write_jsonl


@functools.lru_cache(maxsize=1)
def _rouge_l():
    return rouge_scorer.RougeScorer(["rougeL"])


def max_pairwise_rouge_l(responses: List[str]) -> float:
    scorer = _rouge_l()
    return max((scorer.score(a, b)["rougeL"].fmeasure for a, b in itertools.combinations(responses, 2)), default=0.0)


@torch.no_grad()
def decode_batch(model, tokenizer, prompts: List[str], k: int, temperature: Optional[float], top_p: float,
                 max_new_tokens: int) -> List[List[str]]:
    """k continuations of each prompt (left-padded batch): sampled, or greedy when temperature is None."""
    device = next(model.parameters()).device
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if tokenizer.bos_token_id is not None:
        encoded = [[tokenizer.bos_token_id] + ids if not ids or ids[0] != tokenizer.bos_token_id else ids
                   for ids in encoded]
    width = max(map(len, encoded))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=device)  # left padding
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature is not None else \
        dict(do_sample=False)
    out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                         num_return_sequences=k, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, **sampling)
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [texts[i * k:(i + 1) * k] for i in range(len(prompts))]


def pending_batches(records: List[Dict[str, Any]], keys: List[str], store: JsonlStore, tokenizer, template: str,
                    batch_size: int, desc: str = "generate") -> Iterator[Tuple[List[int], List[str]]]:
    """(record indices, templated prompts) of the records not yet in ``store``, ``batch_size`` at a time (with a
    progress bar named ``desc``)."""
    todo = [i for i, key in enumerate(keys) if key not in store]
    with progress_bar(len(todo), desc) as bar:
        for start in range(0, len(todo), batch_size):
            indices = todo[start:start + batch_size]
            yield indices, [as_example(dict(records[i], responses=[""])).prompt_text(template, tokenizer)
                            for i in indices]
            bar.update(len(indices))


def generate_records(model, tokenizer, records: List[Dict[str, Any]], out: Path, k: int = 4,
                     template: str = "alpaca", max_new_tokens: int = 512, temperature: float = 1.0,
                     top_p: float = 1.0, rouge_threshold: float = 0.8, temperature_step: float = 0.1,
                     max_tries: int = 3, batch_size: int = 8, seed: int = 0) -> Dict[str, int]:
    out = Path(out)
    store = JsonlStore(out.with_name(out.name + ".progress.jsonl"))
    keys = [record_key(r) for r in records]
    model.eval()
    generated_now = 0
    for indices, prompts in pending_batches(records, keys, store, tokenizer, template, batch_size):
        generated_now += len(indices)
        best = {i: None for i in indices}
        waiting = list(indices)
        for attempt in range(max_tries):
            if not waiting:
                break
            torch.manual_seed(seed + 1009 * indices[0] + attempt)
            heat = temperature + temperature_step * attempt
            samples = decode_batch(model, tokenizer, [prompts[indices.index(i)] for i in waiting], k, heat, top_p,
                                   max_new_tokens)
            still = []
            for i, responses in zip(waiting, samples):
                overlap = max_pairwise_rouge_l(responses)
                if best[i] is None or overlap < best[i]["max_rouge_l"]:
                    best[i] = {"responses": responses, "max_rouge_l": overlap, "temperature": heat}
                best[i]["tries"] = attempt + 1
                if overlap >= rouge_threshold:
                    still.append(i)
            waiting = still
        for i in indices:
            store.put(keys[i], best[i])
    results = []
    for key, record in zip(keys, records):
        entry = store.entries[key]
        generated = {name: record[name] for name in ("id", "instruction", "input", "prompt", "task", "length")
                     if name in record}
        generated.update(responses=entry["responses"], generation={
            "temperature": entry["temperature"], "tries": entry["tries"], "max_rouge_l": entry["max_rouge_l"]})
        results.append(generated)
    write_jsonl(out, results)
    return {"records": len(records), "generated": generated_now}
