"""tuna_train.data: every public format loads from a small fixture; malformed records give errors that
name the file, the record number and the field."""

import csv
import json
import re
import tempfile

import pytest

from helpers import ALPACA, release_contextual
from tuna_train.data import DataError, RankedExamples, examples_from_records, load_ranked, select_examples

NATIVE = [
    {"instruction": "Add.", "input": "2+2", "responses": ["5", "4", "22"], "scores": [0.5, 1.0, -1.0]},
    {"prompt": "Q: capital of France?\nA:", "responses": ["Lyon", "Paris"], "ranking": [1, 0]},
]
FORMATTED = [{"id": 7, "instruction": "### Instruction:\nSay hi\n\n### Response:", "output": ["bye", "hi"],
              "score": [-2.0, -0.5]}]
PROBABILISTIC = [{"orig": {"instruction": "Name a colour.", "input": "", "output": "red"},
                  "text": ["blue", "red", "car", "green"], "avg_token_prob": [-1.0, -0.2, -3.0, -1.5],
                  "length": [1, 1, 1, 1], "logprob": [-1.0, -0.2, -3.0, -1.5]}]


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
    assert "###Response" not in example.prompt_text("alpaca")
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


# --- reading: encodings, broken JSON, huge numbers, bad text, every source (issue 15 points 9-12, issue 13) ---

def write_lines(path, lines):
    """Lines given as bytes or records, written as JSON lines (bytes verbatim)."""
    path.write_bytes(b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n"
                              for line in lines))
    return str(path)


def same_examples(actual, expected):
    """Everything but the source, which names the file."""
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert (a.instruction, a.input, a.responses, a.scores, a.prompt_is_formatted, a.meta) == \
               (e.instruction, e.input, e.responses, e.scores, e.prompt_is_formatted, e.meta)


def test_non_utf8_line_is_named_and_skippable(tmp_path):
    bad = json.dumps(NATIVE[0]).encode().replace(b"Add.", b"Add\xff.")
    path = write_lines(tmp_path / "latin.jsonl", [NATIVE[0], bad, NATIVE[1]])
    with pytest.raises(DataError, match=r"latin.jsonl: record 2 \(line 2\): not valid UTF-8 \(byte 0xff"):
        load_ranked(path)
    examples, report = load_ranked(path, skip_bad_records=True)
    assert len(examples) == 2 and report.skipped == 1 and "line 2" in report.first_errors[0]


def test_byte_order_mark_is_accepted_and_a_truncated_line_is_a_bad_record(tmp_path):
    truncated = json.dumps(NATIVE[1]).encode()[:25]
    path = write_lines(tmp_path / "bom.jsonl", [b"\xef\xbb\xbf" + json.dumps(NATIVE[0]).encode(), truncated,
                                                 NATIVE[1]])
    with pytest.raises(DataError, match=r"bom.jsonl: record 2 \(line 2\): not valid JSON"):
        load_ranked(path)
    examples, report = load_ranked(path, skip_bad_records=True)
    same_examples(examples, examples_from_records(NATIVE))
    assert report.skipped == 1
    listed = tmp_path / "bom.json"
    listed.write_bytes(b"\xef\xbb\xbf" + json.dumps(FORMATTED).encode())
    same_examples(load_ranked(str(listed))[0], examples_from_records(FORMATTED, "tuna_formatted"))


def test_huge_integer_and_deep_nesting_are_bad_records(tmp_path):
    huge = dict(NATIVE[0], scores=[1, 10 ** 400, 2])
    deep = b'{"instruction": "x", "responses": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    path = write_lines(tmp_path / "odd.jsonl", [NATIVE[0], huge, deep, NATIVE[1]])
    with pytest.raises(DataError, match=r"odd.jsonl: record 2 \(line 2\): field 'scores\[1\]' must be a finite "
                                        r"number, got an integer of 401 digits"):
        load_ranked(path)
    examples, report = load_ranked(path, skip_bad_records=True)
    assert len(examples) == 2 and report.skipped == 2
    assert "record 3 (line 3): not valid JSON (brackets nested too deeply)" in report.first_errors[1]
    # the same in a JSON list: the deep element is delimited and skipped, the rest still loads
    listed = tmp_path / "odd.json"
    listed.write_bytes(b"[" + json.dumps(NATIVE[0]).encode() + b",\n" + deep + b",\n" + json.dumps(NATIVE[1]).encode()
                       + b"]")
    with pytest.raises(DataError, match=r"odd.json: record 2 \(line 2\): not valid JSON"):
        load_ranked(str(listed))
    examples, report = load_ranked(str(listed), skip_bad_records=True)
    same_examples(examples, examples_from_records(NATIVE))


