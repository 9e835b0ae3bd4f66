"""The built-in tasks: the answer depends on the instruction, held-out instructions never occur in training,
and the controls (shuffled prompt, prompt-free scorer) are computed as defined."""

import math
from collections import Counter

import pytest

from tuna_train import synthetic
from tuna_train.controls import BigramScorer, prompt_free_accuracy, shuffled_prompts
from tuna_train.data import examples_from_records


def test_heldout_instructions_never_occur_in_training():
    train = {r["instruction"] for seed in (1, 2, 3) for r in synthetic.make_records(3000, seed=seed)}
    held_out = {r["instruction"] for seed in (1, 2, 3) for r in synthetic.make_records(600, seed=seed, split="heldout")}
    assert len(held_out) > 50 and len(train) > 200
    assert not train & held_out


def test_the_same_candidates_are_right_for_one_instruction_and_wrong_for_another():
    record = synthetic.make_records(1, seed=5)[0]
    task, letter, length = synthetic.parse_instruction(record["instruction"])
    best = max(zip(record["scores"], record["responses"]))[1]
    assert best == record["references"][0]
    right_elsewhere = 0
    for other in synthetic.TASKS:  # the same responses judged for the other instructions on this letter
        text = synthetic.instruction(other, letter, length)
        grades = [synthetic.grade(text, response) for response in record["responses"]]
        winner = record["responses"][grades.index(max(grades))]
        assert (winner == best) == (other == task)
        right_elsewhere += winner in record["responses"] and other != task
    assert right_elsewhere >= 2


def test_answers_follow_their_definition():
    assert synthetic.answer("forward", "x", 4) == "yzab"
    assert synthetic.answer("backward", "c", 3) == "baz"
    assert synthetic.answer("repeat", "q", 3) == "qqq"
    assert synthetic.answer("skip", "w", 3) == "yac"
    for task in synthetic.TASKS:
        assert synthetic.parse_instruction(synthetic.instruction(task, "k", 7)) == (task, "k", 7)


def test_bigram_scorer_against_counts():
    scorer = BigramScorer(["ab", "abb"])
    # pairs: ^a x2, ab x2, b$ x2... "abb": ^a ab bb b$; alphabet {^/$, a, b} + unseen slot = 4
    firsts = Counter({"\x00": 2, "a": 2, "b": 3})
    pairs = Counter({("\x00", "a"): 2, ("a", "b"): 2, ("b", "\x00"): 2, ("b", "b"): 1})
    expected = [math.log((pairs[p] + 1) / (firsts[p[0]] + 4)) for p in [("\x00", "a"), ("a", "b"), ("b", "\x00")]]
    assert scorer.score("ab") == pytest.approx(sum(expected) / 3, rel=1e-12)


def test_shuffled_prompts_and_prompt_free_accuracy():
    examples = examples_from_records(synthetic.make_records(5, seed=2, split="heldout"))
    shuffled = shuffled_prompts(examples)
    for i, example in enumerate(shuffled):
        assert example.instruction == examples[(i + 1) % 5].instruction
        assert example.responses == examples[i].responses and example.scores == examples[i].scores
    train = examples_from_records(synthetic.make_records(50, seed=1))
    scorer = BigramScorer([e.responses[0] for e in train])
    correct = pairs = 0
    for example in examples:
        for i in range(len(example.responses)):
            for j in range(len(example.responses)):
                if example.scores[i] > example.scores[j]:
                    pairs += 1
                    correct += scorer.score(example.responses[i]) > scorer.score(example.responses[j])
    assert prompt_free_accuracy(train, examples)["pair_accuracy"] == pytest.approx(correct / pairs)
