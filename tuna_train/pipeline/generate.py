"""``tuna generate``: K diverse sampled responses per instruction (the method's candidate generation).

Sampling uses top-p (1.0) and a temperature that starts at ``temperature``; if any two of the K
responses have ROUGE-L F >= ``rouge_threshold``, the instruction is sampled again with the temperature
raised by ``temperature_step``, up to ``max_tries``, and the most diverse set seen (lowest largest
pairwise ROUGE-L) is kept. Instructions are sampled in batches; every finished record is stored at once,
so a killed run resumes where it stopped.

Each record's draws come from its own random stream, seeded by its key (:func:`record_key`: its id, or a hash of
its text), the run's ``seed`` and the attempt, not by where it sits in a batch: a resumed run (whose batches
hold other records) writes the records an uninterrupted run writes. Sampling is done as Gumbel-max, the argmax
of the temperature- and top-p-processed logits plus Gumbel noise drawn from that stream (a draw of the same
distribution as multinomial sampling from their softmax), since ``generate`` samples a whole batch from one
generator.

Output records: ``{"id", "instruction", "input", "responses", "finish_reasons", "generation": {"temperature",
"tries", "max_rouge_l"}}`` plus the input's other fields; ``finish_reasons[j]`` is ``"stop"`` when response j
ended with EOS and ``"length"`` when ``max_new_tokens`` cut it.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from rouge_score import rouge_scorer
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ..collate import pad_id_of
from ..model import stop_token_ids
from ..options import SamplingOptions, TextOptions
from ..progress import progress_bar
from ..schema import passed_through
from .score import as_example
from .store import JsonlStore, record_key, write_jsonl


@functools.lru_cache(maxsize=1)
def _rouge_l():
    return rouge_scorer.RougeScorer(["rougeL"])


def max_pairwise_rouge_l(responses: List[str]) -> float:
    scorer = _rouge_l()
    return max((scorer.score(a, b)["rougeL"].fmeasure for a, b in itertools.combinations(responses, 2)), default=0.0)


#: why a response ended: EOS produced, or max_new_tokens reached
FINISH_STOP, FINISH_LENGTH = "stop", "length"


def record_seed(key: str, seed: int, attempt: int) -> int:
    """The seed of one record's draws on one attempt: a hash of its key, the run's seed and the attempt."""
    return int.from_bytes(hashlib.sha256(f"{seed}|{attempt}|{key}".encode()).digest()[:8], "little") >> 1


class SeededSampling(LogitsProcessor):
    """Sampling with one random stream per prompt, as Gumbel-max (``generate`` then runs greedy).

    The logits of prompt i's k rows (rows i*k .. i*k+k-1 of the [B*k, V] scores) are divided by the temperature,
    filtered by top-k and top-p (in ``generate``'s order) and perturbed by Gumbel noise from ``generators[i]``;
    their argmax is a draw from the softmax of the processed logits. Each step draws [k, V] from every stream, so
    what a prompt gets depends only on its stream, not on the other prompts of the batch.
    """

    def __init__(self, temperature: float, top_p: float, seeds: List[int], k: int, device, top_k: int = 0) -> None:
        self.warpers = [TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k > 0 else []) + \
            ([TopPLogitsWarper(top_p)] if top_p < 1.0 else [])
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.k = k

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float()
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        vocab = scores.shape[-1]
        uniform = torch.cat([torch.rand((self.k, vocab), generator=g, device=scores.device) for g in self.generators])
        gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(uniform.dtype).tiny)))
        return scores + gumbel


@torch.no_grad()
def decode_with_reasons(model, tokenizer, prompts: List[str], k: int, temperature: Optional[float], top_p: float,
                        max_new_tokens: int, seeds: Optional[List[int]] = None
                        ) -> List[List[Tuple[str, str]]]:
    """k (continuation, finish reason) of each prompt (left-padded batch): sampled, or greedy when temperature
    is None. ``seeds`` (one per prompt): sample prompt i from its own stream seeded ``seeds[i]`` (see
    :class:`SeededSampling`); none = from torch's global generator."""
    device = next(model.parameters()).device
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if tokenizer.bos_token_id is not None:
        encoded = [[tokenizer.bos_token_id] + ids if not ids or ids[0] != tokenizer.bos_token_id else ids
                   for ids in encoded]
    width = max(map(len, encoded))
    pad = pad_id_of(tokenizer)
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=device)  # left padding
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
    if temperature is None:
        sampling = dict(do_sample=False, num_return_sequences=k)
    elif seeds is not None:  # greedy over perturbed logits: generate takes no k for it, so the rows are repeated
        input_ids, attention = input_ids.repeat_interleave(k, 0), attention.repeat_interleave(k, 0)
        # the top-k that generate(do_sample=True) applies: the model's, else transformers' default (50)
        top_k = getattr(model.generation_config, "top_k", None)
        sampling = dict(do_sample=False, logits_processor=LogitsProcessorList(
            [SeededSampling(temperature, top_p, seeds, k, device, 50 if top_k is None else top_k)]))
    else:
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, num_return_sequences=k)
    stops = stop_token_ids(model, tokenizer)
    out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                         pad_token_id=pad, eos_token_id=stops or None, **sampling)
    new_tokens = out[:, width:]
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    # a row that produced a stop token stopped there (generate pads it afterwards); one without ran into the cap
    stopped = torch.isin(new_tokens, torch.tensor(stops, device=new_tokens.device)).any(1).tolist() if stops \
        else [False] * len(new_tokens)
    reasons = [FINISH_STOP if row_stopped else FINISH_LENGTH for row_stopped in stopped]
    pairs = list(zip(texts, reasons))
    return [pairs[i * k:(i + 1) * k] for i in range(len(prompts))]