@pytest.mark.parametrize("records, fmt, field", [
    ([dict(NATIVE[0], instruction="Add\ud800.")], "native", "instruction"),
    ([dict(NATIVE[0], input="2\udfff2")], "native", "input"),
    ([dict(NATIVE[0], responses=["5", "4\ud800", "22"])], "native", "responses[1]"),
    ([dict(NATIVE[1], prompt="Q\ud800")], "native", "prompt"),
    ([dict(PROBABILISTIC[0], orig={"instruction": "Name", "input": "x\ud800", "output": "red"})],
     "tuna_probabilistic", "orig.input"),
    ([dict(FORMATTED[0], output=["bye", "\ud800hi"])], "tuna_formatted", "output[1]"),
    ([dict(CONTEXTUAL[1], generation=["yes", "no\ud800", "maybe", "yes!"])], "tuna_contextual", "generation[1]"),
])
def test_lone_surrogate_is_refused_naming_record_and_field(tmp_path, records, fmt, field):
    path = write_jsonl(tmp_path / "s.jsonl", [NATIVE[0]] + records if fmt == "native" else records * 2)
    number = 2 if fmt == "native" else 1
    with pytest.raises(DataError, match=rf"s.jsonl: record {number} \(line {number}\): field "
                                        rf"'{re.escape(field)}' is not valid text: a lone surrogate"):
        load_ranked(path, data_format=fmt)
    with pytest.raises(DataError, match=re.escape(f"field '{field}' is not valid text")):
        examples_from_records(records, fmt)


def test_bytes_that_are_not_utf8_in_a_json_list_are_refused_with_the_field(tmp_path):
    path = tmp_path / "l.json"
    path.write_bytes(json.dumps(NATIVE).encode().replace(b"Lyon", b"Ly\xf6n"))
    with pytest.raises(DataError, match=r"l.json: record 2: field 'responses\[0\]' is not valid text: byte 0xf6"):
        load_ranked(str(path))
    examples, report = load_ranked(str(path), skip_bad_records=True)
    assert len(examples) == 1 and report.skipped == 1


@pytest.mark.parametrize("value", [["a", "b"], {"text": "a"}])
def test_structured_value_in_a_text_field_is_refused(tmp_path, value):
    record = dict(PROBABILISTIC[0], orig={"instruction": "Name a colour.", "input": value, "output": "red"})
    path = write_jsonl(tmp_path / "p.jsonl", [PROBABILISTIC[0], record])
    with pytest.raises(DataError, match=rf"p.jsonl: record 2 \(line 2\): field 'orig.input' must be a string, "
                                        rf"got {type(value).__name__}"):
        load_ranked(path)
    examples, report = load_ranked(path, skip_bad_records=True)
    assert len(examples) == 1 and report.skipped == 1


def write_csv(path, records):
    """Records as CSV: list- and object-valued fields as JSON in their cells, absent fields as empty cells."""
    columns = sorted({key for record in records for key in record})
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for record in records:
            writer.writerow(["" if key not in record else json.dumps(record[key])
                             if isinstance(record[key], (list, dict)) else record[key] for key in columns])
    return str(path)


@pytest.mark.parametrize("records, fmt", [(NATIVE, "native"), (FORMATTED * 2, "tuna_formatted"),
                                          (PROBABILISTIC, "tuna_probabilistic")])
def test_every_source_gives_the_same_examples(tmp_path, monkeypatch, records, fmt):
    import datasets

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the datasets cache goes while loading
    expected = examples_from_records(records, fmt)
    columns = sorted({key for record in records for key in record})  # from_list takes the first row's keys
    table = datasets.Dataset.from_list([{key: record.get(key) for key in columns} for record in records])
    saved = tmp_path / "saved"
    table.save_to_disk(str(saved))
    split = tmp_path / "split"
    datasets.DatasetDict({"train": table}).save_to_disk(str(split))
    table.to_parquet(str(tmp_path / "d.parquet"))
    sources = [write_jsonl(tmp_path / "d.jsonl", records), write_json(tmp_path / "d.json", records),
               str(tmp_path / "d.parquet"), write_csv(tmp_path / "d.csv", records), str(saved), str(split)]
    before = set(tmp_path.iterdir())
    for source in sources:
        examples, report = load_ranked(source)
        assert report.data_format == fmt, source
        assert examples[-1].source.startswith(f"{source}: record {len(records)}")
        if source.endswith(".csv"):  # a CSV cell outside the JSON-valued fields is text: the id too
            same_examples(examples, examples_from_records([dict(r, id=str(r["id"])) if "id" in r else r
                                                           for r in records], fmt))
            continue
        same_examples(examples, expected)
    assert set(tmp_path.iterdir()) == before  # no cache left behind


