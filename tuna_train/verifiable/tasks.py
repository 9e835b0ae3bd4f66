"""A task set with verifiable constraints, built in-process: base instructions written here (a task on a topic),
each with 1-3 IFEval constraints (their checkers' own description text and arguments, :mod:`.checks`).

Three splits, every one deterministic from the seed:

- ``train``: base instructions outside the held-out hash bucket, constraints of the *seen* kinds only;
- ``heldout``: the held-out base instructions (a hash of the instruction text puts one there, so the split
  does not move with the seed and no instruction is in two splits), constraints of the seen kinds;
- ``heldout_unseen``: the same held-out base instructions, constraints of the *unseen* kinds only (kinds that
  never occur in training: does a gain carry over to constraints not trained on?).

A record is a native record for ``tuna generate`` / ``tuna rank``: ``id``, ``instruction`` (the base instruction
followed by the constraints' descriptions), ``base_instruction`` and ``constraints`` (``[{"id", "kwargs"}]``).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

from ..pipeline.store import write_jsonl
from . import checks

# "{}" is the topic; every task reads as one instruction with any topic
TASKS = (
    "Write a short story about {}.",
    "Describe {}.",
    "List the main facts about {}.",
    "Explain {} to a ten-year-old.",
    "Write a poem about {}.",
    "Give practical advice about {}.",
    "Write a short blog post about {}.",
    "Summarize what people should know about {}.",
    "Write a letter to a friend about {}.",
    "Compare the past and the present of {}.",
    "Write a product description inspired by {}.",
    "Give three reasons why {} matters.",
    "Write a news report about {}.",
    "Explain the history of {}.",
)
TOPICS = (
    "the ocean", "honey bees", "the moon", "public libraries", "bicycles", "rain forests", "coffee",
    "the internet", "volcanoes", "chess", "city parks", "recycling", "the human heart", "trains",
    "winter", "music lessons", "bread baking", "solar power", "friendship", "museums", "deserts",
    "electric cars", "gardening", "the printing press", "sleep",
)

#: the kinds held out of training by default (the heldout_unseen split): easy and hard ones, of different families
UNSEEN_KINDS = (
    "change_case:english_lowercase",
    "detectable_content:number_placeholders",
    "detectable_format:title",
    "punctuation:no_comma",
    "startend:end_checker",
)
#: the share of base instructions held out (by a hash of their text)
HELDOUT_FRACTION = 0.2
#: constraints per instruction, 1 to this many (the default of the pipeline's max_constraints)
MAX_CONSTRAINTS = 3
# the checker that repeats the request: its argument is the text before it, so it goes last
_REPEAT = "combination:repeat_prompt"


def base_instructions() -> List[str]:
    """Every task on every topic: len(TASKS) x len(TOPICS) distinct instructions."""
    return [task.format(topic) for task in TASKS for topic in TOPICS]


def is_heldout(base: str, heldout_fraction: float) -> bool:
    """Whether a base instruction is held out: a hash of its text, below ``heldout_fraction`` of the range."""
    digest = int.from_bytes(hashlib.sha256(base.encode()).digest()[:8], "big")
    return digest < heldout_fraction * 2 ** 64


@contextlib.contextmanager
def _global_random(seed: int) -> Iterator[None]:
    """The IFEval checkers draw their arguments from the global ``random``: seeded here, restored after."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def possible(kind: str, kwargs: Dict[str, Any], max_words: Optional[int] = None) -> bool:
    """Whether a response can follow the constraint: IFEval may ask for paragraph n + 1 of n; and "at least N
    words" cannot be followed in a response cut at ``max_words`` words (None: no cut)."""
    if kind == "length_constraints:nth_paragraph_first_word":
        return kwargs["nth_paragraph"] <= kwargs["num_paragraphs"]
    if kind == "length_constraints:number_words" and max_words is not None:
        return kwargs["relation"] != "at least" or kwargs["num_words"] <= max_words
    return True


