"""The verifiable task set as ``tuna pipeline`` uses it (``instructions: verifiable``), and one model's IFEval
figures on a split (what ``tuna eval verifiable`` and the pipeline's eval stages both run).

The pipeline builds the task set in its run directory, from its seed: ``verifiable/train.jsonl`` (the
instructions Tuna_c samples candidates for), ``verifiable/heldout.jsonl`` (held-out base instructions, the
constraint kinds trained on) and ``verifiable/heldout_unseen.jsonl`` (the same base instructions, kinds never
trained on). Each is cut to the size asked for after a seeded shuffle, so a small run still mixes every task
and topic.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Dict, List, Sequence

from ..evaluation.generation import greedy_generations
from ..pipeline.store import write_jsonl
from .evaluate import verifiable_metrics, verifiable_rows
from .tasks import HELDOUT_FRACTION, MAX_CONSTRAINTS, base_instructions, build_task_set, is_heldout

#: the held-out splits every verifiable evaluation reports, in order
HELDOUT_SPLITS = ("heldout", "heldout_unseen")

#: words per new token of a response (English text, SmolLM2's and Gemma's tokenizers: about 0.75)
WORDS_PER_TOKEN = 0.75


def write_pipeline_task_set(out: Path, seed: int, train_size: int, heldout_size: int, max_new_tokens: int,
                            max_constraints: int = MAX_CONSTRAINTS, train_kinds: Sequence[str] = ()
                            ) -> Dict[str, Path]:
    """The three splits in ``out/<split>.jsonl``: ``train_size`` training records, ``heldout_size`` of each
    held-out split (fewer when the task set has fewer). No record asks for more words than ``max_new_tokens``
    allow; ``train_kinds``: the trained (and in-kind held-out) constraint kinds, empty = all but the unseen
    ones. Returns the paths by split."""
    bases = base_instructions()
    heldout_bases = sum(is_heldout(base, HELDOUT_FRACTION) for base in bases)
    # records per base instruction, enough for the larger of the sizes asked for
    per_instruction = max(math.ceil(train_size / (len(bases) - heldout_bases)),
                          math.ceil(heldout_size / heldout_bases), 1)
    splits = build_task_set(seed=seed, heldout_fraction=HELDOUT_FRACTION, per_instruction=per_instruction,
                            max_constraints=max_constraints, max_words=int(WORDS_PER_TOKEN * max_new_tokens), train_kinds=train_kinds)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, records in splits.items():
        records = list(records)
        random.Random(f"{seed}|{name}").shuffle(records)
        paths[name] = out / f"{name}.jsonl"
        write_jsonl(paths[name], records[:train_size if name == "train" else heldout_size])
    return paths


def evaluate_model(model, tokenizer, records: List[Dict[str, Any]], out: Path, template: str, max_new_tokens: int,
                   batch_size: int, source: str) -> Dict[str, Any]:
    """Greedy answers to ``records`` (resumable through ``out/progress.jsonl``), each checked against its
    constraints (``out/generations.jsonl``), and IFEval's four figures with their intervals."""
    predictions = greedy_generations(model, tokenizer, records, out / "progress.jsonl", template, max_new_tokens,
                                     batch_size)
    rows = verifiable_rows(records, predictions, source)
    write_jsonl(out / "generations.jsonl", rows)
    return verifiable_metrics(rows)