def test_csv_cell_that_is_not_json_is_named(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('instruction,responses,scores\n"two\nlines","[""a""]",[1.0]\ny,"[""a"", ""b""",[1.0]\n'
                    'z,"[""a""]",[1.0],extra\n')
    with pytest.raises(DataError, match=r"d.csv: record 2 \(line 4\): field 'responses' must hold JSON"):
        load_ranked(str(path))
    examples, report = load_ranked(str(path), skip_bad_records=True)
    assert examples[0].instruction == "two\nlines" and report.skipped == 2
    assert report.first_errors[1].endswith("record 3 (line 5): 4 cells for 3 columns")


def test_missing_path_with_the_hub_offline_names_the_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"^nobody/no-such-dataset: no such file or directory .*offline"):
        load_ranked("nobody/no-such-dataset")


def test_hub_name_is_streamed_through_datasets_and_a_local_typo_is_not(tmp_path, monkeypatch):
    import datasets

    asked = []

    def fake_load_dataset(name, split, streaming, cache_dir, **options):  # the Hub, without the network
        asked.append((name, split, streaming))
        if name != "owner/ranked":
            raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub")
        return iter([{**record, "prompt": None} for record in NATIVE[:1]] + NATIVE[1:])  # Arrow fills nulls

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.chdir(tmp_path)
    examples, _ = load_ranked("owner/ranked:test")
    same_examples(examples, examples_from_records(NATIVE))
    assert asked == [("owner/ranked", "test", True)]
    with pytest.raises(DataError, match=r"^owner/other: no such file or directory, and not readable from the "
                                        r"Hugging Face Hub \(FileNotFoundError"):
        load_ranked("owner/other")
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match=r"^data/ranked: no such file$"):
        load_ranked("data/ranked")  # 'data' is a local directory: a mistyped path, the Hub is not asked
    assert len(asked) == 2