def decode_batch(model, tokenizer, prompts: List[str], k: int, temperature: Optional[float], top_p: float,
                 max_new_tokens: int) -> List[List[str]]:
    """k continuations of each prompt (:func:`decode_with_reasons` without the reasons)."""
    return [[text for text, _ in row] for row in decode_with_reasons(model, tokenizer, prompts, k, temperature,
                                                                       top_p, max_new_tokens)]


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


def generate_records(model, tokenizer, records: List[Dict[str, Any]], out: Path, template: str = TextOptions.template,
                     num_candidates: int = SamplingOptions.num_candidates,
                     max_new_tokens: int = SamplingOptions.max_new_tokens,
                     temperature: float = SamplingOptions.temperature, top_p: float = SamplingOptions.top_p,
                     rouge_threshold: float = SamplingOptions.rouge_threshold,
                     temperature_step: float = SamplingOptions.temperature_step,
                     max_tries: int = SamplingOptions.max_tries, batch_size: int = SamplingOptions.batch_size,
                     seed: int = 0) -> Dict[str, int]:
    """``num_candidates`` responses sampled for each record (the arguments: :class:`.options.SamplingOptions`), a
    set resampled at a higher temperature while two of its responses overlap by ``rouge_threshold``; resumable
    through ``out.progress.jsonl``, ``out`` written at the end. Counts of records and of records sampled now."""
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
            heat = temperature + temperature_step * attempt
            samples = decode_with_reasons(model, tokenizer, [prompts[indices.index(i)] for i in waiting],
                                          num_candidates, heat,
                                          top_p, max_new_tokens, seeds=[record_seed(keys[i], seed, attempt)
                                                                        for i in waiting])
            still = []
            for i, pairs in zip(waiting, samples):
                responses = [text for text, _ in pairs]
                overlap = max_pairwise_rouge_l(responses)
                if best[i] is None or overlap < best[i]["max_rouge_l"]:
                    best[i] = {"responses": responses, "finish_reasons": [reason for _, reason in pairs],
                               "max_rouge_l": overlap, "temperature": heat}
                best[i]["tries"] = attempt + 1
                if overlap >= rouge_threshold:
                    still.append(i)
            waiting = still
        for i in indices:
            store.put(keys[i], best[i])
    results = []
    for key, record in zip(keys, records):
        entry = store.entries[key]
        generated = passed_through(record)
        generated["responses"] = entry["responses"]
        if "finish_reasons" in entry:  # a progress file of an earlier version has none
            generated["finish_reasons"] = entry["finish_reasons"]
        generated.update(generation={
            "temperature": entry["temperature"], "tries": entry["tries"], "max_rouge_l": entry["max_rouge_l"]})
        results.append(generated)
    write_jsonl(out, results)
    return {"records": len(records), "generated": generated_now}
