"""Greedy answers for ``tuna eval generation`` / ``verifiable`` / ``judge``: batched through the sampling
stage's decoder, resumable through a progress store, saved with their ROUGE-L."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import torch

from ..pipeline.generate import decode_batch, pending_batches
from ..pipeline.store import JsonlStore, record_key, write_jsonl
from ..schema import references
from .text import rouge_l


@torch.no_grad()
def greedy_generations(model, tokenizer, records: List[Dict[str, Any]], progress: Path, template: str,
                       max_new_tokens: int, batch_size: int) -> List[str]:
    """Greedy responses, resumable through the ``progress`` store (one entry per finished record)."""
    store = JsonlStore(progress)
    keys = [record_key(r) for r in records]
    model.eval()
    for indices, prompts in pending_batches(records, keys, store, tokenizer, template, batch_size, desc="eval"):
        texts = decode_batch(model, tokenizer, prompts, 1, None, 1.0, max_new_tokens)
        for i, generated in zip(indices, texts):
            store.put(keys[i], {"prediction": generated[0]})
    return [store.entries[key]["prediction"] for key in keys]


def save_generations(out: Path, records: List[Dict[str, Any]], predictions: List[str]) -> None:
    write_jsonl(out / "generations.jsonl", [dict(r, prediction=p, rouge_l=rouge_l(p, references(r)))
                                            for r, p in zip(records, predictions)])
