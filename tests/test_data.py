"""tuna_train.data: every public format loads from a small fixture; malformed records give errors that
name the file, the record number and the field."""

import json

import pytest

from tuna_train.data import DataError, load_ranked

NATIVE = [
    {"instruction": "Add.", "input": "2+2", "responses": ["5", "4", "22"], "scores": [0.5, 1.0, -1.0]},
    {"prompt": "Q: capital of France?\nA:", "responses": ["Lyon", "Paris"], "ranking": [1, 0]},
]
FORMATTED = [{"id": 7, "instruction": "### Instruction:\nSay hi\n\n### Response:", "output": ["bye", "hi"],
              "score": [-2.0, -0.5]}]
PROBABILISTIC = [{"orig": {"instruction": "Name a colour.", "input": "", "output": "red"},
                  "text": ["blue", "red", "car", "green"], "avg_token_prob": [-1.0, -0.2, -3.0, -1.5],
                  "length": [1, 1, 1, 1], "logprob": [-1.0, -0.2, -3.0, -1.5]}]
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{}\n\n### Response:")


def release_contextual(instruction, generations, ranking, key="rank", judge_response="1, 2, 3", **extra):
    """A raw contextual record shaped like the public release: ``instruct`` is the templated instruction,
    ``prompt`` what the judge was sent (instruct, every candidate as "###Response j:", the judge's steps)."""
    instruct = ALPACA.format(instruction)
    shown = "".join(f"\n\n###Response {j}:\n{text}" for j, text in enumerate(generations))
    record = {"prompt": instruct + shown + "\n\nWe would like to request your feedback ... rank: [...]",
              "instruct": instruct, "id": extra.pop("id", 1), "generation": list(generations),
              "gpt_eval": f"... rank: {ranking}", "rank_str": str(ranking), key: list(ranking)}
    if judge_response is not None:
        record["response_4"] = judge_response
    record.update(extra)
    return record


