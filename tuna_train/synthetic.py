"""Built-in tasks of the embedded default: letter tasks where the right answer depends on the instruction.

Every instruction names a task, a length and a letter ("Go backwards through the alphabet for 4 letters
from the letter k."): continue the alphabet after the letter, go backwards from it, repeat it, or skip
every other letter after it (z wraps to a). The tasks share their inputs, so the answer of one task on a
letter is a wrong answer of the others on that letter: a ranked record's candidates are the answers of all
four tasks on its letter and length (the same strings for the four instructions), each scored by minus its edit
distance to the answer. Ranking them right needs the instruction; every answer is a regular run of
letters, so a scorer that never sees the prompt has little to go on (see :mod:`tuna_train.controls`).

Held-out instructions are disjoint from training ones: an instruction (task, letter, length) belongs to
the held-out or the training split by a fixed hash of its text (:func:`split_of`), whatever the seed, so
no held-out instruction ever occurs in training.

:func:`grade` is the rule-based judge: it reads the task, letter and length back from the instruction.
The records are in the native format, so they go through the same loader as user data. Everything is
deterministic given the seed.
"""

from __future__ import annotations

import random
import re
import zlib
from typing import Callable, Dict, List, Optional, Tuple

LETTERS = "abcdefghijklmnopqrstuvwxyz"
SPLITS = ("train", "heldout")
HELDOUT_SHARE = 5  # about one instruction in HELDOUT_SHARE is held out


def _run(step: int) -> Callable[[str, int], str]:
    """The ``length`` letters after ``start``, ``step`` apart in the alphabet (z wraps to a)."""
    return lambda start, length: "".join(LETTERS[(LETTERS.index(start) + step * i) % 26] for i in range(1, length + 1))


# task -> (instruction with {n} and {letter}, the answer); every instruction ends with its letter
TASKS: Dict[str, Tuple[str, Callable[[str, int], str]]] = {
    "forward": ("Continue the alphabet for {n} letters after the letter {letter}.", _run(1)),
    "backward": ("Go backwards through the alphabet for {n} letters from the letter {letter}.", _run(-1)),
    "repeat": ("Write {n} times the letter {letter}.", _run(0)),
    "skip": ("Skip every other letter of the alphabet for {n} letters after the letter {letter}.", _run(2)),
}
_PARSERS = {task: re.compile("^" + re.escape(template).replace(re.escape("{n}"), "([0-9]+)")
                             .replace(re.escape("{letter}"), "([a-z])") + "$")
            for task, (template, _) in TASKS.items()}


def instruction(task: str, letter: str, length: int) -> str:
    return TASKS[task][0].format(n=length, letter=letter)


def answer(task: str, letter: str, length: int) -> str:
    """The one correct response of a task."""
    return TASKS[task][1](letter, length)


def parse_instruction(text: str) -> Optional[Tuple[str, str, int]]:
    """(task, letter, length) of a built-in instruction, or None when ``text`` is not one."""
    for task, pattern in _PARSERS.items():
        match = pattern.match(text.strip())
        if match:
            return task, match.group(2), int(match.group(1))
    return None


def split_of(instruction_text: str) -> str:
    """"heldout" or "train": a fixed function of the instruction string (the same under every seed), so a
    held-out instruction never occurs in training."""
    return "heldout" if zlib.crc32(instruction_text.encode()) % HELDOUT_SHARE == 0 else "train"


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions)."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def correct_answer(instruction_text: str) -> str:
    """The answer of a built-in instruction, read back from its text (ValueError for any other text)."""
    parsed = parse_instruction(instruction_text)
    if parsed is None:
        raise ValueError(f"not an instruction of the built-in tasks: {instruction_text!r}")
    return answer(*parsed)


def grade(instruction_text: str, response: str) -> float:
    """The rule-based judge: minus the edit distance between the response and the instruction's answer."""
    return -float(edit_distance(response.strip(), correct_answer(instruction_text)))


def make_task_records(num_examples: int, seed: int = 0, split: str = "train", min_len: int = 3,
                      max_len: int = 8) -> List[dict]:
    """Instructions of ``split`` with their reference answer: ``{"instruction", "task", "references"}``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    pool = [(task, letter, length) for task in sorted(TASKS) for letter in LETTERS
            for length in range(min_len, max_len + 1) if split_of(instruction(task, letter, length)) == split]
    rng = random.Random(seed)
    records = []
    for _ in range(num_examples):
        task, letter, length = rng.choice(pool)
        records.append({"instruction": instruction(task, letter, length), "task": task,
                        "references": [answer(task, letter, length)]})
    return records


def make_records(num_examples: int, seed: int = 0, num_candidates: int = 4, split: str = "train") -> List[dict]:
    """Native ranked records ``{"instruction", "task", "responses", "scores", "references"}``.

    Candidates: the answer, then the answers of the other tasks on the same letter and length (as many as
    fit ``num_candidates``; with 4, every instruction on a letter and length has the same four candidates);
    score = minus the edit distance to the answer.
    They are stored shuffled, so the order comes from the scores, as with real data.
    """
    rng = random.Random(seed + 7919)
    records = []
    for record in make_task_records(num_examples, seed, split):
        correct = record["references"][0]
        task, letter, length = parse_instruction(record["instruction"])
        others = [answer(t, letter, length) for t in rng.sample([t for t in sorted(TASKS) if t != task], len(TASKS) - 1)]
        texts = ([correct] + others)[:num_candidates]
        candidates = [(text, -float(edit_distance(text, correct))) for text in texts]
        rng.shuffle(candidates)
        records.append(dict(record, responses=[t for t, _ in candidates], scores=[s for _, s in candidates]))
    return records
