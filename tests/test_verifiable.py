"""Verifiable instruction following (issue 24, points 1-3): the IFEval checkers on hand-made responses with known
outcomes (every kind the task set uses), the task set's splits, ``tuna rank --judge verifiable`` against the
checkers' own counts (ties kept), and ``tuna eval verifiable``'s four figures against a hand computation."""

import json
import logging
import random
import sys
from pathlib import Path

import pytest

pytest.importorskip("if_verifiable")

from tuna_train.evaluation.reports import PLOTTED
from tuna_train.cli import main
from tuna_train.data import load_ranked
from tuna_train.model import build_tiny_llama, synthetic_tokenizer
from tuna_train.pipeline.generate import generate_records
from tuna_train.pipeline.judge import make_judge
from tuna_train.pipeline.pairwise import bootstrap_ci
from tuna_train.pipeline.rank import rank_records
from tuna_train.verifiable import checks, tasks
from tuna_train.verifiable.evaluate import FIGURES, check_records, verifiable_metrics, verifiable_rows
from tuna_train.verifiable.judge import VerifiableJudge

# per kind: its arguments, a response that follows it, one that does not
CASES = {
    "keywords:existence": ({"keywords": ["ocean", "wave"]}, "The ocean sent a wave.", "The sea was calm."),
    "keywords:frequency": ({"keyword": "bee", "frequency": 2, "relation": "at least"},
                           "A bee met another bee.", "A bee flew."),
    "keywords:forbidden_words": ({"forbidden_words": ["rain"]}, "A sunny day.", "It will rain today."),
    "keywords:letter_frequency": ({"letter": "z", "let_frequency": 2, "let_relation": "at least"},
                                  "A zebra at the zoo.", "An apple."),
    "language:response_language": ({"language": "de"},
                                    "Heute ist ein sehr schöner Tag und wir gehen zusammen in den großen Park.",
                                    "Today is a very nice day and we are all going to the big park together."),
    "length_constraints:number_paragraphs": ({"num_paragraphs": 2}, "First part.\n***\nSecond part.",
                                             "Only one part."),
    "length_constraints:number_words": ({"num_words": 5, "relation": "less than"}, "Two words.",
                                        "one two three four five six seven"),
    "length_constraints:nth_paragraph_first_word": ({"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "bees"},
                                                    "Some intro.\n\nBees make honey.",
                                                    "Some intro.\n\nHoney is sweet."),
    "detectable_content:number_placeholders": ({"num_placeholders": 2}, "Meet [name] at [address].",
                                               "Meet [name] there."),
    "detectable_content:postscript": ({"postscript_marker": "P.S."}, "Hello there.\nP.S. See you.", "Hello there."),
    "detectable_format:number_bullet_lists": ({"num_bullets": 2}, "* one\n* two", "* one"),
    "detectable_format:constrained_response": ({}, "My answer is yes.", "Sure thing."),
    "detectable_format:number_highlighted_sections": ({"num_highlights": 2}, "*one* and *two*", "*one* and two"),
    "detectable_format:multiple_sections": ({"section_spliter": "Section", "num_sections": 2},
                                            "Section 1\nfirst\nSection 2\nsecond", "Section 1\nfirst"),
    "detectable_format:json_format": ({}, '{"answer": 1}', "answer: 1"),
    "detectable_format:title": ({}, "<<Bees>>\nThey fly.", "Bees\nThey fly."),
    "combination:two_responses": ({}, "First answer.\n******\nSecond answer.", "Only one answer."),
    "combination:repeat_prompt": ({"prompt_to_repeat": "Describe bees."}, "Describe bees. They fly.", "They fly."),
    "startend:end_checker": ({"end_phrase": "Any other questions?"}, "Bees fly. Any other questions?",
                             "Any other questions? Bees fly."),
    "change_case:english_capital": ({}, "BEES ARE SMALL INSECTS THAT MAKE HONEY.", "Bees are small insects."),
    "change_case:english_lowercase": ({}, "bees are small insects that make honey.", "Bees are small insects."),
    "punctuation:no_comma": ({}, "Bees fly and sing.", "Bees fly, and sing."),
    "startend:quotation": ({}, '"Bees fly."', "Bees fly."),
}


def spec(kind):
    return {"id": kind, "kwargs": CASES[kind][0]}


def test_every_usable_kind_has_a_case_and_skipped_kinds_are_refused():
    assert set(CASES) == set(checks.usable_kinds())
    assert not set(CASES) & set(checks.SKIPPED_KINDS)
    for kind, reason in checks.SKIPPED_KINDS.items():
        with pytest.raises(checks.ConstraintSpecError, match=reason.split(",")[0][:20]):
            checks.checker({"id": kind, "kwargs": {}})


@pytest.mark.parametrize("kind", sorted(CASES))
def test_checker_follows_hand_made_responses(kind):
    _, passing, failing = CASES[kind]
    assert checks.check(passing, [spec(kind)]) == [{"id": kind, "strict": True, "loose": True}]
    assert checks.check(failing, [spec(kind)])[0]["strict"] is False
    assert checks.describe(spec(kind)).strip()  # the checker writes its own description from the arguments


def test_loose_forgives_a_chatty_first_line_and_asterisks_strict_does_not():
    chatty = "Sure, here it is:\nBees fly and sing."
    assert checks.check(chatty, [spec("punctuation:no_comma")]) == [
        {"id": "punctuation:no_comma", "strict": False, "loose": True}]
    bold = '**"Bees fly."**'
    assert checks.check(bold, [spec("startend:quotation")])[0] == {"id": "startend:quotation", "strict": False,
                                                                   "loose": True}
    assert checks.check("", [spec("keywords:forbidden_words")])[0]["loose"] is False  # empty follows nothing


def test_undetectable_language_follows_as_in_ifeval_without_an_error_per_variant(caplog):
    language = {"id": "language:response_language", "kwargs": {"language": "de"}}
    with caplog.at_level("INFO"):
        assert checks.check("12345 !!!", [language])[0] == {"id": language["id"], "strict": True, "loose": True}
        logging.getLogger("if_verifiable").error("other errors of the package are kept")
    assert [r.getMessage() for r in caplog.records] == ["other errors of the package are kept"]


def test_missing_package_names_the_pip_line(monkeypatch, tmp_path, capsys):
    checks.ifeval.cache_clear()
    monkeypatch.setitem(sys.modules, "if_verifiable", None)
    try:
        with pytest.raises(ImportError, match="pip install .*if-verifiable==0.1.2"):
            checks.ifeval()
        data = tmp_path / "generated.jsonl"
        data.write_text(json.dumps(judged_record()) + "\n")
        assert main(["rank", "--judge", "verifiable", "--data", str(data), "--out", str(tmp_path / "r.jsonl")]) == 2
        assert "if-verifiable==0.1.2" in capsys.readouterr().err
    finally:
        monkeypatch.undo()
        checks.ifeval.cache_clear()


def test_bad_constraints_are_named_by_file_line_and_field():
    records = [{"id": "ok", "constraints": [spec("punctuation:no_comma")]},
               {"id": "bad", "constraints": [spec("punctuation:no_comma"), {"id": "nope:kind", "kwargs": {}}]}]
    with pytest.raises(checks.ConstraintSpecError, match=r"tasks.jsonl line 2 \(id 'bad'\).*'constraints' item 1"):
        check_records(records, "tasks.jsonl")
    with pytest.raises(checks.ConstraintSpecError, match="line 1.*'constraints' must be a non-empty list"):
        check_records([{"id": "x"}], "tasks.jsonl")
    with pytest.raises(checks.ConstraintSpecError, match="arguments .* refused"):
        checks.checker({"id": "keywords:frequency", "kwargs": {"word": "x"}})


# ---- the task set


@pytest.fixture(scope="module")
def task_set():
    return tasks.build_task_set(seed=3)


def test_splits_are_disjoint_and_unseen_kinds_never_train(task_set):
    bases = {name: {r["base_instruction"] for r in records} for name, records in task_set.items()}
    assert len(tasks.base_instructions()) == len(set(tasks.base_instructions())) >= 300
    assert bases["train"] and bases["heldout"] and not bases["train"] & bases["heldout"]
    assert bases["heldout"] == bases["heldout_unseen"]
    assert bases["train"] | bases["heldout"] == set(tasks.base_instructions())
    for base in bases["heldout"]:  # the hash decides, whatever the seed
        assert tasks.is_heldout(base, 0.2) and base in {r["base_instruction"] for r in
                                                        tasks.build_task_set(seed=4)["heldout"]}
    kinds = {name: {c["id"] for r in records for c in r["constraints"]} for name, records in task_set.items()}
    assert kinds["heldout_unseen"] == set(tasks.UNSEEN_KINDS)
    assert not (kinds["train"] | kinds["heldout"]) & set(tasks.UNSEEN_KINDS)
    assert kinds["train"] == set(checks.usable_kinds()) - set(tasks.UNSEEN_KINDS)
    ids = [r["id"] for records in task_set.values() for r in records]
    assert len(ids) == len(set(ids))


def test_records_are_deterministic_valid_and_describe_their_constraints(task_set):
    assert tasks.build_task_set(seed=3) == task_set
    state = random.getstate()
    assert tasks.build_task_set(seed=5)["train"] != task_set["train"]
    assert random.getstate() == state  # drawing did not move the global generator
    table = checks.conflicts()
    for records in task_set.values():
        for record in records:
            ids = [c["id"] for c in record["constraints"]]
            assert 1 <= len(ids) <= 3 and len(set(ids)) == len(ids)
            assert all(b not in table[a] for a in ids for b in ids if a != b)
            for constraint in record["constraints"]:
                assert checks.describe(constraint) in record["instruction"]
                if constraint["id"] == "length_constraints:nth_paragraph_first_word":
                    assert constraint["kwargs"]["nth_paragraph"] <= constraint["kwargs"]["num_paragraphs"]
                if constraint["id"] == "combination:repeat_prompt":  # the request it repeats is what precedes it
                    assert record["instruction"].startswith(constraint["kwargs"]["prompt_to_repeat"])
            assert record["instruction"].startswith(record["base_instruction"])
            json.dumps(record)  # a native JSON record
    budget = tasks.build_task_set(seed=3, max_words=40)  # a short response budget: no "at least 100 words"
    words = [c["kwargs"] for records in budget.values() for r in records for c in r["constraints"]
             if c["id"] == "length_constraints:number_words"]
    assert words and all(w["relation"] == "less than" or w["num_words"] <= 40 for w in words)
    assert any(w["relation"] == "at least" for records in task_set.values() for r in records for c in r["constraints"]
               if c["id"] == "length_constraints:number_words" for w in [c["kwargs"]])  # IFEval's own draws do
    with pytest.raises(ValueError, match="unseen_kinds"):
        tasks.build_task_set(unseen_kinds=["length_constraints:number_sentences"])


def test_train_kinds_choose_the_trained_and_in_kind_held_out_constraints():
    """configs/smollm2_verifiable.yaml trains on the kinds its start model follows sometimes: train and heldout
    draw from those only (each of them used), heldout_unseen stays as it is; a bad list names its field."""
    from tuna_train.pipeline.workflow import load_pipeline_config

    chosen = load_pipeline_config(str(Path(__file__).parents[1] / "configs" / "smollm2_verifiable.yaml")).train_kinds
    assert chosen and not set(chosen) & set(tasks.UNSEEN_KINDS)
    narrowed = tasks.build_task_set(seed=3, max_constraints=2, train_kinds=chosen)
    kinds = {name: {c["id"] for r in records for c in r["constraints"]} for name, records in narrowed.items()}
    assert kinds["train"] == kinds["heldout"] == set(chosen)
    assert narrowed["heldout_unseen"] == tasks.build_task_set(seed=3, max_constraints=2)["heldout_unseen"]
    with pytest.raises(ValueError, match=r"train_kinds: \['keywords:nonsense'\] are not usable"):
        tasks.build_task_set(train_kinds=["keywords:nonsense"])
    with pytest.raises(ValueError, match="train_kinds: .*unseen kinds too"):
        tasks.build_task_set(train_kinds=[tasks.UNSEEN_KINDS[0]])


def test_task_records_keep_their_constraints_through_generate_and_rank(tmp_path, task_set):
    paths = tasks.write_task_set(tmp_path, seed=3)
    assert [json.loads(line) for line in paths["heldout"].read_text().splitlines()] == task_set["heldout"]
    records = task_set["heldout_unseen"][:3]
    model, tokenizer = build_tiny_llama(hidden_size=64, seed=5), synthetic_tokenizer()
    generate_records(model, tokenizer, records, tmp_path / "generated.jsonl", num_candidates=2, template="none",
                     max_new_tokens=3, max_tries=1)
    generated = [json.loads(line) for line in (tmp_path / "generated.jsonl").read_text().splitlines()]
    assert [g["constraints"] for g in generated] == [r["constraints"] for r in records]
    assert rank_records(generated, VerifiableJudge(), tmp_path / "ranked.jsonl")["ranked"] == 3


# ---- the judge


def own_counts(record):
    """Each response's strict passes, from the checkers directly (not through the judge or IFEval's loop)."""
    counts = []
    for response in record["responses"]:
        count = 0
        for constraint in record["constraints"]:
            instance = checks.ifeval()[0].INSTRUCTION_DICT[constraint["id"]](constraint["id"])
            instance.build_description(**constraint["kwargs"])
            count += bool(instance.check_following(response))
        counts.append(count)
    return counts


def judged_record():
    kinds = ["punctuation:no_comma", "keywords:existence", "detectable_format:title"]
    # "<<Bees>>" + ocean wave, no comma: 3; two candidates with 2 (a tie); one with 1; one with 0
    responses = ["<<Bees>>\nThe ocean, a wave.", "The ocean sent a wave.", "<<Bees>>\nThe ocean sent a wave.",
                 "<<Bees>>\nThe sea, calm.", "Calm sea, yes.", "<<Bees>>\nA sea."]
    return {"id": "r1", "instruction": "Describe the sea.", "responses": responses,
            "constraints": [spec(kind) for kind in kinds]}


def test_judge_ranks_by_the_checkers_counts_and_keeps_ties(tmp_path):
    record = judged_record()
    counts = own_counts(record)
    assert sorted(counts) == [0, 1, 2, 2, 2, 3]  # the fixture has ties to keep
    stats = rank_records([record], make_judge("verifiable"), tmp_path / "ranked.jsonl")
    assert stats["ranked"] == 1
    ranked = json.loads((tmp_path / "ranked.jsonl").read_text())
    order = [record["responses"].index(text) for text in ranked["responses"]]
    assert sorted(order) == list(range(len(counts)))  # every candidate kept
    assert [counts[i] for i in order] == sorted(counts, reverse=True)
    assert ranked["scores"] == [counts[i] / 3 for i in order]  # the fraction followed; ties equal
    assert ranked["constraints"] == record["constraints"]
    for i, results in zip(order, ranked["constraint_results"]):  # the audit: per candidate, per constraint
        assert [c["id"] for c in results] == [c["id"] for c in record["constraints"]]
        assert sum(c["strict"] for c in results) == counts[i]
    examples, _ = load_ranked(str(tmp_path / "ranked.jsonl"))  # tuna train reads it; ties stay tied
    scores = examples[0].scores
    assert len(set(scores)) == len(set(counts)) and scores == sorted(scores, reverse=True)


def test_judge_cache_key_holds_the_constraints_and_bad_ones_fail_their_record_only(tmp_path):
    record = judged_record()
    other = dict(record, id="r2", constraints=[spec("startend:quotation")])
    bad = dict(record, id="r3", constraints=[{"id": "length_constraints:number_sentences", "kwargs": {}}])
    stats = rank_records([record, other, bad], make_judge("verifiable"), tmp_path / "ranked.jsonl")
    assert (stats["ranked"], stats["failed"], stats["asked"]) == (2, 1, 3)  # same prompt, other constraints: asked
    failure = json.loads((tmp_path / "ranked.jsonl.failures.jsonl").read_text())
    assert failure["id"] == "r3" and "'constraints' item 0" in failure["judge_failure"] \
        and "punkt" in failure["judge_failure"]
    assert "unparsable" not in failure["judge_failure"]  # refused at once: checking again would give the same
    assert rank_records([record, other, bad], make_judge("verifiable"), tmp_path / "ranked.jsonl")["asked"] == 0


def test_rank_cli_judge_verifiable(tmp_path):
    data = tmp_path / "generated.jsonl"
    data.write_text(json.dumps(judged_record()) + "\n")
    assert main(["rank", "--judge", "verifiable", "--data", str(data), "--out", str(tmp_path / "r.jsonl")]) == 0
    assert json.loads((tmp_path / "r.jsonl").read_text())["judge"]["name"] == "verifiable"


# ---- the eval


def test_four_figures_match_a_hand_computation():
    records = [
        {"id": "a", "constraints": [spec("punctuation:no_comma"), spec("keywords:existence")]},
        {"id": "b", "constraints": [spec("punctuation:no_comma")]},
        {"id": "c", "constraints": [spec("detectable_format:title"), spec("keywords:existence"),
                                    spec("punctuation:no_comma")]},
    ]
    predictions = ["The ocean sent a wave.",  # follows both
                   "Sure, here it is:\nNo commas here.",  # strict no (a comma in the first line), loose yes
                   "<<Sea>> The ocean, a wave."]  # title and keywords yes, comma no (strict and loose)
    rows = verifiable_rows(records, predictions)
    metrics = verifiable_metrics(rows)
    # prompts fully followed: strict a; loose a, b. Constraints followed: strict 2 + 0 + 2, loose 2 + 1 + 2 of 6
    assert metrics["prompt_strict"] == pytest.approx(1 / 3) and metrics["prompt_loose"] == pytest.approx(2 / 3)
    assert metrics["instruction_strict"] == pytest.approx(4 / 6)
    assert metrics["instruction_loose"] == pytest.approx(5 / 6)
    assert (metrics["prompts"], metrics["instructions"]) == (3, 6)
    for figure in FIGURES:
        low, high = metrics[f"{figure}_ci95"]
        assert 0 <= low <= metrics[figure] <= high <= 1
    # a resampled prompt keeps its constraints together: instruction-level bounds are ratios of whole prompts,
    # so with prompts of 2, 1 and 3 constraints the loose low bound can be no lower than prompt c's 2 / 3
    assert metrics["instruction_loose_ci95"][0] >= 2 / 3 - 1e-12
    same = verifiable_metrics(verifiable_rows(records[:1] * 4, predictions[:1] * 4))
    assert same["prompt_strict_ci95"] == [1.0, 1.0]


def test_win_rate_interval_unchanged_by_the_shared_bootstrap():
    def old_bootstrap_ci(outcomes, samples=2000, seed=0, level=0.95):  # the win rate's own, before it was shared
        value = {"win": 1.0, "tie": 0.5, "loss": 0.0}
        points = [value[o] for o in outcomes]
        rng = random.Random(seed)
        rates = sorted(sum(rng.choice(points) for _ in points) / len(points) for _ in range(samples))
        return rates[int((1 - level) / 2 * samples)], rates[min(samples - 1, int((1 + level) / 2 * samples))]

    for seed in range(5):  # few samples and a narrow level: any change in the draws moves the bounds
        outcomes = random.Random(seed).choices(["win", "tie", "loss"], k=37)
        for options in ({}, {"samples": 5, "seed": seed, "level": 0.4}, {"samples": 9, "seed": seed, "level": 0.2}):
            assert bootstrap_ci(outcomes, **options) == old_bootstrap_ci(outcomes, **options)
    assert bootstrap_ci([]) == (None, None)


def test_eval_verifiable_cli_reports_the_figures(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "heldout.jsonl"
    records = tasks.build_task_set(seed=0)["heldout"][:3]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "eval"
    assert main(["eval", "verifiable", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out),
                 "--max-new-tokens", "4"]) == 0
    report = json.loads((out / "report-verifiable.json").read_text())
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert report["metrics"] == verifiable_metrics(verifiable_rows(records, [r["prediction"] for r in rows]))
    assert "prompt_strict" in (out / "report-verifiable.md").read_text()
    assert main(["eval", "--compare", str(out), str(out), "--png", str(tmp_path / "c.png")]) == 0
    assert PLOTTED[-4:] == FIGURES and (tmp_path / "c.png").stat().st_size > 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "instruction": "hi"}) + "\n")
    capsys.readouterr()
    assert main(["eval", "verifiable", "--model", str(tiny_model_dir), "--data", str(bad), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "bad.jsonl line 1 (id 'x')" in error and "'constraints'" in error and len(error.splitlines()) == 1