CONTEXTUAL = [
    release_contextual("Count to 3", ["1 2 3", "1 2", "3 2 1", "1 2 3 4"], [0, 4, 3, 1], key="ranks"),
    release_contextual("Say yes", ["yes", "no", "maybe", "yes!"], [3, 0, 2, 1], judge_response="Yes.", id=2),
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def write_json(path, records):
    path.write_text(json.dumps(records, indent=1))
    return str(path)


def test_native_jsonl(tmp_path):
    examples, report = load_ranked(write_jsonl(tmp_path / "d.jsonl", NATIVE))
    assert report.data_format == "native" and report.loaded == 2
    assert examples[0].responses == ["4", "5", "22"] and examples[0].scores == [1.0, 0.5, -1.0]
    assert examples[0].input == "2+2" and not examples[0].prompt_is_formatted
    assert "### Input:\n2+2" in examples[0].prompt_text("alpaca")
    assert examples[1].responses == ["Paris", "Lyon"] and examples[1].prompt_is_formatted


def test_native_parquet(tmp_path):
    import datasets

    path = tmp_path / "d.parquet"
    datasets.Dataset.from_list([NATIVE[0]]).to_parquet(str(path))
    examples, report = load_ranked(str(path))
    assert report.data_format == "native" and examples[0].responses == ["4", "5", "22"]


def test_tuna_formatted_json_list(tmp_path):
    examples, report = load_ranked(write_json(tmp_path / "f.json", FORMATTED))
    assert report.data_format == "tuna_formatted"
    assert examples[0].responses == ["hi", "bye"] and examples[0].prompt_is_formatted
    assert examples[0].prompt_text("alpaca") == FORMATTED[0]["instruction"]


def test_tuna_probabilistic(tmp_path):
    examples, report = load_ranked(write_jsonl(tmp_path / "p.jsonl", PROBABILISTIC))
    assert report.data_format == "tuna_probabilistic"
    assert examples[0].responses == ["red", "blue", "green", "car"]
    assert "Name a colour." in examples[0].prompt_text("alpaca")


def test_tuna_contextual_rank_and_ranks(tmp_path):
    examples, report = load_ranked(write_json(tmp_path / "c.json", CONTEXTUAL))
    assert report.data_format == "tuna_contextual"
    # "ranks" spelling; index 4 (the judge's own response) dropped; response 2 missing (a duplicate dropped)
    assert examples[0].responses == ["1 2 3", "1 2 3 4", "1 2"]
    assert examples[1].responses == ["yes!", "yes", "maybe", "no"]  # "rank" spelling
    with_judge, _ = load_ranked(str(tmp_path / "c.json"), include_judge_response=True)
    assert with_judge[0].responses == ["1 2 3", "1, 2, 3", "1 2 3 4", "1 2"]


@pytest.mark.parametrize("key", ["rank", "ranks"])
@pytest.mark.parametrize("judge_response", ["the judge's own answer", None])
def test_contextual_trains_on_instruct_not_on_the_judge_prompt(tmp_path, key, judge_response):
    generations = ["Paris", "Lyon", "Paris, France", "Marseille"]
    record = release_contextual("Name the capital of France.", generations, [2, 0, 1, 3], key=key,
                                judge_response=judge_response)
    examples, _ = load_ranked(write_jsonl(tmp_path / "c.jsonl", [record]))
    example = examples[0]
    for template in ("alpaca", "chat", "none"):  # templated once: no template is applied again
        assert example.prompt_text(template) == record["instruct"]
    assert "###Response" not in example.prompt_text()
    assert example.meta["judge_prompt"] == record["prompt"]  # kept for audit, never trained on
    assert example.responses == ["Paris, France", "Paris", "Lyon", "Marseille"]


def test_contextual_untemplated_instruct_is_templated_once(tmp_path):
    record = dict(CONTEXTUAL[1], instruct="Say yes")
    examples, _ = load_ranked(write_jsonl(tmp_path / "c.jsonl", [record]))
    assert examples[0].prompt_text("alpaca") == ALPACA.format("Say yes")


def test_contextual_record_whose_instruct_shows_its_candidates_is_refused(tmp_path):
    swapped = dict(CONTEXTUAL[1], instruct=CONTEXTUAL[1]["prompt"])  # the judge's prompt as the training prompt
    path = write_jsonl(tmp_path / "c.jsonl", [CONTEXTUAL[0], swapped])
    with pytest.raises(DataError, match=r"c.jsonl: record 2 \(line 2\): field 'instruct' holds the judge's prompt"):
        load_ranked(path)
    no_instruct = {k: v for k, v in CONTEXTUAL[0].items() if k != "instruct"}
    with pytest.raises(DataError, match=r"record 1 \(line 1\): field 'instruct' is missing"):
        load_ranked(write_jsonl(tmp_path / "n.jsonl", [no_instruct]), data_format="tuna_contextual")


@pytest.mark.parametrize("bad, field", [
    ({"instruction": "x", "scores": [1.0]}, "field 'responses' is missing"),
    ({"instruction": "x", "responses": ["a", "b"], "scores": [1.0]}, "field 'scores' has 1 entries for 2 responses"),
    ({"instruction": "x", "responses": ["a", "b"], "scores": [1.0, "high"]}, "field 'scores[1]' must be a finite number"),
    ({"instruction": "x", "responses": [], "scores": []}, "field 'responses' is an empty list"),
    ({"responses": ["a"], "scores": [1.0]}, "field 'instruction' is missing"),
    ({"instruction": "x", "responses": ["a", 3], "scores": [1.0, 2.0]}, "field 'responses[1]' must be a string"),
    ({"instruction": "x", "responses": ["a", "b"], "ranking": [0, 5]}, "field 'ranking[1]' = 5 names no response"),
])
def test_malformed_native_records_name_file_record_and_field(tmp_path, bad, field):
    path = write_jsonl(tmp_path / "bad.jsonl", [NATIVE[0], NATIVE[0], bad])
    with pytest.raises(DataError) as info:
        load_ranked(path)
    message = str(info.value)
    assert message.startswith(f"{path}: record 3 (line 3)"), message
    assert field in message


def test_malformed_public_formats(tmp_path):
    broken = dict(FORMATTED[0], score=[1.0])
    path = write_json(tmp_path / "f.json", [FORMATTED[0], broken])
    with pytest.raises(DataError, match=r"f.json: record 2: field 'score' has 1 entries for 2 responses"):
        load_ranked(path)
    no_text = {k: v for k, v in PROBABILISTIC[0].items() if k != "avg_token_prob"}
    path = write_jsonl(tmp_path / "p.jsonl", [no_text])
    with pytest.raises(DataError, match=r"p.jsonl: record 1 \(line 1\): field 'avg_token_prob' is missing"):
        load_ranked(path, data_format="tuna_probabilistic")


def test_skip_bad_records_counts_them(tmp_path):
    bad = {"instruction": "x", "responses": ["a", "b"], "scores": [1.0]}
    path = write_jsonl(tmp_path / "mixed.jsonl", [NATIVE[0], bad, NATIVE[1], bad])
    examples, report = load_ranked(path, skip_bad_records=True)
    assert len(examples) == 2 and report.skipped == 2
    assert "record 2 (line 2)" in report.first_errors[0]


def test_invalid_json_line_is_named(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(NATIVE[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"broken.jsonl: record 2 \(line 2\): not valid JSON"):
        load_ranked(str(path))


def test_unknown_format_and_missing_file(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "?", "answers": ["a"]}])
    with pytest.raises(DataError, match="cannot tell the format"):
        load_ranked(path)
    with pytest.raises(DataError, match="no such file"):
        load_ranked(str(tmp_path / "missing.jsonl"))