def _draw_kwargs(kind: str, rng: random.Random, prompt: str, max_words: Optional[int] = None) -> Dict[str, Any]:
    """A checker's own random arguments (as IFEval draws them), from ``rng``, drawn again until :func:`possible`."""
    if kind == _REPEAT:
        return {"prompt_to_repeat": prompt}
    for _ in range(1000):
        instance = checks.ifeval()[0].INSTRUCTION_DICT[kind](kind)
        with _global_random(rng.getrandbits(64)):
            instance.build_description()
        kwargs = {k: v for k, v in (instance.get_instruction_args() or {}).items() if v is not None}
        if possible(kind, kwargs, max_words):
            return kwargs
    # "less than N" words is drawn half the time: not reached
    raise RuntimeError(f"{kind}: no satisfiable arguments drawn in 1000 tries")


def draw_constraints(base: str, kinds: Sequence[str], rng: random.Random, max_constraints: int,
                     max_words: Optional[int] = None) -> List[Dict[str, Any]]:
    """1..max_constraints specs of distinct ``kinds`` no two of which conflict (IFEval's conflict table)."""
    wanted = rng.randint(1, max_constraints)
    pool = sorted(kinds)
    rng.shuffle(pool)
    table, chosen = checks.conflicts(), []
    for kind in pool:
        if len(chosen) == wanted:
            break
        if all(kind not in table.get(other, ()) and other not in table.get(kind, ()) for other in chosen):
            chosen.append(kind)
    chosen.sort(key=lambda kind: kind == _REPEAT)  # the repeat checker last: it repeats what comes before
    specs: List[Dict[str, Any]] = []
    for kind in chosen:
        before = " ".join([base] + [checks.describe(spec) for spec in specs])
        specs.append({"id": kind, "kwargs": _draw_kwargs(kind, rng, before, max_words)})
    return specs


def task_record(base: str, constraints: List[Dict[str, Any]], split: str, index: int) -> Dict[str, Any]:
    """A native record: the base instruction, then each constraint's own description."""
    key = hashlib.sha256(base.encode()).hexdigest()[:12]
    instruction = " ".join([base] + [checks.describe(spec) for spec in constraints])
    return {"id": f"verifiable-{split}-{key}-{index}", "instruction": instruction, "base_instruction": base,
            "constraints": constraints}


def build_task_set(seed: int = 0, heldout_fraction: float = HELDOUT_FRACTION, unseen_kinds: Sequence[str] = UNSEEN_KINDS,
                   per_instruction: int = 1, max_constraints: int = MAX_CONSTRAINTS, max_words: Optional[int] = None,
                   train_kinds: Sequence[str] = ()) -> Dict[str, List[Dict[str, Any]]]:
    """The three splits (see the module docstring): ``per_instruction`` records per base instruction and split.
    ``max_words``: the responses' length budget in words (about 0.75 x new tokens), so that no record asks for
    more (None: IFEval's own 100-500). ``train_kinds``: the kinds of the train and heldout splits (empty: every
    usable kind but ``unseen_kinds``), e.g. only those the start model follows sometimes, so that its K samples
    differ in the judge's eyes."""
    usable = checks.usable_kinds()
    for field, kinds in (("unseen_kinds", unseen_kinds), ("train_kinds", train_kinds)):
        unknown = [kind for kind in kinds if kind not in usable]
        if unknown:
            raise ValueError(f"{field}: {unknown} are not usable IFEval kinds (usable: {', '.join(usable)})")
    both = sorted(set(train_kinds) & set(unseen_kinds))
    if both:
        raise ValueError(f"train_kinds: {both} are unseen kinds too (never trained on by definition)")
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    seen = list(train_kinds) or [kind for kind in usable if kind not in unseen_kinds]
    splits: Dict[str, List[Dict[str, Any]]] = {"train": [], "heldout": [], "heldout_unseen": []}
    for base in base_instructions():
        names = ["heldout", "heldout_unseen"] if is_heldout(base, heldout_fraction) else ["train"]
        for name in names:
            kinds = list(unseen_kinds) if name == "heldout_unseen" else seen
            for index in range(per_instruction):
                # a generator of its own per record: a record does not change when another one is added
                rng = random.Random(f"{seed}|{name}|{base}|{index}")
                constraints = draw_constraints(base, kinds, rng, max_constraints, max_words)
                splits[name].append(task_record(base, constraints, name, index))
    return splits


def write_task_set(out: Path, **options) -> Dict[str, Path]:
    """:func:`build_task_set` written as ``out/<split>.jsonl``; the paths by split."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, records in build_task_set(**options).items():
        paths[name] = out / f"{name}.jsonl"
        write_jsonl(paths[name], records)
    return paths
