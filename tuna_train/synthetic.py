"""Built-in ranked tasks of the embedded default: small string tasks with one correct answer.

Every instruction (continue the alphabet, go backwards, repeat a letter, count digits; so many
characters) has one correct response and graded wrong ones: the k-th wrong response has k characters
changed, so "better" is objective (fewer edits from the answer) and a rule can judge any response
(:func:`grade`). The tasks are chosen so that a tiny model learns them in minutes on a CPU: the first
character follows from the input, and each next one from the one before. The records are in the native format, so they go through the same loader as user data.
Everything is deterministic given the seed.
"""

from __future__ import annotations

import random
from typing import Callable, Dict, List, Tuple

LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"


def _step(alphabet: str, offset: int) -> Callable[[str, int], str]:
    """The ``length`` characters that follow ``start`` in ``alphabet``, ``offset`` apart."""
    return lambda start, length: "".join(alphabet[alphabet.index(start) + offset * i] for i in range(1, length + 1))


# task -> (instruction with {n}, the inputs it may draw (enough room for 6 items), the answer)
TASKS: Dict[str, Tuple[str, str, Callable[[str, int], str]]] = {
    "alphabet": ("Continue the alphabet after the letter, {n} letters.", LETTERS[:-6], _step(LETTERS, 1)),
    "backwards": ("Go backwards through the alphabet from the letter, {n} letters.", LETTERS[6:], _step(LETTERS, -1)),
    "repeat": ("Repeat the letter {n} times.", LETTERS, _step(LETTERS, 0)),
    "digits": ("Count up from the digit, {n} digits.", DIGITS[:4], _step(DIGITS, 1)),
}


def answer(task: str, task_input: str, length: int) -> str:
    """The one correct response of a task."""
    return TASKS[task][2](task_input, length)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions)."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def grade(task: str, task_input: str, length: int, response: str) -> float:
    """The rule-based judge: minus the number of edits between the response and the correct answer."""
    return -float(edit_distance(response.strip(), answer(task, task_input, length)))


def _corrupt(text: str, num_wrong: int, rng: random.Random) -> str:
    """Replace ``num_wrong`` distinct characters by other characters of the same kind (letter or digit)."""
    chars = list(text)
    for i in rng.sample(range(len(chars)), min(num_wrong, len(chars))):
        alphabet = DIGITS if chars[i].isdigit() else LETTERS
        chars[i] = rng.choice([c for c in alphabet if c != chars[i]])
    return "".join(chars)


def make_records(num_examples: int, seed: int = 0, num_candidates: int = 4,
                 min_len: int = 4, max_len: int = 6) -> List[dict]:
    """Native ranked records ``{"instruction", "input", "responses", "scores", "task", "length"}``.

    The answer has ``length`` characters; the instruction says how many. Candidate k (k = 0..K-1) has k
    characters wrong (score -k); candidates are stored shuffled, so the order comes from the scores, as
    with real data.
    """
    rng = random.Random(seed)
    tasks = sorted(TASKS)
    records = []
    for _ in range(num_examples):
        task = rng.choice(tasks)
        length = rng.randint(min_len, max_len)
        task_input = rng.choice(TASKS[task][1])
        correct = answer(task, task_input, length)
        candidates = [(_corrupt(correct, k, rng), float(-k)) for k in range(num_candidates)]
        rng.shuffle(candidates)
        records.append({
            "instruction": TASKS[task][0].format(n=length), "input": task_input,
            "responses": [text for text, _ in candidates], "scores": [score for _, score in candidates],
            "task": task, "length": length,
        })
    return records