def test_json_list_read_through_a_small_window(tmp_path, monkeypatch):
    """Elements straddling the window's edge decode as from one piece; a bad element that still balances is a
    bad record, a list cut short names its line."""
    from tuna_train import records as records_module

    monkeypatch.setattr(records_module, "_WINDOW_CHARS", 7)
    many = (NATIVE + FORMATTED[:0]) * 5 + [dict(NATIVE[0], scores=[1e300, 12345678901234567890, 0.5])]
    path = write_json(tmp_path / "w.json", many)
    same_examples(load_ranked(path)[0], examples_from_records(many))
    text = json.dumps(many, indent=1)
    bad = tmp_path / "bad.json"
    bad.write_text(text.replace('"Paris"', "Paris", 1))  # record 2 is not JSON, its brackets balance
    with pytest.raises(DataError, match=r"bad.json: record 2 \(line \d+\): not valid JSON"):
        load_ranked(str(bad))
    assert len(load_ranked(str(bad), skip_bad_records=True)[0]) == len(many) - 1
    # a number as an element is a bad record even when the window's edge cuts it
    numbered = write_json(tmp_path / "n.json", [NATIVE[0], 12345678901234567890, NATIVE[1]])
    for window in range(3, 14):  # some window sizes cut the number
        monkeypatch.setattr(records_module, "_WINDOW_CHARS", window)
        examples, report = load_ranked(numbered, skip_bad_records=True)
        same_examples(examples, examples_from_records(NATIVE))
        assert report.skipped == 1 and "record 2: a record must be a JSON object" in report.first_errors[0]
    cut = tmp_path / "cut.json"
    cut.write_text(text[:len(text) // 2])
    with pytest.raises(DataError, match=r"cut.json: line \d+: not valid JSON"):
        load_ranked(str(cut))


def test_loaded_examples_are_a_compact_sequence(tmp_path):
    records = [dict(NATIVE[0], instruction=f"Add {i}.") for i in range(10)] + FORMATTED
    path = write_jsonl(tmp_path / "many.jsonl", records[:10])
    examples, _ = load_ranked(path)
    expected = examples_from_records(records[:10])
    same_examples(examples, expected)  # iteration
    same_examples([examples[i] for i in range(len(examples))], expected)  # indexing
    same_examples([examples[-1]], expected[-1:])
    same_examples(examples[2:9:3], expected[2:9:3])
    same_examples(examples[1:][::2][1:3], expected[1:][::2][1:3])
    same_examples(examples.select([7, 0, 7]), [expected[7], expected[0], expected[7]])
    same_examples(select_examples(examples, [2, 5]), select_examples(expected, [2, 5]))
    assert isinstance(select_examples(examples, [2, 5]), RankedExamples)
    assert examples[3].source == f"{path}: record 4 (line 4)" and examples[3] is not examples[3]
    with pytest.raises(IndexError):
        examples[10]
    formatted, _ = load_ranked(write_json(tmp_path / "f.json", FORMATTED))
    assert formatted[0].meta == {"id": 7}
    assert examples.nbytes() < (tmp_path / "many.jsonl").stat().st_size


def test_a_failed_load_leaves_no_file(tmp_path, monkeypatch):
    store = tmp_path / "tmp"
    store.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(store))  # where the example store is written
    path = write_jsonl(tmp_path / "bad.jsonl", [NATIVE[0]] * 5000 + [{"instruction": "x"}])  # one batch written
    with pytest.raises(DataError, match="record 5001"):
        load_ranked(path)
    examples, _ = load_ranked(path, skip_bad_records=True)
    assert len(examples) == 5000 and examples[4999].responses == ["4", "5", "22"]
    assert list(store.iterdir()) == []  # the store of the good load is unlinked too, yet still readable


# --- 27.11: a file that cannot be read; a ranking that contradicts the scores ---

def test_unreadable_file_is_a_one_line_error_naming_it(tmp_path, monkeypatch, capsys):
    """Read permission refused (a PermissionError traceback before): a DataError naming the file, and one line
    from the CLI. As root chmod 000 still reads, so `open` is refused in the reader instead."""
    import builtins
    import os

    from tuna_train import cli, records

    paths = [write_jsonl(tmp_path / "locked.jsonl", NATIVE), write_json(tmp_path / "locked.json", NATIVE)]
    for path in paths:
        os.chmod(path, 0)
    if os.access(paths[0], os.R_OK):  # root: refuse the open as the system would
        def refusing_open(file, *args, **kwargs):
            if str(file) in paths:
                raise PermissionError(13, "Permission denied", str(file))
            return builtins.open(file, *args, **kwargs)

        monkeypatch.setattr(records, "open", refusing_open, raising=False)
    for path in paths:
        with pytest.raises(DataError, match=re.escape(path) + r": cannot be read \(Permission denied\)"):
            load_ranked(path)
    code = cli.main(["train", "--data", paths[0], "--output-dir", str(tmp_path / "run"), "--progress", "false"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if "error" in line] == \
        [f"tuna train: error: {paths[0]}: cannot be read (Permission denied)"]


def test_a_ranking_that_contradicts_the_scores_is_named_once_per_file(tmp_path, caplog):
    agreeing = {"instruction": "a", "responses": ["x", "y", "z"], "scores": [1.0, 3.0, 3.0], "ranking": [2, 1, 0]}
    contradicting = {"instruction": "b", "responses": ["x", "y"], "scores": [2.0, 1.0], "ranking": [1, 0]}
    not_an_order = {"instruction": "c", "responses": ["x", "y"], "scores": [2.0, 1.0], "ranking": [0, 0]}
    path = write_jsonl(tmp_path / "both.jsonl", [agreeing, contradicting, not_an_order, contradicting])
    with caplog.at_level("WARNING", logger="tuna_train.data"):
        examples, report = load_ranked(path)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and path in warnings[0] and "3 record(s)" in warnings[0]
    assert "the scores decide" in warnings[0] and report.ranking_overruled == 3
    assert examples[1].responses == ["x", "y"] and examples[1].scores == [2.0, 1.0]  # the scores' order
    assert examples[0].responses[2] == "x"  # tied y and z: either order agrees with the scores

    caplog.clear()
    with caplog.at_level("WARNING", logger="tuna_train.data"):
        _, report = load_ranked(write_jsonl(tmp_path / "agree.jsonl", [agreeing, NATIVE[0]]))
    assert report.ranking_overruled == 0 and not [r for r in caplog.records if r.levelname == "WARNING"]
